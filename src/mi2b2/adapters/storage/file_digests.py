"""SHA-256 of cache files, remembered while each file stays the same.

A resumed or repeated download asks for the digests of the same files again;
hashing gigabytes each time would make the manifest slow (and the encrypted
ZIP, whose manifest carries them too: a CLI manifest and a ZIP share them). The memory belongs
to one ServiceContext (never to the process) and is keyed by the project as
well as by the file's path, size, mtime and inode, so a file that changes is
hashed again and one project's entries never answer for another's.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import OrderedDict
from pathlib import Path

CHUNK = 1024 * 1024
_Key = tuple[str, str, int, int, int]  # project, path, size, mtime (ns), inode


class FileDigests:
    """(size, SHA-256) of files, the most recently used ``max_entries`` remembered; safe across threads."""

    def __init__(self, max_entries: int = 200_000) -> None:
        self.max_entries = max_entries
        self._known: OrderedDict[_Key, str] = OrderedDict()
        self._lock = threading.Lock()

    def of(self, project_id: str, path: Path) -> tuple[int, str]:
        """Raises FileNotFoundError for a file that is gone."""
        with open(path, "rb", buffering=0) as file:
            info = os.fstat(file.fileno())
            key = (project_id, str(path), info.st_size, info.st_mtime_ns, info.st_ino)
            known = self._recall(key)
            if known is not None:
                return info.st_size, known
            digest = hashlib.sha256()
            while chunk := file.read(CHUNK):
                digest.update(chunk)
        self._remember(key, digest.hexdigest())
        return info.st_size, digest.hexdigest()

    def of_bytes(self, project_id: str, path: Path, info: os.stat_result, data: bytes) -> str:
        """SHA-256 of ``data``, the whole file at ``path`` already read by the caller (``info`` from the same
        open file): remembered, or hashed from memory and remembered, without reading the file again."""
        key = (project_id, str(path), info.st_size, info.st_mtime_ns, info.st_ino)
        if len(data) != info.st_size:  # changed while it was read: hashed, never remembered
            return hashlib.sha256(data).hexdigest()
        known = self._recall(key)
        if known is None:
            known = hashlib.sha256(data).hexdigest()
            self._remember(key, known)
        return known

    def __len__(self) -> int:
        with self._lock:
            return len(self._known)

    def _recall(self, key: _Key) -> str | None:
        with self._lock:
            known = self._known.get(key)
            if known is not None:
                self._known.move_to_end(key)
            return known

    def _remember(self, key: _Key, digest: str) -> None:
        with self._lock:
            self._known[key] = digest
            self._known.move_to_end(key)
            while len(self._known) > self.max_entries:
                self._known.popitem(last=False)
