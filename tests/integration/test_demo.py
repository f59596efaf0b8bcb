"""`mi2b2 demo` as a new user runs it: start, try a printed command, Ctrl-C.

Runs the real thing (synthetic studies, two pynetdicom qrscp PACS, the server
in a subprocess); nothing is faked.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from mi2b2.client import Mi2b2Client
from support.pacs import free_port

pytestmark = pytest.mark.pacs

START_TIMEOUT = 90.0  # first run: generates and loads ~900 instances; slow on a busy machine
STOP_TIMEOUT = 15.0


class _Output:
    """Collects a child's merged stdout/stderr from a thread, so the pipe never fills up."""

    def __init__(self, process: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._pump, args=(process,), daemon=True)
        self._thread.start()

    def _pump(self, process: subprocess.Popen[str]) -> None:
        assert process.stdout is not None
        for line in process.stdout:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def wait_for(self, text: str, process: subprocess.Popen[str], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._changed:
            while not any(text in line for line in self.lines):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or (process.poll() is not None and not self._thread.is_alive()):
                    raise AssertionError(f"demo never printed {text!r}; output so far:\n{self.text()}")
                self._changed.wait(min(remaining, 0.5))

    def text(self) -> str:
        return "\n".join(self.lines)


def _processes_mentioning(folder: Path) -> dict[int, str]:
    """pid -> command line of every process whose command line names the demo folder."""
    found: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if str(folder) in cmdline:
                found[int(entry.name)] = cmdline
    return found


def _printed_command(output: str, marker: str) -> list[str]:
    for line in output.splitlines():
        line = line.strip()
        if line.startswith("$ ") and marker in line:
            return shlex.split(line[2:])
    raise AssertionError(f"no printed command with {marker!r} in:\n{output}")


@pytest.mark.timeout(120)
def test_demo_serves_searches_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    folder = tmp_path / "demo-site"
    port = free_port()
    demo = subprocess.Popen(
        [sys.executable, "-m", "mi2b2", "demo", "--folder", str(folder), "--port", str(port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        stdin=subprocess.DEVNULL,
        text=True,
        start_new_session=True,
    )
    output = _Output(demo)
    try:
        output.wait_for(f"is running at http://127.0.0.1:{port}", demo, START_TIMEOUT)
        output.wait_for("Press Ctrl-C", demo, 5)

        # The printed client URL opens the browser client.
        client_url = re.search(r"client:\s+(http://\S+)", output.text())
        assert client_url is not None, output.text()
        page = httpx.get(client_url.group(1), timeout=10)
        assert page.status_code == 200 and '<script type="module" src="js/main.js">' in page.text

        # The printed command, as a user would paste it.
        command = _printed_command(output.text(), " search patients ")
        result = subprocess.run([*command, "--format", "json"], capture_output=True, text=True, timeout=60, check=False)
        assert result.returncode == 0, result.stderr
        patients = {p["patient_id"]: p for p in json.loads(result.stdout)}
        assert set(patients) == {"000123", "0045678"}
        assert patients["000123"]["patient_name"] == "DOE^JANE"
        assert patients["000123"]["study_count"] == 2
        assert "refused" in result.stderr and "000987" in result.stderr

        # The accession search, through the Python client with the printed token.
        token = command[command.index("--token") + 1]
        with Mi2b2Client(f"http://127.0.0.1:{port}", token) as client:
            report = client.search_accessions("brain-mri", "lakeside-pacs", "LK2300781\nLK2402020")
        assert [s["patient_id"] for s in report["studies"]] == ["LC0002201"]
        assert report["studies"][0]["accession"] == "LK2300781"
        # qrscp has no ModalitiesInStudy; the series tell them, so the client's Modality facet works on the demo.
        assert (report["studies"][0]["modalities"], report["studies"][0]["series_count"]) == ("MR", 4)
        assert report["not_permitted"] == ["LK2402020"]

        # Move a study into the cache with the printed command; the demo's worker and receiver deliver it.
        request = subprocess.run(_printed_command(output.text(), " request add "), capture_output=True, text=True,
                                 timeout=60, check=False)
        assert request.returncode == 0 and "1 requests queued" in request.stdout, request.stdout + request.stderr
        with Mi2b2Client(f"http://127.0.0.1:{port}", token) as client:
            deadline = time.monotonic() + 60
            while (rows := client.requests("brain-mri"))[0]["state"] in ("scheduled", "processing"):
                assert time.monotonic() < deadline, (
                    {k: rows[0][k] for k in ("state", "waiting_reason", "last_error", "attempts", "received", "not_before")},
                    output.text(), _tail(folder / "server.log"))
                time.sleep(0.3)
            assert rows[0]["state"] == "completed" and rows[0]["received"] == rows[0]["expected_instances"] > 0
            assert [s["patient_id"] for s in client.cache("brain-mri")["studies"]] == ["000123"]

        children = _processes_mentioning(folder)
        assert sum("qrscp" in c for c in children.values()) == 2, children

        demo.send_signal(signal.SIGINT)
        code = demo.wait(timeout=STOP_TIMEOUT)
        assert code == 0, output.text()
        assert "Traceback" not in output.text()
        assert "demo stopped." in output.text()
        deadline = time.monotonic() + 2
        while _processes_mentioning(folder) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _processes_mentioning(folder) == {}, "processes left behind after Ctrl-C"
    finally:
        if demo.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(demo.pid, signal.SIGKILL)
            demo.wait(timeout=10)
        for pid in _processes_mentioning(folder):  # only what this test's demo started
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if demo.stdout is not None:
            demo.stdout.close()


def _tail(log: Path, lines: int = 60) -> str:
    """The end of the demo server's log, for a failure message."""
    return "\n".join(log.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]) if log.exists() else ""
