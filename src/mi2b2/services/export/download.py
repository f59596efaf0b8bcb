"""Downloads from a project's cache, on the server: streamed ZIPs, and the manifest and files the CLI fetches.

Who: members of the project (any role; site admins too, only where they are
members), while the project's data policy keeps reads open
(`services.data_access`), and only studies whose patient is still on the
allow-list; anyone else is refused and audited. Every file the CLI fetches
asks again, so a download stops when access ends.

Every download is audited before its first byte leaves: one DOWNLOAD event
per study (patient, study, files, bytes, how, whether encrypted), and the
study's ``last_downloaded_by/at`` are set. A ZIP whose transfer breaks off
adds a FAILED event per study that was not sent whole.

The CLI's folder download asks for a manifest first (the audited step) and
then fetches files one by one; each fetch names the audit event of its study
(``download_id``, its ticket: `tickets`), so no file leaves without an audited
download behind it.

Nothing is staged: ZIPs are streamed member by member, read in 1 MiB chunks
(`sources`: the same bytes the CLI's fetches get), encrypted (when asked) in
memory as they go out; the only files on the server are the cache's own, and,
while it is sent, the age ciphertext of a file over LARGE_MEMBER that an
encrypted_only project's fetch encrypts (`Seal.big`: the tar header needs its
size first; its plaintext is never written).
"""

from __future__ import annotations

import builtins
import hashlib
import os
import stat
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from sqlalchemy import select, update
from stream_zip import NO_COMPRESSION_64, ZIP_64, stream_zip

from mi2b2.adapters.crypto import age_files
from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedInstance, CachedStudy
from mi2b2.adapters.dicom.deidentify import Withheld
from mi2b2.adapters.dicom.files import InstanceHeader, read_instance_header
from mi2b2.adapters.storage.cache_files import UID, CacheStore
from mi2b2.adapters.storage.file_digests import FileDigests
from mi2b2.config.export_policy import ExportPolicy
from mi2b2.domain.governance import DataUse
from mi2b2.domain.principal import Principal
from mi2b2.errors import InvalidInput, NotFound, PermanentError
from mi2b2.services.audit import Action, AuditEntry, Outcome
from mi2b2.services.context import ServiceContext
from mi2b2.services.data_access import patient_still_allowed, require_readable, require_use
from mi2b2.services.export import deid, screens, tickets
from mi2b2.services.export.deid import WithheldReport
from mi2b2.services.export.layout import (
    IDENTITY,
    MANIFEST,
    README,
    InstanceInfo,
    Manifest,
    ManifestEntry,
    PlannedFile,
    SeriesInfo,
    StudyInfo,
    keyed_paths,
    plan_paths,
    readme_text,
)
from mi2b2.services.export.sources import (
    CHUNK,
    LARGE_MEMBER,
    PREFETCH_WORKERS,
    Deid,
    Source,
    chunks_of,
    file_chunks,
    header_and_range,
    prefetched,
)
from mi2b2.services.export.tickets import VIA_FILES

MAX_STUDIES = 5000
FILE_MODE = stat.S_IFREG | 0o600  # unzipped images readable by their owner only
VIA_ZIP = "zip"


@dataclass(frozen=True)
class Encryption:
    """How the requester wants the download encrypted: a passphrase, or public keys."""

    passphrase: str | None = None
    recipients: tuple[str, ...] = ()

    @property
    def mode(self) -> str:
        return "passphrase" if self.passphrase is not None else "recipients"


@dataclass(frozen=True)
class StudyPlan:
    study_uid: str
    patient_id: str
    instances: int
    bytes: int


@dataclass(frozen=True)
class DownloadPlan:
    project_id: str
    studies: list[StudyPlan]
    files: list[PlannedFile]
    # What the files were planned from, for a de-identified layout: studies, series, one header per study.
    study_infos: list[StudyInfo] = field(default_factory=list)
    series_infos: dict[str, SeriesInfo] = field(default_factory=dict)
    instance_infos: list[InstanceInfo] = field(default_factory=list)
    headers: dict[str, InstanceHeader] = field(default_factory=dict)

    @property
    def bytes(self) -> int:
        return sum(f.size for f in self.files)


