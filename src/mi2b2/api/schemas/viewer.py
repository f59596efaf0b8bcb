"""Answers of the image viewer: the cache as patients and studies, a study's images, an image's tags."""

from __future__ import annotations

from mi2b2.api.schemas.common import Reply

# A window's centre and width: whole numbers stay whole ("40", not "40.0"), as the renderer gives them.
Level = int | float


class WindowPreset(Reply):
    key: str
    label: str
    center: Level
    width: Level


class TreeStudy(Reply):
    study_uid: str
    accession: str
    study_date: str
    description: str
    modalities: str
    instance_count: int
    series_count: int


class TreePatient(Reply):
    patient_id: str
    patient_name: str
    studies: list[TreeStudy]


class Tree(Reply):
    """Patients and their studies, and the window presets, of a project's cache or of a download."""

    project_id: str | None
    patients: list[TreePatient]
    presets: list[WindowPreset]


class ViewerTree(Tree):
    project_id: str


class LocalViewerTree(Tree):
    """The tree of a download ``mi2b2 view`` shows: no project, and how many files were not images."""

    project_id: None
    skipped_files: int


class ViewerInstance(Reply):
    sop_uid: str
    instance_number: int | None
    sop_class_uid: str


class ViewerSeries(Reply):
    series_uid: str
    series_number: int | None
    description: str
    modality: str
    instance_count: int
    instances: list[ViewerInstance]


class Study(Reply):
    """A study's series and their images, in order, from a project's cache or from a download."""

    project_id: str | None
    study_uid: str
    patient_id: str
    patient_name: str
    accession: str
    study_date: str
    description: str
    modalities: str
    series: list[ViewerSeries]


class ViewerStudy(Study):
    project_id: str


class LocalViewerStudy(Study):
    project_id: None


class TagValue(Reply):
    tag: str
    keyword: str
    name: str
    value: str


class Window(Reply):
    center: Level
    width: Level


class ImageFacts(Reply):
    frames: int
    rows: int | None
    columns: int | None
    samples_per_pixel: int | None
    photometric: str
    bits_allocated: int | None
    bits_stored: int | None
    signed: bool
    transfer_syntax_uid: str
    transfer_syntax: str
    sop_class_uid: str
    sop_class: str
    has_pixels: bool
    file_window: Window | None


class ImageTags(Reply):
    sop_uid: str
    study_uid: str
    series_uid: str
    tags: list[TagValue]
    image: ImageFacts
