"""The IRB allow-list as the database holds it.

The one place every door asks whether a patient is on a project's list: the
search, the answers, request add, the scheduler, the receiver, the cache
check, forward and the read doors. A patient is named by the PACS that holds
them, since an MRN means nothing without the institution that issued it.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from mi2b2.adapters.db.tables import ProjectMrn

CHUNK = 500  # bound the IN list; some databases cap bound parameters


def allowed_patients(session: Session, project_id: str, pacs_id: str | None, patient_ids: Iterable[str]) -> set[str]:
    """Those of ``patient_ids``, as the PACS ``pacs_id`` names them, that the project's IRB allows."""
    candidates = sorted({p for p in patient_ids if p})
    allowed: set[str] = set()
    for start in range(0, len(candidates), CHUNK):
        chunk = candidates[start:start + CHUNK]
        allowed.update(session.scalars(
            select(ProjectMrn.mrn).where(ProjectMrn.project_id == project_id, ProjectMrn.mrn.in_(chunk))
        ))
    return allowed


def patient_allowed(session: Session, project_id: str, pacs_id: str | None, patient_id: str) -> bool:
    return bool(allowed_patients(session, project_id, pacs_id, [patient_id]))


def on_allow_list(project_id: Any, pacs_id: Any, patient_id: Any) -> Any:
    """An SQL EXISTS over the columns of a row (a request, a cached study): is its patient still allowed?"""
    return (
        select(ProjectMrn.mrn)
        .where(ProjectMrn.project_id == project_id, ProjectMrn.mrn == patient_id)
        .exists()
    )