@dataclass
class ZipDownload:
    filename: str
    studies: int
    files: int
    bytes: int  # plaintext bytes of the images; the ZIP is slightly larger
    chunks: Iterator[builtins.bytes]  # the field above hides the builtin in this class body


@dataclass(frozen=True)
class InstanceDownload:
    size: int
    chunks: Iterator[bytes]
    ciphertext_sha256: str | None = None  # set when the server encrypted the file (encrypted_only projects)


# encrypted_only: the server encrypts what the CLI fetches -------------------------

SEAL_FIX = ('send "encryption": {"recipients": ["age1..."]} or {"passphrase": "..."} in the request body '
            "(the mi2b2 CLI does, with --passphrase or --recipient)")


@dataclass(frozen=True)
class Sealed:
    """One file as an age file, and the SHA-256 of that ciphertext (the client checks the transfer with it)."""

    ciphertext: bytes
    sha256: str


class Seal:
    """How the files of one request are encrypted before they leave, with pyrage (age_files).

    The CLI sends its download's public key (``recipients``): one cheap X25519
    wrap per file. A passphrase costs a scrypt (about a second) per file, and
    files too big to hold are encrypted to public keys only."""

    def __init__(self, encryption: Encryption) -> None:
        if (encryption.passphrase is None) == (not encryption.recipients):
            raise InvalidInput("encrypt with either a passphrase or recipient public keys, not both or neither")
        self.passphrase = (age_files.check_passphrase(encryption.passphrase)
                           if encryption.passphrase is not None else None)
        self.recipients = [] if self.passphrase is not None else age_files.parse_recipients(encryption.recipients)

    def small(self, data: bytes) -> Sealed:
        if self.passphrase is not None:
            ciphertext = age_files.encrypt_with_passphrase(data, self.passphrase)
        else:
            ciphertext = age_files.encrypt(data, self.recipients)
        return Sealed(ciphertext, hashlib.sha256(ciphertext).hexdigest())

    def big(self, chunks: Iterator[bytes]) -> tempfile.SpooledTemporaryFile[bytes]:
        """A big file's ciphertext, spooled (the tar header needs its size first); plaintext stays in memory."""
        if self.passphrase is not None:
            raise InvalidInput(f"files over {LARGE_MEMBER >> 20} MiB are encrypted to public keys only; "
                               'send "encryption": {"recipients": ["age1..."]}')
        spooled: tempfile.SpooledTemporaryFile[bytes] = tempfile.SpooledTemporaryFile(LARGE_MEMBER)  # noqa: SIM115 - closed by sealed_chunks
        try:
            age_files.encrypt_io(age_files.ChunkReader(chunks), spooled, self.recipients)
        except BaseException:
            spooled.close()
            raise
        spooled.seek(0)
        return spooled


def seal_for(ctx: ServiceContext, who: Principal, policy: ExportPolicy, encryption: Encryption | None) -> Seal | None:
    """The encryption a file fetch must apply: refused (audited) in an encrypted_only project without one.

    Elsewhere a fetch without encryption sends the file as cached: the CLI encrypts on the client, faster."""
    if encryption is None:
        if policy.encrypted_only:  # the IRB door first: a non-member learns nothing of the project's rules
            require_use(ctx, who, policy.project_id, DataUse.READ, "download")
        deid.refuse_plain(ctx, who, policy, SEAL_FIX)
        return None
    return Seal(encryption)


def sealed_chunks(spooled: tempfile.SpooledTemporaryFile[bytes], digest: Any) -> Iterator[bytes]:
    """The spooled ciphertext in chunks, each added to ``digest`` as it goes; the file closed at the end."""
    with spooled:
        while chunk := spooled.read(CHUNK):
            digest.update(chunk)
            yield chunk


# planning ----------------------------------------------------------------------


