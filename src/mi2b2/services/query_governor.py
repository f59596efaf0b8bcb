"""Every C-FIND mi2b2 sends passes here: the PACS's query limits, shared by all processes.

`governed_opener` wraps the find opener of the service context: opening a find
session first takes a query lease on the PACS (waiting up to
``search.wait_seconds`` for one), and each C-FIND then waits for its slot.
Queries are granted from the database a share of a rate bucket at a time, so
the per-query cost is a counter in memory (and at most a sleep), not a
database round trip. The decisions are
the pure functions of domain/query_governance.py; this module owns the
transactions, under a lock every process shares (PostgreSQL: an advisory
lock; SQLite: the write lock ``BEGIN IMMEDIATE`` takes).
"""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime, timedelta
from zoneinfo import ZoneInfo

from sqlalchemy import delete, func, select, text
from sqlalchemy.orm import Session, sessionmaker

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import QueryLease, QueryPacer
from mi2b2.adapters.process import pid_alive
from mi2b2.config import PacsConfig, SiteConfig
from mi2b2.domain.clock import Clock
from mi2b2.domain.query_governance import (
    Grant,
    PacerState,
    QueryLimits,
    grant_queries,
    may_open_association,
    query_limits_at,
    returned,
)
from mi2b2.errors import RetriableError
from mi2b2.services.context import FindOpener, FindSessionPort

QUERY_LOCK = 0x6D693251  # "mi2Q": one key for every process that governs queries
POLL_SECONDS = (0.02, 0.25)  # first and longest pause between two tries for a lease
PLACE_IN_LINE = timedelta(seconds=5)  # a waiting search that stops asking loses its place after this


def query_limits(pacs: PacsConfig, now: datetime) -> QueryLimits:
    return query_limits_at([w.to_domain() for w in pacs.windows], now, ZoneInfo(pacs.timezone),
                           pacs.default_max_concurrent_queries, pacs.default_queries_per_second)


@dataclass
class Lease:
    id: int
    pacs: PacsConfig
    lease_seconds: float
    grant: Grant | None = None
    left: int = 0  # queries of `grant` not sent yet


