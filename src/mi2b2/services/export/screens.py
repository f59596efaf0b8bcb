"""What a de-identified project's screens show: the cache list, a cached study, the request log.

In a project whose policy is ``deidentified`` every screen that lists cached data
names patients and studies as its downloads do: the pseudonymous PatientID and
StudyInstanceUID of the project's key, dates shifted when the profile keeps
longitudinal dates (else empty), no patient name, accession or description. The
patient's pseudonym and date shift are made, as the files' are, from the Issuer of
Patient ID and PatientID the study's files carry (`cached_issuers`). The
cache's screens are pseudonymous for every role (identities come back only through
the audited re-identification); the request log shows identifiers only to the
honest broker (lead or admin, `domain.deid.broker.sees_identifiers`), who made
those requests by searching. Each pseudonym shown is recorded for the broker, and
each pseudonymous listing is audited with the policy applied.

Whatever a user does next (download, delete, forward, show) may name a study by
the pseudonym shown: `study_originals` turns it back into the cached study,
through ``deid_uids`` as DICOMweb and the viewer do (`services.export.pseudonymous`).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass

from sqlalchemy import func, select, update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedInstance, CachedStudy, DeidMapping, DeidUid
from mi2b2.adapters.dicom.files import read_instance_header
from mi2b2.adapters.storage.cache_files import CacheStore
from mi2b2.config.export_policy import ExportPolicy
from mi2b2.config.fields import MemberRole
from mi2b2.domain.deid.broker import sees_identifiers
from mi2b2.domain.deid.profile import ProfileOption
from mi2b2.domain.deid.pseudonyms import Pseudonymizer, patient_original, shift_date
from mi2b2.domain.principal import Principal
from mi2b2.errors import InvalidInput
from mi2b2.services.audit import Action
from mi2b2.services.context import ServiceContext

UID_PSEUDONYM = "2.25."  # every pseudonymous UID starts so (PS3.5 B.2)


@dataclass(frozen=True)
class Screen:
    """One project's identifiers as a screen shows them: pseudonymous with ``pseudonyms``, else as stored."""

    policy: ExportPolicy
    pseudonyms: Pseudonymizer | None = None

    def patient(self, patient_id: str, issuer: str) -> str:
        """The patient as the files name it: pseudonymous from (IssuerOfPatientID, PatientID), as downloads do."""
        return self.pseudonyms.patient_id(patient_id, issuer) if self.pseudonyms else patient_id

    def patient_pair(self, patient_id: str, issuer: str) -> tuple[str, str, str]:
        """The patient pseudonym shown, as `shown` records it for the broker: named as downloads name it."""
        return "patient", patient_original(patient_id, issuer), self.patient(patient_id, issuer)

    def uid(self, uid: str) -> str:
        return self.pseudonyms.uid(uid) if self.pseudonyms else uid

    def date(self, patient_id: str, issuer: str, value: str) -> str:
        """A study date: shifted per patient when the profile keeps longitudinal dates, else removed."""
        if self.pseudonyms is None:
            return value
        profile = self.policy.profile
        if profile is None or not profile.has(ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES):
            return ""
        return shift_date(value, self.pseudonyms.date_shift(patient_id, issuer)) or ""


def _policy(ctx: ServiceContext, project_id: str) -> ExportPolicy:
    from mi2b2.services.export.deid import policy_of  # the DICOM engine loads only where it is used

    return policy_of(ctx, project_id)


def _pseudonymizer(ctx: ServiceContext, project_id: str) -> Pseudonymizer:
    from mi2b2.services.export.deid import project_key

    return Pseudonymizer(project_key(ctx, project_id))


def cache_screen(ctx: ServiceContext, project_id: str) -> Screen:
    """The cache's screens: pseudonymous in a de-identified project, whoever looks."""
    policy = _policy(ctx, project_id)
    return Screen(policy, _pseudonymizer(ctx, project_id) if policy.deidentified else None)


