"""`mi2b2 receiver --processes 2`: two real receiver processes on one port (SO_REUSEPORT).

Against a real Orthanc sending by C-MOVE, with the worker in this process and
the receivers as `mi2b2 receiver` processes on PostgreSQL: associations land
in both children, a retrieval stores every instance once, a child killed in
the middle of a transfer is replaced and leaves no partial or duplicate file
(the retrieval, retried, completes), SIGHUP and SIGTERM reach every child,
and a port held by another user's process is one clear error.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from sqlalchemy import select

from mi2b2.adapters.db.tables import Worker as WorkerRow
from mi2b2.adapters.db.tables import WorkerKind
from mi2b2.config import load_config
from mi2b2.domain.requests import RequestState
from mi2b2.errors import InvalidInput
from mi2b2.runtime import background
from mi2b2.services.context import build_context
from mi2b2.services.requests import StudyPick, add_requests, retry_requests
from mi2b2.synthetic import SyntheticStudy, write_study
from support import studies
from support.databases import fresh_database, postgres_available
from support.pacs import RunningPacs, free_port, start_orthanc
from support.pipeline import ALICE, Pipeline, by_sop, cache_files, retrieval_site, same_instance
from support.site import pacs_block

pytestmark = [pytest.mark.pacs,
              pytest.mark.skipif(not postgres_available(), reason="needs PostgreSQL on 127.0.0.1:5432")]

# Long enough (400 instances) that a receiver can be killed while Orthanc is still sending it.
LONG = SyntheticStudy(patient_id="000123", patient_name="TEST^LONG", birth_date="19700101", sex="F",
                      accession="ACC-LONG", study_date="20240101", modality="MR", description="MR long study",
                      series_count=4, instances_per_series=100, rows=64, cols=64)
SHORT = [studies.BRAIN, studies.TRAUMA, *studies.MANY]
RETRIES = """
    [institutions.departments.pacs.retries]
    max_attempts = 3
    first_delay = 0.5
    max_delay = 1.0
