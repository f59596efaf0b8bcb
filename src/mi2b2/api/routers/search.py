from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mi2b2.api.deps import ContextDep, CurrentUser
from mi2b2.api.schemas import AccessionSearchBody, MrnSearchBody, RowIdPath, SeriesSearchBody
from mi2b2.domain.principal import Principal
from mi2b2.services import search, search_jobs
from mi2b2.services.context import ServiceContext

router = APIRouter(prefix="/search", tags=["search"])

# MRNs travel in POST bodies, never in URLs, so they stay out of access logs.


def _answer(ctx: ServiceContext, user: Principal, http: Request, kind: str, project: str, pacs: str,
            text: str) -> dict[str, Any] | JSONResponse:
    """The report of a small search; 202 and the job's address for a large one."""
    outcome = search_jobs.submit(ctx, user, kind, project, pacs, text)
    if isinstance(outcome, search.SearchReport):
        return asdict(outcome)
    worker = getattr(http.app.state, "worker", None)
    if worker is not None:
        worker.wake()
    return JSONResponse(status_code=202, content={
        "job_id": outcome.job_id, "state": outcome.state, "total": outcome.total, "refused": outcome.refused,
        "status_url": f"/api/v1/search/jobs/{outcome.job_id}",
        "results_url": f"/api/v1/search/jobs/{outcome.job_id}/results",
    })


@router.post("/patients", responses={202: {"description": "a search job was started (more identifiers than "
                                                          "search.job_threshold)"}})
def search_patients(body: MrnSearchBody, user: CurrentUser, ctx: ContextDep, http: Request) -> Any:
    return _answer(ctx, user, http, "patients", body.project, body.pacs, body.mrns)


@router.post("/studies", responses={202: {"description": "a search job was started"}})
def search_studies(body: MrnSearchBody, user: CurrentUser, ctx: ContextDep, http: Request) -> Any:
    return _answer(ctx, user, http, "studies", body.project, body.pacs, body.mrns)


@router.post("/accessions", responses={202: {"description": "a search job was started"}})
def search_accessions(body: AccessionSearchBody, user: CurrentUser, ctx: ContextDep, http: Request) -> Any:
    return _answer(ctx, user, http, "accessions", body.project, body.pacs, body.accessions)


@router.post("/series")
def search_series(body: SeriesSearchBody, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return asdict(search.search_series(ctx, user, body.project, body.pacs, body.studies))


@router.get("/jobs")
def list_jobs(project: str, user: CurrentUser, ctx: ContextDep) -> list[dict[str, Any]]:
    return search_jobs.list_jobs(ctx, user, project)


@router.get("/jobs/{job_id}")
def job_status(job_id: RowIdPath, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return search_jobs.job_status(ctx, user, job_id)


@router.get("/jobs/{job_id}/results")
def job_results(job_id: RowIdPath, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return search_jobs.job_results(ctx, user, job_id)


@router.post("/jobs/{job_id}/cancel")
def cancel_job(job_id: RowIdPath, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return search_jobs.cancel_job(ctx, user, job_id)
