"""A TCP proxy on 127.0.0.1 (or a test network's address) that watches (and can slow or cut) traffic to a PACS.

Tests put it between mi2b2 and the PACS to observe, from the PACS's side of
the wire, how many associations are open at once and when each began, and
every C-FIND request that passes (when, and for which PatientID or
AccessionNumber: it reads the P-DATA PDUs on their way to the PACS); to make
the PACS unreachable and reachable again; and to slow a transfer down so a
cancel or a SIGKILL lands in the middle of it.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from dataclasses import dataclass, field


@dataclass
class Observation:
    opened_at: list[float] = field(default_factory=list)  # monotonic time of each accepted connection
    max_concurrent: int = 0
    active: int = 0
    finds: list[float] = field(default_factory=list)  # monotonic time each C-FIND request reached the PACS
    find_keys: list[str] = field(default_factory=list)  # its PatientID, or AccessionNumber when no PatientID


class Proxy:
    def __init__(self, target_port: int, bytes_per_second: float | None = None, listen_port: int = 0,
                 listen_host: str = "127.0.0.1", target_host: str = "127.0.0.1") -> None:
        self.target_port = target_port
        self.target_host = target_host
        self.listen_host = listen_host
        self.bytes_per_second = bytes_per_second
        self.seen = Observation()
        self._lock = threading.Lock()
        self._listener: socket.socket | None = None
        self._port = listen_port
        self._open: set[socket.socket] = set()

    @property
    def port(self) -> int:
        return self._port

    def start(self) -> Proxy:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind((self.listen_host, self._port))
        listener.listen(64)
        self._port = listener.getsockname()[1]
        self._listener = listener
        threading.Thread(target=self._accept, args=(listener,), daemon=True).start()
        return self

    def down(self) -> None:
        """Refuse connections (and cut open ones) until `up`."""
        listener, self._listener = self._listener, None
        if listener is not None:
            # close() alone leaves a thread blocked in accept() listening; shutdown wakes it.
            _close(listener)
        with self._lock:
            for sock in list(self._open):
                _close(sock)

    def up(self) -> None:
        self.start()

    def reset(self) -> None:
        with self._lock:
            self.seen = Observation(active=self.seen.active)

    def starts_within(self, seconds: float) -> int:
        """The most connections opened inside any window of `seconds`."""
        return most_within(self.seen.opened_at, seconds)

    def finds_within(self, seconds: float) -> int:
        """The most C-FIND requests that reached the PACS inside any window of `seconds`."""
        with self._lock:
            return most_within(self.seen.finds, seconds)

    def _found(self, key: str) -> None:
        with self._lock:
            self.seen.finds.append(time.monotonic())
            self.seen.find_keys.append(key)

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection((self.target_host, self.target_port), timeout=5)
            except OSError:
                _close(client)
                continue
            for sock in (client, upstream):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.settimeout(None)
            with self._lock:
                self.seen.opened_at.append(time.monotonic())
                self.seen.active += 1
                self.seen.max_concurrent = max(self.seen.max_concurrent, self.seen.active)
                self._open.update((client, upstream))
            ended = threading.Event()
            reader = DimseReader(self._found)
            threading.Thread(target=self._pump, args=(client, upstream, ended, reader), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, ended), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, ended: threading.Event,
              reader: DimseReader | None = None) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                if reader is not None:
                    reader.feed(data)
                sink.sendall(data)
                if self.bytes_per_second:
                    time.sleep(len(data) / self.bytes_per_second)
        except OSError:
            pass
        finally:
            first_to_end = not ended.is_set()
            ended.set()
            for sock in (source, sink):
                _close(sock)
            if first_to_end:
                with self._lock:
                    self.seen.active -= 1
                    self._open.discard(source)
                    self._open.discard(sink)


def most_within(times: list[float], seconds: float) -> int:
    """The most of `times` inside any half-open window [t, t + seconds)."""
    ordered = sorted(times)
    best = 0
    first = 0
    for last, t in enumerate(ordered):
        while t - ordered[first] >= seconds:
            first += 1
        best = max(best, last - first + 1)
    return best


C_FIND_RQ = 0x0020
_LONG_VRS = {b"OB", b"OW", b"OF", b"OD", b"OL", b"OV", b"SQ", b"UT", b"UN", b"UC", b"UR", b"SV", b"UV"}
_KEYS = {(0x0010, 0x0020): "PatientID", (0x0008, 0x0050): "AccessionNumber"}


class DimseReader:
    """Reads the association's requests from the bytes on their way to the PACS
    (PS3.8 PDUs: P-DATA-TF items carry PDVs; a message control header says command
    or dataset, last fragment or not) and calls `on_find(key)` as each C-FIND
    request's identifier completes."""

    def __init__(self, on_find) -> None:  # type: ignore[no-untyped-def]
        self.on_find = on_find
        self._buffer = bytearray()
        self._command = bytearray()
        self._dataset = bytearray()
        self._find_pending = False

    def feed(self, data: bytes) -> None:
        self._buffer += data
        while len(self._buffer) >= 6:
            length = int.from_bytes(self._buffer[2:6], "big")
            if len(self._buffer) < 6 + length:
                return
            pdu_type, body = self._buffer[0], bytes(self._buffer[6:6 + length])
            del self._buffer[:6 + length]
            if pdu_type == 0x04:
                self._p_data(body)

    def _p_data(self, body: bytes) -> None:
        at = 0
        while at + 6 <= len(body):
            length = int.from_bytes(body[at:at + 4], "big")
            control, fragment = body[at + 5], body[at + 6:at + 4 + length]
            at += 4 + length
            if control & 0x01:  # command
                self._command += fragment
                if control & 0x02:
                    self._find_pending = _command_field(bytes(self._command)) == C_FIND_RQ
                    self._command.clear()
            else:
                self._dataset += fragment
                if control & 0x02:
                    if self._find_pending:
                        keys = _elements(bytes(self._dataset))
                        self.on_find(keys.get("PatientID") or keys.get("AccessionNumber") or "")
                    self._find_pending = False
                    self._dataset.clear()


