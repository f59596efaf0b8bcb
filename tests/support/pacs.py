"""Real PACS servers on free 127.0.0.1 ports, for tests and bench scripts.

No pytest here: fixtures and `bench/` scripts both call these helpers.
Three independent implementations, as in the paper's three-vendor trial:
Orthanc, DCMTK dcmqrscp and pynetdicom's qrscp app.

Each server:
* gets its own work directory (storage, index, config, log) - Orthanc's SQLite
  index in particular must never be shared between two instances;
* runs with TCP_NODELAY=1 in its environment (DCMTK and Orthanc read it; without
  it every DIMSE exchange on loopback stalls ~40 ms on Nagle + delayed ACK);
* logs verbosely enough that every C-FIND identifier, values included, lands in
  its log - tests read `log_text()` to prove what did, or did not, reach it;
* runs in its own process group, so `stop()` also ends its children
  (dcmqrscp forks one per association).

Clients always reach them on 127.0.0.1, and qrscp binds there only. Orthanc
1.10 and DCMTK 3.6.7 have no bind-address option for their DICOM port, so
those two listen on all interfaces while they run (Orthanc's HTTP port refuses
non-local clients through RemoteAccessAllowed=false); they only ever hold
synthetic studies.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "PacsStartError",
    "RunningPacs",
    "free_port",
    "start_dcmqrscp",
    "start_orthanc",
    "start_qrscp",
    "start_storescp",
]

MAX_PDU = 131072
STARTUP_TIMEOUT = 20.0
_LOADER_AE = "MI2B2LOADER"


class PacsStartError(RuntimeError):
    """A test PACS did not come up; the message carries the tail of its log."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class RunningPacs:
    kind: str  # "orthanc" | "dcmqrscp" | "qrscp"
    ae_title: str
    host: str
    port: int
    http_port: int | None
    workdir: Path
    log_path: Path
    process: subprocess.Popen[bytes]
    _stopped: bool = field(default=False, repr=False)

    @property
    def http_url(self) -> str | None:
        return None if self.http_port is None else f"http://{self.host}:{self.http_port}"

    def log_text(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 40) -> str:
        try:
            return "\n".join(self.log_text().splitlines()[-lines:])
        except OSError:
            return "(no log)"

    def stop(self) -> None:
        """Terminate the whole process group; SIGKILL if it lingers."""
        if self._stopped:
            return
        self._stopped = True
        _kill_group(self.process)

    def load(self, files: list[Path]) -> None:
        """Store `files` into the PACS with DCMTK storescu (C-STORE)."""
        if not files:
            return
        # storescu takes file names on its command line; chunk to stay well
        # below ARG_MAX for big studies.
        for start in range(0, len(files), 500):
            chunk = [str(f) for f in files[start : start + 500]]
            result = subprocess.run(
                [
                    "storescu",
                    "--aetitle",
                    _LOADER_AE,
                    "--call",
                    self.ae_title,
                    "--max-pdu",
                    str(MAX_PDU),
                    "--required",  # fail rather than skip a file the PACS cannot take
                    self.host,
                    str(self.port),
                    *chunk,
                ],
                env=_env(),
                capture_output=True,
                text=True,
                timeout=120,
                check=False,
            )
            if result.returncode != 0:
                raise RuntimeError(
                    f"storescu into {self.kind} {self.ae_title}@{self.host}:{self.port} "
                    f"failed ({result.returncode}):\n{result.stderr[-2000:]}\n"
                    f"PACS log tail:\n{self.log_tail()}"
                )

    def __enter__(self) -> RunningPacs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# --- Orthanc -------------------------------------------------------------------------


