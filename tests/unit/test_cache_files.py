"""The cache's file layout: names, atomic placement, removal, walking, stale temp files."""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from mi2b2.adapters.storage import cache_files
from mi2b2.adapters.storage.cache_files import ABANDONED_AFTER, CacheFull, CacheStorageError, CacheStore
from mi2b2.errors import InvalidInput, PermanentError

STUDY, SERIES, SOP = "1.2.840.1", "1.2.840.1.1", "1.2.840.1.1.7"


@pytest.fixture
def store(tmp_path: Path) -> CacheStore:
    return CacheStore(tmp_path / "cache")


def _temp(store: CacheStore, content: bytes = b"DICM" * 100, name: str = "rx.part") -> Path:
    path = store.incoming_dir() / name
    path.write_bytes(content)
    return path


def test_layout_is_project_study_series_sop(store: CacheStore) -> None:
    relative = store.relative_path("alpha", STUDY, SERIES, SOP)
    assert relative == f"alpha/{STUDY}/{SERIES}/{SOP}.dcm"
    assert store.absolute(relative) == store.root / "alpha" / STUDY / SERIES / f"{SOP}.dcm"
    assert store.parse(relative) == ("alpha", STUDY, SERIES, SOP)


@pytest.mark.parametrize(
    ("project", "study", "series", "sop"),
    [
        ("../etc", STUDY, SERIES, SOP),
        ("alpha", "..", SERIES, SOP),
        ("alpha", STUDY, "1.2/../../x", SOP),
        ("alpha", STUDY, SERIES, "/etc/passwd"),
        ("Alpha", STUDY, SERIES, SOP),  # project ids are lower-case configuration identifiers
        ("alpha", "1..2", SERIES, SOP),
        ("alpha", STUDY, SERIES, "1." + "2" * 70),  # longer than a UID may be
        ("", STUDY, SERIES, SOP),
        (".incoming", STUDY, SERIES, SOP),
    ],
)
def test_names_that_could_escape_the_root_are_refused(store: CacheStore, project: str, study: str, series: str,
                                                      sop: str) -> None:
    with pytest.raises(InvalidInput):
        store.relative_path(project, study, series, sop)


@pytest.mark.parametrize("relative", ["../x.dcm", "alpha/../../x.dcm", f"/alpha/{STUDY}/{SERIES}/{SOP}.dcm",
                                      f"alpha/{STUDY}/{SERIES}/{SOP}.txt", f"alpha/{STUDY}/{SOP}.dcm"])
def test_relative_paths_outside_the_layout_are_refused(store: CacheStore, relative: str) -> None:
    with pytest.raises(InvalidInput):
        store.absolute(relative)


def test_incoming_dir_is_per_process_under_the_root(store: CacheStore) -> None:
    incoming = store.incoming_dir()
    assert incoming.is_dir()
    assert incoming.parent == store.root / ".incoming"
    assert incoming.name == f"{store.host}-{os.getpid()}"


def test_place_moves_the_file_and_returns_its_size(store: CacheStore) -> None:
    temp = _temp(store, b"x" * 1234)
    relative = store.relative_path("alpha", STUDY, SERIES, SOP)
    assert store.place(temp, relative) == 1234
    assert not temp.exists()
    assert store.absolute(relative).read_bytes() == b"x" * 1234
    # the same instance received again replaces the file
    assert store.place(_temp(store, b"y" * 10), relative) == 10
    assert store.absolute(relative).read_bytes() == b"y" * 10


def test_failed_place_leaves_neither_temp_nor_target(store: CacheStore) -> None:
    relative = store.relative_path("alpha", STUDY, SERIES, SOP)
    blocker = store.root / "alpha" / STUDY  # a file where the study folder must go: mkdir fails, even for root
    blocker.parent.mkdir(parents=True)
    blocker.write_bytes(b"")
    temp = _temp(store)
    with pytest.raises(CacheStorageError, match="cannot place") as caught:
        store.place(temp, relative)
    assert isinstance(caught.value, PermanentError)
    assert "server.cache_dir" in str(caught.value)
    assert not temp.exists()
    assert not store.absolute(relative).exists()


