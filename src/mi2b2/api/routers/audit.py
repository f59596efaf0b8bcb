from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import Field

from mi2b2.adapters.db.tables import AuditEvent
from mi2b2.api.deps import ContextDep, CurrentUser
from mi2b2.api.schemas.admin import AuditEventRow, ChainVerdict
from mi2b2.api.schemas.bodies import MAX_ROW_ID, Body
from mi2b2.services.audit import EXPORT_COLUMNS, AuditFilter

router = APIRouter(prefix="/audit", tags=["audit"])


class AuditQueryBody(Body):
    """Search filters, in a body (search is POST-only) so that a patient id stays out of URLs and access logs."""

    actor: str | None = None
    project: str | None = None
    action: str | None = None
    patient: str | None = Field(default=None, max_length=64)
    since: datetime | None = None
    until: datetime | None = None
    limit: int = Field(default=1000, ge=1, le=10000)
    offset: int = Field(default=0, ge=0, le=MAX_ROW_ID)

    def to_filter(self) -> AuditFilter:
        def text(value: str | None) -> str | None:
            return value.strip() or None if value else None

        return AuditFilter(text(self.actor), text(self.project), text(self.action), text(self.patient),
                           self.since, self.until, self.limit, self.offset)


@router.post("/search", response_model=list[AuditEventRow])
def search_events(body: AuditQueryBody, user: CurrentUser, ctx: ContextDep) -> list[dict[str, Any]]:
    return [_event_json(row) for row in ctx.audit.list(user, body.to_filter())]


@router.post("/export.csv", response_class=StreamingResponse,
             responses={200: {"content": {"text/csv": {}}, "description": "the matching events as CSV, streamed"}})
def export_events_by_body(body: AuditQueryBody, user: CurrentUser, ctx: ContextDep) -> StreamingResponse:
    return _csv_response(ctx.audit.export_csv(user, body.to_filter()))


@router.get("/verify", response_model=ChainVerdict)
def verify(user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    verdict = ctx.audit.verify(user)
    return {**asdict(verdict), "summary": verdict.summary}


def _event_json(row: AuditEvent) -> dict[str, Any]:
    return {column: getattr(row, column) for column in EXPORT_COLUMNS}


def _csv_response(chunks: Iterator[str]) -> StreamingResponse:
    first = next(chunks)  # authorise before the 200 goes out
    return StreamingResponse(_prepend(first, chunks), media_type="text/csv",
                             headers={"Content-Disposition": 'attachment; filename="mi2b2-audit.csv"'})


def _prepend(first: str, rest: Iterator[str]) -> Iterator[str]:
    yield first
    yield from rest
