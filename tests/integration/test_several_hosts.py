"""mi2b2 across several hosts, with the PACS still protected.

Host A runs `mi2b2 serve` (the API) and HAProxy in TCP mode in front of the
receivers; hosts B and C each run `mi2b2 worker` and `mi2b2 receiver` as OS
processes; Orthanc runs on host D, behind a counting proxy that records what
the PACS sees; PostgreSQL is the machine's own, reached over the network. The
PACS sends its C-MOVE sub-operations to the balancer's address; the balancer
passes the PACS's own address on in a PROXY v2 header (``send-proxy-v2``), so
the receivers admit the PACS by its real address, not the balancer's.

The hosts are network namespaces on a bridge. Where the kernel refuses
namespaces, the same scenario runs with every process on this host (two
receivers on different 127.0.0.1 ports behind HAProxy, two workers, serve);
``MI2B2_TEST_HOSTS=one-host`` runs that variant here too.

One scenario, in three phases: ten projects share the PACS under a cap of 3
and a per-minute rate, in turns; host B dies (SIGKILL) mid-run and host C
takes its retrievals over once B's heartbeat is stale; every receiver stops
for a minute and the queue waits, saying why, until one is back. At the end
every study is complete, each instance is in the cache exactly once, and
`mi2b2 admin fsck` finds the index and the disk in agreement.

Every process runs the scheduler's clock 5 times faster than the wall (a
minute lasts 12 s), see ``support/scaled_command.py``.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import ssl
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import cache
from pathlib import Path

import httpx
import pytest
from sqlalchemy import func, select

from mi2b2.adapters.db.tables import CachedInstance, PacsStart, Request
from mi2b2.adapters.db.tables import Worker as WorkerRow
from mi2b2.config import load_config
from mi2b2.domain.clock import as_utc
from mi2b2.domain.health import worker_stale_after
from mi2b2.domain.principal import Principal, Role
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.requests import StudyPick, add_requests
from mi2b2.synthetic import SyntheticStudy, study_instance_uid, write_study
from mi2b2.testing import ScaledClock
from support.databases import fresh_database, postgres_available
from support.hosts import Hosts, NamespacesRefused, local_hosts, namespace_hosts
from support.pacs import RunningPacs, start_orthanc
from support.pipeline import cache_files
from support.pki import Pki, make_pki
from support.proxy import Proxy, most_within
from support.site import always_window, general_radiology, pacs_block

pytestmark = [
    pytest.mark.pacs,
    pytest.mark.postgres,
    pytest.mark.skipif(shutil.which("haproxy") is None, reason="Debian's haproxy is not installed"),
]

SPEED = 5.0  # scheduler seconds per wall second: a scheduler minute lasts 12 s
PER_MINUTE = 60
MAX_CONCURRENT = 3
LAG_SECONDS = 2.0  # how late the PACS may see a start the scheduler recorded
POLL_SECONDS = 0.3  # workers tick and receivers beat this often; stale after 30 scheduler seconds (6 s)
PROJECTS = [f"p{n:02d}" for n in range(10)]
PER_PROJECT = 30
ROOT = Path(__file__).resolve().parents[2]
ADMIN = Principal("root", Role.ADMIN)
HOSTS_ENV = "MI2B2_TEST_HOSTS"


def _study(n: int) -> SyntheticStudy:
    return SyntheticStudy(patient_id=f"MH{n:04d}", patient_name=f"MULTI^{n}", birth_date="19800101", sex="F",
                          accession=f"MH-{n}", study_date="20240101", modality="CR", description="several hosts",
                          series_count=1, instances_per_series=1, rows=8, cols=8)


STUDIES = [_study(n) for n in range(len(PROJECTS) * PER_PROJECT)]


def _project_studies(n: int) -> list[SyntheticStudy]:
    return STUDIES[n * PER_PROJECT:(n + 1) * PER_PROJECT]


@cache
def _why_not_namespaces() -> str | None:
    """Why the hosts cannot be network namespaces here, or None."""
    if shutil.which("socat") is None:
        return "socat, which carries the hosts' connections to PostgreSQL, is not installed (scripts/setup.sh does)"
    try:
        with namespace_hosts(["probe"]):
            return None
    except NamespacesRefused as refused:
        return f"this kernel refuses network namespaces ({refused})"


@pytest.fixture(params=["namespaces", "one-host"])
def hosts(request: pytest.FixtureRequest) -> Iterator[Hosts]:
    """Hosts A-D: network namespaces, or (where those are refused, or with MI2B2_TEST_HOSTS=one-host) this host."""
    forced = os.environ.get(HOSTS_ENV)
    names = ["a", "b", "c", "d"]
    if request.param == "namespaces":
        if forced == "one-host":
            pytest.skip(f"{HOSTS_ENV}=one-host: the scenario runs with every process on this host instead")
        reason = _why_not_namespaces()
        if reason is not None:
            pytest.skip(f"{reason}; the one-host variant runs instead")
        with namespace_hosts(names) as made:
            yield made
    else:
        if forced != "one-host" and _why_not_namespaces() is None:
            pytest.skip(f"network namespaces work here, so the scenario runs across hosts; {HOSTS_ENV}=one-host "
                        "runs this variant")
        with local_hosts(names) as made:
            yield made


# --- the site ---------------------------------------------------------------------------------


def _site(folder: Path, host: str, *, database_url: str, dicom: tuple[str, int], http: tuple[str, int],
          pacs: tuple[str, int], pacs_source: str, balancer_address: str, tls: Pki,
          serve_only: bool = False) -> Path:
    """The configuration of one host. Every host's file sits in the same folder, the volume they all
    mount, so the cache, MRN lists and audit key resolve to the same paths everywhere."""
    projects = ""
    for n, project in enumerate(PROJECTS):
        (folder / f"{project}.mrns").write_text("\n".join(s.patient_id for s in _project_studies(n)) + "\n")
        projects += textwrap.dedent(f"""
            [[projects]]
            id = "{project}"
            title = "several hosts {project}"
            irb = "IRB-MH-{n}"
            expires = 2099-12-31
            mrn_file = "{project}.mrns"
            quota = "1 GiB"
            institutions = ["general"]
            members = [{{ login = "alice", role = "lead" }}]
        """)
    text = textwrap.dedent(f"""
        [server]
        database_url = "{database_url}"
        cache_dir = "cache"
        http_host = "{http[0]}"
        http_port = {http[1]}
        tls_cert = "{tls.server_cert}"
        tls_key = "{tls.server_key}"
        worker_poll_seconds = {POLL_SECONDS}
        run_worker = {str(not serve_only).lower()}
        run_receiver = {str(not serve_only).lower()}

        [dicom]
        ae_title = "MI2B2"
        host = "{dicom[0]}"
        port = {dicom[1]}
        # The balancer's connections begin with a PROXY header naming the sender.
        proxy_protocol_from = ["{balancer_address}"]
    """) + general_radiology() + pacs_block("main", "ORTHANC", pacs[1], f"""
        retrieve = "c-move"
        default_queries_per_second = 0
        # Where the PACS sends from: through the balancer, its PROXY header says so.
        addresses = ["{pacs_source}"]
    """, host=pacs[0]) + always_window(MAX_CONCURRENT, PER_MINUTE) + projects
    path = folder / f"{host}.toml"
    path.write_text(text)
    return path


HAPROXY = """\
global
    maxconn 200
    log stdout format raw local0 info
    stats socket {socket} mode 600 level admin
