"""Load: 50 API clients at once against a real `python -m mi2b2 serve` for a bounded time, while its worker
retrieves a 400-instance study from a real Orthanc into the cache.

The clients search the PACS, list requests, download a cached study as a streamed ZIP and read viewer
frames, each kind in turn. Every answer must be a 200 with the right kind of body: no 5xx, no refused or
dropped connection, no timeout. Governance may turn a search away with 429 or 503 only where the OpenAPI
document says the search can answer so (and never every search). Afterwards the retrieval has completed
with every instance in the cache. The p95 latency of each kind is printed (`pytest -s` shows it); the only
timing assertion is a generous bound that catches a server that stalls, not one that is slow."""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest

from mi2b2.api.app import create_app
from mi2b2.config import load_config
from mi2b2.services.context import build_context
from mi2b2.synthetic import SyntheticStudy, sop_instance_uid, study_instance_uid, write_study
from support import studies, summary
from support.pacs import RunningPacs, free_port, start_orthanc
from support.server import Mi2b2Server, start_server
from support.site import pacs_block, write_site
from support.viewing import ROOT, Cached, fill, serving

pytestmark = pytest.mark.pacs

CLIENTS = 50
DURATION = 20.0  # seconds of load
RETRIEVAL_TIMEOUT = 120.0  # the retrieval may finish after the load, but not never
# No one answer may take longer: a bound for a stalled server, not a performance target. A governed search may
# wait [search] wait_seconds (30 s by default) for a query slot before its C-FINDs.
STALL = 60.0
# What the worker retrieves during the load: 8 series of 50 small images of a patient on alpha's list.
RETRIEVED = SyntheticStudy(patient_id="MRN-0002", patient_name="LOAD^TWO", birth_date="19650505", sex="F",
                           accession="ACC-LOAD", study_date="20250101", modality="MR", description="load study",
                           series_count=8, instances_per_series=50, rows=32, cols=32)
SEARCH_MRNS = "000123\nMRN-0002\n77"


@dataclass
class Outcome:
    kind: str
    seconds: float
    status: int | None  # None: no answer at all
    problem: str = ""  # what was wrong with it, if anything


@dataclass
class Load:
    server: Mi2b2Server
    cached: Cached
    search_statuses: set[int]  # what the OpenAPI document says a study search may answer
    database: str
    outcomes: list[Outcome] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def record(self, outcome: Outcome) -> None:
        with self.lock:
            self.outcomes.append(outcome)


@pytest.fixture
def site(tmp_path: Path, database_url: str) -> Iterator[tuple[RunningPacs, Path, Cached]]:
    receiver_port = free_port()
    pacs = start_orthanc(tmp_path / "orthanc", move_destinations={"MI2B2": ("127.0.0.1", receiver_port)})
    try:
        pacs.load(write_study(RETRIEVED, tmp_path / "pacs") + write_study(studies.BRAIN, tmp_path / "pacs"))
        path = write_site(tmp_path / "site", pacs_blocks=pacs_block("main", pacs.ae_title, pacs.port),
                          database_url=database_url, dicom_port=receiver_port)
        path.write_text(path.read_text().replace(
            "[server]\n", f"[server]\nhttp_port = {free_port()}\nworker_poll_seconds = 0.2\n", 1))
        ctx = build_context(load_config(path))
        try:
            cached = fill(ctx, tmp_path / "files")  # alpha's cache: what downloads and frames read
        finally:
            ctx.engine.dispose()
        yield pacs, path, cached
    finally:
        pacs.stop()


# --- one client -----------------------------------------------------------------------------


def search(client: httpx.Client, load: Load) -> Outcome:
    response = client.post("/api/v1/search/studies", json={"project": "alpha", "pacs": "main", "mrns": SEARCH_MRNS})
    if response.status_code in (429, 503) and response.status_code in load.search_statuses:
        return Outcome("search", 0, response.status_code)  # governance turned it away, as documented
    uids = str(response.json()) if response.status_code == 200 else ""
    return Outcome("search", 0, response.status_code,
                   "" if study_instance_uid(RETRIEVED) in uids else f"no study found: {response.text[:200]}")


def request_list(client: httpx.Client, _load: Load) -> Outcome:
    response = client.get("/api/v1/projects/alpha/requests")
    ok = response.status_code == 200 and isinstance(response.json(), list)  # empty until the retrieval is asked for
    return Outcome("requests", 0, response.status_code, "" if ok else f"not a list: {response.text[:200]}")