def request_screen(ctx: ServiceContext, who: Principal, project_id: str) -> Screen:
    """The request log: identified for the honest broker (lead, admin), pseudonymous for members."""
    policy = _policy(ctx, project_id)
    if not policy.deidentified:
        return Screen(policy)
    from mi2b2.services.search import load_policy

    lead = load_policy(ctx, project_id).members.get(who.login) == MemberRole.LEAD
    if sees_identifiers(admin=who.is_admin, lead=lead):
        return Screen(policy)
    return Screen(policy, _pseudonymizer(ctx, project_id))


def shown(ctx: ServiceContext, who: Principal, screen: Screen, operation: str, rows: int,
          pairs: Iterable[tuple[str, str, str]]) -> None:
    """A pseudonymous listing left the server: record its pseudonyms for the broker, and audit it."""
    if screen.pseudonyms is None:
        return
    from mi2b2.services.export.deid import record_mappings

    record_mappings(ctx, screen.policy.project_id, pairs)
    ctx.audit.record(who, Action.LIST, project_id=screen.policy.project_id,
                     detail={"operation": operation, "rows": rows, "view": "pseudonymous",
                             **screen.policy.audit_detail()})


# the issuer the files carry ------------------------------------------------------------------


def cached_issuers(ctx: ServiceContext, project_id: str, study_uids: Collection[str]) -> dict[str, str]:
    """Study -> the Issuer of Patient ID its cached files carry ("" for none); a study not cached is absent."""
    wanted = sorted(set(study_uids))
    stored: dict[str, str | None] = {}
    with ctx.sessions() as session:
        for start in range(0, len(wanted), 1000):
            stored.update({uid: issuer for uid, issuer in session.execute(
                select(CachedStudy.study_uid, CachedStudy.patient_id_issuer).where(
                    CachedStudy.project_id == project_id, CachedStudy.study_uid.in_(wanted[start:start + 1000])))})
    return known_issuers(ctx, project_id, stored)


def known_issuers(ctx: ServiceContext, project_id: str, stored: dict[str, str | None]) -> dict[str, str]:
    """The stored issuers (study -> issuer, None where not known), the unknown ones learnt.

    A study cached before its issuer was kept (revision 0014) has none stored: it is read
    once from one of its cached files, with the reader downloads use, and stored, so the
    screens name its patient as its files do without retrieving it again. A study none of
    whose files can be read is shown without an issuer and tried again next time."""
    issuers = {uid: issuer or "" for uid, issuer in stored.items()}
    unknown = sorted(uid for uid, issuer in stored.items() if issuer is None)
    if not unknown:
        return issuers
    learnt = _read_issuers(ctx, project_id, unknown)
    if learnt:
        with transaction(ctx.sessions) as session:
            for uid, issuer in learnt.items():  # a receipt meanwhile stored the same header's issuer: kept
                session.execute(update(CachedStudy).where(
                    CachedStudy.project_id == project_id, CachedStudy.study_uid == uid,
                    CachedStudy.patient_id_issuer.is_(None)).values(patient_id_issuer=issuer))
    return {**issuers, **learnt}


def _read_issuers(ctx: ServiceContext, project_id: str, study_uids: list[str]) -> dict[str, str]:
    paths: dict[str, str] = {}
    with ctx.sessions() as session:
        for start in range(0, len(study_uids), 1000):
            paths.update({uid: path for uid, path in session.execute(
                select(CachedStudy.study_uid, func.min(CachedInstance.relative_path))
                .join(CachedInstance, CachedInstance.cached_study_id == CachedStudy.id)
                .where(CachedStudy.project_id == project_id, CachedStudy.study_uid.in_(study_uids[start:start + 1000]))
                .group_by(CachedStudy.study_uid))})
    store = CacheStore(ctx.config.cache_dir())
    learnt: dict[str, str] = {}
    for uid, path in paths.items():
        try:
            learnt[uid] = read_instance_header(store.absolute(path)).issuer[:64]
        except InvalidInput:  # gone or damaged (UnreadableInstance): downloads withhold it too
            continue
    return learnt


