"""/metrics, what the site did, on SQLite and a real PostgreSQL: durations of ended retrievals and
forwards as histograms, the receiver's refusals by kind (read from the audit trail, a few rows
per scrape), searches and query limits per PACS; and the exposition's escaping of odd labels."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import Project, Query, QueryLease, Request, Worker
from mi2b2.api.app import create_app
from mi2b2.config import load_config
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.testing import FakeClock
from support.databases import fresh_database, postgres_available
from support.site import pacs_block, write_site

TOKEN = "activity-metrics-token"
PATIENT = "PAT-SECRET-4711"
STUDY = "1.2.826.0.1.3680043.8.498.4711"
DESTINATION = """
[[destinations]]
id = "research"
ae_title = "RESEARCH"
host = "127.0.0.1"
port = 9
"""
QUERY_LIMITS = """
default_max_concurrent_queries = 3
default_queries_per_second = 7
"""


@pytest.fixture(params=["sqlite", "postgresql"])
def ctx(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[ServiceContext]:
    if request.param == "postgresql" and not postgres_available():
        pytest.skip("no PostgreSQL server on 127.0.0.1:5432")
    with fresh_database(request.param, tmp_path) as url:
        (tmp_path / "metrics.token").write_text(TOKEN)
        site = write_site(tmp_path, pacs_blocks=pacs_block("main", "PACS", 11113, QUERY_LIMITS), database_url=url,
                          extra=f'{DESTINATION}\n[metrics]\nenabled = true\ntoken_file = "metrics.token"\n')
        context = build_context(load_config(site), clock=FakeClock())
        try:
            yield context
        finally:
            context.engine.dispose()


def scrape(client: TestClient) -> str:
    answer = client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200, answer.text
    return answer.text


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def ended(ctx: ServiceContext, kind: str, state: str, seconds: float, target: str = "main") -> None:
    start = ctx.clock.now() - timedelta(hours=1)
    with transaction(ctx.sessions) as session:
        session.add(Request(kind=kind, project_id="alpha", user_login="alice", patient_id=PATIENT, study_uid=STUDY,
                            pacs_id=target if kind == "retrieve" else None,
                            destination_id=target if kind == "forward" else None,
                            state=state, created_at=start, started_at=start, ended_at=start + timedelta(seconds=seconds)))


def test_durations_are_histograms_by_pacs_and_outcome(ctx: ServiceContext) -> None:
    for seconds in (0.25, 3, 70):
        ended(ctx, "retrieve", "completed", seconds)
    ended(ctx, "retrieve", "failed", 4000)
    ended(ctx, "forward", "completed", 12, target="research")
    with transaction(ctx.sessions) as session:  # neither running nor never started counts
        now = ctx.clock.now()
        session.add(Request(project_id="alpha", user_login="alice", pacs_id="main", patient_id=PATIENT,
                            study_uid=STUDY, state="processing", created_at=now, started_at=now))
        session.add(Request(project_id="alpha", user_login="alice", pacs_id="main", patient_id=PATIENT,
                            study_uid=STUDY, state="canceled", created_at=now, ended_at=now))
    values = samples(scrape(TestClient(create_app(ctx))))

    done = (("outcome", "completed"), ("pacs", "main"))
    bucket = "mi2b2_retrieval_duration_seconds_bucket"
    assert values[(bucket, (("le", "1.0"), *done))] == 1
    assert values[(bucket, (("le", "5.0"), *done))] == 2
    assert values[(bucket, (("le", "60.0"), *done))] == 2
    assert values[(bucket, (("le", "120.0"), *done))] == 3
    assert values[(bucket, (("le", "+Inf"), *done))] == 3
    assert values[("mi2b2_retrieval_duration_seconds_count", done)] == 3
    assert values[("mi2b2_retrieval_duration_seconds_sum", done)] == pytest.approx(73.25, abs=0.01)
    failed = (("outcome", "failed"), ("pacs", "main"))
    assert values[(bucket, (("le", "3600.0"), *failed))] == 0
    assert values[(bucket, (("le", "7200.0"), *failed))] == 1
    assert not any(name == bucket and ("outcome", "canceled") in labels for name, labels in values)
    forward = (("destination", "research"), ("outcome", "completed"))
    assert values[("mi2b2_forward_duration_seconds_bucket", (forward[0], ("le", "15.0"), forward[1]))] == 1
    assert values[("mi2b2_forward_duration_seconds_count", forward)] == 1


def receiver_refused(ctx: ServiceContext, detail: dict[str, object]) -> None:
    ctx.audit.record("dicom:PACS", Action.RECEIVE, Outcome.DENIED, pacs_id="main", patient_id=PATIENT,
                     study_uid=STUDY, detail=detail)


def test_refusals_by_kind_from_the_audit_trail(ctx: ServiceContext) -> None:
    client = TestClient(create_app(ctx))
    first = samples(scrape(client))
    assert first[("mi2b2_receiver_refused_instances_total", (("reason", "not_on_allow_list"),))] == 0

    receiver_refused(ctx, {"refused": 3, "reasons": {"patient not on the project's IRB allow-list": 2,
                                                     "project cache quota reached": 1}})
    receiver_refused(ctx, {"reason": "association refused: calling AE 'PACS' is PACS main, whose configured "
                                     "addresses do not include 10.9.9.9"})
    ctx.audit.record("alice", Action.QUERY, pacs_id="main", detail={"reasons": {"project cache quota reached": 50}})
    second = samples(scrape(client))
    refused = "mi2b2_receiver_refused_instances_total"
    assert second[(refused, (("reason", "not_on_allow_list"),))] == 2
    assert second[(refused, (("reason", "quota_reached"),))] == 1  # the search's row is no refusal
    assert second[(refused, (("reason", "unknown_peer_address"),))] == 1

    # A peer's words never become a label: an AE title posing as a reason, or a label injection.
    receiver_refused(ctx, {"refused": 2, "reasons": {
        "sent for a C-MOVE issued by 'patient not on the project's IRB allow-list', not by mi2b2": 1,
        'evil"} 1\nmi2b2_fake_total 9\n': 1}})
    text = scrape(client)
    third = samples(text)
    assert third[(refused, (("reason", "not_on_allow_list"),))] == 2
    assert third[(refused, (("reason", "foreign_move_originator"),))] == 1
    assert third[(refused, (("reason", "other"),))] == 1
    assert "mi2b2_fake" not in text and "evil" not in text

    # A new process (a fresh tally) sums the whole trail to the same counts.
    assert samples(scrape(TestClient(create_app(ctx)))) == third


def test_searches_and_query_limits_per_pacs(ctx: ServiceContext) -> None:
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        for n in range(4):
            session.add(Query(user_login="alice", project_id="alpha", pacs_id="main", kind="patients",
                              keys={"mrns": [PATIENT]}, result_count=n, created_at=now))
        session.add(QueryLease(pacs_id="main", holder="h:1:a", host="h", pid=1, granted=True, acquired_at=now,
                               expires_at=now + timedelta(seconds=30)))
        session.add(QueryLease(pacs_id="main", holder="h:1:b", host="h", pid=1, granted=False, acquired_at=now,
                               expires_at=now + timedelta(seconds=30)))  # waiting in line: no association yet
        session.add(QueryLease(pacs_id="main", holder="h:1:c", host="h", pid=1, granted=True, acquired_at=now,
                               expires_at=now - timedelta(seconds=1)))  # expired: its holder is gone
    text = scrape(TestClient(create_app(ctx)))
    values = samples(text)
    pacs = (("pacs", "main"),)
    assert values[("mi2b2_pacs_searches_total", pacs)] == 4
    assert values[("mi2b2_pacs_query_associations", pacs)] == 1
    assert values[("mi2b2_pacs_max_concurrent_queries", pacs)] == 3
    assert values[("mi2b2_pacs_queries_per_second_limit", pacs)] == 7
    assert PATIENT not in text and STUDY not in text


def test_odd_label_values_are_escaped(ctx: ServiceContext) -> None:
    """Worker ids carry the host name, and project rows may predate the configuration's id rules:
    a quote, a backslash or a line break in them must come back intact, not break the exposition."""
    odd = 'host"name\\with\nbreak'
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        session.add(Worker(id=f"worker:{odd}:1", host=odd, pid=1, started_at=now, heartbeat_at=now))
        session.add(Project(id=f"old{odd}", title="t", irb_number="i", expires_on=now.date(), quota_bytes=5))
    text = scrape(TestClient(create_app(ctx)))
    assert 'host\\"name\\\\with\\nbreak' in text
    values = samples(text)
    assert values[("mi2b2_worker_heartbeat_age_seconds", (("worker", f"worker:{odd}:1"),))] == 0
    assert values[("mi2b2_project_cache_quota_bytes", (("project", f"old{odd}"),))] == 5
