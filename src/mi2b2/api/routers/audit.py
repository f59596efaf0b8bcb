from __future__ import annotations

from collections.abc import Iterator
from dataclasses import asdict
from datetime import datetime
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse
from pydantic import Field

from mi2b2.api.deps import ContextDep, CurrentUser
from mi2b2.api.schemas import Body
from mi2b2.services.audit import EXPORT_COLUMNS, AuditEvent, AuditFilter

router = APIRouter(prefix="/audit", tags=["audit"])


def _filter(actor: str | None, project: str | None, action: str | None, patient: str | None,
            since: datetime | None, until: datetime | None, limit: int = 1000, offset: int = 0) -> AuditFilter:
    return AuditFilter(actor, project, action, patient, since, until, min(max(limit, 1), 10000), max(offset, 0))


class AuditQueryBody(Body):
    """The GET endpoints' filters in a body, so that a patient filter stays out of URLs and access logs."""

    actor: str | None = None
    project: str | None = None
    action: str | None = None
    patient: str | None = Field(default=None, max_length=64)
    since: datetime | None = None
    until: datetime | None = None
    limit: int = Field(default=1000, ge=1, le=10000)
    offset: int = Field(default=0, ge=0)

    def to_filter(self) -> AuditFilter:
        def text(value: str | None) -> str | None:
            return value.strip() or None if value else None

        return _filter(text(self.actor), text(self.project), text(self.action), text(self.patient),
                       self.since, self.until, self.limit, self.offset)


@router.get("")
def list_events(user: CurrentUser, ctx: ContextDep, actor: str | None = None, project: str | None = None,
                action: str | None = None, patient: str | None = None, since: datetime | None = None,
                until: datetime | None = None, limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
    rows = ctx.audit.list(user, _filter(actor, project, action, patient, since, until, limit, offset))
    return [_event_json(row) for row in rows]


@router.post("/search")
def search_events(body: AuditQueryBody, user: CurrentUser, ctx: ContextDep) -> list[dict[str, Any]]:
    return [_event_json(row) for row in ctx.audit.list(user, body.to_filter())]


@router.get("/export.csv")
def export_events(user: CurrentUser, ctx: ContextDep, actor: str | None = None, project: str | None = None,
                  action: str | None = None, patient: str | None = None, since: datetime | None = None,
                  until: datetime | None = None) -> StreamingResponse:
    return _csv_response(ctx.audit.export_csv(user, _filter(actor, project, action, patient, since, until)))


@router.post("/export.csv")
def export_events_by_body(body: AuditQueryBody, user: CurrentUser, ctx: ContextDep) -> StreamingResponse:
    return _csv_response(ctx.audit.export_csv(user, body.to_filter()))


@router.get("/verify")
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
