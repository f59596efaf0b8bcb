"""Errors of the DICOM adapter, placed in mi2b2's one exception tree.

Every message names the PACS as ``AE@host:port`` and says what to check, because
the person reading it is a site admin looking at a PACS node's configuration,
not a DICOM developer. Nothing here carries patient data: messages are built
from network addresses, AE titles and status codes only.

    RetriableError
    ├── PacsUnreachable        no TCP connection (refused, no route, host down)
    ├── PacsTimeout            connected, but the PACS did not answer in time
    ├── PacsBusy               association rejected as transient, or A700/A702
    ├── AssociationAborted     the association died in the middle of an operation
    └── ReceiverUnreachable    the PACS could not deliver a C-MOVE: mi2b2's own receiver is down
    PermanentError
    ├── AssociationRejected    the PACS refuses us (AE titles, contexts)
    ├── ServiceNotSupported    the PACS did not accept the SOP class we need
    ├── DimseFailure           the PACS answered an operation with a failure status
    │   ├── ResultsTruncated   the PACS stopped a C-FIND early (its answer limit)
    │   └── MoveDestinationUnknown  the PACS does not know our receiver (C-MOVE 0xA801)
    ├── TlsHandshakeFailed     no DICOM TLS with the peer (its certificate, ours, or no TLS there)
    ├── TlsSettingsUnusable    the certificate or key files of a DICOM TLS setting cannot be loaded
    ├── ReceiverUnavailable    our own DICOM receiver cannot listen on its port
    └── UntestedPynetdicom     the installed pynetdicom is not a release mi2b2 was tested with
"""

from __future__ import annotations

from mi2b2.errors import PermanentError, RetriableError


class PacsUnreachable(RetriableError):
    """No TCP connection could be made to the PACS."""

    def __init__(self, peer: str, reason: str) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(
            f"cannot connect to PACS {peer}: {reason}; check that the PACS is "
            "running, that the host and port configured for it are right and "
            "that no firewall blocks the port"
        )


class PacsTimeout(RetriableError):
    """The PACS stopped answering within the configured timeout."""

    def __init__(self, peer: str, waiting_for: str, seconds: float) -> None:
        self.peer = peer
        self.waiting_for = waiting_for
        self.seconds = seconds
        super().__init__(
            f"PACS {peer} did not answer within {seconds:g} s while we waited for "
            f"{waiting_for}; the PACS may be overloaded or hung: retry later, or "
            "raise this PACS node's timeouts if it is always this slow"
        )


class PacsBusy(RetriableError):
    """The PACS refused for a reason that should pass (congestion, resources)."""

    def __init__(self, peer: str, reason: str) -> None:
        self.peer = peer
        self.reason = reason
        super().__init__(
            f"PACS {peer} is busy ({reason}); retry later, and if this persists "
            "lower the concurrency or rate configured for this PACS node"
        )


class AssociationAborted(RetriableError):
    """The association was lost in the middle of an operation.

    Raised instead of returning what had arrived so far: a partial C-FIND
    answer looks exactly like a complete one to the caller.
    """

    def __init__(self, peer: str, during: str) -> None:
        self.peer = peer
        self.during = during
        super().__init__(
            f"the association with PACS {peer} was aborted during {during}; no "
            "partial result was kept. Retry; if it happens again, the PACS log "
            "says why it dropped the connection"
        )


# A-ASSOCIATE-RJ (source, reason) pairs that a site admin can act on, and what
# to check for each; PS3.8 9.3.4 defines the codes.
_REJECT_FIXES: dict[tuple[int, int], str] = {
    (1, 3): "check that the PACS knows our AE title {calling!r} (and this host)",
    (1, 7): "check that the PACS's AE title really is {called!r}",
    (1, 2): "the PACS does not speak the DICOM application context; is it a DICOM port?",
    (2, 2): "the PACS does not support our DICOM protocol version",
}


class AssociationRejected(PermanentError):
    """The PACS rejected the association permanently (or refused every context)."""

    def __init__(
        self,
        peer: str,
        *,
        calling_ae: str,
        called_ae: str,
        reason: str,
        result: int | None = None,
        source: int | None = None,
        diagnostic: int | None = None,
    ) -> None:
        self.peer = peer
        self.calling_ae = calling_ae
        self.called_ae = called_ae
        self.reason = reason
        self.result = result
        self.source = source
        self.diagnostic = diagnostic
        fix = _REJECT_FIXES.get((source or 0, diagnostic or 0))
        if fix is None:
            fix = (
                "check that the PACS knows our AE title {calling!r} with this host's address, and that its AE title is {called!r}"
            )
        super().__init__(f"PACS {peer} rejected the association ({reason}); " + fix.format(calling=calling_ae, called=called_ae))


class ServiceNotSupported(PermanentError):
    """The PACS accepted the association but not the SOP class we need."""

    def __init__(self, peer: str, service: str) -> None:
        self.peer = peer
        self.service = service
        super().__init__(
            f"PACS {peer} does not offer {service}; choose the other query model "
            "for this PACS node, or ask the PACS admin to enable it for our AE title"
        )


class DimseFailure(PermanentError):
    """The PACS answered a DIMSE request with a failure (or cancel) status."""

    def __init__(
        self,
        peer: str,
        operation: str,
        status: int,
        text: str,
        comment: str | None = None,
    ) -> None:
        self.peer = peer
        self.operation = operation
        self.status = status
        self.text = text
        self.comment = comment
        detail = f" - {comment}" if comment else ""
        super().__init__(
            f"PACS {peer} answered {operation} with status 0x{status:04X} "
            f"({text}{detail}); the PACS log explains the refusal, and the "
            "query keys may need to change for this PACS"
        )


