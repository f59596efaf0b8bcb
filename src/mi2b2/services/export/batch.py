"""Several files of a CLI folder download in one answer: a tar stream, checked file by file before it starts.

The CLI's folder download first asks for a manifest (the audited step, see
`download.download_manifest`); it then fetches the files in batches. One
request per file cost ~14 ms of checks and HTTP each, which held a download to
a tenth of what the ZIP streams; a batch pays those once for up to
``MAX_FILES`` files.

A batch is no way around the checks a single file gets
(`download.download_instance`): every file names the study and the audit
event (``download_id``) of its download; before the first byte, every study
of the batch is checked for access (membership, IRB, data policy, patient
still allowed) and every ticket for being this user's recent folder download
of that study in this project, and each file is looked up in that study of
this project's cache index only (a SOP UID, never a path). Any refusal
refuses the whole batch, audited. A de-identified project sends the same
de-identified copies its manifest listed.

The answer is a ustar stream (Python's ``tarfile`` reads it): one member per
file asked for, in the order asked, named by its SOP UID; a file that cannot be
sent (deleted from the cache since the manifest, withheld from de-identified
exports) is a member ``<SOP UID>.error`` holding the reason, and the rest goes on.

In an encrypted_only project the request carries the encryption (the CLI
sends its download's public key) and every file leaves as an age file,
followed by a member ``<SOP UID>.sha256`` holding the SHA-256 of that
ciphertext, for the client to check the transfer without decrypting; a
request without it is refused, audited. Other projects' files go as cached
(the CLI encrypts them itself, faster).
"""

from __future__ import annotations

import hashlib
import tarfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

from sqlalchemy import select, tuple_

from mi2b2.adapters.db.tables import CachedInstance, CachedStudy
from mi2b2.adapters.dicom.deidentify import Withheld
from mi2b2.adapters.storage.cache_files import UID, CacheStore
from mi2b2.domain.governance import DataUse
from mi2b2.domain.principal import Principal
from mi2b2.errors import InvalidInput, PermanentError
from mi2b2.services.context import ServiceContext
from mi2b2.services.data_access import require_readable
from mi2b2.services.export import deid, tickets
from mi2b2.services.export.deid import WithheldReport
from mi2b2.services.export.download import Encryption, Seal, Sealed, check_study_uids, seal_for, sealed_chunks
from mi2b2.services.export.layout import BATCH_ERROR_SUFFIX, BATCH_SHA256_SUFFIX, PlannedFile
from mi2b2.services.export.sources import LARGE_MEMBER, Deid, Source, chunks_of, header_and_range, prefetched

Pseudonym = Callable[[str], str]  # how a de-identified project's manifest names a UID
MAX_FILES = 1000  # per batch; the CLI asks for far fewer


@dataclass(frozen=True)
class FileAsked:
    download_id: int
    study_uid: str  # as the manifest named it (pseudonymous in a de-identified project)
    sop_uid: str


@dataclass(frozen=True)
class _Found:
    sop_uid: str  # as asked
    study_uid: str  # the cache's own
    relative: str | None  # None: not in the study any more
    size: int = 0  # as indexed (bounds what is read ahead)


@dataclass
class FilesDownload:
    files: int
    chunks: Iterator[bytes]


def download_files(ctx: ServiceContext, who: Principal, project_id: str, asked: Sequence[FileAsked],
                   encryption: Encryption | None = None) -> FilesDownload:
    """Check every file asked for, then hand back the tar stream of them (lazy: files are read as it is sent)."""
    _check_list(asked)
    if encryption is not None and encryption.passphrase is not None:
        # A scrypt per file: up to MAX_FILES seconds of server CPU for one request.
        raise InvalidInput('a batch is encrypted to public keys only; send "encryption": {"recipients": '
                           '["age1..."]} (the CLI sends its download\'s public key)')
    policy = deid.policy_of(ctx, project_id)
    seal = seal_for(ctx, who, policy, encryption)
    store = CacheStore(ctx.config.cache_dir())
    if policy.deidentified:
        engine = deid.engine_for(ctx, policy)
        originals = _tickets(ctx, who, project_id, asked, engine.pseudonyms.uid)
        source = Source(store, Deid(engine, {}, WithheldReport(policy)))
        found = _look_up(ctx, project_id, asked, originals, engine.pseudonyms.uid)
    else:
        originals = _tickets(ctx, who, project_id, asked, None)
        source = Source(store, None)
        found = _look_up(ctx, project_id, asked, originals, None)
    return FilesDownload(len(found), _tar(source, found, seal))


