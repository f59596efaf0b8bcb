"""Mirror the site configuration into the database, and reload it live.

The file is the source of truth for institutions, PACS nodes, destinations and
projects; the database holds a copy so that every worker and receiver process,
on any host, applies the same allow-lists and limits. Things removed from the
file are marked inactive rather than deleted: old requests and audit rows
still refer to them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.orm import Session

from mi2b2.adapters.db.tables import (
    Department,
    Destination,
    Institution,
    PacsNode,
    Project,
    ProjectMember,
    ProjectMrn,
    Request,
)
from mi2b2.config import SiteConfig
from mi2b2.domain.clock import SystemClock
from mi2b2.domain.mrn import AllowedMrn
from mi2b2.domain.requests import RequestState
from mi2b2.services.request_rows import mark_ended


@dataclass(frozen=True)
class CanceledRequest:
    """A queued request canceled because its owner left the project."""

    request_id: int
    kind: str
    project_id: str
    login: str
    pacs_id: str | None
    patient_id: str
    study_uid: str
    reason: str


@dataclass
class ConfigChanges:
    added: list[str] = field(default_factory=list)
    changed: list[str] = field(default_factory=list)
    deactivated: list[str] = field(default_factory=list)
    allow_list_sizes: dict[str, int] = field(default_factory=dict)
    canceled: list[CanceledRequest] = field(default_factory=list)  # audited one by one by the caller

    def summary(self) -> dict[str, Any]:
        return {
            "added": self.added,
            "changed": self.changed,
            "deactivated": self.deactivated,
            "allow_list_sizes": self.allow_list_sizes,
            "requests_canceled": len(self.canceled),
        }


def _upsert(session: Session, model: type, key: Any, values: dict[str, Any], label: str, changes: ConfigChanges) -> Any:
    row = session.get(model, key)
    if row is None:
        row = model(**values)
        session.add(row)
        changes.added.append(label)
        return row
    differs = any(getattr(row, name) != value for name, value in values.items())
    for name, value in values.items():
        setattr(row, name, value)
    if differs:
        changes.changed.append(label)
    return row


def apply_config(session: Session, config: SiteConfig, now: datetime | None = None) -> ConfigChanges:
    """Bring the database in line with ``config`` inside the caller's transaction.

    Queued requests of members who left a project are canceled (``now`` is their end time)."""
    now = now or SystemClock().now()
    changes = ConfigChanges()
    seen_institutions: set[str] = set()
    seen_pacs: set[str] = set()
    for inst in config.institutions:
        seen_institutions.add(inst.id)
        _upsert(session, Institution, inst.id, {
            "id": inst.id, "name": inst.name or inst.id, "active": True,
            "settings": {"mrn_format": inst.mrn_format.model_dump(mode="json"), "issuer": inst.issuer},
        }, f"institution {inst.id}", changes)
        for dept in inst.departments:
            department = session.scalar(
                select(Department).where(Department.institution_id == inst.id, Department.key == dept.id)
            )
            if department is None:
                department = Department(institution_id=inst.id, key=dept.id, name=dept.name or dept.id, active=True)
                session.add(department)
                session.flush()
                changes.added.append(f"department {inst.id}/{dept.id}")
            department.active = True
            for pacs in dept.pacs:
                seen_pacs.add(pacs.id)
                settings = pacs.model_dump(mode="json", include={"timezone", "timeouts", "windows",
                                                                 "find_result_limit", "default_max_concurrent"})
                _upsert(session, PacsNode, pacs.id, {
                    "id": pacs.id, "department_id": department.id, "name": pacs.name or pacs.id,
                    "ae_title": pacs.ae_title, "host": pacs.host, "port": pacs.port,
                    "retrieve_method": pacs.retrieve.value, "query_model": pacs.query_model.value,
                    "settings": settings, "active": True,
                }, f"pacs {pacs.id}", changes)
    _deactivate_missing(session, Institution, seen_institutions, "institution", changes)
    _deactivate_missing(session, PacsNode, seen_pacs, "pacs", changes)

    seen_destinations: set[str] = set()
    for dest in config.destinations:
        seen_destinations.add(dest.id)
        _upsert(session, Destination, dest.id, {
            "id": dest.id, "name": dest.name or dest.id, "ae_title": dest.ae_title, "host": dest.host,
            "port": dest.port, "active": True,
            "settings": dest.model_dump(mode="json", include={"tls", "projects", "max_concurrent", "timeouts"}),
        }, f"destination {dest.id}", changes)
    _deactivate_missing(session, Destination, seen_destinations, "destination", changes)

    seen_projects: set[str] = set()
    for project in config.projects:
        seen_projects.add(project.id)
        _upsert(session, Project, project.id, {
            "id": project.id, "title": project.title, "irb_number": project.irb, "expires_on": project.expires,
            "quota_bytes": project.quota, "max_studies_per_patient": project.max_studies_per_patient,
            "institutions": list(project.institutions), "active": True,
        }, f"project {project.id}", changes)
        session.flush()
        _replace_members(session, project.id, {m.login: m.role.value for m in project.members}, changes, now)
        mrns = config.allow_list(project)
        _replace_allow_list(session, project.id, mrns, changes)
        changes.allow_list_sizes[project.id] = len(mrns)
    _deactivate_missing(session, Project, seen_projects, "project", changes)
    return changes


def _deactivate_missing(session: Session, model: Any, seen: set[str], label: str, changes: ConfigChanges) -> None:
    for row in session.scalars(select(model).where(model.active.is_(True), model.id.not_in(seen or {""}))):
        row.active = False
        changes.deactivated.append(f"{label} {row.id}")


def _replace_members(session: Session, project_id: str, members: dict[str, str], changes: ConfigChanges,
                     now: datetime) -> None:
    current = {m.login: m.role for m in session.scalars(select(ProjectMember).where(ProjectMember.project_id == project_id))}
    if current == members:
        return
    session.execute(delete(ProjectMember).where(ProjectMember.project_id == project_id))
    session.add_all(ProjectMember(project_id=project_id, login=login, role=role) for login, role in members.items())
    changes.changed.append(f"members of {project_id}")
    _cancel_queued_of(session, project_id, sorted(set(current) - set(members)), changes, now)


def _cancel_queued_of(session: Session, project_id: str, logins: list[str], changes: ConfigChanges,
                      now: datetime) -> None:
    """A member who leaves a project takes their queued requests with them: nobody is left to own them."""
    if not logins:
        return
    rows = session.scalars(
        select(Request).where(Request.project_id == project_id, Request.user_login.in_(logins),
                              Request.state == RequestState.SCHEDULED.value)
        .order_by(Request.id).with_for_update()
    ).all()
    for row in rows:
        reason = f"{row.user_login} is no longer a member of project {project_id}"
        mark_ended(row, RequestState.CANCELED, f"canceled: {reason}", None, now)
        changes.canceled.append(CanceledRequest(row.id, row.kind, project_id, row.user_login, row.pacs_id,
                                                row.patient_id, row.study_uid, reason))


def _replace_allow_list(session: Session, project_id: str, mrns: list[AllowedMrn], changes: ConfigChanges) -> None:
    current = {AllowedMrn(i, m) for i, m in session.execute(
        select(ProjectMrn.institution_id, ProjectMrn.mrn).where(ProjectMrn.project_id == project_id))}
    wanted = set(mrns)
    if current == wanted:
        return
    removed = current - wanted
    for institution_id in sorted({e.institution for e in removed}):
        gone = sorted(e.mrn for e in removed if e.institution == institution_id)
        for chunk in _chunks(gone, 500):
            session.execute(delete(ProjectMrn).where(ProjectMrn.project_id == project_id,
                                                     ProjectMrn.institution_id == institution_id,
                                                     ProjectMrn.mrn.in_(chunk)))
    added = wanted - current
    session.add_all(ProjectMrn(project_id=project_id, institution_id=e.institution, mrn=e.mrn) for e in added)
    changes.changed.append(f"allow-list of {project_id} (+{len(added)} -{len(removed)})")


def _chunks(items: list[str], size: int) -> list[list[str]]:
    return [items[i:i + size] for i in range(0, len(items), size)]
