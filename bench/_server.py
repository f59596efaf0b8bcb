"""What the benchmarks share: a `mi2b2 serve` subprocess, stopping a process group, and how they fail."""

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
from dataclasses import dataclass
from pathlib import Path

from mi2b2.config import load_config
from mi2b2.domain.principal import SYSTEM
from mi2b2.services.context import build_context

SERVER_TIMEOUT = 60.0


class BenchFailure(RuntimeError):
    pass


@dataclass
class Server:
    url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def log_tail(self) -> str:
        return log_tail(self.log_path)


@contextmanager
def mi2b2_server(config_path: Path, env: dict[str, str] | None = None) -> Iterator[Server]:
    config = load_config(config_path)
    url = f"http://127.0.0.1:{config.server.http_port}"
    log_path = config_path.parent / "server.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "mi2b2", "serve", "--config", str(config_path)],
            cwd=config_path.parent, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    server = Server(url, process, log_path)
    try:
        deadline = time.monotonic() + SERVER_TIMEOUT
        while True:
            if process.poll() is not None:
                raise BenchFailure(f"mi2b2 serve exited with {process.returncode}:\n{server.log_tail()}")
            try:
                with urllib.request.urlopen(f"{url}/api/v1/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise BenchFailure(f"mi2b2 serve did not answer on {url} within {SERVER_TIMEOUT:g} s:\n{server.log_tail()}")
            time.sleep(0.1)
        yield server
    finally:
        stop_group(process)


def stop_group(process: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process's group, then SIGKILL if it has not gone within 15 s."""
    for sig, grace in ((signal.SIGTERM, 15.0), (signal.SIGKILL, 5.0)):
        with suppress(ProcessLookupError):
            os.killpg(process.pid, sig)
        try:
            process.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def researcher_token(config_path: Path) -> str:
    """The site's database migrated, user "bench" (a member of the benchmark project) added; its API token."""
    ctx = build_context(load_config(config_path), migrate=True, sync_config=True)
    try:
        ctx.accounts.add_user(SYSTEM, "bench", "researcher", "bench-password-1")
        return ctx.accounts.create_token(SYSTEM, "bench", "bench", days=1).secret
    finally:
        ctx.engine.dispose()