def _check_list(asked: Sequence[FileAsked]) -> None:
    if not asked:
        raise InvalidInput("name at least one file to fetch")
    if len(asked) > MAX_FILES:
        raise InvalidInput(f"at most {MAX_FILES} files per batch; split the list")
    check_study_uids(sorted({a.study_uid for a in asked}), False)
    bad = [a.sop_uid for a in asked if len(a.sop_uid) > 64 or not UID.match(a.sop_uid)]
    if bad:
        raise InvalidInput(f"not SOPInstanceUIDs (digits and dots): {', '.join(repr(b[:70]) for b in bad[:5])}")
    sops = [a.sop_uid for a in asked]
    if len(set(sops)) != len(sops):
        twice = next(s for s in sops if sops.count(s) > 1)
        raise InvalidInput(f"the batch names {twice} more than once; name each file once")


def _tickets(ctx: ServiceContext, who: Principal, project_id: str, asked: Sequence[FileAsked],
             pseudonym: Pseudonym | None) -> dict[tuple[int, str], str]:
    """(download_id, study as named) -> the cache's study UID; refuses (audited) the whole batch if any
    ticket is not this user's recent folder download of that study, or any study may not be read now."""
    require_readable(ctx, who, project_id, [], DataUse.READ, "download")
    originals: dict[tuple[int, str], str] = {}
    for download_id, study_uid in sorted({(a.download_id, a.study_uid) for a in asked}):
        original = tickets.covered_study(ctx, who, project_id, download_id)
        if original is None or (pseudonym(original) if pseudonym else original) != study_uid:
            tickets.refuse(ctx, who, project_id, original, download_id)
        originals[download_id, study_uid] = original
    require_readable(ctx, who, project_id, sorted(set(originals.values())), DataUse.READ, "download")
    return originals


def _look_up(ctx: ServiceContext, project_id: str, asked: Sequence[FileAsked],
             originals: dict[tuple[int, str], str], pseudonym: Pseudonym | None) -> list[_Found]:
    """Each file in its study of this project's cache index: a SOP UID of another study or project is not found."""
    studies = sorted(set(originals.values()))
    with ctx.sessions() as session:
        query = (select(CachedStudy.study_uid, CachedInstance.sop_instance_uid, CachedInstance.relative_path,
                        CachedInstance.bytes)
                 .join(CachedStudy, CachedStudy.id == CachedInstance.cached_study_id)
                 .where(CachedStudy.project_id == project_id, CachedStudy.study_uid.in_(studies)))
        if pseudonym is None:  # UIDs as they are: just these files (pseudonyms are found among the study's)
            query = query.where(tuple_(CachedStudy.study_uid, CachedInstance.sop_instance_uid).in_(
                [(originals[a.download_id, a.study_uid], a.sop_uid) for a in asked]))
        index = {(study, pseudonym(sop) if pseudonym else sop): (path, size)
                 for study, sop, path, size in session.execute(query)}
    found = []
    for a in asked:
        study = originals[a.download_id, a.study_uid]
        path, size = index.get((study, a.sop_uid), (None, 0))
        found.append(_Found(a.sop_uid, study, path, size))
    return found


