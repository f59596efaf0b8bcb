"""A real haproxy in front of a real `mi2b2 serve`, checking `/health/ready` as the README shows:
it routes to mi2b2 only while mi2b2 is ready (here: while some worker beats), and `/health/live`
keeps answering all along. The README's own haproxy block passes `haproxy -c`."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from mi2b2.config import load_config
from mi2b2.services.context import build_context
from mi2b2.services.scheduler import heartbeat, retire_worker
from support.pacs import free_port
from support.server import Mi2b2Server, start_server
from support.site import write_site

pytestmark = pytest.mark.skipif(shutil.which("haproxy") is None, reason="Debian's haproxy is not installed")

README = Path(__file__).resolve().parents[2] / "README.md"
CHECK = """\
backend mi2b2
    mode http
    balance leastconn
    option httpchk GET /health/ready
    http-check expect status 200
    default-server check inter 200ms fall 1 rise 1
    server mi2b2-1 127.0.0.1:{port}
"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Mi2b2Server]:
    site = write_site(tmp_path / "site")
    # The API alone: no worker of its own, so its readiness follows the heartbeats the test writes.
    site.write_text(site.read_text().replace(
        "[server]\n", f"[server]\nhttp_port = {free_port()}\nrun_worker = false\nrun_receiver = false\n"))
    server = start_server(site)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def haproxy(tmp_path: Path, served: Mi2b2Server) -> Iterator[str]:
    port = free_port()
    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "defaults\n    mode http\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n"
        f"frontend mi2b2\n    bind 127.0.0.1:{port}\n    default_backend mi2b2\n"
        + CHECK.format(port=served.http_port))
    checked = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
    process = subprocess.Popen(["haproxy", "-f", str(config), "-db"], stdout=(tmp_path / "haproxy.log").open("w"),
                               stderr=subprocess.STDOUT)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait()


def through(proxy: str, wanted: int, seconds: float = 15.0) -> httpx.Response:
    """GET /api/v1/health through haproxy until it answers `wanted` (its checks run every 200 ms)."""
    deadline = time.monotonic() + seconds
    answer: httpx.Response | None = None
    while time.monotonic() < deadline:
        try:
            answer = httpx.get(f"{proxy}/api/v1/health", timeout=5)
            if answer.status_code == wanted:
                return answer
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"haproxy did not answer {wanted} within {seconds:g} s; last {answer and answer.status_code}")


def test_haproxy_routes_only_to_a_ready_server(served: Mi2b2Server, haproxy: str) -> None:
    ctx = build_context(load_config(served.site))
    try:
        through(haproxy, 503)  # no worker: not ready, out of rotation
        ready = httpx.get(f"{served.url}/health/ready", timeout=5)
        assert ready.status_code == 503 and [f["check"] for f in ready.json()["failed"]] == ["worker"]
        assert httpx.get(f"{served.url}/health/live", timeout=5).status_code == 200  # alive all the same

        heartbeat(ctx, "worker:haproxy-test:1")
        assert through(haproxy, 200).json()["status"] == "ok"  # back in rotation, no restart

        retire_worker(ctx, "worker:haproxy-test:1")
        through(haproxy, 503)
        assert httpx.get(f"{served.url}/health/live", timeout=5).status_code == 200
    finally:
        ctx.engine.dispose()


def test_the_readmes_haproxy_block_is_valid(tmp_path: Path) -> None:
    block = re.search(r"```\n(frontend mi2b2\n.*?)```", README.read_text(), re.DOTALL)
    assert block is not None, "README.md lost its haproxy example"
    pem, ca = tmp_path / "mi2b2.pem", tmp_path / "site-ca.pem"
    made = subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1", "-subj", "/CN=mi2b2",
                           "-keyout", str(tmp_path / "key.pem"), "-out", str(ca)], capture_output=True, timeout=60)
    assert made.returncode == 0, made.stderr
    pem.write_text((tmp_path / "key.pem").read_text() + ca.read_text())
    text = block.group(1).replace("/etc/haproxy/mi2b2.pem", str(pem)).replace("/etc/haproxy/site-ca.pem", str(ca))
    config = tmp_path / "readme.cfg"
    config.write_text("defaults\n    timeout connect 2s\n    timeout client 10s\n    timeout server 10s\n" + text)
    checked = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
