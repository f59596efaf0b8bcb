from __future__ import annotations

from dataclasses import asdict
from typing import Any

from fastapi import APIRouter

from mi2b2.api.deps import AdminUser, ContextDep, CurrentUser
from mi2b2.api.schemas.bodies import CacheDeleteBody
from mi2b2.api.schemas.cache import DeleteReport, FsckReport, ProjectCache, StudyDetail
from mi2b2.services import cache

router = APIRouter(prefix="/projects/{project_id}/cache", tags=["cache"])
admin_router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("", response_model=ProjectCache)
def project_cache(project_id: str, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    usage = cache.project_usage(ctx, user, project_id)
    studies = cache.list_studies(ctx, user, project_id)
    return {"usage": asdict(usage), "studies": [asdict(s) for s in studies]}


@router.get("/studies/{study_uid}", response_model=StudyDetail)
def cached_study(project_id: str, study_uid: str, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return asdict(cache.study_detail(ctx, user, project_id, study_uid))


# POST rather than DELETE: a DELETE with a body is dropped by some proxies and clients.
@router.post("/delete", response_model=DeleteReport)
def delete_studies(project_id: str, body: CacheDeleteBody, user: CurrentUser, ctx: ContextDep) -> dict[str, Any]:
    return asdict(cache.delete_studies(ctx, user, project_id, body.study_uids))


@admin_router.post("/fsck", response_model=FsckReport)
def fsck(user: AdminUser, ctx: ContextDep, repair: bool = False) -> dict[str, Any]:
    report = cache.fsck(ctx, user, repair)
    return {**asdict(report), "counts": report.counts()}
