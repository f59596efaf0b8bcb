"""A demo PACS for `mi2b2 demo`: pynetdicom's own ``qrscp`` application on 127.0.0.1.

The demo must run on a fresh machine with nothing but mi2b2 installed, so its
PACS is the query/retrieve SCP that ships with pynetdicom (a dependency), run
unchanged as ``python -m pynetdicom qrscp -c <ini>`` in its own process group.
Each PACS keeps its storage, database, configuration and log in one folder.

Two details beyond starting a process:

* Nagle. qrscp leaves Nagle's algorithm on; every small DIMSE answer then waits
  for the peer's delayed ACK (~40 ms on loopback, per answer: a study-level
  C-FIND on qrscp answers once per *instance*). A ``sitecustomize`` module on
  qrscp's PYTHONPATH turns TCP_NODELAY on for its sockets without touching
  pynetdicom itself.
* Loading. Studies go in by C-STORE over one association with TCP_NODELAY on
  our socket, sending each file's bytes as they are (no decode and re-encode).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, evt

from mi2b2.adapters.dicom.netdicom_internals import keep_responses_for_the_caller, set_nodelay
from mi2b2.errors import Mi2b2Error, PermanentError

__all__ = [
    "DemoPacs",
    "DemoPacsError",
    "free_port",
    "launch_qrscp",
    "port_is_free",
    "stop_process_group",
    "store_files",
]

STARTUP_TIMEOUT = 30.0
LOADER_AE = "MI2B2DEMO"
# Storage SOP classes the synthetic studies use (MR, CT, CR, US); PS3.4 fixes them.
_STORAGE_CLASSES = (
    "1.2.840.10008.5.1.4.1.1.4",
    "1.2.840.10008.5.1.4.1.1.2",
    "1.2.840.10008.5.1.4.1.1.1",
    "1.2.840.10008.5.1.4.1.1.6.1",
)
_SUCCESS_OR_WARNING = frozenset({0x0000, 0x0107, 0x0116, 0xB000, 0xB006, 0xB007})


class DemoPacsError(PermanentError):
    """The demo PACS could not be started or loaded; the message says why."""


_NODELAY_SITECUSTOMIZE = '''\
"""Written by mi2b2's demo: switch Nagle off on qrscp's TCP sockets (see mi2b2.demo_pacs)."""
import socket as _socket

_plain_accept = _socket.socket.accept
_plain_connect = _socket.socket.connect


def _no_delay(sock):
    if sock.family in (_socket.AF_INET, _socket.AF_INET6) and sock.type == _socket.SOCK_STREAM:
        try:
            sock.setsockopt(_socket.IPPROTO_TCP, _socket.TCP_NODELAY, 1)
        except OSError:
            pass


def _accept(self):
    conn, address = _plain_accept(self)
    _no_delay(conn)
    return conn, address


def _connect(self, address):
    _no_delay(self)
    return _plain_connect(self, address)


_socket.socket.accept = _accept
_socket.socket.connect = _connect
'''


@dataclass
class DemoPacs:
    """One running qrscp. ``stop()`` ends its whole process group."""

    name: str
    ae_title: str
    port: int
    workdir: Path
    process: subprocess.Popen[bytes]
    host: str = "127.0.0.1"

    @property
    def log_path(self) -> Path:
        return self.workdir / "qrscp.log"

    @property
    def loaded_marker(self) -> Path:
        return self.workdir / "loaded"

    def log_tail(self, lines: int = 5) -> str:
        try:
            text = self.log_path.read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Wait until qrscp answers a C-ECHO, or raise naming its log."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self.process.poll()
            if code is not None:
                raise DemoPacsError(
                    f"demo PACS {self.name} (pynetdicom qrscp) exited with code {code} while starting: "
                    f"{self.log_tail() or 'no output'} (log: {self.log_path})"
                )
            if _accepts_tcp(self.host, self.port) and _echo(self.ae_title, self.host, self.port):
                return
            time.sleep(0.1)
        raise DemoPacsError(
            f"demo PACS {self.name} did not answer C-ECHO on {self.host}:{self.port} within {timeout:g} s "
            f"(log: {self.log_path})"
        )

    def stop(self) -> None:
        stop_process_group(self.process)


def launch_qrscp(
    name: str,
    workdir: Path,
    ae_title: str,
    move_destinations: Mapping[str, tuple[str, int]],
    port: int | None = None,
) -> DemoPacs:
    """Spawn qrscp and return at once (call ``wait_ready``); the caller owns stopping it.

    ``move_destinations`` maps AE title -> (host, port): qrscp only C-MOVEs to
    AEs named in its configuration.
    """
    workdir = workdir.resolve()
    (workdir / "instances").mkdir(parents=True, exist_ok=True)
    shim = workdir / "nodelay"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(_NODELAY_SITECUSTOMIZE, encoding="utf-8")
    port = port or free_port()
    destinations = "".join(
        f"\n[{aet}]\n    address: {host}\n    port: {dest_port}\n" for aet, (host, dest_port) in move_destinations.items()
    )
    ini = workdir / "qrscp.ini"
    # Absolute locations: qrscp resolves relative ones against its own package folder.
    # log_identifier off: the PACS log would otherwise hold every queried MRN.
    ini.write_text(
        f"""[DEFAULT]
    ae_title: {ae_title}
    port: {port}
    max_pdu: 0
    acse_timeout: 30
    dimse_timeout: 60
    network_timeout: 120
    bind_address: 127.0.0.1
    instance_location: {workdir / "instances"}
    database_location: {workdir / "instances.sqlite"}
    log_identifier: False
{destinations}""",
        encoding="utf-8",
    )
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(shim), env.get("PYTHONPATH", "")) if p)
    env["PYTHONUNBUFFERED"] = "1"
    env["TCP_NODELAY"] = "1"
    with (workdir / "qrscp.log").open("ab") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "pynetdicom", "qrscp", "-c", str(ini)],
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            # Own process group: a terminal's Ctrl-C reaches only the demo,
            # which then stops the PACS in order, and killpg reaches any child.
            start_new_session=True,
        )
    return DemoPacs(name, ae_title, port, workdir, process)


def store_files(ae_title: str, host: str, port: int, files: Iterable[Path], cancel: threading.Event | None = None) -> int:
    """C-STORE every file over one association; return how many were stored.

    Setting ``cancel`` (from another thread) aborts the association after the
    file in flight, so that the PACS can then be stopped without errors."""
    ae = AE(ae_title=LOADER_AE)
    ae.maximum_pdu_size = 0
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 60
    for sop_class in _STORAGE_CLASSES:
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(host, port, ae_title=ae_title, max_pdu=0, evt_handlers=[(evt.EVT_CONN_OPEN, _no_delay)])
    if not assoc.is_established:
        raise DemoPacsError(f"cannot open an association to the demo PACS {ae_title}@{host}:{port} to load studies")
    # Under CPU load pynetdicom's reactor can take a C-STORE answer for a request and drop it.
    keep_responses_for_the_caller(assoc)
    stored = 0
    try:
        for path in files:
            if cancel is not None and cancel.is_set():
                raise DemoPacsError(f"loading into the demo PACS {ae_title} was canceled")
            try:
                status = assoc.send_c_store(path)
            except (ValueError, RuntimeError) as exc:
                raise DemoPacsError(f"cannot send {path.name} to the demo PACS {ae_title}: {exc}") from None
            code = int(status.Status) if "Status" in status else None
            if code not in _SUCCESS_OR_WARNING:
                detail = "no answer (association lost)" if code is None else f"status 0x{code:04X}"
                raise DemoPacsError(f"the demo PACS {ae_title} did not store {path.name}: {detail}")
            stored += 1
    except BaseException:
        # Interrupted or failed mid-transfer: a release would wait for answers we no longer want.
        assoc.abort()
        raise
    assoc.release()
    return stored


def stop_process_group(process: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """SIGTERM the process's group, SIGKILL it after ``grace`` seconds; reap the leader."""
    if process.poll() is not None:
        _kill_group(process.pid, signal.SIGKILL)  # the leader is gone; children may not be
        return
    _kill_group(process.pid, signal.SIGTERM)
    try:
        process.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        _kill_group(process.pid, signal.SIGKILL)
        process.wait(timeout=grace)
    _kill_group(process.pid, signal.SIGKILL)


def _kill_group(pgid: int, sig: signal.Signals) -> None:
    # Our children lead their own groups (start_new_session), so pgid == pid.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def port_is_free(host: str, port: int) -> bool:
    """Whether a server could listen on host:port now (as uvicorn would: SO_REUSEADDR on)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _no_delay(event: evt.Event) -> None:
    set_nodelay(event.assoc)


def _accepts_tcp(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _echo(ae_title: str, host: str, port: int) -> bool:
    from mi2b2.adapters.dicom.scu import DicomPeer, LocalAE, echo

    try:
        echo(LocalAE(LOADER_AE), DicomPeer(ae_title, host, port, connect_timeout=2, acse_timeout=5, dimse_timeout=5))
    except Mi2b2Error:
        return False
    return True