class QueryGovernor:
    def __init__(self, sessions: sessionmaker[Session], clock: Clock) -> None:
        self.sessions = sessions
        self.clock = clock
        self.host = socket.gethostname()
        self.holder = f"{self.host}:{os.getpid()}:{os.urandom(3).hex()}"

    # --- leases: query associations open at once ----------------------------------------

    def acquire(self, pacs: PacsConfig, lease_seconds: float, wait_seconds: float) -> Lease:
        """A query lease on the PACS, or RetriableError naming why after ``wait_seconds``."""
        started = self.clock.monotonic()
        pause = POLL_SECONDS[0]
        ticket: int | None = None
        try:
            while True:
                ticket, granted, reason = self._try_acquire(pacs, lease_seconds, ticket)
                if granted:
                    return Lease(ticket, pacs, lease_seconds)
                if self.clock.monotonic() - started >= wait_seconds:
                    raise RetriableError(f"PACS {pacs.id!r}: {reason}; the search was not sent, try again later")
                self.clock.sleep(pause)
                pause = min(pause * 2, POLL_SECONDS[1])
        except BaseException:
            if ticket is not None:
                self._drop(ticket)
            raise

    def _try_acquire(self, pacs: PacsConfig, lease_seconds: float, ticket: int | None) -> tuple[int, bool, str]:
        """Take our place in line (or keep it), and the lease if our turn has come."""
        now = self.clock.now()
        with transaction(self.sessions) as session:
            _lock(session)
            granted = self._live_leases(session, pacs.id, now)
            row = session.get(QueryLease, ticket) if ticket is not None else None
            if row is None:  # first try, or our place expired: join the end of the line
                row = QueryLease(pacs_id=pacs.id, holder=self.holder, host=self.host, pid=os.getpid(),
                                 granted=False, acquired_at=now, expires_at=now)
                session.add(row)
                session.flush()
            row.expires_at = now + PLACE_IN_LINE
            ahead = session.execute(select(func.count()).where(
                QueryLease.pacs_id == pacs.id, QueryLease.granted.is_(False), QueryLease.id < row.id,
            )).scalar_one()
            reason = may_open_association(query_limits(pacs, now), granted, ahead)
            if reason is None:
                row.granted, row.acquired_at = True, now
                row.expires_at = now + timedelta(seconds=lease_seconds)
            return row.id, reason is None, reason or ""

    def _live_leases(self, session: Session, pacs_id: str, now: datetime) -> int:
        """Granted leases of the PACS, after dropping expired rows and those of dead processes here."""
        session.execute(delete(QueryLease).where(QueryLease.expires_at < now))
        here = session.execute(
            select(QueryLease.id, QueryLease.pid).where(QueryLease.pacs_id == pacs_id, QueryLease.host == self.host)
        ).all()
        dead = [lease_id for lease_id, pid in here if pid != os.getpid() and not pid_alive(pid)]
        if dead:
            session.execute(delete(QueryLease).where(QueryLease.id.in_(dead)))
        return session.execute(
            select(func.count()).where(QueryLease.pacs_id == pacs_id, QueryLease.granted.is_(True))
        ).scalar_one()

    def _drop(self, ticket: int) -> None:
        with transaction(self.sessions) as session:
            session.execute(delete(QueryLease).where(QueryLease.id == ticket))

    def release(self, lease: Lease) -> None:
        now = self.clock.now()
        with transaction(self.sessions) as session:
            _lock(session)
            if lease.grant is not None and lease.left:
                pacer = session.get(QueryPacer, lease.pacs.id)
                if pacer is not None:
                    state = returned(PacerState(pacer.bucket, pacer.used), lease.grant, lease.left, now)
                    pacer.bucket, pacer.used = state.bucket, state.used
            session.execute(delete(QueryLease).where(QueryLease.id == lease.id))

    # --- slots: C-FINDs per second ---------------------------------------------------------

    def take_slot(self, lease: Lease) -> None:
        """Return when one C-FIND may be sent on this lease's association."""
        while True:
            now = self.clock.now()
            grant = lease.grant
            if grant is not None and lease.left > 0 and now < grant.deadline:
                if now < grant.start:
                    self.clock.sleep((grant.start - now).total_seconds())
                    continue  # re-check: a sleep that overslept must not send late
                lease.left -= 1
                return
            lease.grant = self._reserve(lease)
            lease.left = lease.grant.count

    def _reserve(self, lease: Lease) -> Grant:
        now = self.clock.now()
        with transaction(self.sessions) as session:
            _lock(session)
            limits = query_limits(lease.pacs, now)
            row = session.get(QueryLease, lease.id)
            if row is None:  # expired while we were not looking: take a slot again, or stop
                reason = may_open_association(limits, self._live_leases(session, lease.pacs.id, now))
                if reason is not None:
                    raise RetriableError(f"PACS {lease.pacs.id!r}: {reason}; the search stopped, try again later")
                row = QueryLease(id=lease.id, pacs_id=lease.pacs.id, holder=self.holder, host=self.host,
                                 pid=os.getpid(), granted=True, acquired_at=now, expires_at=now)
                session.add(row)
            row.expires_at = now + timedelta(seconds=lease.lease_seconds)
            pacer = session.get(QueryPacer, lease.pacs.id)
            if pacer is None:
                pacer = QueryPacer(pacs_id=lease.pacs.id, bucket=None, used=0)
                session.add(pacer)
            grant, state = grant_queries(now, PacerState(pacer.bucket, pacer.used), limits)
            pacer.bucket, pacer.used = state.bucket, state.used
            return grant


class GovernedFindSession:
    def __init__(self, governor: QueryGovernor, lease: Lease, inner: FindSessionPort) -> None:
        self.governor = governor
        self.lease = lease
        self.inner = inner

    def find(self, model: str, level: str, keys: Mapping[str, str | None]) -> list[dict[str, str]]:
        self.governor.take_slot(self.lease)
        return self.inner.find(model, level, keys)


def governed_opener(governor: QueryGovernor, inner: FindOpener) -> FindOpener:
    """A find opener whose sessions hold a query lease and send each C-FIND in its slot."""

    @contextmanager
    def open_governed(config: SiteConfig, pacs: PacsConfig) -> Iterator[GovernedFindSession]:
        lease = governor.acquire(pacs, config.search.lease_seconds, config.search.wait_seconds)
        try:
            with inner(config, pacs) as session:
                yield GovernedFindSession(governor, lease, session)
        finally:
            governor.release(lease)

    return open_governed


def _lock(session: Session) -> None:
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": QUERY_LOCK})
