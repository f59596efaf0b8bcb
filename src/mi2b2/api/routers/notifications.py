from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from mi2b2.api.deps import ContextDep, CurrentUser
from mi2b2.api.schemas.bodies import MarkReadBody, PageLimit
from mi2b2.api.schemas.cache import MarkedRead, Notification
from mi2b2.services import notifications

router = APIRouter(prefix="/notifications", tags=["notifications"])


@router.get("", response_model=list[Notification])
def list_notifications(user: CurrentUser, ctx: ContextDep, unread: bool = False,
                       limit: PageLimit = 200) -> list[dict[str, Any]]:
    return [asdict(n) for n in notifications.list_notifications(ctx, user, unread, limit)]


@router.post("/read", response_model=MarkedRead)
def mark_read(body: MarkReadBody, user: CurrentUser, ctx: ContextDep) -> dict[str, int]:
    return {"marked": notifications.mark_read(ctx, user, body.ids, body.all)}