def _command_field(command: bytes) -> int | None:
    """(0000,0100) of a command set (always implicit VR little endian)."""
    at = 0
    while at + 8 <= len(command):
        group, element = int.from_bytes(command[at:at + 2], "little"), int.from_bytes(command[at + 2:at + 4], "little")
        length = int.from_bytes(command[at + 4:at + 8], "little")
        if (group, element) == (0x0000, 0x0100):
            return int.from_bytes(command[at + 8:at + 10], "little")
        at += 8 + length
    return None


def _elements(dataset: bytes) -> dict[str, str]:
    """PatientID and AccessionNumber of a query identifier, explicit or implicit VR little endian."""
    explicit = len(dataset) >= 6 and dataset[4:6].isalpha() and dataset[4:6].isupper()
    found: dict[str, str] = {}
    at = 0
    while at + 8 <= len(dataset):
        tag = (int.from_bytes(dataset[at:at + 2], "little"), int.from_bytes(dataset[at + 2:at + 4], "little"))
        if explicit:
            vr = dataset[at + 4:at + 6]
            if vr in _LONG_VRS:
                length, header = int.from_bytes(dataset[at + 8:at + 12], "little"), 12
            else:
                length, header = int.from_bytes(dataset[at + 6:at + 8], "little"), 8
        else:
            length, header = int.from_bytes(dataset[at + 4:at + 8], "little"), 8
        if length == 0xFFFFFFFF:
            break  # a sequence of undefined length: no query key we count comes after one
        if tag in _KEYS:
            found[_KEYS[tag]] = dataset[at + header:at + header + length].decode("ascii", "replace").strip(" \0")
        at += header + length
    return found


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
