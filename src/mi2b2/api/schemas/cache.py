"""Answers about a project's cache, its downloads, the cache check, and notifications."""

from __future__ import annotations

from pydantic.dataclasses import dataclass

from mi2b2.api.schemas.common import Readable, Reply, Timestamp
from mi2b2.services import cache, notifications


@dataclass(frozen=True)
class Usage(cache.Usage, Readable):
    """A project's quota, what its cache holds, what running retrievals have reserved, and what is free."""


@dataclass(frozen=True)
class CachedStudy(cache.CachedStudyView, Readable):
    """A study in the project's cache: who fetched it, who last downloaded it, and why it is closed, if it is."""

    fetched_at: Timestamp | None
    last_downloaded_at: Timestamp | None


class ProjectCache(Reply):
    usage: Usage
    studies: list[CachedStudy]


@dataclass(frozen=True)
class SeriesSize(cache.SeriesView, Readable):
    """A cached series: how many instances, how many bytes."""


class StudyDetail(Reply):
    project_id: str
    study: CachedStudy
    series_count: int
    series: list[SeriesSize]


@dataclass(frozen=True)
class DeleteReport(cache.DeleteReport, Readable):
    """What was deleted from a project's cache, what was not there, and the cache's usage after."""

    usage: Usage


@dataclass(frozen=True)
class SizeMismatch(cache.SizeMismatch, Readable):
    """A cached file whose size on disk is not the indexed one."""


@dataclass(frozen=True)
class AggregateMismatch(cache.AggregateMismatch, Readable):
    """A cached study whose counts do not add up to its instances."""


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
    server_encrypts: bool = False  # encrypted_only: send the encryption with each fetch, receive age files


@dataclass(frozen=True)
class Notification(notifications.NotificationView, Readable):
    created_at: Timestamp
    read_at: Timestamp | None
    emailed_at: Timestamp | None


class MarkedRead(Reply):
    marked: int
