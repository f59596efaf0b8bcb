"""What DICOMweb answers from: the cache index first, and the header of one file per study, series
or instance only for what the index lacks (read on first need, only for results returned).

These functions read; who may read is decided at the doors in `service`.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset
from sqlalchemy import func, select

from mi2b2.adapters.db.tables import CachedInstance, CachedStudy
from mi2b2.adapters.dicom.dicom_json import read_header
from mi2b2.adapters.dicom.render import quiet
from mi2b2.errors import NotFound
from mi2b2.services.cache.reads import cache_store
from mi2b2.services.context import ServiceContext
from mi2b2.services.data_access import patient_still_allowed
from mi2b2.services.dicomweb.matching import matches
from mi2b2.services.dicomweb.query import exact_uids

LOG = logging.getLogger(__name__)

# What the index knows at each level (everything else comes from a file's header).
STUDY_INDEXED = ("StudyInstanceUID", "PatientID", "PatientName", "AccessionNumber", "StudyDate", "ModalitiesInStudy",
                 "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances")
SERIES_INDEXED = ("SeriesInstanceUID", "NumberOfSeriesRelatedInstances")
INSTANCE_INDEXED = ("SOPInstanceUID", "SOPClassUID", "InstanceNumber")

# PS3.18 Tables 10.6.3-3 to -5: what each level returns by default.
STUDY_DEFAULT = ("StudyDate", "StudyTime", "AccessionNumber", "ModalitiesInStudy", "ReferringPhysicianName",
                 "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
                 "StudyDescription", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "RetrieveURL")
STUDY_MORE = ("PatientAge", "PatientSize", "PatientWeight", "OtherPatientIDs", "IssuerOfPatientID", "InstitutionName",
              "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription", "StudyComments")
SERIES_DEFAULT = ("StudyInstanceUID", "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription",
                  "NumberOfSeriesRelatedInstances", "PerformedProcedureStepStartDate",
                  "PerformedProcedureStepStartTime", "RetrieveURL")
SERIES_MORE = ("SeriesDate", "SeriesTime", "BodyPartExamined", "ProtocolName", "Laterality", "Manufacturer",
               "ManufacturerModelName", "StationName", "OperatorsName", "PerformingPhysicianName", "FrameOfReferenceUID")
INSTANCE_DEFAULT = ("StudyInstanceUID", "SeriesInstanceUID", "SOPClassUID", "SOPInstanceUID", "InstanceNumber",
                    "Rows", "Columns", "BitsAllocated", "NumberOfFrames", "RetrieveURL")
STUDY_LEVEL = frozenset(STUDY_DEFAULT + STUDY_MORE) - {"RetrieveURL"}
SERIES_LEVEL = frozenset(SERIES_DEFAULT + SERIES_MORE) - {"RetrieveURL"}


@dataclass
class Record:
    """A study, series or instance in a search: what the index knows, and a header for the rest."""

    known: dict[str, Any]
    path: Path | None  # a file to read the rest from
    url: str
    patient_id: str
    study_uid: str
    db_id: int = 0  # the CachedStudy row it belongs to
    reader: Callable[[Path], Dataset | None] = read_header  # a de-identified project's reads its copy's header
    origin: Record | None = field(default=None, repr=False)  # the identified record a pseudonymous one stands for
    _header: Dataset | None = None
    _read: bool = False

    def header(self) -> Dataset | None:
        if not self._read:
            self._read = True
            self._header = self.reader(self.path) if self.path is not None else None
        return self._header

    def value(self, keyword: str) -> Any:
        if keyword in self.known:
            return self.known[keyword]
        header = self.header()
        if header is None or keyword not in header:
            return None
        return header.get(keyword)


@dataclass
class CachedFile:
    """One indexed instance a retrieve names, with its file."""

    study_id: int
    patient_id: str
    study_uid: str
    series_uid: str
    sop_uid: str
    sop_class: str
    number: int | None
    path: Path
    size: int = 0


def passes(record: Record, filters: Mapping[str, str]) -> bool:
    with quiet():  # values are converted on first access, and pydicom's warnings would quote them
        return all(matches(keyword, pattern, record.value(keyword)) for keyword, pattern in filters.items())


def study_records(ctx: ServiceContext, project_id: str, filters: Mapping[str, str], base: str) -> list[Record]:
    """The project's readable studies that pass the filters the index can answer."""
    store = cache_store(ctx)
    with ctx.sessions() as session:
        # Studies of patients who left the allow-list are no longer anyone's to read.
        statement = select(CachedStudy).where(CachedStudy.project_id == project_id, patient_still_allowed())
        named = exact_uids(filters.get("StudyInstanceUID"))
        if named is not None:
            statement = statement.where(CachedStudy.study_uid.in_(named))
        rows = session.scalars(statement.order_by(CachedStudy.study_date.desc(), CachedStudy.study_uid)).all()
        extra = {
            study_id: (int(series), path)
            for study_id, series, path in session.execute(
                select(CachedInstance.cached_study_id, func.count(func.distinct(CachedInstance.series_uid)),
                       func.min(CachedInstance.relative_path))
                .join(CachedStudy, CachedStudy.id == CachedInstance.cached_study_id)
                .where(CachedStudy.project_id == project_id).group_by(CachedInstance.cached_study_id)
            )
        }
    records = []
    for row in rows:
        series, path = extra.get(row.id, (0, None))
        records.append(Record(
            known={"StudyInstanceUID": row.study_uid, "PatientID": row.patient_id, "PatientName": row.patient_name,
                   "AccessionNumber": row.accession, "StudyDate": row.study_date,
                   "ModalitiesInStudy": row.modalities, "StudyDescription": row.description,
                   "NumberOfStudyRelatedSeries": series, "NumberOfStudyRelatedInstances": row.instance_count},
            path=store.absolute(path) if path else None, url=f"{base}/studies/{row.study_uid}",
            patient_id=row.patient_id, study_uid=row.study_uid, db_id=row.id,
        ))
    indexed = {k: v for k, v in filters.items() if k in STUDY_INDEXED}
    return [r for r in records if passes(r, indexed)]


