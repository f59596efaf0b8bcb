"""What someone may do with a project's cached studies: the one door every reader asks.

The cache listing, deletion, downloads (ZIP and the CLI's files), the viewer,
DICOMweb and forward all call `require_use` (the project: membership, IRB at
the project's local date, project still configured, data policy) and, for the
studies they touch, `require_readable` (each study's patient still on the
allow-list). The decision itself is `domain.governance.cached_data_denial`;
its reason is the error message and the audit detail.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import not_, select

from mi2b2.adapters.db.tables import CachedStudy
from mi2b2.domain.governance import (
    DataPolicy,
    DataUse,
    Denial,
    ProjectPolicy,
    cached_data_denial,
    closed_to_reads,
    irb_active_at,
)
from mi2b2.domain.principal import Principal
from mi2b2.errors import AccessDenied
from mi2b2.services.allow_list import on_allow_list
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.context import ServiceContext
from mi2b2.services.search import load_policy

CHUNK = 500


@dataclass(frozen=True)
class ProjectAccess:
    policy: ProjectPolicy
    irb_active: bool
    member: bool

    @property
    def closed_reason(self) -> str | None:
        """Why the project's cached studies are closed to every reader now (None while they are open)."""
        return closed_to_reads(self.policy.active, self.irb_active, True, self.policy.data_policy)


def project_access(ctx: ServiceContext, who: Principal, project_id: str) -> ProjectAccess:
    policy = load_policy(ctx, project_id)
    return ProjectAccess(policy, irb_active_at(policy.expires, ctx.clock.now(), policy.timezone),
                         who.login in policy.members)


def require_use(ctx: ServiceContext, who: Principal, project_id: str, use: DataUse, operation: str) -> ProjectAccess:
    """The project-wide part of the decision; refused (and audited) with its reason."""
    access = project_access(ctx, who, project_id)
    denial = cached_data_denial(
        use, member=access.member, admin=who.is_admin, project_active=access.policy.active,
        irb_active=access.irb_active, patient_allowed=True, policy=access.policy.data_policy,
    )
    if denial is not None:
        refuse(ctx, who, project_id, operation, denial, access.policy.data_policy)
    return access


def require_readable(
    ctx: ServiceContext, who: Principal, project_id: str, study_uids: Iterable[str], use: DataUse, operation: str
) -> ProjectAccess:
    """`require_use`, then every named study's patient must still be on the allow-list."""
    access = require_use(ctx, who, project_id, use, operation)
    require_patients_allowed(ctx, who, project_id, study_uids, operation)
    return access


def require_patients_allowed(
    ctx: ServiceContext, who: Principal, project_id: str, study_uids: Iterable[str], operation: str
) -> None:
    """Refuse (and audit) if the patient of any of these cached studies left the allow-list."""
    withdrawn = withdrawn_studies(ctx, project_id, study_uids)
    if not withdrawn:
        return
    for study_uid, patient_id in sorted(withdrawn.items()):
        ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=project_id, patient_id=patient_id,
                         study_uid=study_uid, detail={"reason": Denial.PATIENT_NOT_ALLOWED.value, "operation": operation})
    first = sorted(withdrawn)[0]
    more = f" (and {len(withdrawn) - 1} more)" if len(withdrawn) > 1 else ""
    raise AccessDenied(
        f"study {first}{more} of project {project_id!r}: {Denial.PATIENT_NOT_ALLOWED.value}; "
        "it can no longer be read and waits for an admin to purge it (`mi2b2 admin purge`)")


def withdrawn_studies(ctx: ServiceContext, project_id: str, study_uids: Iterable[str] | None = None) -> dict[str, str]:
    """study UID -> patient id, for those cached studies (all, if None) whose patient left the allow-list."""
    statement = select(CachedStudy.study_uid, CachedStudy.patient_id).where(
        CachedStudy.project_id == project_id, not_(patient_still_allowed()))
    with ctx.sessions() as session:
        if study_uids is None:
            return dict(session.execute(statement).all())
        wanted = sorted(set(study_uids))
        found: dict[str, str] = {}
        for start in range(0, len(wanted), CHUNK):
            found.update(session.execute(
                statement.where(CachedStudy.study_uid.in_(wanted[start:start + CHUNK]))).all())
        return found


def patient_still_allowed() -> Any:
    """SQL: the cached study's patient is on its project's allow-list, as the PACS it came from names them."""
    return on_allow_list(CachedStudy.project_id, CachedStudy.pacs_id, CachedStudy.patient_id)


def refuse(ctx: ServiceContext, who: Principal, project_id: str, operation: str, denial: Denial,
           policy: DataPolicy) -> None:
    ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=project_id,
                     detail={"reason": denial.value, "operation": operation})
    raise AccessDenied(f"project {project_id!r}: {denial.value}{_hint(denial, policy)}")


def _hint(denial: Denial, policy: DataPolicy) -> str:
    if denial in (Denial.IRB_EXPIRED, Denial.PROJECT_INACTIVE):
        return (f"; under the data policy {policy.value!r} its cached studies may only be listed and deleted "
                "(a renewed approval is entered as the project's new expiry date)")
    if denial is Denial.ADMIN_NOT_MEMBER:
        return "; admins manage and delete, and are added to the project to read its images"
    return ""