def plan_download(ctx: ServiceContext, who: Principal, project_id: str, study_uids: Sequence[str],
                  all_studies: bool = False) -> DownloadPlan:
    """Which files, in which order, under which readable names; every file checked to be on disk."""
    wanted = check_study_uids(study_uids, all_studies)
    wanted = screens.resolve(wanted, screens.study_originals(ctx, project_id, wanted))  # a screen's pseudonyms
    require_readable(ctx, who, project_id, wanted, DataUse.READ, "download")
    store = CacheStore(ctx.config.cache_dir())
    with ctx.sessions() as session:
        query = select(CachedStudy).where(CachedStudy.project_id == project_id)
        # "All" means all that may still be read: studies of withdrawn patients wait for purge.
        query = query.where(patient_still_allowed() if all_studies else CachedStudy.study_uid.in_(wanted))
        rows = list(session.scalars(query.order_by(CachedStudy.id)))
        if not all_studies and (missing := [u for u in wanted if u not in {r.study_uid for r in rows}]):
            shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
            raise NotFound(f"not in the cache of project {project_id!r}: {shown}; "
                           f"list what is with `mi2b2 cache list {project_id}`")
        if not rows:
            raise NotFound(f"the cache of project {project_id!r} is empty; retrieve studies first")
        study_of = {r.id: r for r in rows}
        instances = [
            InstanceInfo(study_of[study_id].study_uid, series_uid, sop_uid, number, size, path)
            for study_id, series_uid, sop_uid, number, size, path in session.execute(
                select(CachedInstance.cached_study_id, CachedInstance.series_uid, CachedInstance.sop_instance_uid,
                       CachedInstance.instance_number, CachedInstance.bytes, CachedInstance.relative_path)
                .where(CachedInstance.cached_study_id.in_(list(study_of)))
            )
        ]
    series, headers = _series_infos(store, instances)
    studies = [StudyInfo(r.study_uid, r.patient_id, r.study_date, r.accession) for r in rows]
    files = plan_paths(studies, series, instances)
    _check_on_disk(store, files)
    totals: dict[str, list[int]] = {r.study_uid: [0, 0] for r in rows}
    for file in files:
        totals[file.study_uid][0] += 1
        totals[file.study_uid][1] += file.size
    plans = [StudyPlan(r.study_uid, r.patient_id, *totals[r.study_uid]) for r in rows if totals[r.study_uid][0]]
    if not plans:
        raise NotFound(f"the studies asked for have no images in the cache of project {project_id!r} yet")
    study_headers: dict[str, InstanceHeader] = {}
    for instance in instances:
        if instance.series_uid in headers:
            study_headers.setdefault(instance.study_uid, headers[instance.series_uid])
    return DownloadPlan(project_id, plans, files, studies, series, instances, study_headers)


def check_study_uids(study_uids: Sequence[str], all_studies: bool) -> list[str]:
    wanted = list(dict.fromkeys(uid.strip() for uid in study_uids if uid.strip()))
    if all_studies:
        if wanted:
            raise InvalidInput("name studies or ask for all of them, not both")
        return []
    if not wanted:
        raise InvalidInput("name at least one StudyInstanceUID to download (or ask for all studies)")
    if len(wanted) > MAX_STUDIES:
        raise InvalidInput(f"at most {MAX_STUDIES} studies per download; split the list")
    bad = [uid for uid in wanted if len(uid) > 64 or not UID.match(uid)]
    if bad:
        raise InvalidInput(f"not StudyInstanceUIDs (digits and dots): {', '.join(repr(b) for b in bad[:10])}")
    return wanted


def _series_infos(store: CacheStore, instances: list[InstanceInfo]
                  ) -> tuple[dict[str, SeriesInfo], dict[str, InstanceHeader]]:
    """SeriesNumber and Modality are not in the index: read them from one file of each series."""
    first: dict[str, InstanceInfo] = {}
    for instance in instances:
        first.setdefault(instance.series_uid, instance)
    infos, headers = {}, {}
    for uid, instance in first.items():
        try:
            header = read_instance_header(store.absolute(instance.cache_path))
            infos[uid] = SeriesInfo(uid, header.series_number, header.modality)
            headers[uid] = header
        except InvalidInput:
            infos[uid] = SeriesInfo(uid, None, "")  # unreadable now: fsck's business; the name falls back
    return infos, headers


