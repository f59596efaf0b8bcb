"""DICOM storage service user: C-STORE cached files to a destination, over pynetdicom.

`store_files` sends a list of DICOM files over one association and reports,
per instance, what the destination answered. What matters beyond correctness:

* No decoding. A file whose stored transfer syntax the destination accepts is
  streamed from disk as it is, in chunks of the destination's maximum PDU,
  never parsed (pynetdicom's ``STORE_SEND_CHUNKED_DATASET``, for this
  thread only: `netdicom_internals.files_sent_as_stored`). Only an instance whose stored syntax was refused is
  decoded (pydicom, with pylibjpeg for JPEG, JPEG-LS, JPEG 2000 and RLE) and
  re-encoded uncompressed; the caller counts that as a warning.
* Negotiation. Per SOP class we propose the stored syntax alone, and the
  uncompressed syntaxes in a second context (`domain.forwarding`), so the
  destination's answer tells us exactly which instances go out unchanged.
* Latency. TCP_NODELAY on the socket and the prompt network thread of
  `netdicom_internals.prompt_network_thread`: a destination answers each C-STORE before we send the
  next, so per-instance stalls would add up over a study.
* Copies made on the way. An instance may instead be given as a `MadeInstance`:
  its bytes (e.g. a de-identified copy) are made just before its C-STORE and
  dropped after it, never written to disk; only one is in memory at a time.
  Its presentation context is the cached file's (SOP class and transfer
  syntax), which the copy keeps: its pixel data is not re-encoded.
* PHI. Nothing here logs or raises with identifiers: messages carry the
  destination's address, status codes and SOP class names only.

Errors: association problems and "out of resources" (0xA7xx) raise
retriable errors (the caller retries the whole forward later); a destination
that rejects us or accepts none of our contexts raises `DestinationRefused`.
Every other failure status fails that one instance and the next one is sent.
"""

from __future__ import annotations

import io
import logging
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.uid import UID
from pynetdicom import evt
from pynetdicom.association import Association
from pynetdicom.presentation import build_context
from pynetdicom.status import code_to_category

from mi2b2.adapters.dicom.dimse_status import DimseService, status_text
from mi2b2.adapters.dicom.errors import (
    AssociationAborted,
    AssociationRejected,
    PacsBusy,
    PacsTimeout,
    PacsUnreachable,
    ServiceNotSupported,
)
from mi2b2.adapters.dicom.netdicom_internals import files_sent_as_stored, prompt_network_thread
from mi2b2.adapters.dicom.scu import DicomPeer, LocalAE, associate, release
from mi2b2.domain.forwarding import choose_syntax, proposed_contexts
from mi2b2.errors import PermanentError, RetriableError

__all__ = [
    "DestinationBusy",
    "DestinationLost",
    "DestinationRefused",
    "DestinationTimeout",
    "DestinationUnreachable",
    "MadeInstance",
    "StoreProgress",
    "StoreResult",
    "store_files",
]

LOG = logging.getLogger(__name__)
MAX_REASONS = 20  # failure reasons kept per forward; the counts are always exact


# --- errors ----------------------------------------------------------------------------


def _where(name: str, peer: DicomPeer) -> str:
    return f"destination {name!r} ({peer})"


def _fix(name: str) -> str:
    return f"check the [[destinations]] entry {name!r} of the site configuration (AE title, host, port)"


class DestinationUnreachable(RetriableError):
    def __init__(self, name: str, peer: DicomPeer, reason: str) -> None:
        super().__init__(f"cannot connect to {_where(name, peer)}: {reason}; check that the destination is "
                         f"running, or {_fix(name)}")


