"""Digests of cache files: remembered per context and per project, bounded, re-read when a file changes."""

from __future__ import annotations

import hashlib
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mi2b2.adapters.storage.file_digests import FileDigests


def _files(folder: Path, count: int) -> list[Path]:
    paths = []
    for n in range(count):
        path = folder / f"{n}.dcm"
        path.write_bytes(os.urandom(1000 + n))
        paths.append(path)
    return paths


def _sha(path: Path) -> tuple[int, str]:
    data = path.read_bytes()
    return len(data), hashlib.sha256(data).hexdigest()


def test_each_project_has_its_own_entries_and_each_memory_its_own(tmp_path: Path) -> None:
    (path,) = _files(tmp_path, 1)
    first, second = FileDigests(), FileDigests()
    assert first.of("alpha", path) == _sha(path)
    assert len(first) == 1 and len(second) == 0
    assert first.of("beta", path) == _sha(path)
    assert len(first) == 2


def test_a_changed_file_is_hashed_again(tmp_path: Path) -> None:
    (path,) = _files(tmp_path, 1)
    digests = FileDigests()
    before = digests.of("alpha", path)
    path.write_bytes(os.urandom(path.stat().st_size))  # same size, new content and mtime
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert digests.of("alpha", path) == _sha(path) != before


def test_the_memory_is_bounded_and_keeps_the_recently_used(tmp_path: Path) -> None:
    paths = _files(tmp_path, 5)
    digests = FileDigests(max_entries=3)
    for path in paths:
        digests.of("alpha", path)
    assert len(digests) == 3


def test_a_missing_file_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FileDigests().of("alpha", tmp_path / "gone.dcm")


def test_many_threads_at_once_get_the_right_digests(tmp_path: Path) -> None:
    paths = _files(tmp_path, 40)
    digests = FileDigests(max_entries=25)  # evicting while others read
    crowd = [(project, path) for project in ("alpha", "beta") for path in paths] * 3
    with ThreadPoolExecutor(16) as pool:
        answers = list(pool.map(lambda job: digests.of(*job), crowd))
    assert answers == [_sha(path) for _project, path in crowd]


def test_bytes_already_read_are_hashed_once_and_shared_with_reads_from_the_file(tmp_path: Path) -> None:
    (path,) = _files(tmp_path, 1)
    digests = FileDigests()
    with open(path, "rb") as file:
        info = os.fstat(file.fileno())
        data = file.read()
    assert digests.of_bytes("alpha", path, info, data) == _sha(path)[1]
    assert digests.of("alpha", path) == _sha(path) and len(digests) == 1  # one entry, whichever way it came
    assert digests.of_bytes("alpha", path, info, bytes(len(data))) == _sha(path)[1]  # recalled, not hashed again
    # Bytes that are not the whole file (it changed while it was read) are hashed and never remembered.
    assert digests.of_bytes("beta", path, info, data[:-1]) == hashlib.sha256(data[:-1]).hexdigest()
    assert len(digests) == 1
