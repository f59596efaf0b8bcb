from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from mi2b2.api.deps import ContextDep, CurrentUser
from mi2b2.api.schemas.bodies import PageLimit
from mi2b2.api.schemas.deid import Reidentified, ReidentifyBody
from mi2b2.api.schemas.search import MyProject, PacsRow, QueryRow
from mi2b2.services import reidentify, search
from mi2b2.services.pacs import echo_pacs

router = APIRouter(tags=["projects"])


@router.get("/projects", response_model=list[MyProject])
def my_projects(user: CurrentUser, ctx: ContextDep) -> list[dict[str, Any]]:
    return search.my_projects(ctx, user)


@router.get("/projects/{project_id}/queries", response_model=list[QueryRow])
def project_queries(project_id: str, user: CurrentUser, ctx: ContextDep, limit: PageLimit = 200) -> list[dict[str, Any]]:
    return search.recent_queries(ctx, user, project_id, min(max(limit, 1), 5000))


@router.post("/projects/{project_id}/deidentification/reidentify", response_model=Reidentified)
def reidentify_pseudonym(project_id: str, body: ReidentifyBody, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    """The honest broker: the original(s) behind a pseudonym, for the project's lead or an admin; audited."""
    return asdict(reidentify.reidentify(ctx, user, project_id, body.pseudonym, body.justification))


@router.get("/pacs", response_model=list[PacsRow])
def list_pacs(user: CurrentUser, ctx: ContextDep, echo: bool = False) -> list[dict[str, Any]]:
    status = {r.pacs_id: r for r in echo_pacs(ctx.config)} if echo else {}
    nodes = []
    for inst in ctx.config.institutions:
        for dept in inst.departments:
            for pacs in dept.pacs:
                report = status.get(pacs.id)
                nodes.append({
                    "id": pacs.id, "name": pacs.name or pacs.id, "institution": inst.id,
                    "institution_name": inst.name or inst.id, "department": dept.id,
                    "department_name": dept.name or dept.id, "ae_title": pacs.ae_title,
                    "retrieve": pacs.retrieve.value,
                    "echo": asdict(report) if report else None,
                })
    return nodes