def _check_on_disk(store: CacheStore, files: list[PlannedFile]) -> None:
    missing = [f for f in files if not store.absolute(f.cache_path).is_file()]
    if missing:
        raise PermanentError(
            f"{len(missing)} files of this download are indexed but missing from the cache; "
            "an admin should run `mi2b2 admin fsck --repair`, then download again")


# auditing ------------------------------------------------------------------------


def _record_download(ctx: ServiceContext, who: Principal, plan: DownloadPlan, via: str,
                     encryption: str | None, policy: ExportPolicy) -> dict[str, int]:
    """One DOWNLOAD event per study and last_downloaded_by/at, in one transaction; returns study_uid -> event seq.

    The bytes stream after this commits (a read): a transfer cut short is recorded as FAILED afterwards."""
    with transaction(ctx.sessions) as session:
        session.execute(
            update(CachedStudy)
            .where(CachedStudy.project_id == plan.project_id,
                   CachedStudy.study_uid.in_([study.study_uid for study in plan.studies]))
            .values(last_downloaded_by=who.login[:64], last_downloaded_at=ctx.clock.now())
        )
        seqs = dict(zip([study.study_uid for study in plan.studies], ctx.audit.record_many(session, [
            AuditEntry(who, Action.DOWNLOAD, project_id=plan.project_id, patient_id=study.patient_id,
                       study_uid=study.study_uid,
                       detail={"via": via, "files": study.instances, "bytes": study.bytes, "encryption": encryption,
                               **policy.audit_detail()})
            for study in plan.studies]), strict=True))
    return seqs


def _record_interrupted(ctx: ServiceContext, who: Principal, plan: DownloadPlan, sent: dict[str, int]) -> None:
    # Streaming is a read with nothing to commit: a cut-off transfer gets its own transaction afterwards.
    for study in plan.studies:
        done = sent.get(study.study_uid, 0)
        if done < study.bytes:
            ctx.audit.record(who, Action.DOWNLOAD, Outcome.FAILED, project_id=plan.project_id,
                             patient_id=study.patient_id, study_uid=study.study_uid,
                             detail={"via": VIA_ZIP, "reason": "transfer interrupted", "bytes_sent": done})


# the CLI's path: manifest, then files ------------------------------------------------


def download_manifest(ctx: ServiceContext, who: Principal, project_id: str, study_uids: Sequence[str],
                      all_studies: bool = False, encryption: str | None = None) -> dict[str, Any]:
    """The files of a download with their readable paths, sizes and SHA-256, and a download_id per study.

    ``encryption`` is how the files will be encrypted ("passphrase",
    "recipients" or None), as recorded. Usually the client encrypts; in an
    encrypted_only project (``server_encrypts``) the server does, each file
    before it leaves (`Seal`), so claiming encryption gets no plaintext."""
    if encryption not in (None, "passphrase", "recipients"):
        raise InvalidInput("encryption is 'passphrase', 'recipients' or absent")
    plan = plan_download(ctx, who, project_id, study_uids, all_studies)
    policy = deid.policy_of(ctx, project_id)
    if encryption is None:
        deid.refuse_plain(ctx, who, policy)
    store = CacheStore(ctx.config.cache_dir())
    prepared = _prepare_deid(ctx, policy, plan)
    if prepared is None:
        digests: list[tuple[int, str] | Withheld] = list(
            _digests(ctx, project_id, [store.absolute(f.cache_path) for f in plan.files]))
    else:
        digests = _deid_digests(Source(store, prepared), plan.files)
    seqs = _record_download(ctx, who, plan, VIA_FILES, encryption, policy)
    files, total = [], 0
    for f, digest in zip(plan.files, digests, strict=True):
        out = f if prepared is None else prepared.outputs[f.cache_path]
        if isinstance(digest, Withheld):
            continue
        size, sha256 = digest
        total += size
        files.append({"path": out.path, "number": out.number, "study_uid": out.study_uid,
                      "series_uid": out.series_uid, "sop_uid": out.sop_uid, "size": size, "sha256": sha256})
    # A de-identified manifest names studies by their pseudonymous UIDs, as its files do.
    named = (lambda uid: uid) if prepared is None else prepared.engine.pseudonyms.uid
    return {
        "project": project_id,
        "created_at": ctx.clock.now().isoformat(timespec="seconds"),
        "studies": [{"study_uid": named(s.study_uid), "download_id": seqs[s.study_uid], "files": s.instances,
                     "bytes": s.bytes} for s in plan.studies],
        "files": files,
        "bytes": total,
        # The client sends its key with each batch and receives age files (see batch.py).
        "server_encrypts": policy.encrypted_only,
    }


