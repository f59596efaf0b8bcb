"""The project cache on disk: one file per instance, placed atomically.

Layout::

    root/<project>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm
    root/.incoming/<host>-<pid>/...     temp files of one receiving process

Every path component is checked (project ids are configuration identifiers,
UIDs are digits and dots), so no name that reaches this module can point
outside ``root``. A file is written into the process's incoming folder first
and moved into place with ``os.replace`` on the same file system: a reader
sees either no file or the whole file, never a half-written one.

The index (which files exist, their sizes, who fetched them) lives in the
database; ``services/cache/`` keeps the two in step and ``fsck`` compares them.
"""

from __future__ import annotations

import errno
import os
import re
import shutil
import socket
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

from mi2b2.adapters.process import pid_alive
from mi2b2.adapters.storage.durable import fsync_dir
from mi2b2.config import IDENTIFIER
from mi2b2.errors import InvalidInput, PermanentError

INCOMING = ".incoming"
ABANDONED_AFTER = 3600.0  # seconds without a write: another host's temp file has no writer left
SUFFIX = ".dcm"
UID = re.compile(r"[0-9]+(\.[0-9]+)*\Z")
MAX_UID = 64
_HOST_UNSAFE = re.compile(r"[^A-Za-z0-9_.]")
_FULL = (errno.ENOSPC, errno.EDQUOT)


class CacheStorageError(PermanentError):
    """The cache folder could not be written or read (permissions, broken disk)."""

    def __init__(self, message: str, errno_value: int | None = None) -> None:
        super().__init__(message)
        self.errno = errno_value


class CacheFull(CacheStorageError):
    """The file system of the cache has no space (or quota) left.

    A receiver answers this with DICOM status A700 (out of resources) so the
    PACS may try again later; an admin frees space or grows the volume."""


def _check_uid(value: str, what: str) -> str:
    if not isinstance(value, str) or len(value) > MAX_UID or not UID.match(value):
        raise InvalidInput(f"{what} {value!r} is not a DICOM UID (digits and dots, at most {MAX_UID} characters)")
    return value


def _check_project(value: str) -> str:
    if not isinstance(value, str) or not IDENTIFIER.match(value):
        raise InvalidInput(f"{value!r} is not a project id (lower-case letters, digits, '-', '_', '.')")
    return value


def _storage_error(action: str, where: str, exc: OSError) -> CacheStorageError:
    reason = exc.strerror or type(exc).__name__
    if exc.errno in _FULL:
        return CacheFull(f"the cache is out of disk space: cannot {action} {where} ({reason}); "
                         "free space (`mi2b2 cache delete`) or grow the cache volume", exc.errno)
    return CacheStorageError(f"cannot {action} {where} in the cache ({reason}); "
                             "check the permissions and health of server.cache_dir", exc.errno)


