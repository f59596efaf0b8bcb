from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from mi2b2.api.deps import ContextDep, CurrentUser
from mi2b2.api.limits import check_identifier_count
from mi2b2.api.schemas import AccessionSearchBody, MrnSearchBody, SeriesSearchBody
from mi2b2.services import search

router = APIRouter(prefix="/search", tags=["search"])

# MRNs travel in POST bodies, never in URLs, so they stay out of access logs.


@router.post("/patients")
def search_patients(body: MrnSearchBody, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    check_identifier_count(ctx, body.mrns, "MRN")
    return asdict(search.search_patients(ctx, user, body.project, body.pacs, body.mrns))


@router.post("/studies")
def search_studies(body: MrnSearchBody, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    check_identifier_count(ctx, body.mrns, "MRN")
    return asdict(search.search_studies(ctx, user, body.project, body.pacs, body.mrns))


@router.post("/accessions")
def search_accessions(body: AccessionSearchBody, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    check_identifier_count(ctx, body.accessions, "accession number")
    return asdict(search.search_accessions(ctx, user, body.project, body.pacs, body.accessions))


@router.post("/series")
def search_series(body: SeriesSearchBody, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return asdict(search.search_series(ctx, user, body.project, body.pacs, body.studies))
