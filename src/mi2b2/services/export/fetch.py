"""The CLI's folder download: fetch a manifest, then its files in batches, resumably, optionally encrypting them.

Runs on the researcher's machine against the server's API (``source``: the
Python client). Guarantees:

* A file appears under its final name only when it is whole and its size
  and SHA-256 match the server's manifest (temp name beside it, then rename);
  an interrupted run leaves only ``*.mi2b2-part`` files, which the next run removes.
* A rerun skips every file already complete and verified.
* Encrypted: plaintext exists only in memory (one file at a time per
  worker, or 64 KiB at a time inside age's stream for a file over
  LARGE_FILE); what reaches the disk is ciphertext under keyed names.

The files come in batches (``/download/files``, a tar stream; four requests in
flight): one request per file spent ~14 ms each on checks and HTTP.

In an encrypted_only project (the manifest says ``server_encrypts``) the
server encrypts: each batch carries the download's public key, each file
arrives as an age file followed by the SHA-256 of that ciphertext, and is
written as it came (checked, temp name, rename); the plaintext never reaches
this machine outside age. The manifest's plaintext SHA-256 is kept for
``mi2b2 decrypt`` to verify.

Resuming an encrypted download needs its key (the passphrase, or
``--identity`` for a recipients download): verifying a file means
decrypting it, and the keyed names come from the key inside manifest.age.
"""

from __future__ import annotations

import hashlib
import os
import tarfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from mi2b2.adapters.crypto import age_files
from mi2b2.domain.safe_paths import check_all, inside
from mi2b2.errors import InvalidInput, Mi2b2Error, PermanentError
from mi2b2.services.export.layout import (
    BATCH_ERROR_SUFFIX,
    BATCH_SHA256_SUFFIX,
    IDENTITY,
    MANIFEST,
    PLAIN_SUFFIX,
    README,
    Manifest,
    ManifestEntry,
    PlannedFile,
    keyed_paths,
    readme_text,
)
from mi2b2.services.export.reader import TEMP_SUFFIX, ExportFolder, file_sha256, keys_for, temp_name, write_atomically

WORKERS = 4  # requests in flight: while one file is hashed, encrypted or written, others arrive
BATCH_FILES = 64  # files per request
BATCH_BYTES = 64 << 20  # ...and at most this much of them
LARGE_FILE = 32 << 20  # encrypted whole in memory up to this size; streamed through age above
PROGRESS_STEP = 1 << 20
BLOCKSIZE = tarfile.BLOCKSIZE
_CHANGED = ("arrived with another size or SHA-256 than the manifest lists (changed in the cache meanwhile?); "
            "run the download again")


class DownloadSource(Protocol):
    """What the fetcher needs from the server (``mi2b2.client.Mi2b2Client`` provides it)."""

    def download_manifest(self, project: str, study_uids: list[str], all_studies: bool = False,
                          encryption: str | None = None) -> dict[str, Any]: ...

    def download_files(self, project: str, files: list[tuple[int, str, str]],
                       encryption: dict[str, Any] | None = None) -> Iterator[bytes]: ...


class Progress(Protocol):
    def start(self, files: int, studies: int, total_bytes: int) -> None: ...

    def advance(self, size: int) -> None: ...

    def file_done(self) -> None: ...

    def study_done(self) -> None: ...


class _NoProgress:
    def start(self, files: int, studies: int, total_bytes: int) -> None:
        pass

    def advance(self, size: int) -> None:
        pass

    def file_done(self) -> None:
        pass

    def study_done(self) -> None:
        pass


@dataclass
class FetchReport:
    folder: Path
    encrypted: bool
    files: int = 0
    studies: int = 0
    downloaded: int = 0
    skipped: int = 0
    bytes_downloaded: int = 0
    failed: list[tuple[str, str]] = field(default_factory=list)  # (name in the folder, why)


@dataclass(frozen=True)
class _Job:
    file: dict[str, Any]  # an entry of the server's manifest
    name: str  # where it goes, relative to the folder
    download_id: int
    path: Path  # the folder / name, checked to stay inside the folder