def _deid_digests(source: Source, files: list[PlannedFile]) -> list[tuple[int, str] | Withheld]:
    """(size, SHA-256) of each de-identified copy, or why it is withheld: the copy is made again, the same,
    when the file is fetched (the same key gives the same bytes)."""
    def digest(file: PlannedFile) -> tuple[int, str] | Withheld:
        data = source.small(file)
        if isinstance(data, Withheld):
            return data
        if data is not None:
            return len(data), hashlib.sha256(data).hexdigest()
        chunks = source.big(file)
        if isinstance(chunks, Withheld):
            return chunks
        sha, size = hashlib.sha256(), 0
        for chunk in chunks:
            sha.update(chunk)
            size += len(chunk)
        return size, sha.hexdigest()

    with ThreadPoolExecutor(PREFETCH_WORKERS) as pool:
        return list(pool.map(digest, files))


def _digests(ctx: ServiceContext, project_id: str, paths: list[Path]) -> list[tuple[int, str]]:
    """(size, SHA-256) of each file; the context remembers them, so a resumed download is cheap."""
    def digest(path: Path) -> tuple[int, str]:
        try:
            return ctx.file_digests.of(project_id, path)
        except FileNotFoundError:
            raise PermanentError("a file of this download was deleted from the cache while it was prepared; "
                                 "download again") from None

    with ThreadPoolExecutor(PREFETCH_WORKERS) as pool:  # hashlib and reads release the GIL
        return list(pool.map(digest, paths))


def download_instance(ctx: ServiceContext, who: Principal, project_id: str, download_id: int, study_uid: str,
                      sop_uid: str, encryption: Encryption | None = None) -> InstanceDownload:
    """One cached file, for a study whose download this user started (``download_id``) in the last hours;
    as an age file when ``encryption`` is given (required in an encrypted_only project)."""
    check_study_uids([study_uid], False)
    if not UID.match(sop_uid) or len(sop_uid) > 64:
        raise InvalidInput(f"{sop_uid!r} is not a SOPInstanceUID (digits and dots)")
    policy = deid.policy_of(ctx, project_id)
    seal = seal_for(ctx, who, policy, encryption)
    plain = _plain_instance(ctx, who, policy, download_id, study_uid, sop_uid)
    if seal is None:
        return plain
    if plain.size <= LARGE_MEMBER:
        sealed = seal.small(b"".join(plain.chunks))
        return InstanceDownload(len(sealed.ciphertext), iter((sealed.ciphertext,)), sealed.sha256)
    spooled = seal.big(plain.chunks)
    size = spooled.seek(0, os.SEEK_END)
    spooled.seek(0)
    digest = hashlib.sha256()
    for chunk in iter(lambda: spooled.read(CHUNK), b""):
        digest.update(chunk)
    spooled.seek(0)
    return InstanceDownload(size, sealed_chunks(spooled, hashlib.sha256()), digest.hexdigest())


