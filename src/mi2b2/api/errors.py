"""The one place where mi2b2 errors become HTTP status codes."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mi2b2.adapters.db.outage import as_outage
from mi2b2.api.deps import NotAuthenticated
from mi2b2.api.schemas.common import ErrorBody
from mi2b2.errors import (
    AccessDenied,
    InvalidInput,
    LimitExceeded,
    Mi2b2Error,
    NotFound,
    PermanentError,
    RetriableError,
)

LOG = logging.getLogger(__name__)


# What any route can answer besides its success, documented once in the OpenAPI document (the app's
# handlers and its body limit make these, whatever the route): 422 is ours, not FastAPI's `detail` list.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": description}
    for status, description in (
        (400, "a limit was exceeded"),
        (401, "no valid token or session"),
        (403, "not allowed"),
        (404, "not found"),
        (413, "request body too large"),
        (422, "invalid input"),
        (500, "an unexpected error; the server log has details"),
        (502, "a PACS or destination refused"),
        (503, "a PACS, a destination or the database is unavailable; try again (after Retry-After seconds when given)"),
    )
}

STATUS = [
    (NotAuthenticated, 401),
    (AccessDenied, 403),
    (NotFound, 404),
    (LimitExceeded, 400),
    (InvalidInput, 422),
    (RetriableError, 503),
    (PermanentError, 502),
]


def status_for(error: Mi2b2Error) -> int:
    for kind, status in STATUS:
        if isinstance(error, kind):
            return status
    return 500


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Mi2b2Error)
    async def _mi2b2_error(_request: Request, error: Mi2b2Error) -> JSONResponse:
        return _answer(error)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(_request: Request, error: RequestValidationError) -> JSONResponse:
        problems = []
        for issue in error.errors():
            where = ".".join(str(part) for part in issue.get("loc", ()) if part != "body") or "body"
            problems.append(f"{where}: {issue.get('msg', 'invalid')}")
        return JSONResponse({"error": "invalid request: " + "; ".join(problems), "kind": "InvalidInput"},
                            status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        # Starlette's own refusals (a body that is not JSON text, an unknown path or method) in the same
        # {error, kind} shape as every other error, not FastAPI's {detail}.
        message = str(error.detail)
        if error.status_code == 400 and "parsing the body" in message:
            message = "invalid request: the body is not JSON text; send a JSON object in UTF-8"
        kind = HTTPStatus(error.status_code).phrase.replace(" ", "").replace("-", "")
        return JSONResponse({"error": message, "kind": kind}, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def _unexpected(_request: Request, error: Exception) -> JSONResponse:
        outage = as_outage(error)  # one the engine could not translate: the pool's own timeout
        if outage is not None:
            return _answer(outage)
        # Log the type only: exception text can carry identifiers from DICOM or SQL.
        LOG.error("unexpected %s while serving a request", type(error).__name__, exc_info=False)
        return JSONResponse({"error": "internal error; the server log has details", "kind": "InternalError"},
                            status_code=500)


def _answer(error: Mi2b2Error) -> JSONResponse:
    retry_after = error.retry_after if isinstance(error, RetriableError) else None
    return JSONResponse({"error": str(error), "kind": type(error).__name__}, status_code=status_for(error),
                        headers={"Retry-After": str(retry_after)} if retry_after is not None else None)
