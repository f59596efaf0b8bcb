"""Debian's real `prometheus`, on 127.0.0.1 with a bearer token in its scrape config, scrapes a real
`mi2b2 serve`; its query API answers mi2b2's series, and a target without the token is refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import Request
from mi2b2.config import load_config
from mi2b2.services.context import build_context
from mi2b2.services.requests import StudyPick, add_requests
from mi2b2.services.search import search_studies
from mi2b2.synthetic import SyntheticStudy, study_instance_uid, write_study
from support.pacs import free_port, start_orthanc
from support.pipeline import ALICE, Pipeline, retrieval_site
from support.proxy import Proxy
from support.server import Mi2b2Server, start_server
from support.site import pacs_block, write_site

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus is not installed")

TOKEN = "integration-metrics-token"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Mi2b2Server]:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "metrics.token").write_text(TOKEN + "\n")
    site = write_site(folder, extra='\n[metrics]\nenabled = true\ntoken_file = "metrics.token"\n'
                                    'allow_from = ["10.1.0.0/16", "127.0.0.3/32"]\n')
    site.write_text(site.read_text().replace(
        "[server]\n", f"[server]\nhttp_port = {free_port()}\nrun_worker = false\nreceiver_process = false\n"))
    server = start_server(site)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prometheus(tmp_path: Path, served: Mi2b2Server) -> Iterator[str]:
    with run_prometheus(tmp_path / "prometheus", served.url.removeprefix("http://")) as url:
        yield url


@contextmanager
def run_prometheus(folder: Path, target: str) -> Iterator[str]:
    """Debian's prometheus on a free 127.0.0.1 port, scraping `target` every second twice: with the
    metrics token (job mi2b2) and without it (job mi2b2-no-token)."""
    folder.mkdir()
    (folder / "token").write_text(TOKEN)
    (folder / "p.yml").write_text(
        "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n"
        "scrape_configs:\n"
        "  - job_name: mi2b2\n"
        f"    authorization:\n      credentials_file: {folder / 'token'}\n"
        f"    static_configs:\n      - targets: ['{target}']\n"
        "  - job_name: mi2b2-no-token\n"
        f"    static_configs:\n      - targets: ['{target}']\n")
    port = free_port()
    process = subprocess.Popen(
        ["prometheus", f"--config.file={folder / 'p.yml'}", f"--storage.tsdb.path={folder / 'data'}",
         f"--web.listen-address=127.0.0.1:{port}"],
        stdout=(folder / "log").open("w"), stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def query_until(prometheus: str, promql: str, wanted: str, seconds: float = 20.0) -> list[dict[str, Any]]:
    deadline = time.monotonic() + seconds
    result: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{prometheus}/api/v1/query", params={"query": promql}, timeout=5)
            result = answer.json()["data"]["result"] if answer.status_code == 200 else []
        except httpx.HTTPError:
            result = []
        if result and result[0]["value"][1] == wanted:
            return result
        time.sleep(0.5)
    raise AssertionError(f"{promql} did not reach {wanted} within {seconds:g} s; last answer {result}")


def test_allow_from_is_the_connecting_address_not_what_a_header_claims(served: Mi2b2Server) -> None:
    """Loopback has many addresses: 127.0.0.3 is in allow_from, 127.0.0.2 is not, and neither is
    127.0.0.1, the one proxy uvicorn believes."""

    def get(source: str, headers: dict[str, str] | None = None) -> int:
        with httpx.Client(transport=httpx.HTTPTransport(local_address=source), timeout=10) as client:
            return client.get(f"{served.url}/metrics", headers=headers).status_code

    assert get("127.0.0.3") == 200
    assert get("127.0.0.2") == 401
    for claimed in ("10.1.2.3", "127.0.0.3", "127.0.0.2, 10.1.2.3"):
        assert get("127.0.0.2", {"X-Forwarded-For": claimed}) == 401, claimed
        assert get("127.0.0.2", {"Forwarded": f"for={claimed}"}) == 401, claimed
    # A proxy on the host itself is believed, as the README says: let Prometheus scrape serve directly.
    assert get("127.0.0.1", {"X-Forwarded-For": "10.1.2.3"}) == 200


def test_prometheus_reads_the_queue_of_a_project(served: Mi2b2Server, prometheus: str) -> None:
    ctx = build_context(load_config(served.site))
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        for n in range(3):
            session.add(Request(project_id="alpha", user_login="alice", pacs_id="main", patient_id="P-INT-1",
                                study_uid=f"1.2.9.{n}", state="scheduled", created_at=now))
    series = query_until(prometheus, 'mi2b2_project_requests{project="alpha",state="scheduled"}', "3")
    assert series[0]["metric"]["job"] == "mi2b2"
    assert query_until(prometheus, 'mi2b2_pacs_queued_requests{pacs="main"}', "3")
    assert query_until(prometheus, 'up{job="mi2b2-no-token"}', "0")  # the same target without the token: 401


PATIENT = SyntheticStudy(patient_id="MRN-0002", patient_name="SECRETARY^PRIVATE", birth_date="19700101", sex="F",
                         accession="ACC-METRICS-7", study_date="20240101", modality="CT",
                         description="metrics CT", series_count=1, instances_per_series=30, rows=128, cols=128)
SLOW_BYTES_PER_SECOND = 60_000  # ~16 s for the study: long enough for several scrapes while it runs
RETRIES = """
[institutions.departments.pacs.retries]
max_attempts = 5
first_delay = 0.5
max_delay = 1.0
"""


def test_prometheus_sees_a_real_retrieval_run_and_end(tmp_path: Path) -> None:
    """Orthanc sends by C-MOVE through a slow proxy to the receiver, which with the worker runs in
    this process; `mi2b2 serve` answers /metrics from another process, reading the database only."""
    files = write_study(PATIENT, tmp_path / "study")
    study_uid = study_instance_uid(PATIENT)
    receiver_port, slow_port = free_port(), free_port()
    pacs = start_orthanc(tmp_path / "orthanc", move_destinations={"MI2B2": ("127.0.0.1", slow_port)})
    throttle = Proxy(receiver_port, bytes_per_second=SLOW_BYTES_PER_SECOND, listen_port=slow_port).start()
    server: Mi2b2Server | None = None
    try:
        pacs.load(files)
        folder = tmp_path / "site"
        folder.mkdir()
        (folder / "metrics.token").write_text(TOKEN + "\n")
        site = retrieval_site(folder, receiver_port, pacs_block("main", "ORTHANC", pacs.port, RETRIES),
                              projects='\n[metrics]\nenabled = true\ntoken_file = "metrics.token"\n')
        site.write_text(site.read_text().replace("[server]\n", f"[server]\nhttp_port = {free_port()}\n"
                                                 "run_worker = false\nrun_receiver = false\n"))
        server = start_server(site)  # the API alone: it counts nothing itself
        with Pipeline(site) as pipe, run_prometheus(tmp_path / "prometheus", server.url.removeprefix("http://")) as prom:
            query_until(prom, 'up{job="mi2b2"}', "1", seconds=30)
            search_studies(pipe.ctx, ALICE, "alpha", "main", PATIENT.patient_id)
            ids = add_requests(pipe.ctx, ALICE, "alpha", "main", [StudyPick(study_uid)]).created
            assert len(ids) == 1

            query_until(prom, 'mi2b2_pacs_active_retrievals{pacs="main"}', "1", seconds=30)
            query_until(prom, 'mi2b2_project_requests{project="alpha",state="processing"}', "1")
            query_until(prom, 'mi2b2_pacs_starts_last_minute{pacs="main"}', "1")
            assert pipe.requests(ids)[0].state == "processing", "the retrieval should still be running"
            throttle.bytes_per_second = None  # seen running: let it finish at full speed

            assert [r.state for r in pipe.wait(ids)] == ["completed"]
            query_until(prom, 'mi2b2_pacs_active_retrievals{pacs="main"}', "0")
            query_until(prom, 'mi2b2_retrieval_duration_seconds_count{pacs="main",outcome="completed"}', "1")
            query_until(prom, 'mi2b2_project_requests{project="alpha",state="completed"}', "1")
            query_until(prom, "mi2b2_receiver_instances_received", str(len(files)))
            query_until(prom, 'mi2b2_pacs_searches_total{pacs="main"}', "1")
            query_until(prom, "count(mi2b2_worker_heartbeat_age_seconds) > bool 0", "1")

            # The PACS sends an instance of the study again, unasked: refused, and counted by kind.
            sent = subprocess.run(
                ["storescu", "-v", "-aet", "ORTHANC", "-aec", "MI2B2", "127.0.0.1", str(receiver_port), str(files[0])],
                env={**os.environ, "TCP_NODELAY": "1"}, capture_output=True, text=True, timeout=30)
            assert "Store Response (Unknown Status: 0x124)" in sent.stderr, sent.stdout + sent.stderr  # not authorised
            query_until(prom, 'mi2b2_receiver_refused_instances_total{reason="no_retrieval_in_progress"}', "1")

            exposition = httpx.get(f"{server.url}/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
            stored = httpx.get(f"{prom}/api/v1/series", params={"match[]": '{job="mi2b2"}'}).text
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
        private = {PATIENT.patient_id, "SECRETARY", "PRIVATE", PATIENT.accession, study_uid,
                   str(headers[0].SeriesInstanceUID), *(str(h.SOPInstanceUID) for h in headers)}
        for text in (exposition, stored):
            assert "mi2b2_retrieval_duration_seconds_bucket" in text
            assert [value for value in private if value in text] == []
    finally:
        if server is not None:
            server.stop()
        throttle.down()
        pacs.stop()
