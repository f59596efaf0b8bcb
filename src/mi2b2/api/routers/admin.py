from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from mi2b2.api.deps import AdminUser, ContextDep
from mi2b2.api.schemas import AllowListBody, UserBody
from mi2b2.services import admin as service

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/config/reload")
def reload_config(user: AdminUser, ctx: ContextDep) -> dict[str, Any]:
    return {"status": "reloaded", **ctx.reload_config(user).summary()}


@router.get("/projects")
def list_projects(user: AdminUser, ctx: ContextDep) -> list[dict[str, Any]]:
    """Every project, configured or not: IRB, expiry, members, quota and cache use, allow-list size."""
    return [asdict(p) for p in service.list_projects(ctx, user)]


@router.post("/projects/{project_id}/mrns")
def replace_allow_list(project_id: str, body: AllowListBody, user: AdminUser, ctx: ContextDep) -> dict[str, Any]:
    """Replace one institution's MRN allow-list of the project: written to the file the configuration names
    for it, then the configuration is reloaded. Name the institution when the project reaches several.

    Every line must be a usable MRN of that institution, or nothing is written."""
    return asdict(service.replace_allow_list(ctx, user, project_id, body.mrns, body.institution))


@router.get("/users")
def list_users(_user: AdminUser, ctx: ContextDep) -> list[dict[str, Any]]:
    return [asdict(u) for u in ctx.accounts.list_users()]


@router.post("/users")
def add_user(body: UserBody, user: AdminUser, ctx: ContextDep) -> dict[str, Any]:
    return asdict(ctx.accounts.add_user(user, body.login, body.role, body.password, body.display_name, body.email))


@router.get("/tokens")
def list_tokens(_user: AdminUser, ctx: ContextDep) -> list[dict[str, Any]]:
    return [asdict(t) for t in ctx.accounts.list_tokens()]
