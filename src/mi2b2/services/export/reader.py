"""Reading a download on the researcher's machine: plain or encrypted, a folder or a ZIP of either.

``open_download`` is what ``mi2b2 decrypt`` and the viewer use. An encrypted
file is decrypted into memory only and checked against the manifest's SHA-256
before anyone sees a byte of it; nothing decrypted is ever written here.

    with open_download("study.zip", passphrase="...") as download:
        for entry in download.entries():
            data = download.read(entry)      # bytes, in memory
"""

from __future__ import annotations

import hashlib
import os
import secrets
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from mi2b2.adapters.crypto import age_files
from mi2b2.adapters.crypto.age_files import DecryptionFailed
from mi2b2.domain.safe_paths import inside, relative_name
from mi2b2.errors import InvalidInput, PermanentError
from mi2b2.services.export.layout import IDENTITY, MANIFEST, PLAIN_SUFFIX, Manifest

TEMP_SUFFIX = ".mi2b2-part"  # files being written; never a final name, removed by the next run


@dataclass(frozen=True)
class DownloadEntry:
    path: str  # readable: <patient>/<study>/<series>/<NNNN>.dcm
    stored_path: str  # its name inside the download: the keyed name if encrypted, else ``path``
    size: int  # bytes of the (decrypted) DICOM file
    sha256: str | None = None  # from the manifest of an encrypted download
    study_uid: str | None = None
    series_uid: str | None = None
    sop_uid: str | None = None


