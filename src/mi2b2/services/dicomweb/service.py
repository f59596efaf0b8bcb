"""The DICOMweb service: every QIDO-RS and WADO-RS door, who may pass it, and what is audited.

Each door checks first: the project's read rule (`data_access.require_use`)
and, for studies named exactly, that their patients are still on the
allow-list; then it reads (`records`), matches (`matching`), negotiates
(`negotiation`) and frames the answer (`multipart`).

Audit. Reading through DICOMweb is audited like the viewer and downloads,
with ``"via": "dicomweb"``: a study search is one ``view`` event; series and
instance searches and metadata one ``view`` per user and study per
``VIEW_AUDIT_HOURS``; a study or series retrieve one ``download`` event each
(with counts and stored bytes); instance and frame retrieves - which a viewer issues
by the hundred - one ``download`` per user and study per ``VIEW_AUDIT_HOURS``.

A de-identified project (``export = "deidentified"``) is served de-identified, as its
downloads are: URLs and answers carry its pseudonymous UIDs (resolved back through
``services.export.pseudonymous``), searches match and answer de-identified values,
metadata and instances are the download's de-identified copies, and instances that
may show identifiers in their pixels are left out, or refused by name. Its audit
events record the policy and profile applied.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from sqlalchemy import update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedStudy
from mi2b2.adapters.dicom.deidentify import Deidentified, Withheld
from mi2b2.adapters.dicom.dicom_json import metadata_json, read_header, search_json, stored_transfer_syntax
from mi2b2.adapters.dicom.frames import read_frames
from mi2b2.adapters.dicom.transcode import ConversionFailed, why_not_convertible
from mi2b2.domain.governance import DataUse
from mi2b2.domain.principal import Principal
from mi2b2.errors import NotFound
from mi2b2.services.audit import Action
from mi2b2.services.context import ServiceContext
from mi2b2.services.data_access import require_patients_allowed, require_use
from mi2b2.services.dicomweb.deidentified import original, pseudonymous, served
from mi2b2.services.dicomweb.multipart import Multipart, OutgoingFile, files_answer, parts_answer
from mi2b2.services.dicomweb.negotiation import (
    AS_STORED,
    NotAcceptable,
    WantedSyntaxes,
    answer_syntax,
    frame_media_type,
)
from mi2b2.services.dicomweb.query import Query, exact_uids, frame_numbers
from mi2b2.services.dicomweb.records import (
    INSTANCE_DEFAULT,
    SERIES_DEFAULT,
    SERIES_LEVEL,
    SERIES_MORE,
    STUDY_DEFAULT,
    STUDY_INDEXED,
    STUDY_LEVEL,
    STUDY_MORE,
    CachedFile,
    Record,
    cached_files,
    instance_records,
    passes,
    series_records,
    study_records,
)
from mi2b2.services.export.pseudonymous import (
    INSTANCE,
    SERIES,
    STUDY,
    DeidReads,
    deid_reads,
    hand_out,
    header_of,
    outcome,
    resolve,
    resolve_all,
    withheld_message,
)
from mi2b2.services.viewer import VIEW_AUDIT_HOURS, OnceLog, check_uid


@dataclass(frozen=True)
class Retrieval:
    content_type: str
    body: Iterator[bytes]
    parts: int
    bytes: int

    @classmethod
    def of(cls, answer: Multipart, parts: int, size: int) -> Retrieval:
        return cls(answer.content_type, answer.body, parts, size)


@dataclass(frozen=True)
class SearchResult:
    items: list[dict[str, Any]]
    warnings: tuple[str, ...] = ()


class DicomWeb:
    """QIDO-RS and WADO-RS for one API process (it remembers what it audited)."""

    def __init__(self, ctx: ServiceContext) -> None:
        self.ctx = ctx
        self.audited = OnceLog(ctx.clock)

    # search ---------------------------------------------------------------------------------------

    def search_studies(self, who: Principal, project_id: str, query: Query, base: str) -> SearchResult:
        reads = self._may_search(who, project_id, query.filters.get("StudyInstanceUID"))
        if "Modality" in query.filters and "ModalitiesInStudy" not in query.filters:
            # Modality is a series attribute; at study level it can only mean "a series of this modality".
            filters = dict(query.filters)
            filters["ModalitiesInStudy"] = filters.pop("Modality")
            query = Query(filters, query.include, query.include_all, query.limit, query.offset, query.warnings)
        if reads is None:
            found = study_records(self.ctx, project_id, query.filters, base)
        else:  # never narrowed on the index's identified values: every filter meets the de-identified record
            found = [pseudonymous(r, reads, base) for r in study_records(self.ctx, project_id, {}, base)]
        studies = [s for s in found if passes(s, query.filters)]
        page = query.page(studies)
        extra = sorted(query.include | set(query.filters))
        more = STUDY_MORE if query.include_all else ()
        items = [search_json(s, STUDY_DEFAULT + more, False, extra) for s in page]
        patient = query.filters.get("PatientID") if "*" not in query.filters.get("PatientID", "*") else None
        detail: dict[str, Any] = {"via": "dicomweb", "kind": "search", "level": "study", "filters": query.filters,
                                  "matches": len(studies), "returned": len(page)}
        if reads is not None:
            patient = None  # a pseudonym, not a patient of the hospital
            detail.update(reads.audit_detail())
            hand_out(self.ctx, reads, [(s.study_uid, s.path) for s in page])
        self.ctx.audit.record(who, Action.VIEW, project_id=project_id, patient_id=patient, detail=detail)
        return SearchResult(items, query.warnings)

    def search_series(self, who: Principal, project_id: str, study_uid: str | None, query: Query,
                      base: str) -> SearchResult:
        reads = self._may_search(who, project_id, study_uid or query.filters.get("StudyInstanceUID"))
        filters = dict(query.filters)
        if study_uid is not None:
            filters["StudyInstanceUID"] = check_uid(study_uid, "StudyInstanceUID")
        if reads is None:
            series = series_records(self.ctx, project_id, filters, base, must_exist=study_uid)
        else:
            series = [s for s in self._pseudonymous_series(who, reads, study_uid, base, "search series (DICOMweb)")
                      if served(s, reads)]
        page = query.page([s for s in series if passes(s, filters)])
        extra = sorted(query.include | set(query.filters))
        more = SERIES_MORE if query.include_all else ()
        items = [search_json(s, SERIES_DEFAULT + more, False, extra) for s in page]
        self._viewed(who, project_id, page, "search series", reads)
        return SearchResult(items, query.warnings)

    def search_instances(self, who: Principal, project_id: str, study_uid: str | None, series_uid: str | None,
                         query: Query, base: str) -> SearchResult:
        reads = self._may_search(who, project_id, study_uid or query.filters.get("StudyInstanceUID"))
        filters = dict(query.filters)
        if study_uid is not None:
            filters["StudyInstanceUID"] = check_uid(study_uid, "StudyInstanceUID")
        if series_uid is not None:
            filters["SeriesInstanceUID"] = check_uid(series_uid, "SeriesInstanceUID")
        if reads is None:
            series = series_records(self.ctx, project_id, {k: v for k, v in filters.items() if k in STUDY_INDEXED},
                                    base, must_exist=study_uid)
        else:
            series = self._pseudonymous_series(who, reads, study_uid, base, "search instances (DICOMweb)")
        series_filters = {k: v for k, v in filters.items() if k in STUDY_LEVEL or k in SERIES_LEVEL}
        series = [s for s in series if passes(s, series_filters)]
        if series_uid is not None and not series:
            raise NotFound(f"series {series_uid} is not in the cache of project {project_id!r}")
        rest = {k: v for k, v in filters.items() if k not in series_filters}
        instances = instance_records(self.ctx, [original(s) for s in series])
        if reads is not None:
            instances = [i for i in (pseudonymous(r, reads, base) for r in instances) if served(i, reads)]
        page = query.page([i for i in instances if passes(i, rest)])
        extra = sorted(query.include | set(query.filters))
        items = [search_json(i, INSTANCE_DEFAULT, query.include_all, extra) for i in page]
        self._viewed(who, project_id, page, "search instances", reads)
        return SearchResult(items, query.warnings)

    def _pseudonymous_series(self, who: Principal, reads: DeidReads, study_uid: str | None, base: str,
                             operation: str) -> list[Record]:
        """A de-identified project's series (of one study, named by its pseudonym), as it shows them."""
        narrowed = {}
        if study_uid is not None:
            narrowed["StudyInstanceUID"] = resolve(self.ctx, who, reads, STUDY, study_uid, operation).original
        found = series_records(self.ctx, reads.project_id, narrowed, base, must_exist=study_uid)
        return [pseudonymous(r, reads, base) for r in found]

    # metadata and retrieve ---------------------------------------------------------------------------

    def metadata(self, who: Principal, project_id: str, study_uid: str, series_uid: str | None = None,
                 sop_uid: str | None = None, base: str = "") -> list[dict[str, Any]]:
        reads, files = self._scope(who, project_id, study_uid, series_uid, sop_uid, "read metadata (DICOMweb)")
        items, withheld = [], []
        for file in files:
            url = f"{base}/studies/{_named(reads, file.study_uid)}/series/{_named(reads, file.series_uid)}" \
                  f"/instances/{_named(reads, file.sop_uid)}"
            if reads is None:
                header = read_header(file.path)
                if header is not None:
                    items.append(metadata_json(header, url))
                continue
            made = outcome(reads.engine, file.path)
            if isinstance(made, Withheld):
                withheld.append(made.reason)
            elif made is not None:
                items.append(metadata_json(header_of(made), url))
        if withheld and not items:
            raise NotFound(withheld_message(sop_uid or series_uid or study_uid, withheld[0]))
        self._viewed(who, project_id, files, "metadata", reads)
        return items

    def retrieve(self, who: Principal, project_id: str, study_uid: str, series_uid: str | None = None,
                 sop_uid: str | None = None, wanted: WantedSyntaxes = AS_STORED) -> Retrieval:
        """The instances of a study, series or one instance, as multipart/related application/dicom.

        Every instance's syntax is settled before anything is audited or sent, and the first
        part is made then too, so a refusal (406) comes before the answer starts. A de-identified
        project's instances go out as its downloads have them; burned-in risks are left out."""
        reads, files = self._scope(who, project_id, study_uid, series_uid, sop_uid, "retrieve (DICOMweb)")
        if reads is not None:
            files = self._served(reads, files, sop_uid or series_uid or study_uid)
        outgoing = [OutgoingFile(f.path, _converted(stored_transfer_syntax(f.path), wanted),
                                 None if reads is None else partial(_deidentified, reads, f.path)) for f in files]
        multipart = files_answer(outgoing)
        body = multipart.body
        try:
            first = next(body)
        except ConversionFailed as exc:
            raise NotAcceptable(f"instance {_named(reads, files[0].sop_uid)} cannot be sent as Explicit VR Little "
                                f"Endian: {exc}; ask for it as stored with transfer-syntax=*") from None
        answer = Multipart(multipart.content_type, itertools.chain([first], body))
        total = sum(f.size for f in files)
        level = "instance" if sop_uid else "series" if series_uid else "study"
        self._downloaded(who, project_id, files[0], level, len(files), total, series_uid, once=sop_uid is not None,
                         reads=reads)
        return Retrieval.of(answer, len(files), total)

    def retrieve_frames(self, who: Principal, project_id: str, study_uid: str, series_uid: str, sop_uid: str,
                        frame_list: str, accept: str) -> Retrieval:
        """Frames of one instance: as stored (compressed frames in their own media type) or raw bytes.
        A de-identified project's frames are its stored pixel data, which the profile leaves as it is."""
        numbers = frame_numbers(frame_list)
        reads, found = self._scope(who, project_id, study_uid, series_uid, sop_uid, "retrieve frames (DICOMweb)")
        (file,) = found if reads is None else self._served(reads, found, sop_uid)
        stored = read_frames(file.path, sop_uid)
        bad = [n for n in numbers if n > stored.count]
        if bad:
            raise NotFound(f"frame {bad[0]} does not exist: instance {sop_uid} has {stored.count} frame(s)")
        media = frame_media_type(stored.transfer_syntax, stored.encapsulated, accept)
        size = sum(len(stored.frame(n)) for n in numbers)  # each frame once to check and measure it
        self._downloaded(who, project_id, file, "frames", 1, size, series_uid, once=True, reads=reads)
        part_type = f"{media}; transfer-syntax={stored.transfer_syntax}" if stored.encapsulated else media
        return Retrieval.of(parts_answer(stored.stream(numbers), media, part_type), len(numbers), size)

    def locate(self, who: Principal, project_id: str, study_uid: str, series_uid: str, sop_uid: str) -> None:
        """Check an instance exists in the project's cache, and may be shown (for the rendered resources)."""
        reads, files = self._scope(who, project_id, study_uid, series_uid, sop_uid, "render (DICOMweb)")
        if reads is not None:
            self._served(reads, files, sop_uid)

    # doors -----------------------------------------------------------------------------------------

    def _may_search(self, who: Principal, project_id: str, study_uids: str | None) -> DeidReads | None:
        """The read door; a search naming studies exactly is refused for a withdrawn patient (others are left out).
        Returns how a de-identified project is read (None for an identified one)."""
        require_use(self.ctx, who, project_id, DataUse.READ, "search the cache (DICOMweb)")
        reads = deid_reads(self.ctx, project_id)
        named = exact_uids(study_uids)
        if named is not None and reads is not None:
            named = resolve_all(self.ctx, reads, STUDY, named)
        if named is not None:
            require_patients_allowed(self.ctx, who, project_id, named, "search the cache (DICOMweb)")
        return reads

    def _scope(self, who: Principal, project_id: str, study_uid: str, series_uid: str | None, sop_uid: str | None,
               operation: str) -> tuple[DeidReads | None, list[CachedFile]]:
        """The read door for one study (its patient still allowed), then its files on disk; a de-identified
        project's URL names pseudonyms, found back here (a real UID finds nothing, on the record)."""
        check_uid(study_uid, "StudyInstanceUID")
        if series_uid is not None:
            check_uid(series_uid, "SeriesInstanceUID")
        if sop_uid is not None:
            check_uid(sop_uid, "SOPInstanceUID")
        require_use(self.ctx, who, project_id, DataUse.READ, operation)
        reads = deid_reads(self.ctx, project_id)
        if reads is None:
            require_patients_allowed(self.ctx, who, project_id, [study_uid], operation)
            return None, cached_files(self.ctx, project_id, study_uid, series_uid, sop_uid)
        study = resolve(self.ctx, who, reads, STUDY, study_uid, operation).original
        series = resolve(self.ctx, who, reads, SERIES, series_uid, operation) if series_uid else None
        sop = resolve(self.ctx, who, reads, INSTANCE, sop_uid, operation) if sop_uid else None
        named = sop_uid or series_uid or study_uid
        if any(found is not None and found.study_uid != study for found in (series, sop)):
            raise NotFound(f"{named} is not part of study {study_uid} in project {project_id!r}")
        require_patients_allowed(self.ctx, who, project_id, [study], operation)
        try:
            return reads, cached_files(self.ctx, project_id, study, series.original if series else None,
                                       sop.original if sop else None)
        except NotFound:  # its message names the original UIDs
            raise NotFound(f"{named} is not in the cache of project {project_id!r} (or its file is missing: "
                           "an admin can reconcile index and disk with `mi2b2 admin fsck --repair`)") from None

    @staticmethod
    def _served(reads: DeidReads, files: list[CachedFile], named: str) -> list[CachedFile]:
        """The files a de-identified project may send; NotFound naming the reason if none may."""
        kept, reasons = [], []
        for file in files:
            made = outcome(reads.engine, file.path)
            if isinstance(made, Withheld):
                reasons.append(made.reason)
            elif made is not None:
                kept.append(file)
        if not kept:
            raise NotFound(withheld_message(named, reasons[0]) if reasons else
                           f"{named} is missing from the cache; an admin can run `mi2b2 admin fsck --repair`")
        return kept

    # audit -----------------------------------------------------------------------------------------

    def _viewed(self, who: Principal, project_id: str, items: Sequence[Record | CachedFile], kind: str,
                reads: DeidReads | None = None) -> None:
        # A view changes nothing in the database, so its audit row is a transaction of its own,
        # committed before any image leaves.
        studies = {(item.study_uid, item.patient_id): item.path for item in items}
        for (study_uid, patient_id), path in sorted(studies.items(), key=lambda kv: kv[0]):
            if self.audited.first((who.login, project_id, study_uid, "view")):
                detail: dict[str, Any] = {"via": "dicomweb", "kind": kind, "again_after_hours": VIEW_AUDIT_HOURS}
                if reads is not None:
                    detail.update(reads.audit_detail())
                    hand_out(self.ctx, reads, [(study_uid, path)])
                self.ctx.audit.record(who, Action.VIEW, project_id=project_id, patient_id=patient_id,
                                      study_uid=study_uid, detail=detail)

    def _downloaded(self, who: Principal, project_id: str, first: CachedFile, level: str, count: int, size: int,
                    series_uid: str | None, once: bool, reads: DeidReads | None = None) -> None:
        if once and not self.audited.first((who.login, project_id, first.study_uid, "download")):
            return
        now = self.ctx.clock.now()
        detail: dict[str, Any] = {"via": "dicomweb", "level": level, "instances": count, "bytes": size}
        if series_uid:
            detail["series_uid"] = series_uid
        if once:
            detail["again_after_hours"] = VIEW_AUDIT_HOURS
        if reads is not None:
            detail.update(reads.audit_detail())
            hand_out(self.ctx, reads, [(first.study_uid, first.path)])
        with transaction(self.ctx.sessions) as session:  # "last downloaded" and its audit row commit together
            session.execute(update(CachedStudy).where(CachedStudy.id == first.study_id)
                            .values(last_downloaded_by=who.login[:64], last_downloaded_at=now))
            self.ctx.audit.record(who, Action.DOWNLOAD, project_id=project_id, patient_id=first.patient_id,
                                  study_uid=first.study_uid, detail=detail, session=session)


def _named(reads: DeidReads | None, uid: str) -> str:
    """A UID as this project's doors name it."""
    return uid if reads is None else reads.uid(uid)


def _deidentified(reads: DeidReads, path: Path) -> Deidentified | None:
    made = outcome(reads.engine, path)
    return made if isinstance(made, Deidentified) else None


def _converted(stored: str, wanted: WantedSyntaxes) -> bool:
    """Whether an instance stored in ``stored`` goes out converted; NotAcceptable if it cannot go out at all."""
    return answer_syntax(stored, wanted, why_not_convertible(stored)) != stored
