"""The long-running parts besides HTTP: the DICOM receiver and the worker.

`mi2b2 serve` starts both beside the API (unless the site turns them off);
`mi2b2 receiver` and `mi2b2 worker` run them alone, for sites that scale out.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from mi2b2.adapters.dicom.store_scp import StoreServer
from mi2b2.services.cache import cache_store
from mi2b2.services.context import ServiceContext
from mi2b2.services.pacs import local_ae
from mi2b2.services.receiver import ReceiverSink
from mi2b2.worker.loop import Worker

LOG = logging.getLogger("mi2b2.runtime")


def make_sink(ctx: ServiceContext) -> ReceiverSink:
    return ReceiverSink(ctx, cache_store(ctx))


@contextmanager
def background(ctx: ServiceContext, receiver: bool, worker: bool) -> Iterator[tuple[StoreServer | None, Worker | None]]:
    sink = make_sink(ctx)
    server = StoreServer(local_ae(ctx.config), ctx.config.dicom.host, ctx.config.dicom.port, sink,
                         sink.store.incoming_dir()) if receiver else None
    loop = Worker(ctx, sink) if worker else None
    try:
        if server is not None:
            server.start()
            LOG.info("DICOM receiver %s on %s:%d", ctx.config.dicom.ae_title, ctx.config.dicom.host, server.port)
        if loop is not None:
            loop.start()
        yield server, loop
    finally:
        if loop is not None:
            loop.stop()
        if server is not None:
            server.stop()
        sink.close()


def run_until_signal(ctx: ServiceContext, receiver: bool, worker: bool, ready_message: str) -> None:
    """Block until SIGTERM or SIGINT, then stop cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with background(ctx, receiver, worker):
        print(ready_message, flush=True)
        stop.wait()
