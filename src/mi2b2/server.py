"""`mi2b2 serve`: one process with the HTTP API, the DICOM receiver and a worker."""

from __future__ import annotations

import logging
import signal
from typing import Any

import uvicorn

from mi2b2.adapters.dicom.netdicom_internals import require_tested_pynetdicom
from mi2b2.api.app import create_app
from mi2b2.config import SiteConfig
from mi2b2.domain.principal import SYSTEM
from mi2b2.errors import Mi2b2Error
from mi2b2.runtime import background
from mi2b2.services.audit import Action
from mi2b2.services.context import ServiceContext, build_context

LOG = logging.getLogger("mi2b2.server")


def _reload_on_sighup(ctx: ServiceContext) -> None:
    def handler(_signum: int, _frame: Any) -> None:
        try:
            ctx.reload_config(SYSTEM)
            LOG.warning("configuration reloaded on SIGHUP")
        except Mi2b2Error as error:
            LOG.error("configuration NOT reloaded, the running one stays: %s", error)

    signal.signal(signal.SIGHUP, handler)


SHUTDOWN_GRACE_SECONDS = 5


def run_server(config: SiteConfig, ready_message: str | None = None) -> None:
    require_tested_pynetdicom()  # before anything runs, the database migration included
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("mi2b2").setLevel(logging.INFO)
    ctx = build_context(config, migrate=True, sync_config=True)
    ctx.audit.record(SYSTEM, Action.CONFIG_RELOAD, detail={"op": "startup", "file": str(config.source)})
    _reload_on_sighup(ctx)
    server = config.server
    with background(ctx, receiver=server.run_receiver, worker=server.run_worker,
                    receiver_process=server.receiver_process) as (_, worker):
        app = create_app(ctx, worker)
        _serve_http(config, app, ready_message)


def _serve_http(config: SiteConfig, app: Any, ready_message: str | None) -> None:
    server = config.server
    scheme = "https" if server.tls_cert else "http"
    print(ready_message or f"mi2b2 serving on {scheme}://{server.http_host}:{server.http_port}", flush=True)
    uvicorn.run(
        app,
        host=server.http_host,
        port=server.http_port,
        ssl_certfile=str(config.resolve(server.tls_cert)) if server.tls_cert else None,
        ssl_keyfile=str(config.resolve(server.tls_key)) if server.tls_key else None,
        log_level="warning",
        access_log=False,
        # A browser on the Request Log holds an event stream open forever; without a limit a
        # stop would wait for it. Downloads still running then are cut off (and audited so).
        timeout_graceful_shutdown=SHUTDOWN_GRACE_SECONDS,
    )
