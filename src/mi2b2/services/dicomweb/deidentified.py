"""DICOMweb records of a de-identified project: pseudonymous UIDs and URLs, every other value from the
de-identified header (``services.export.pseudonymous``), so a search matches only what a de-identified
download would show: a real MRN, name or accession number matches nothing.

What the index knows is kept only where the profile keeps it (counts, modalities, SOP classes,
instance numbers); the identifying columns (PatientID, PatientName, AccessionNumber, StudyDate,
StudyDescription) are left to the header, which has them as the profile made them.
"""

from __future__ import annotations

from functools import partial

from mi2b2.services.dicomweb.records import Record
from mi2b2.services.export.pseudonymous import DeidReads, risk_of, values_of

UIDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID")
KEPT = frozenset({"ModalitiesInStudy", "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances",
                  "NumberOfSeriesRelatedInstances", "SOPClassUID", "InstanceNumber"})


def pseudonymous(record: Record, reads: DeidReads, base: str) -> Record:
    """The record as a de-identified project shows it; ``origin`` keeps the original (for the audit trail)."""
    known = {key: reads.uid(str(value)) if key in UIDS else value for key, value in record.known.items()
             if key in UIDS or key in KEPT}
    url = f"{base}/studies/{known['StudyInstanceUID']}"
    if "SeriesInstanceUID" in known:
        url += f"/series/{known['SeriesInstanceUID']}"
    if "SOPInstanceUID" in known:
        url += f"/instances/{known['SOPInstanceUID']}"
    return Record(known, record.path, url, record.patient_id, record.study_uid, record.db_id,
                  reader=partial(values_of, reads), origin=record)


def served(record: Record, reads: DeidReads) -> bool:
    """Whether the instance (or a series, by its first instance) may be shown: not a burned-in risk."""
    return record.path is None or not risk_of(reads, record.path)


def original(record: Record) -> Record:
    return record.origin if record.origin is not None else record
