"""DICOM service user: C-ECHO and C-FIND against one PACS, over pynetdicom.

Plain functions and small classes with explicit parameters; the service layer
turns PacsNode configuration into `DicomPeer`/`LocalAE` values.

Two things matter beyond correctness:

* Latency. pynetdicom leaves Nagle's algorithm on, and a C-FIND request goes
  out as two small P-DATA PDUs (command, then identifier); the second waits for
  the PACS's delayed ACK of the first, ~40 ms per query on loopback. We set
  TCP_NODELAY on every association socket as soon as it connects.
* PHI. pynetdicom logs request and response identifiers (patient names, MRNs)
  at INFO. We cap its logger at WARNING unless the application configured it
  explicitly, and our own log lines carry key names and counts, never values.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import Any, Self

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import UID
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import PresentationContext
from pynetdicom.status import code_to_category

from mi2b2.adapters.dicom.dimse_status import DimseService, status_text
from mi2b2.adapters.dicom.errors import (
    AssociationAborted,
    AssociationRejected,
    DimseFailure,
    PacsBusy,
    PacsTimeout,
    PacsUnreachable,
    ResultsTruncated,
    ServiceNotSupported,
)
from mi2b2.adapters.dicom.netdicom_internals import association_socket, keep_responses_for_the_caller, set_nodelay
from mi2b2.adapters.dicom.tls import TlsClient, client_context, explain, recorded_failure, shake_hands
from mi2b2.domain.query_model import QueryModel as QueryModel
from mi2b2.errors import InvalidInput

__all__ = [
    "DicomPeer",
    "FindSession",
    "LocalAE",
    "QueryLevel",
    "QueryModel",
    "associate",
    "echo",
    "find_once",
    "no_response_error",
    "open_find_session",
    "release",
    "resolve_host",
]

LOG = logging.getLogger(__name__)

_PYNETDICOM_LOG = logging.getLogger("pynetdicom")
if _PYNETDICOM_LOG.level == logging.NOTSET:
    # NOTSET would inherit the root level; an app running at INFO would then
    # write every C-FIND identifier (names, MRNs) to its ordinary log.
    _PYNETDICOM_LOG.setLevel(logging.WARNING)


@dataclass(frozen=True)
class DicomPeer:
    """A remote DICOM node and how long we wait for it (seconds)."""

    ae_title: str
    host: str
    port: int
    connect_timeout: float = 5.0
    acse_timeout: float = 10.0
    dimse_timeout: float = 30.0
    network_timeout: float = 60.0
    tls: TlsClient | None = None  # None: plain DICOM

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


@dataclass(frozen=True)
class LocalAE:
    """Our side of an association."""

    ae_title: str
    max_pdu: int = 0  # 0 = unlimited; advertised to peers, large PDUs mean fewer round trips


class QueryLevel(StrEnum):
    PATIENT = "PATIENT"
    STUDY = "STUDY"
    SERIES = "SERIES"
    IMAGE = "IMAGE"


# pynetdicom generates its sop_class names at import time, invisible to type
# checkers; the UIDs are fixed by PS3.4 anyway.
_VERIFICATION = UID("1.2.840.10008.1.1")
_FIND_SOP_CLASS = {
    QueryModel.PATIENT_ROOT: UID("1.2.840.10008.5.1.4.1.2.1.1"),
    QueryModel.STUDY_ROOT: UID("1.2.840.10008.5.1.4.1.2.2.1"),
}

# Elements of the query identifier we never return as answer values: they
# describe the query or the encoding, not the matched entity.
_NOT_ANSWERS = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet"})
_BINARY_VRS = frozenset({"OB", "OD", "OF", "OL", "OV", "OW", "UN", "SQ"})
_INT_VRS = frozenset({"US", "UL", "SS", "SL", "UV", "SV", "AT"})
_FLOAT_VRS = frozenset({"FL", "FD"})


# --- association -----------------------------------------------------------------


def associate(
    local: LocalAE,
    peer: DicomPeer,
    contexts: Sequence[UID | PresentationContext],
    purpose: str,
    *,
    roles: Sequence[SCP_SCU_RoleSelectionNegotiation] = (),
    on_connect: Callable[[evt.Event], None] | None = None,
) -> Association:
    """Open an association or raise the error that explains why not.

    `contexts` are abstract syntaxes (default transfer syntaxes) or full
    presentation contexts; `roles` are SCP/SCU role selection items (C-GET);
    `on_connect` runs on the new association's network thread right after
    TCP connect, before the association request goes out.
    """
    ae = AE(ae_title=local.ae_title)
    ae.connection_timeout = peer.connect_timeout
    ae.acse_timeout = peer.acse_timeout
    ae.dimse_timeout = peer.dimse_timeout
    ae.network_timeout = peer.network_timeout
    ae.maximum_pdu_size = local.max_pdu
    for context in contexts:
        if isinstance(context, PresentationContext):
            if context.abstract_syntax is None:
                raise ValueError("a proposed presentation context must name its abstract syntax")
            ae.add_requested_context(context.abstract_syntax, context.transfer_syntax)
        else:
            ae.add_requested_context(context)

    connected = threading.Event()
    tls_args = None
    server_name = ""
    if peer.tls is not None:
        server_name = peer.tls.server_name or peer.host
        tls_args = (client_context(peer.tls), server_name)
    # The TLS socket and its failed handshake, kept from the network thread for the error.
    tls_socket: list[socket.socket | None] = [None]
    tls_error: list[BaseException] = []

    def on_open(event: evt.Event) -> None:
        set_nodelay(event.assoc)
        if tls_args is not None:
            tls_socket[0] = sock = association_socket(event.assoc)
            try:
                shake_hands(sock, peer.acse_timeout)
            except OSError as exc:
                tls_error.append(exc)
                # Closed, not shut down: an SSLSocket shut down would send pynetdicom's request in clear.
                if sock is not None:
                    sock.close()
                return
        if on_connect is not None:
            on_connect(event)
        connected.set()

    started = time.monotonic()
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        max_pdu=local.max_pdu,
        ext_neg=list(roles) or None,
        evt_handlers=[(evt.EVT_CONN_OPEN, on_open)],
        tls_args=tls_args,
    )
    if assoc.is_established:
        keep_responses_for_the_caller(assoc)
        return assoc
    elapsed = time.monotonic() - started
    if peer.tls is not None:
        failure = tls_error[0] if tls_error else recorded_failure(tls_socket[0])
        # Silence or a dropped connection may pass (a loaded PACS); a refused certificate will not.
        if isinstance(failure, TimeoutError):
            raise PacsTimeout(str(peer), "its side of the TLS handshake", peer.acse_timeout)
        if isinstance(failure, (ConnectionError, ssl.SSLEOFError)):
            raise AssociationAborted(str(peer), "the TLS handshake")
        if failure is not None:
            raise explain(failure, str(peer), peer.tls, server_name)
    raise _association_error(local, peer, assoc, connected.is_set(), elapsed, purpose)


def _association_error(
    local: LocalAE,
    peer: DicomPeer,
    assoc: Association,
    connected: bool,
    elapsed: float,
    purpose: str,
) -> Exception:
    label = str(peer)
    if not connected:
        # pynetdicom swallows the OSError; what is left to tell a refused
        # connection from a silently dropped one is how long connect() took.
        if elapsed >= peer.connect_timeout * 0.95:
            reason = (
                f"no answer to the TCP connection within {peer.connect_timeout:g} s (host down, or a firewall dropping packets?)"
            )
        else:
            reason = "connection refused or no route to host (is anything listening on that port?)"
        return PacsUnreachable(label, reason)

    answer = assoc.acceptor.primitive
    if assoc.is_rejected and answer is not None:
        if answer.result == 0x02:
            return PacsBusy(label, f"association rejected: {answer.reason_str}")
        return AssociationRejected(
            label,
            calling_ae=local.ae_title,
            called_ae=peer.ae_title,
            reason=f"{answer.result_str}: {answer.reason_str}",
            result=answer.result,
            source=answer.result_source,
            diagnostic=answer.diagnostic,
        )
    if answer is not None and answer.result == 0x00:
        # Accepted, but pynetdicom aborted because no context was accepted.
        return ServiceNotSupported(label, purpose)
    if answer is None and elapsed >= peer.acse_timeout * 0.95:
        return PacsTimeout(label, "the answer to our association request", peer.acse_timeout)
    # Connected, then the peer aborted or hung up without an A-ASSOCIATE
    # answer: some PACS do this instead of rejecting an AE title they do not
    # know, and so does anything on that port that does not speak DICOM.
    return AssociationRejected(
        label,
        calling_ae=local.ae_title,
        called_ae=peer.ae_title,
        reason=(
            "the peer aborted or closed the connection instead of answering the "
            "association request; is this port really the PACS's DICOM port (and does it speak plain DICOM, "
            "not DICOM TLS)?"
        ),
    )


def release(assoc: Association) -> None:
    if assoc.is_established:
        assoc.release()
    elif assoc.is_alive():
        assoc.abort()


# --- C-ECHO ------------------------------------------------------------------------


def echo(local: LocalAE, peer: DicomPeer) -> float:
    """C-ECHO the peer; return the seconds from starting to connect to the echo answer.

    The association set-up is included because that is what a health check is
    about: a PACS that accepts TCP but cannot negotiate is not healthy.
    """
    started = time.perf_counter()
    assoc = associate(local, peer, [_VERIFICATION], "the Verification service (C-ECHO)")
    try:
        status = assoc.send_c_echo()
        elapsed = time.perf_counter() - started
        if "Status" not in status:
            raise no_response_error(peer, time.perf_counter() - started, "C-ECHO")
        code = int(status.Status)
        if code != 0x0000:
            raise DimseFailure(str(peer), "C-ECHO", code, status_text(DimseService.C_ECHO, code))
        return elapsed
    finally:
        release(assoc)


# --- C-FIND ------------------------------------------------------------------------


class FindSession:
    """One association kept open for many C-FINDs (context manager).

    Not thread-safe: one session per thread. If the PACS closed the association
    while it sat idle, the next find opens a new one; an association lost during
    a find raises instead.
    """

    def __init__(self, local: LocalAE, peer: DicomPeer) -> None:
        self.local = local
        self.peer = peer
        self._assoc: Association | None = None
        self._msg_id = 0

    def open(self) -> None:
        if self._assoc is None or not self._assoc.is_established:
            self._assoc = associate(
                self.local,
                self.peer,
                list(_FIND_SOP_CLASS.values()),
                "Patient Root or Study Root C-FIND",
            )

    def close(self) -> None:
        assoc, self._assoc = self._assoc, None
        if assoc is not None:
            release(assoc)

    def __enter__(self) -> Self:
        return self  # find() associates on first use

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def find(self, model: QueryModel | str, level: QueryLevel | str, keys: Mapping[str, str | None]) -> list[dict[str, str]]:
        """Run one C-FIND; return every answer, or raise (never a partial list)."""
        try:
            model = QueryModel(model)
            level = QueryLevel(level)
        except ValueError as exc:
            raise InvalidInput(f"{exc}; use one of {[m.value for m in QueryModel]} / {[lv.value for lv in QueryLevel]}") from exc
        identifier = _identifier(model, level, keys)
        self.open()
        assoc = self._assoc
        assert assoc is not None
        self._msg_id = self._msg_id % 0xFFFF + 1
        started = time.perf_counter()
        try:
            answers = self._exchange(assoc, model, identifier)
        except (DimseFailure, PacsBusy, ServiceNotSupported, InvalidInput):
            raise  # final status read, or nothing sent: the association is still in step
        except BaseException:
            # Unread responses may still be queued; a clean slate is cheaper
            # than reasoning about a desynchronised association.
            self.close()
            raise
        LOG.debug(
            "C-FIND %s/%s on %s keys=%s: %d answers in %.1f ms",
            model.value,
            level.value,
            self.peer,
            sorted(keys),
            len(answers),
            (time.perf_counter() - started) * 1000,
        )
        return answers

    def _exchange(self, assoc: Association, model: QueryModel, identifier: Dataset) -> list[dict[str, str]]:
        peer = self.peer
        sop_class = _FIND_SOP_CLASS[model]
        if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
            raise ServiceNotSupported(str(peer), f"{sop_class.name} (C-FIND)")
        try:
            responses = assoc.send_c_find(identifier, sop_class, msg_id=self._msg_id)
        except ValueError as exc:
            raise InvalidInput(f"the query keys cannot be encoded: {exc}") from exc
        except RuntimeError as exc:
            raise AssociationAborted(str(peer), "C-FIND") from exc
        answers: list[dict[str, str]] = []
        # pynetdicom's qrscp answers once per matching *instance* even at
        # STUDY/SERIES level; identical answers carry no information.
        seen: set[tuple[tuple[str, str], ...]] = set()
        last = time.perf_counter()
        for status, found in responses:
            if "Status" not in status:
                raise no_response_error(peer, time.perf_counter() - last, "C-FIND")
            last = time.perf_counter()
            code = int(status.Status)
            category = code_to_category(code)
            if category == "Pending":
                if found is None:
                    assoc.abort()  # more answers are on their way; the next find starts afresh
                    raise DimseFailure(str(peer), "C-FIND", code, "an answer could not be decoded")
                answer = _answer(found)
                fingerprint = tuple(sorted(answer.items()))
                if fingerprint not in seen:
                    seen.add(fingerprint)
                    answers.append(answer)
                continue
            if code == 0x0000:
                return answers
            if code in (0xFE00, 0xB001):
                # We never send C-CANCEL, so a cancel status means the PACS
                # cut the answer list short.
                raise ResultsTruncated(str(peer), code, answers)
            comment = str(status.get("ErrorComment", "")) or None
            if 0xA700 <= code <= 0xA7FF:  # Refused: out of resources
                raise PacsBusy(str(peer), f"C-FIND status 0x{code:04X}, {status_text(DimseService.C_FIND, code)}")
            # Other warnings too: C-FIND defines none that leave the answer
            # list trustworthy, so they fail like failures do.
            raise DimseFailure(str(peer), "C-FIND", code, status_text(DimseService.C_FIND, code), comment)
        raise AssociationAborted(str(peer), "C-FIND")


def open_find_session(local: LocalAE, peer: DicomPeer) -> FindSession:
    """Associate now (so errors surface here); use as ``with open_find_session(...) as s``."""
    session = FindSession(local, peer)
    session.open()
    return session


def find_once(
    local: LocalAE,
    peer: DicomPeer,
    model: QueryModel | str,
    level: QueryLevel | str,
    keys: Mapping[str, str | None],
) -> list[dict[str, str]]:
    """One C-FIND on its own association; bad keys fail before any connection."""
    with FindSession(local, peer) as session:
        return session.find(model, level, keys)


# --- identifiers and answers ---------------------------------------------------------


def _identifier(model: QueryModel, level: QueryLevel, keys: Mapping[str, str | None]) -> Dataset:
    if model is QueryModel.STUDY_ROOT and level is QueryLevel.PATIENT:
        raise InvalidInput(
            "the Study Root query model has no PATIENT level; query PATIENT level "
            "with the Patient Root model, or query STUDY level"
        )
    ds = Dataset()
    ds.QueryRetrieveLevel = level.value
    needs_utf8 = False
    for keyword, value in keys.items():
        if keyword in _NOT_ANSWERS:
            continue
        tag = tag_for_keyword(keyword)
        if tag is None:
            raise InvalidInput(f"{keyword!r} is not a DICOM keyword; fix the query key")
        vr = dictionary_VR(tag)
        if vr in _BINARY_VRS:
            raise InvalidInput(f"{keyword!r} ({vr}) cannot be used as a C-FIND key")
        ds[tag] = DataElement(tag, vr, _key_value(keyword, vr, value))
        if value and not value.isascii():
            needs_utf8 = True
    if needs_utf8:
        ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _key_value(keyword: str, vr: str, value: str | None) -> Any:
    if not value:
        return None  # zero-length: a return key
    try:
        if vr in _INT_VRS:
            return int(value)
        if vr in _FLOAT_VRS:
            return float(value)
    except ValueError as exc:
        raise InvalidInput(f"{keyword!r} needs a number, got {value!r}") from exc
    return value


def _answer(found: Dataset) -> dict[str, str]:
    answer: dict[str, str] = {}
    for elem in found:
        if not elem.keyword or elem.keyword in _NOT_ANSWERS or elem.VR in _BINARY_VRS:
            continue
        answer[elem.keyword] = _text(elem.value)
    return answer


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(_text(v) for v in value)
    if isinstance(value, bytes):
        return value.decode("ascii", "replace")
    return str(value)


def no_response_error(peer: DicomPeer, waited: float, operation: str) -> Exception:
    """No response came: tell a timeout from a dropped association."""
    limit = min(peer.dimse_timeout, peer.network_timeout)
    if waited >= limit * 0.95:
        return PacsTimeout(str(peer), f"a {operation} response", limit)
    return AssociationAborted(str(peer), operation)


def resolve_host(host: str) -> tuple[str, ...]:
    """The IP addresses `host` resolves to now (empty if it does not)."""
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except (OSError, UnicodeError):
        return ()
    return tuple(dict.fromkeys(str(info[4][0]) for info in infos))
