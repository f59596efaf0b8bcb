"""Debian's real `prometheus`, on 127.0.0.1 with a bearer token in its scrape config, scrapes a real
`mi2b2 serve`; its query API answers mi2b2's series, and a target without the token is refused."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import Request
from mi2b2.config import load_config
from mi2b2.services.context import build_context
from support.pacs import free_port
from support.server import Mi2b2Server, start_server
from support.site import write_site

pytestmark = pytest.mark.skipif(shutil.which("prometheus") is None, reason="Debian's prometheus is not installed")

TOKEN = "integration-metrics-token"


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Mi2b2Server]:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "metrics.token").write_text(TOKEN + "\n")
    site = write_site(folder, extra='\n[metrics]\nenabled = true\ntoken_file = "metrics.token"\n')
    site.write_text(site.read_text().replace(
        "[server]\n", f"[server]\nhttp_port = {free_port()}\nrun_worker = false\nreceiver_process = false\n"))
    server = start_server(site)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def prometheus(tmp_path: Path, served: Mi2b2Server) -> Iterator[str]:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    (folder / "token").write_text(TOKEN)
    target = served.url.removeprefix("http://")
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
