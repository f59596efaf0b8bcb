"""The IRB allow-list as the database holds it.

The one place every door asks whether a patient is on a project's list: the
search, the answers, request add, the scheduler, the receiver, the cache
check, forward and the read doors. A patient is named by the PACS that holds
them, since an MRN means nothing without the institution that issued it: the
PACS tells the institution (pacs_nodes -> departments -> institutions), the
institution's MRN format turns the PACS's spelling into the canonical form the
list holds, and the entry must be (that institution, that MRN).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from mi2b2.adapters.db.tables import CachedStudy, Department, Institution, PacsNode, Project, ProjectMrn, Request
from mi2b2.domain.mrn import IDENTITY, MrnFormat

CHUNK = 500  # bound the IN list; some databases cap bound parameters


@dataclass(frozen=True)
class PatientRules:
    """How patients found at one PACS are named: its institution, MRN format and issuer."""

    institution_id: str
    format: MrnFormat = IDENTITY
    issuer: str | None = None


def institution_rules(session: Session, project_id: str, pacs_id: str | None) -> PatientRules | None:
    """The rules for patients of ``pacs_id`` in ``project_id``; None when the project may not reach it.

    Without a PACS (a row that never recorded where its patient came from) the
    patient can only be placed when the project reaches a single institution."""
    project = session.get(Project, project_id)
    if project is None:
        return None
    reached = [str(i) for i in (project.institutions or [])]
    if pacs_id is None:
        if len(reached) != 1:
            return None
        institution = session.get(Institution, reached[0])
    else:
        institution = session.execute(
            select(Institution)
            .join(Department, Department.institution_id == Institution.id)
            .join(PacsNode, PacsNode.department_id == Department.id)
            .where(PacsNode.id == pacs_id)
        ).scalar_one_or_none()
    if institution is None or institution.id not in reached:
        return None
    return rules_of(institution)


def rules_of(institution: Institution) -> PatientRules:
    settings = institution.settings or {}
    fmt = settings.get("mrn_format") or {}
    return PatientRules(
        institution.id,
        MrnFormat(fmt.get("remove", ""), fmt.get("digits"), bool(fmt.get("strip_leading_zeros")), fmt.get("case", "keep")),
        settings.get("issuer"),
    )


def allowed_patients(session: Session, project_id: str, pacs_id: str | None, patient_ids: Iterable[str]) -> set[str]:
    """Those of ``patient_ids``, as the PACS ``pacs_id`` names them, that the project's IRB allows."""
    rules = institution_rules(session, project_id, pacs_id)
    if rules is None:
        return set()
    canonical: dict[str, set[str]] = {}
    for patient_id in {p for p in patient_ids if p}:
        form = rules.format.canonical_or_none(patient_id)
        if form is not None:
            canonical.setdefault(form, set()).add(patient_id)
    candidates = sorted(canonical)
    allowed: set[str] = set()
    for start in range(0, len(candidates), CHUNK):
        chunk = candidates[start:start + CHUNK]
        for mrn in session.scalars(select(ProjectMrn.mrn).where(
            ProjectMrn.project_id == project_id, ProjectMrn.institution_id == rules.institution_id,
            ProjectMrn.mrn.in_(chunk),
        )):
            allowed.update(canonical[mrn])
    return allowed


def patient_allowed(session: Session, project_id: str, pacs_id: str | None, patient_id: str) -> bool:
    return bool(allowed_patients(session, project_id, pacs_id, [patient_id]))


def on_allow_list(project_id: Any, pacs_id: Any, patient_id: Any) -> Any:
    """An SQL EXISTS over the columns of a row (a request, a cached study): is its patient still allowed?

    The row's patient id must be in its institution's canonical form, which is
    the form the PACS stores (the form mi2b2 searched it by); a row without a
    PACS matches nothing."""
    return (
        select(ProjectMrn.mrn)
        .join(Department, Department.institution_id == ProjectMrn.institution_id)
        .join(PacsNode, PacsNode.department_id == Department.id)
        .where(ProjectMrn.project_id == project_id, PacsNode.id == pacs_id, ProjectMrn.mrn == patient_id)
        .exists()
    )


def forward_on_allow_list() -> Any:
    """`on_allow_list` over a forward's request row. A forward names no PACS; the cached study it
    sends does, and tells which institution's patient it is."""
    source = select(CachedStudy.pacs_id).where(
        CachedStudy.project_id == Request.project_id, CachedStudy.study_uid == Request.study_uid,
    ).correlate(Request).scalar_subquery()
    return on_allow_list(Request.project_id, func.coalesce(Request.pacs_id, source), Request.patient_id)


def allow_list_sizes(session: Session) -> dict[str, int]:
    """Entries per project, all institutions together."""
    rows = session.execute(select(ProjectMrn.project_id, func.count()).group_by(ProjectMrn.project_id)).all()
    return {project_id: int(count) for project_id, count in rows}


def project_mrns(session: Session, project_id: str, among: Iterable[str] | None = None) -> set[str]:
    """The MRNs on a project's list, of any institution (to recognise them in free text, never to allow)."""
    statement = select(ProjectMrn.mrn).where(ProjectMrn.project_id == project_id)
    if among is not None:
        statement = statement.where(ProjectMrn.mrn.in_(sorted(set(among))[:1000]))
    return set(session.scalars(statement))