def _plain_instance(ctx: ServiceContext, who: Principal, policy: ExportPolicy, download_id: int, study_uid: str,
                    sop_uid: str) -> InstanceDownload:
    project_id = policy.project_id
    if policy.deidentified:
        return _deidentified_instance(ctx, who, policy, download_id, study_uid, sop_uid)
    require_readable(ctx, who, project_id, [study_uid], DataUse.READ, "download")
    if tickets.covered_study(ctx, who, project_id, download_id) != study_uid:
        tickets.refuse(ctx, who, project_id, study_uid, download_id)
    with ctx.sessions() as session:
        relative = session.scalar(
            select(CachedInstance.relative_path)
            .join(CachedStudy, CachedStudy.id == CachedInstance.cached_study_id)
            .where(CachedStudy.project_id == project_id, CachedStudy.study_uid == study_uid,
                   CachedInstance.sop_instance_uid == sop_uid)
        )
    if relative is None:
        raise NotFound("that image is no longer in the project's cache (deleted since the manifest was made)")
    path = CacheStore(ctx.config.cache_dir()).absolute(relative)
    try:
        file = open(path, "rb", buffering=0)  # noqa: SIM115 - closed by the generator below
    except FileNotFoundError:
        raise NotFound("that image is indexed but missing from the cache; an admin should run "
                       "`mi2b2 admin fsck --repair`") from None
    return InstanceDownload(os.fstat(file.fileno()).st_size, file_chunks(file))


def _deidentified_instance(ctx: ServiceContext, who: Principal, policy: ExportPolicy, download_id: int,
                           study_uid: str, sop_uid: str) -> InstanceDownload:
    """One file of a de-identified folder download, named by the pseudonymous UIDs its manifest gave."""
    project_id = policy.project_id
    require_readable(ctx, who, project_id, [], DataUse.READ, "download")
    engine = deid.engine_for(ctx, policy)
    original = tickets.covered_study(ctx, who, project_id, download_id)
    if original is None or engine.pseudonyms.uid(original) != study_uid:
        tickets.refuse(ctx, who, project_id, original, download_id)
    require_readable(ctx, who, project_id, [original], DataUse.READ, "download")
    with ctx.sessions() as session:
        rows = session.execute(
            select(CachedInstance.sop_instance_uid, CachedInstance.relative_path)
            .join(CachedStudy, CachedStudy.id == CachedInstance.cached_study_id)
            .where(CachedStudy.project_id == project_id, CachedStudy.study_uid == original)).all()
    relative = next((path for sop, path in rows if engine.pseudonyms.uid(sop) == sop_uid), None)
    if relative is None:
        raise NotFound("that image is no longer in the project's cache (deleted since the manifest was made)")
    source = Source(CacheStore(ctx.config.cache_dir()), Deid(engine, {}, WithheldReport(policy)))
    file = PlannedFile(original, "", "", "", "", 0, relative)
    try:
        data = source.small(file)
    except PermanentError:
        raise NotFound("that image is indexed but missing from the cache; an admin should run "
                       "`mi2b2 admin fsck --repair`") from None
    if isinstance(data, bytes):
        return InstanceDownload(len(data), iter((data,)))
    outcome = data if data is not None else source.big_outcome(file)
    if isinstance(outcome, Withheld):
        raise NotFound(f"that image is withheld from this project's de-identified exports: {outcome.reason}")
    path = source.store.absolute(relative)
    return InstanceDownload(outcome.size, header_and_range(outcome.header, path, outcome.pixel_start,
                                                            outcome.pixel_end))


# the ZIP ----------------------------------------------------------------------------