def start_orthanc(
    workdir: Path,
    ae_title: str = "ORTHANC",
    move_destinations: Mapping[str, tuple[str, int]] | None = None,
    limit_find_results: int = 0,
    extra: Mapping[str, Any] | None = None,
    host: str = "127.0.0.1",
    launcher: Sequence[str] = (),
) -> RunningPacs:
    """Orthanc with its own storage; `move_destinations` maps AE title -> (host, port).

    `extra` overrides any configuration key (e.g. ``{"DicomCheckCalledAet": True}``).
    `launcher` runs it elsewhere (e.g. ``ip netns exec NS``), where `host` reaches it.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port, http_port = free_port(), free_port()
    config: dict[str, Any] = {
        "Name": f"mi2b2-test-{port}",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": ae_title,
        "DicomPort": port,
        "HttpPort": http_port,
        "HttpServerEnabled": True,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False,
        "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True,
        "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True,
        "DicomModalities": {aet: [aet, host, dest_port] for aet, (host, dest_port) in (move_destinations or {}).items()},
        "MaximumPduLength": MAX_PDU,
        "Plugins": [],
        "LimitFindResults": limit_find_results,
        "LimitFindInstances": limit_find_results,
        "StorageCompression": False,
        "SaveJobs": False,
        "TcpNoDelay": True,
        "KeepAlive": True,
        "HttpsVerifyPeers": False,
        "DicomScuTimeout": 10,
    }
    config.update(extra or {})
    config_path = workdir / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log_path = workdir / "orthanc.log"
    if shutil.which("Orthanc") is None:
        raise PacsStartError("Orthanc is not installed (see /work/shared/TEST-PACS.md)")
    # --verbose alone masks PatientID/PatientName as "*** POTENTIAL PHI ***";
    # --trace-dicom dumps each received C-FIND identifier with its values.
    process = _spawn(
        [*launcher, "Orthanc", "--verbose", "--trace-dicom", "--no-jobs", str(config_path)],
        workdir,
        log_path,
    )
    pacs = RunningPacs("orthanc", ae_title, host, port, http_port, workdir, log_path, process)
    _wait_ready(pacs, lambda: _http_ok(f"http://{host}:{http_port}/system") and _tcp_ok(port, host))
    return pacs


# --- DCMTK storescp (a forward destination) ---------------------------------------------


def start_storescp(workdir: Path, ae_title: str = "DEST", implicit_only: bool = False,
                   tls: tuple[Path, Path, Path] | None = None) -> RunningPacs:
    """storescp writing every received instance under ``workdir/received``.

    Bit-preserving (``+B``): each file holds the data set exactly as it came
    over the wire, so a test can compare bytes with what was sent. Accepts
    every transfer syntax it knows (``+xa``), or only Implicit VR Little
    Endian (``+xi``): a destination that refuses compressed and explicit data.
    With `tls` (key, certificate, CA file), DICOM TLS only, a client
    certificate from that CA required (DCMTK's default with ``+tls``).
    Caveat: DCMTK 3.6.7 has no bind option, so it listens on all interfaces.
    """
    workdir = Path(workdir)
    received = workdir / "received"
    received.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log_path = workdir / "storescp.log"
    argv = ["storescp", "-v", "--aetitle", ae_title, "--max-pdu", str(MAX_PDU), "-od", str(received), "+B",
            "+xi" if implicit_only else "+xa", str(port)]
    if tls is not None:
        key, cert, ca = tls
        argv[1:1] = ["+tls", str(key), str(cert), "+cf", str(ca)]
    process = _spawn(argv, workdir, log_path)
    peer = RunningPacs("storescp", ae_title, "127.0.0.1", port, None, workdir, log_path, process)
    _wait_ready(peer, (lambda: _tcp_ok(port)) if tls is not None else (lambda: _echo_ok(ae_title, port)))
    return peer


# --- DCMTK dcmqrscp -------------------------------------------------------------------


def start_dcmqrscp(
    workdir: Path,
    ae_title: str = "DCMQRSCP",
    move_destinations: Mapping[str, tuple[str, int]] | None = None,
) -> RunningPacs:
    """dcmqrscp with one read-write storage area named `ae_title`.

    dcmqrscp rejects an association whose called AE title is not in its
    AETable, which is how tests provoke an A-ASSOCIATE-RJ.
    Caveat: DCMTK 3.6.7 has no bind option, so it listens on all interfaces.
    """
    workdir = Path(workdir)
    storage = workdir / "storage"
    storage.mkdir(parents=True, exist_ok=True)
    port = free_port()
    hosts = "\n".join(
        f"{_host_alias(aet)} = ({aet}, {host}, {dest_port})" for aet, (host, dest_port) in (move_destinations or {}).items()
    )
    config_path = workdir / "dcmqrscp.cfg"
    config_path.write_text(
        f"""NetworkTCPPort = {port}
MaxPDUSize = {MAX_PDU}
MaxAssociations = 32

HostTable BEGIN
{hosts}
HostTable END

VendorTable BEGIN
VendorTable END

AETable BEGIN
{ae_title} {storage} RW (1000, 4096mb) ANY
AETable END
""",
        encoding="utf-8",
    )
    log_path = workdir / "dcmqrscp.log"
    # -d prints each C-FIND request identifier, values included.
    process = _spawn(["dcmqrscp", "-d", "-c", str(config_path)], workdir, log_path)
    pacs = RunningPacs("dcmqrscp", ae_title, "127.0.0.1", port, None, workdir, log_path, process)
    _wait_ready(pacs, lambda: _echo_ok(ae_title, port))
    return pacs


def _host_alias(ae_title: str) -> str:
    # HostTable symbolic names must be plain identifiers.
    return "dest_" + "".join(c if c.isalnum() else "_" for c in ae_title.lower())


# --- pynetdicom qrscp -----------------------------------------------------------------


def start_qrscp(
    workdir: Path,
    ae_title: str = "QRSCP",
    move_destinations: Mapping[str, tuple[str, int]] | None = None,
) -> RunningPacs:
    """pynetdicom's qrscp app (``python -m pynetdicom qrscp``), unlimited PDU."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    dests = "\n".join(
        f"[{aet}]\n    address: {host}\n    port: {dest_port}\n" for aet, (host, dest_port) in (move_destinations or {}).items()
    )
    config_path = workdir / "qrscp.ini"
    # Absolute paths: qrscp joins relative ones onto its own package directory.
    config_path.write_text(
        f"""[DEFAULT]
    ae_title: {ae_title}
    port: {port}
    max_pdu: 0
    acse_timeout: 30
    dimse_timeout: 30
    network_timeout: 60
    bind_address: 127.0.0.1
    instance_location: {workdir / "instances"}
    database_location: {workdir / "instances.sqlite"}
    log_identifier: True

{dests}
""",
        encoding="utf-8",
    )
    log_path = workdir / "qrscp.log"
    shim = workdir / "nodelay-shim"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(_NODELAY_SHIM, encoding="utf-8")
    # -v sets pynetdicom's logger to INFO, where it prints each
    # "Find SCP Request Identifier" with its values.
    process = _spawn(
        [sys.executable, "-m", "pynetdicom", "qrscp", "-v", "-c", str(config_path)],
        workdir,
        log_path,
        pythonpath=shim,
    )
    pacs = RunningPacs("qrscp", ae_title, "127.0.0.1", port, None, workdir, log_path, process)
    _wait_ready(pacs, lambda: _echo_ok(ae_title, port))
    return pacs


