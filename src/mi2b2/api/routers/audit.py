from __future__ import annotations

from dataclasses import asdict
from datetime import datetime
from typing import Any

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from mi2b2.api.deps import ContextDep, CurrentUser
from mi2b2.services.audit import EXPORT_COLUMNS, AuditFilter

router = APIRouter(prefix="/audit", tags=["audit"])


def _filter(actor: str | None, project: str | None, action: str | None, patient: str | None,
            since: datetime | None, until: datetime | None, limit: int = 1000, offset: int = 0) -> AuditFilter:
    return AuditFilter(actor, project, action, patient, since, until, min(max(limit, 1), 10000), max(offset, 0))


@router.get("")
def list_events(user: CurrentUser, ctx: ContextDep, actor: str | None = None, project: str | None = None,
                action: str | None = None, patient: str | None = None, since: datetime | None = None,
                until: datetime | None = None, limit: int = 1000, offset: int = 0) -> list[dict[str, Any]]:
    rows = ctx.audit.list(user, _filter(actor, project, action, patient, since, until, limit, offset))
    return [{column: getattr(row, column) for column in EXPORT_COLUMNS} for row in rows]


@router.get("/export.csv")
def export_events(user: CurrentUser, ctx: ContextDep, actor: str | None = None, project: str | None = None,
                  action: str | None = None, patient: str | None = None, since: datetime | None = None,
                  until: datetime | None = None) -> StreamingResponse:
    chunks = ctx.audit.export_csv(user, _filter(actor, project, action, patient, since, until))
    first = next(chunks)  # authorise before the 200 goes out
    return StreamingResponse(_prepend(first, chunks), media_type="text/csv",
                             headers={"Content-Disposition": 'attachment; filename="mi2b2-audit.csv"'})


@router.get("/verify")
def verify(user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return asdict(ctx.audit.verify(user))


def _prepend(first: str, rest: Any) -> Any:
    yield first
    yield from rest
