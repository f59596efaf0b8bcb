"""Answers about retrieval and forward requests, the PACS' governance now, and destinations."""

from __future__ import annotations

from pydantic.dataclasses import dataclass

from mi2b2.api.schemas.common import Readable, Reply, Timestamp
from mi2b2.domain import windows
from mi2b2.services import forward, requests, scheduler


class AllowedChanges(Reply):
    """What the caller may still do to a request in its state."""

    cancel: bool
    retry: bool
    priority: bool


class RequestRow(Reply):
    id: int
    kind: str
    batch_id: str | None
    project_id: str
    user: str
    pacs_id: str | None
    destination_id: str | None
    patient_id: str
    study_uid: str
    accession: str
    series_uids: list[str]
    priority: int
    state: str
    allowed: AllowedChanges
    waiting_reason: str | None
    expected_instances: int
    expected_bytes: int
    received: int
    failed: int
    warnings: int
    bytes: int
    attempts: int
    last_error: str | None
    last_status: int | None
    cancel_requested: bool
    created_at: Timestamp
    started_at: Timestamp | None
    ended_at: Timestamp | None
    not_before: Timestamp | None


class RequestPage(Reply):
    """One page of a project's request log, newest first. ``next_before``: pass it as ``before``
    for the next, older page (null on the last). ``state_counts``: per state, the requests the
    other filters match (what choosing that state would show); ``total``: what the whole filter matches."""

    rows: list[RequestRow]
    next_before: int | None
    state_counts: dict[str, int]
    total: int


@dataclass
class AddReport(requests.AddReport, Readable):
    """The requests queued (their ids), and the studies left out, by reason."""


class Canceled(Reply):
    canceled: list[int]


class Retried(Reply):
    retried: list[int]


class PriorityChanged(Reply):
    changed: list[int]


class RequestsVersion(Reply):
    """A fingerprint of a project's request list: it changes whenever the list does."""

    version: str


@dataclass(frozen=True)
class PacsLimits(windows.Limits, Readable):
    """What the PACS' governance window allows now."""


@dataclass(frozen=True)
class PacsState(scheduler.PacsState, Readable):
    """Governance now, for one PACS: its limits, the retrievals running, the recent starts, the queue."""

    limits: PacsLimits


@dataclass
class ForwardReport(forward.ForwardReport, Readable):
    """The forwards queued (their ids), and the studies left out, by reason."""


class DestinationRow(Reply):
    id: str
    name: str
    ae_title: str
    host: str
    port: int
    max_concurrent: int
    tls: bool
    all_projects: bool