# naming studies by their pseudonyms ------------------------------------------------------------


def study_originals(ctx: ServiceContext, project_id: str, uids: Sequence[str]) -> dict[str, str]:
    """Pseudonym -> original of the named studies that are pseudonyms of studies in the project's cache.

    Empty for an identified project. Found in ``deid_uids``, the table DICOMweb and the
    viewer resolve their URLs with. An original UID names its study as before (the lead
    who requested it knows it; naming it shows nothing new)."""
    from mi2b2.services.export.pseudonymous import STUDY

    found = _originals(ctx, project_id, STUDY, uids)
    cached = _cached_uids(ctx, project_id, list(found.values()))  # rows of deleted studies stay in deid_uids
    return {pseudonym: uid for pseudonym, uid in found.items() if uid in cached}


def series_originals(ctx: ServiceContext, project_id: str, study_uids: Sequence[str],
                     series_uids: Sequence[str]) -> dict[str, str]:
    """Pseudonym -> original of the named series of the named (original) cached studies."""
    from mi2b2.services.export.pseudonymous import SERIES

    return _originals(ctx, project_id, SERIES, series_uids, within=set(study_uids))


def _originals(ctx: ServiceContext, project_id: str, level: str, uids: Sequence[str],
               within: set[str] | None = None) -> dict[str, str]:
    candidates = sorted({uid.strip() for uid in uids if uid.strip().startswith(UID_PSEUDONYM)})
    if not candidates:
        return {}
    from mi2b2.services.export.pseudonymous import deid_reads, fill

    reads = deid_reads(ctx, project_id)
    if reads is None:
        return {}
    found = _looked_up(ctx, project_id, level, candidates, within)
    if len(found) < len(candidates):  # cached since the table was last filled
        fill(ctx, reads)
        found = _looked_up(ctx, project_id, level, candidates, within)
    return found


def _looked_up(ctx: ServiceContext, project_id: str, level: str, pseudonyms: list[str],
               within: set[str] | None) -> dict[str, str]:
    found: dict[str, str] = {}
    with ctx.sessions() as session:
        for start in range(0, len(pseudonyms), 1000):
            rows = session.execute(select(DeidUid.pseudonym, DeidUid.original, DeidUid.study_uid).where(
                DeidUid.project_id == project_id, DeidUid.level == level,
                DeidUid.pseudonym.in_(pseudonyms[start:start + 1000])))
            found.update({p: o for p, o, study in rows if within is None or study in within})
    return found


def resolve(uids: Sequence[str], originals: dict[str, str]) -> list[str]:
    return [originals.get(uid.strip(), uid.strip()) for uid in uids]


def as_named(uids: Iterable[str], originals: dict[str, str]) -> list[str]:
    """The originals in a report turned back into the names the caller used."""
    named = {original: given for given, original in originals.items()}
    return [named.get(uid, uid) for uid in uids]


def _cached_uids(ctx: ServiceContext, project_id: str, uids: list[str]) -> set[str]:
    if not uids:
        return set()
    with ctx.sessions() as session:
        return set(session.scalars(select(CachedStudy.study_uid).where(
            CachedStudy.project_id == project_id, CachedStudy.study_uid.in_(uids))))


def patient_originals(ctx: ServiceContext, project_id: str, pseudonym: str) -> list[str]:
    """The originals a patient pseudonym was shown for (a member filters the request log by it)."""
    with ctx.sessions() as session:
        return [original.rsplit("/", 1)[-1] for original in session.scalars(
            select(DeidMapping.original).where(DeidMapping.project_id == project_id, DeidMapping.kind == "patient",
                                               DeidMapping.pseudonym == pseudonym))]
