"""The image viewer over HTTP: its API on a project's cache, its page, and the local app of `mi2b2 view`.

Every response says ``Cache-Control: no-store``: images and tags are patient
data, and neither the browser nor a proxy should keep a copy on disk.
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable, Coroutine
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse, RedirectResponse
from fastapi.routing import APIRoute

from mi2b2.api.deps import CurrentUser, app_service
from mi2b2.api.errors import install_error_handlers, status_for
from mi2b2.api.schemas.bodies import FrameNumber
from mi2b2.api.schemas.viewer import ImageTags, LocalViewerStudy, LocalViewerTree, ViewerStudy, ViewerTree
from mi2b2.errors import AccessDenied, Mi2b2Error
from mi2b2.services.viewer import CacheViewer, LocalLibrary, frame_headers
from mi2b2.web.pages import static_file

NO_STORE = "no-store"
# The page loads nothing from elsewhere and may be framed only by mi2b2's own client (Tab 4);
# blob: is for the rendered frames.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'self'; img-src 'self' blob: data:; object-src 'none'; "
                               "base-uri 'none'; frame-ancestors 'self'; form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # the local viewer's URL carries its token
    "Cache-Control": NO_STORE,
}


class NoStoreRoute(APIRoute):
    """A route whose every response carries ``Cache-Control: no-store`` (and nosniff)."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def no_store(request: Request) -> Response:
            try:
                response = await handler(request)
            except Mi2b2Error as error:
                # Answered here rather than by the app's handler (same body) so refusals carry no-store too.
                response = JSONResponse({"error": str(error), "kind": type(error).__name__},
                                        status_code=status_for(error))
            response.headers["Cache-Control"] = NO_STORE
            response.headers["X-Content-Type-Options"] = "nosniff"
            return response

        return no_store


router = APIRouter(prefix="/projects/{project_id}/viewer", tags=["viewer"], route_class=NoStoreRoute)
page_router = APIRouter(tags=["viewer"], include_in_schema=False)

Center = Annotated[float | None, Query(description="window centre (after RescaleSlope/Intercept)")]
Width = Annotated[float | None, Query(description="window width, > 0")]
PresetName = Annotated[str | None, Query(description="brain, subdural, stroke, soft_tissue, abdomen, liver, "
                                                     "mediastinum, lung, bone or temporal_bone")]


def get_viewer(request: Request) -> CacheViewer:
    """One viewer per app: it holds the decoded-frame memory and the audit de-duplication."""
    return app_service(request, "viewer", CacheViewer)


ViewerDep = Annotated[CacheViewer, Depends(get_viewer)]


def png_response(rendered: Any) -> Response:
    return Response(rendered.png, media_type="image/png", headers=frame_headers(rendered))


@router.get("/tree", response_model=ViewerTree)
def tree(project_id: str, user: CurrentUser, viewer: ViewerDep) -> dict[str, Any]:
    """Patients and their cached studies (patient ids travel in this body, never in URLs)."""
    return viewer.tree(user, project_id)


@router.get("/studies/{study_uid}", response_model=ViewerStudy)
def study(project_id: str, study_uid: str, user: CurrentUser, viewer: ViewerDep) -> dict[str, Any]:
    """A cached study's series and their images, in order."""
    return viewer.study(user, project_id, study_uid)


@router.get("/instances/{sop_uid}/tags", response_model=ImageTags)
def tags(project_id: str, sop_uid: str, user: CurrentUser, viewer: ViewerDep) -> dict[str, Any]:
    """Common tags of an image, with its frame count, size and transfer syntax."""
    return viewer.tags(user, project_id, sop_uid)


@router.get("/instances/{sop_uid}/frames/{number}.png", response_class=Response,
            responses={200: {"content": {"image/png": {}}}})
def frame(project_id: str, sop_uid: str, number: FrameNumber, user: CurrentUser, viewer: ViewerDep,
          center: Center = None, width: Width = None, preset: PresetName = None) -> Response:
    """Frame ``number`` (from 1) as PNG; the window applied comes back in X-Window-Center/X-Window-Width."""
    return png_response(viewer.frame(user, project_id, sop_uid, number, center, width, preset))


# --- the page -----------------------------------------------------------------------------------


def asset(name: str) -> Response:
    return static_file("viewer", name, PAGE_HEADERS, "viewer")


@page_router.get("/viewer")
def viewer_root() -> RedirectResponse:
    return RedirectResponse("/viewer/", status_code=308)


@page_router.get("/viewer/")
def viewer_page() -> Response:
    """The viewer page; it asks for a login and a project itself."""
    return asset("index.html")


@page_router.get("/viewer/{name}")
def viewer_asset(name: str) -> Response:
    return asset(name)


# --- `mi2b2 view`: the same page and API over a local download -------------------------------------


def create_local_app(library: LocalLibrary, token: str, allowed_hosts: set[str] | None = None) -> FastAPI:
    """The app ``mi2b2 view`` serves on 127.0.0.1: every path starts with the random token.

    ``allowed_hosts`` (host:port values) refuses requests addressed by any other
    name, so a web page elsewhere cannot reach this server through DNS rebinding."""
    app = FastAPI(title="mi2b2 view", docs_url=None, redoc_url=None, openapi_url=None)
    install_error_handlers(app)

    @app.middleware("http")
    async def guard(request: Request, call_next: Callable[[Request], Awaitable[Response]]) -> Response:
        if allowed_hosts is not None and request.headers.get("host", "") not in allowed_hosts:
            return JSONResponse({"error": "this viewer answers only on the address it printed", "kind": "AccessDenied"},
                                status_code=403, headers={"Cache-Control": NO_STORE})
        response = await call_next(request)
        response.headers["Cache-Control"] = NO_STORE
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["Referrer-Policy"] = "no-referrer"
        return response

    def check(token_in_path: str) -> None:
        if not hmac.compare_digest(token_in_path.encode(), token.encode()):
            raise AccessDenied("this viewer needs the token from its URL: open the exact URL `mi2b2 view` printed")

    local = APIRouter(prefix="/{t}", dependencies=[Depends(_token_dependency(check))])

    @app.get("/")
    def bare() -> Response:
        raise AccessDenied("this viewer needs the token from its URL: open the exact URL `mi2b2 view` printed")

    @local.get("")
    def page_without_slash(t: str) -> RedirectResponse:
        return RedirectResponse(f"/{t}/", status_code=308)

    @local.get("/")
    def page() -> Response:
        return asset("index.html")

    @local.get("/api/tree", response_model=LocalViewerTree)
    def local_tree() -> dict[str, Any]:
        return library.tree()

    @local.get("/api/studies/{study_uid}", response_model=LocalViewerStudy)
    def local_study(study_uid: str) -> dict[str, Any]:
        return library.study(study_uid)

    @local.get("/api/instances/{sop_uid}/tags", response_model=ImageTags)
    def local_tags(sop_uid: str) -> dict[str, Any]:
        return library.tags(sop_uid)

    @local.get("/api/instances/{sop_uid}/frames/{number}.png")
    def local_frame(sop_uid: str, number: FrameNumber, center: Center = None, width: Width = None,
                    preset: PresetName = None) -> Response:
        return png_response(library.frame(sop_uid, number, center, width, preset))

    @local.get("/{name}")
    def local_asset(name: str) -> Response:
        return asset(name)

    app.include_router(local)
    return app


def _token_dependency(check: Callable[[str], None]) -> Callable[[str], None]:
    def token_dependency(t: str) -> None:
        check(t)

    return token_dependency
