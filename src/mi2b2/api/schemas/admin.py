"""Answers of the site admin's and the auditor's operations."""

from __future__ import annotations

from mi2b2.api.schemas.common import Reply
from mi2b2.api.schemas.search import ProjectHeading


class ConfigChanges(Reply):
    added: list[str]
    changed: list[str]
    deactivated: list[str]
    allow_list_sizes: dict[str, int]
    requests_canceled: int


class ConfigReloaded(Reply):
    status: str
    added: list[str]
    changed: list[str]
    deactivated: list[str]
    allow_list_sizes: dict[str, int]
    requests_canceled: int


class Member(Reply):
    login: str
    role: str


class ProjectOverview(ProjectHeading):
    institutions: list[str]
    members: list[Member]
    quota_bytes: int
    used_bytes: int
    in_flight_bytes: int
    allow_list_size: int
    max_studies_per_patient: int | None
    mrn_file: str | None
    mrn_files: dict[str, str]


class AllowListReport(Reply):
    project_id: str
    institution: str
    allow_list_size: int
    duplicates: int
    file: str
    reload: ConfigChanges


class ClosedStudy(Reply):
    project_id: str
    study_uid: str
    patient_id: str
    instances: int
    bytes: int
    reason: str


class PurgeReport(Reply):
    """Closed studies (deleted if ``applied``), those left for next time because they are being retrieved,
    and the totals."""

    applied: bool
    studies: list[ClosedStudy]
    bytes: int
    busy: list[ClosedStudy]
    projects: int


class AuditEventRow(Reply):
    seq: int
    occurred_at: str
    actor: str
    client: str
    action: str
    outcome: str
    project_id: str | None
    pacs_id: str | None
    patient_id: str | None
    study_uid: str | None
    detail: str
    prev_hash: str
    hash: str


class ChainVerdict(Reply):
    ok: bool
    checked: int
    bad_seq: int | None
    problem: str
    keyed_from: int | None
    keyed_rows: int
    checkpoints: int
    newest_checkpoint: int | None
    summary: str
