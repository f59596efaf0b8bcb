"""Answers about retrieval and forward requests, the PACS' governance now, and destinations."""

from __future__ import annotations

from mi2b2.api.schemas.common import Reply, Timestamp


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


class AddReport(Reply):
    batch_id: str
    created: list[int]
    already_cached: list[str]
    already_queued: list[str]
    not_found: list[str]
    not_permitted: list[str]


class Canceled(Reply):
    canceled: list[int]


class Retried(Reply):
    retried: list[int]


class PriorityChanged(Reply):
    changed: list[int]


class RequestsVersion(Reply):
    """A fingerprint of a project's request list: it changes whenever the list does."""

    version: str


class PacsLimits(Reply):
    window: str
    closed: bool
    max_concurrent: int
    studies_per_minute: int | None
    studies_per_hour: int | None


class PacsState(Reply):
    pacs_id: str
    limits: PacsLimits
    active: int
    starts_last_minute: int
    starts_last_hour: int
    queued: int


class ForwardReport(Reply):
    batch_id: str
    destination_id: str
    created: list[int]
    already_queued: list[str]
    not_cached: list[str]
    not_permitted: list[str]


class DestinationRow(Reply):
    id: str
    name: str
    ae_title: str
    host: str
    port: int
    max_concurrent: int
    tls: bool
    all_projects: bool