def test_disk_full_is_a_clear_cache_full_error(store: CacheStore, monkeypatch: pytest.MonkeyPatch) -> None:
    def full(_src: object, _dst: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(cache_files.os, "replace", full)
    temp = _temp(store)
    relative = store.relative_path("alpha", STUDY, SERIES, SOP)
    with pytest.raises(CacheFull, match="out of disk space") as caught:
        store.place(temp, relative)
    assert caught.value.errno == errno.ENOSPC
    assert "mi2b2 cache delete" in str(caught.value)
    assert not temp.exists()
    assert not store.absolute(relative).exists()


def test_place_refuses_a_bad_name_and_drops_the_temp(store: CacheStore) -> None:
    temp = _temp(store)
    with pytest.raises(InvalidInput):
        store.place(temp, "../../outside.dcm")
    assert not temp.exists()
    assert not (store.root.parent / "outside.dcm").exists()


def test_remove_delete_study_and_walk(store: CacheStore) -> None:
    paths = []
    for series in ("1.2.840.1.1", "1.2.840.1.2"):
        for n in range(3):
            relative = store.relative_path("alpha", STUDY, series, f"{series}.{n}")
            store.place(_temp(store, b"z" * (100 + n)), relative)
            paths.append(relative)
    other = store.relative_path("beta", "9.9", "9.9.1", "9.9.1.1")
    store.place(_temp(store, b"q" * 7), other)
    _temp(store, b"temp", "still-arriving.part")  # incoming files are not cache content

    walked = dict(store.walk())
    assert set(walked) == {*paths, other}
    assert dict(store.walk("beta")) == {other: 7}
    assert list(store.walk("gamma")) == []

    assert store.remove(paths[0]) == 100
    assert store.remove(paths[0]) == 0  # already gone
    assert store.delete_study("alpha", STUDY) == 101 + 102 + 100 + 101 + 102
    assert not (store.root / "alpha" / STUDY).exists()
    assert store.delete_study("alpha", STUDY) == 0
    assert dict(store.walk()) == {other: 7}


def test_remove_prunes_empty_folders(store: CacheStore) -> None:
    relative = store.relative_path("alpha", STUDY, SERIES, SOP)
    store.place(_temp(store), relative)
    store.remove(relative)
    assert not (store.root / "alpha" / STUDY).exists()
    assert (store.root / "alpha").is_dir()


def test_stale_incoming_of_dead_processes_on_this_host_is_cleaned(store: CacheStore) -> None:
    mine = _temp(store, b"mine", "alive.part")
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_dir = store.root / ".incoming" / f"{store.host}-{dead.stdout.strip()}"
    dead_dir.mkdir(parents=True)
    (dead_dir / "a.part").write_bytes(b"1")
    (dead_dir / "b.part").write_bytes(b"2")
    other_host = store.root / ".incoming" / "elsewhere-1"  # another host's receiver on a shared volume
    other_host.mkdir()
    (other_host / "c.part").write_bytes(b"3")

    stale = store.stale_incoming_files()
    assert sorted(stale) == [f".incoming/{dead_dir.name}/a.part", f".incoming/{dead_dir.name}/b.part"]
    assert store.clean_stale_incoming() == 2
    assert not dead_dir.exists()
    assert mine.exists() and (other_host / "c.part").exists()
    assert store.stale_incoming_files() == []


def test_another_hosts_temp_files_untouched_for_an_hour_are_abandoned(store: CacheStore) -> None:
    """A host that died leaves its temp files on the shared volume; no other host sees its pids."""
    folder = store.root / ".incoming" / "elsewhere-42"
    folder.mkdir(parents=True)
    old, fresh = folder / "old.part", folder / "fresh.part"
    old.write_bytes(b"1")
    fresh.write_bytes(b"2")
    an_hour_ago = time.time() - ABANDONED_AFTER - 60
    os.utime(old, (an_hour_ago, an_hour_ago))
    mine = _temp(store, b"mine", "slow.part")
    os.utime(mine, (an_hour_ago, an_hour_ago))  # this host's live process: judged by its pid, not by age

    now = datetime.now(UTC)
    assert store.stale_incoming_files() == []  # without the time, nothing of another host's is judged
    assert store.stale_incoming_files(now) == [".incoming/elsewhere-42/old.part"]
    assert store.clean_stale_incoming(now) == 1
    assert not old.exists() and fresh.exists() and mine.exists()
    assert folder.is_dir()  # a live, idle receiver there still writes into it
    assert store.abandoned_files(now + timedelta(seconds=ABANDONED_AFTER + 60)) == [fresh]


def test_discard_removes_stray_files_but_not_incoming(store: CacheStore) -> None:
    stray = store.root / "alpha" / "notes.txt"
    stray.parent.mkdir(parents=True)
    stray.write_text("hello")
    assert dict(store.walk()) == {"alpha/notes.txt": 5}
    assert store.discard("alpha/notes.txt") == 5
    assert not stray.exists()
    with pytest.raises(InvalidInput):
        store.discard(".incoming/x/y.part")
    with pytest.raises(InvalidInput):
        store.discard("alpha/../../etc/passwd")


def test_place_survives_a_folder_pruned_by_another_host_between_mkdir_and_rename(tmp_path: Path) -> None:
    """On a shared volume another host may remove the last file of a series, and its empty folder,
    just after this host made that folder for a new instance: the rename makes it again."""

    class PrunedOnce(CacheStore):
        pruned = False

        def _make_dirs(self, folder: Path) -> None:
            super()._make_dirs(folder)
            if not self.pruned:  # the other host's prune, right after our mkdir
                self.pruned = True
                folder.rmdir()

    store = PrunedOnce(tmp_path / "cache")
    relative = store.relative_path("alpha", STUDY, SERIES, SOP)
    assert store.place(_temp(store, b"DICM" * 10), relative) == 40
    assert store.pruned and store.absolute(relative).read_bytes() == b"DICM" * 10
