"""Prometheus metrics, read from the database at scrape time.

Every value comes from a few aggregate queries when Prometheus scrapes, so every web process and
worker answers the same numbers; nothing is counted in one process's memory. Label values are
configuration ids (PACS, project) and worker ids, never patient data."""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from sqlalchemy import func, select

from mi2b2.adapters.db.tables import CachedStudy, Project, Request, Worker, WorkerKind
from mi2b2.domain.clock import as_utc
from mi2b2.domain.requests import RequestKind, RequestState
from mi2b2.services.audit_syslog import backlog as audit_syslog_backlog
from mi2b2.services.context import ServiceContext
from mi2b2.services.metrics_activity import ActivityCollector, ReceiverRefusals
from mi2b2.services.scheduler import pacs_states


class SiteCollector(Collector):
    """The governance state of the site now: PACS load, project queues and caches, workers, receiver."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx

    def collect(self) -> Iterator[Metric]:
        yield from self._pacs()
        yield from self._projects()
        yield from self._workers_and_receiver()
        yield from self._audit_syslog()

    def _pacs(self) -> Iterator[Metric]:
        families = {
            "active": _gauge("mi2b2_pacs_active_retrievals", "retrievals holding a PACS slot now"),
            "cap": _gauge("mi2b2_pacs_max_concurrent", "concurrent retrievals the PACS allows now (0 when closed)"),
            "minute": _gauge("mi2b2_pacs_starts_last_minute", "retrievals started in the last minute"),
            "hour": _gauge("mi2b2_pacs_starts_last_hour", "retrievals started in the last hour"),
            "per_minute": _gauge("mi2b2_pacs_studies_per_minute_limit", "the window's per-minute start rate"),
            "per_hour": _gauge("mi2b2_pacs_studies_per_hour_limit", "the window's per-hour start rate"),
            "queued": _gauge("mi2b2_pacs_queued_requests", "requests scheduled for this PACS, not started"),
            "open": _gauge("mi2b2_pacs_window_open", "1 while the PACS's governance window lets retrievals start"),
        }
        for state in pacs_states(self.ctx):
            labels = [state.pacs_id]
            limits = state.limits
            families["active"].add_metric(labels, state.active)
            families["cap"].add_metric(labels, 0 if limits.closed else limits.max_concurrent)
            families["minute"].add_metric(labels, state.starts_last_minute)
            families["hour"].add_metric(labels, state.starts_last_hour)
            if limits.studies_per_minute is not None:  # no series where the window sets no rate
                families["per_minute"].add_metric(labels, limits.studies_per_minute)
            if limits.studies_per_hour is not None:
                families["per_hour"].add_metric(labels, limits.studies_per_hour)
            families["queued"].add_metric(labels, state.queued)
            families["open"].add_metric(labels, 0 if limits.closed else 1)
        yield from families.values()

    def _projects(self) -> Iterator[Metric]:
        requests = _gauge("mi2b2_project_requests", "requests of the project in each state", ["project", "state"])
        used = _gauge("mi2b2_project_cache_used_bytes", "bytes of the project's cached studies", ["project"])
        quota = _gauge("mi2b2_project_cache_quota_bytes", "the project's cache quota", ["project"])
        with self.ctx.sessions() as session:
            counts = {(project, state): count for project, state, count in session.execute(
                select(Request.project_id, Request.state, func.count()).group_by(Request.project_id, Request.state))}
            cached = dict(session.execute(
                select(CachedStudy.project_id, func.coalesce(func.sum(CachedStudy.bytes), 0))
                .group_by(CachedStudy.project_id)).all())
            quotas = session.execute(select(Project.id, Project.quota_bytes)).all()
        for project_id, quota_bytes in quotas:
            for state in RequestState:  # every state, zero included, so a rate or alert has a series to read
                requests.add_metric([project_id, state.value], counts.get((project_id, state.value), 0))
            used.add_metric([project_id], int(cached.get(project_id, 0)))
            quota.add_metric([project_id], quota_bytes)
        yield from (requests, used, quota)

    def _workers_and_receiver(self) -> Iterator[Metric]:
        now = self.ctx.clock.now()
        ages = {WorkerKind.WORKER: _gauge("mi2b2_worker_heartbeat_age_seconds",
                                          "seconds since the worker's newest heartbeat", ["worker"]),
                WorkerKind.RECEIVER: _gauge("mi2b2_receiver_heartbeat_age_seconds",
                                            "seconds since the receiver's newest heartbeat", ["receiver"])}
        instances = _gauge("mi2b2_receiver_instances_received",
                           "instances received for the retrievals the database holds", [])
        received_bytes = _gauge("mi2b2_receiver_bytes_received",
                                "bytes received for the retrievals the database holds", [])
        with self.ctx.sessions() as session:
            beats = session.execute(select(Worker.id, Worker.kind, Worker.heartbeat_at)).all()
            total_instances, total_bytes = session.execute(
                select(func.coalesce(func.sum(Request.received), 0), func.coalesce(func.sum(Request.bytes), 0))
                .where(Request.kind == RequestKind.RETRIEVE)).one()
        for process_id, kind, beat in beats:
            if kind in ages:
                ages[WorkerKind(kind)].add_metric([process_id], max(0.0, (now - as_utc(beat)).total_seconds()))
        instances.add_metric([], int(total_instances))
        received_bytes.add_metric([], int(total_bytes))
        yield from (*ages.values(), instances, received_bytes)


    def _audit_syslog(self) -> Iterator[Metric]:
        queued = _gauge("mi2b2_audit_syslog_backlog", "ATNA audit messages queued for the security team's syslog "
                        "collector, not yet delivered ([audit.atna])", [])
        with self.ctx.sessions() as session:
            queued.add_metric([], audit_syslog_backlog(session))
        yield queued


def _gauge(name: str, documentation: str, labels: list[str] | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, documentation, labels=["pacs"] if labels is None else labels)


def site_registry(ctx: ServiceContext, refusals: ReceiverRefusals | None = None) -> CollectorRegistry:
    """Only the site's collectors: the process collectors of the default registry differ per process.

    ``refusals`` carries the receiver's refusal counts from one scrape to the next (see
    services/metrics_activity.py); without one, they are summed from the whole audit trail."""
    registry = CollectorRegistry(auto_describe=False)
    registry.register(SiteCollector(ctx))
    registry.register(ActivityCollector(ctx, refusals or ReceiverRefusals()))
    return registry


def metrics_refusal(ctx: ServiceContext, client_address: str | None, authorization: str | None) -> tuple[int, str] | None:
    """None when this client may read the metrics, else the HTTP status and why."""
    settings = ctx.config.metrics
    if not settings.enabled:
        return 404, "metrics are not enabled on this site ([metrics] enabled = false)"
    if client_address is not None and _allowed_address(client_address, settings.allow_from):
        return None
    token_file = ctx.config.metrics_token_file()
    if authorization is None or not authorization.lower().startswith("bearer "):
        if token_file is None:
            return 403, "metrics are readable only from the addresses in [metrics] allow_from"
        return 401, "metrics need a bearer token (Authorization: Bearer <the [metrics] token_file's token>)"
    if token_file is None:
        return 403, "this site accepts no metrics token; metrics are readable only from [metrics] allow_from"
    expected = token_file.read_text().strip()  # read per scrape: a rotated token takes effect at once
    if not expected or not hmac.compare_digest(authorization[len("bearer "):].strip().encode(), expected.encode()):
        return 403, "the metrics token is wrong"
    return None


def _allowed_address(client_address: str, networks: list[str]) -> bool:
    try:
        address = ipaddress.ip_address(client_address)
    except ValueError:  # e.g. the test client's "testclient"
        return False
    return any(address in ipaddress.ip_network(network) for network in networks)
