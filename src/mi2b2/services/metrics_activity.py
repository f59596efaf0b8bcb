"""Prometheus metrics of what the site did: request durations, the receiver's refusals, searches.

Like the state metrics beside them (services/metrics.py), these are read from the database at
scrape time, never counted in a process's memory: the API answers /metrics while a worker and a
receiver, often other processes on other hosts, do the work. Their sources are durable records:

* durations: the requests table, from the start of a request's last attempt to its end;
  requests are kept, so the histogram is cumulative (a retried request counts once, with its
  last outcome);
* refusals: the receiver's audit rows (append-only, and numbered in commit order), read
  incrementally: each scrape reads only the rows added since the previous one;
* searches: the stored queries, one per search sent to a PACS; and the query governor's open
  query associations and limits now.

Labels are configuration ids and fixed words; nothing here reads a patient column.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import ColumnElement, Float, case, cast, func, select
from sqlalchemy.orm import Session

from mi2b2.adapters.db.tables import AuditEvent, Query, QueryLease, Request
from mi2b2.domain.refusal_reasons import ALL_KINDS, refusals_in
from mi2b2.domain.requests import ENDED, RequestKind
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.context import ServiceContext
from mi2b2.services.query_governor import query_limits

# Seconds. A retrieval spans a small study over a fast link to a large one through a throttled
# night window; a forward is of the same order.
DURATION_BUCKETS: tuple[float, ...] = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)
REFUSAL_BATCH = 5000  # audit rows read per round trip while catching up


class ReceiverRefusals:
    """Instances the receiver refused, by kind, summed over the audit trail.

    Kept by the API process between scrapes (the router holds one), so that each scrape reads
    only the audit rows appended since the last: the trail only grows, and its sequence numbers
    are handed out under the head row's lock, so no row can appear later below the last one read."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._database: str | None = None
        self._last_seq = 0
        self._counts: dict[str, int] = {kind: 0 for kind in ALL_KINDS}

    def counts(self, ctx: ServiceContext) -> dict[str, int]:
        with self._lock:
            database = ctx.config.server.database_url
            if database != self._database:  # another database after a reload: count it from its start
                self._database, self._last_seq = database, 0
                self._counts = {kind: 0 for kind in ALL_KINDS}
            with ctx.sessions() as session:
                while self._read_batch(session):
                    pass
            return dict(self._counts)

    def _read_batch(self, session: Session) -> bool:
        rows = session.execute(
            select(AuditEvent.seq, AuditEvent.detail)
            .where(AuditEvent.seq > self._last_seq, AuditEvent.action == Action.RECEIVE.value,
                   AuditEvent.outcome == Outcome.DENIED.value)
            .order_by(AuditEvent.seq).limit(REFUSAL_BATCH)
        ).all()
        for seq, detail in rows:
            for kind, count in refusals_in(_json_object(detail)).items():
                self._counts[kind] += count
            self._last_seq = seq
        return len(rows) == REFUSAL_BATCH


class ActivityCollector(Collector):
    def __init__(self, ctx: ServiceContext, refusals: ReceiverRefusals) -> None:
        self.ctx = ctx
        self.refusals = refusals

    def collect(self) -> Iterator[Metric]:
        yield from self._durations()
        yield self._refused()
        yield from self._searches()

    def _durations(self) -> Iterator[Metric]:
        retrievals = HistogramMetricFamily(
            "mi2b2_retrieval_duration_seconds",
            "ended retrievals: seconds from the start of their last attempt to their end, by PACS and outcome",
            labels=["pacs", "outcome"])
        forwards = HistogramMetricFamily(
            "mi2b2_forward_duration_seconds",
            "ended forwards: seconds from the start of their last attempt to their end, by destination and outcome",
            labels=["destination", "outcome"])
        with self.ctx.sessions() as session:
            for family, kind, target in ((retrievals, RequestKind.RETRIEVE, Request.pacs_id),
                                         (forwards, RequestKind.FORWARD, Request.destination_id)):
                for label, outcome, count, total, *within in _duration_rows(session, kind, target):
                    buckets = [(repr(float(bound)), int(n or 0))  # "1.0": the le text prometheus-client writes
                               for bound, n in zip(DURATION_BUCKETS, within, strict=True)]
                    family.add_metric([label or "", outcome], [*buckets, ("+Inf", int(count))],
                                      sum_value=float(total or 0.0))
        yield from (retrievals, forwards)

    def _refused(self) -> Metric:
        refused = CounterMetricFamily(
            "mi2b2_receiver_refused_instances",
            "instances the receiver refused (and associations: unknown_peer_address, connections: proxy_header), "
            "by kind",
            labels=["reason"])
        for kind, count in self.refusals.counts(self.ctx).items():
            refused.add_metric([kind], count)
        return refused

    def _searches(self) -> Iterator[Metric]:
        searches = CounterMetricFamily(
            "mi2b2_pacs_searches", "searches sent to the PACS (each a stored query: one association, "
                                   "one C-FIND or more)", labels=["pacs"])
        open_now = GaugeMetricFamily(
            "mi2b2_pacs_query_associations", "query associations holding a lease on the PACS now", labels=["pacs"])
        cap = GaugeMetricFamily(
            "mi2b2_pacs_max_concurrent_queries", "query associations the PACS allows at once now", labels=["pacs"])
        rate = GaugeMetricFamily(
            "mi2b2_pacs_queries_per_second_limit", "C-FINDs per second the PACS allows now", labels=["pacs"])
        now = self.ctx.clock.now()
        with self.ctx.sessions() as session:
            stored: dict[str, int] = {pacs_id: count for pacs_id, count in session.execute(
                select(Query.pacs_id, func.count()).group_by(Query.pacs_id))}
            leases: dict[str, int] = {pacs_id: count for pacs_id, count in session.execute(
                select(QueryLease.pacs_id, func.count())
                .where(QueryLease.granted.is_(True), QueryLease.expires_at >= now)
                .group_by(QueryLease.pacs_id))}
        for pacs in self.ctx.config.all_pacs():
            limits = query_limits(pacs, now)
            searches.add_metric([pacs.id], stored.get(pacs.id, 0))
            open_now.add_metric([pacs.id], leases.get(pacs.id, 0))
            cap.add_metric([pacs.id], limits.max_concurrent)
            if limits.per_second is not None:  # no series where no rate is set
                rate.add_metric([pacs.id], limits.per_second)
        yield from (searches, open_now, cap, rate)


def _duration_rows(session: Session, kind: RequestKind, target: Any) -> list[Any]:
    """Per (target, outcome): how many ended, their summed seconds, and how many within each bucket."""
    seconds = _seconds_between(session, Request.started_at, Request.ended_at)
    within = [func.sum(case((seconds <= bound, 1), else_=0)) for bound in DURATION_BUCKETS]
    return list(session.execute(
        select(target, Request.state, func.count(), func.sum(seconds), *within)
        .where(Request.kind == kind.value, Request.state.in_([state.value for state in ENDED]),
               Request.started_at.is_not(None), Request.ended_at.is_not(None), Request.ended_at >= Request.started_at)
        .group_by(target, Request.state)
    ).all())


def _seconds_between(session: Session, start: Any, end: Any) -> ColumnElement[float]:
    if session.get_bind().dialect.name == "postgresql":
        return cast(func.extract("epoch", end - start), Float)
    # SQLite keeps times as ISO text; julianday reads it (fractions of a second included).
    return (func.julianday(end) - func.julianday(start)) * 86400.0


def _json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}
