"""Reading a de-identified project's cache under its pseudonyms: what DICOMweb and the viewer share.

Those doors name studies, series and images by the same pseudonymous UIDs a
de-identified download writes (HMACs of the originals under the project's key),
and show only de-identified attribute values: the download's headers, made by
the same engine and kept in the same header cache (``deid.HEADERS``).

The way back. An HMAC cannot be reversed, so a URL's pseudonym is looked up in
``deid_uids`` (pseudonym, project, level) -> original: one primary-key probe
per request, whatever the size of the cache. Recomputing every pseudonym of the
project instead would cost one HMAC per cached instance per request (tens of
thousands for each frame a viewer scrolls through: measured on PostgreSQL with
30,000 instances, about 250 ms a request against about 2 ms for the lookup; the
first fill of those 30,000 took under 3 s, and a fill that finds nothing new
0.05 to 0.15 s). The table is filled from
the cache index, not by the receiver: when a pseudonym is not found, the
project's instances that have no row yet (an anti-join on an index) get theirs,
with their series and studies, and the lookup is tried once more. A pseudonym
is only ever made from a cached original, so a miss after that is a UID the
project does not hold - or a real, identified UID, which is refused the same
way and put on the audit trail.
"""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from pydicom import Dataset, dcmread
from sqlalchemy import exists, select

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedInstance, CachedStudy, DeidUid
from mi2b2.adapters.dicom.deidentify import DeidEngine, Deidentified, Withheld
from mi2b2.adapters.dicom.render import quiet
from mi2b2.config.export_policy import ExportPolicy
from mi2b2.domain.deid.pseudonyms import patient_original
from mi2b2.domain.principal import Principal
from mi2b2.errors import NotFound
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.cache.index import insert_for
from mi2b2.services.context import ServiceContext
from mi2b2.services.export.deid import cached_outcome, engine_for, policy_of, record_mappings

STUDY, SERIES, INSTANCE = "study", "series", "instance"
ORIGINAL_UID = "an original UID at a de-identified door"
_BATCH = 1000


@dataclass(frozen=True)
class DeidReads:
    """A de-identified project's reads: its policy, and its engines for what leaves whole (burned-in
    risks withheld) and for attribute values alone (no pixels leave)."""

    policy: ExportPolicy
    engine: DeidEngine
    values: DeidEngine

    @property
    def project_id(self) -> str:
        return self.policy.project_id

    def uid(self, original: str) -> str:
        return self.engine.pseudonyms.uid(original)

    def audit_detail(self) -> dict[str, object]:
        return self.policy.audit_detail()


def deid_reads(ctx: ServiceContext, project_id: str) -> DeidReads | None:
    """None for an identified project (its doors serve the cache as stored)."""
    policy = policy_of(ctx, project_id)
    if not policy.deidentified:
        return None
    engine = engine_for(ctx, policy)
    return DeidReads(policy, engine, replace(engine, withhold_burned_in=False))


# de-identified headers and copies ---------------------------------------------------------------


def outcome(engine: DeidEngine, path: Path) -> Deidentified | Withheld | None:
    """The cached file's de-identified header (made once, then kept), or why it is withheld; None if the
    file has gone from the cache."""
    try:
        with open(path, "rb") as handle:
            return cached_outcome(handle, engine)
    except FileNotFoundError:
        return None


def header_of(made: Deidentified) -> Dataset:
    with quiet():
        return dcmread(io.BytesIO(made.header), stop_before_pixels=True)


def values_of(reads: DeidReads, path: Path) -> Dataset | None:
    """A cached file's de-identified attributes (its pixels left aside, so burned-in risks are read too)."""
    made = outcome(reads.values, path)
    return header_of(made) if isinstance(made, Deidentified) else None


def risk_of(reads: DeidReads, path: Path) -> str:
    """Why this instance's pixels are withheld ("" if they are not), from its attributes alone."""
    made = outcome(reads.values, path)
    if made is None:
        return ""
    return made.risk if isinstance(made, Deidentified) else made.reason


def withheld_message(uid: str, reason: str) -> str:
    return (f"image {uid} is withheld from this de-identified project: {reason} (a project may clear a series "
            "or SOP class it has checked, in [projects.deidentification])")


# the way back from a pseudonym ------------------------------------------------------------------


@dataclass(frozen=True)
class Resolved:
    original: str
    study_uid: str  # the original study it belongs to


