"""What the benchmarks share: a `mi2b2 serve` subprocess, and how they fail."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from mi2b2.config import load_config

SERVER_TIMEOUT = 60.0


class BenchFailure(RuntimeError):
    pass


@contextmanager
def mi2b2_server(config_path: Path) -> Iterator[str]:
    config = load_config(config_path)
    url = f"http://127.0.0.1:{config.server.http_port}"
    log_path = config_path.parent / "server.log"
    with log_path.open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mi2b2", "serve", "--config", str(config_path)],
            cwd=config_path.parent, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while True:
            if server.poll() is not None:
                raise BenchFailure(f"mi2b2 serve exited with {server.returncode}:\n{log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/api/v1/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise BenchFailure(f"mi2b2 serve did not answer on {url} within {SERVER_TIMEOUT:g} s")
            time.sleep(0.1)
        yield url
    finally:
        with suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            with suppress(ProcessLookupError):
                os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=5)
