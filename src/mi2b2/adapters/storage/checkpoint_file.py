"""The audit checkpoint file: one JSON line per checkpoint, appended and synced, never rewritten."""

from __future__ import annotations

import os
import stat
from pathlib import Path

from mi2b2.adapters.storage.durable import fsync_dir


def append_line(path: Path, line: str) -> None:
    """Append one line and fsync it before returning (O_APPEND: earlier lines are never touched)."""
    if "\n" in line:
        raise ValueError("a checkpoint is one line")
    created = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, stat.S_IRUSR | stat.S_IWUSR)
    try:
        os.write(fd, (line + "\n").encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)
    if created:
        fsync_dir(path.parent)


def read_lines(path: Path) -> list[str]:
    """The file's lines; none if it does not exist yet."""
    try:
        return path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
