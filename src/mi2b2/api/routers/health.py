"""``/health/live`` and ``/health/ready``: unauthenticated, cheap, bounded; for a load balancer."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from mi2b2.api.errors import ERROR_RESPONSES
from mi2b2.api.schemas.health import FailedCheck, Liveness, ReadinessReply
from mi2b2.services.health import readiness

# Its 503 is an ErrorBody like every other (error, kind) with the readiness's own keys beside them.
router = APIRouter(prefix="/health", tags=["health"], responses=ERROR_RESPONSES)


@router.get("/live", response_model=Liveness)
def live() -> Liveness:
    return Liveness(status="live")


@router.get("/ready", response_model=ReadinessReply)
def ready(request: Request) -> JSONResponse:
    decision = readiness(request.app.state.context)
    reply = ReadinessReply(status="ready" if decision.ready else "not_ready", passed=decision.passed,
                           failed=[FailedCheck(check=f.name, reason=f.reason or "") for f in decision.failed])
    if decision.ready:
        return JSONResponse(reply.model_dump(mode="json"))
    summary = "; ".join(f"{f.check}: {f.reason}" for f in reply.failed)
    return JSONResponse({"error": f"not ready: {summary}", "kind": "NotReady", **reply.model_dump(mode="json")},
                        status_code=503)