def zip_download(ctx: ServiceContext, who: Principal, project_id: str, study_uids: Sequence[str],
                 all_studies: bool = False, encryption: Encryption | None = None) -> ZipDownload:
    """Plan, check, audit, then hand back a ZIP as a lazy stream of chunks.

    Everything that can fail for a reason the user can fix fails here, before
    the first byte: once a stream has started, an error can only cut it off."""
    recipients: list[Any] = []
    identity_age = b""
    if encryption is not None:
        if (encryption.passphrase is None) == (not encryption.recipients):
            raise InvalidInput("encrypt with either a passphrase or recipient public keys, not both or neither")
        if encryption.passphrase is not None:
            age_files.check_passphrase(encryption.passphrase)
        else:
            recipients = age_files.parse_recipients(encryption.recipients)
    plan = plan_download(ctx, who, project_id, study_uids, all_studies)
    policy = deid.policy_of(ctx, project_id)
    if encryption is None:
        deid.refuse_plain(ctx, who, policy)
    source = Source(CacheStore(ctx.config.cache_dir()), _prepare_deid(ctx, policy, plan))
    now = ctx.clock.now()
    if encryption is not None and encryption.passphrase is not None:
        identity = age_files.new_identity()
        recipients = [identity.to_public()]
        # The one scrypt of this download; every file is encrypted to the identity it protects.
        identity_age = age_files.encrypt_with_passphrase(age_files.identity_file_text(identity).encode(),
                                                         encryption.passphrase)
    _record_download(ctx, who, plan, VIA_ZIP, encryption.mode if encryption else None, policy)
    stamp = now.strftime("%Y%m%d-%H%M%S")
    kind = "-deidentified" if policy.deidentified else ""
    if encryption is None:
        members = _plain_members(source, plan, now)
        name = f"mi2b2-{project_id}-{stamp}{kind}.zip"
    else:
        members = _encrypted_members(source, plan, now, encryption, recipients, identity_age, ctx.file_digests)
        name = f"mi2b2-{project_id}-{stamp}{kind}-encrypted.zip"
    return ZipDownload(name, len(plan.studies), len(plan.files), plan.bytes,
                       _audited_stream(ctx, who, plan, members))


@dataclass
class _Progress:
    sent: dict[str, int] = field(default_factory=dict)

    def add(self, study_uid: str, size: int) -> None:
        self.sent[study_uid] = self.sent.get(study_uid, 0) + size


_Member = tuple[str, datetime, int, Any, Iterable[bytes]]


def _audited_stream(ctx: ServiceContext, who: Principal, plan: DownloadPlan,
                    members: Callable[[_Progress], Iterator[_Member]]) -> Iterator[bytes]:
    progress = _Progress()
    finished = False
    try:
        # ZIP_64 members (large encrypted files) use "deflate" at level 0: stored blocks that stream
        # without knowing their CRC in advance; DICOM does not compress anyway.
        yield from stream_zip(members(progress), chunk_size=CHUNK,
                              get_compressobj=lambda: zlib.compressobj(level=0, wbits=-zlib.MAX_WBITS))
        finished = True
    finally:
        if not finished:
            _record_interrupted(ctx, who, plan, progress.sent)


def _plain_members(source: Source, plan: DownloadPlan, now: datetime) -> Callable[[_Progress], Iterator[_Member]]:
    def members(progress: _Progress) -> Iterator[_Member]:
        for file, data in prefetched(plan.files, source.small, lambda f: f.size):
            out = source.output(file)
            if isinstance(data, Withheld):
                source.withhold(data)
            elif data is not None:
                # Whole small file in memory: stream-zip learns its CRC in one pass.
                yield out.path, now, FILE_MODE, NO_COMPRESSION_64, (data,)
                source.sent()
            elif source.deid is None:
                path = source.store.absolute(file.cache_path)
                size, crc = _size_and_crc(path)  # a second pass over a big file beats holding it
                yield file.path, now, FILE_MODE, NO_COMPRESSION_64(size, crc), chunks_of(path)
            elif isinstance(chunks := source.big(file), Withheld):
                source.withhold(chunks)
            else:
                yield out.path, now, FILE_MODE, ZIP_64, chunks
                source.sent()
            progress.add(file.study_uid, file.size)
        if source.deid is not None:
            yield deid.REPORT, now, FILE_MODE, NO_COMPRESSION_64, (source.deid.report.to_json(),)
    return members


