"""The long-running parts besides HTTP: the DICOM receiver and the worker.

`mi2b2 serve` starts both beside the API (unless the site turns them off);
`mi2b2 receiver` and `mi2b2 worker` run them alone, for sites that scale out.
"""

from __future__ import annotations

import ctypes
import logging
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from mi2b2.adapters.dicom.errors import ReceiverUnavailable
from mi2b2.adapters.dicom.store_scp import StoreServer
from mi2b2.services.cache.reads import cache_store
from mi2b2.services.context import ServiceContext
from mi2b2.services.pacs import local_ae, receiver_tls
from mi2b2.services.receiver import ReceiverSink, receive_limits
from mi2b2.worker.loop import Worker
from mi2b2.worker.receiver_heartbeat import ReceiverHeartbeat

LOG = logging.getLogger("mi2b2.runtime")


def make_sink(ctx: ServiceContext) -> ReceiverSink:
    return ReceiverSink(ctx, cache_store(ctx))


@contextmanager
def background(
    ctx: ServiceContext, receiver: bool, worker: bool, receiver_process: bool = False
) -> Iterator[tuple[StoreServer | None, Worker | None]]:
    """Run the receiver and/or a worker while the block runs.

    With ``receiver_process`` the receiver runs as a child process (`mi2b2
    receiver`): receiving is CPU-bound Python, and beside the API and the
    worker in one process it would share one interpreter lock with them."""
    sink = make_sink(ctx)
    in_process = receiver and not (receiver_process and ctx.config.source is not None)
    server = StoreServer(local_ae(ctx.config), ctx.config.dicom.host, ctx.config.dicom.port, sink,
                         sink.store.incoming_dir(), receive_limits(ctx.config), receiver_tls(ctx.config)) if in_process else None
    loop = Worker(ctx, sink) if worker else None
    beat = ReceiverHeartbeat(ctx) if server is not None else None
    child: subprocess.Popen[bytes] | None = None
    try:
        if server is not None and beat is not None:
            server.start()
            beat.start()
            LOG.info("DICOM receiver %s on %s:%d", ctx.config.dicom.ae_title, ctx.config.dicom.host, server.port)
        elif receiver:
            child = _start_receiver_process(ctx)
        if loop is not None:
            loop.start()
        yield server, loop
    finally:
        if loop is not None:
            loop.stop()
        if beat is not None:
            beat.stop()
        if server is not None:
            server.stop()
        if child is not None:
            _stop_child(child)
        sink.close()


def _start_receiver_process(ctx: ServiceContext) -> subprocess.Popen[bytes]:
    dicom = ctx.config.dicom
    if _listening(dicom.host, dicom.port):
        raise ReceiverUnavailable(dicom.ae_title, dicom.host, dicom.port, OSError(98, "address already in use"))
    child = subprocess.Popen(
        [sys.executable, "-m", "mi2b2", "receiver", "--config", str(ctx.config.source)],
        stdin=subprocess.DEVNULL,
        preexec_fn=_die_with_parent,  # a SIGKILLed server must not leave its receiver running
    )
    deadline = time.monotonic() + 30
    while not _listening(dicom.host, dicom.port):
        if child.poll() is not None:
            raise ReceiverUnavailable(dicom.ae_title, dicom.host, dicom.port,
                                      OSError(0, f"the receiver process exited with code {child.returncode}"))
        if time.monotonic() > deadline:
            _stop_child(child)
            raise ReceiverUnavailable(dicom.ae_title, dicom.host, dicom.port, OSError(0, "no answer within 30 s"))
        time.sleep(0.1)
    LOG.info("DICOM receiver %s on %s:%d (process %d)", dicom.ae_title, dicom.host, dicom.port, child.pid)
    return child


def _die_with_parent() -> None:
    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def _listening(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _stop_child(child: subprocess.Popen[bytes]) -> None:
    if child.poll() is None:
        child.terminate()
        try:
            child.wait(15)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait(5)


def run_until_signal(ctx: ServiceContext, receiver: bool, worker: bool, ready_message: str) -> None:
    """Block until SIGTERM or SIGINT, then stop cleanly."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with background(ctx, receiver, worker):
        print(ready_message, flush=True)
        stop.wait()
