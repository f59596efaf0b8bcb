from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from mi2b2.api.deps import AdminUser, ContextDep
from mi2b2.api.schemas.accounts import TokenRow, UserRow
from mi2b2.api.schemas.admin import AllowListReport, ConfigReloaded, ProjectOverview, PurgeReport
from mi2b2.api.schemas.bodies import AllowListBody, UserBody
from mi2b2.services import admin as service
from mi2b2.services import purge

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/config/reload", response_model=ConfigReloaded)
def reload_config(user: AdminUser, ctx: ContextDep) -> dict[str, Any]:
    return {"status": "reloaded", **ctx.reload_config(user).summary()}


@router.get("/projects", response_model=list[ProjectOverview])
def list_projects(user: AdminUser, ctx: ContextDep) -> list[dict[str, Any]]:
    """Every project, configured or not: IRB, expiry, members, quota and cache use, allow-list size."""
    return [asdict(p) for p in service.list_projects(ctx, user)]


@router.post("/projects/{project_id}/mrns", response_model=AllowListReport)
def replace_allow_list(project_id: str, body: AllowListBody, user: AdminUser, ctx: ContextDep) -> dict[str, Any]:
    """Replace one institution's MRN allow-list of the project: written to the file the configuration names
    for it, then the configuration is reloaded. Name the institution when the project reaches several.

    Every line must be a usable MRN of that institution, or nothing is written."""
    return asdict(service.replace_allow_list(ctx, user, project_id, body.mrns, body.institution))


@router.get("/purge", response_model=PurgeReport)
def closed_studies(user: AdminUser, ctx: ContextDep) -> dict[str, Any]:
    """What a purge would delete now: cached studies the data policy has closed, each with its reason (audited)."""
    return _purge_json(purge.purge(ctx, user, apply=False))


@router.post("/purge", response_model=PurgeReport)
def purge_closed(user: AdminUser, ctx: ContextDep) -> dict[str, Any]:
    """Delete the cached studies the data policy has closed; every deletion is audited with its reason."""
    return _purge_json(purge.purge(ctx, user, apply=True))


def _purge_json(report: purge.PurgeReport) -> dict[str, Any]:
    return {"applied": report.applied, **report.counts(), "studies": [asdict(s) for s in report.studies],
            "busy": [asdict(s) for s in report.busy]}


@router.get("/users", response_model=list[UserRow])
def list_users(_user: AdminUser, ctx: ContextDep) -> list[dict[str, Any]]:
    return [asdict(u) for u in ctx.accounts.list_users()]


@router.post("/users", response_model=UserRow)
def add_user(body: UserBody, user: AdminUser, ctx: ContextDep) -> dict[str, Any]:
    return asdict(ctx.accounts.add_user(user, body.login, body.role, body.password, body.display_name, body.email))


@router.get("/tokens", response_model=list[TokenRow])
def list_tokens(_user: AdminUser, ctx: ContextDep) -> list[dict[str, Any]]:
    return [asdict(t) for t in ctx.accounts.list_tokens()]
