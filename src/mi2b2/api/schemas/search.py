"""Answers of searches, search jobs, and the caller's projects, queries and PACS."""

from __future__ import annotations

from typing import Any

from pydantic.dataclasses import dataclass

from mi2b2.api.schemas.common import Readable, Reply, Timestamp
from mi2b2.services import pacs, search


@dataclass(frozen=True)
class PatientHit(search.PatientHit, Readable):
    """A patient the PACS answered with, on the project's allow-list."""


@dataclass(frozen=True)
class StudyHit(search.StudyHit, Readable):
    """A study the PACS answered with, of a patient on the project's allow-list."""


@dataclass(frozen=True)
class SeriesHit(search.SeriesHit, Readable):
    """A series of a chosen study."""


class InvalidLine(Reply):
    """A pasted line that is no usable identifier, and why."""

    line: int
    value: str
    reason: str


class SearchReport(Reply):
    query_id: int
    kind: str
    patients: list[PatientHit]
    studies: list[StudyHit]
    series: list[SeriesHit]
    refused: list[str]
    not_found: list[str]
    duplicates: list[str]
    invalid: list[InvalidLine]
    not_permitted: list[str]
    capped: dict[str, int]
    warnings: list[str]


class SearchJobTicket(Reply):
    """A search large enough to run as a job (202): where to follow it."""

    job_id: int
    state: str
    total: int
    refused: list[str]
    status_url: str
    results_url: str


class SearchJobStatus(Reply):
    job_id: int
    kind: str
    project: str
    pacs: str
    user: str
    state: str
    done: int
    total: int
    waiting_reason: str | None
    error: str | None
    created_at: Timestamp
    ended_at: Timestamp | None


class SearchJobResults(SearchJobStatus):
    """The job's status and what it found so far."""

    query_ids: list[int]
    patients: list[PatientHit]
    studies: list[StudyHit]
    series: list[SeriesHit]
    capped: dict[str, int]
    duplicates: list[str]
    invalid: list[InvalidLine]
    refused: list[str]
    not_found: list[str]
    not_permitted: list[str]
    warnings: list[str]


class ProjectHeading(Reply):
    """A project as both its members and the site admin see it first: its IRB approval and whether it still runs."""

    id: str
    title: str
    irb: str
    expires: str
    expired: bool
    active: bool


class MyProject(ProjectHeading):
    role: str
    data_policy: str
    export: str = "identified"  # or "deidentified": every door out de-identifies or refuses
    encrypted_only: bool = False
    institutions: list[str]
    quota_bytes: int
    max_studies_per_patient: int | None


class QueryRow(Reply):
    id: int
    user: str
    pacs: str
    kind: str
    keys: dict[str, Any]
    result_count: int
    refused_count: int
    created_at: Timestamp


@dataclass(frozen=True)
class EchoReport(pacs.EchoReport, Readable):
    """Whether the PACS answered a C-ECHO, how fast, or why not."""


class PacsRow(Reply):
    id: str
    name: str
    institution: str
    institution_name: str
    department: str
    department_name: str
    ae_title: str
    retrieve: str
    echo: EchoReport | None
