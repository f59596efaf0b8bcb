"""Search jobs through `mi2b2 serve`: the API, the CLI's --wait, and a SIGKILL mid-job.

A counting proxy in front of Orthanc reads which identifier every C-FIND asked
for, so the test can tell that a job resumed after the kill never asked again
for what it had stored before.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from sqlalchemy import select

from mi2b2.adapters.db.tables import SearchJobItem
from mi2b2.config import load_config
from mi2b2.domain.principal import SYSTEM
from mi2b2.services.context import build_context
from support import studies
from support.pacs import RunningPacs, free_port, start_orthanc
from support.proxy import Proxy
from support.server import Mi2b2Server, start_server
from support.site import pacs_block, write_site

pytestmark = pytest.mark.pacs
FOUND = {"000123", "77", "PAT004"}


def cohort(count: int) -> list[str]:
    return ["000123", "77", "PAT004"] + [f"K{i:07d}" for i in range(count - 3)]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPacs]:
    folder = tmp_path_factory.mktemp("orthanc")
    with start_orthanc(folder / "pacs") as pacs:
        pacs.load(studies.write_all(folder / "studies"))
        yield pacs


def serve_site(folder: Path, database_url: str, proxy: Proxy, orthanc: RunningPacs, mrns: list[str],
               limits: str) -> tuple[Path, dict[str, str]]:
    path = write_site(folder, database_url=database_url, allowed_a=mrns,
                      pacs_blocks=pacs_block("main", orthanc.ae_title, proxy.port, limits),
                      extra="\n[search]\njob_threshold = 200\njob_batch = 50\nlease_seconds = 120\n")
    path.write_text(path.read_text().replace(
        "[server]\n", f"[server]\nhttp_port = {free_port()}\nworker_poll_seconds = 0.2\nreceiver_process = false\n"))
    ctx = build_context(load_config(path))
    tokens = {}
    for login in ("alice", "dave"):
        ctx.accounts.add_user(SYSTEM, login, "researcher", None)
        tokens[login] = ctx.accounts.create_token(SYSTEM, login, "test").secret
    ctx.engine.dispose()
    return path, tokens


def api(server: Mi2b2Server, token: str) -> httpx.Client:
    return httpx.Client(base_url=f"{server.url}/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=60)


def done_items(path: Path, job_id: int) -> set[str]:
    ctx = build_context(load_config(path), migrate=False, sync_config=False)
    try:
        with ctx.sessions() as session:
            return set(session.scalars(select(SearchJobItem.value).where(
                SearchJobItem.job_id == job_id, SearchJobItem.done.is_(True))))
    finally:
        ctx.engine.dispose()


def test_a_job_survives_sigkill_and_never_repeats_a_stored_query(tmp_path: Path, database_url: str,
                                                                 orthanc: RunningPacs) -> None:
    proxy = Proxy(orthanc.port).start()
    mrns = cohort(1000)
    path, tokens = serve_site(tmp_path / "site", database_url, proxy, orthanc, mrns,
                              "default_max_concurrent_queries = 1\ndefault_queries_per_second = 100\n")
    server = start_server(path)
    try:
        with api(server, tokens["alice"]) as alice:
            response = alice.post("/search/studies", json={"project": "alpha", "pacs": "main", "mrns": "\n".join(mrns)})
            assert response.status_code == 202, response.text
            job_id = response.json()["job_id"]
            assert response.json()["total"] == 1000
            deadline = time.monotonic() + 60
            while alice.get(f"/search/jobs/{job_id}").json()["done"] < 300:
                assert time.monotonic() < deadline, server.log_tail()
                time.sleep(0.1)
        os.killpg(server.process.pid, signal.SIGKILL)
        server.process.wait(10)
        stored = done_items(path, job_id)
        asked_before = len(proxy.seen.finds)
        assert 300 <= len(stored) < 1000
    finally:
        server.stop()

    # After the restart the killed server's query lease (max 1 at once) must not hold the job back.
    server = start_server(path)
    try:
        restarted = time.monotonic()
        env = {**os.environ, "MI2B2_TOKEN": tokens["alice"]}
        follow = subprocess.run(
            [sys.executable, "-m", "mi2b2", "search", "job", str(job_id), "--wait", "--server", server.url],
            capture_output=True, text=True, env=env, timeout=120, check=False)
        assert follow.returncode == 0, follow.stdout + follow.stderr + server.log_tail()
        assert time.monotonic() - restarted < 60  # far less than the 120 s lease: the dead pid freed it
        assert "search job" in follow.stdout and "1000 of 1000" in follow.stdout
        assert all(pid in follow.stdout for pid in FOUND)
    finally:
        server.stop()
        proxy.down()

    asked = Counter(proxy.seen.find_keys)
    assert {m for m in stored if asked[m] != 1} == set()  # stored before the kill: asked once, never again
    assert all(asked[m] >= 1 for m in mrns)
    assert sum(asked.values()) <= 1000 + 50  # at most the batch in flight at the kill is asked twice
    assert asked_before <= len(stored) + 50


def test_api_and_cli_for_search_jobs(tmp_path: Path, database_url: str, orthanc: RunningPacs) -> None:
    proxy = Proxy(orthanc.port).start()
    mrns = cohort(400)
    path, tokens = serve_site(tmp_path / "site", database_url, proxy, orthanc, mrns,
                              "default_queries_per_second = 30\n")  # the last job still runs when a slow CLI cancels it
    server = start_server(path)
    try:
        with api(server, tokens["alice"]) as alice, api(server, tokens["dave"]) as dave:
            small = alice.post("/search/patients", json={"project": "alpha", "pacs": "main", "mrns": "000123\n77"})
            assert small.status_code == 200 and {p["patient_id"] for p in small.json()["patients"]} == {"000123", "77"}
            big = alice.post("/search/patients", json={"project": "alpha", "pacs": "main",
                                                       "mrns": "\n".join([*mrns, "NOT-ALLOWED-1"])})
            assert big.status_code == 202, big.text
            job_id = big.json()["job_id"]
            assert big.json()["refused"] == ["NOT-ALLOWED-1"]
            # Another user (not even in the project) learns nothing, not even that the job exists.
            for call in (dave.get(f"/search/jobs/{job_id}"), dave.get(f"/search/jobs/{job_id}/results"),
                         dave.post(f"/search/jobs/{job_id}/cancel")):
                assert call.status_code == 404, call.text
            assert alice.get("/search/jobs/999999").status_code == 404
            deadline = time.monotonic() + 60
            while (status := alice.get(f"/search/jobs/{job_id}").json())["state"] != "completed":
                assert status["state"] in ("queued", "running") and time.monotonic() < deadline, status
                time.sleep(0.2)
            results = alice.get(f"/search/jobs/{job_id}/results").json()
            assert {p["patient_id"] for p in results["patients"]} == FOUND
            assert results["refused"] == ["NOT-ALLOWED-1"] and len(results["not_found"]) == 400 - len(FOUND)
            assert [j["job_id"] for j in alice.get("/search/jobs", params={"project": "alpha"}).json()] == [job_id]
        assert "NOT-ALLOWED-1" not in proxy.seen.find_keys

        mrn_file = tmp_path / "cohort.txt"
        mrn_file.write_text("\n".join(mrns))
        env = {**os.environ, "MI2B2_TOKEN": tokens["alice"]}
        base = [sys.executable, "-m", "mi2b2", "search", "studies", "--project", "alpha", "--pacs", "main",
                "--file", str(mrn_file), "--server", server.url]
        waited = subprocess.run([*base, "--wait", "--format", "csv"], capture_output=True, text=True, env=env,
                                timeout=120, check=False)
        assert waited.returncode == 0, waited.stderr
        assert {line.split(",")[0] for line in waited.stdout.splitlines()[1:]} == FOUND
        assert "search job" in waited.stderr and "400/400" in waited.stderr  # the progress bar, on stderr
        started = subprocess.run(base, capture_output=True, text=True, env=env, timeout=60, check=False)
        assert started.returncode == 0, started.stderr
        assert "search job" in started.stdout and "--wait" in started.stdout and "mi2b2 search cancel" in started.stdout
        other = started.stdout.split("search job ", 1)[1].split()[0]
        canceled = subprocess.run([sys.executable, "-m", "mi2b2", "search", "cancel", other, "--server", server.url],
                                  capture_output=True, text=True, env=env, timeout=60, check=False)
        assert canceled.returncode == 0 and "canceled" in canceled.stdout, canceled.stdout + canceled.stderr
    finally:
        server.stop()
        proxy.down()
