from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request, Response

from mi2b2.api.deps import SESSION_COOKIE, ContextDep, CurrentUser, bearer_secret
from mi2b2.api.routers.oidc import START, base_url
from mi2b2.api.schemas.accounts import Identity, IssuedToken, LoggedOut, SignInMethods, TokenRow
from mi2b2.api.schemas.bodies import LoginBody, RowIdPath, TokenBody
from mi2b2.api.schemas.common import StatusReply
from mi2b2.services.oidc_login import VIA as OIDC

router = APIRouter(prefix="/auth", tags=["auth"])


@router.post("/login", response_model=Identity)
def login(body: LoginBody, request: Request, response: Response, ctx: ContextDep) -> dict[str, Any]:
    client = request.client.host if request.client else ""
    principal, session = ctx.accounts.login(body.login, body.password, client)
    response.set_cookie(
        SESSION_COOKIE, session.secret, httponly=True, samesite="strict", secure=request.url.scheme == "https",
        max_age=int(ctx.config.server.session_hours * 3600), path="/",
    )
    return {"login": principal.login, "role": principal.role.value, "display_name": principal.display_name}


@router.get("/methods", response_model=SignInMethods)
def methods(ctx: ContextDep) -> dict[str, Any]:
    oidc = ctx.config.oidc
    return {"password": "everyone" if oidc is None or oidc.local_passwords else "break-glass",
            "provider": None if ctx.oidc is None else {"name": ctx.oidc.provider_name, "url": START}}


@router.post("/logout", response_model=LoggedOut)
def logout(request: Request, response: Response, ctx: ContextDep) -> dict[str, Any]:
    secret = bearer_secret(request)
    via = ctx.accounts.logout(secret) if secret else None
    response.delete_cookie(SESSION_COOKIE, path="/")
    provider_logout = None
    if via == OIDC and ctx.oidc is not None:
        # RP-initiated logout: the browser goes on to end its session at the provider, when it offers that.
        provider_logout = ctx.oidc.logout_url(base_url(request, ctx) + "/app/")
    return {"status": "logged out", "provider_logout": provider_logout}


@router.get("/me", response_model=Identity)
def me(user: CurrentUser) -> dict[str, str]:
    return {"login": user.login, "role": user.role.value, "display_name": user.display_name}


@router.post("/tokens", response_model=IssuedToken)
def create_token(body: TokenBody, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    issued = ctx.accounts.create_token(user, user.login, body.name, body.days)
    return {"id": issued.id, "token": issued.secret, "expires_at": issued.expires_at,
            "note": "store this token now; it is not shown again"}


@router.get("/tokens", response_model=list[TokenRow])
def list_tokens(user: CurrentUser, ctx: ContextDep) -> list[dict[str, Any]]:
    return [asdict(t) for t in ctx.accounts.list_tokens(user.login)]


@router.delete("/tokens/{token_id}", response_model=StatusReply)
def revoke_token(token_id: RowIdPath, user: CurrentUser, ctx: ContextDep) -> dict[str, str]:
    ctx.accounts.revoke_token(user, token_id)
    return {"status": "revoked"}