"""


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningPacs, int, dict[str, list[Path]]]]:
    receiver_port = free_port()
    running = start_orthanc(tmp_path_factory.mktemp("orthanc"), move_destinations={"MI2B2": ("127.0.0.1", receiver_port)})
    try:
        folder = tmp_path_factory.mktemp("originals")
        written = {studies.uid(s): write_study(s, folder) for s in [*SHORT, LONG]}
        running.load([f for files in written.values() for f in files])
        yield running, receiver_port, written
    finally:
        running.stop()


class Receivers:
    """`mi2b2 receiver --processes N` as a real process (its own process group), its log in a file."""

    def __init__(self, site: Path, processes: int) -> None:
        self.log = site.parent / "receivers.log"
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "mi2b2", "receiver", "--config", str(site), "--processes", str(processes)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**os.environ, "TCP_NODELAY": "1"})

    def wait_ready(self, timeout: float = 60) -> list[int]:
        """The children's pids, from the ready line."""
        deadline = time.monotonic() + timeout
        while True:
            found = re.search(r"mi2b2 receiver running on .*\(\d+ processes: ([\d, ]+)\)", self.text())
            if found:
                return [int(p) for p in found.group(1).split(", ")]
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"the receivers did not start:\n{self.text()}")
            time.sleep(0.1)

    def text(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")

    def children(self) -> list[int]:
        raw = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        return [int(p) for p in raw.split()]

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(5)
            raise AssertionError(f"the receivers did not stop on SIGTERM:\n{self.text()}") from None


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached within {timeout:g} s")
        time.sleep(0.01)


def _pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def _receiver_rows(pipe: Pipeline) -> set[int]:
    """Pids in the receivers' heartbeat rows (receiver:HOST:PID:...) of a fresh database."""
    with pipe.ctx.sessions() as session:
        ids = session.execute(select(WorkerRow.id).where(WorkerRow.kind == WorkerKind.RECEIVER)).scalars().all()
        return {int(i.split(":")[2]) for i in ids}


def _has_association(pid: int, port: int) -> bool:
    """Whether process `pid` holds an established TCP connection on local `port` (an association)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        if local_port == port and fields[3] == "01" and fields[9] in inodes:
            return True
    return False


def _echo(port: int) -> None:
    subprocess.run(["echoscu", "-aet", "ORTHANC", "-aec", "MI2B2", "127.0.0.1", str(port)], check=True,
                   capture_output=True, timeout=30, env={**os.environ, "TCP_NODELAY": "1"})


def _site(tmp_path: Path, url: str, orthanc: RunningPacs, port: int) -> Path:
    return retrieval_site(tmp_path / "site", port, pacs_block("main", orthanc.ae_title, orthanc.port,
                                                              'retrieve = "c-move"\n' + RETRIES),
                          database_url=url, allowed=["000123", "77", "PAT004"])


@contextmanager
def _two_receivers(tmp_path: Path, running: RunningPacs, port: int) -> Iterator[tuple[Path, Receivers, list[int]]]:
    """A site on a fresh PostgreSQL database, `mi2b2 receiver --processes 2` on it and the children's pids;
    the receivers must stop cleanly on SIGTERM at the end."""
    with fresh_database("postgres", tmp_path) as url:
        site = _site(tmp_path, url, running, port)
        receivers = Receivers(site, 2)
        try:
            yield site, receivers, receivers.wait_ready()
        finally:
            assert receivers.stop() == 0


def test_two_processes_share_the_port_and_store_every_instance_once(
        tmp_path: Path, orthanc: tuple[RunningPacs, int, dict[str, list[Path]]]) -> None:
    running, port, written = orthanc
    with _two_receivers(tmp_path, running, port) as (site, receivers, pids):
        assert len(set(pids)) == 2
        # The kernel spreads connections by their source port: a few suffice to reach both.
        for _ in range(64):
            _echo(port)
            if all(f"[{pid}]: association" in receivers.text() for pid in pids):
                break
        assert all(f"[{pid}]: association" in receivers.text() for pid in pids), receivers.text()
        with Pipeline(site, receiver=False) as pipe:
            assert _receiver_rows(pipe) == set(pids)  # each child keeps its own heartbeat
            ids = add_requests(pipe.ctx, ALICE, "alpha", "main", [StudyPick(studies.uid(s)) for s in SHORT]).created
            rows = pipe.wait(ids)
            assert {r.state for r in rows} == {RequestState.COMPLETED}, [(r.state, r.last_error) for r in rows]
            files = cache_files(pipe.ctx.config.cache_dir())
            originals = [f for s in SHORT for f in written[studies.uid(s)]]
            received = by_sop(files)
            assert len(files) == len(received) == len(originals)  # every instance, once
            assert all(same_instance(o, received[str(_sop(o))]) for o in originals[:3])
            # SIGHUP reaches every child (a reload), none dies of it
            receivers.process.send_signal(signal.SIGHUP)
            _wait_for(lambda: receivers.text().count("configuration reloaded on SIGHUP") == 2, 10, "both reloaded")
            assert receivers.children() == pids
    assert all(_pid_gone(pid) for pid in pids)
    assert not _listening(port)


def test_a_child_killed_mid_transfer_is_replaced_and_leaves_no_partial_file(
        tmp_path: Path, orthanc: tuple[RunningPacs, int, dict[str, list[Path]]]) -> None:
    running, port, written = orthanc
    with _two_receivers(tmp_path, running, port) as (site, receivers, pids), Pipeline(site, receiver=False) as pipe:
        ids = add_requests(pipe.ctx, ALICE, "alpha", "main", [StudyPick(studies.uid(LONG))]).created
        victim: list[int] = []

        def receiving() -> bool:
            victim.extend(pid for pid in pids if _has_association(pid, port))
            return bool(victim)

        _wait_for(receiving, 30, "an association from Orthanc")
        time.sleep(0.05)  # a few instances in
        os.kill(victim[0], signal.SIGKILL)
        _wait_for(lambda: len(set(receivers.children()) - set(pids)) == 1, 30, "the killed child replaced")
        assert "exited with signal SIGKILL; starting another" in receivers.text()
        incoming = pipe.ctx.config.cache_dir() / ".incoming"
        assert not any(incoming.glob(f"*-{victim[0]}/*")), "the killed child's temp files stayed"
        rows = pipe.wait(ids)
        if rows[0].state != RequestState.COMPLETED:
            # Orthanc answers the C-MOVE whose association was cut with 0xC000: ended, for the user to retry.
            assert rows[0].state in (RequestState.INCOMPLETE, RequestState.FAILED), rows[0].state
            retry_requests(pipe.ctx, ALICE, ids)
            rows = pipe.wait(ids)
        assert rows[0].state == RequestState.COMPLETED, rows[0].last_error
        originals = written[studies.uid(LONG)]
        files = cache_files(pipe.ctx.config.cache_dir())
        received = by_sop(files)
        assert len(files) == len(received) == len(originals)  # nothing twice
        assert all(same_instance(o, received[str(_sop(o))]) for o in originals)  # nothing cut short


@pytest.mark.parametrize("listens", [True, False], ids=["listening", "bound"])
def test_a_port_held_by_another_users_process_is_a_clear_error(tmp_path: Path, listens: bool) -> None:
    """Listening, the parent finds it before starting anything; only bound (with SO_REUSEPORT), the kernel
    refuses the children's bind, as it refuses port sharing across users."""
    if os.geteuid() != 0:
        pytest.skip("needs root to run the port's holder as another user")
    port = free_port()
    holder = subprocess.Popen(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c",
         "import socket,time\n"
         "s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)\n"
         f"s.bind(('127.0.0.1', {port}))\n"
         + ("s.listen()\n" if listens else "")
         + "print('ok', flush=True); time.sleep(60)"],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ok"
        site = retrieval_site(tmp_path / "site", port, pacs_block("main", "PACS", free_port()))
        result = subprocess.run([sys.executable, "-m", "mi2b2", "receiver", "--config", str(site), "--processes", "2"],
                                capture_output=True, text=True, timeout=60)
    finally:
        holder.kill()
        holder.wait()
    assert result.returncode == 2, result.stderr
    assert f"error: the DICOM receiver MI2B2 cannot listen on 127.0.0.1:{port}" in result.stderr
    assert "stop it or choose another receiver port" in result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    assert not _listening(port)  # no child left behind


def test_several_processes_with_the_receiver_inside_serve_are_refused(tmp_path: Path) -> None:
    site = retrieval_site(tmp_path / "site", free_port(), pacs_block("main", "PACS", free_port()),
                          dicom_extra="processes = 2")
    ctx = build_context(load_config(site))
    try:
        with pytest.raises(InvalidInput, match=r"set \[server\] receiver_process = true"), \
                background(ctx, receiver=True, worker=False, receiver_process=False):
            pass
    finally:
        ctx.engine.dispose()


def _listening(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


def _sop(path: Path) -> str:
    import pydicom

    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