class CacheStore:
    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.host = _HOST_UNSAFE.sub("_", socket.gethostname()) or "localhost"

    # names -------------------------------------------------------------------

    def relative_path(self, project: str, study: str, series: str, sop: str) -> str:
        """Where an instance lives, relative to the root, with '/' separators."""
        return "/".join((
            _check_project(project),
            _check_uid(study, "StudyInstanceUID"),
            _check_uid(series, "SeriesInstanceUID"),
            _check_uid(sop, "SOPInstanceUID") + SUFFIX,
        ))

    def parse(self, relative: str) -> tuple[str, str, str, str]:
        """(project, study, series, sop) of a relative path; InvalidInput if it is not in the cache layout."""
        parts = relative.split("/")
        if len(parts) != 4 or not parts[3].endswith(SUFFIX):
            raise InvalidInput(f"{relative!r} is not a cache path (project/study/series/sop{SUFFIX})")
        project, study, series, name = parts
        sop = name[: -len(SUFFIX)]
        if self.relative_path(project, study, series, sop) != relative:
            raise InvalidInput(f"{relative!r} is not a cache path")
        return project, study, series, sop

    def absolute(self, relative: str) -> Path:
        self.parse(relative)
        return self.root.joinpath(*relative.split("/"))

    def study_dir(self, project: str, study: str) -> Path:
        return self.root / _check_project(project) / _check_uid(study, "StudyInstanceUID")

    # writing -----------------------------------------------------------------

    def incoming_dir(self) -> Path:
        """This process's folder for files being received; same file system as the cache."""
        folder = self.root / INCOMING / f"{self.host}-{os.getpid()}"
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise _storage_error("create", str(folder), exc) from None
        return folder

    def place(self, temp: Path, relative: str) -> int:
        """Move a complete temp file to ``relative`` atomically and durably; return its size.

        An existing file at ``relative`` (the same SOP instance received again)
        is replaced. On failure the temp file is removed and nothing new is left
        at ``relative``.
        """
        size = self.move_in(temp, relative)
        self.make_durable([relative])
        return size

    def move_in(self, temp: Path, relative: str) -> int:
        """Rename a complete temp file to ``relative`` (atomic, not yet durable); return its size.

        The receiver answers the PACS after this and leaves the fsyncs to
        `make_durable`, run for many files at once off the network thread: a
        process crash cannot lose a renamed file (the kernel has it), and the
        index, which only names durable files, decides what counts."""
        try:
            target = self.absolute(relative)
        except InvalidInput:
            temp.unlink(missing_ok=True)
            raise
        try:
            size = os.stat(temp).st_size
            self._make_dirs(target.parent)
            try:
                os.replace(temp, target)
            except FileNotFoundError:
                if not temp.exists():
                    raise
                # Another host pruned the folder, empty a moment ago, between the two steps
                # (a removal or fsck on a shared cache volume): make it again, once.
                self._make_dirs(target.parent)
                os.replace(temp, target)
        except OSError as exc:
            temp.unlink(missing_ok=True)
            if exc.errno == errno.EXDEV:
                raise CacheStorageError(f"{temp} is on another file system than the cache; "
                                        "write temp files under CacheStore.incoming_dir()", exc.errno) from None
            raise _storage_error("place", relative, exc) from None
        return size

    def make_durable(self, relatives: list[str]) -> list[str]:
        """fsync these files' data and their folders; return the ones that are gone."""
        gone = []
        folders = set()
        for relative in relatives:
            path = self.absolute(relative)
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                gone.append(relative)
                continue
            except OSError as exc:
                raise _storage_error("sync", relative, exc) from None
            try:
                os.fdatasync(fd)
            except OSError as exc:
                raise _storage_error("sync", relative, exc) from None
            finally:
                os.close(fd)
            folders.add(path.parent)
        for folder in folders:
            try:
                fsync_dir(folder)
            except OSError as exc:
                raise _storage_error("sync", str(folder.relative_to(self.root)), exc) from None
        return gone

    def _make_dirs(self, folder: Path) -> None:
        """mkdir -p, syncing each parent whose entries changed, so a new folder survives a crash."""
        missing: list[Path] = []
        current = folder
        while not current.exists() and current != self.root and self.root in current.parents:
            missing.append(current)
            current = current.parent
        self.root.mkdir(parents=True, exist_ok=True)
        for path in reversed(missing):
            path.mkdir(exist_ok=True)
            fsync_dir(path.parent)

    # removing ----------------------------------------------------------------

    def remove(self, relative: str) -> int:
        """Delete one instance file; return the bytes freed (0 if it was already gone)."""
        path = self.absolute(relative)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise _storage_error("remove", relative, exc) from None
        self._prune(path.parent, stop=self.root / relative.split("/")[0])
        return size

    def discard(self, relative: str) -> int:
        """Delete any file ``walk`` reported, in the layout or not (fsck's clean-up of strays)."""
        parts = relative.split("/")
        if not parts or parts[0] == INCOMING or any(p in ("", ".", "..") for p in parts):
            raise InvalidInput(f"{relative!r} is not a file of the cache")
        path = self.root.joinpath(*parts)
        try:
            size = path.lstat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        except OSError as exc:
            raise _storage_error("remove", relative, exc) from None
        self._prune(path.parent, stop=self.root / parts[0] if len(parts) > 1 else self.root)
        return size

    def exists(self, relative: str) -> bool:
        return self.absolute(relative).is_file()

    def size(self, relative: str) -> int | None:
        """Size of an instance file, None if it is not there."""
        try:
            return self.absolute(relative).stat().st_size
        except FileNotFoundError:
            return None

    def delete_study(self, project: str, study: str) -> int:
        """Delete a study's folder; return the bytes freed."""
        folder = self.study_dir(project, study)
        freed = 0
        try:
            for dirpath, _dirs, files in os.walk(folder):
                for name in files:
                    freed += os.lstat(os.path.join(dirpath, name)).st_size
            shutil.rmtree(folder)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise _storage_error("delete", f"{project}/{study}", exc) from None
        return freed

    def _prune(self, folder: Path, stop: Path) -> None:
        """Remove folders left empty, up to (not including) ``stop``."""
        while folder != stop and stop in folder.parents:
            try:
                folder.rmdir()
            except OSError:
                return  # not empty, or already gone
            folder = folder.parent

    # reading -----------------------------------------------------------------

    def walk(self, project: str | None = None) -> Iterator[tuple[str, int]]:
        """Every file under the root (or one project), as (relative path, size), incoming files left out.

        Files that do not follow the layout are yielded too: fsck must see them."""
        start = self.root / _check_project(project) if project is not None else self.root
        if not start.is_dir():
            return
        yield from self._walk(start)

    def _walk(self, folder: Path) -> Iterator[tuple[str, int]]:
        try:
            entries = sorted(os.scandir(folder), key=lambda e: e.name)
        except FileNotFoundError:
            return
        except OSError as exc:
            raise _storage_error("list", str(folder), exc) from None
        for entry in entries:
            if folder == self.root and entry.name == INCOMING:
                continue
            if entry.is_dir(follow_symlinks=False):
                yield from self._walk(Path(entry.path))
            else:
                try:
                    size = entry.stat(follow_symlinks=False).st_size
                except FileNotFoundError:
                    continue  # removed while we looked
                yield Path(entry.path).relative_to(self.root).as_posix(), size

    # incoming ----------------------------------------------------------------

    def stale_incoming(self) -> list[Path]:
        """Incoming folders of processes on this host that are no longer running.

        Another host's folders (a shared cache volume) stay: this host cannot see its
        processes, and a receiver there that is alive and idle still writes into its own.
        Their files are judged one by one (`abandoned_files`)."""
        base = self.root / INCOMING
        if not base.is_dir():
            return []
        stale = []
        for entry in sorted(base.iterdir()):
            host, _, pid = entry.name.rpartition("-")
            if not entry.is_dir() or host != self.host or not pid.isdigit():
                continue
            if int(pid) != os.getpid() and not pid_alive(int(pid)):
                stale.append(entry)
        return stale

    def abandoned_files(self, now: datetime) -> list[Path]:
        """Other hosts' temp files untouched for ABANDONED_AFTER: left by a host that died.

        A live receiver writes a file it receives at least every network timeout, or
        drops it, so a file this old has no writer left."""
        base = self.root / INCOMING
        if not base.is_dir():
            return []
        cutoff = now.timestamp() - ABANDONED_AFTER
        found = []
        for entry in sorted(base.iterdir()):
            host, _, pid = entry.name.rpartition("-")
            if not entry.is_dir() or host == self.host or not pid.isdigit():
                continue
            for dirpath, _dirs, names in os.walk(entry):
                for name in sorted(names):
                    path = Path(dirpath) / name
                    try:
                        if path.lstat().st_mtime < cutoff:
                            found.append(path)
                    except FileNotFoundError:
                        continue  # its host placed or dropped it meanwhile
        return found

    def stale_incoming_files(self, now: datetime | None = None) -> list[str]:
        """Temp files left by dead processes, relative to the root; given ``now``, with
        the files other hosts abandoned."""
        files: list[str] = []
        for folder in self.stale_incoming():
            for dirpath, _dirs, names in os.walk(folder):
                files.extend((Path(dirpath) / n).relative_to(self.root).as_posix() for n in sorted(names))
        if now is not None:
            files.extend(path.relative_to(self.root).as_posix() for path in self.abandoned_files(now))
        return files

    def clean_stale_incoming(self, now: datetime | None = None) -> int:
        """Remove the incoming folders of dead processes on this host and, given ``now``,
        the files other hosts abandoned; return the temp files removed."""
        removed = 0
        for folder in self.stale_incoming():
            removed += sum(len(names) for _d, _s, names in os.walk(folder))
            try:
                shutil.rmtree(folder)
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _storage_error("clean", str(folder.relative_to(self.root)), exc) from None
        for path in self.abandoned_files(now) if now is not None else []:
            try:
                path.unlink()
                removed += 1
            except FileNotFoundError:
                pass
            except OSError as exc:
                raise _storage_error("clean", str(path.relative_to(self.root)), exc) from None
        return removed
