"""A TCP proxy on 127.0.0.1 that watches (and can slow or cut) traffic to a PACS.

Tests put it between mi2b2 and the PACS to observe, from the PACS's side of
the wire, how many associations are open at once and when each began; to
make the PACS unreachable and reachable again; and to slow a transfer down
so a cancel or a SIGKILL lands in the middle of it.
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


class Proxy:
    def __init__(self, target_port: int, bytes_per_second: float | None = None, listen_port: int = 0) -> None:
        self.target_port = target_port
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
        listener.bind(("127.0.0.1", self._port))
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
        times = sorted(self.seen.opened_at)
        best = 0
        first = 0
        for last, t in enumerate(times):
            while t - times[first] >= seconds:
                first += 1
            best = max(best, last - first + 1)
        return best

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client, _ = listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port), timeout=5)
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
            threading.Thread(target=self._pump, args=(client, upstream, ended), daemon=True).start()
            threading.Thread(target=self._pump, args=(upstream, client, ended), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, ended: threading.Event) -> None:
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
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


def _close(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
    sock.close()
