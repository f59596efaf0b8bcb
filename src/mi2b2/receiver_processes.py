"""`mi2b2 receiver --processes N`: N receiver processes sharing one DICOM port.

Receiving is CPU-bound Python (one interpreter lock per process), so one
receiver uses one core. Here a parent starts N `mi2b2 receiver` children,
each a whole receiver of its own (C-STORE SCP, IRB checks at receipt, TLS if
configured, TCP_NODELAY, heartbeat in `workers`), each binding the same
host:port with SO_REUSEPORT; the kernel (Linux) spreads the PACS's
associations over them. They index into the same database and cache as
receivers on several hosts do: each has its own incoming folder, and the
index takes its locks in one order.

The parent migrates the database and applies the configuration once (as
`mi2b2 receiver` does), then replaces itself (exec, same pid) with this
module's `main`, which imports little: it holds no socket, no database
connection and ~30 MB rather than a receiver's ~130. It

- refuses to start when something already listens on the port (a forgotten
  receiver of the same user would otherwise silently share it);
- restarts a child that dies (killed, crashed) after removing its temp files;
  an association cut off with it fails at the PACS, and the retrieval goes
  back to the queue as any cut-off C-MOVE does. A child that exits with a
  user error (code 2: the port is taken, the configuration is wrong), or more
  than `RESTARTS_ALLOWED` deaths within `RESTART_WINDOW` seconds, stops them
  all and the parent exits non-zero, with the reason;
- forwards SIGHUP (reload) to every child, and on SIGTERM or SIGINT stops
  them all and waits for each.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from mi2b2.adapters.dicom.errors import ReceiverUnavailable
from mi2b2.adapters.process import accepts_connections, die_with_parent
from mi2b2.adapters.storage.cache_files import CacheStore

LOG = logging.getLogger("mi2b2.receiver")

READY = "mi2b2 receiver running"  # the first line a child prints once it listens
START_SECONDS = 60.0  # how long a child may take to listen
RESTARTS_ALLOWED = 5
RESTART_WINDOW = 60.0
USER_ERROR = 2  # what `mi2b2` exits with on a Mi2b2Error (cli.main.run)
STOP_SECONDS = 15.0


@dataclass
class _Child:
    slot: int
    process: subprocess.Popen[bytes]
    ready: threading.Event = field(default_factory=threading.Event)


@dataclass(frozen=True)
class Port:
    ae_title: str
    host: str
    port: int


class ReceiverProcesses:
    def __init__(self, config_path: Path, port: Port, cache_dir: Path, count: int) -> None:
        self.config_path = config_path
        self.port = port
        self.cache_dir = cache_dir
        self.count = count
        self.children: list[_Child] = []
        self._stop = threading.Event()
        self._reload = threading.Event()
        self._deaths: deque[float] = deque()

    def run(self) -> int:
        """Start the children, keep them running until SIGTERM/SIGINT; the exit code."""
        dicom = self.port
        if accepts_connections(dicom.host, dicom.port, timeout=0.5):
            raise ReceiverUnavailable(dicom.ae_title, dicom.host, dicom.port,
                                      OSError(errno.EADDRINUSE, "something already listens on that port"))
        signal.signal(signal.SIGTERM, lambda *_: self._stop.set())
        signal.signal(signal.SIGINT, lambda *_: self._stop.set())
        signal.signal(signal.SIGHUP, lambda *_: self._reload.set())
        try:
            self.children = [self._start(slot) for slot in range(self.count)]
            code = self._wait_ready()
            if code is not None:
                return code
            pids = ", ".join(str(c.process.pid) for c in self.children)
            print(f"{READY} on {dicom.ae_title}@{dicom.host}:{dicom.port} ({self.count} processes: {pids})", flush=True)
            return self._watch()
        finally:
            self._stop_all()

    def _start(self, slot: int) -> _Child:
        process = subprocess.Popen(
            # Not `mi2b2 receiver`: the whole command line's imports would cost each receiver ~20 MB more.
            [sys.executable, "-m", "mi2b2.receiver_processes", "--child", "--config", str(self.config_path)],
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
            preexec_fn=die_with_parent,  # a SIGKILLed parent must not leave receivers on the port
        )
        child = _Child(slot, process)
        threading.Thread(target=_relay, args=(child,), name=f"mi2b2-receiver-{slot}-stdout", daemon=True).start()
        return child

    def _wait_ready(self) -> int | None:
        """None once every child listens; else the exit code (a child failed, or a signal came)."""
        deadline = time.monotonic() + START_SECONDS
        while not all(c.ready.is_set() for c in self.children):
            for child in self.children:
                code = child.process.poll()
                if code is not None:
                    LOG.error("receiver process %d exited with code %d before it listened; stopping the others",
                              child.process.pid, code)
                    return code if code > 0 else 1
            if self._stop.is_set():
                return 0
            if time.monotonic() > deadline:
                LOG.error("the receiver processes did not all listen within %.0f s; stopping them", START_SECONDS)
                return 1
            time.sleep(0.05)
        return None

    def _watch(self) -> int:
        while not self._stop.wait(0.2):
            if self._reload.is_set():
                self._reload.clear()
                for child in self.children:
                    if child.process.poll() is None:
                        child.process.send_signal(signal.SIGHUP)
            for index, child in enumerate(self.children):
                code = child.process.poll()
                if code is None or self._stop.is_set():
                    continue
                self._clean_up_after(child)
                if code == USER_ERROR:
                    LOG.error("receiver process %d exited with a user error (see above); stopping the others",
                              child.process.pid)
                    return USER_ERROR
                if not self._may_restart():
                    LOG.error("receiver processes died %d times within %.0f s; stopping the others",
                              RESTARTS_ALLOWED + 1, RESTART_WINDOW)
                    return 1
                LOG.warning("receiver process %d exited with %s; starting another", child.process.pid, _how(code))
                self.children[index] = self._start(child.slot)
        return 0

    def _may_restart(self) -> bool:
        now = time.monotonic()
        self._deaths.append(now)
        while self._deaths and now - self._deaths[0] > RESTART_WINDOW:
            self._deaths.popleft()
        return len(self._deaths) <= RESTARTS_ALLOWED

    def _clean_up_after(self, child: _Child) -> None:
        """A dead child's half-received instances (its incoming folder) go at once."""
        try:
            removed = CacheStore(self.cache_dir).clean_stale_incoming()
        except Exception as exc:  # the worker's sweep and `mi2b2 admin fsck --repair` remove them later
            LOG.warning("could not remove the temp files of receiver process %d (%s)", child.process.pid, exc)
            return
        if removed:
            LOG.warning("removed %d partial files of receiver process %d", removed, child.process.pid)

    def _stop_all(self) -> None:
        for child in self.children:
            if child.process.poll() is None:
                child.process.terminate()
        deadline = time.monotonic() + STOP_SECONDS
        for child in self.children:
            try:
                child.process.wait(max(deadline - time.monotonic(), 0.1))
            except subprocess.TimeoutExpired:
                child.process.kill()
                child.process.wait(5)


