from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from functools import partial
from typing import Any

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mi2b2.api.deps import ContextDep, CurrentUser
from mi2b2.api.schemas.bodies import AccessionSearchBody, MrnSearchBody, RowIdPath, SeriesSearchBody
from mi2b2.api.schemas.search import SearchJobResults, SearchJobStatus, SearchJobTicket, SearchReport
from mi2b2.domain.principal import Principal
from mi2b2.errors import RetriableError
from mi2b2.services import search, search_jobs
from mi2b2.services.context import ServiceContext

router = APIRouter(prefix="/search", tags=["search"])

# MRNs travel in POST bodies, never in URLs, so they stay out of access logs.

# Searches that may each hold one of the server's worker threads (anyio's 40) while they wait for a query slot;
# the others wait without one. Without this, 40 users searching at once left no thread for downloads, the
# viewer or logging in until a search ended (seen in tests/integration/test_load.py on PostgreSQL).
SEARCH_THREADS = 8
JOB_STARTED: dict[int | str, dict[str, Any]] = {
    202: {"model": SearchJobTicket, "description": "a search job was started (more identifiers than search.job_threshold)"},
}


async def _in_search_thread(http: Request, call: Callable[[], Any]) -> Any:
    state = http.app.state
    if getattr(state, "search_threads", None) is None:
        state.search_threads = anyio.CapacityLimiter(SEARCH_THREADS)
    threads: anyio.CapacityLimiter = state.search_threads
    try:
        threads.acquire_nowait()
    except anyio.WouldBlock:
        with anyio.move_on_after(state.context.config.search.wait_seconds) as waiting:
            await threads.acquire()
        if waiting.cancelled_caught:
            raise RetriableError(f"{SEARCH_THREADS} searches are already waiting for a PACS; "
                                 "the search was not sent, try again later") from None
    try:
        with anyio.CancelScope(shield=True):  # a search once sent runs to its end, as it did in a worker thread
            return await anyio.to_thread.run_sync(call)
    finally:
        threads.release()


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


@router.post("/patients", response_model=SearchReport, responses=JOB_STARTED)
async def search_patients(body: MrnSearchBody, user: CurrentUser, ctx: ContextDep, http: Request) -> Any:
    return await _in_search_thread(http, partial(_answer, ctx, user, http, "patients", body.project, body.pacs, body.mrns))


@router.post("/studies", response_model=SearchReport, responses=JOB_STARTED)
async def search_studies(body: MrnSearchBody, user: CurrentUser, ctx: ContextDep, http: Request) -> Any:
    return await _in_search_thread(http, partial(_answer, ctx, user, http, "studies", body.project, body.pacs, body.mrns))


@router.post("/accessions", response_model=SearchReport, responses=JOB_STARTED)
async def search_accessions(body: AccessionSearchBody, user: CurrentUser, ctx: ContextDep, http: Request) -> Any:
    call = partial(_answer, ctx, user, http, "accessions", body.project, body.pacs, body.accessions)
    return await _in_search_thread(http, call)


@router.post("/series", response_model=SearchReport)
async def search_series(body: SeriesSearchBody, user: CurrentUser, ctx: ContextDep, http: Request) -> dict[str, Any]:
    call = partial(search.search_series, ctx, user, body.project, body.pacs, body.studies)
    return asdict(await _in_search_thread(http, call))


@router.get("/jobs", response_model=list[SearchJobStatus])
def list_jobs(project: str, user: CurrentUser, ctx: ContextDep) -> list[dict[str, Any]]:
    return search_jobs.list_jobs(ctx, user, project)


@router.get("/jobs/{job_id}", response_model=SearchJobStatus)
def job_status(job_id: RowIdPath, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return search_jobs.job_status(ctx, user, job_id)


@router.get("/jobs/{job_id}/results", response_model=SearchJobResults)
def job_results(job_id: RowIdPath, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return search_jobs.job_results(ctx, user, job_id)


@router.post("/jobs/{job_id}/cancel", response_model=SearchJobStatus)
def cancel_job(job_id: RowIdPath, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return search_jobs.cancel_job(ctx, user, job_id)
