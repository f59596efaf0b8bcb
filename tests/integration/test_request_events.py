"""The live request log, GET /api/v1/projects/{project}/requests/events, against a real uvicorn server.

Server-Sent Events need a real server: the test client buffers whole bodies
and never disconnects. Every read has a timeout, so a stream that stays
silent fails the test instead of hanging it. C-FIND is faked: these tests are
about the stream, not the PACS.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select, update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import AuditEvent, Request
from mi2b2.api.app import create_app
from mi2b2.api.routers import requests as requests_router
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied
from mi2b2.services import requests as requests_service
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.requests import StudyPick, add_requests, requests_version, set_priority
from mi2b2.testing import FakeClock, FakeFindSession
from support.site import load_site
from support.viewing import ROOT, serving

ALICE = Principal("alice", Role.RESEARCHER)  # alpha lead
DAVE = Principal("dave", Role.RESEARCHER)  # in no project
STUDIES = [
    {"PatientID": "000123", "StudyInstanceUID": "1.1", "AccessionNumber": "A1", "NumberOfStudyRelatedInstances": "10"},
    {"PatientID": "77", "StudyInstanceUID": "1.2", "AccessionNumber": "A2", "NumberOfStudyRelatedInstances": "4"},
]
EVENTS = "/api/v1/projects/{}/requests/events"
STREAM = {"Accept": "text/event-stream"}
MONDAY_NOON = datetime(2026, 3, 2, 12, 0, tzinfo=UTC)
WAIT = 5.0  # seconds any one event may take to come; a tick is 1 s


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> Iterator[ServiceContext]:
    config = load_site(tmp_path / "site", database_url=database_url)
    context = build_context(config, clock=FakeClock(MONDAY_NOON), open_find=lambda _c, _p: FakeFindSession(STUDIES))
    yield context
    context.engine.dispose()


@pytest.fixture
def tokens(ctx: ServiceContext) -> dict[str, dict[str, str]]:
    """Authorization headers by login (tokens only: no slow password hashing)."""
    headers = {}
    for login in ("alice", "bob", "dave"):
        ctx.accounts.add_user(ROOT, login, "researcher", None)
        headers[login] = {"Authorization": f"Bearer {ctx.accounts.create_token(ROOT, login, 'tests').secret}"}
    return headers


def sse(response: httpx.Response) -> Iterator[tuple[str, dict[str, str] | None]]:
    """(event name, data) per event, ("comment", None) per comment line."""
    name, data = "message", ""
    for line in response.iter_lines():
        if line.startswith(":"):
            yield "comment", None
        elif line.startswith("event: "):
            name = line[7:]
        elif line.startswith("data: "):
            data += line[6:]
        elif line == "" and data:
            yield name, json.loads(data)
            name, data = "message", ""


def next_version(events: Iterator[tuple[str, dict[str, str] | None]], after: str) -> str:
    """The next version that differs from ``after``, within WAIT seconds."""
    deadline = time.monotonic() + WAIT
    for name, data in events:
        assert name in ("requests", "comment"), f"unexpected event {name}: {data}"
        if data is not None and data["version"] != after:
            return data["version"]
        assert time.monotonic() < deadline, "no new version after the change"
    raise AssertionError("the stream ended")


def test_first_version_at_once_then_one_per_change(ctx: ServiceContext, tokens: dict[str, dict[str, str]],
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []

    def counted(*args: object) -> str:
        calls.append("tick")
        return requests_version(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(requests_service, "requests_version", counted)
    with serving(create_app(ctx)) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        with client.stream("GET", EVENTS.format("alpha"), headers={**tokens["alice"], **STREAM}) as response:
            started = time.monotonic()
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            assert response.headers["cache-control"] == "no-store"
            assert response.headers["x-accel-buffering"] == "no"
            events = sse(response)
            name, data = next(events)
            assert name == "requests" and data is not None
            assert time.monotonic() - started < 0.5, "the first event goes out with the headers, not after a tick"
            empty = data["version"]

            report = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.1"), StudyPick("1.2")])
            added = next_version(events, empty)
            set_priority(ctx, ALICE, report.created[:1], 5)
            prioritised = next_version(events, added)
            assert len({empty, added, prioritised}) == 3

        # Without Accept: text/event-stream, the same version once, as JSON (what a plain client can read).
        snapshot = client.get(EVENTS.format("alpha"), headers=tokens["alice"])
        assert snapshot.status_code == 200 and snapshot.json() == {"version": prioritised}
        assert snapshot.headers["cache-control"] == "no-store"

        # The client has gone: the stream's loop stops looking within a tick or two.
        time.sleep(2.0)
        settled = len(calls)
        time.sleep(2.0)
        assert len(calls) == settled, "the stream kept polling after its client disconnected"


def test_a_non_member_gets_a_403_answer_not_a_stream(ctx: ServiceContext, tokens: dict[str, dict[str, str]]) -> None:
    with serving(create_app(ctx)) as url, httpx.Client(base_url=url, timeout=WAIT) as client:
        refused = client.get(EVENTS.format("alpha"), headers={**tokens["dave"], **STREAM})
        assert refused.status_code == 403
        assert refused.headers["content-type"].startswith("application/json")
        assert "not a member" in refused.json()["error"]
        assert client.get(EVENTS.format("alpha"), headers=STREAM).status_code == 401
        unknown = client.get(EVENTS.format("nope"), headers={**tokens["alice"], **STREAM})
        assert unknown.status_code == 404 and "no project 'nope'" in unknown.json()["error"]
    with ctx.sessions() as session:
        denied = session.scalars(select(AuditEvent).where(AuditEvent.action == "denied", AuditEvent.actor == "dave"))
        assert [e.project_id for e in denied] == ["alpha"]


def test_keep_alive_while_quiet_and_stop_when_taken_off_the_project(
    ctx: ServiceContext, tokens: dict[str, dict[str, str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(requests_router, "TICK_SECONDS", 0.05)
    monkeypatch.setattr(requests_router, "KEEP_ALIVE_TICKS", 3)
    site = ctx.config.source
    assert site is not None
    with serving(create_app(ctx)) as url, httpx.Client(base_url=url, timeout=WAIT) as client, \
            client.stream("GET", EVENTS.format("alpha"), headers={**tokens["bob"], **STREAM}) as response:
        events = sse(response)
        assert next(events)[0] == "requests"
        assert next(events) == ("comment", None)  # nothing changed: a keep-alive comment
        assert next(events) == ("comment", None)

        site.write_text(site.read_text().replace(', { login = "bob" }', ""))
        ctx.reload_config(ROOT)
        for name, data in events:
            if name == "stop":
                assert data is not None and "not a member" in data["error"]
                break
            assert name == "comment"
        assert list(events) == [], "the stream ends after the stop event"


def test_version_changes_with_everything_the_list_shows(ctx: ServiceContext) -> None:
    report = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.1"), StudyPick("1.2")])
    first, second = report.created
    seen = [requests_version(ctx, ALICE, "alpha")]
    assert requests_version(ctx, ALICE, "alpha") == seen[-1], "no change, same version"

    def change(**rows: dict[str, object]) -> None:
        with transaction(ctx.sessions) as session:
            for which, values in rows.items():
                session.execute(update(Request).where(Request.id == ids[which]).values(**values))
        version = requests_version(ctx, ALICE, "alpha")
        assert version not in seen, f"{rows} did not change the version"
        seen.append(version)

    ids = {"first": first, "second": second}
    change(first={"priority": 3})
    change(first={"priority": 0}, second={"priority": 3})  # a swap: the same sum, on other requests
    change(first={"waiting_reason": "outside the PACS window"})
    change(first={"state": "processing", "waiting_reason": None, "started_at": datetime(2026, 3, 2, 12, 1, tzinfo=UTC)})
    change(first={"received": 1, "bytes": 1000})
    change(first={"received": 2, "bytes": 2000})
    change(first={"cancel_requested": True})
    change(second={"last_error": "C-MOVE refused", "attempts": 0})
    with pytest.raises(AccessDenied):
        requests_version(ctx, DAVE, "alpha")
