"""The simple DICOM image viewer (the paper's Tab 4): browse, render, read tags.

Two libraries answer the same questions in the same shapes, so one browser
page serves both:

- ``CacheViewer``: a project's cached studies, for its members while the
  project's data policy keeps reads open (`services.data_access`, the same
  door as downloads and DICOMweb), over the HTTP API;
- ``LocalLibrary``: a download folder on the researcher's own machine, for
  ``mi2b2 view``; encrypted downloads are decrypted into memory only.

Auditing. Looking at images is recorded as one ``view`` event per user and
study, when the study is first opened (its series listed, a tag panel read or
a frame rendered, whichever comes first), and again only after
``VIEW_AUDIT_HOURS`` - roughly one event per reading session. One event per
frame would bury the trail under thousands of identical rows per scroll; none
would hide who saw what. The memory of what was recorded is per process: a
server restart or a second API process may record a study again, never less.
The local viewer records nothing: it shows files the user already holds, whose
download was audited.

A de-identified project is shown de-identified, as its downloads and DICOMweb
show it: the same pseudonymous UIDs (in URLs too), patient pseudonyms and
de-identified values in the tree, labels and tag panel; frames are rendered
from the stored pixel data (which the profile leaves as it is), except for
images that may show identifiers in their pixels, which are not listed and
are refused by name. Its view events record the policy and profile applied.
"""

from __future__ import annotations

import threading
from collections import OrderedDict, defaultdict
from collections.abc import Hashable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import func, select

from mi2b2.adapters.db.tables import CachedInstance, CachedStudy
from mi2b2.adapters.dicom.deidentify import Deidentified
from mi2b2.adapters.dicom.files import InstanceHeader, parse_instance_header
from mi2b2.adapters.dicom.render import (
    PRESETS,
    FrameCache,
    Rendered,
    UnrenderableImage,
    decode_frame,
    describe,
    quiet,
    read_dataset,
    render_frame,
)
from mi2b2.adapters.storage.cache_files import UID
from mi2b2.domain.clock import Clock
from mi2b2.domain.governance import DataUse
from mi2b2.domain.principal import Principal
from mi2b2.errors import InvalidInput, NotFound
from mi2b2.services.audit import Action
from mi2b2.services.cache.reads import cache_store
from mi2b2.services.context import ServiceContext
from mi2b2.services.data_access import patient_still_allowed, require_patients_allowed, require_use
from mi2b2.services.export.pseudonymous import (
    INSTANCE,
    STUDY,
    DeidReads,
    deid_reads,
    hand_out,
    outcome,
    resolve,
    risk_of,
    values_of,
    withheld_message,
)

VIEW_AUDIT_HOURS = 8
HEAD_BYTES = 64 * 1024  # enough for the header of nearly every file (see adapters/dicom/files.py)
_SERIES_TAGS = ["SeriesNumber", "SeriesDescription", "Modality", "NumberOfFrames"]


# --- shapes shared by both libraries ----------------------------------------------------------


@dataclass(frozen=True)
class InstanceEntry:
    patient_id: str
    patient_name: str
    study_uid: str
    accession: str
    study_date: str
    study_description: str
    modality: str
    series_uid: str
    sop_uid: str
    sop_class_uid: str
    instance_number: int | None


@dataclass(frozen=True)
class SeriesLabel:
    number: int | None
    description: str
    modality: str
    frames: int | None  # of the instance the label was read from


def presets() -> list[dict[str, Any]]:
    return [{"key": p.key, "label": p.label, **p.window.as_dict()} for p in PRESETS.values()]


def _instance_sort(entry: InstanceEntry) -> tuple[int, int, str]:
    number = entry.instance_number
    return (0 if number is not None else 1, number or 0, entry.sop_uid)


