"""Reading an association's PDUs on its network thread, bounded in length and time.

pynetdicom reads a PDU as long as its header says (4 GiB, if a peer says so)
for as long as the peer takes. The C-STORE receiver reads them here instead:
a P-DATA-TF may be at most the maximum PDU we advertised, any other PDU
1 MiB; each must arrive whole within the network timeout; otherwise the
association is aborted. A PDU's buffer grows as its bytes arrive, never to a
claimed length.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import time
from collections.abc import Callable

from mi2b2.adapters.dicom.netdicom_internals import NetworkLayer, readable
from mi2b2.adapters.dicom.store_receipt import ReceiveLimits
from mi2b2.adapters.dicom.store_wire import A_RELEASE_RQ, P_DATA_TF, PDU_LENGTH, PDU_TYPES, p_data_fragments

__all__ = ["read_pdus_bounded"]

LOG = logging.getLogger(__name__)

_MAX_CONTROL_PDU = 1 << 20  # any PDU but P-DATA-TF (an A-ASSOCIATE-RQ with every context is ~200 KB)
_INITIAL_PDU_BUFFER = 131072 + 6
_PDUS_PER_PASS = 64  # then pynetdicom's loop gets a turn (timers, aborts), mid data set or not
_NEXT_FRAGMENT_WAIT = 0.05  # seconds; a sender that pauses longer goes back to the normal loop


def read_pdus_bounded(
    network: NetworkLayer, deliver: Callable[[int, memoryview], None], mid_message: Callable[[], bool],
    limits: ReceiveLimits, on_release: Callable[[], None] = lambda: None,
) -> None:
    """From now on, read every PDU of the association here (see the module doc).

    A P-DATA-TF of an established association goes straight to `deliver`:
    pynetdicom turns every PDU into an object, fires two events, queues it
    for its state machine, and turns it into a primitive whose fragments are
    copied again; for a P-DATA-TF in state Sta6 all that ends in
    ``dimse.receive_primitive`` with no state change (PS3.8 DT-2). That was
    ~40% of the CPU time of receiving an instance. Every other PDU is decoded
    and queued for pynetdicom's state machine exactly as its own reader does.
    Side effect: EVT_DATA_RECV and EVT_PDU_RECV do not fire for the direct
    PDUs (nothing in mi2b2 binds them).
    """
    # One buffer per association, reused: its fragments are written out (or
    # copied) before the next PDU is read, and a fresh 128 KiB bytearray per
    # PDU costs an allocation and 32 page faults.
    buffer = bytearray(_INITIAL_PDU_BUFFER)

    def receive_into(raw: socket.socket, total: int, deadline: float, received: int = 0) -> memoryview | None:
        """buffer[:total] filled from the socket (from `received` on), or None if closed or too slow."""
        nonlocal buffer
        while received < total:
            if received == len(buffer):
                # Grown as bytes arrive: at most twice what the peer really sent.
                buffer.extend(bytes(min(total - received, max(len(buffer), _INITIAL_PDU_BUFFER))))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return None
            raw.settimeout(remaining)
            with memoryview(buffer) as view:
                count = raw.recv_into(view[received : min(total, len(buffer))])
            if not count:
                return None
            received += count
        return memoryview(buffer)[:total]

    def read() -> None:
        raw = network.socket()
        if raw is None:
            network.read_pdu_as_pynetdicom_does()  # which reports the missing connection its way
            return
        if network.is_awaiting_close():  # we aborted or released: whatever still comes is dropped unread
            _drain_socket(raw, network, limits.network_timeout)
            return
        established = network.is_established()
        if not read_one(raw) or not established:
            return
        # The rest of a data set follows at once: read it here rather than one
        # PDU per pass of pynetdicom's loop, as long as it keeps coming.
        for _ in range(_PDUS_PER_PASS):
            if not mid_message() or not network.is_established():
                return
            if not readable(raw, _NEXT_FRAGMENT_WAIT):
                return
            if not read_one(raw):
                return

    def read_one(raw: socket.socket) -> bool:
        """Read one PDU and deliver it (P-DATA, established) or queue it; False when the association ends."""
        deadline = time.monotonic() + limits.network_timeout
        pdu: memoryview | None = None
        try:
            head = receive_into(raw, 6, deadline)
            if head is None:
                network.connection_closed()  # closed, or too slow
                return False
            pdu_type, length = head[0], PDU_LENGTH.unpack_from(head, 2)[0]
            head.release()
            if pdu_type not in PDU_TYPES or length > (limits.max_pdu if pdu_type == P_DATA_TF else _MAX_CONTROL_PDU):
                LOG.warning("aborted an association: a PDU of type 0x%02X claiming %d bytes", pdu_type, length)
                network.invalid_pdu()  # pynetdicom aborts
                return False
            pdu = receive_into(raw, 6 + length, deadline, received=6)
        except (OSError, TimeoutError, ValueError, BufferError):
            pdu = None
        finally:
            with contextlib.suppress(OSError):
                raw.settimeout(limits.network_timeout)
        if pdu is None:
            network.connection_closed()
            return False
        if pdu_type == P_DATA_TF and network.is_established():
            fragments = p_data_fragments(pdu)
            if fragments is None:
                network.invalid_pdu()
                return False
            for context_id, data in fragments:
                deliver(context_id, data)
            return True
        if pdu_type == A_RELEASE_RQ:
            on_release()
        try:
            network.queue_pdu(pdu)
        except Exception as exc:
            LOG.warning("aborted an association: undecodable PDU of type 0x%02X (%s)", pdu_type, type(exc).__name__)
            network.invalid_pdu()
            return False
        return True

    network.take_over_pdu_reading(read)


def _drain_socket(raw: socket.socket, network: NetworkLayer, timeout: float) -> None:
    try:
        raw.settimeout(0)
        if not raw.recv(65536):
            network.connection_closed()
    except (BlockingIOError, ssl.SSLWantReadError):  # nothing waiting (SSLWantReadError: under TLS)
        pass
    except OSError:
        network.connection_closed()
    finally:
        with contextlib.suppress(OSError):
            raw.settimeout(timeout)