class ExportFolder:
    """A downloaded export unpacked in a folder, read by relative name (also what `fetch` resumes into)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def names(self) -> list[str]:
        found = []
        for dirpath, dirs, files in os.walk(self.root):
            dirs.sort()
            for name in sorted(files):
                found.append((Path(dirpath) / name).relative_to(self.root).as_posix())
        return found

    def has(self, name: str) -> bool:
        return inside(self.root, name).is_file()

    def size(self, name: str) -> int:
        return inside(self.root, name).stat().st_size

    def read(self, name: str) -> bytes:
        try:
            return inside(self.root, name).read_bytes()
        except FileNotFoundError:
            raise _missing(name) from None

    def close(self) -> None:
        pass


class _Zip:
    def __init__(self, path: Path) -> None:
        try:
            self.zip = zipfile.ZipFile(path)
        except (zipfile.BadZipFile, OSError) as exc:
            raise InvalidInput(f"{path} is not a readable ZIP file ({type(exc).__name__}); "
                               "if the download broke off, download it again") from None
        self.prefix = ""
        self._members = {i.filename: i for i in self.zip.infolist() if not i.is_dir()}

    def names(self) -> list[str]:
        n = len(self.prefix)
        return sorted(name[n:] for name in self._members if name.startswith(self.prefix))

    def has(self, name: str) -> bool:
        return self.prefix + name in self._members

    def size(self, name: str) -> int:
        return self._members[self.prefix + name].file_size

    def read(self, name: str) -> bytes:
        if not self.has(name):
            raise _missing(name)
        try:
            return self.zip.read(self.prefix + name)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise DecryptionFailed(f"{name} in the ZIP is damaged ({type(exc).__name__}); download again") from None

    def close(self) -> None:
        self.zip.close()


def _check_manifest_entry(readable: object, stored: object) -> None:
    """Both names of a manifest entry: relative, inside the folder, and the kinds of file mi2b2 makes
    (a forged manifest must not name a ``.pth``, a shell profile or anything else that runs)."""
    relative_name(stored, "manifest.age lists a file")
    path = relative_name(readable, "manifest.age names an output path")
    if path.suffix.lower() != PLAIN_SUFFIX:
        raise InvalidInput(f"manifest.age names an output path {str(path)[:120]!r} that is not a {PLAIN_SUFFIX} "
                           "file; mi2b2 downloads hold DICOM files only, so this download was refused and nothing "
                           "was written (it is damaged, or was forged by someone holding your public key)")


def _missing(name: str) -> InvalidInput:
    return InvalidInput(f"{name} is missing: the download is incomplete; run the same `mi2b2 download` "
                        "command again to finish it")


class DownloadReader:
    """The files of one download. ``entries()`` lists them; ``read(entry)`` gives the DICOM bytes."""

    def __init__(self, source: ExportFolder | _Zip, manifest: Manifest | None, identities: list[Any]) -> None:
        self._source = source
        self.manifest = manifest
        self._identities = identities
        if manifest is None:
            self._entries = [DownloadEntry(n, n, source.size(n)) for n in source.names()
                             if n.lower().endswith(PLAIN_SUFFIX)]
        else:
            for e in manifest.files:  # a forged manifest is refused whole, before anything is read or written
                _check_manifest_entry(e.readable, e.path)
            self._entries = [DownloadEntry(e.readable, e.path, e.size, e.sha256, e.study_uid, e.series_uid, e.sop_uid)
                             for e in sorted(manifest.files, key=lambda e: e.readable)]

    @property
    def encrypted(self) -> bool:
        return self.manifest is not None

    def entries(self) -> list[DownloadEntry]:
        return list(self._entries)

    def missing(self) -> list[DownloadEntry]:
        """Entries the manifest names whose file is not there (an unfinished download)."""
        return [e for e in self._entries if not self._source.has(e.stored_path)]

    def read(self, entry: DownloadEntry | str) -> bytes:
        """The DICOM bytes, decrypted in memory and checked against the manifest."""
        if isinstance(entry, str):
            entry = self._by_path(entry)
        data = self._source.read(entry.stored_path)
        if self.manifest is None:
            return data
        plain = age_files.decrypt(data, self._identities, entry.stored_path)
        if len(plain) != entry.size or hashlib.sha256(plain).hexdigest() != entry.sha256:
            raise DecryptionFailed(f"{entry.stored_path} decrypted but does not match the manifest "
                                   "(replaced or from another download); download it again")
        return plain

    def _by_path(self, path: str) -> DownloadEntry:
        for entry in self._entries:
            if path in (entry.path, entry.stored_path):
                return entry
        raise InvalidInput(f"{path} is not a file of this download")

    def close(self) -> None:
        self._source.close()

    def __enter__(self) -> DownloadReader:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()


def open_download(path: str | Path, passphrase: str | None = None,
                  identities: Sequence[str | Path | Any] = ()) -> DownloadReader:
    """Open a plain or encrypted download, folder or ZIP.

    An encrypted one needs its passphrase or a private key (``identities``:
    key files, key text, or pyrage identities); the manifest is decrypted
    here, so a wrong key fails now, before any image is touched."""
    where = Path(path)
    if where.is_dir():
        source: ExportFolder | _Zip = ExportFolder(where)
    elif where.is_file():
        source = _Zip(where)
    else:
        raise InvalidInput(f"{where} does not exist; give the folder or ZIP a download was saved to")
    try:
        if isinstance(source, _Zip):
            manifests = [n for n in source.names() if PurePosixPath(n).name == MANIFEST]
            if manifests:  # a ZIP made of a downloaded folder has the folder's name in front
                source.prefix = min(manifests, key=len)[: -len(MANIFEST)]
        if not source.has(MANIFEST):
            return DownloadReader(source, None, [])
        keys = keys_for(source, passphrase, identities, str(where))
        manifest = Manifest.from_json(age_files.decrypt(source.read(MANIFEST), keys, MANIFEST))
        return DownloadReader(source, manifest, keys)
    except BaseException:
        source.close()
        raise


def keys_for(source: ExportFolder | _Zip, passphrase: str | None, identities: Sequence[str | Path | Any],
             where: str) -> list[Any]:
    keys = age_files.load_identities(identities)
    if passphrase is not None:
        if not source.has(IDENTITY):
            raise InvalidInput(f"{where} was not encrypted with a passphrase (it has no {IDENTITY}); "
                               "give the private key of a recipient with --identity")
        text = age_files.decrypt_with_passphrase(source.read(IDENTITY), passphrase, IDENTITY)
        keys.extend(age_files.identities_from_text(text.decode("utf-8", "replace"), IDENTITY))
    if not keys:
        how = "--passphrase" if source.has(IDENTITY) else "--identity with the private key it was encrypted to"
        raise InvalidInput(f"{where} is an encrypted download: give {how}")
    return keys


# restoring the readable tree -----------------------------------------------------


@dataclass(frozen=True)
class DecryptReport:
    files: int
    bytes: int
    already_there: int


def decrypt_download(source: str | Path, target: str | Path, passphrase: str | None = None,
                     identities: Sequence[str | Path | Any] = (),
                     on_file: Callable[[int], None] | None = None) -> DecryptReport:
    """Write the readable tree of an encrypted download to ``target``.

    Everything is checked first (every file decrypts, matches its SHA-256, and
    no different file sits at its place in ``target``); only then is anything
    written, each file to a temp name and renamed when whole. A wrong key or a
    damaged file therefore leaves ``target`` untouched."""
    out = Path(target)
    with open_download(source, passphrase, identities) as download:
        if not download.encrypted:
            raise InvalidInput(f"{source} is not an encrypted download (it has no {MANIFEST}); "
                               "its .dcm files are readable as they are")
        if missing := download.missing():
            raise InvalidInput(f"{len(missing)} of {len(download.entries())} files are missing, e.g. "
                               f"{missing[0].stored_path}: the download is incomplete; run the same "
                               "`mi2b2 download` command again to finish it, then decrypt")
        entries = download.entries()
        todo, same = [], 0
        for entry in entries:  # every output path first (symbolic links resolved), then every file's bytes
            inside(out, entry.path, "manifest.age names an output path")
        for entry in entries:
            download.read(entry)  # decrypts and verifies; the bytes are dropped again
            existing = _existing(out, entry)
            if existing == "same":
                same += 1
            elif existing == "different":
                raise InvalidInput(f"{out / entry.path} already exists with other content; "
                                   "decrypt into an empty folder")
            else:
                todo.append(entry)
        written = 0
        for entry in todo:
            data = download.read(entry)
            write_atomically(inside(out, entry.path, "manifest.age names an output path"), data)
            written += len(data)
            if on_file is not None:
                on_file(len(data))
    return DecryptReport(len(todo), written, same)


def _existing(out: Path, entry: DownloadEntry) -> str | None:
    path = inside(out, entry.path, "manifest.age names an output path")
    if not path.exists():
        return None
    if path.is_file() and path.stat().st_size == entry.size and file_sha256(path) == entry.sha256:
        return "same"
    return "different"


def write_atomically(path: Path, data: bytes) -> None:
    """Whole or not at all: a temp name beside it, then a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temp = temp_name(path)
    try:
        with open(temp, "xb") as file:
            file.write(data)
        os.replace(temp, path)
    except OSError as exc:
        temp.unlink(missing_ok=True)
        raise PermanentError(f"cannot write {path} ({exc.strerror or type(exc).__name__})") from None


def temp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb", buffering=0) as file:
        for chunk in iter(lambda: file.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def iter_entries(download: DownloadReader) -> Iterator[tuple[DownloadEntry, bytes]]:
    """Every entry with its bytes, one at a time (for the viewer: at most one image decrypted at once)."""
    for entry in download.entries():
        yield entry, download.read(entry)
