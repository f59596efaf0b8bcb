"""What the benchmarks share: `mi2b2 serve` (support.server's launcher), stopping a process group, how they fail."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from mi2b2.config import load_config
from mi2b2.domain.principal import SYSTEM
from mi2b2.services.context import build_context
from support.server import Mi2b2Server, start_server  # the benchmarks put tests/ on sys.path


class BenchFailure(RuntimeError):
    pass


@contextmanager
def mi2b2_server(config_path: Path, env: dict[str, str] | None = None) -> Iterator[Mi2b2Server]:
    try:
        server = start_server(config_path, env)
    except RuntimeError as exc:  # it has stopped what it started
        raise BenchFailure(str(exc)) from None
    try:
        yield server
    finally:
        server.stop()


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