def download(client: httpx.Client, _load: Load) -> Outcome:
    size = 0
    with client.stream("POST", "/api/v1/projects/alpha/download", json={"study_uids": [studies.uid(studies.BRAIN)]}) as response:
        head = b""
        for chunk in response.iter_bytes():
            head = head or chunk[:4]
            size += len(chunk)
    ok = response.status_code == 200 and head == b"PK\x03\x04" and size > 6 * 16 * 16
    return Outcome("download", 0, response.status_code, "" if ok else f"not a ZIP of the study: {size} bytes")


def frame(client: httpx.Client, _load: Load) -> Outcome:
    sop = sop_instance_uid(studies.BRAIN, 2, 1)
    response = client.get(f"/api/v1/projects/alpha/viewer/instances/{sop}/frames/1.png")
    ok = response.status_code == 200 and response.content.startswith(b"\x89PNG")
    return Outcome("frame", 0, response.status_code, "" if ok else f"not a PNG: {response.content[:100]!r}")


KINDS: list[Callable[[httpx.Client, Load], Outcome]] = [search, request_list, download, frame]


def client_loop(number: int, load: Load, until: float) -> None:
    login = ("alice", "bob")[number % 2]  # both members of alpha
    with httpx.Client(base_url=load.server.url, headers=load.cached.headers(login), timeout=STALL) as client:
        turn = number
        while time.monotonic() < until:
            act = KINDS[turn % len(KINDS)]
            turn += 1
            started = time.monotonic()
            try:
                outcome = act(client, load)
            except (httpx.HTTPError, ValueError) as error:  # ValueError: a body that is not the JSON it claims
                outcome = Outcome(act.__name__, 0, None, f"{type(error).__name__}: {error}")
            outcome.seconds = time.monotonic() - started
            load.record(outcome)


# --- the test -----------------------------------------------------------------------------------


def p95(values: list[float]) -> float:
    return statistics.quantiles(values, n=20, method="inclusive")[-1] if len(values) > 1 else values[0]


def test_fifty_clients_while_a_retrieval_runs(site: tuple[RunningPacs, Path, Cached], database_url: str) -> None:
    _pacs, path, cached = site
    server = start_server(path)
    try:
        admin = httpx.Client(base_url=server.url, headers=cached.headers("alice"), timeout=STALL)
        document = admin.get("/api/v1/openapi.json").json()
        search_statuses = {int(code) for code in document["paths"]["/api/v1/search/studies"]["post"]["responses"]
                           if code.isdigit()}
        load = Load(server, cached, search_statuses, database_url.split(':')[0].split('+')[0])
        # Asked for first: adding a request looks the study up in the PACS, and that C-FIND waits in the same
        # line for a query slot as the clients' searches (governance is first come, first served).
        added = admin.post("/api/v1/requests", json={"project": "alpha", "pacs": "main",
                                                     "studies": [{"study_uid": study_instance_uid(RETRIEVED)}]})
        assert added.status_code == 200, added.text
        until, load_ends = time.monotonic() + DURATION, datetime.now(UTC) + timedelta(seconds=DURATION)
        threads = [threading.Thread(target=client_loop, args=(n, load, until), daemon=True) for n in range(CLIENTS)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=DURATION + 2 * STALL)
        assert not any(thread.is_alive() for thread in threads), "a client never got its answer"

        state = wait_for_retrieval(admin)
        print_latencies(load, state)
        problems = [o for o in load.outcomes if o.status not in (200, 429, 503) or o.problem]
        assert not problems, f"{len(problems)} of {len(load.outcomes)} answers wrong, e.g.:\n" + "\n".join(
            f"{o.kind}: {o.status} {o.problem}" for o in problems[:10]) + f"\nserver log:\n{server.log_tail()}"
        by_kind = defaultdict(list)
        for outcome in load.outcomes:
            by_kind[outcome.kind].append(outcome)
        assert set(by_kind) == {"search", "requests", "download", "frame"}
        assert any(o.status == 200 for o in by_kind["search"]), "governance turned every search away"
        assert max(o.seconds for o in load.outcomes) < STALL
        assert state["state"] == "completed", state
        assert utc(state["started_at"]) < load_ends, "the retrieval did not run under load"
        assert count_cached(path, study_instance_uid(RETRIEVED)) == 8 * 50
        assert server.alive(), server.log_tail()
    finally:
        server.stop()