defaults
    mode tcp
    log global
    option tcplog
    # A receiver that just died is still "up" until its checks fail: a connection the balancer
    # could not make there goes to another receiver rather than failing the PACS's C-STORE.
    retries 2
    option redispatch 1
    timeout connect 2s
    timeout client 60s
    timeout server 60s
frontend dicom
    bind {address}:{port}
    default_backend receivers
backend receivers
    balance leastconn
    default-server check inter 300ms downinter 100ms fall 2 rise 1 send-proxy-v2
{servers}
"""


# --- processes --------------------------------------------------------------------------------


class Site:
    """The running processes of the scenario and the handles the checks need."""

    def __init__(self, hosts: Hosts, folder: Path, clock: ScaledClock) -> None:
        self.hosts = hosts
        self.folder = folder
        self.clock = clock
        self.env = {**os.environ, "PYTHONPATH": f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}",
                    "PYTHONUNBUFFERED": "1", "TCP_NODELAY": "1"}

    def mi2b2(self, host: str, name: str, *args: str) -> subprocess.Popen[bytes]:
        """`mi2b2 ARGS` on ``host``, its scheduler clock shared with the test's."""
        argv = [sys.executable, "-m", "support.scaled_command", str(SPEED), repr(self.clock.origin_monotonic),
                self.clock.start.isoformat(), "--", *args]
        return self.hosts.spawn(host, argv, self.folder / f"{name}.log", env=self.env, cwd=self.folder)

    def log(self, name: str, tail: int = 3000) -> str:
        """The end of a process's log, for a failure's message."""
        return self.full_log(name)[-tail:]

    def full_log(self, name: str) -> str:
        path = self.folder / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else "(no log)"

    def wait_log(self, process: subprocess.Popen[bytes], name: str, line: str, timeout: float = 60) -> None:
        # The whole log: a worker that started early may have logged many retrievals after its ready line
        # by the time the test looks.
        try:
            _until(lambda: line in self.full_log(name), timeout, f"{name} to say {line!r}",
                   lambda: process.poll() is None or f"{name} exited {process.returncode}:\n{self.log(name)}")
        except AssertionError as failure:
            raise AssertionError(f"{failure}\n{self.log(name)}") from None