def study_json(study: dict[str, Any], instances: list[InstanceEntry], labels: dict[str, SeriesLabel]) -> dict[str, Any]:
    by_series: dict[str, list[InstanceEntry]] = defaultdict(list)
    for entry in instances:
        by_series[entry.series_uid].append(entry)
    series = []
    for series_uid, members in by_series.items():
        label = labels.get(series_uid) or SeriesLabel(None, "", members[0].modality, None)
        members.sort(key=_instance_sort)
        series.append({
            "series_uid": series_uid, "series_number": label.number, "description": label.description,
            "modality": label.modality, "instance_count": len(members),
            "instances": [{"sop_uid": m.sop_uid, "instance_number": m.instance_number,
                           "sop_class_uid": m.sop_class_uid} for m in members],
        })
    series.sort(key=lambda s: (s["series_number"] is None, s["series_number"] or 0, s["series_uid"]))
    return {**study, "series": series}


def frame_headers(rendered: Rendered) -> dict[str, str]:
    """What a viewer needs besides the pixels: the window applied (to drag from) and the frame count."""
    headers = {"X-Frames": str(rendered.frame_count), "X-Rows": str(rendered.rows),
               "X-Columns": str(rendered.columns)}
    if rendered.window is not None:
        window = rendered.window.as_dict()
        headers["X-Window-Center"] = str(window["center"])
        headers["X-Window-Width"] = str(window["width"])
    return headers


def check_uid(value: str, what: str) -> str:
    if len(value) > 64 or not UID.match(value):
        raise InvalidInput(f"{what} {value!r} is not a DICOM UID (digits and dots, at most 64 characters)")
    return value


def frame_index(number: int) -> int:
    """Frames are numbered from 1 in URLs, as in DICOMweb."""
    if number < 1:
        raise InvalidInput("frames are numbered from 1")
    return number - 1


class OnceLog:
    """Whether a key was seen within the last ``hours`` (thread-safe, bounded, in memory)."""

    def __init__(self, clock: Clock, hours: float = VIEW_AUDIT_HOURS, max_keys: int = 100_000) -> None:
        self._clock = clock
        self._window = hours * 3600
        self._max = max_keys
        self._seen: OrderedDict[Hashable, float] = OrderedDict()
        self._lock = threading.Lock()

    def first(self, key: Hashable) -> bool:
        """True (and remembered) if ``key`` was not seen within the window."""
        now = self._clock.monotonic()
        with self._lock:
            last = self._seen.get(key)
            if last is not None and now - last < self._window:
                return False
            self._seen[key] = now
            self._seen.move_to_end(key)
            while len(self._seen) > self._max:
                self._seen.popitem(last=False)
            return True


# --- the project cache ------------------------------------------------------------------------


@dataclass(frozen=True)
class Located:
    project_id: str
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    relative_path: str


