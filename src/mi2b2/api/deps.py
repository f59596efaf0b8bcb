"""Dependencies shared by the routers: the service context and the caller."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Annotated, TypeVar

from fastapi import Depends, Request

from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.context import ServiceContext

SESSION_COOKIE = "mi2b2_session"


class NotAuthenticated(AccessDenied):
    """No valid token or session: the API answers 401 rather than 403."""


_CREATE = threading.Lock()
T = TypeVar("T")


def app_service(request: Request, name: str, create: Callable[[ServiceContext], T]) -> T:
    """One ``create(context)`` per app, made on first use: for services that keep memory between calls."""
    state = request.app.state
    service = getattr(state, name, None)
    if service is None:
        with _CREATE:
            service = getattr(state, name, None)
            if service is None:
                service = create(state.context)
                setattr(state, name, service)
    return service


def get_context(request: Request) -> ServiceContext:
    context: ServiceContext = request.app.state.context
    return context


ContextDep = Annotated[ServiceContext, Depends(get_context)]


def bearer_secret(request: Request) -> str | None:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("bearer "):
        return header[7:].strip()
    return request.cookies.get(SESSION_COOKIE)


SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def _check_same_origin(request: Request) -> None:
    """A change made with the session cookie must come from mi2b2's own pages.

    SameSite=Strict keeps other sites out, but not a sibling host of the same
    site; the browser's Sec-Fetch-Site (or Origin) header tells them apart."""
    fetch_site = request.headers.get("sec-fetch-site")
    origin = request.headers.get("origin")
    if fetch_site is not None:
        allowed = fetch_site in ("same-origin", "none")
    elif origin is not None:
        allowed = origin == f"{request.url.scheme}://{request.headers.get('host', '')}"
    else:
        allowed = True  # not a browser: it sent the cookie itself
    if not allowed:
        raise AccessDenied("this change came from another site's page; use mi2b2's own pages, or an API token")


def current_user(request: Request, ctx: ContextDep) -> Principal:
    secret = bearer_secret(request)
    if secret and not request.headers.get("authorization") and request.method not in SAFE_METHODS:
        _check_same_origin(request)
    client = request.client.host if request.client else ""
    principal = ctx.accounts.authenticate(secret, client) if secret else None
    if principal is None:
        raise NotAuthenticated("log in first: send 'Authorization: Bearer <token>' or log in at /api/v1/auth/login")
    return principal


CurrentUser = Annotated[Principal, Depends(current_user)]


def require_admin(user: CurrentUser, request: Request, ctx: ContextDep) -> Principal:
    if user.role is not Role.ADMIN:
        # The route's template, not the URL: a path parameter stays out of the trail.
        route = getattr(request.scope.get("route"), "path", "")
        ctx.audit.record(user, Action.DENIED, Outcome.DENIED,
                         detail={"reason": "not an admin", "operation": f"{request.method} {route}"})
        raise AccessDenied("this needs the admin role")
    return user


AdminUser = Annotated[Principal, Depends(require_admin)]