# pynetdicom, unlike DCMTK and Orthanc, ignores TCP_NODELAY=1 and leaves Nagle
# on: every C-FIND answer from qrscp then waits ~40 ms for our delayed ACK
# (measured 52 ms per C-FIND instead of 3 ms). Python imports `sitecustomize`
# at start-up, so this shim, placed on qrscp's PYTHONPATH only, gives it the
# DCMTK behaviour without changing its command line.
_NODELAY_SHIM = """\
import os
import socket

if os.environ.get("TCP_NODELAY") == "1":
    def _nodelay(sock):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and sock.type == socket.SOCK_STREAM:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    _accept = socket.socket.accept
    _connect = socket.socket.connect

    def accept(self):
        conn, addr = _accept(self)
        _nodelay(conn)
        return conn, addr

    def connect(self, address):
        _nodelay(self)
        return _connect(self, address)

    socket.socket.accept = accept
    socket.socket.connect = connect
"""


# --- process plumbing -------------------------------------------------------------------


def _env(pythonpath: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    env["PYTHONUNBUFFERED"] = "1"  # qrscp's log must be readable while it runs
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(pythonpath), env.get("PYTHONPATH", "")) if p)
    return env


def _spawn(argv: list[str], workdir: Path, log_path: Path, pythonpath: Path | None = None) -> subprocess.Popen[bytes]:
    if shutil.which(argv[0]) is None and not Path(argv[0]).exists():
        raise PacsStartError(f"{argv[0]} is not installed (see /work/shared/TEST-PACS.md)")
    with log_path.open("ab") as log:
        return subprocess.Popen(
            argv,
            cwd=workdir,
            env=_env(pythonpath),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # own process group: stop() reaps forked children
        )


def _kill_group(process: subprocess.Popen[bytes]) -> None:
    try:
        pgid = os.getpgid(process.pid)
    except ProcessLookupError:
        process.wait()
        return
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            continue
        # Leader gone; forked children (dcmqrscp) may still hold the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, signal.SIGKILL)
        return


def _wait_ready(pacs: RunningPacs, probe: Callable[[], bool]) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if pacs.process.poll() is not None:
            pacs.stop()
            raise PacsStartError(
                f"{pacs.kind} exited with code {pacs.process.returncode} during start-up "
                f"(workdir {pacs.workdir}); log tail:\n{pacs.log_tail()}"
            )
        if probe():
            return
        time.sleep(0.05)
    pacs.stop()
    raise PacsStartError(
        f"{pacs.kind} {pacs.ae_title}@{pacs.host}:{pacs.port} not ready after "
        f"{STARTUP_TIMEOUT:g} s (workdir {pacs.workdir}); log tail:\n{pacs.log_tail()}"
    )


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1.0) as response:
            return bool(response.status == 200)
    except (urllib.error.URLError, OSError):
        return False


def _tcp_ok(port: int, host: str = "127.0.0.1") -> bool:
    try:
        with socket.create_connection((host, port), timeout=1.0):
            return True
    except OSError:
        return False


def _echo_ok(ae_title: str, port: int) -> bool:
    """C-ECHO with pynetdicom directly: readiness must not depend on code under test."""
    if not _tcp_ok(port):
        return False
    from pynetdicom import AE

    ae = AE(ae_title="MI2B2PROBE")
    ae.add_requested_context("1.2.840.10008.1.1")  # Verification
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 5
    ae.connection_timeout = 1
    assoc = ae.associate("127.0.0.1", port, ae_title=ae_title)
    if not assoc.is_established:
        return False
    try:
        status = assoc.send_c_echo()
        return bool(status and status.get("Status") == 0)
    finally:
        assoc.release()
