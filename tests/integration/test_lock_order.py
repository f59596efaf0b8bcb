"""Workers and receivers never deadlock on PostgreSQL.

Every multi-row lock on requests is taken in id order. Here a worker's tick
(requeue the orphans, schedule) and two receivers counting arrivals for the
same requests in opposite orders run against each other, round after round, on
a real PostgreSQL: no transaction may fail, least of all with a deadlock.
"""

from __future__ import annotations

import random
import threading
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import func, select, update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedInstance, Request
from mi2b2.adapters.dicom.files import InstanceHeader
from mi2b2.services.cache.index import Arrival
from mi2b2.services.cache.reads import cache_store
from mi2b2.services.context import build_context
from mi2b2.services.receiver import Indexer
from mi2b2.services.scheduler import heartbeat, new_worker_id, requeue_orphans, schedule_once
from support.databases import fresh_database, postgres_available
from support.site import load_site

pytestmark = pytest.mark.postgres
REQUESTS = 40
ROUNDS = 8


def _arrival(request_id: int, n: int) -> Arrival:
    study = f"1.2.826.0.1.3680043.10.1500.{request_id}"
    header = InstanceHeader("1.2.840.10008.5.1.4.1.1.2", f"{study}.1.{n}", study, f"{study}.1", "000123", "DOE^JANE",
                            f"A{request_id}", "20250101", "", "CT", 1, n, "1.2.840.10008.1.2.1")
    return Arrival("alpha", header, f"alpha/{request_id}/{n}.dcm", 1000, "alice", "main", request_id=request_id)


def test_a_worker_tick_and_two_receivers_counting_never_deadlock(tmp_path: Path) -> None:
    if not postgres_available():
        pytest.skip("PostgreSQL is not reachable at 127.0.0.1:5432 (the README's setup starts it)")
    with fresh_database("postgres", tmp_path) as url:
        ctx = build_context(load_site(tmp_path, database_url=url))
        with transaction(ctx.sessions) as session:
            rows = [Request(project_id="alpha", user_login="alice", pacs_id="main", patient_id="000123",
                            study_uid=f"1.2.826.0.1.3680043.10.1500.{n}", state="processing", worker=None,
                            created_at=ctx.clock.now()) for n in range(REQUESTS)]
            session.add_all(rows)
            session.flush()
            ids = [row.id for row in rows]
        worker = new_worker_id()
        heartbeat(ctx, worker)
        receivers = [Indexer(ctx, cache_store(ctx)), Indexer(ctx, cache_store(ctx))]
        errors: list[BaseException] = []

        def guarded(work: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:
                try:
                    work()
                except BaseException as exc:  # collected, to fail the test with what went wrong
                    errors.append(exc)
            return run

        for round_ in range(ROUNDS):
            with transaction(ctx.sessions) as session:  # every request orphaned again: the worker takes them back
                session.execute(update(Request).where(Request.id.in_(ids)).values(state="processing", worker=None))
            order = random.Random(round_).sample(ids, len(ids))
            threads = [
                threading.Thread(target=guarded(lambda: [  # type: ignore[func-returns-value]
                    (requeue_orphans(ctx, timedelta(seconds=30), caller=worker), schedule_once(ctx, worker))
                    for _ in range(3)])),
                # The receiver's own method: the multi-row progress update is what must lock in order.
                threading.Thread(target=guarded(lambda o=order, r=round_: receivers[0]._index(  # type: ignore[misc]
                    [_arrival(i, r * 2) for i in o]))),
                threading.Thread(target=guarded(lambda o=order, r=round_: receivers[1]._index(  # type: ignore[misc]
                    [_arrival(i, r * 2 + 1) for i in reversed(o)]))),
            ]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(120)
            assert errors == [], f"round {round_}: {errors[0]!r}"
        with ctx.sessions() as session:  # every instance both receivers got is indexed, once
            indexed = session.execute(select(func.count()).select_from(CachedInstance)).scalar_one()
        assert indexed == 2 * ROUNDS * REQUESTS
        ctx.engine.dispose()
