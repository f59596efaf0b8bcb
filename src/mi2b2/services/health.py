"""The probes behind ``/health/ready``: each cheap, each bounded by a short timeout, run together.

A probe answers None when its part works, or a short reason when it does not; the reasons name
no patient, path secret or password (the database URL is never included)."""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout

from alembic.script import ScriptDirectory
from sqlalchemy import func, select, text

from mi2b2.adapters.db.engine import alembic_config, current_revision
from mi2b2.adapters.db.tables import Worker, WorkerKind
from mi2b2.domain.clock import as_utc
from mi2b2.domain.health import CheckOutcome, Readiness, decide_readiness, worker_heartbeat_problem, worker_stale_after
from mi2b2.services.context import ServiceContext

CHECK_TIMEOUT_SECONDS = 2.0  # a load balancer's probe must not wait on a hung database or disk

Probe = Callable[[], str | None]


def readiness(ctx: ServiceContext, timeout: float = CHECK_TIMEOUT_SECONDS) -> Readiness:
    probes: dict[str, Probe] = {
        "database": lambda: _database(ctx),
        "migrations": lambda: _migrations(ctx),
        "worker": lambda: _worker(ctx),
        "cache": lambda: _cache(ctx),
    }
    if ctx.config.server.run_receiver:
        probes["receiver"] = lambda: _receiver(ctx.config.dicom.port, timeout)
    return decide_readiness(_run_bounded(probes, timeout))


def _run_bounded(probes: dict[str, Probe], timeout: float) -> list[CheckOutcome]:
    pool = ThreadPoolExecutor(len(probes), thread_name_prefix="health")
    try:
        futures = {name: pool.submit(probe) for name, probe in probes.items()}
        outcomes = []
        for name, future in futures.items():  # all started together: the whole wait is about one timeout
            try:
                outcomes.append(CheckOutcome(name, future.result(timeout=timeout)))
            except FutureTimeout:
                outcomes.append(CheckOutcome(name, f"no answer within {timeout:g} s"))
            except Exception as error:  # any failure of a probe is an unready answer, not a 500
                outcomes.append(CheckOutcome(name, f"{type(error).__name__}: {_first_line(error)}"))
        return outcomes
    finally:
        pool.shutdown(wait=False, cancel_futures=True)  # a hung probe is abandoned, not awaited


def _first_line(error: Exception) -> str:
    # SQLAlchemy appends the statement and a link; the first line is the reason.
    return (str(error).strip().splitlines() or ["(no message)"])[0][:200]


def _database(ctx: ServiceContext) -> str | None:
    with ctx.engine.connect() as connection:
        connection.execute(text("SELECT 1"))
    return None


def _migrations(ctx: ServiceContext) -> str | None:
    current = current_revision(ctx.engine)
    head = ScriptDirectory.from_config(alembic_config("sqlite://")).get_current_head()
    if current == head:
        return None
    if current is None:
        return "the database has no mi2b2 schema; run `mi2b2 db upgrade`"
    return f"the schema is at revision {current}, this version of mi2b2 expects {head}; run `mi2b2 db upgrade`"


def _worker(ctx: ServiceContext) -> str | None:
    with ctx.sessions() as session:
        latest = session.scalar(select(func.max(Worker.heartbeat_at)).where(Worker.kind == WorkerKind.WORKER))
    stale_after = worker_stale_after(ctx.config.server.worker_poll_seconds)
    return worker_heartbeat_problem(as_utc(latest) if latest else None, ctx.clock.now(), stale_after)


def _receiver(port: int, timeout: float) -> str | None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        probe.settimeout(timeout)
        try:
            probe.connect(("127.0.0.1", port))
        except OSError as error:
            return f"the DICOM receiver does not accept connections on port {port} ({error.strerror or error})"
    return None


def _cache(ctx: ServiceContext) -> str | None:
    root = ctx.config.cache_dir()
    try:
        root.mkdir(parents=True, exist_ok=True)  # made on first use, as the cache itself does
        handle, name = tempfile.mkstemp(prefix=".health-", dir=root)
    except OSError as error:
        return f"cannot create a file in the cache root ({error.strerror or error})"
    os.close(handle)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(name)
    return None