class CacheViewer:
    """The viewer over a project's cache; one per API process (it holds the frame memory)."""

    def __init__(self, ctx: ServiceContext, frame_cache_bytes: int = 256 * 1024 * 1024) -> None:
        self.ctx = ctx
        self.frames = FrameCache(frame_cache_bytes)
        self.audited = OnceLog(ctx.clock)
        self._places: OrderedDict[tuple[str, str], Located] = OrderedDict()
        self._places_lock = threading.Lock()

    # browsing ----------------------------------------------------------------------------------

    def tree(self, who: Principal, project_id: str) -> dict[str, Any]:
        """Patients > studies of the cache; series and images come with ``study``."""
        require_use(self.ctx, who, project_id, DataUse.READ, "view the cache")
        reads = deid_reads(self.ctx, project_id)
        with self.ctx.sessions() as session:
            per_study = {study_id: (int(count), path) for study_id, count, path in session.execute(
                select(CachedInstance.cached_study_id, func.count(func.distinct(CachedInstance.series_uid)),
                       func.min(CachedInstance.relative_path))
                .join(CachedStudy, CachedStudy.id == CachedInstance.cached_study_id)
                .where(CachedStudy.project_id == project_id).group_by(CachedInstance.cached_study_id)
            ).all()}
            rows = session.scalars(
                select(CachedStudy).where(CachedStudy.project_id == project_id, patient_still_allowed())
                .order_by(CachedStudy.patient_id, CachedStudy.study_date.desc(), CachedStudy.study_uid)
            ).all()
        store = cache_store(self.ctx)
        patients: dict[str, dict[str, Any]] = {}
        for row in rows:
            series_count, path = per_study.get(row.id, (0, None))
            summary = _summary(row) if reads is None else _deidentified_summary(
                reads, row, store.absolute(path) if path else None)
            patient = patients.setdefault(summary["patient_id"], {"patient_id": summary["patient_id"],
                                                                  "patient_name": summary["patient_name"],
                                                                  "studies": []})
            patient["patient_name"] = patient["patient_name"] or summary["patient_name"]
            patient["studies"].append({
                "study_uid": summary["study_uid"], "accession": summary["accession"],
                "study_date": summary["study_date"], "description": summary["description"],
                "modalities": row.modalities, "instance_count": row.instance_count, "series_count": series_count,
            })
        listed = list(patients.values())
        if reads is not None:  # in pseudonym order, so the order tells nothing of the hospital's IDs
            listed.sort(key=lambda p: p["patient_id"])
            for patient in listed:
                patient["studies"].sort(key=lambda s: (s["study_date"], s["study_uid"]), reverse=True)
        return {"project_id": project_id, "patients": listed, "presets": presets()}

    def study(self, who: Principal, project_id: str, study_uid: str) -> dict[str, Any]:
        check_uid(study_uid, "StudyInstanceUID")
        operation = "view a cached study"
        require_use(self.ctx, who, project_id, DataUse.READ, operation)
        reads = deid_reads(self.ctx, project_id)
        named = study_uid
        if reads is not None:
            study_uid = resolve(self.ctx, who, reads, STUDY, study_uid, operation).original
        require_patients_allowed(self.ctx, who, project_id, [study_uid], operation)
        with self.ctx.sessions() as session:
            study = session.scalar(
                select(CachedStudy).where(CachedStudy.project_id == project_id, CachedStudy.study_uid == study_uid)
            )
            if study is None:
                raise NotFound(f"study {named} is not in the cache of project {project_id!r}")
            rows = session.execute(
                select(CachedInstance.series_uid, CachedInstance.sop_instance_uid, CachedInstance.sop_class_uid,
                       CachedInstance.instance_number, CachedInstance.relative_path)
                .where(CachedInstance.cached_study_id == study.id)
            ).all()
            summary = _summary(study)
            patient_id = study.patient_id
        first_path: dict[str, str] = {}
        for series, _sop, _class, _number, path in sorted(rows, key=lambda r: (r[3] is None, r[3] or 0)):
            first_path.setdefault(series, path)
        store = cache_store(self.ctx)
        shown: list[tuple[str, str, str, int | None, str]] = [(r[0], r[1], r[2], r[3], r[4]) for r in rows]
        if reads is None:
            labels = {series: _series_label(store.absolute(path)) for series, path in first_path.items()}
        else:
            summary = _deidentified_summary(reads, study, store.absolute(min(r[4] for r in rows)) if rows else None)
            shown, labels = _deidentified_rows(reads, shown, {s: store.absolute(p) for s, p in first_path.items()})
        entries = [
            InstanceEntry(summary["patient_id"], summary["patient_name"], summary["study_uid"], summary["accession"],
                          summary["study_date"], summary["description"], "", series, sop, sop_class, number)
            for series, sop, sop_class, number, _path in shown
        ]
        self._viewed(who, project_id, patient_id, study_uid, "study", reads, store.absolute(first_path[
            next(iter(first_path))]) if first_path else None)
        return {"project_id": project_id, **study_json(summary, entries, labels)}

    def tags(self, who: Principal, project_id: str, sop_uid: str) -> dict[str, Any]:
        reads = deid_reads(self.ctx, project_id)
        place = self._locate(who, project_id, sop_uid, "read an image's tags", reads)
        path = self._path(place)
        if reads is None:
            described = describe(path)
            study_uid, series_uid = place.study_uid, place.series_uid
        else:
            made = outcome(reads.engine, path)
            if not isinstance(made, Deidentified):
                raise NotFound(withheld_message(sop_uid, made.reason if made else "its file is missing"))
            # The image's facts (size, frames, syntax, window) from the stored file, whose pixel data the
            # copy keeps; the tags from the de-identified header alone, so no pixel data is read for them.
            described = {**describe(path), "tags": describe(made.header)["tags"]}
            study_uid, series_uid = reads.uid(place.study_uid), reads.uid(place.series_uid)
        self._viewed(who, project_id, place.patient_id, place.study_uid, "tags", reads, path)
        return {"sop_uid": sop_uid, "study_uid": study_uid, "series_uid": series_uid, **described}

    def frame(self, who: Principal, project_id: str, sop_uid: str, number: int, center: float | None = None,
              width: float | None = None, preset: str | None = None) -> Rendered:
        index = frame_index(number)
        reads = deid_reads(self.ctx, project_id)
        place = self._locate(who, project_id, sop_uid, "view an image", reads)
        path = self._path(place)
        if reads is not None and (risk := risk_of(reads, path)):
            raise NotFound(withheld_message(sop_uid, risk))
        stat = path.stat()
        key = ("cache", place.relative_path, stat.st_mtime_ns, stat.st_size, index)
        decoded = self.frames.get(key)
        if decoded is None:
            decoded = decode_frame(path, index)
            self.frames.put(key, decoded)
        rendered = render_frame(decoded, center, width, preset)
        self._viewed(who, project_id, place.patient_id, place.study_uid, "image", reads, path)
        return rendered

    # helpers -----------------------------------------------------------------------------------

    def _locate(self, who: Principal, project_id: str, sop_uid: str, operation: str,
                reads: DeidReads | None) -> Located:
        """Where an image is; a de-identified project's is named by its pseudonym, found back first."""
        check_uid(sop_uid, "SOPInstanceUID")
        # Every time: membership, the IRB and the allow-list can change while a study is open.
        require_use(self.ctx, who, project_id, DataUse.READ, operation)
        named = sop_uid
        if reads is not None:
            sop_uid = resolve(self.ctx, who, reads, INSTANCE, sop_uid, operation).original
        with self._places_lock:
            known = self._places.get((project_id, sop_uid))
            if known is not None:
                self._places.move_to_end((project_id, sop_uid))
        if known is not None:
            require_patients_allowed(self.ctx, who, project_id, [known.study_uid], operation)
            return known
        # SOP UIDs are not indexed on their own; remembering where each lives keeps
        # window dragging and scrolling from scanning the instance table per frame.
        with self.ctx.sessions() as session:
            found = session.execute(
                select(CachedStudy.patient_id, CachedStudy.study_uid, CachedInstance.series_uid,
                       CachedInstance.relative_path)
                .join(CachedStudy, CachedStudy.id == CachedInstance.cached_study_id)
                .where(CachedStudy.project_id == project_id, CachedInstance.sop_instance_uid == sop_uid)
                .limit(1)
            ).first()
        if found is None:
            raise NotFound(f"image {named} is not in the cache of project {project_id!r}")
        place = Located(project_id, found[0], found[1], found[2], sop_uid, found[3])
        require_patients_allowed(self.ctx, who, project_id, [place.study_uid], operation)
        with self._places_lock:
            self._places[(project_id, sop_uid)] = place
            while len(self._places) > 50_000:
                self._places.popitem(last=False)
        return place

    def _path(self, place: Located) -> Path:
        path = cache_store(self.ctx).absolute(place.relative_path)
        if not path.is_file():
            with self._places_lock:
                self._places.pop((place.project_id, place.sop_uid), None)
            raise NotFound(f"image {place.sop_uid} is indexed but its file is missing from the cache; "
                           "an admin can reconcile the two with `mi2b2 admin fsck --repair`")
        return path

    def _viewed(self, who: Principal, project_id: str, patient_id: str, study_uid: str, first: str,
                reads: DeidReads | None = None, path: Path | None = None) -> None:
        if self.audited.first((who.login, project_id, study_uid)):
            # A view changes nothing in the database, so its audit row is a transaction of its own,
            # committed before the image leaves.
            detail: dict[str, Any] = {"via": "viewer", "first": first, "again_after_hours": VIEW_AUDIT_HOURS}
            if reads is not None:
                detail.update(reads.audit_detail())
                hand_out(self.ctx, reads, [(study_uid, path)])
            self.ctx.audit.record(who, Action.VIEW, project_id=project_id, patient_id=patient_id,
                                  study_uid=study_uid, detail=detail)


