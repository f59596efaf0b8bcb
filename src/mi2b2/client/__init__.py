"""A small Python client over the mi2b2 API (the CLI uses it too).

    client = Mi2b2Client("http://127.0.0.1:8080", token="mi2b2_...")
    report = client.search_studies("alpha", "main", "000123\\n000456")
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from typing import Any
from urllib.parse import quote

import httpx

from mi2b2.errors import AccessDenied, InvalidInput, Mi2b2Error, NotFound, PermanentError, RetriableError

ERRORS: dict[int, type[Mi2b2Error]] = {
    401: AccessDenied, 403: AccessDenied, 404: NotFound, 422: InvalidInput,
    502: PermanentError, 503: RetriableError,
}


class Mi2b2Client:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 600.0,
                 verify: bool | ssl.SSLContext = True) -> None:
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url + "/api/v1", headers=headers, timeout=timeout, verify=verify)

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Mi2b2Client:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """JSON or text, as the server answered."""
        response = self._send(method, path, **kwargs)
        if response.headers.get("content-type", "").startswith("application/json"):
            return response.json()
        return response.text

    def _send(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        """The server's answer; an unreachable server or an error status becomes the matching Mi2b2Error."""
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.ConnectError:
            raise RetriableError(f"cannot reach the mi2b2 server at {self.base_url}; is `mi2b2 serve` running?") from None
        except httpx.TimeoutException:
            raise RetriableError(f"the mi2b2 server at {self.base_url} did not answer in time") from None
        if response.status_code >= 400:
            try:
                message = response.json().get("error", response.text)
            except ValueError:
                message = response.text or response.reason_phrase
            raise ERRORS.get(response.status_code, Mi2b2Error)(message)
        return response

    def login(self, login: str, password: str) -> dict[str, Any]:
        return self._call("POST", "/auth/login", json={"login": login, "password": password})  # type: ignore[no-any-return]

    def me(self) -> dict[str, Any]:
        return self._call("GET", "/auth/me")  # type: ignore[no-any-return]

    def projects(self) -> list[dict[str, Any]]:
        return self._call("GET", "/projects")  # type: ignore[no-any-return]

    def pacs(self, echo: bool = False) -> list[dict[str, Any]]:
        return self._call("GET", "/pacs", params={"echo": echo})  # type: ignore[no-any-return]

    def search_patients(self, project: str, pacs: str, mrns: str) -> dict[str, Any]:
        return self._call("POST", "/search/patients", json={"project": project, "pacs": pacs, "mrns": mrns})  # type: ignore[no-any-return]

    def search_studies(self, project: str, pacs: str, mrns: str) -> dict[str, Any]:
        return self._call("POST", "/search/studies", json={"project": project, "pacs": pacs, "mrns": mrns})  # type: ignore[no-any-return]

    def search_accessions(self, project: str, pacs: str, accessions: str) -> dict[str, Any]:
        body = {"project": project, "pacs": pacs, "accessions": accessions}
        return self._call("POST", "/search/accessions", json=body)  # type: ignore[no-any-return]

    def search_job(self, job_id: int) -> dict[str, Any]:
        return self._call("GET", f"/search/jobs/{job_id}")  # type: ignore[no-any-return]

    def search_job_results(self, job_id: int) -> dict[str, Any]:
        return self._call("GET", f"/search/jobs/{job_id}/results")  # type: ignore[no-any-return]

    def cancel_search_job(self, job_id: int) -> dict[str, Any]:
        return self._call("POST", f"/search/jobs/{job_id}/cancel")  # type: ignore[no-any-return]

    def search_series(self, project: str, pacs: str, studies: list[str]) -> dict[str, Any]:
        body = {"project": project, "pacs": pacs, "studies": studies}
        return self._call("POST", "/search/series", json=body)  # type: ignore[no-any-return]

    def reload_config(self) -> dict[str, Any]:
        return self._call("POST", "/admin/config/reload")  # type: ignore[no-any-return]

    def audit(self, **filters: Any) -> list[dict[str, Any]]:
        """Audit events; the filters travel in a POST body, so a patient id stays out of URLs and access logs."""
        body = {k: v for k, v in filters.items() if v is not None}
        return self._call("POST", "/audit/search", json=body)  # type: ignore[no-any-return]

    def audit_verify(self) -> dict[str, Any]:
        return self._call("GET", "/audit/verify")  # type: ignore[no-any-return]

    def cache(self, project: str) -> dict[str, Any]:
        """Usage (quota, used, in flight, free) and the cached studies of a project."""
        return self._call("GET", f"/projects/{quote(project, safe='')}/cache")  # type: ignore[no-any-return]

    def cache_study(self, project: str, study_uid: str) -> dict[str, Any]:
        path = f"/projects/{quote(project, safe='')}/cache/studies/{quote(study_uid, safe='')}"
        return self._call("GET", path)  # type: ignore[no-any-return]

    def cache_delete(self, project: str, study_uids: list[str]) -> dict[str, Any]:
        path = f"/projects/{quote(project, safe='')}/cache/delete"
        return self._call("POST", path, json={"study_uids": study_uids})  # type: ignore[no-any-return]

    def notifications(self, unread: bool = False) -> list[dict[str, Any]]:
        return self._call("GET", "/notifications", params={"unread": unread})  # type: ignore[no-any-return]

    def mark_notifications_read(self, ids: list[int] | None = None, everything: bool = False) -> dict[str, Any]:
        return self._call("POST", "/notifications/read", json={"ids": ids or [], "all": everything})  # type: ignore[no-any-return]

    def fsck(self, repair: bool = False) -> dict[str, Any]:
        return self._call("POST", "/admin/fsck", params={"repair": repair})  # type: ignore[no-any-return]

    # --- requests ----------------------------------------------------------------------

    def request_studies(self, project: str, pacs: str, studies: list[dict[str, Any]], priority: int = 0) -> dict[str, Any]:
        body = {"project": project, "pacs": pacs, "studies": studies, "priority": priority}
        return self._call("POST", "/requests", json=body)  # type: ignore[no-any-return]

    def requests(self, project: str, states: list[str] | None = None, limit: int = 1000) -> list[dict[str, Any]]:
        params: dict[str, Any] = {"limit": limit}
        if states:
            params["state"] = states
        return self._call("GET", f"/projects/{quote(project, safe='')}/requests", params=params)  # type: ignore[no-any-return]

    def request(self, request_id: int) -> dict[str, Any]:
        return self._call("GET", f"/requests/{request_id}")  # type: ignore[no-any-return]

    def cancel_requests(self, ids: list[int]) -> dict[str, Any]:
        return self._call("POST", "/requests/cancel", json={"ids": ids})  # type: ignore[no-any-return]

    def retry_requests(self, ids: list[int]) -> dict[str, Any]:
        return self._call("POST", "/requests/retry", json={"ids": ids})  # type: ignore[no-any-return]

    def set_priority(self, ids: list[int], priority: int) -> dict[str, Any]:
        return self._call("POST", "/requests/priority", json={"ids": ids, "priority": priority})  # type: ignore[no-any-return]

    def pacs_state(self) -> list[dict[str, Any]]:
        return self._call("GET", "/pacs/state")  # type: ignore[no-any-return]

    # --- forwarding --------------------------------------------------------------------

    def destinations(self, project: str) -> list[dict[str, Any]]:
        """The DICOM destinations this project may forward to."""
        return self._call("GET", f"/projects/{quote(project, safe='')}/destinations")  # type: ignore[no-any-return]

    def forward(self, project: str, destination: str, study_uids: list[str], series_uids: list[str] | None = None,
                priority: int = 0) -> dict[str, Any]:
        """Queue forwards of cached studies; follow them with `requests(project)`."""
        body = {"destination": destination, "study_uids": study_uids, "series_uids": series_uids or [],
                "priority": priority}
        return self._call("POST", f"/projects/{quote(project, safe='')}/forward", json=body)  # type: ignore[no-any-return]

    # --- downloads ---------------------------------------------------------------------

    def download_manifest(self, project: str, study_uids: list[str], all_studies: bool = False,
                          encryption: str | None = None) -> dict[str, Any]:
        """Files (readable path, size, SHA-256) of a download and a download_id per study; audited as a download."""
        body = {"study_uids": study_uids, "all": all_studies, "encryption": encryption}
        return self._call("POST", f"/projects/{quote(project, safe='')}/download/manifest", json=body)  # type: ignore[no-any-return]

    def download_instance(self, project: str, download_id: int, study_uid: str, sop_uid: str,
                          chunk_size: int | None = None) -> Iterator[bytes]:
        """One cached file in chunks; errors are raised on the first ``next()``."""
        body = {"download_id": download_id, "study_uid": study_uid, "sop_uid": sop_uid}
        return self._stream("POST", f"/projects/{quote(project, safe='')}/download/instance", body, chunk_size)

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
                    try:
                        message = response.json().get("error", response.text)
                    except ValueError:
                        message = response.text or response.reason_phrase
                    raise ERRORS.get(response.status_code, Mi2b2Error)(message)
                yield from response.iter_bytes(chunk_size)
        except httpx.ConnectError:
            raise RetriableError(f"cannot reach the mi2b2 server at {self.base_url}; is `mi2b2 serve` running?") from None
        except httpx.TimeoutException:
            raise RetriableError(f"the mi2b2 server at {self.base_url} did not answer in time") from None
        except (httpx.RemoteProtocolError, httpx.ReadError):
            raise RetriableError(f"the connection to {self.base_url} broke off during the transfer; "
                                 "run the download again") from None

    # --- viewer --------------------------------------------------------------------------

    def viewer_tree(self, project: str) -> dict[str, Any]:
        """Patients and their cached studies (with window presets), for the viewer."""
        return self._call("GET", f"/projects/{quote(project, safe='')}/viewer/tree")  # type: ignore[no-any-return]

    def viewer_study(self, project: str, study_uid: str) -> dict[str, Any]:
        """A cached study's series and images in order (opening it is audited as a view)."""
        path = f"/projects/{quote(project, safe='')}/viewer/studies/{quote(study_uid, safe='')}"
        return self._call("GET", path)  # type: ignore[no-any-return]

    def viewer_tags(self, project: str, sop_uid: str) -> dict[str, Any]:
        path = f"/projects/{quote(project, safe='')}/viewer/instances/{quote(sop_uid, safe='')}/tags"
        return self._call("GET", path)  # type: ignore[no-any-return]

    def viewer_frame(self, project: str, sop_uid: str, frame: int = 1, center: float | None = None,
                     width: float | None = None, preset: str | None = None) -> bytes:
        """Frame ``frame`` (from 1) rendered as PNG bytes, windowed as asked (default: the image's own window)."""
        path = f"/projects/{quote(project, safe='')}/viewer/instances/{quote(sop_uid, safe='')}/frames/{int(frame)}.png"
        params = {k: v for k, v in (("center", center), ("width", width), ("preset", preset)) if v is not None}
        return self._send("GET", path, params=params).content
