"""DICOMweb (QIDO-RS, WADO-RS) over a project's cache, at ``/dicomweb/projects/{project}``.

Authorised like the rest of the API (``Authorization: Bearer <token>`` or the
browser session) and only for members of the project and site admins. Every
answer carries ``Cache-Control: no-store``.
"""

from __future__ import annotations

import json
from typing import Annotated, Any
from urllib.parse import quote

from fastapi import APIRouter, Depends, Header, Query, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse

from mi2b2.api.deps import CurrentUser, app_service
from mi2b2.api.routers.viewer import NO_STORE, NoStoreRoute, get_viewer, png_response
from mi2b2.api.schemas.bodies import FrameNumber
from mi2b2.api.schemas.common import ErrorBody
from mi2b2.errors import InvalidInput
from mi2b2.services.dicomweb import (
    DicomWeb,
    NotAcceptable,
    Retrieval,
    SearchResult,
    dicom_transfer_syntaxes,
    parse_query,
)

router = APIRouter(prefix="/dicomweb/projects/{project_id}", tags=["dicomweb"], route_class=NoStoreRoute)
DICOM_JSON = "application/dicom+json"
NOT_ACCEPTABLE: dict[int | str, dict[str, Any]] = {
    406: {"model": ErrorBody, "description": "no representation the Accept header allows"},
}
SEARCH_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {"content": {DICOM_JSON: {"schema": {"type": "array", "items": {"type": "object"}}}},
          "description": "matching DICOM JSON objects (PS3.18 F.2)"},
}
METADATA_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {"content": {DICOM_JSON: {"schema": {"type": "array", "items": {"type": "object"}}}},
          "description": "the instances' metadata as DICOM JSON (PS3.18 F.2), bulk data by URI"},
}
MULTIPART_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {"content": {"multipart/related": {"schema": {"type": "string", "format": "binary"}}},
          "description": "multipart/related; type=\"application/dicom\": with no transfer-syntax parameter "
                         "Explicit VR Little Endian (compressed instances decoded); with transfer-syntax=* "
                         "the instances as stored"},
    **NOT_ACCEPTABLE,
}
FRAMES_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {"content": {"multipart/related": {"schema": {"type": "string", "format": "binary"}}},
          "description": "multipart/related: each frame's pixel data, raw or in its compressed media type"},
    **NOT_ACCEPTABLE,
}
RENDERED_ANSWER: dict[int | str, dict[str, Any]] = {
    200: {"content": {"image/png": {"schema": {"type": "string", "format": "binary"}}}, "description": "the frame as PNG"},
    **NOT_ACCEPTABLE,
}
Accept = Annotated[str | None, Header()]


def get_dicomweb(request: Request) -> DicomWeb:
    return app_service(request, "dicomweb", DicomWeb)


DicomWebDep = Annotated[DicomWeb, Depends(get_dicomweb)]


def _base(request: Request, project_id: str) -> str:
    # With [server] public_url set, a forged Host header cannot point a viewer's RetrieveURL elsewhere.
    public = request.app.state.context.config.server.public_url
    root = public or str(request.base_url).rstrip("/")
    return f"{root}/dicomweb/projects/{quote(project_id, safe='')}"


def _search(result: SearchResult) -> Response:
    headers = {"Warning": ", ".join(result.warnings)} if result.warnings else {}
    return Response(json.dumps(result.items), media_type=DICOM_JSON, headers=headers)


def _not_acceptable(error: NotAcceptable) -> Response:
    return JSONResponse({"error": str(error), "kind": "NotAcceptable"}, status_code=406,
                        headers={"Cache-Control": NO_STORE})


def _stream(retrieval: Retrieval) -> StreamingResponse:
    return StreamingResponse(retrieval.body, media_type=retrieval.content_type)


# --- QIDO-RS --------------------------------------------------------------------------------------