class ResultsTruncated(DimseFailure):
    """The PACS ended a C-FIND before the last match (its per-query answer limit).

    Orthanc with LimitFindResults answers 0xFE00 (cancel) although nobody
    cancelled; PS3.4 repository queries use 0xB001. Either way the answers are
    incomplete, and an incomplete list must not pass for a complete one.
    """

    def __init__(self, peer: str, status: int, answers: list[dict[str, str]]) -> None:
        # The answers that did arrive, for a caller that splits the query and
        # tries again; never to be shown as the result of this query.
        self.answers = answers
        self.received = received = len(answers)
        super().__init__(peer, "C-FIND", status, f"stopped after {received} answers")
        self.args = (
            f"PACS {peer} stopped the C-FIND after {received} answers (status "
            f"0x{status:04X}): it limits the answers per query. Narrow the search "
            "(fewer patients per query, a date range) or ask the PACS admin to "
            "raise the limit",
        )


class MoveDestinationUnknown(DimseFailure):
    """The PACS refused a C-MOVE because it does not know the destination AE (0xA801).

    A PACS sends C-MOVE results only to destinations its admin registered
    (AE title, host, port); until mi2b2's receiver is registered, every
    C-MOVE to that PACS fails this way.
    """

    def __init__(self, peer: str, destination_ae: str, comment: str | None = None) -> None:
        super().__init__(peer, "C-MOVE", 0xA801, "Move destination unknown", comment)
        self.destination_ae = destination_ae
        detail = f" - {comment}" if comment else ""
        self.args = (
            f"PACS {peer} does not know the C-MOVE destination {destination_ae!r} (status 0xA801{detail}). "
            f"Ask the PACS admin to register mi2b2's receiver as a DICOM destination (remote AE / modality): "
            f"AE title {destination_ae!r}, the host name or address of the machine running the mi2b2 receiver, "
            "and the receiver's port from the site configuration. Or switch this PACS node to C-GET",
        )


class ReceiverUnreachable(RetriableError):
    """A C-MOVE failed because the PACS could not reach mi2b2's own receiver, which is not
    running (or not reachable) now: not the PACS's fault, and over once a receiver is back."""

    def __init__(self, peer: str, status: int | None, ae_title: str, host: str, port: int) -> None:
        self.status = status
        when = (f"when PACS {peer} tried to send the study (status 0x{status:04X})" if status is not None
                else f"so PACS {peer} was not asked to send the study")
        super().__init__(
            f"mi2b2's receiver {ae_title} at {host}:{port} could not be reached {when}; the PACS is not at "
            "fault. Retrying once a receiver is back: start `mi2b2 receiver` (or `mi2b2 serve`) if none is running"
        )


class DeliveryInterrupted(RetriableError):
    """A C-MOVE sent nothing while mi2b2's receivers were changing: several behind a balancer, one
    of which may have stopped as the PACS reached it, or one that just started and that the
    balancer does not route to yet. Worth another try; the attempt counts, so a PACS that
    refuses for good still fails in the end."""

    def __init__(self, peer: str, status: int, receivers: int) -> None:
        self.status = status
        super().__init__(
            f"PACS {peer} answered C-MOVE with status 0x{status:04X} and sent nothing while mi2b2's receivers "
            f"were changing ({receivers} known: one may have stopped, or not be reached through the balancer yet), "
            "so the study is asked for again. If this repeats, the PACS refuses the destination: check that it "
            "knows mi2b2's AE title at the balancer's address"
        )


class TlsHandshakeFailed(PermanentError):
    """The TLS handshake with a PACS or destination failed: retrying will not change a certificate.

    ``security`` marks a peer whose certificate could not be trusted (another
    CA, another name, expired): someone else may be answering at its address.
    """

    def __init__(self, peer: str, kind: str, reason: str, fix: str, security: bool) -> None:
        self.peer = peer
        self.reason = reason
        self.security = security
        super().__init__(f"TLS handshake with {kind} {peer} failed: {reason}; {fix}")


class TlsSettingsUnusable(PermanentError):
    """A DICOM TLS setting names files that cannot be loaded (bad PEM, key of another certificate)."""

    def __init__(self, setting: str, reason: str, fix: str) -> None:
        self.setting = setting
        super().__init__(f"the DICOM TLS setting {setting} cannot be used ({reason}); {fix}, then reload "
                         "the configuration")


class ReceiverUnavailable(PermanentError):
    """mi2b2's own C-STORE receiver cannot listen on its configured address."""

    def __init__(self, ae_title: str, host: str, port: int, error: OSError) -> None:
        self.ae_title = ae_title
        self.host = host
        self.port = port
        reason = error.strerror or type(error).__name__
        super().__init__(
            f"the DICOM receiver {ae_title} cannot listen on {host}:{port} ({reason}); if another "
            "program (or another mi2b2 receiver) holds that port, stop it or choose another receiver "
            "port in the site configuration, and check that the host address belongs to this machine"
        )


class UntestedPynetdicom(PermanentError):
    """The installed pynetdicom is outside the range mi2b2 was tested with (see netdicom_internals)."""

    def __init__(self, installed: str, tested: str) -> None:
        self.installed = installed
        self.tested = tested
        super().__init__(
            f"pynetdicom {installed} is installed, but mi2b2 was tested with pynetdicom{tested} only: it relies "
            "on pynetdicom internals that change between releases. Install a tested release "
            f"(pip install 'pynetdicom{tested}', or pip install -c constraints.txt . from the mi2b2 checkout), "
            "then start mi2b2 again"
        )
