"""Single sign-on with the site's OpenID provider: browser navigations, answered with redirects or a page."""

from __future__ import annotations

import html
import logging

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from mi2b2.api.deps import SESSION_COOKIE, ContextDep
from mi2b2.api.errors import status_for
from mi2b2.errors import Mi2b2Error, NotFound
from mi2b2.services.context import ServiceContext
from mi2b2.services.oidc_login import LOGIN_WINDOW, OidcSignIn
from mi2b2.web.pages import PAGE_HEADERS

LOG = logging.getLogger(__name__)
PREFIX = "/api/v1/auth/oidc"
BROWSER_COOKIE = "mi2b2_oidc"
START = f"{PREFIX}/start"
CALLBACK = f"{PREFIX}/callback"

router = APIRouter(prefix="/auth/oidc", tags=["auth"], include_in_schema=False)


def base_url(request: Request, ctx: ServiceContext) -> str:
    return ctx.config.server.public_url or str(request.base_url).rstrip("/")


def _sign_in(ctx: ServiceContext) -> OidcSignIn:
    if ctx.oidc is None:
        raise NotFound("single sign-on is not configured on this site; add an [oidc] section, or sign in with a "
                       "password")
    return ctx.oidc


@router.get("/start")
def start(request: Request, ctx: ContextDep) -> Response:
    client = request.client.host if request.client else ""
    try:
        started = _sign_in(ctx).start(base_url(request, ctx) + CALLBACK, client)
    except Mi2b2Error as error:
        return _error_page(error)
    response = RedirectResponse(started.authorization_url, status_code=303)
    # Lax, not Strict: the provider sends the browser back with a cross-site top-level navigation.
    response.set_cookie(BROWSER_COOKIE, started.browser_secret, httponly=True, samesite="lax",
                        secure=request.url.scheme == "https", max_age=int(LOGIN_WINDOW.total_seconds()), path=PREFIX)
    return response


@router.get("/callback")
def callback(request: Request, ctx: ContextDep) -> Response:
    client = request.client.host if request.client else ""
    response: Response
    params = {key: value[:2048] for key, value in request.query_params.items()}
    try:
        principal, session = _sign_in(ctx).finish(params, request.cookies.get(BROWSER_COOKIE),
                                                  base_url(request, ctx) + CALLBACK, client)
    except Mi2b2Error as error:
        response = _error_page(error)
    else:
        LOG.info("%s signed in through the OpenID provider", principal.login)
        response = RedirectResponse("/app/", status_code=303)
        response.set_cookie(SESSION_COOKIE, session.secret, httponly=True, samesite="strict",
                            secure=request.url.scheme == "https", max_age=int(ctx.config.server.session_hours * 3600),
                            path="/")
    response.delete_cookie(BROWSER_COOKIE, path=PREFIX)  # used once, whatever happened
    return response


def _error_page(error: Mi2b2Error) -> HTMLResponse:
    message = html.escape(str(error))
    body = ("<!doctype html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>mi2b2: sign-in refused</title>"
            "<link rel=\"stylesheet\" href=\"/app/app.css\"></head><body><main class=\"card\">"
            f"<h1>Sign-in refused</h1><p id=\"sign-in-error\" role=\"alert\">{message}</p>"
            "<p><a href=\"/app/\">Back to mi2b2's sign-in page</a></p></main></body></html>")
    return HTMLResponse(body, status_code=status_for(error), headers=PAGE_HEADERS)