@router.get("/studies", response_class=Response, responses=SEARCH_ANSWER)
def search_studies(project_id: str, request: Request, user: CurrentUser, service: DicomWebDep) -> Response:
    """Cached studies matching the query (PatientID, PatientName, StudyDate range, AccessionNumber, ...)."""
    query = parse_query(request.query_params.multi_items())
    return _search(service.search_studies(user, project_id, query, _base(request, project_id)))


@router.get("/series", response_class=Response, responses=SEARCH_ANSWER)
def search_all_series(project_id: str, request: Request, user: CurrentUser, service: DicomWebDep) -> Response:
    query = parse_query(request.query_params.multi_items())
    return _search(service.search_series(user, project_id, None, query, _base(request, project_id)))


@router.get("/instances", response_class=Response, responses=SEARCH_ANSWER)
def search_all_instances(project_id: str, request: Request, user: CurrentUser, service: DicomWebDep) -> Response:
    query = parse_query(request.query_params.multi_items())
    return _search(service.search_instances(user, project_id, None, None, query, _base(request, project_id)))


@router.get("/studies/{study_uid}/series", response_class=Response, responses=SEARCH_ANSWER)
def search_series(project_id: str, study_uid: str, request: Request, user: CurrentUser,
                  service: DicomWebDep) -> Response:
    query = parse_query(request.query_params.multi_items())
    return _search(service.search_series(user, project_id, study_uid, query, _base(request, project_id)))


@router.get("/studies/{study_uid}/instances", response_class=Response,
            responses=SEARCH_ANSWER)
def search_study_instances(project_id: str, study_uid: str, request: Request, user: CurrentUser,
                           service: DicomWebDep) -> Response:
    query = parse_query(request.query_params.multi_items())
    return _search(service.search_instances(user, project_id, study_uid, None, query, _base(request, project_id)))


@router.get("/studies/{study_uid}/series/{series_uid}/instances", response_class=Response,
            responses=SEARCH_ANSWER)
def search_instances(project_id: str, study_uid: str, series_uid: str, request: Request, user: CurrentUser,
                     service: DicomWebDep) -> Response:
    query = parse_query(request.query_params.multi_items())
    return _search(service.search_instances(user, project_id, study_uid, series_uid, query,
                                            _base(request, project_id)))


# --- WADO-RS --------------------------------------------------------------------------------------


def _retrieve(service: DicomWeb, user: Any, project_id: str, study_uid: str, series_uid: str | None,
              sop_uid: str | None, accept: str | None) -> Response:
    try:
        syntaxes = dicom_transfer_syntaxes(accept)
        return _stream(service.retrieve(user, project_id, study_uid, series_uid, sop_uid, syntaxes))
    except NotAcceptable as error:
        return _not_acceptable(error)


@router.get("/studies/{study_uid}", response_class=StreamingResponse,
            responses=MULTIPART_ANSWER)
def retrieve_study(project_id: str, study_uid: str, user: CurrentUser, service: DicomWebDep,
                   accept: Accept = None) -> Response:
    """Every instance of the study in one multipart/related answer (as stored with transfer-syntax=*)."""
    return _retrieve(service, user, project_id, study_uid, None, None, accept)


@router.get("/studies/{study_uid}/series/{series_uid}", response_class=StreamingResponse,
            responses=MULTIPART_ANSWER)
def retrieve_series(project_id: str, study_uid: str, series_uid: str, user: CurrentUser, service: DicomWebDep,
                    accept: Accept = None) -> Response:
    return _retrieve(service, user, project_id, study_uid, series_uid, None, accept)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}", response_class=StreamingResponse,
            responses=MULTIPART_ANSWER)
def retrieve_instance(project_id: str, study_uid: str, series_uid: str, sop_uid: str, user: CurrentUser,
                      service: DicomWebDep, accept: Accept = None) -> Response:
    return _retrieve(service, user, project_id, study_uid, series_uid, sop_uid, accept)


