"""A database that goes away mid-run: the API answers 503 and the worker waits it out.

The outage is real: the test's own PostgreSQL database stops accepting
connections and its sessions are terminated, then it is let back in.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path

import psycopg
import pydicom
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, text
from sqlalchemy.exc import IntegrityError, ProgrammingError

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.outage import DatabaseUnavailable, is_outage
from mi2b2.adapters.db.tables import Request, Worker
from mi2b2.api.app import create_app
from mi2b2.domain.principal import Principal, Role
from mi2b2.services.cache import cache_store
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.receiver import ReceiverSink
from mi2b2.services.scheduler import requeue_interrupted, schedule_once
from mi2b2.worker.loop import Worker as WorkerLoop
from support.databases import POSTGRES_ADMIN, fresh_database, postgres_available
from support.site import load_site

ROOT = Principal("root", Role.ADMIN)
MESSAGE = ("the database is unreachable; retry in a moment — if it persists, "
           "the site's administrator should check the database server")

pytestmark = pytest.mark.postgres


@pytest.fixture
def postgres_ctx(tmp_path: Path) -> Iterator[ServiceContext]:
    if not postgres_available():
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432; start it (scripts/test.sh does)")
    with fresh_database("postgres", tmp_path) as url:
        ctx = build_context(load_site(tmp_path / "site", database_url=url))
        try:
            yield ctx
        finally:
            ctx.engine.dispose()


@contextmanager
def database_down(ctx: ServiceContext) -> Iterator[None]:
    """No new connection to the site's database, and every open one cut, until the block ends."""
    name = ctx.engine.url.database
    with psycopg.connect(POSTGRES_ADMIN, autocommit=True) as admin:
        admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", [name])
        try:
            yield
        finally:
            admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS true')


def test_an_api_call_answers_503_while_the_database_is_down_and_200_once_it_is_back(
        postgres_ctx: ServiceContext) -> None:
    postgres_ctx.accounts.add_user(ROOT, "root", "admin", None)
    token = postgres_ctx.accounts.create_token(ROOT, "root", "test", 1).secret
    client = TestClient(create_app(postgres_ctx), raise_server_exceptions=False)
    headers = {"Authorization": f"Bearer {token}"}
    assert client.get("/api/v1/projects", headers=headers).status_code == 200

    with database_down(postgres_ctx):
        answer = client.get("/api/v1/projects", headers=headers)
        assert answer.status_code == 503, answer.text
        assert answer.json() == {"error": MESSAGE, "kind": "DatabaseUnavailable"}
        assert int(answer.headers["Retry-After"]) > 0

    answer = client.get("/api/v1/projects", headers=headers)
    assert answer.status_code == 200, answer.text


def test_the_worker_waits_out_an_outage_says_so_once_and_carries_on(
        postgres_ctx: ServiceContext, caplog: pytest.LogCaptureFixture) -> None:
    worker = WorkerLoop(postgres_ctx, ReceiverSink(postgres_ctx, cache_store(postgres_ctx)), poll_seconds=0.05)
    caplog.set_level(logging.WARNING)
    worker.start()
    try:
        _heartbeat_after(postgres_ctx, worker.worker_id, None)
        with database_down(postgres_ctx):
            time.sleep(1.5)  # many polls' worth: each would log a traceback if the loop did not know better
            assert worker._thread is not None and worker._thread.is_alive()
        back = postgres_ctx.clock.now()
        _heartbeat_after(postgres_ctx, worker.worker_id, back, timeout=40)
        time.sleep(0.5)  # the rest of that tick
        assert worker._thread.is_alive()
    finally:
        worker.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "mi2b2.adapters.db.outage"]
    assert said == ["worker: the database is unreachable; retrying until it is back",
                    "worker: the database is reachable again"]
    assert not [r for r in caplog.records if r.name == "mi2b2.worker.loop" and r.levelno >= logging.ERROR]


