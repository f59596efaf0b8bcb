"""The honest broker: a project's lead or an admin turns a pseudonym back into its original, on the record.

The pseudonyms a de-identified export handed out are HMACs of the originals under
the project's key, so they cannot be reversed; the server answers from
``deid_mappings`` (patients and studies, recorded at each export) and, for a
series or instance UID, by recomputing the pseudonyms of the exported studies'
cached series and instances. Members and auditors never read the mapping. Every
call, answered or refused, is audited with the caller's justification; nothing
of it goes to the ordinary log.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.orm import Session

from mi2b2.adapters.db.tables import CachedInstance, CachedStudy, DeidKey, DeidMapping
from mi2b2.config.fields import MemberRole
from mi2b2.domain.deid.broker import NOT_LEAD, reidentify_denial
from mi2b2.domain.deid.pseudonyms import Pseudonymizer
from mi2b2.domain.governance import irb_active_at
from mi2b2.domain.principal import Principal
from mi2b2.errors import AccessDenied, InvalidInput, NotFound
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.context import ServiceContext
from mi2b2.services.search import load_policy

OPERATION = "reidentify"
MIN_JUSTIFICATION, MAX_JUSTIFICATION = 10, 1000
PSEUDONYM = re.compile(r"[A-Za-z0-9.]{1,64}\Z")  # "P" and base32 letters, or a 2.25. UID
UID_PSEUDONYM = "2.25."


@dataclass(frozen=True)
class Original:
    kind: str  # patient, study, series or instance
    original: str  # a patient as "issuer/ID" when the files named an issuer
    study_uid: str | None = None  # the original study of a study, series or instance
    patient_id: str | None = None  # that study's patient, while the study is still cached


@dataclass(frozen=True)
class Reidentified:
    project_id: str
    pseudonym: str
    originals: list[Original]
    audit_seq: int


def reidentify(ctx: ServiceContext, who: Principal, project_id: str, pseudonym: str,
               justification: str) -> Reidentified:
    """The original(s) behind ``pseudonym`` in ``project_id``, for its lead or an admin, with a reason."""
    policy = load_policy(ctx, project_id)
    asked = {"operation": OPERATION, "pseudonym": pseudonym[:80], "justification": justification[:MAX_JUSTIFICATION]}
    denial = reidentify_denial(admin=who.is_admin, lead=policy.members.get(who.login) == MemberRole.LEAD,
                               project_active=policy.active,
                               irb_active=irb_active_at(policy.expires, ctx.clock.now(), policy.timezone))
    if denial is not None:
        ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=project_id, detail={**asked, "reason": denial})
        raise AccessDenied(f"project {project_id!r}: {denial}; " + (
            "only its lead or an admin may re-identify pseudonyms" if denial == NOT_LEAD
            else "an admin may re-identify, or enter the renewed approval first"))
    problem = input_problem(pseudonym, justification)
    if problem is not None:
        ctx.audit.record(who, Action.REIDENTIFY, Outcome.FAILED, project_id=project_id,
                         detail={**asked, "reason": problem})
        raise InvalidInput(problem)
    originals = lookup(ctx, project_id, pseudonym)
    if not originals:
        ctx.audit.record(who, Action.REIDENTIFY, Outcome.FAILED, project_id=project_id,
                         detail={**asked, "reason": "unknown pseudonym"})
        raise NotFound(f"project {project_id!r} handed out no pseudonym {pseudonym!r} (a pseudonymous PatientID, "
                       "or a Study, Series or SOP Instance UID from one of its de-identified exports)")
    first = originals[0]
    seq = ctx.audit.record(
        who, Action.REIDENTIFY, Outcome.OK, project_id=project_id, patient_id=first.patient_id or (
            first.original if first.kind == "patient" else None), study_uid=first.study_uid,
        detail={**asked, "found": [{"kind": o.kind, "original": o.original} for o in originals]})
    return Reidentified(project_id, pseudonym, originals, seq)


def input_problem(pseudonym: str, justification: str) -> str | None:
    if not PSEUDONYM.match(pseudonym):
        return ("a pseudonym is the pseudonymous PatientID (P and 12 letters and digits) or a 2.25. UID from a "
                "de-identified export, at most 64 characters")
    text = justification.strip()
    if len(text) < MIN_JUSTIFICATION:
        return (f"give the reason for re-identifying (at least {MIN_JUSTIFICATION} characters: the finding, "
                "the IRB approval or the request it answers); it goes to the audit trail")
    if len(justification) > MAX_JUSTIFICATION:
        return f"the justification is {len(justification)} characters; shorten it to at most {MAX_JUSTIFICATION}"
    if any(unicodedata.category(c) == "Cc" and c not in "\n\t" for c in justification):
        return "the justification has control characters; write it as plain text"
    return None


def lookup(ctx: ServiceContext, project_id: str, pseudonym: str) -> list[Original]:
    with ctx.sessions() as session:
        mapped = session.execute(select(DeidMapping.kind, DeidMapping.original).where(
            DeidMapping.project_id == project_id, DeidMapping.pseudonym == pseudonym)
            .order_by(DeidMapping.kind, DeidMapping.original)).all()
        found = [Original(kind, original, original if kind == "study" else None) for kind, original in mapped]
        if not found and pseudonym.startswith(UID_PSEUDONYM):
            found = _series_or_instance(session, project_id, pseudonym)
        patients = dict(session.execute(select(CachedStudy.study_uid, CachedStudy.patient_id).where(
            CachedStudy.project_id == project_id,
            CachedStudy.study_uid.in_({o.study_uid for o in found if o.study_uid}))).all())
        cached_ids = set(session.scalars(select(CachedStudy.patient_id).where(
            CachedStudy.project_id == project_id,
            CachedStudy.patient_id.in_({c for o in found if o.kind == "patient" for c in _id_candidates(o.original)}))))
    return [Original(o.kind, o.original, o.study_uid, patients.get(o.study_uid or "") if o.study_uid else
                     next((c for c in _id_candidates(o.original) if c in cached_ids), None)) for o in found]


def _id_candidates(original: str) -> list[str]:
    """The PatientID an "issuer/ID" original may end with, longest first (an issuer or an ID may hold a slash)."""
    return [original] + [original[i + 1:] for i, c in enumerate(original) if c == "/"]


def _series_or_instance(session: Session, project_id: str, pseudonym: str) -> list[Original]:
    """Series and instances are not recorded one by one: recompute those of the studies the project exported."""
    key = session.get(DeidKey, project_id)
    if key is None:
        return []
    pseudo = Pseudonymizer(bytes.fromhex(key.secret))
    exported = select(DeidMapping.original).where(DeidMapping.project_id == project_id, DeidMapping.kind == "study")
    rows = session.execute(
        select(CachedStudy.study_uid, CachedInstance.series_uid, CachedInstance.sop_instance_uid)
        .join(CachedInstance, CachedInstance.cached_study_id == CachedStudy.id)
        .where(CachedStudy.project_id == project_id, CachedStudy.study_uid.in_(exported))
        .execution_options(yield_per=2000))
    found: dict[tuple[str, str], Original] = {}
    series_seen: set[str] = set()
    for study_uid, series_uid, sop_uid in rows:
        if series_uid not in series_seen and pseudo.uid(series_uid) == pseudonym:
            found.setdefault(("series", series_uid), Original("series", series_uid, study_uid))
        series_seen.add(series_uid)
        if pseudo.uid(sop_uid) == pseudonym:
            found.setdefault(("instance", sop_uid), Original("instance", sop_uid, study_uid))
    return list(found.values())
