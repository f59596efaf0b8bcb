"""mi2b2's retrieval side running in the test process: receiver + worker on a site.

Tests add requests through the service (or API), then wait for states.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Iterable
from datetime import timedelta
from pathlib import Path
from typing import Any

import pydicom
from pydicom import Dataset
from pynetdicom.association import Association
from sqlalchemy import select

from mi2b2.adapters.db.tables import Request
from mi2b2.adapters.dicom.store_scp import StoreServer
from mi2b2.config import load_config
from mi2b2.domain.clock import Clock
from mi2b2.domain.principal import Principal, Role
from mi2b2.domain.requests import ENDED
from mi2b2.services.cache import cache_store
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.pacs import local_ae, receiver_tls
from mi2b2.services.receiver import ReceiverSink, proxy_trust, receive_limits
from mi2b2.worker.loop import Worker

ADMIN = Principal("root", Role.ADMIN)
ALICE = Principal("alice", Role.RESEARCHER)


def retrieval_site(folder: Path, receiver_port: int, pacs: str, database_url: str | None = None,
                   projects: str | None = None, allowed: list[str] | None = None, dicom_extra: str = "") -> Path:
    """A site whose [dicom] receiver listens on `receiver_port`; `pacs` is the PACS block(s)."""
    from support.site import write_site

    return write_site(folder, pacs_blocks=pacs, database_url=database_url, allowed_a=allowed,
                      extra=projects or "", dicom_port=receiver_port, dicom_extra=dicom_extra)


class Pipeline:
    """Receiver and worker of one site, in this process."""

    def __init__(self, site: Path, clock: Clock | None = None, poll_seconds: float = 0.2,
                 receiver: bool = True, worker: bool = True, stale_after: timedelta | None = None) -> None:
        self.ctx: ServiceContext = build_context(load_config(site), clock=clock)
        self.sink = ReceiverSink(self.ctx, cache_store(self.ctx))
        dicom = self.ctx.config.dicom
        self.server = StoreServer(local_ae(self.ctx.config), "127.0.0.1", dicom.port, self.sink,
                                  self.sink.store.incoming_dir(), receive_limits(self.ctx.config),
                                  receiver_tls(self.ctx.config),
                                  proxies=proxy_trust(self.ctx.config)) if receiver else None
        self.worker = Worker(self.ctx, self.sink, poll_seconds=poll_seconds, stale_after=stale_after) if worker else None

    def __enter__(self) -> Pipeline:
        if self.server is not None:
            self.server.start()
        if self.worker is not None:
            self.worker.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.worker is not None:
            self.worker.stop()
        if self.server is not None:
            self.server.stop()
        self.sink.close()
        self.ctx.engine.dispose()

    def requests(self, ids: Iterable[int] | None = None) -> list[Request]:
        query = select(Request).order_by(Request.id)
        if ids is not None:
            query = query.where(Request.id.in_(list(ids)))
        with self.ctx.sessions() as session:
            return list(session.execute(query).scalars())

    def wait(self, ids: list[int], states: Iterable[str] = ENDED, timeout: float = 60.0) -> list[Request]:
        wanted = set(states)
        deadline = time.monotonic() + timeout
        while True:
            rows = self.requests(ids)
            if rows and all(r.state in wanted for r in rows):
                return rows
            if time.monotonic() > deadline:
                summary = [(r.id, r.state, r.waiting_reason, r.last_error, r.received) for r in rows]
                raise AssertionError(f"requests did not reach {sorted(wanted)} in {timeout:g} s: {summary}")
            time.sleep(0.1)


def cache_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*.dcm") if ".incoming" not in p.parts)


def same_instance(original: Path, received: Path) -> bool:
    """Tags and pixel data equal; the file meta header may differ (written by the receiver)."""
    a, b = pydicom.dcmread(original), pydicom.dcmread(received)
    a_data = {e.tag: e.value for e in a if e.tag.group != 0x0002}
    b_data = {e.tag: e.value for e in b if e.tag.group != 0x0002}
    return a_data == b_data and a.PixelData == b.PixelData


def by_sop(files: Iterable[Path]) -> dict[str, Path]:
    result: dict[str, Any] = {}
    for path in files:
        result[str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return result


def store_over(assoc: Association, datasets: list[Dataset]) -> list[int]:
    """C-STORE each dataset over an established association, then release it; the statuses."""
    assert assoc.is_established
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pynetdicom warns of datasets it cannot check
            return [int(assoc.send_c_store(ds).Status) for ds in datasets]
    finally:
        assoc.release()
