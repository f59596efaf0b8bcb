"""Forwarding cached studies to DICOM destinations: queue forwards, list a project's destinations.

Forward requests are then followed, canceled and retried through the request
endpoints (``/requests/...``) like retrievals.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from pydantic import Field

from mi2b2.api.deps import ContextDep, CurrentUser
from mi2b2.api.schemas.bodies import Body
from mi2b2.api.schemas.requests import DestinationRow, ForwardReport
from mi2b2.services import forward as service

router = APIRouter(tags=["forward"])


class ForwardBody(Body):
    destination: str = Field(min_length=1, description="destination id (see GET /projects/{project}/destinations)")
    study_uids: list[str] = Field(min_length=1, max_length=5000, description="StudyInstanceUIDs in the project's cache")
    series_uids: list[str] = Field(default_factory=list, max_length=10000, description="only these series; empty = all")
    priority: int = Field(0, ge=-9, le=9, description="higher starts first within the project")


@router.post("/projects/{project_id}/forward", response_model=ForwardReport)
def forward_studies(project_id: str, body: ForwardBody, user: CurrentUser, ctx: ContextDep,
                    http: Request) -> dict[str, Any]:
    report = service.add_forwards(ctx, user, project_id, body.destination, body.study_uids, body.series_uids or None,
                                  body.priority)
    worker = getattr(http.app.state, "worker", None)
    if worker is not None and report.created:
        worker.wake()
    return asdict(report)


@router.get("/projects/{project_id}/destinations", response_model=list[DestinationRow])
def project_destinations(project_id: str, user: CurrentUser, ctx: ContextDep) -> list[dict[str, Any]]:
    return service.list_destinations(ctx, user, project_id)
