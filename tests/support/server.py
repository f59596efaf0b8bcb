"""`mi2b2 serve` in a subprocess, for the browser tests and the benchmarks: started in
its own process group with its output in `server.log` beside the site file, ready once
/api/v1/health answers, stopped with the whole group (it and its receiver child)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from mi2b2.config import load_config

SERVER_TIMEOUT = 60.0


@dataclass
class Mi2b2Server:
    url: str  # http://127.0.0.1:<port>, no trailing slash
    http_port: int
    dicom_port: int  # mi2b2's receiver, where the PACS C-MOVEs to
    site: Path  # the mi2b2.toml
    folder: Path  # the site's folder: database, cache, MRN files, server.log
    log_path: Path
    process: subprocess.Popen[bytes]
    _stopped: bool = field(default=False, repr=False)

    @property
    def cache_dir(self) -> Path:
        return self.folder / "cache"

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return "(no log)"

    def log_tail(self, lines: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def alive(self) -> bool:
        return self.process.poll() is None

    def stop(self) -> None:
        """SIGTERM to the server's process group (it and its receiver child); SIGKILL if it lingers."""
        if self._stopped:
            return
        self._stopped = True
        for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, sig)
            try:
                self.process.wait(timeout=grace)
                break
            except subprocess.TimeoutExpired:
                continue
        with contextlib.suppress(ProcessLookupError):  # a child that outlived the leader
            os.killpg(self.process.pid, signal.SIGKILL)


def start_server(site: Path, env: dict[str, str] | None = None) -> Mi2b2Server:
    """`python -m mi2b2 serve --config site` in its own process group; returns once /api/v1/health answers.
    `env` replaces the environment it inherits; either way its output is unbuffered."""
    config = load_config(site)
    url = f"http://127.0.0.1:{config.server.http_port}"
    log_path = site.parent / "server.log"
    environment = {**(os.environ if env is None else env), "PYTHONUNBUFFERED": "1"}
    if environment.get("PYTHONPATH"):  # it runs in the site's folder: `PYTHONPATH=src` must still mean this checkout
        environment["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in
                                                    environment["PYTHONPATH"].split(os.pathsep) if p)
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mi2b2", "serve", "--config", str(site)],
            cwd=site.parent, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            env=environment, start_new_session=True,
        )
    server = Mi2b2Server(url, config.server.http_port, config.dicom.port, site, site.parent, log_path, process)
    deadline = time.monotonic() + SERVER_TIMEOUT
    while not _healthy(url):
        if process.poll() is not None:
            server.stop()
            raise RuntimeError(f"mi2b2 serve exited with {process.returncode} during start-up; "
                               f"log {log_path}:\n{server.log_tail()}")
        if time.monotonic() > deadline:
            server.stop()
            raise RuntimeError(f"mi2b2 serve did not answer on {url}/api/v1/health within {SERVER_TIMEOUT:g} s; "
                               f"log {log_path}:\n{server.log_tail()}")
        time.sleep(0.1)
    return server


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/api/v1/health", timeout=2) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False