def _tar(source: Source, found: list[_Found], seal: Seal | None) -> Iterator[bytes]:
    """The members, the next files read from disk (de-identified, encrypted) while one is being sent."""
    def load(item: _Found) -> bytes | Sealed | Withheld | str | None:
        if item.relative is None:
            return "that image is no longer in the project's cache (deleted since the manifest was made)"
        try:
            data = source.small(PlannedFile(item.study_uid, "", "", "", "", 0, item.relative))
        except PermanentError:
            return "that image is indexed but missing from the cache; an admin should run `mi2b2 admin fsck --repair`"
        return seal.small(data) if seal is not None and isinstance(data, bytes) else data

    for item, data in prefetched(found, load, lambda item: min(item.size, LARGE_MEMBER)):
        if isinstance(data, Sealed):
            size = len(data.ciphertext)
            yield _member(item.sop_uid, size) + data.ciphertext + _padding(size) + _sha256(item.sop_uid, data.sha256)
        elif isinstance(data, bytes):
            yield _member(item.sop_uid, len(data)) + data + _padding(len(data))
        elif isinstance(data, str):
            yield _error(item.sop_uid, data)
        elif isinstance(data, Withheld):
            yield _error(item.sop_uid, f"that image is withheld from this project's de-identified exports: "
                                       f"{data.reason}")
        else:
            yield from _big(source, item, seal)
    yield tarfile.NUL * (2 * tarfile.BLOCKSIZE)


def _big(source: Source, item: _Found, seal: Seal | None) -> Iterator[bytes]:
    """A file too big to hold: its size first (the header needs it), then its bytes in chunks."""
    assert item.relative is not None
    file = PlannedFile(item.study_uid, "", "", "", "", 0, item.relative)
    path = source.store.absolute(item.relative)
    try:
        if source.deid is None:
            size = path.stat().st_size
            chunks = chunks_of(path)
        else:
            outcome = source.big_outcome(file)
            if isinstance(outcome, Withheld):
                yield _error(item.sop_uid, f"that image is withheld from this project's de-identified exports: "
                                           f"{outcome.reason}")
                return
            size = outcome.size
            chunks = header_and_range(outcome.header, path, outcome.pixel_start, outcome.pixel_end)
    except (FileNotFoundError, PermanentError):
        yield _error(item.sop_uid, "that image is indexed but missing from the cache")
        return
    if seal is not None:
        yield from _big_sealed(seal, item.sop_uid, size, chunks)
        return
    yield _member(item.sop_uid, size)
    sent = 0
    for chunk in chunks:
        sent += len(chunk)
        if sent > size:
            break
        yield chunk
    if sent != size:  # changed on disk while sent: cut the answer off, the client retries
        raise PermanentError(f"a cached file changed size while it was sent ({sent} bytes, not {size})")
    yield _padding(size)


def _big_sealed(seal: Seal, sop_uid: str, size: int, chunks: Iterator[bytes]) -> Iterator[bytes]:
    """A big file encrypted (ciphertext spooled: its size goes first), then the SHA-256 of that ciphertext."""
    def counted() -> Iterator[bytes]:
        read = 0
        for chunk in chunks:
            read += len(chunk)
            yield chunk
        if read != size:  # changed on disk meanwhile: cut the answer off, the client retries
            raise PermanentError(f"a cached file changed size while it was sent ({read} bytes, not {size})")

    try:
        spooled = seal.big(counted())
    except InvalidInput as exc:
        yield _error(sop_uid, str(exc))
        return
    sealed_size = spooled.seek(0, 2)
    spooled.seek(0)
    digest = hashlib.sha256()
    yield _member(sop_uid, sealed_size)
    yield from sealed_chunks(spooled, digest)
    yield _padding(sealed_size) + _sha256(sop_uid, digest.hexdigest())


def _sha256(sop_uid: str, hexdigest: str) -> bytes:
    text = hexdigest.encode()
    return _member(sop_uid + BATCH_SHA256_SUFFIX, len(text)) + text + _padding(len(text))


def _member(name: str, size: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o600
    return info.tobuf(tarfile.USTAR_FORMAT, "utf-8", "strict")


def _padding(size: int) -> bytes:
    return tarfile.NUL * (-size % tarfile.BLOCKSIZE)


def _error(sop_uid: str, reason: str) -> bytes:
    text = reason.encode()
    return _member(sop_uid + BATCH_ERROR_SUFFIX, len(text)) + text + _padding(len(text))

