"""The browser client: static files under mi2b2/web/static/app, served at /app/."""

from __future__ import annotations

from importlib import resources

from fastapi import APIRouter
from fastapi.responses import RedirectResponse, Response

from mi2b2.errors import NotFound

# Nothing is loaded from elsewhere (hospitals run offline) and the client may not be framed by other sites.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'none'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-cache",  # revalidate, so an upgrade of mi2b2 is seen at once
}
MEDIA_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}

router = APIRouter(include_in_schema=False)


def static_file(folder: str, relative: str, headers: dict[str, str], label: str) -> Response:
    """A page, script or style sheet of mi2b2/web/static/<folder>; nothing else, and nothing outside it."""
    parts = relative.split("/")
    suffix = "." + relative.rsplit(".", 1)[-1] if "." in relative else ""
    if suffix not in MEDIA_TYPES or any(part in ("", ".", "..") for part in parts):
        raise NotFound(f"no {label} file {relative!r}")
    file = resources.files("mi2b2.web").joinpath("static", folder, *parts)
    if not file.is_file():
        raise NotFound(f"no {label} file {relative!r}")
    return Response(file.read_bytes(), media_type=MEDIA_TYPES[suffix], headers=headers)


def _asset(relative: str) -> Response:
    return static_file("app", relative, PAGE_HEADERS, "client")


@router.get("/")
def root() -> RedirectResponse:
    return RedirectResponse("/app/", status_code=307)


@router.get("/app")
def app_without_slash() -> RedirectResponse:
    return RedirectResponse("/app/", status_code=308)


@router.get("/app/")
def client_page() -> Response:
    return _asset("index.html")


@router.get("/app/{relative:path}")
def client_file(relative: str) -> Response:
    return _asset(relative)