def _encrypted_members(source: Source, plan: DownloadPlan, now: datetime, encryption: Encryption,
                       recipients: list[Any], identity_age: bytes, digests: FileDigests
                       ) -> Callable[[_Progress], Iterator[_Member]]:
    key = age_files.new_name_key()
    names = keyed_paths(key, [source.output(f) for f in plan.files])
    created = now.isoformat(timespec="seconds")

    def encrypt_small(file: PlannedFile) -> tuple[bytes, str, int] | Withheld | None:
        read = source.small_with_stat(file)
        if read is None or isinstance(read, Withheld):
            return read
        data, info = read
        if info is None:  # a de-identified copy, made just now
            digest = hashlib.sha256(data).hexdigest()
        else:  # a cache file: its digest is remembered from an earlier download (or hashed once, here)
            digest = digests.of_bytes(plan.project_id, source.store.absolute(file.cache_path), info, data)
        return age_files.encrypt(data, recipients), digest, len(data)

    def members(progress: _Progress) -> Iterator[_Member]:
        entries: list[ManifestEntry] = []
        yield README, now, FILE_MODE, NO_COMPRESSION_64, (readme_text(encryption.mode, len(plan.files), created).encode(),)
        if identity_age:
            yield IDENTITY, now, FILE_MODE, NO_COMPRESSION_64, (identity_age,)
        pairs = zip(plan.files, names, strict=True)
        for (file, name), done in prefetched(list(pairs), lambda p: encrypt_small(p[0]), lambda p: p[0].size):
            out = source.output(file)
            if isinstance(done, Withheld):
                source.withhold(done)
            elif done is not None:
                ciphertext, digest, size = done
                entries.append(ManifestEntry(name, out.path, digest, size, out.study_uid, out.series_uid,
                                             out.sop_uid))
                yield name, now, FILE_MODE, NO_COMPRESSION_64, (ciphertext,)
                source.sent()
            elif isinstance(chunks := source.big(file), Withheld):
                source.withhold(chunks)
            else:
                yield name, now, FILE_MODE, ZIP_64, _encrypt_streaming(chunks, out, name, recipients, entries)
                source.sent()
            progress.add(file.study_uid, file.size)
        if source.deid is not None:
            yield deid.REPORT, now, FILE_MODE, NO_COMPRESSION_64, (source.deid.report.to_json(),)
        # Last, so the SHA-256 of every file is known without a second pass over the cache.
        kept = ([str(r) for r in recipients] if encryption.passphrase is not None
                else [age_files.recipient_text(r) for r in encryption.recipients])
        manifest = Manifest(plan.project_id, encryption.mode, key, kept, created, entries)
        yield MANIFEST, now, FILE_MODE, NO_COMPRESSION_64, (age_files.encrypt(manifest.to_json(), recipients),)
    return members


def _encrypt_streaming(chunks: Iterator[bytes], file: PlannedFile, name: str, recipients: list[Any],
                       entries: list[ManifestEntry]) -> Iterator[bytes]:
    digest = hashlib.sha256()
    size = 0

    def seen(chunk: bytes) -> None:
        nonlocal size
        digest.update(chunk)
        size += len(chunk)

    reader = age_files.ChunkReader(chunks, seen)
    yield from age_files.encrypt_chunks(iter(lambda: reader.read(CHUNK), b""), recipients)
    entries.append(ManifestEntry(name, file.path, digest.hexdigest(), size, file.study_uid, file.series_uid,
                                 file.sop_uid))


def _prepare_deid(ctx: ServiceContext, policy: ExportPolicy, plan: DownloadPlan) -> Deid | None:
    if not policy.deidentified:
        return None
    engine = deid.engine_for(ctx, policy)
    files, pairs = deid.pseudonymous_files(engine, plan.study_infos, plan.series_infos, plan.instance_infos,
                                           plan.headers)
    deid.record_mappings(ctx, plan.project_id, pairs)
    return Deid(engine, {f.cache_path: f for f in files}, WithheldReport(policy))


def _size_and_crc(path: Path) -> tuple[int, int]:
    crc, size = 0, 0
    for chunk in chunks_of(path):
        crc = zlib.crc32(chunk, crc)
        size += len(chunk)
    return size, crc
