"""The Python client reads answers into the API's own types, and says so when an answer is not one."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from mi2b2.api.schemas.cache import Notification, ProjectCache
from mi2b2.api.schemas.search import SearchJobTicket, SearchReport
from mi2b2.cli.common import plain
from mi2b2.client import Mi2b2Client
from mi2b2.errors import AccessDenied, PermanentError

NOTICE = {"id": 3, "kind": "batch", "project_id": "alpha", "batch_id": None, "subject": "done", "body": "2 studies",
          "created_at": "2026-01-05T12:00:00.250000+00:00", "read_at": None, "emailed_at": None, "email_error": None}
USAGE = {"project_id": "alpha", "quota_bytes": 10, "used_bytes": 4, "in_flight_bytes": 0, "free_bytes": 6,
         "over_quota": False, "study_count": 1}
STUDY = {"study_uid": "1.2", "patient_id": "77", "patient_name": "DOE^J", "accession": "A1", "study_date": "20200101",
         "modalities": "MR", "description": "", "pacs_id": "main", "instance_count": 2, "bytes": 4, "fetched_by": "alice",
         "fetched_at": "2026-01-05T12:00:00+00:00", "last_downloaded_by": None, "last_downloaded_at": None,
         "closed_reason": None}
REPORT = {"query_id": 1, "kind": "studies", "patients": [], "studies": [], "series": [], "refused": ["99"],
          "not_found": [], "duplicates": [], "invalid": [{"line": 2, "value": "x", "reason": "not an MRN"}],
          "not_permitted": [], "capped": {}, "warnings": []}
TICKET = {"job_id": 5, "state": "queued", "total": 300, "refused": [], "status_url": "/api/v1/search/jobs/5",
          "results_url": "/api/v1/search/jobs/5/results"}


def answering(status: int, body: Any) -> Callable[[], Mi2b2Client]:
    def client() -> Mi2b2Client:
        return Mi2b2Client("http://mi2b2.test", "token",
                           transport=httpx.MockTransport(lambda _request: httpx.Response(status, json=body)))
    return client


def test_answers_come_back_as_the_api_types_and_read_by_key_too() -> None:
    with answering(200, {"usage": USAGE, "studies": [STUDY]})() as client:
        cache = client.cache("alpha")
    assert isinstance(cache, ProjectCache)
    assert cache.usage.free_bytes == 6 and cache["usage"]["free_bytes"] == 6
    assert [s["patient_id"] for s in cache["studies"]] == ["77"] and "studies" in cache and "nothing" not in cache
    assert cache.get("nothing", "default") == "default"
    with pytest.raises(KeyError):
        cache["nothing"]


def test_an_answer_printed_again_is_the_json_the_server_sent() -> None:
    with answering(200, [NOTICE])() as client:
        [notice] = client.notifications()
    assert isinstance(notice, Notification)
    assert plain(notice) == NOTICE  # the CLI prints timestamps as the server wrote them


def test_a_small_search_answers_its_report_and_a_large_one_its_job() -> None:
    with answering(200, REPORT)() as client:
        report = client.search_studies("alpha", "main", "77")
    assert isinstance(report, SearchReport) and report.invalid[0].reason == "not an MRN"
    with answering(202, TICKET)() as client:
        ticket = client.search_studies("alpha", "main", "77")
    assert isinstance(ticket, SearchJobTicket) and ticket.job_id == 5


def test_an_answer_that_is_not_mi2b2s_is_a_clear_error_without_its_values() -> None:
    forged = {**STUDY, "instance_count": "PATIENT^SECRET"}
    with answering(200, {"usage": USAGE, "studies": [forged]})() as client, pytest.raises(PermanentError) as raised:
        client.cache("alpha")
    assert "is not what an mi2b2 server" in str(raised.value) and "studies.0.instance_count" in str(raised.value)
    assert "SECRET" not in str(raised.value)


def test_an_error_answer_is_the_matching_error_with_the_servers_message() -> None:
    with answering(403, {"error": "not a member of the project", "kind": "AccessDenied"})() as client, \
            pytest.raises(AccessDenied, match="not a member of the project"):
        client.cache("beta")