def wait_for_retrieval(client: httpx.Client) -> dict[str, object]:
    deadline = time.monotonic() + RETRIEVAL_TIMEOUT
    while True:
        listed = client.get("/api/v1/projects/alpha/requests").json()
        request = next(r for r in listed if r["study_uid"] == study_instance_uid(RETRIEVED))
        if request["state"] in ("completed", "incomplete", "failed", "canceled") or time.monotonic() > deadline:
            return dict(request)
        time.sleep(0.5)


def utc(text: object) -> datetime:
    moment = datetime.fromisoformat(str(text))
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def count_cached(site: Path, study_uid: str) -> int:
    return sum(1 for path in (site.parent / "cache" / "alpha" / study_uid).rglob("*") if path.is_file())


def print_latencies(load: Load, state: dict[str, object]) -> None:
    """The table goes to pytest's terminal summary (and, with -s, to the output at once)."""
    by_kind: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in load.outcomes:
        by_kind[outcome.kind].append(outcome)
    started, ended = utc(state["started_at"]), utc(state["ended_at"])
    lines = [f"{CLIENTS} clients for {DURATION:g} s on {load.database}; the retrieval of {state['received']} instances "
             f"ended {state['state']} after {(ended - started).total_seconds():.1f} s",
             f"{'kind':<10}{'answers':>9}{'non-200':>9}{'median s':>10}{'p95 s':>8}{'max s':>8}"]
    for kind, outcomes in sorted(by_kind.items()):
        seconds = [o.seconds for o in outcomes]
        lines.append(f"{kind:<10}{len(outcomes):>9}{sum(o.status != 200 for o in outcomes):>9}"
                     f"{statistics.median(seconds):>10.3f}{p95(seconds):>8.3f}{max(seconds):>8.3f}")
    print("\n" + "\n".join(lines))
    summary.report("load: latency per kind of request", *lines)


# --- searches waiting for a PACS leave the server's threads to everyone else ------------------------------


class StalledPacs:
    """A PACS whose every C-FIND waits until the test lets it answer (with nothing)."""

    def __init__(self) -> None:
        self.answer = threading.Event()

    @contextlib.contextmanager
    def open(self, _config: object, _pacs: object) -> Iterator[StalledPacs]:
        yield self

    def find(self, _model: str, _level: str, _keys: object) -> list[dict[str, str]]:
        self.answer.wait(timeout=STALL)
        return []


def test_searches_waiting_for_the_pacs_leave_threads_for_everyone_else(tmp_path: Path, database_url: str) -> None:
    """45 searches at once (more than the server's 40 worker threads) against a PACS that does not answer:
    two hold its query slots, the rest wait in line. Before, each held a worker thread while it waited, and
    nobody could log in, list requests or download until the PACS answered."""
    pacs = StalledPacs()
    ctx = build_context(load_config(write_site(tmp_path / "site", database_url=database_url)), open_find=pacs.open)
    ctx.accounts.add_user(ROOT, "alice", "researcher", None)
    token = ctx.accounts.create_token(ROOT, "alice", "tests").secret
    headers = {"Authorization": f"Bearer {token}"}
    with serving(create_app(ctx)) as url:
        def search_once() -> None:
            with contextlib.suppress(httpx.HTTPError):
                httpx.post(f"{url}/api/v1/search/studies", headers=headers, timeout=STALL,
                           json={"project": "alpha", "pacs": "main", "mrns": "000123"})

        searches = [threading.Thread(target=search_once, daemon=True) for _ in range(45)]
        try:
            for thread in searches:
                thread.start()
            time.sleep(2)  # every search sent and waiting
            started = time.monotonic()
            me = httpx.get(f"{url}/api/v1/auth/me", headers=headers, timeout=10)
            listed = httpx.get(f"{url}/api/v1/projects/alpha/requests", headers=headers, timeout=10)
            answered_in = time.monotonic() - started
        except httpx.TimeoutException:
            answered_in = float("inf")
            me = listed = None
        finally:
            pacs.answer.set()
            for thread in searches:
                thread.join(timeout=STALL)
            ctx.engine.dispose()
    assert answered_in < 10, "the server's threads were all waiting for the PACS"
    assert me is not None and listed is not None and me.status_code == listed.status_code == 200