class DestinationBusy(RetriableError):
    """Rejected for now, or out of resources (0xA7xx): worth trying again later."""

    def __init__(self, name: str, peer: DicomPeer, reason: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(f"{_where(name, peer)} is busy ({reason}); mi2b2 tries again later. If this persists, "
                         "ask the destination's admin about its free space and load, or lower max_concurrent")


class DestinationTimeout(RetriableError):
    def __init__(self, name: str, peer: DicomPeer, seconds: float) -> None:
        super().__init__(f"{_where(name, peer)} did not answer within {seconds:g} s; mi2b2 tries again later. "
                         "If it is always this slow, raise the destination's timeouts in the site configuration")


class DestinationLost(RetriableError):
    def __init__(self, name: str, peer: DicomPeer) -> None:
        super().__init__(f"the association with {_where(name, peer)} was aborted during C-STORE; mi2b2 tries "
                         "again later, and the destination's log says why it dropped the connection")


class DestinationRefused(PermanentError):
    def __init__(self, name: str, peer: DicomPeer, reason: str) -> None:
        super().__init__(f"{_where(name, peer)} refused the forward: {reason}")


def _association_failure(name: str, peer: DicomPeer, local: LocalAE, error: Exception) -> Exception:
    """The PACS-worded errors of `scu.associate`, reworded for a forward destination."""
    if isinstance(error, PacsUnreachable):
        return DestinationUnreachable(name, peer, error.reason)
    if isinstance(error, PacsBusy):
        return DestinationBusy(name, peer, error.reason)
    if isinstance(error, PacsTimeout):
        return DestinationTimeout(name, peer, error.seconds)
    if isinstance(error, AssociationAborted):
        return DestinationLost(name, peer)
    if isinstance(error, AssociationRejected):
        return DestinationRefused(name, peer, f"association rejected ({error.reason}); check that the destination "
                                  f"knows our AE title {local.ae_title!r} with this host's address, and that its "
                                  f"AE title is {peer.ae_title!r}, or {_fix(name)}")
    if isinstance(error, ServiceNotSupported):
        return DestinationRefused(name, peer, "it accepted none of the storage SOP classes and transfer syntaxes "
                                  "of this study; ask its admin to accept them (e.g. Implicit VR Little Endian)")
    return error


# --- results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class StoreProgress:
    """Counts so far; `stored` includes instances stored with a warning."""

    stored: int
    warnings: int  # the destination answered with a warning status
    converted: int  # sent in another transfer syntax than stored (also stored or failed)
    failed: int
    bytes: int  # of the cached files sent (their size on disk), or of the copies made from them


@dataclass
class StoreResult:
    stored: int = 0
    warnings: int = 0
    converted: int = 0
    failed: int = 0
    bytes: int = 0
    skipped: int = 0  # made instances whose maker said not to send them (the caller knows why)
    canceled: bool = False
    last_status: int | None = None
    reasons: list[str] = field(default_factory=list)  # why instances failed, first MAX_REASONS

    def progress(self) -> StoreProgress:
        return StoreProgress(self.stored, self.warnings, self.converted, self.failed, self.bytes)

    def _fail(self, reason: str, status: int | None = None) -> None:
        self.failed += 1
        if status is not None:
            self.last_status = status
        if len(self.reasons) < MAX_REASONS:
            self.reasons.append(reason)


def _ignore(progress: StoreProgress) -> None:
    return None


def _never() -> bool:
    return False


# --- sending ---------------------------------------------------------------------------


@dataclass(frozen=True)
class MadeInstance:
    """An instance sent as bytes made just before its C-STORE from the cached file at ``path``.

    ``make`` returns a whole DICOM file (preamble and file meta included) with
    the cached file's SOP class and transfer syntax, or None when the instance
    is not to be sent (counted in ``StoreResult.skipped``)."""

    path: Path
    make: Callable[[], bytes | None]


@dataclass(frozen=True)
class _File:
    path: Path
    sop_class: str
    transfer_syntax: str
    make: Callable[[], bytes | None] | None = None


class _Unconvertible(Exception):
    """The instance cannot be re-encoded in a syntax the destination accepted."""


def store_files(
    local: LocalAE,
    peer: DicomPeer,
    name: str,
    paths: Sequence[Path | MadeInstance],
    *,
    should_cancel: Callable[[], bool] = _never,
    on_progress: Callable[[StoreProgress], None] = _ignore,
) -> StoreResult:
    """C-STORE each file (or instance made from one) to `peer` over one association, in order.

    `name` is the destination's id, for messages. `should_cancel` is asked
    before every instance: once it says yes, the association is released and
    the result says ``canceled``. `on_progress` gets the counts after every
    instance (the caller decides how often to write them anywhere).
    """
    result = StoreResult()
    files: list[_File] = []
    for item in paths:
        path, make = (item.path, item.make) if isinstance(item, MadeInstance) else (item, None)
        try:
            meta = read_file_meta_info(path)
            files.append(_File(Path(path), str(meta.MediaStorageSOPClassUID), str(meta.TransferSyntaxUID), make))
        except FileNotFoundError:
            result._fail("the file is no longer in the cache")
        except (InvalidDicomError, OSError, AttributeError, ValueError) as exc:
            result._fail(f"the cached file is not readable DICOM ({type(exc).__name__})")
    if not files:
        return result
    if should_cancel():
        result.canceled = True
        return result

    contexts = [build_context(sop_class, list(syntaxes))
                for sop_class, syntaxes in proposed_contexts((f.sop_class, f.transfer_syntax) for f in files)]
    try:
        assoc = associate(local, peer, contexts, "Storage (C-STORE)", on_connect=_prompt)
    except (PacsUnreachable, PacsBusy, PacsTimeout, AssociationAborted, AssociationRejected,
            ServiceNotSupported) as exc:
        raise _association_failure(name, peer, local, exc) from None
    accepted: dict[str, set[str]] = defaultdict(set)
    for cx in assoc.accepted_contexts:
        if cx.as_scu:
            accepted[str(cx.abstract_syntax)].add(str(cx.transfer_syntax[0]))

    started = time.perf_counter()
    try:
        with files_sent_as_stored():
            for number, file in enumerate(files):
                if number and should_cancel():
                    result.canceled = True
                    break
                _store_one(assoc, peer, name, file, accepted[file.sop_class], number % 0xFFFF + 1, result)
                on_progress(result.progress())
    except BaseException:
        # A C-STORE may be half sent: a release would wait on a response that may never come.
        if assoc.is_established:
            assoc.abort()
        raise
    release(assoc)
    LOG.info("C-STORE to %s (%s): %d stored (%d with warnings, %d converted), %d failed, %d not sent%s in %.2f s",
             name, peer, result.stored, result.warnings, result.converted, result.failed, result.skipped,
             " (canceled)" if result.canceled else "", time.perf_counter() - started)
    return result


def _store_one(assoc: Association, peer: DicomPeer, name: str, file: _File, accepted: set[str], message_id: int,
               result: StoreResult) -> None:
    made: Dataset | None = None
    made_size = 0
    if file.make is not None:
        try:
            data = file.make()
        except FileNotFoundError:
            result._fail("the file is no longer in the cache")
            return
        except OSError as exc:
            result._fail(f"the cached file could not be read ({type(exc).__name__}); run `mi2b2 admin fsck`")
            return
        if data is None:
            result.skipped += 1
            return
        try:
            made, made_size = dcmread(io.BytesIO(data)), len(data)
            del data  # one copy of a big instance in memory is enough
        except (InvalidDicomError, ValueError, EOFError, AttributeError) as exc:
            result._fail(f"the copy made for sending is not readable DICOM ({type(exc).__name__})")
            return
    choice = choose_syntax(file.transfer_syntax, accepted)
    sop_name = UID(file.sop_class).name
    if choice is None:
        result._fail(f"the destination accepted {sop_name} in none of the transfer syntaxes proposed")
        return
    payload: Path | Dataset = file.path if made is None else made
    try:
        size = file.path.stat().st_size if made is None else made_size
        if choice.convert:
            payload = _converted(file.path if made is None else made, UID(choice.transfer_syntax))
    except FileNotFoundError:
        result._fail("the file is no longer in the cache")
        return
    except OSError as exc:
        result._fail(f"the cached file could not be read ({type(exc).__name__}); run `mi2b2 admin fsck`")
        return
    except _Unconvertible as exc:
        result._fail(str(exc))
        return
    if choice.convert:
        result.converted += 1
    waited_from = time.monotonic()
    try:
        status = assoc.send_c_store(payload, msg_id=message_id)
    except RuntimeError:
        raise DestinationLost(name, peer) from None
    except FileNotFoundError:
        result._fail("the file is no longer in the cache")
        return
    except (ValueError, AttributeError, OSError) as exc:
        # No usable context after all, or the file could not be encoded or read.
        result._fail(f"could not send {sop_name} ({type(exc).__name__})")
        return
    if "Status" not in status:
        limit = min(peer.dimse_timeout, peer.network_timeout)
        if not assoc.is_established or time.monotonic() - waited_from < limit * 0.95:
            raise DestinationLost(name, peer)
        raise DestinationTimeout(name, peer, limit)
    code = int(status.Status)
    category = code_to_category(code)
    if category == "Success":
        result.stored += 1
    elif category == "Warning":
        result.stored += 1
        result.warnings += 1
        result.last_status = code
    elif 0xA700 <= code <= 0xA7FF:
        raise DestinationBusy(name, peer, f"C-STORE status 0x{code:04X}, {status_text(DimseService.C_STORE, code)}", status=code)
    else:
        comment = str(status.get("ErrorComment", "") or "")
        # The destination's own text may quote what it refused: kept only when short and free of digits (UIDs, MRNs).
        detail = f": {comment[:80]}" if comment and not any(c.isdigit() for c in comment) else ""
        result._fail(f"status 0x{code:04X} ({status_text(DimseService.C_STORE, code)}{detail}) for {sop_name}", status=code)
        return
    result.bytes += size


def _converted(source: Path | Dataset, target: UID) -> Dataset:
    """The instance (a cached file, or a copy made for sending) decoded and made ready to encode in `target`
    (uncompressed).

    Lossless stored data keep their pixel values exactly; lossy data are
    decoded as they would be displayed (colour JPEG becomes RGB). The SOP
    Instance UID is kept: it is the same image, in another encoding."""
    try:
        ds = source if isinstance(source, Dataset) else dcmread(source)
    except (InvalidDicomError, ValueError, EOFError) as exc:
        raise _Unconvertible(f"the cached file could not be decoded for conversion ({type(exc).__name__})") from None
    stored = UID(ds.file_meta.TransferSyntaxUID)
    if stored.is_compressed:
        try:
            ds.decompress(generate_instance_uid=False)
        except Exception as exc:  # any decoder plugin error means the same thing here
            raise _Unconvertible(
                f"the destination refused {stored.name} and its pixel data could not be decompressed "
                f"({type(exc).__name__}); ask the destination's admin to accept {stored.name}"
            ) from None
    elif not stored.is_little_endian:
        raise _Unconvertible(f"the destination refused {stored.name}, which mi2b2 does not convert; "
                             f"ask the destination's admin to accept it")
    ds.file_meta.TransferSyntaxUID = target
    # pynetdicom checks that the dataset's encoding matches the syntax it is sent in.
    ds.set_original_encoding(target.is_implicit_VR, True, ds.original_character_set)
    return ds


def _prompt(event: evt.Event) -> None:
    prompt_network_thread(event.assoc)