def series_records(ctx: ServiceContext, project_id: str, filters: Mapping[str, str], base: str,
                   must_exist: str | None) -> list[Record]:
    """The series of the studies that pass; NotFound if ``must_exist`` names a study that did not."""
    studies = study_records(ctx, project_id, filters, base)
    if must_exist is not None and not studies:
        raise NotFound(f"study {must_exist} is not in the cache of project {project_id!r}")
    by_id = {s.db_id: s for s in studies}
    if not by_id:
        return []
    store = cache_store(ctx)
    with ctx.sessions() as session:
        rows = session.execute(
            select(CachedInstance.cached_study_id, CachedInstance.series_uid, func.count(CachedInstance.id),
                   func.min(CachedInstance.relative_path))
            .where(CachedInstance.cached_study_id.in_(list(by_id)))
            .group_by(CachedInstance.cached_study_id, CachedInstance.series_uid)
            .order_by(CachedInstance.cached_study_id, CachedInstance.series_uid)
        ).all()
    records = []
    for study_id, series_uid, count, path in rows:
        study = by_id[study_id]
        known = {k: v for k, v in study.known.items() if k in ("StudyInstanceUID", "PatientID", "PatientName",
                                                               "AccessionNumber", "StudyDate")}
        known.update({"SeriesInstanceUID": series_uid, "NumberOfSeriesRelatedInstances": int(count)})
        records.append(Record(known, store.absolute(path), f"{study.url}/series/{series_uid}",
                              study.patient_id, study.study_uid, study_id))
    return records


def instance_records(ctx: ServiceContext, series: list[Record]) -> list[Record]:
    """The instances of these series, in series and instance-number order."""
    if not series:
        return []
    keys = {(s.db_id, s.known["SeriesInstanceUID"]): s for s in series}
    store = cache_store(ctx)
    with ctx.sessions() as session:
        rows = session.execute(
            select(CachedInstance.cached_study_id, CachedInstance.series_uid, CachedInstance.sop_instance_uid,
                   CachedInstance.sop_class_uid, CachedInstance.instance_number, CachedInstance.relative_path)
            .where(CachedInstance.cached_study_id.in_(list({k[0] for k in keys})))
        ).all()
    records = []
    for study_id, series_uid, sop, sop_class, number, path in rows:
        parent = keys.get((study_id, series_uid))
        if parent is None:
            continue
        known = {k: v for k, v in parent.known.items() if k in ("StudyInstanceUID", "SeriesInstanceUID",
                                                                "PatientID", "PatientName")}
        known.update({"SOPInstanceUID": sop, "SOPClassUID": sop_class})
        if number is not None:
            known["InstanceNumber"] = number
        records.append(Record(known, store.absolute(path), f"{parent.url}/instances/{sop}",
                              parent.patient_id, parent.study_uid, study_id))
    records.sort(key=lambda r: (r.known["SeriesInstanceUID"], r.known.get("InstanceNumber") is None,
                                r.known.get("InstanceNumber") or 0, r.known["SOPInstanceUID"]))
    return records


def cached_files(ctx: ServiceContext, project_id: str, study_uid: str, series_uid: str | None,
                 sop_uid: str | None) -> list[CachedFile]:
    """The files of a study, series or instance that are on disk; NotFound if none is."""
    store = cache_store(ctx)
    with ctx.sessions() as session:
        study = session.scalar(
            select(CachedStudy).where(CachedStudy.project_id == project_id, CachedStudy.study_uid == study_uid)
        )
        if study is None:
            raise NotFound(f"study {study_uid} is not in the cache of project {project_id!r}")
        statement = select(CachedInstance).where(CachedInstance.cached_study_id == study.id)
        if series_uid is not None:
            statement = statement.where(CachedInstance.series_uid == series_uid)
        if sop_uid is not None:
            statement = statement.where(CachedInstance.sop_instance_uid == sop_uid)
        rows = session.scalars(statement).all()
        found = [
            CachedFile(study.id, study.patient_id, study.study_uid, row.series_uid, row.sop_instance_uid,
                       row.sop_class_uid, row.instance_number, store.absolute(row.relative_path), row.bytes)
            for row in rows
        ]
    if not found:
        what = f"instance {sop_uid}" if sop_uid else f"series {series_uid}"
        raise NotFound(f"{what} is not in the cache of project {project_id!r}")
    found.sort(key=lambda i: (i.series_uid, i.number is None, i.number or 0, i.sop_uid))
    present = [i for i in found if i.path.is_file()]
    if len(present) < len(found):
        LOG.warning("%d of %d indexed files of a DICOMweb request are missing from the cache; "
                    "`mi2b2 admin fsck --repair` reconciles index and disk", len(found) - len(present), len(found))
    if not present:
        raise NotFound("the files of this request are missing from the cache; "
                       "an admin can reconcile index and disk with `mi2b2 admin fsck --repair`")
    return present