def resolve(ctx: ServiceContext, who: Principal, reads: DeidReads, level: str, pseudonym: str,
            operation: str) -> Resolved:
    """The cached original a pseudonymous UID of this project names; NotFound otherwise (and on the audit
    trail when the UID is an original one: identified data is never served by its real name)."""
    found = _lookup(ctx, reads.project_id, level, pseudonym)
    if found is None:
        fill(ctx, reads)
        found = _lookup(ctx, reads.project_id, level, pseudonym)
    if found is not None:
        return found
    original_study = _original_study(ctx, reads.project_id, level, pseudonym)
    if original_study is not None:
        ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=reads.project_id, study_uid=original_study,
                         detail={"reason": ORIGINAL_UID, "operation": operation, "level": level,
                                 **reads.audit_detail()})
    raise NotFound(f"{'image' if level == INSTANCE else level} {pseudonym} is not in the cache of project "
                   f"{reads.project_id!r}; its data is de-identified, named by the pseudonymous UIDs its "
                   "searches list")


def resolve_all(ctx: ServiceContext, reads: DeidReads, level: str, pseudonyms: Iterable[str]) -> list[str]:
    """The originals of those pseudonyms that name something of the project (the others left out)."""
    wanted = list(dict.fromkeys(pseudonyms))[:_BATCH]
    if not wanted:
        return []
    fill(ctx, reads)
    with ctx.sessions() as session:
        return list(session.scalars(select(DeidUid.original).where(
            DeidUid.project_id == reads.project_id, DeidUid.level == level, DeidUid.pseudonym.in_(wanted))))


def fill(ctx: ServiceContext, reads: DeidReads) -> int:
    """Rows for the project's cached instances that have none yet, with their series and studies."""
    project_id = reads.project_id
    mapped = exists().where(DeidUid.project_id == project_id, DeidUid.level == INSTANCE,
                            DeidUid.original == CachedInstance.sop_instance_uid)
    with ctx.sessions() as session:
        rows = session.execute(
            select(CachedStudy.study_uid, CachedInstance.series_uid, CachedInstance.sop_instance_uid)
            .join(CachedInstance, CachedInstance.cached_study_id == CachedStudy.id)
            .where(CachedStudy.project_id == project_id, ~mapped)).all()
    if not rows:
        return 0
    new: dict[tuple[str, str], dict[str, Any]] = {}
    for study_uid, series_uid, sop_uid in rows:
        for level, original in ((STUDY, study_uid), (SERIES, series_uid), (INSTANCE, sop_uid)):
            pseudonym = reads.uid(original)
            new.setdefault((level, pseudonym), {"project_id": project_id, "level": level, "pseudonym": pseudonym,
                                                "original": original, "study_uid": study_uid})
    values = list(new.values())
    with transaction(ctx.sessions) as session:  # another process filling the same rows writes the same values
        insert = insert_for(session)
        for start in range(0, len(values), _BATCH):
            session.execute(insert(DeidUid).on_conflict_do_nothing(
                index_elements=["pseudonym", "project_id", "level"]), values[start:start + _BATCH])
    return len(rows)


def _lookup(ctx: ServiceContext, project_id: str, level: str, pseudonym: str) -> Resolved | None:
    with ctx.sessions() as session:
        row = session.execute(select(DeidUid.original, DeidUid.study_uid).where(
            DeidUid.project_id == project_id, DeidUid.level == level, DeidUid.pseudonym == pseudonym)).first()
    return Resolved(row[0], row[1]) if row is not None else None


def _original_study(ctx: ServiceContext, project_id: str, level: str, uid: str) -> str | None:
    """The study of the project that ``uid`` really names at this level, if any."""
    column = {STUDY: CachedStudy.study_uid, SERIES: CachedInstance.series_uid,
              INSTANCE: CachedInstance.sop_instance_uid}[level]
    with ctx.sessions() as session:
        return session.scalar(
            select(CachedStudy.study_uid).join(CachedInstance, CachedInstance.cached_study_id == CachedStudy.id,
                                               isouter=True)
            .where(CachedStudy.project_id == project_id, column == uid).limit(1))


# the honest broker's table ------------------------------------------------------------------------


def hand_out(ctx: ServiceContext, reads: DeidReads, studies: Iterable[tuple[str, Path | None]]) -> None:
    """Record the study and patient pseudonyms these doors show (original study, one of its files), as a
    download records those it writes: the lead can ask the honest broker what a researcher saw."""
    pairs: list[tuple[str, str, str]] = []
    for study_uid, path in dict(studies).items():
        pairs.append(("study", study_uid, reads.uid(study_uid)))
        if path is None:
            continue
        with quiet():
            try:
                original = dcmread(path, stop_before_pixels=True, specific_tags=["PatientID", "IssuerOfPatientID"])
            except Exception:  # pydicom on a damaged file can raise nearly anything: no patient pseudonym then
                continue
        patient, issuer = str(original.get("PatientID", "") or ""), str(original.get("IssuerOfPatientID", "") or "")
        pairs.append(("patient", patient_original(patient, issuer), reads.engine.pseudonyms.patient_id(patient, issuer)))
    record_mappings(ctx, reads.project_id, pairs)
