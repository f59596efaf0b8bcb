"""Where the bytes of a download come from: the cached file as it is, or its de-identified copy.

Shared by the ZIP and the manifest (download.py) and the CLI's batches (batch.py),
so every way out sends the same bytes for the same file: a small file is read
whole in one read (the file ends where it ends, whatever the index said); one
over LARGE_MEMBER is streamed in CHUNK pieces, never held, and a de-identified
one as its new header followed by its pixel data read from the cache as it is.
`prefetched` reads the next files in threads while one is being sent, within
PREFETCH_BYTES of memory.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from mi2b2.adapters.dicom.deidentify import DeidEngine, Deidentified, Withheld, deidentify_file
from mi2b2.adapters.storage.cache_files import CacheStore
from mi2b2.errors import PermanentError
from mi2b2.services.export import deid
from mi2b2.services.export.deid import WithheldReport
from mi2b2.services.export.layout import PlannedFile

CHUNK = 1 << 20  # 1 MiB: Starlette's 64 KiB default costs about 4x the throughput
LARGE_MEMBER = 32 << 20  # bigger files are streamed, not held in memory
PREFETCH_WORKERS = 2  # disk reads and encryption overlap with sending (both release the GIL)
PREFETCH_BYTES = 48 << 20  # ...within this much memory

T = TypeVar("T")
R = TypeVar("R")


@dataclass
class Deid:
    """How a de-identified project's files go out: its engine, their new names, and what was withheld."""

    engine: DeidEngine
    outputs: dict[str, PlannedFile]  # cache path -> the file under pseudonymous UIDs and names
    report: WithheldReport


@dataclass
class Source:
    """The bytes each member of a download carries: the cached file as it is, or its de-identified copy."""

    store: CacheStore
    deid: Deid | None

    def output(self, file: PlannedFile) -> PlannedFile:
        return file if self.deid is None else self.deid.outputs[file.cache_path]

    def small(self, file: PlannedFile) -> bytes | Withheld | None:
        """A small file's bytes (de-identified if so); None for a big one, which ``big`` streams."""
        if self.deid is None:
            return _read_small(self.store, file)
        engine = self.deid.engine
        try:
            with open(self.store.absolute(file.cache_path), "rb", buffering=0) as handle:
                stat = os.fstat(handle.fileno())
                if stat.st_size > LARGE_MEMBER:
                    return None
                data = handle.read(stat.st_size + 1)
        except FileNotFoundError:
            raise PermanentError("a file was deleted from the cache during the download") from None
        key = deid.HEADERS.identity(engine, stat)
        outcome = deid.HEADERS.get(key)
        if outcome is None:
            outcome = deidentify_file(io.BytesIO(data), engine)
            deid.HEADERS.put(key, outcome)
        if isinstance(outcome, Withheld):
            return outcome
        return outcome.header + data[outcome.pixel_start:outcome.pixel_end]

    def small_with_stat(self, file: PlannedFile) -> tuple[bytes, os.stat_result | None] | Withheld | None:
        """``small``, with the cache file's stat taken as it was read (None for a de-identified copy)."""
        if self.deid is not None:
            data = self.small(file)
            return data if data is None or isinstance(data, Withheld) else (data, None)
        return _read_small_with_stat(self.store, file)

    def big(self, file: PlannedFile) -> Iterator[bytes] | Withheld:
        """A big file in chunks: its de-identified header, then its pixel data read from the cache as it is."""
        path = self.store.absolute(file.cache_path)
        if self.deid is None:
            return chunks_of(path)
        outcome = self.big_outcome(file)
        if isinstance(outcome, Withheld):
            return outcome
        return header_and_range(outcome.header, path, outcome.pixel_start, outcome.pixel_end)

    def big_outcome(self, file: PlannedFile) -> Deidentified | Withheld:
        """The de-identified header of a big file and where its pixel data lies (made once, then cached)."""
        assert self.deid is not None
        path = self.store.absolute(file.cache_path)
        engine = self.deid.engine
        try:
            with open(path, "rb") as handle:
                key = deid.HEADERS.identity(engine, os.fstat(handle.fileno()))
                outcome = deid.HEADERS.get(key)
                if outcome is None:
                    outcome = deidentify_file(handle, engine)
                    deid.HEADERS.put(key, outcome)
        except FileNotFoundError:
            raise PermanentError("a file was deleted from the cache during the download") from None
        return outcome

    def sent(self) -> None:
        if self.deid is not None:
            self.deid.report.exported += 1

    def withhold(self, withheld: Withheld) -> None:
        assert self.deid is not None
        self.deid.report.add(withheld)



def header_and_range(header: bytes, path: Path, start: int, end: int) -> Iterator[bytes]:
    yield header
    with open(path, "rb", buffering=0) as handle:
        handle.seek(start)
        left = end - start
        while left > 0 and (chunk := handle.read(min(CHUNK, left))):
            left -= len(chunk)
            yield chunk


def _read_small(store: CacheStore, file: PlannedFile) -> bytes | None:
    """The whole file if it is small enough to hold; None for a big one (streamed instead)."""
    read = _read_small_with_stat(store, file)
    return None if read is None else read[0]


def _read_small_with_stat(store: CacheStore, file: PlannedFile) -> tuple[bytes, os.stat_result] | None:
    path = store.absolute(file.cache_path)
    try:
        with open(path, "rb", buffering=0) as handle:
            info = os.fstat(handle.fileno())
            if info.st_size > LARGE_MEMBER:
                return None
            # One read: the file ends where it ends, whatever the index said.
            return handle.read(info.st_size + 1), info
    except FileNotFoundError:
        raise PermanentError("a file was deleted from the cache during the download") from None


def chunks_of(path: Path) -> Iterator[bytes]:
    try:
        handle = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by file_chunks
    except FileNotFoundError:
        raise PermanentError("a file was deleted from the cache during the download") from None
    yield from file_chunks(handle)


def file_chunks(file: Any) -> Iterator[bytes]:
    with file:
        while chunk := file.read(CHUNK):
            yield chunk


def prefetched(items: list[T], load: Callable[[T], R], size_of: Callable[[T], int]) -> Iterator[tuple[T, R]]:
    """``(item, load(item))`` in order, with the next items loading in threads meanwhile.

    Reading from disk and encrypting overlap with sending what is ready; the
    look-ahead is bounded in bytes so memory stays flat. Closing the iterator
    cancels what is still queued."""
    pool = ThreadPoolExecutor(PREFETCH_WORKERS, thread_name_prefix="mi2b2-download")
    window: deque[tuple[T, Future[R], int]] = deque()
    pending = 0
    position = 0
    try:
        while position < len(items) or window:
            while position < len(items) and (not window or (
                    len(window) < PREFETCH_WORKERS * 4
                    and pending + min(size_of(items[position]), LARGE_MEMBER) <= PREFETCH_BYTES)):
                item = items[position]
                weight = min(size_of(item), LARGE_MEMBER)
                window.append((item, pool.submit(load, item), weight))
                pending += weight
                position += 1
            item, future, weight = window.popleft()
            pending -= weight
            yield item, future.result()
    finally:
        for _item, future, _weight in window:
            future.cancel()
        pool.shutdown(wait=False, cancel_futures=True)