def test_a_worker_stopped_during_an_outage_says_so_without_a_traceback(
        postgres_ctx: ServiceContext, caplog: pytest.LogCaptureFixture) -> None:
    worker = WorkerLoop(postgres_ctx, ReceiverSink(postgres_ctx, cache_store(postgres_ctx)), poll_seconds=0.05)
    caplog.set_level(logging.WARNING)
    worker.start()
    _heartbeat_after(postgres_ctx, worker.worker_id, None)
    with database_down(postgres_ctx):
        worker.stop()
    loop = [r for r in caplog.records if r.name == "mi2b2.worker.loop"]
    assert [r.getMessage() for r in loop] == [f"could not retire worker {worker.worker_id}: the database is unreachable"]
    assert not [r for r in loop if r.levelno >= logging.ERROR or r.exc_info]


def _heartbeat_after(ctx: ServiceContext, worker_id: str, since: datetime | None, timeout: float = 10) -> datetime:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with ctx.sessions() as session:
            row = session.get(Worker, worker_id)
            if row is not None and (since is None or row.heartbeat_at > since):
                return row.heartbeat_at
        time.sleep(0.05)
    raise AssertionError(f"no heartbeat from {worker_id} after {since}")


def test_a_request_interrupted_by_an_outage_goes_back_to_the_queue(postgres_ctx: ServiceContext) -> None:
    with transaction(postgres_ctx.sessions) as session:
        row = Request(project_id="alpha", user_login="alice", pacs_id="main", patient_id="77", study_uid="1.2.3",
                      state="scheduled", created_at=postgres_ctx.clock.now())
        session.add(row)
    assert schedule_once(postgres_ctx, "w1").started == [row.id]
    assert requeue_interrupted(postgres_ctx, "w2", {row.id}) == []  # another worker's run is not this one's to requeue
    assert requeue_interrupted(postgres_ctx, "w1", {row.id}) == [row.id]
    with postgres_ctx.sessions() as session:
        requeued = session.get_one(Request, row.id)
        assert (requeued.state, requeued.worker, requeued.last_error) == ("scheduled", None, MESSAGE)
        assert requeued.attempts == 0  # the outage was ours: the run it cut short does not count


def test_errors_that_are_not_outages_keep_their_type(postgres_ctx: ServiceContext) -> None:
    with pytest.raises(IntegrityError) as duplicate, transaction(postgres_ctx.sessions) as session:
        session.execute(text("INSERT INTO workers (id, host, pid, started_at, heartbeat_at) "
                             "VALUES ('x', 'h', 1, now(), now()), ('x', 'h', 1, now(), now())"))
    assert not is_outage(duplicate.value)
    with pytest.raises(ProgrammingError) as bad_statement, postgres_ctx.sessions() as session:
        session.execute(select(text("no_such_column")))
    assert not is_outage(bad_statement.value)
    assert is_outage(DatabaseUnavailable())


def test_many_callers_during_an_outage_all_get_the_retriable_error(postgres_ctx: ServiceContext) -> None:
    failures: list[BaseException] = []

    def read() -> None:
        try:
            with postgres_ctx.sessions() as session:
                session.execute(select(Worker)).all()
        except BaseException as exc:
            failures.append(exc)

    with database_down(postgres_ctx):
        threads = [threading.Thread(target=read) for _ in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
    assert len(failures) == 8 and all(isinstance(f, DatabaseUnavailable) for f in failures)


def test_the_receiver_answers_a_transient_status_during_an_outage_and_stores_once_it_is_back(tmp_path: Path) -> None:
    from test_receiver_doors import _in_flight, _site, _store_all

    from mi2b2.synthetic import write_study
    from support import studies
    from support.pipeline import Pipeline

    if not postgres_available():
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432; start it (scripts/test.sh does)")
    files = write_study(studies.TRAUMA, tmp_path / "study")
    instance = pydicom.dcmread(files[0])
    with fresh_database("postgres", tmp_path) as url, Pipeline(_site(tmp_path / "site", url), worker=False) as pipe:
        request_id = _in_flight(pipe, studies.TRAUMA)
        with database_down(pipe.ctx):
            assert _store_all(pipe, "PACS", [instance]) == [0xA700]  # out of resources: the PACS may send it again
        assert _store_all(pipe, "PACS", [instance]) == [0x0000]
        assert pipe.sink.indexer.flush(30)
        with pipe.ctx.sessions() as session:
            row = session.get_one(Request, request_id)
            assert (row.state, row.received, row.failed, row.last_error) == ("processing", 1, 0, None)