@router.get("/studies/{study_uid}/metadata", response_class=Response, responses=METADATA_ANSWER)
def study_metadata(project_id: str, study_uid: str, request: Request, user: CurrentUser,
                   service: DicomWebDep) -> Response:
    items = service.metadata(user, project_id, study_uid, base=_base(request, project_id))
    return Response(json.dumps(items), media_type=DICOM_JSON)


@router.get("/studies/{study_uid}/series/{series_uid}/metadata", response_class=Response,
            responses=METADATA_ANSWER)
def series_metadata(project_id: str, study_uid: str, series_uid: str, request: Request, user: CurrentUser,
                    service: DicomWebDep) -> Response:
    items = service.metadata(user, project_id, study_uid, series_uid, base=_base(request, project_id))
    return Response(json.dumps(items), media_type=DICOM_JSON)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/metadata", response_class=Response,
            responses=METADATA_ANSWER)
def instance_metadata(project_id: str, study_uid: str, series_uid: str, sop_uid: str, request: Request,
                      user: CurrentUser, service: DicomWebDep) -> Response:
    items = service.metadata(user, project_id, study_uid, series_uid, sop_uid, base=_base(request, project_id))
    return Response(json.dumps(items), media_type=DICOM_JSON)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{frame_list}",
            response_class=StreamingResponse, responses=FRAMES_ANSWER)
def retrieve_frames(project_id: str, study_uid: str, series_uid: str, sop_uid: str, frame_list: str,
                    user: CurrentUser, service: DicomWebDep, accept: Accept = None) -> Response:
    """Frames (from 1, comma-separated): raw bytes, or compressed frames in their own media type."""
    try:
        return _stream(service.retrieve_frames(user, project_id, study_uid, series_uid, sop_uid, frame_list,
                                               accept or "*/*"))
    except NotAcceptable as error:
        return _not_acceptable(error)


# --- rendered (PNG, through the viewer's renderer) ---------------------------------------------------


def _window(window: str | None) -> tuple[float | None, float | None]:
    """PS3.18 ``window=center,width[,function]``; only the linear function is applied here."""
    if not window:
        return None, None
    parts = window.split(",")
    try:
        return float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        raise InvalidInput("window must be 'center,width' (numbers), e.g. window=40,400") from None


Window = Annotated[str | None, Query(description="center,width")]


def _rendered(request: Request, project_id: str, study_uid: str, series_uid: str, sop_uid: str, number: int,
              user: Any, service: DicomWeb, window: str | None, accept: str | None) -> Response:
    wanted = (accept or "*/*").lower()
    if not any(kind in wanted for kind in ("image/png", "image/*", "*/*")):
        return _not_acceptable(NotAcceptable("rendered images come as image/png; ask with Accept: image/png"))
    service.locate(user, project_id, study_uid, series_uid, sop_uid)
    center, width = _window(window)
    return png_response(get_viewer(request).frame(user, project_id, sop_uid, number, center, width))


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/rendered", response_class=Response,
            responses=RENDERED_ANSWER)
def rendered_instance(project_id: str, study_uid: str, series_uid: str, sop_uid: str, request: Request,
                      user: CurrentUser, service: DicomWebDep, window: Window = None,
                      accept: Accept = None) -> Response:
    return _rendered(request, project_id, study_uid, series_uid, sop_uid, 1, user, service, window, accept)


@router.get("/studies/{study_uid}/series/{series_uid}/instances/{sop_uid}/frames/{number}/rendered",
            response_class=Response, responses=RENDERED_ANSWER)
def rendered_frame(project_id: str, study_uid: str, series_uid: str, sop_uid: str, number: FrameNumber, request: Request,
                   user: CurrentUser, service: DicomWebDep, window: Window = None, accept: Accept = None) -> Response:
    return _rendered(request, project_id, study_uid, series_uid, sop_uid, number, user, service, window, accept)
