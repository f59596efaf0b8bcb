"""The job machinery's polls and waits run on the context's timer: a fake one drives them, nothing sleeps."""

from __future__ import annotations

import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy import event, update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import Request
from mi2b2.domain.requests import RequestKind, RequestState
from mi2b2.services import jobs
from mi2b2.services.cache import cache_store
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.receiver import ReceiverSink
from mi2b2.services.retrieval import INDEX_WAIT_SECONDS, _await_counts
from mi2b2.testing import FakeClock
from support.site import load_site


@pytest.fixture
def ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    clock = FakeClock()
    context = build_context(load_site(tmp_path), clock=clock, timer=clock)
    yield context
    context.engine.dispose()


def _processing(ctx: ServiceContext, kind: RequestKind = RequestKind.RETRIEVE) -> int:
    with transaction(ctx.sessions) as session:
        row = Request(kind=kind, project_id="alpha", user_login="alice", patient_id="000123", study_uid="1.2.3",
                      state=RequestState.PROCESSING, expected_instances=3, attempts=1, created_at=ctx.clock.now(),
                      **({"destination_id": None, "pacs_id": "main"} if kind == RequestKind.RETRIEVE else {}))
        session.add(row)
        session.flush()
        return row.id


def _statements(ctx: ServiceContext) -> list[str]:
    """The queries sent from now on (not the connection's own set-up)."""
    seen: list[str] = []

    def sent(_conn: object, _cursor: object, statement: str, *_: object) -> None:
        if statement.lstrip().upper().startswith("SELECT"):
            seen.append(statement)

    event.listen(ctx.engine, "before_cursor_execute", sent)
    return seen


def _fake(ctx: ServiceContext) -> FakeClock:
    assert isinstance(ctx.clock, FakeClock)
    return ctx.clock


def test_the_wait_for_counts_runs_on_the_fake_clock_and_never_sleeps(ctx: ServiceContext) -> None:
    request_id = _processing(ctx)
    job = jobs.load(ctx, request_id, RequestKind.RETRIEVE)
    assert job is not None
    clock = _fake(ctx)
    reads = _statements(ctx)
    sink = ReceiverSink(ctx, cache_store(ctx))
    started_mono, started_wall = clock.monotonic(), time.monotonic()
    _await_counts(ctx, job, sink, acknowledged=3)  # nothing arrives: it gives up after INDEX_WAIT_SECONDS
    assert clock.monotonic() - started_mono == pytest.approx(INDEX_WAIT_SECONDS, abs=0.05)
    assert len(reads) == pytest.approx(INDEX_WAIT_SECONDS / 0.02, abs=2)  # one read per 20 ms of the fake clock
    assert time.monotonic() - started_wall < INDEX_WAIT_SECONDS / 2

    # Once the receiver has counted them, the wait ends at the next poll.
    with transaction(ctx.sessions) as session:
        session.execute(update(Request).where(Request.id == request_id).values(received=3))
    reads.clear()
    before = clock.monotonic()
    _await_counts(ctx, job, sink, acknowledged=3)
    assert clock.monotonic() == before and len(reads) == 1
    sink.close()


def test_wait_until_asks_every_interval_of_the_clock_until_yes_or_timeout() -> None:
    clock = FakeClock()
    asked: list[float] = []

    def third_time_lucky() -> bool:
        asked.append(clock.monotonic())
        return len(asked) == 3

    assert jobs.wait_until(clock, third_time_lucky, timeout=10, interval=2)
    assert asked == [0, 2, 4]
    assert not jobs.wait_until(clock, lambda: False, timeout=5, interval=2)
    assert clock.monotonic() == 4 + 6  # gave up once the fake clock passed the deadline


def test_the_watch_reads_the_cancel_flag_at_most_once_per_poll_interval(ctx: ServiceContext) -> None:
    job = jobs.load(ctx, _processing(ctx), RequestKind.RETRIEVE)
    assert job is not None
    clock = _fake(ctx)
    watch = jobs.Watch(ctx, job)
    reads = _statements(ctx)
    assert not watch.should_cancel()
    assert len(reads) == 1  # the flag and the project's access in one round trip
    with transaction(ctx.sessions) as session:
        session.execute(update(Request).where(Request.id == job.request_id).values(cancel_requested=True))
    reads.clear()
    clock.advance(seconds=jobs.POLL_SECONDS / 2)
    assert not watch.should_cancel() and reads == []  # not yet due: no database round trip
    clock.advance(seconds=jobs.POLL_SECONDS / 2)
    assert watch.should_cancel() and len(reads) == 1
    assert watch.cancel_reason == "canceled by a user"
    clock.advance(seconds=10)
    assert watch.should_cancel() and len(reads) == 1  # canceled stays canceled, without asking again

    assert watch.progress_due() and not watch.progress_due()
    clock.advance(seconds=jobs.POLL_SECONDS)
    assert watch.progress_due()


def test_the_end_of_access_stops_a_running_retrieval_and_a_running_forward(ctx: ServiceContext) -> None:
    retrieval = jobs.load(ctx, _processing(ctx), RequestKind.RETRIEVE)
    assert retrieval is not None
    assert jobs.load(ctx, retrieval.request_id, RequestKind.FORWARD) is None  # not a forward
    forward = jobs.Job(retrieval.request_id, RequestKind.FORWARD, "alpha", "xnat", "000123", "1.2.3", (), 1)
    watches = [jobs.Watch(ctx, retrieval), jobs.Watch(ctx, forward)]
    assert not any(watch.should_cancel() for watch in watches)
    _fake(ctx).set(datetime(2100, 1, 2, tzinfo=UTC))  # alpha's IRB approval ended on 2099-12-31
    for watch in watches:
        assert watch.should_cancel()
        assert watch.cancel_reason == "canceled: the project's IRB approval has expired"
