"""Answers about a project's cache, its downloads, the cache check, and notifications."""

from __future__ import annotations

from mi2b2.api.schemas.common import Reply, Timestamp


class Usage(Reply):
    project_id: str
    quota_bytes: int
    used_bytes: int
    in_flight_bytes: int
    free_bytes: int
    over_quota: bool
    study_count: int


class CachedStudy(Reply):
    study_uid: str
    patient_id: str
    patient_name: str
    accession: str
    study_date: str
    modalities: str
    description: str
    pacs_id: str | None
    instance_count: int
    bytes: int
    fetched_by: str
    fetched_at: Timestamp | None
    last_downloaded_by: str | None
    last_downloaded_at: Timestamp | None
    closed_reason: str | None


class ProjectCache(Reply):
    usage: Usage
    studies: list[CachedStudy]


class SeriesSize(Reply):
    series_uid: str
    instance_count: int
    bytes: int


class StudyDetail(Reply):
    project_id: str
    study: CachedStudy
    series_count: int
    series: list[SeriesSize]


class DeleteReport(Reply):
    project_id: str
    deleted: list[str]
    not_found: list[str]
    bytes_freed: int
    usage: Usage


class SizeMismatch(Reply):
    path: str
    indexed_bytes: int
    disk_bytes: int


class AggregateMismatch(Reply):
    project_id: str
    study_uid: str
    indexed_instances: int
    actual_instances: int
    indexed_bytes: int
    actual_bytes: int


class FsckReport(Reply):
    repair: bool
    missing_files: list[str]
    size_mismatches: list[SizeMismatch]
    orphan_files: list[str]
    wrong_aggregates: list[AggregateMismatch]
    stale_incoming: list[str]
    being_received: list[str]
    rows_dropped: int
    sizes_fixed: int
    orphans_indexed: list[str]
    files_deleted: list[str]
    aggregates_fixed: int
    empty_studies_removed: int
    incoming_removed: int
    differences: int
    counts: dict[str, int]


class ManifestStudy(Reply):
    study_uid: str
    download_id: int
    files: int
    bytes: int


class ManifestFile(Reply):
    path: str
    number: str
    study_uid: str
    series_uid: str
    sop_uid: str
    size: int
    sha256: str


class DownloadManifest(Reply):
    """The files of a download (readable path, size, SHA-256) and a download_id per study."""

    project: str
    created_at: str
    studies: list[ManifestStudy]
    files: list[ManifestFile]
    bytes: int


class Notification(Reply):
    id: int
    kind: str
    project_id: str | None
    batch_id: str | None
    subject: str
    body: str
    created_at: Timestamp
    read_at: Timestamp | None
    emailed_at: Timestamp | None
    email_error: str | None


class MarkedRead(Reply):
    marked: int