def exec_receiver_processes(config_path: Path, port: Port, cache_dir: Path, count: int) -> None:
    """Become (same pid: signals and the caller's wait still reach it) the parent of `count` receivers."""
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-m", "mi2b2.receiver_processes", "--config", str(config_path),
                              "--processes", str(count), "--ae-title", port.ae_title, "--host", port.host,
                              "--port", str(port.port), "--cache-dir", str(cache_dir)])


def main() -> None:
    parser = argparse.ArgumentParser(description="the parent of `mi2b2 receiver --processes N`, or (--child) one of them")
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--child", action="store_true")
    parser.add_argument("--processes", type=int)
    parser.add_argument("--ae-title")
    parser.add_argument("--host")
    parser.add_argument("--port", type=int)
    parser.add_argument("--cache-dir", type=Path)
    args = parser.parse_args()
    if args.child:
        _run_child(args.config)
        return
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s", level=logging.INFO)
    try:
        code = ReceiverProcesses(args.config, Port(args.ae_title, args.host, args.port), args.cache_dir,
                                 args.processes).run()
    except ReceiverUnavailable as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        code = USER_ERROR
    sys.exit(code)


def _run_child(config: Path) -> None:
    """One receiver sharing the port; a user error is one line and exit code 2, as `mi2b2` does."""
    from mi2b2.adapters.process import private_files, withhold_exception_messages
    from mi2b2.config import load_config
    from mi2b2.errors import Mi2b2Error
    from mi2b2.runtime import run_alone

    private_files()
    withhold_exception_messages()
    try:
        run_alone(load_config(config), receiver=True, worker=False, what="receiver", share_port=True)
    except Mi2b2Error as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        sys.exit(USER_ERROR)


def _relay(child: _Child) -> None:
    """Pass a child's output on, and notice its ready line."""
    stream: IO[bytes] | None = child.process.stdout
    if stream is None:
        return
    for raw in stream:
        line = raw.decode("utf-8", "replace")
        if line.startswith(READY):
            child.ready.set()
            continue  # the parent says it once for all
        sys.stdout.write(line)
        sys.stdout.flush()


def _how(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


if __name__ == "__main__":
    main()
