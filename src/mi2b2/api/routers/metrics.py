"""``/metrics``: Prometheus's text exposition, for the site's monitoring only.

Left out of the OpenAPI document: it is Prometheus's format for Prometheus, not part of the
JSON API, and its reader is configured in [metrics], not with a mi2b2 login."""

from __future__ import annotations

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from mi2b2.services.metrics import metrics_refusal, site_registry
from mi2b2.services.metrics_activity import ReceiverRefusals

router = APIRouter(tags=["metrics"])


@router.get("/metrics", include_in_schema=False)
def metrics(request: Request) -> Response:
    ctx = request.app.state.context
    refusal = metrics_refusal(ctx, request.client.host if request.client else None,
                              request.headers.get("authorization"))
    if refusal is not None:
        status, reason = refusal
        headers = {"WWW-Authenticate": 'Bearer realm="mi2b2 metrics"'} if status == 401 else None
        return JSONResponse({"error": reason, "kind": "MetricsRefused"}, status_code=status, headers=headers)
    return Response(generate_latest(site_registry(ctx, _refusals(request))), media_type=CONTENT_TYPE_LATEST)


def _refusals(request: Request) -> ReceiverRefusals:
    """One tally per app, kept between scrapes: each scrape reads only the audit rows added since."""
    tally = getattr(request.app.state, "metrics_refusals", None)
    if not isinstance(tally, ReceiverRefusals):
        tally = request.app.state.metrics_refusals = ReceiverRefusals()
    return tally
