"""Answers of the site admin's and the auditor's operations."""

from __future__ import annotations

from pydantic.dataclasses import dataclass

from mi2b2.api.schemas.common import Readable, Reply
from mi2b2.api.schemas.search import ProjectHeading
from mi2b2.domain.audit_chain import ChainedEvent
from mi2b2.services import admin, purge


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


@dataclass(frozen=True)
class Member(admin.MemberView, Readable):
    """A member of a project, and their role in it."""


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


@dataclass(frozen=True)
class ClosedStudy(purge.ClosedStudy, Readable):
    """A cached study no one may read any more, and why."""


class PurgeReport(Reply):
    """Closed studies (deleted if ``applied``), those left for next time because they are being retrieved,
    and the totals."""

    applied: bool
    studies: list[ClosedStudy]
    bytes: int
    busy: list[ClosedStudy]
    projects: int


@dataclass(frozen=True)
class AuditEventRow(ChainedEvent, Readable):
    """One event of the audit trail, as it was hashed into the chain (``detail`` is its canonical JSON text)."""


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
