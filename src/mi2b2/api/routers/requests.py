from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import asdict
from typing import Annotated, Any

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool

from mi2b2.api.deps import ContextDep, CurrentUser
from mi2b2.api.schemas.bodies import PriorityBody, RequestAddBody, RequestIdsBody, RowIdPath
from mi2b2.api.schemas.requests import (
    AddReport,
    Canceled,
    PacsState,
    PriorityChanged,
    RequestPage,
    RequestRow,
    RequestsVersion,
    Retried,
)
from mi2b2.domain.principal import Principal
from mi2b2.errors import Mi2b2Error
from mi2b2.services import requests as service
from mi2b2.services.context import ServiceContext
from mi2b2.services.requests import StudyPick
from mi2b2.services.scheduler import pacs_states

router = APIRouter(tags=["requests"])
LOG = logging.getLogger(__name__)

TICK_SECONDS = 1.0  # how often the live request log looks for a change
KEEP_ALIVE_TICKS = 15  # quiet ticks before a comment line, so proxies do not close an idle stream
EVENT_STREAM = "text/event-stream"


def _wake_worker(http: Request) -> None:
    worker = getattr(http.app.state, "worker", None)
    if worker is not None:
        worker.wake()


@router.post("/requests", response_model=AddReport)
def add_requests(body: RequestAddBody, user: CurrentUser, ctx: ContextDep, http: Request) -> dict[str, Any]:
    picks = [StudyPick(s.study_uid.strip(), tuple(u.strip() for u in s.series_uids)) for s in body.studies]
    report = service.add_requests(ctx, user, body.project, body.pacs, picks, body.priority)
    _wake_worker(http)
    return asdict(report)


@router.get("/projects/{project_id}/requests", response_model=list[RequestRow])
def list_requests(
    project_id: str,
    user: CurrentUser,
    ctx: ContextDep,
    state: Annotated[list[str] | None, Query(description="only these states")] = None,
    limit: Annotated[int, Query(ge=1, le=100000)] = 1000,
) -> list[dict[str, Any]]:
    return service.list_requests(ctx, user, project_id, state or [], limit)


@router.get("/projects/{project_id}/requests/page", response_model=RequestPage)
def request_page(
    project_id: str,
    user: CurrentUser,
    ctx: ContextDep,
    state: Annotated[list[str] | None, Query(description="only these states")] = None,
    kind: Annotated[list[str] | None, Query(description="only these kinds (retrieve, forward)")] = None,
    by: Annotated[list[str] | None, Query(description="only requests of these users (logins)")] = None,
    patient_id: Annotated[str, Query(max_length=64, description="only this patient (MRN)")] = "",
    before: Annotated[int | None, Query(ge=1, le=2**31 - 1, description="only requests older than this id "
                                                                         "(the previous page's next_before)")] = None,
    limit: Annotated[int, Query(ge=1, le=service.MAX_PAGE)] = 100,
) -> dict[str, Any]:
    """A page of the request log: newest first, filtered on the server, with counts per state;
    fast whatever the number of requests (keyset pages on the request id)."""
    wanted = service.RequestFilter(tuple(state or ()), tuple(kind or ()), tuple(by or ()), patient_id)
    return asdict(service.request_page(ctx, user, project_id, wanted, before, limit))


@router.get(
    "/projects/{project_id}/requests/events",
    response_class=StreamingResponse,
    responses={200: {"description": "Server-Sent Events; or, without `Accept: text/event-stream`, one JSON object",
                     "model": RequestsVersion,
                     "content": {EVENT_STREAM: {"schema": {"type": "string"}},
                                 "application/json": {"example": {"version": "3f2a9c0d1e4b5a6f"}}}}},
)
async def request_events(project_id: str, user: CurrentUser, ctx: ContextDep, http: Request) -> Response:
    """The live request log: `event: requests` with `data: {"version": "..."}` at once and whenever the
    project's requests change (re-fetch the list then), `: keep-alive` comments while nothing does.

    A client that does not ask for `text/event-stream` gets the current version once as JSON: a plain
    HTTP client reading the whole body would otherwise wait forever."""
    # The door, before a byte is streamed: a non-member gets a 403 answer, not a stream.
    version = await run_in_threadpool(service.requests_version, ctx, user, project_id)
    if EVENT_STREAM not in http.headers.get("accept", ""):
        return JSONResponse({"version": version}, headers={"Cache-Control": "no-store"})
    return StreamingResponse(
        _version_events(http, ctx, user, project_id, version), media_type=EVENT_STREAM,
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},  # nginx would otherwise buffer events
    )


async def _version_events(
    http: Request, ctx: ServiceContext, user: Principal, project_id: str, version: str
) -> AsyncIterator[str]:
    sent = None
    quiet_ticks = 0
    while True:
        if version != sent:
            yield _event("requests", {"version": version})
            sent, quiet_ticks = version, 0
        elif quiet_ticks >= KEEP_ALIVE_TICKS:
            yield ": keep-alive\n\n"
            quiet_ticks = 0
        await anyio.sleep(TICK_SECONDS)
        quiet_ticks += 1
        if await http.is_disconnected():
            return
        try:  # the query runs in a worker thread: the event loop keeps serving everyone else
            version = await run_in_threadpool(service.requests_version, ctx, user, project_id)
        except Mi2b2Error as error:  # e.g. taken off the project since the stream began
            yield _event("stop", {"error": str(error)})
            return
        except Exception as error:
            # The type only, as the API's error handler does: the text may carry identifiers from SQL.
            LOG.error("the live request log stopped on %s", type(error).__name__)
            yield _event("stop", {"error": "internal error; the server log has details"})
            return


def _event(name: str, data: dict[str, Any]) -> str:
    return f"event: {name}\ndata: {json.dumps(data)}\n\n"


@router.get("/requests/{request_id}", response_model=RequestRow)
def show_request(request_id: RowIdPath, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return service.show_request(ctx, user, request_id)


@router.post("/requests/cancel", response_model=Canceled)
def cancel_requests(body: RequestIdsBody, user: CurrentUser, ctx: ContextDep, http: Request) -> dict[str, Any]:
    changed = service.cancel_requests(ctx, user, body.ids)
    _wake_worker(http)
    return {"canceled": changed}


@router.post("/requests/retry", response_model=Retried)
def retry_requests(body: RequestIdsBody, user: CurrentUser, ctx: ContextDep, http: Request) -> dict[str, Any]:
    changed = service.retry_requests(ctx, user, body.ids)
    _wake_worker(http)
    return {"retried": changed}


@router.post("/requests/priority", response_model=PriorityChanged)
def set_priority(body: PriorityBody, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return {"changed": service.set_priority(ctx, user, body.ids, body.priority)}


@router.get("/pacs/state", response_model=list[PacsState])
def pacs_state(user: CurrentUser, ctx: ContextDep) -> list[dict[str, Any]]:
    """Governance now, per PACS: window, active retrievals against the cap, recent starts against the rates."""
    return [asdict(state) for state in pacs_states(ctx)]
