"""SIGKILL `mi2b2 serve` in the middle of retrievals, again and again.

Afterwards every request completes, `fsck` finds index and disk in agreement,
and the project's usage equals the bytes of the files on disk.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from sqlalchemy import select

from mi2b2.adapters.db.tables import Request
from mi2b2.config import load_config
from mi2b2.domain.principal import Principal, Role
from mi2b2.services import cache as cache_service
from mi2b2.services.context import build_context
from mi2b2.services.requests import StudyPick, add_requests
from mi2b2.synthetic import SyntheticStudy, study_instance_uid, write_study
from support.pacs import free_port, start_orthanc
from support.pipeline import ALICE, cache_files, retrieval_site
from support.proxy import Proxy
from support.site import pacs_block

pytestmark = pytest.mark.pacs

STUDIES = [
    SyntheticStudy(patient_id="77", patient_name="TEST^CRASH", birth_date="19700101", sex="M", accession=f"CRASH-{n}",
                   study_date="20240101", modality="CT", description="crash", series_count=2,
                   instances_per_series=25, rows=256, cols=256)
    for n in range(3)
]


def _serve(site: Path, log: Path) -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-m", "mi2b2", "serve", "--config", str(site)],
                            stdout=log.open("ab"), stderr=subprocess.STDOUT, start_new_session=True)


def _received(ctx) -> int:  # type: ignore[no-untyped-def]
    with ctx.sessions() as session:
        return sum(session.execute(select(Request.received)).scalars())


def test_sigkill_mid_retrieval_loses_nothing_and_counts_nothing_twice(tmp_path: Path) -> None:
    files = [f for s in STUDIES for f in write_study(s, tmp_path / "studies")]
    receiver_port, slow_port = free_port(), free_port()
    pacs = start_orthanc(tmp_path / "orthanc", move_destinations={"MI2B2": ("127.0.0.1", slow_port)})
    # The PACS sends to a proxy that slows the images, so each kill lands mid-study.
    throttle = Proxy(receiver_port, bytes_per_second=3_000_000, listen_port=slow_port).start()
    try:
        pacs.load(files)
        retries = "\n[institutions.departments.pacs.retries]\nfirst_delay = 0.5\nmax_delay = 1.0\nmax_attempts = 20\n"
        site = retrieval_site(tmp_path / "site", receiver_port, pacs_block("main", "ORTHANC", pacs.port, retries))
        server_settings = f"[server]\nhttp_port = {free_port()}\nworker_poll_seconds = 0.2\n"
        site.write_text(site.read_text().replace("[server]\n", server_settings))
        ctx = build_context(load_config(site))
        report = add_requests(ctx, ALICE, "alpha", "main", [StudyPick(study_instance_uid(s)) for s in STUDIES])
        assert len(report.created) == len(STUDIES)

        log = tmp_path / "serve.log"
        for kill in range(3):
            server = _serve(site, log)
            before = _received(ctx)
            deadline = time.monotonic() + 60
            while _received(ctx) < before + 8 + 5 * kill:
                assert server.poll() is None, log.read_text()[-3000:]
                assert time.monotonic() < deadline, f"no progress before kill {kill}:\n{log.read_text()[-3000:]}"
                time.sleep(0.05)
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(10)

        server = _serve(site, log)
        try:
            deadline = time.monotonic() + 120
            while True:
                with ctx.sessions() as session:
                    states = [r.state for r in session.execute(select(Request)).scalars()]
                if all(s == "completed" for s in states):
                    break
                assert time.monotonic() < deadline, f"{states}\n{log.read_text()[-3000:]}"
                time.sleep(0.2)
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(20)

        with ctx.sessions() as session:
            rows = session.execute(select(Request).order_by(Request.id)).scalars().all()
        assert [r.received for r in rows] == [50, 50, 50]
        assert sum(r.attempts for r in rows) > len(rows), "the kills should have interrupted some retrievals"
        check = cache_service.fsck(ctx, Principal("root", Role.ADMIN), repair=False)
        assert check.differences == 0, check
        on_disk = cache_files(ctx.config.cache_dir())
        assert len(on_disk) == 150
        usage = cache_service.project_usage(ctx, ALICE, "alpha")
        assert usage.used_bytes == sum(p.stat().st_size for p in on_disk)
        assert usage.in_flight_bytes == 0
        assert not list((ctx.config.cache_dir() / ".incoming").rglob("*.dcm"))
    finally:
        throttle.down()
        pacs.stop()
