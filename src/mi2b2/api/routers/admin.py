from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from mi2b2.api.deps import AdminUser, ContextDep
from mi2b2.api.schemas import UserBody

router = APIRouter(prefix="/admin", tags=["admin"])


@router.post("/config/reload")
def reload_config(user: AdminUser, ctx: ContextDep) -> dict[str, Any]:
    return {"status": "reloaded", **ctx.reload_config(user).summary()}


@router.get("/users")
def list_users(_user: AdminUser, ctx: ContextDep) -> list[dict[str, Any]]:
    return [asdict(u) for u in ctx.accounts.list_users()]


@router.post("/users")
def add_user(body: UserBody, user: AdminUser, ctx: ContextDep) -> dict[str, Any]:
    return asdict(ctx.accounts.add_user(user, body.login, body.role, body.password, body.display_name, body.email))


@router.get("/tokens")
def list_tokens(_user: AdminUser, ctx: ContextDep) -> list[dict[str, Any]]:
    return [asdict(t) for t in ctx.accounts.list_tokens()]
