"""A small Python client over the mi2b2 API (the CLI uses it too).

    client = Mi2b2Client("http://127.0.0.1:8080", token="mi2b2_...")
    report = client.search_studies("alpha", "main", "000123\\n000456")
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import ValidationError

from mi2b2.api.schemas.accounts import Identity
from mi2b2.api.schemas.admin import AuditEventRow, ChainVerdict, ConfigReloaded
from mi2b2.api.schemas.cache import DeleteReport, FsckReport, MarkedRead, Notification, ProjectCache, StudyDetail
from mi2b2.api.schemas.common import Readable, adapter
from mi2b2.api.schemas.deid import Reidentified
from mi2b2.api.schemas.requests import (
    AddReport,
    Canceled,
    DestinationRow,
    ForwardReport,
    PacsState,
    PriorityChanged,
    RequestPage,
    RequestRow,
    Retried,
)
from mi2b2.api.schemas.search import (
    MyProject,
    PacsRow,
    SearchJobResults,
    SearchJobStatus,
    SearchJobTicket,
    SearchReport,
)
from mi2b2.api.schemas.viewer import ImageTags, ViewerStudy, ViewerTree
from mi2b2.errors import AccessDenied, InvalidInput, Mi2b2Error, NotFound, PermanentError, RetriableError

Answer = TypeVar("Answer", bound=Readable)

ERRORS: dict[int, type[Mi2b2Error]] = {
    401: AccessDenied, 403: AccessDenied, 404: NotFound, 422: InvalidInput,
    502: PermanentError, 503: RetriableError,
}


class Mi2b2Client:
    """Answers come back as the API's own models (``mi2b2.api.schemas``), the ones its OpenAPI document describes;
    they can also be read by key, as the JSON objects they are."""

    def __init__(self, base_url: str, token: str | None = None, timeout: float = 600.0,
                 verify: bool | ssl.SSLContext = True, transport: httpx.BaseTransport | None = None) -> None:
        """``transport`` replaces the network (httpx's MockTransport in tests)."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url + "/api/v1", headers=headers, timeout=timeout, verify=verify,
                                  transport=transport)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Mi2b2Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _one(self, model: type[Answer], method: str, path: str, **kwargs: Any) -> Answer:
        return self._parse(model, path, self._json(method, path, **kwargs))

    def _many(self, model: type[Answer], method: str, path: str, **kwargs: Any) -> list[Answer]:
        answer = self._json(method, path, **kwargs)
        if not isinstance(answer, list):
            raise self._not_an_answer(path, "not a list")
        return [self._parse(model, path, item) for item in answer]

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._send(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise self._not_an_answer(path, "not JSON") from None

    def _parse(self, model: type[Answer], path: str, data: Any) -> Answer:
        try:
            return adapter(model).validate_python(data)
        except ValidationError as error:
            # Where, not what: a value may be a patient's identifier.
            first = error.errors(include_input=False, include_url=False)[0]
            where = ".".join(str(part) for part in first["loc"]) or "the answer"
            raise self._not_an_answer(path, f"{where}: {first['msg']}") from None

    def _not_an_answer(self, path: str, problem: str) -> PermanentError:
        return PermanentError(f"the answer of {self.base_url} to {path} is not what an mi2b2 server of this version "
                              f"sends ({problem}); is --server an mi2b2 server, and of the same version?")

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The server's answer; an unreachable server or an error status becomes the matching Mi2b2Error."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise RetriableError(f"cannot reach the mi2b2 server at {self.base_url}; is `mi2b2 serve` running?") from None
        except httpx.TimeoutException:
            raise RetriableError(f"the mi2b2 server at {self.base_url} did not answer in time") from None
        if response.status_code >= 400:
            raise _error(response)
        return response

    def login(self, login: str, password: str) -> Identity:
        return self._one(Identity, "POST", "/auth/login", json={"login": login, "password": password})

    def me(self) -> Identity:
        return self._one(Identity, "GET", "/auth/me")

    def projects(self) -> list[MyProject]:
        return self._many(MyProject, "GET", "/projects")

    def pacs(self, echo: bool = False) -> list[PacsRow]:
        return self._many(PacsRow, "GET", "/pacs", params={"echo": echo})

    def search_patients(self, project: str, pacs: str, mrns: str) -> SearchReport | SearchJobTicket:
        """The report of a small search; the ticket of a search job (more MRNs than search.job_threshold)."""
        return self._search("/search/patients", {"project": project, "pacs": pacs, "mrns": mrns})

    def search_studies(self, project: str, pacs: str, mrns: str) -> SearchReport | SearchJobTicket:
        return self._search("/search/studies", {"project": project, "pacs": pacs, "mrns": mrns})

    def search_accessions(self, project: str, pacs: str, accessions: str) -> SearchReport | SearchJobTicket:
        return self._search("/search/accessions", {"project": project, "pacs": pacs, "accessions": accessions})

    def _search(self, path: str, body: dict[str, str]) -> SearchReport | SearchJobTicket:
        response = self._send("POST", path, json=body)
        model: type[SearchReport] | type[SearchJobTicket] = SearchJobTicket if response.status_code == 202 else SearchReport
        try:
            data = response.json()
        except ValueError:
            raise self._not_an_answer(path, "not JSON") from None
        return self._parse(model, path, data)

    def search_job(self, job_id: int) -> SearchJobStatus:
        return self._one(SearchJobStatus, "GET", f"/search/jobs/{job_id}")

    def search_job_results(self, job_id: int) -> SearchJobResults:
        return self._one(SearchJobResults, "GET", f"/search/jobs/{job_id}/results")

    def cancel_search_job(self, job_id: int) -> SearchJobStatus:
        return self._one(SearchJobStatus, "POST", f"/search/jobs/{job_id}/cancel")

    def search_series(self, project: str, pacs: str, studies: list[str]) -> SearchReport:
        body = {"project": project, "pacs": pacs, "studies": studies}
        return self._one(SearchReport, "POST", "/search/series", json=body)

    def reload_config(self) -> ConfigReloaded:
        return self._one(ConfigReloaded, "POST", "/admin/config/reload")

    def audit(self, **filters: Any) -> list[AuditEventRow]:
        """Audit events; the filters travel in a POST body, so a patient id stays out of URLs and access logs."""
        body = {k: v for k, v in filters.items() if v is not None}
        return self._many(AuditEventRow, "POST", "/audit/search", json=body)

    def audit_verify(self) -> ChainVerdict:
        return self._one(ChainVerdict, "GET", "/audit/verify")

    def cache(self, project: str) -> ProjectCache:
        """Usage (quota, used, in flight, free) and the cached studies of a project."""
        return self._one(ProjectCache, "GET", f"/projects/{quote(project, safe='')}/cache")

    def cache_study(self, project: str, study_uid: str) -> StudyDetail:
        path = f"/projects/{quote(project, safe='')}/cache/studies/{quote(study_uid, safe='')}"
        return self._one(StudyDetail, "GET", path)

    def cache_delete(self, project: str, study_uids: list[str]) -> DeleteReport:
        path = f"/projects/{quote(project, safe='')}/cache/delete"
        return self._one(DeleteReport, "POST", path, json={"study_uids": study_uids})

    def notifications(self, unread: bool = False) -> list[Notification]:
        return self._many(Notification, "GET", "/notifications", params={"unread": unread})

    def mark_notifications_read(self, ids: list[int] | None = None, everything: bool = False) -> MarkedRead:
        return self._one(MarkedRead, "POST", "/notifications/read", json={"ids": ids or [], "all": everything})

    def fsck(self, repair: bool = False) -> FsckReport:
        return self._one(FsckReport, "POST", "/admin/fsck", params={"repair": repair})

    # --- requests ----------------------------------------------------------------------

    def request_studies(self, project: str, pacs: str, studies: list[dict[str, Any]], priority: int = 0) -> AddReport:
        body = {"project": project, "pacs": pacs, "studies": studies, "priority": priority}
        return self._one(AddReport, "POST", "/requests", json=body)

    def requests(self, project: str, states: list[str] | None = None, limit: int = 1000) -> list[RequestRow]:
        params: dict[str, Any] = {"limit": limit}
        if states:
            params["state"] = states
        return self._many(RequestRow, "GET", f"/projects/{quote(project, safe='')}/requests", params=params)

    def request_page(self, project: str, states: list[str] | None = None, before: int | None = None,
                     limit: int = 100, kinds: list[str] | None = None, users: list[str] | None = None,
                     patient_id: str = "") -> RequestPage:
        """One page of the request log, newest first; pass its ``next_before`` as ``before`` for the next."""
        params: dict[str, Any] = {"limit": limit}
        for key, values in (("state", states), ("kind", kinds), ("by", users)):
            if values:
                params[key] = values
        if before is not None:
            params["before"] = before
        if patient_id:
            params["patient_id"] = patient_id
        return self._one(RequestPage, "GET", f"/projects/{quote(project, safe='')}/requests/page", params=params)

    def request(self, request_id: int) -> RequestRow:
        return self._one(RequestRow, "GET", f"/requests/{request_id}")

    def cancel_requests(self, ids: list[int]) -> Canceled:
        return self._one(Canceled, "POST", "/requests/cancel", json={"ids": ids})

    def retry_requests(self, ids: list[int]) -> Retried:
        return self._one(Retried, "POST", "/requests/retry", json={"ids": ids})

    def set_priority(self, ids: list[int], priority: int) -> PriorityChanged:
        return self._one(PriorityChanged, "POST", "/requests/priority", json={"ids": ids, "priority": priority})

    def pacs_state(self) -> list[PacsState]:
        return self._many(PacsState, "GET", "/pacs/state")

    def reidentify(self, project: str, pseudonym: str, justification: str) -> Reidentified:
        """The original(s) behind a pseudonym of a de-identified project (its lead or an admin; audited)."""
        body = {"pseudonym": pseudonym, "justification": justification}
        return self._one(Reidentified, "POST", f"/projects/{quote(project, safe='')}/deidentification/reidentify",
                         json=body)

    # --- forwarding --------------------------------------------------------------------

    def destinations(self, project: str) -> list[DestinationRow]:
        """The DICOM destinations this project may forward to."""
        return self._many(DestinationRow, "GET", f"/projects/{quote(project, safe='')}/destinations")

    def forward(self, project: str, destination: str, study_uids: list[str], series_uids: list[str] | None = None,
                priority: int = 0) -> ForwardReport:
        """Queue forwards of cached studies; follow them with `requests(project)`."""
        body = {"destination": destination, "study_uids": study_uids, "series_uids": series_uids or [],
                "priority": priority}
        return self._one(ForwardReport, "POST", f"/projects/{quote(project, safe='')}/forward", json=body)

    # --- downloads ---------------------------------------------------------------------

    def download_manifest(self, project: str, study_uids: list[str], all_studies: bool = False,
                          encryption: str | None = None) -> dict[str, Any]:
        """Files (readable path, size, SHA-256) of a download and a download_id per study; audited as a download.

        The JSON object as it came (shaped as ``mi2b2.api.schemas.cache.DownloadManifest``), not parsed: the
        fetcher trusts no server to name paths, checks the listing itself and refuses the whole download,
        writing nothing, if any of it is wrong."""
        body = {"study_uids": study_uids, "all": all_studies, "encryption": encryption}
        path = f"/projects/{quote(project, safe='')}/download/manifest"
        manifest = self._json("POST", path, json=body)
        if not isinstance(manifest, dict):
            raise self._not_an_answer(path, "not a JSON object")
        return manifest

    def download_instance(self, project: str, download_id: int, study_uid: str, sop_uid: str,
                          chunk_size: int | None = None) -> Iterator[bytes]:
        """One cached file in chunks; errors are raised on the first ``next()``."""
        body = {"download_id": download_id, "study_uid": study_uid, "sop_uid": sop_uid}
        return self._stream("POST", f"/projects/{quote(project, safe='')}/download/instance", body, chunk_size)

    def download_files(self, project: str, files: list[tuple[int, str, str]],
                       encryption: dict[str, Any] | None = None) -> Iterator[bytes]:
        """Files of a folder download, each ``(download_id, study_uid, sop_uid)`` of its manifest, as the tar
        stream the server sends (one member per file, in order; see ``mi2b2.services.export.batch``).
        ``encryption`` (``{"recipients": [...]}`` or ``{"passphrase": ...}``) has the server send age files:
        required where the manifest says ``server_encrypts``."""
        body: dict[str, Any] = {"files": [{"download_id": d, "study_uid": study, "sop_uid": sop}
                                          for d, study, sop in files]}
        if encryption is not None:
            body["encryption"] = encryption
        return self._stream("POST", f"/projects/{quote(project, safe='')}/download/files", body, None)

    def download_zip(self, project: str, study_uids: list[str], all_studies: bool = False,
                     passphrase: str | None = None, recipients: list[str] | None = None,
                     chunk_size: int | None = None) -> Iterator[bytes]:
        """The download as a ZIP, streamed; encrypted with age when a passphrase or recipients are given."""
        encryption = None
        if passphrase is not None or recipients:
            encryption = {"passphrase": passphrase, "recipients": recipients or []}
        body = {"study_uids": study_uids, "all": all_studies, "encryption": encryption}
        return self._stream("POST", f"/projects/{quote(project, safe='')}/download", body, chunk_size)

    def _stream(self, method: str, path: str, body: dict[str, Any], chunk_size: int | None) -> Iterator[bytes]:
        # chunk_size None hands on what the socket gave: re-chunking in httpx costs about half the throughput.
        try:
            with self._http.stream(method, path, json=body) as response:
                if response.status_code >= 400:
                    response.read()
                    raise _error(response)
                yield from response.iter_bytes(chunk_size)
        except httpx.ConnectError:
            raise RetriableError(f"cannot reach the mi2b2 server at {self.base_url}; is `mi2b2 serve` running?") from None
        except httpx.TimeoutException:
            raise RetriableError(f"the mi2b2 server at {self.base_url} did not answer in time") from None
        except (httpx.RemoteProtocolError, httpx.ReadError):
            raise RetriableError(f"the connection to {self.base_url} broke off during the transfer; "
                                 "run the download again") from None

    # --- viewer --------------------------------------------------------------------------

    def viewer_tree(self, project: str) -> ViewerTree:
        """Patients and their cached studies (with window presets), for the viewer."""
        return self._one(ViewerTree, "GET", f"/projects/{quote(project, safe='')}/viewer/tree")

    def viewer_study(self, project: str, study_uid: str) -> ViewerStudy:
        """A cached study's series and images in order (opening it is audited as a view)."""
        path = f"/projects/{quote(project, safe='')}/viewer/studies/{quote(study_uid, safe='')}"
        return self._one(ViewerStudy, "GET", path)

    def viewer_tags(self, project: str, sop_uid: str) -> ImageTags:
        path = f"/projects/{quote(project, safe='')}/viewer/instances/{quote(sop_uid, safe='')}/tags"
        return self._one(ImageTags, "GET", path)

    def viewer_frame(self, project: str, sop_uid: str, frame: int = 1, center: float | None = None,
                     width: float | None = None, preset: str | None = None) -> bytes:
        """Frame ``frame`` (from 1) rendered as PNG bytes, windowed as asked (default: the image's own window)."""
        path = f"/projects/{quote(project, safe='')}/viewer/instances/{quote(sop_uid, safe='')}/frames/{int(frame)}.png"
        params = {k: v for k, v in (("center", center), ("width", width), ("preset", preset)) if v is not None}
        return self._send("GET", path, params=params).content


def _error(response: httpx.Response) -> Mi2b2Error:
    """The Mi2b2Error an error answer stands for, with the server's message (the ``error`` of its ErrorBody)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = str(body.get("error", response.text)) if isinstance(body, dict) else response.text or response.reason_phrase
    return ERRORS.get(response.status_code, Mi2b2Error)(message)
