from __future__ import annotations

from dataclasses import asdict
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request

from mi2b2.api.deps import ContextDep, CurrentUser
from mi2b2.api.schemas import PriorityBody, RequestAddBody, RequestIdsBody
from mi2b2.services import requests as service
from mi2b2.services.requests import StudyPick
from mi2b2.services.scheduler import pacs_states

router = APIRouter(tags=["requests"])


def _wake_worker(http: Request) -> None:
    worker = getattr(http.app.state, "worker", None)
    if worker is not None:
        worker.wake()


@router.post("/requests")
def add_requests(body: RequestAddBody, user: CurrentUser, ctx: ContextDep, http: Request) -> dict[str, Any]:
    picks = [StudyPick(s.study_uid.strip(), tuple(u.strip() for u in s.series_uids)) for s in body.studies]
    report = service.add_requests(ctx, user, body.project, body.pacs, picks, body.priority)
    _wake_worker(http)
    return asdict(report)


@router.get("/projects/{project_id}/requests")
def list_requests(
    project_id: str,
    user: CurrentUser,
    ctx: ContextDep,
    state: Annotated[list[str] | None, Query(description="only these states")] = None,
    limit: Annotated[int, Query(ge=1, le=100000)] = 1000,
) -> list[dict[str, Any]]:
    return service.list_requests(ctx, user, project_id, state or [], limit)


@router.get("/requests/{request_id}")
def show_request(request_id: int, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return service.show_request(ctx, user, request_id)


@router.post("/requests/cancel")
def cancel_requests(body: RequestIdsBody, user: CurrentUser, ctx: ContextDep, http: Request) -> dict[str, Any]:
    changed = service.cancel_requests(ctx, user, body.ids)
    _wake_worker(http)
    return {"canceled": changed}


@router.post("/requests/retry")
def retry_requests(body: RequestIdsBody, user: CurrentUser, ctx: ContextDep, http: Request) -> dict[str, Any]:
    changed = service.retry_requests(ctx, user, body.ids)
    _wake_worker(http)
    return {"retried": changed}


@router.post("/requests/priority")
def set_priority(body: PriorityBody, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return {"changed": service.set_priority(ctx, user, body.ids, body.priority)}


@router.get("/pacs/state")
def pacs_state(user: CurrentUser, ctx: ContextDep) -> list[dict[str, Any]]:
    """Governance now, per PACS: window, active retrievals against the cap, recent starts against the rates."""
    return [asdict(state) for state in pacs_states(ctx)]
