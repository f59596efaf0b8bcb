"""The long-running parts besides HTTP: the DICOM receiver and the worker.

`mi2b2 serve` starts both beside the API (unless the site turns them off);
`mi2b2 receiver` and `mi2b2 worker` run them alone, for sites that scale out.
"""

from __future__ import annotations

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
from mi2b2.adapters.dicom.netdicom_internals import require_tested_pynetdicom
from mi2b2.adapters.dicom.store_scp import StoreServer
from mi2b2.adapters.process import die_with_parent
from mi2b2.config import SiteConfig, load_config
from mi2b2.errors import InvalidInput, Mi2b2Error
from mi2b2.services.cache.reads import cache_store
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.pacs import local_ae, receiver_tls
from mi2b2.services.receiver import ReceiverSink, proxy_trust, receive_limits
from mi2b2.worker.loop import Worker
from mi2b2.worker.receiver_heartbeat import ReceiverHeartbeat

LOG = logging.getLogger("mi2b2.runtime")


def make_sink(ctx: ServiceContext) -> ReceiverSink:
    return ReceiverSink(ctx, cache_store(ctx))


@contextmanager
def background(
    ctx: ServiceContext, receiver: bool, worker: bool, receiver_process: bool = False, share_port: bool = False
) -> Iterator[tuple[StoreServer | None, Worker | None]]:
    """Run the receiver and/or a worker while the block runs.

    With ``receiver_process`` the receiver runs as a child process (`mi2b2
    receiver`, which starts `[dicom] processes` of them): receiving is
    CPU-bound Python, and beside the API and the worker in one process it
    would share one interpreter lock with them. ``share_port``: this
    process's receiver is one of several on the port (SO_REUSEPORT)."""
    in_process = receiver and not (receiver_process and ctx.config.source is not None)
    if in_process and ctx.config.dicom.processes > 1 and not share_port:
        raise InvalidInput(f"[dicom] processes = {ctx.config.dicom.processes} needs the receiver in its own processes: "
                           "set [server] receiver_process = true, or run `mi2b2 receiver` beside the server")
    sink = make_sink(ctx)
    server = StoreServer(local_ae(ctx.config), ctx.config.dicom.host, ctx.config.dicom.port, sink,
                         sink.store.incoming_dir(), receive_limits(ctx.config), receiver_tls(ctx.config),
                         share_port=share_port, proxies=proxy_trust(ctx.config)) if in_process else None
    loop = Worker(ctx, sink) if worker else None
    beat = ReceiverHeartbeat(ctx) if server is not None else None
    child: subprocess.Popen[bytes] | None = None
    try:
        if server is not None and beat is not None:
            server.start()
            beat.start()
            LOG.info("DICOM receiver %s on %s:%d", ctx.config.dicom.ae_title, ctx.config.dicom.host, server.port)
            ctx.on_reload.append(sink.forget_peers)
        elif receiver:
            child = started = _start_receiver_process(ctx)
            ctx.on_reload.append(lambda: _reload_child(started))
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
        preexec_fn=die_with_parent,  # a SIGKILLed server must not leave its receiver running
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


def _reload_child(child: subprocess.Popen[bytes]) -> None:
    """The receiver process re-reads the file itself (`reload_receiver`; `mi2b2 receiver`
    with several processes passes it on to each)."""
    if child.poll() is None:
        child.send_signal(signal.SIGHUP)
        LOG.info("configuration reload passed on to the receiver process %d", child.pid)


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


def run_alone(site: SiteConfig, receiver: bool, worker: bool, what: str, share_port: bool = False) -> None:
    """`mi2b2 receiver` or `mi2b2 worker`: migrate, apply the configuration, run until SIGTERM."""
    require_tested_pynetdicom()  # before anything runs, the database migration included
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s", force=True)
    logging.getLogger("mi2b2").setLevel(logging.INFO)
    # Receivers sharing a port start together, after their parent migrated and applied the configuration.
    ctx = build_context(site, migrate=not share_port, sync_config=not share_port, require_current=share_port)
    dicom = site.dicom
    where = f" on {dicom.ae_title}@{dicom.host}:{dicom.port}" if receiver else ""
    run_until_signal(ctx, receiver=receiver, worker=worker, ready_message=f"mi2b2 {what} running{where}",
                     share_port=share_port)


def run_until_signal(ctx: ServiceContext, receiver: bool, worker: bool, ready_message: str,
                     share_port: bool = False) -> None:
    """Block until SIGTERM or SIGINT, then stop cleanly. A receiver re-reads the
    configuration on SIGHUP (which PACS may send from where: see `reload_receiver`)."""
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    with background(ctx, receiver, worker, share_port=share_port) as (server, _):
        if server is not None and ctx.config.source is not None:
            signal.signal(signal.SIGHUP, lambda *_: reload_receiver(ctx, server))
        print(ready_message, flush=True)
        stop.wait()


def reload_receiver(ctx: ServiceContext, server: StoreServer) -> None:
    """Re-read the configuration a receiver judges by: the PACS (AE titles, addresses),
    projects and the receiver's AE title. Its port, TLS and limits need a restart.
    The database is left alone: `serve` or `mi2b2 config reload` applies the file there."""
    try:
        ctx.config = load_config(ctx.config.source) if ctx.config.source is not None else ctx.config
    except Mi2b2Error as error:
        LOG.error("configuration NOT reloaded, the running one stays: %s", error)
        return
    if isinstance(server.sink, ReceiverSink):
        server.sink.forget_peers()
    LOG.warning("configuration reloaded on SIGHUP")
