"""Writing a small file so that a crash leaves the old content or the new, never a mix."""

from __future__ import annotations

import errno
import os
import stat
import tempfile
from pathlib import Path


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EBADF):  # some file systems cannot sync directories
            raise
    finally:
        os.close(fd)


def replace_durably(path: Path, data: bytes) -> None:
    """Temp file beside ``path``, fsync, rename over it, fsync the folder. Keeps the old file's mode
    (a new file gets 0600). Raises OSError; the temp file is gone whatever happens."""
    mode = stat.S_IMODE(path.stat().st_mode) if path.exists() else 0o600
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, mode)
        os.replace(temp, path)
    except OSError:
        Path(temp).unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