def _summary(study: CachedStudy) -> dict[str, Any]:
    return {"study_uid": study.study_uid, "patient_id": study.patient_id, "patient_name": study.patient_name,
            "accession": study.accession, "study_date": study.study_date, "description": study.description,
            "modalities": study.modalities}


def _deidentified_summary(reads: DeidReads, study: CachedStudy, path: Path | None) -> dict[str, Any]:
    """A study as a de-identified project shows it: values from a de-identified header of one of its files."""
    ds = values_of(reads, path) if path is not None else None
    with quiet():
        def text(keyword: str) -> str:
            return str(ds.get(keyword, "") or "") if ds is not None else ""

        return {"study_uid": reads.uid(study.study_uid), "patient_id": text("PatientID") or "(unreadable)",
                "patient_name": text("PatientName"), "accession": text("AccessionNumber"),
                "study_date": text("StudyDate"), "description": text("StudyDescription"),
                "modalities": study.modalities}


def _deidentified_rows(reads: DeidReads, rows: list[tuple[str, str, str, int | None, str]], first_paths: dict[str, Path]
                       ) -> tuple[list[tuple[str, str, str, int | None, str]], dict[str, SeriesLabel]]:
    """A study's images under their pseudonyms, and its series' labels from de-identified headers; a series
    whose first image may show identifiers in its pixels is not listed (its images are refused by name)."""
    shown = {series for series, path in first_paths.items() if not risk_of(reads, path)}
    labels = {reads.uid(series): _label_of(values_of(reads, first_paths[series])) for series in shown}
    listed = [(reads.uid(series), reads.uid(sop), sop_class, number, path)
              for series, sop, sop_class, number, path in rows if series in shown]
    return listed, labels