def fetch_download(source: DownloadSource, project: str, study_uids: Sequence[str], target: Path,
                   all_studies: bool = False, passphrase: str | None = None, recipients: Sequence[str] = (),
                   identities: Sequence[str | Path | Any] = (), progress: Progress | None = None,
                   workers: int = WORKERS) -> FetchReport:
    progress = progress or _NoProgress()
    encrypted = passphrase is not None or bool(recipients)
    if passphrase is not None and recipients:
        raise InvalidInput("encrypt with a passphrase or to recipient keys, not both")
    if passphrase is not None:
        age_files.check_passphrase(passphrase)
    parsed = age_files.parse_recipients(recipients) if recipients else []
    target = Path(target)
    _check_folder(target, encrypted)

    mode = None if not encrypted else ("passphrase" if passphrase is not None else "recipients")
    manifest = source.download_manifest(project, list(study_uids), all_studies, mode)
    ids, files = _checked_listing(manifest)  # the server's listing, refused whole before anything is written
    _prepare_folder(target)
    report = FetchReport(target, encrypted, files=len(files), studies=len(ids))

    sealing = None  # what each batch sends for the server to encrypt with (encrypted_only projects)
    if encrypted:
        keys, keep, keep_texts, names = _encrypted_plan(target, project, files, passphrase, parsed, recipients,
                                                        identities, mode or "", str(manifest.get("created_at", "")))
        if manifest.get("server_encrypts") is True:
            sealing = {"recipients": keep_texts}  # the download's own public keys: no scrypt on the server
    else:
        keys, keep, names = [], [], [f["path"] for f in files]
    check_all(names, "the server's download listing names")
    jobs = [_Job(f, n, ids[f["study_uid"]], inside(target, n)) for f, n in zip(files, names, strict=True)]

    progress.start(len(files), len(ids), sum(int(f["size"]) for f in files))
    remaining: dict[str, int] = {}
    for job in jobs:
        remaining[job.file["study_uid"]] = remaining.get(job.file["study_uid"], 0) + 1
    lock = threading.Lock()

    def finished(job: _Job) -> None:
        with lock:
            remaining[job.file["study_uid"]] -= 1
            progress.file_done()
            if remaining[job.file["study_uid"]] == 0:
                progress.study_done()

    todo = []
    for job in jobs:
        if _complete(job.path, job.file, keys if encrypted else None):
            report.skipped += 1
            progress.advance(int(job.file["size"]))
            finished(job)
        else:
            todo.append(job)

    stop = threading.Event()
    folders: set[Path] = set()  # made already

    def run(batch: list[_Job]) -> list[tuple[_Job, int | str]]:
        """Fetch one batch; (job, bytes received) for each file written, (job, why) for each that was not."""
        asked = [(job.download_id, job.file["study_uid"], job.file["sop_uid"]) for job in batch]
        members = _TarStream(source.download_files(project, asked, sealing))
        outcomes: list[tuple[_Job, int | str]] = []
        for job in batch:
            name, size = members.header()
            sop_uid = job.file["sop_uid"]
            if name == sop_uid + BATCH_ERROR_SUFFIX:
                outcomes.append((job, members.read(min(size, 4096)).decode("utf-8", "replace")))
                members.skip(size - min(size, 4096))
            elif name != sop_uid:
                raise PermanentError(f"the server sent {name[:80]!r} where {sop_uid} was due; is --server an mi2b2 "
                                     "server of this version? Run the download again")
            elif sealing is not None:  # an age file the server made: its size is the ciphertext's
                try:
                    outcomes.append((job, _receive_sealed(members, size, job, progress, stop, folders)))
                except _Mismatch as exc:
                    outcomes.append((job, str(exc)))
                finished(job)
                continue
            elif size != int(job.file["size"]):
                members.skip(size)
                outcomes.append((job, str(_Mismatch(_CHANGED))))
            else:
                try:
                    outcomes.append((job, _receive(members.take(size), job.path, job.file, keep, progress,
                                                   stop, folders)))
                except _Mismatch as exc:
                    outcomes.append((job, str(exc)))
            members.skip(-size % BLOCKSIZE)
            finished(job)
        members.drain()  # the end blocks: the connection then serves the next batch
        return outcomes

    pool = ThreadPoolExecutor(max(1, workers), thread_name_prefix="mi2b2-fetch")
    try:
        futures = {pool.submit(run, batch) for batch in _batches(todo, workers)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_EXCEPTION)
            for future in done:
                for job, outcome in future.result():
                    if isinstance(outcome, str):  # this file only: the rest goes on
                        report.failed.append((job.name, outcome))
                    else:
                        report.bytes_downloaded += outcome
                        report.downloaded += 1
    except BaseException:
        stop.set()  # workers notice between chunks and remove their temp files
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return report