def _until(condition: Callable[[], bool], timeout: float, what: str,
           alive: Callable[[], object] = lambda: True) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        state = alive()
        if state is not True:
            raise AssertionError(state)
        if time.monotonic() > deadline:
            raise AssertionError(f"waited {timeout:g} s for {what}")
        time.sleep(0.2)


def _servers_up(stats: Path) -> set[str]:
    """The receivers HAProxy routes to now, from its stats socket (a file: any namespace reaches it)."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(5)
            sock.connect(str(stats))
            sock.sendall(b"show servers state receivers\n")
            answer = b""
            while chunk := sock.recv(65536):
                answer += chunk
    except OSError:
        return set()
    rows = [line.split() for line in answer.decode().splitlines() if line and not line.startswith("#")]
    return {row[3] for row in rows if len(row) > 5 and row[5] == "2"}  # srv_name, srv_op_state 2: running


def _requests(ctx: ServiceContext) -> list[Request]:
    with ctx.sessions() as session:
        return list(session.execute(select(Request).order_by(Request.id)).scalars())


def _completed(ctx: ServiceContext) -> int:
    with ctx.sessions() as session:
        return int(session.execute(select(func.count()).select_from(Request)
                                   .where(Request.state == "completed")).scalar_one())


def _starts(ctx: ServiceContext) -> list[PacsStart]:
    with ctx.sessions() as session:
        return list(session.execute(select(PacsStart).order_by(PacsStart.id)).scalars())


# --- the scenario -----------------------------------------------------------------------------


def test_several_hosts_share_the_pacs_survive_a_dead_host_and_wait_for_receivers(
    hosts: Hosts, tmp_path: Path
) -> None:
    if not postgres_available():
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432; start it (scripts/test.sh does)")
    a, d = hosts["a"], hosts["d"]
    originals = tmp_path / "originals"
    files = [f for s in STUDIES for f in write_study(s, originals)]
    balancer_port = hosts.port()
    pacs = start_orthanc(tmp_path / "orthanc", move_destinations={"MI2B2": (a.address, balancer_port)},
                         host=d.address, launcher=d.launcher(),
                         extra={"RemoteAccessAllowed": a.address != "127.0.0.1"})
    forwarder: subprocess.Popen[bytes] | None = None
    proxy: Proxy | None = None
    try:
        pacs.load(files)
        proxy = Proxy(pacs.port, listen_host=hosts.root_address, target_host=pacs.host).start()
        with fresh_database("postgres", tmp_path) as local_url:
            database_url = local_url
            if hosts.kind == "namespaces":
                # PostgreSQL listens on 127.0.0.1 only: a forwarder the test owns carries the hosts'
                # connections from the bridge to it (trust auth holds: they arrive from 127.0.0.1).
                port = hosts.port()
                forwarder = subprocess.Popen(
                    ["socat", f"TCP-LISTEN:{port},bind={hosts.root_address},reuseaddr,fork", "TCP:127.0.0.1:5432"],
                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=(tmp_path / "socat.log").open("wb"))
                database_url = local_url.replace("127.0.0.1:5432", f"{hosts.root_address}:{port}")
            try:
                _scenario(hosts, tmp_path, pacs, proxy, local_url, database_url, balancer_port)
            finally:
                hosts.stop_all()  # while their database is still there
    finally:
        hosts.stop_all()
        if forwarder is not None:
            forwarder.terminate()
            forwarder.wait(10)
        if proxy is not None:
            proxy.down()
        pacs.stop()


def _scenario(hosts: Hosts, tmp_path: Path, pacs: RunningPacs, proxy: Proxy, local_url: str, database_url: str,
              balancer_port: int) -> None:
    a, b, c = hosts["a"], hosts["b"], hosts["c"]
    folder = tmp_path / "site"
    folder.mkdir()
    http = (a.address, hosts.port())
    receiver_ports = {"b": hosts.port(), "c": hosts.port()}
    tls = make_pki(tmp_path / "pki", (a.address,))  # the API answers other hosts over HTTPS only

    def host_site(name: str, dicom: tuple[str, int], http: tuple[str, int], serve_only: bool = False) -> Path:
        return _site(folder, name, database_url=database_url, dicom=dicom, http=http,
                     pacs=(hosts.root_address, proxy.port), pacs_source=hosts["d"].address,
                     balancer_address=a.address, tls=tls, serve_only=serve_only)

    site_a = host_site("a", (a.address, hosts.port()), http, serve_only=True)
    site_b = host_site("b", (b.address, receiver_ports["b"]), (b.address, hosts.port()))
    site_c = host_site("c", (c.address, receiver_ports["c"]), (c.address, hosts.port()))
    clock = ScaledClock(SPEED)
    site = Site(hosts, folder, clock)

    # The test's own view of the database (from the root namespace, as an operator's shell would be).
    config = load_config(site_a)
    config = config.model_copy(update={"server": config.server.model_copy(update={"database_url": local_url})})
    ctx = build_context(config, clock=clock)
    try:
        ctx.accounts.add_user(ADMIN, "alice", "researcher", None)
        token = ctx.accounts.create_token(ADMIN, "alice", "several hosts").secret
        alice = Principal("alice", Role.RESEARCHER)
        for n, project in enumerate(PROJECTS):
            picks = [StudyPick(study_instance_uid(s)) for s in _project_studies(n)]
            assert len(add_requests(ctx, alice, project, "main", picks).created) == PER_PROJECT
        proxy.reset()  # from here the proxy counts retrievals only

        # As an operator would: receivers, then the balancer in front of them, then the workers.
        receivers = {h: site.mi2b2(h, f"receiver-{h}", "receiver", "--config", str(s))
                     for h, s in (("b", site_b), ("c", site_c))}
        for h, process in receivers.items():
            site.wait_log(process, f"receiver-{h}", "mi2b2 receiver running")
        haproxy_cfg, stats = folder / "haproxy.cfg", folder / "haproxy.sock"
        haproxy_cfg.write_text(HAPROXY.format(address=a.address, port=balancer_port, socket=stats, servers="\n".join(
            f"    server {h} {hosts[h].address}:{port}" for h, port in receiver_ports.items())))
        checked = subprocess.run(["haproxy", "-c", "-f", str(haproxy_cfg)], capture_output=True, text=True, timeout=30)
        assert checked.returncode == 0, checked.stdout + checked.stderr
        hosts.spawn("a", ["haproxy", "-f", str(haproxy_cfg), "-db"], folder / "haproxy.log")
        _until(lambda: _servers_up(stats) == {"b", "c"}, 30, "the balancer to route to both receivers")
        serve = site.mi2b2("a", "serve-a", "serve", "--config", str(site_a))
        started_at = time.monotonic()
        workers = {h: site.mi2b2(h, f"worker-{h}", "worker", "--config", str(s)) for h, s in (("b", site_b), ("c", site_c))}
        for h, process in workers.items():
            site.wait_log(process, f"worker-{h}", "mi2b2 worker running")
        site.wait_log(serve, "serve-a", "mi2b2 serving on")
        api = httpx.Client(base_url=f"https://{http[0]}:{http[1]}/api/v1", timeout=30,
                           verify=ssl.create_default_context(cafile=str(tls.ca)),
                           headers={"Authorization": f"Bearer {token}"})

        # Phase 1: both hosts work; the PACS sees the cap and the rate, projects take turns.
        _until(lambda: _completed(ctx) >= 90, 120, "90 studies before host B dies",
               lambda: all(p.poll() is None for p in (*receivers.values(), *workers.values())) or "a process died")
        b_worker = f":{workers['b'].pid}:"
        with ctx.sessions() as session:
            before_kill = session.execute(select(func.max(PacsStart.id))).scalar_one()
            b_running = set(session.execute(select(Request.id).where(
                Request.state == "processing", Request.worker.contains(b_worker))).scalars())
        hosts.kill("b")  # host B dies: its worker and its receiver, mid-retrieval
        killed_at = time.monotonic()
        with ctx.sessions() as session:
            b_last_beat = session.execute(select(WorkerRow.heartbeat_at).where(
                WorkerRow.kind == "worker", WorkerRow.id.contains(b_worker))).scalar_one_or_none()

        # Phase 2: C alone. B's retrievals come back to the queue once its heartbeat is stale, and end on C.
        _until(lambda: _completed(ctx) >= 180, 150, "180 studies after host B died",
               lambda: workers["c"].poll() is None or f"worker C died:\n{site.log('worker-c')}")
        taken_over = [r for r in _requests(ctx) if r.id in b_running]
        _until(lambda: all(r.state == "completed" for r in _requests(ctx) if r.id in b_running), 60,
               "host B's retrievals to end on C")

        # Phase 3: every receiver stops; the queue waits and says why, and nothing fails for good.
        hosts.stop(receivers.pop("c"))
        stopped_at = time.monotonic()
        _until(lambda: not any(r.state == "processing" for r in _requests(ctx)), 60, "retrievals to drain")
        starts_when_drained = len(_starts(ctx))

        def waiting() -> list[str]:  # as users read them, through the API on host A
            rows = api.get(f"/projects/{PROJECTS[0]}/requests").json()
            return [r["waiting_reason"] or "" for r in rows if r["state"] == "scheduled"]

        assert waiting(), "phase 3 needs queued requests: raise PER_PROJECT or end phase 2 earlier"
        # A C-MOVE the stop cut short waits for its retry first (30 scheduler seconds), then says the same.
        _until(lambda: all("no mi2b2 receiver is running" in w for w in waiting()), 60 / SPEED,
               "the queue to name the missing receiver")
        reasons = waiting()
        if hosts.kind == "namespaces":
            assert all(f"on {c.hostname}" in w for w in reasons), reasons  # the receiver last seen
        time.sleep(max(0.0, 60 / SPEED - (time.monotonic() - stopped_at)))  # a scheduler minute without receivers
        assert len(_starts(ctx)) == starts_when_drained, "a C-MOVE started while no receiver was alive"
        assert not [(r.id, r.attempts, r.last_error) for r in _requests(ctx) if r.state == "failed"]
        site.wait_log(receivers.setdefault("c", site.mi2b2("c", "receiver-c2", "receiver", "--config", str(site_c))),
                      "receiver-c2", "mi2b2 receiver running")
        _until(lambda: _completed(ctx) == len(STUDIES), 150, "every study once a receiver is back",
               lambda: workers["c"].poll() is None or f"worker C died:\n{site.log('worker-c')}")
        took = time.monotonic() - started_at
        assert serve.poll() is None, site.log("serve-a")

        # What the PACS saw, what the scheduler recorded, what the cache holds.
        rows_end = _requests(ctx)
        assert {r.state for r in rows_end} == {"completed"}
        assert all(r.received == 1 and r.expected_instances == 1 for r in rows_end), \
            [(r.id, r.received, r.expected_instances) for r in rows_end if r.received != 1]
        assert proxy.seen.max_concurrent <= MAX_CONCURRENT
        starts = _starts(ctx)
        assert most_within([s.started_at.timestamp() for s in starts], 60) <= PER_MINUTE
        # A scheduler minute is 12 wall seconds; the PACS may see a start up to LAG_SECONDS late.
        assert proxy.starts_within(60 / SPEED - LAG_SECONDS) <= PER_MINUTE, sorted(proxy.seen.opened_at)
        first = [s.project_id for s in starts if s.id <= before_kill]
        assert first == (sorted(PROJECTS) * PER_PROJECT)[:len(first)], first  # every project in turn
        with ctx.sessions() as session:
            indexed = session.execute(select(CachedInstance.sop_instance_uid)).scalars().all()
        assert len(indexed) == len(set(indexed)) == len(STUDIES)
        on_disk = cache_files(folder / "cache")
        assert len(on_disk) == len(STUDIES), on_disk[:5]
        # What host B was running when it died started again on C, once B's heartbeat was stale
        # (another host cannot see B's processes; on one host, C sees B's pid gone at once).
        restarts: dict[int, datetime] = {}
        for start in starts:
            if start.id > before_kill and start.request_id in b_running:
                restarts.setdefault(start.request_id, as_utc(start.started_at))
        assert set(restarts) == b_running, (b_running, [(r.id, r.state, r.worker) for r in taken_over])
        if hosts.kind == "namespaces":
            assert b_last_beat is not None
            stale = as_utc(b_last_beat) + worker_stale_after(POLL_SECONDS)
            assert all(t >= stale for t in restarts.values()), (stale, restarts)
        fsck = subprocess.run(
            [sys.executable, "-m", "support.scaled_command", str(SPEED), repr(clock.origin_monotonic),
             clock.start.isoformat(), "--", "admin", "fsck", "--config", str(site_a)],
            capture_output=True, text=True, timeout=120, env=site.env, cwd=folder)
        assert fsck.returncode == 0 and "cache index and disk agree" in fsck.stdout, fsck.stdout + fsck.stderr
        # The receivers saw the PACS's own address (the PROXY header's), never the balancer's.
        seen = " ".join(site.full_log(name) for name in ("receiver-b", "receiver-c", "receiver-c2"))
        assert f"from ORTHANC at {hosts['d'].address} ended" in seen, seen[-3000:]
        if hosts.kind == "namespaces":
            assert f"from ORTHANC at {a.address} ended" not in seen
        print(f"{hosts.kind}: {len(STUDIES)} studies in {took:.0f} s; host B died {killed_at - started_at:.0f} s in, "
              f"{len(b_running)} of its retrievals taken over; {len(starts)} starts")
    finally:
        ctx.engine.dispose()


def test_the_readmes_receiver_balancer_block_is_valid(tmp_path: Path) -> None:
    block = re.search(r"```\n(defaults\n    mode tcp\n.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)
    assert block is not None, "README.md lost its HAProxy example for receivers"
    for line in ("option redispatch", "check inter", "balance leastconn", "send-proxy-v2"):
        assert line in block.group(1)
    config = tmp_path / "readme.cfg"
    config.write_text(block.group(1))
    checked = subprocess.run(["haproxy", "-c", "-f", str(config)], capture_output=True, text=True, timeout=30)
    assert checked.returncode == 0, checked.stdout + checked.stderr