def _label_of(ds: Dataset | None) -> SeriesLabel:
    if ds is None:
        return SeriesLabel(None, "", "", None)
    with quiet():
        return SeriesLabel(_whole(ds.get("SeriesNumber")), str(ds.get("SeriesDescription", "") or ""),
                           str(ds.get("Modality", "") or ""), _whole(ds.get("NumberOfFrames")) or 1)


def _series_label(source: Path | bytes) -> SeriesLabel:
    with quiet():  # values are converted on access; pydicom's warnings would quote them
        try:
            ds: Dataset
            if isinstance(source, Path):
                ds = dcmread(source, stop_before_pixels=True, specific_tags=_SERIES_TAGS)
            else:
                ds = read_dataset(source, stop_before_pixels=True)
        except (UnrenderableImage, OSError, ValueError, EOFError, KeyError, TypeError):
            return SeriesLabel(None, "", "", None)
        return SeriesLabel(_whole(ds.get("SeriesNumber")), str(ds.get("SeriesDescription", "") or ""),
                           str(ds.get("Modality", "") or ""), _whole(ds.get("NumberOfFrames")) or 1)


def _whole(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


# --- a download folder on the researcher's machine ----------------------------------------------


class DownloadSource(Protocol):
    """What ``mi2b2 view`` needs from a download: its entries (opaque, hashable) and their bytes.

    ``services.export.reader.DownloadReader`` is one (plain or encrypted, folder
    or ZIP); ``PlainFolder`` is another, for folders of DICOM files not made by
    mi2b2. A source may also offer ``head(entry, size)``: the first bytes only."""

    def entries(self) -> Iterable[Any]: ...

    def read(self, entry: Any) -> bytes: ...


class PlainFolder:
    """A download that is a plain folder of DICOM files (any layout, any names)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()
        if not self.root.is_dir():
            raise InvalidInput(f"{root} is not a folder; give the folder a download was saved to")

    def entries(self) -> Iterator[str]:
        for path in sorted(self.root.rglob("*")):
            relative = path.relative_to(self.root)
            if path.is_file() and not any(part.startswith(".") for part in relative.parts):
                yield relative.as_posix()

    def _path(self, entry: str) -> Path:
        path = (self.root / entry).resolve()
        if self.root not in path.parents:
            raise NotFound(f"{entry!r} is not in this download")
        return path

    def read(self, entry: str) -> bytes:
        try:
            return self._path(entry).read_bytes()
        except OSError as exc:
            raise NotFound(f"{entry} cannot be read ({exc.strerror or type(exc).__name__})") from None

    def head(self, entry: str, size: int) -> bytes:
        """The first bytes only: indexing a large plain folder need not read every image whole."""
        try:
            with open(self._path(entry), "rb") as file:
                return file.read(size)
        except OSError as exc:
            raise NotFound(f"{entry} cannot be read ({exc.strerror or type(exc).__name__})") from None


class LocalLibrary:
    """An in-memory index of a download, answering like ``CacheViewer`` (without access checks or audit:
    the person at the keyboard holds the files, and the local server admits only its token)."""

    def __init__(self, source: DownloadSource, frame_cache_bytes: int = 256 * 1024 * 1024) -> None:
        self.source = source
        self.frames = FrameCache(frame_cache_bytes)
        self.instances: dict[str, InstanceEntry] = {}
        self._entry_of: dict[str, Any] = {}
        self.skipped = 0
        self._labels: dict[str, SeriesLabel] = {}
        self._labels_lock = threading.Lock()
        for entry in source.entries():
            header = self._header(entry)
            if header is None:
                self.skipped += 1  # DICOMDIR, a manifest, anything not an instance
                continue
            self.instances[header.sop_instance_uid] = InstanceEntry(
                header.patient_id, header.patient_name, header.study_uid, header.accession, header.study_date,
                header.study_description, header.modality, header.series_uid, header.sop_instance_uid,
                header.sop_class_uid, header.instance_number,
            )
            self._entry_of[header.sop_instance_uid] = entry

    def _header(self, entry: Any) -> InstanceHeader | None:
        head_of = getattr(self.source, "head", None)
        data = head_of(entry, HEAD_BYTES) if head_of is not None else self.source.read(entry)
        header = parse_instance_header(data)
        if header is not None:
            return header
        if head_of is not None:
            data = self.source.read(entry)
        with quiet():
            try:
                ds = read_dataset(data, stop_before_pixels=True)
            except UnrenderableImage:
                return None
            return _header_of(ds)

    def tree(self) -> dict[str, Any]:
        studies: dict[str, list[InstanceEntry]] = defaultdict(list)
        for entry in self.instances.values():
            studies[entry.study_uid].append(entry)
        patients: dict[str, dict[str, Any]] = {}
        for study_uid, members in sorted(studies.items(), key=lambda kv: (kv[1][0].patient_id, kv[1][0].study_date)):
            first = members[0]
            patient = patients.setdefault(first.patient_id, {"patient_id": first.patient_id,
                                                             "patient_name": first.patient_name, "studies": []})
            patient["studies"].append({
                "study_uid": study_uid, "accession": first.accession, "study_date": first.study_date,
                "description": first.study_description,
                "modalities": "\\".join(sorted({m.modality for m in members if m.modality})),
                "instance_count": len(members), "series_count": len({m.series_uid for m in members}),
            })
        return {"project_id": None, "patients": list(patients.values()), "presets": presets(),
                "skipped_files": self.skipped}

    def study(self, study_uid: str) -> dict[str, Any]:
        check_uid(study_uid, "StudyInstanceUID")
        members = [e for e in self.instances.values() if e.study_uid == study_uid]
        if not members:
            raise NotFound(f"study {study_uid} is not in this download")
        first = members[0]
        summary = {"study_uid": study_uid, "patient_id": first.patient_id, "patient_name": first.patient_name,
                   "accession": first.accession, "study_date": first.study_date,
                   "description": first.study_description,
                   "modalities": "\\".join(sorted({m.modality for m in members if m.modality}))}
        labels = {}
        for member in sorted(members, key=_instance_sort):
            if member.series_uid not in labels:
                labels[member.series_uid] = self._label(member)
        return {"project_id": None, **study_json(summary, members, labels)}

    def _label(self, member: InstanceEntry) -> SeriesLabel:
        with self._labels_lock:
            known = self._labels.get(member.series_uid)
        if known is None:
            known = _series_label(self.source.read(self._entry_of[member.sop_uid]))
            with self._labels_lock:
                self._labels[member.series_uid] = known
        return known

    def _entry(self, sop_uid: str) -> Any:
        check_uid(sop_uid, "SOPInstanceUID")
        entry = self._entry_of.get(sop_uid)
        if entry is None:
            raise NotFound(f"image {sop_uid} is not in this download")
        return entry

    def tags(self, sop_uid: str) -> dict[str, Any]:
        entry = self._entry(sop_uid)
        member = self.instances[sop_uid]
        return {"sop_uid": sop_uid, "study_uid": member.study_uid, "series_uid": member.series_uid,
                **describe(self.source.read(entry))}

    def frame(self, sop_uid: str, number: int, center: float | None = None, width: float | None = None,
              preset: str | None = None) -> Rendered:
        index = frame_index(number)
        entry = self._entry(sop_uid)
        key = ("local", entry, index)
        decoded = self.frames.get(key)
        if decoded is None:
            decoded = decode_frame(self.source.read(entry), index)
            self.frames.put(key, decoded)
        return render_frame(decoded, center, width, preset)


def _header_of(ds: Any) -> InstanceHeader | None:
    """The identifiers of a file the fast header parser could not read (pydicom read it instead)."""
    if not (ds.get("SOPInstanceUID") and ds.get("StudyInstanceUID") and ds.get("SeriesInstanceUID")):
        return None
    meta = getattr(ds, "file_meta", None)
    return InstanceHeader(
        sop_class_uid=str(ds.get("SOPClassUID", "") or ""), sop_instance_uid=str(ds.SOPInstanceUID),
        study_uid=str(ds.StudyInstanceUID), series_uid=str(ds.SeriesInstanceUID),
        patient_id=str(ds.get("PatientID", "") or ""), patient_name=str(ds.get("PatientName", "") or ""),
        accession=str(ds.get("AccessionNumber", "") or ""), study_date=str(ds.get("StudyDate", "") or ""),
        study_description=str(ds.get("StudyDescription", "") or ""), modality=str(ds.get("Modality", "") or ""),
        series_number=_whole(ds.get("SeriesNumber")), instance_number=_whole(ds.get("InstanceNumber")),
        transfer_syntax=str(meta.get("TransferSyntaxUID", "")) if meta is not None else "",
    )


def open_local(path: Path, passphrase: str | None = None, identities: Iterable[str | Path] = ()) -> DownloadSource:
    """The download at ``path`` as a source: mi2b2's reader for ZIPs and encrypted downloads (decrypting
    into memory only), a ``PlainFolder`` for any other folder, so DICOM files of any name are found."""
    from mi2b2.services.export.layout import MANIFEST
    from mi2b2.services.export.reader import open_download

    where = Path(path)
    keys = list(identities)
    if where.is_dir() and not (where / MANIFEST).is_file():
        if passphrase is not None or keys:
            raise InvalidInput(f"{where} is not an encrypted download (it has no {MANIFEST}); "
                               "open it without --passphrase or --identity")
        return PlainFolder(where)
    return open_download(where, passphrase, keys)