def _batches(jobs: list[_Job], workers: int) -> Iterator[list[_Job]]:
    """Consecutive runs of files, one request each: up to BATCH_FILES files or BATCH_BYTES, and at least
    as many batches as workers when there are files enough."""
    most = max(1, min(BATCH_FILES, -(-len(jobs) // max(1, workers))))
    batch: list[_Job] = []
    size = 0
    for job in jobs:
        if batch and (len(batch) >= most or size + int(job.file["size"]) > BATCH_BYTES):
            yield batch
            batch, size = [], 0
        batch.append(job)
        size += int(job.file["size"])
    if batch:
        yield batch


class _TarStream:
    """The members of a batch's tar answer, read as the chunks arrive, without copying file bytes."""

    def __init__(self, chunks: Iterator[bytes]) -> None:
        self._chunks = chunks
        self._view = memoryview(b"")

    def take(self, size: int) -> Iterator[memoryview]:
        """The next ``size`` bytes, in pieces (consume them all)."""
        while size > 0:
            if not self._view:
                chunk = next(self._chunks, b"")
                if not chunk:
                    raise PermanentError("the server's answer ended early; run the download again to fetch the rest")
                self._view = memoryview(chunk)
            piece = self._view[:size]
            self._view = self._view[len(piece):]
            size -= len(piece)
            yield piece

    def read(self, size: int) -> bytes:
        return b"".join(self.take(size))

    def skip(self, size: int) -> None:
        for _piece in self.take(size):
            pass

    def header(self) -> tuple[str, int]:
        try:
            info = tarfile.TarInfo.frombuf(self.read(BLOCKSIZE), "utf-8", "strict")
        except tarfile.HeaderError:
            raise PermanentError("the server's answer is not the tar stream an mi2b2 server sends; is --server an "
                                 "mi2b2 server of this version?") from None
        return info.name, info.size

    def drain(self) -> None:
        for _chunk in self._chunks:
            pass


class _Mismatch(PermanentError):
    pass


def _check_folder(target: Path, encrypted: bool) -> None:
    """Refuse a folder that holds the other kind of download; writes nothing."""
    if target.exists() and not target.is_dir():
        raise InvalidInput(f"{target} is a file; give a folder to download into")
    has_manifest = (target / MANIFEST).exists()
    if has_manifest and not encrypted:
        raise InvalidInput(f"{target} holds an encrypted download; to resume it give the same --passphrase or "
                           "--recipient (and --identity), or download plain into another folder")
    if encrypted and not has_manifest and target.is_dir() and any(n.endswith(".dcm") for n in ExportFolder(target).names()):
        raise InvalidInput(f"{target} holds a plain download; download encrypted into another folder")


def _checked_listing(manifest: Any) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """The server's manifest, shaped as mi2b2 makes it, every readable path inside the folder.

    A server (or whatever answers at its address) is not trusted to name paths:
    nothing is written until every name and field has passed."""
    what = "the server's download listing"
    try:
        ids = {str(s["study_uid"]): int(s["download_id"]) for s in manifest["studies"]}
        files: list[dict[str, Any]] = list(manifest["files"])
        for f in files:
            if not (isinstance(f, dict) and f.get("study_uid") in ids and int(f["size"]) >= 0
                    and isinstance(f["sha256"], str) and isinstance(f["number"], str) and f["number"].isdigit()
                    and isinstance(f["sop_uid"], str) and isinstance(f["series_uid"], str)):
                raise ValueError
    except (KeyError, TypeError, ValueError):
        raise InvalidInput(f"{what} is not an mi2b2 download manifest (is --server an mi2b2 server?); "
                           "nothing was written") from None
    check_all((f["path"] for f in files), f"{what} names")
    for f in files:
        if not f["path"].lower().endswith(PLAIN_SUFFIX):
            raise InvalidInput(f"{what} names {f['path'][:120]!r}, not a {PLAIN_SUFFIX} file; mi2b2 downloads hold "
                               "DICOM files only, so the download was refused and nothing was written")
    return ids, files


def _prepare_folder(target: Path) -> None:
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"cannot create {target} ({exc.strerror or type(exc).__name__})") from None
    for name in ExportFolder(target).names():  # what an interrupted run left: never a final name, never kept
        if name.endswith(TEMP_SUFFIX):
            (target / name).unlink(missing_ok=True)


def _encrypted_plan(target: Path, project: str, files: list[dict[str, Any]], passphrase: str | None,
                    recipients: list[Any], recipient_texts: Sequence[str], identities: Sequence[str | Path | Any],
                    mode: str, created_at: str) -> tuple[list[Any], list[Any], list[str], list[str]]:
    """(keys to verify existing files, recipients to encrypt to and as text, keyed name of each file); writes
    identity.age, manifest.age and README.txt before any image, so even a broken-off download can be
    resumed and read."""
    folder = ExportFolder(target)
    if folder.has(MANIFEST):
        keys = keys_for(folder, passphrase, identities, str(target))
        old = Manifest.from_json(age_files.decrypt(folder.read(MANIFEST), keys, MANIFEST))
        if old.mode != mode:
            raise InvalidInput(f"{target} holds a {old.mode} download; resume it the same way, or use another folder")
        given = sorted(age_files.recipient_text(r) for r in recipient_texts)
        if mode == "recipients" and given and given != sorted(old.recipients):
            raise InvalidInput(f"{target} holds a download encrypted to other keys; resume it with the same "
                               "--recipient keys, or use another folder")
        encrypt_to, keep_texts = age_files.parse_recipients(old.recipients), old.recipients
        key, created, previous = old.name_key, old.created_at, old.files
    else:
        keys = age_files.load_identities(identities)
        key, created, previous = age_files.new_name_key(), created_at, []
        if passphrase is not None:
            identity = age_files.new_identity()
            keys.append(identity)
            encrypt_to, keep_texts = [identity.to_public()], [str(identity.to_public())]
            # The download's one scrypt: every file is encrypted to the identity it protects.
            blob = age_files.encrypt_with_passphrase(age_files.identity_file_text(identity).encode(), passphrase)
            write_atomically(target / IDENTITY, blob)
        else:
            encrypt_to, keep_texts = recipients, [age_files.recipient_text(r) for r in recipient_texts]
    planned = [PlannedFile(f["study_uid"], f["series_uid"], f["sop_uid"], f["path"], f["number"], int(f["size"]))
               for f in files]
    names = keyed_paths(key, planned)
    entries = {e.path: e for e in previous}  # earlier downloads into this folder stay listed
    for f, name in zip(files, names, strict=True):
        entries[name] = ManifestEntry(name, f["path"], f["sha256"], int(f["size"]), f["study_uid"], f["series_uid"],
                                      f["sop_uid"])
    manifest = Manifest(project, mode, key, keep_texts, created, list(entries.values()))
    write_atomically(target / MANIFEST, age_files.encrypt(manifest.to_json(), encrypt_to))
    write_atomically(target / README, readme_text(mode, len(entries), created).encode())
    return keys, encrypt_to, keep_texts, names


def _complete(path: Path, file: dict[str, Any], keys: list[Any] | None) -> bool:
    """Is the file there, whole, and the one the manifest names? Encrypted: decrypted in memory to check."""
    try:
        if not path.is_file():
            return False
        if keys is None:
            return path.stat().st_size == int(file["size"]) and file_sha256(path) == file["sha256"]
        if not keys:
            return False  # cannot check without a key: fetch again
        plain = age_files.decrypt(path.read_bytes(), keys, path.name)
        return len(plain) == int(file["size"]) and hashlib.sha256(plain).hexdigest() == file["sha256"]
    except (Mi2b2Error, OSError):
        return False  # damaged or unreadable: fetch again


def _receive_sealed(members: _TarStream, size: int, job: _Job, progress: Progress, stop: threading.Event,
                    folders: set[Path]) -> int:
    """An age file the server made, as it came, to a temp name; renamed into place only if its SHA-256 is the
    one the server sent after it (member ``<SOP UID>.sha256``). The tar stream is left at the next file."""
    final = job.path
    if final.parent not in folders:
        final.parent.mkdir(parents=True, exist_ok=True)
        folders.add(final.parent)
    temp = temp_name(final)
    digest = hashlib.sha256()
    try:
        with open(temp, "xb", buffering=0) as out:
            for piece in members.take(size):
                if stop.is_set():
                    raise InterruptedError("download stopped")
                digest.update(piece)
                out.write(piece)
        members.skip(-size % BLOCKSIZE)
        name, length = members.header()
        if name != job.file["sop_uid"] + BATCH_SHA256_SUFFIX or length != 64:
            raise PermanentError(f"the server sent {name[:80]!r} where the SHA-256 of {job.file['sop_uid']} was "
                                 "due; is --server an mi2b2 server of this version? Run the download again")
        expected = members.read(length).decode("ascii", "replace")
        members.skip(-length % BLOCKSIZE)
        if digest.hexdigest() != expected:
            raise _Mismatch("arrived damaged (its SHA-256 is not the one the server sent); run the download again")
        os.replace(temp, final)
    except OSError as exc:
        raise PermanentError(f"cannot write {final} ({exc.strerror or type(exc).__name__})") from None
    finally:
        temp.unlink(missing_ok=True)
        progress.advance(int(job.file["size"]))
    return size


def _receive(pieces: Iterator[memoryview], final: Path, file: dict[str, Any], recipients: list[Any],
             progress: Progress, stop: threading.Event, folders: set[Path]) -> int:
    """One file's bytes to a temp name (encrypted if ``recipients``), verified, then renamed into place.

    A file up to LARGE_FILE is gathered in memory, verified, and written (or encrypted, in one call:
    the fastest pyrage has) only if it is the one the manifest lists; a bigger one streams to its temp
    name (through age 64 KiB at a time if encrypted) and is verified before the rename."""
    digest = hashlib.sha256()
    size = 0
    unreported = 0

    def seen(chunk: bytes | memoryview) -> None:
        nonlocal size, unreported
        if stop.is_set():
            raise InterruptedError("download stopped")
        digest.update(chunk)
        size += len(chunk)
        unreported += len(chunk)
        if unreported >= PROGRESS_STEP:  # the bar's lock once a MiB, not once a socket read
            progress.advance(unreported)
            unreported = 0

    def verify() -> None:
        if size != int(file["size"]) or digest.hexdigest() != file["sha256"]:
            raise _Mismatch(_CHANGED)

    if final.parent not in folders:
        final.parent.mkdir(parents=True, exist_ok=True)
        folders.add(final.parent)
    temp = temp_name(final)
    try:
        if int(file["size"]) <= LARGE_FILE:
            data = b"".join(pieces)
            seen(data)
            verify()
            if recipients:
                data = age_files.encrypt(data, recipients)
            with open(temp, "xb", buffering=0) as out:
                out.write(data)
        else:
            with open(temp, "xb", buffering=0) as out:
                if recipients:
                    age_files.encrypt_io(age_files.ChunkReader((bytes(p) for p in pieces), seen), out, recipients)
                else:
                    for piece in pieces:
                        seen(piece)
                        out.write(piece)
            verify()
        os.replace(temp, final)
    except OSError as exc:
        raise PermanentError(f"cannot write {final} ({exc.strerror or type(exc).__name__})") from None
    finally:
        temp.unlink(missing_ok=True)
        progress.advance(unreported)
    return size
