"""Governed searches, measured at the PACS.

A counting proxy sits between mi2b2 and a real Orthanc and reads every C-FIND
request on its way (tests/support/proxy.py): how many associations are open at
once, how many queries reach the PACS in any one second, and for which
identifier. Several service contexts share one database, as several server
and worker processes do; each has its own query governor, so only the
database coordinates them.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import pytest
from sqlalchemy import select

from mi2b2.adapters.db.tables import SearchJob
from mi2b2.config import load_config
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied, InvalidInput, NotFound
from mi2b2.services import search, search_jobs
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.scheduler import heartbeat
from support import studies
from support.pacs import RunningPacs, start_orthanc
from support.proxy import Proxy
from support.site import pacs_block, write_site

pytestmark = pytest.mark.pacs
ADMIN = Principal("root", Role.ADMIN)
ALICE = Principal("alice", Role.RESEARCHER)
BOB = Principal("bob", Role.RESEARCHER)
KNOWN = ["000123", "MRN-0002", "77", "PAT004"]  # allowed, first in every cohort
FOUND = {"000123", "77", "PAT004"}  # of those, the patients the PACS holds (support.studies)


def cohort(count: int) -> list[str]:
    """`count` allowed MRNs, the PACS's known patients among them."""
    return KNOWN + [f"C{i:07d}" for i in range(count - len(KNOWN))]


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPacs]:
    folder = tmp_path_factory.mktemp("orthanc")
    with start_orthanc(folder / "pacs") as pacs:
        pacs.load(studies.write_all(folder / "studies"))
        yield pacs


@pytest.fixture
def proxy(orthanc: RunningPacs) -> Iterator[Proxy]:
    running = Proxy(orthanc.port).start()
    yield running
    running.down()


def site(folder: Path, database_url: str, proxy: Proxy, orthanc: RunningPacs, limits: str,
         allowed: list[str], search_settings: str = "", members: str = "") -> Path:
    path = write_site(folder, database_url=database_url, allowed_a=allowed,
                      pacs_blocks=pacs_block("main", orthanc.ae_title, proxy.port, limits),
                      extra=f"\n[search]\n{search_settings}\n")
    if members:
        path.write_text(path.read_text().replace(
            'members = [{ login = "alice", role = "lead" }, { login = "bob" }]', members))
    return path


def contexts(path: Path, count: int) -> list[ServiceContext]:
    """`count` contexts on one database: as many processes, each with its own governor."""
    first = build_context(load_config(path))
    for login in ("alice", "bob", "dave"):
        first.accounts.add_user(ADMIN, login, "researcher", None)
    return [first] + [build_context(load_config(path), migrate=False, sync_config=False) for _ in range(count - 1)]


def run_worker(ctx: ServiceContext, worker_id: str, stop: threading.Event) -> None:
    """One worker process's share of the jobs: claim, run, until told to stop."""
    heartbeat(ctx, worker_id)
    while not stop.is_set():
        for job_id in search_jobs.claim_jobs(ctx, worker_id, 1):
            search_jobs.run_job(ctx, job_id, worker_id, stop.is_set)
        heartbeat(ctx, worker_id)
        time.sleep(0.05)


def job_state(ctx: ServiceContext, job_id: int) -> SearchJob:
    with ctx.sessions() as session:
        return session.get_one(SearchJob, job_id)


def test_two_users_5000_mrn_jobs_never_exceed_the_query_limits(
    tmp_path: Path, database_url: str, orthanc: RunningPacs, proxy: Proxy
) -> None:
    mrns = cohort(5000)
    path = site(tmp_path, database_url, proxy, orthanc,
                "default_max_concurrent_queries = 2\ndefault_queries_per_second = 400\n", mrns)
    ctx_a, ctx_b, ctx_c = contexts(path, 3)
    pasted = "\n".join([*mrns, "OFF-LIST-1", "OFF-LIST-2"])
    jobs = [search_jobs.submit(ctx_a, ALICE, "studies", "alpha", "main", pasted),
            search_jobs.submit(ctx_b, BOB, "patients", "alpha", "main", pasted)]
    assert all(isinstance(j, search_jobs.JobTicket) and j.total == 5000 for j in jobs)
    assert jobs[0].refused == ["OFF-LIST-1", "OFF-LIST-2"]

    stop = threading.Event()
    started = time.monotonic()
    # Two worker processes run the jobs while a third user's small searches run in between.
    workers = [threading.Thread(target=run_worker, args=(ctx, f"w{n}", stop)) for n, ctx in enumerate((ctx_a, ctx_b))]
    for worker in workers:
        worker.start()
    interactive = 0
    try:
        while any(job_state(ctx_c, j.job_id).state in search_jobs.ACTIVE for j in jobs):  # type: ignore[union-attr]
            assert time.monotonic() - started < 90, "the jobs did not finish in time"
            report = search.search_studies(ctx_c, ALICE, "alpha", "main", "000123\n77\nC0000001")
            assert {s.patient_id for s in report.studies} == {"000123", "77"}
            interactive += 3
            time.sleep(0.5)
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
    elapsed = time.monotonic() - started

    for ticket in jobs:
        job = job_state(ctx_c, ticket.job_id)  # type: ignore[union-attr]
        assert (job.state, job.done, job.total) == ("completed", 5000, 5000), job.error
    studies_found = search_jobs.job_results(ctx_a, ALICE, jobs[0].job_id)  # type: ignore[union-attr]
    assert {s["patient_id"] for s in studies_found["studies"]} == FOUND
    assert len(studies_found["not_found"]) == 5000 - len(FOUND)
    patients = search_jobs.job_results(ctx_b, BOB, jobs[1].job_id)  # type: ignore[union-attr]
    assert {p["patient_id"] for p in patients["patients"]} == FOUND

    # What the PACS saw: every identifier once per job, nothing refused, within both limits.
    seen = Counter(proxy.seen.find_keys)
    assert "OFF-LIST-1" not in seen and "OFF-LIST-2" not in seen
    assert all(seen[m] >= 2 for m in mrns)
    assert sum(seen.values()) == 2 * 5000 + interactive
    assert proxy.seen.max_concurrent <= 2
    assert 1 <= proxy.finds_within(1.0) <= 400, proxy.finds_within(1.0)
    assert elapsed >= (2 * 5000 + interactive) / 400  # the rate held: no burst made up for lost time


def test_small_searches_pass_the_same_limits(tmp_path: Path, database_url: str, orthanc: RunningPacs,
                                             proxy: Proxy) -> None:
    mrns = cohort(40)
    path = site(tmp_path, database_url, proxy, orthanc,
                "default_max_concurrent_queries = 1\ndefault_queries_per_second = 8\n", mrns)
    ctx_a, ctx_b = contexts(path, 2)
    errors: list[BaseException] = []

    def search_some(ctx: ServiceContext, who: Principal, values: list[str]) -> None:
        try:
            search.search_studies(ctx, who, "alpha", "main", "\n".join(values))
        except BaseException as exc:
            errors.append(exc)

    started = time.monotonic()
    threads = [threading.Thread(target=search_some, args=(ctx_a, ALICE, mrns[:12])),
               threading.Thread(target=search_some, args=(ctx_b, BOB, mrns[12:24]))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors
    assert len(proxy.seen.finds) >= 24
    assert proxy.seen.max_concurrent == 1  # the second search waited for the first's association
    assert proxy.finds_within(1.0) <= 8
    assert time.monotonic() - started >= (24 - 8) / 8


def test_a_closed_window_holds_jobs_while_small_searches_run_within_the_limits(
    tmp_path: Path, database_url: str, orthanc: RunningPacs, proxy: Proxy
) -> None:
    closed = ('\n[[institutions.departments.pacs.windows]]\nname = "clinical day"\nclosed = true\n'
              "max_concurrent_queries = 1\nqueries_per_second = 4\n")
    path = site(tmp_path, database_url, proxy, orthanc, closed, cohort(300), "job_threshold = 200\n")
    (ctx,) = contexts(path, 1)
    ticket = search_jobs.submit(ctx, ALICE, "studies", "alpha", "main", "\n".join(cohort(300)))
    assert isinstance(ticket, search_jobs.JobTicket)
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(ctx, "w", stop))
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while "clinical day" not in (job_state(ctx, ticket.job_id).waiting_reason or ""):
            assert time.monotonic() < deadline, "the job never said why it waits"
            time.sleep(0.1)
        started = time.monotonic()
        report = search.search_studies(ctx, ALICE, "alpha", "main", "\n".join(KNOWN))
        assert {s.patient_id for s in report.studies} == FOUND
        assert time.monotonic() - started >= 0.5  # paced at the window's 4 a second
    finally:
        stop.set()
        worker.join(30)
    assert job_state(ctx, ticket.job_id).state == "running" and job_state(ctx, ticket.job_id).done == 0
    assert sorted(proxy.seen.find_keys) == sorted(KNOWN)  # the small search only; the job sent nothing
    assert proxy.finds_within(1.0) <= 4


def test_a_list_too_long_is_refused_naming_the_fix(tmp_path: Path, database_url: str, orthanc: RunningPacs,
                                                   proxy: Proxy) -> None:
    path = site(tmp_path, database_url, proxy, orthanc, "", cohort(10), "max_identifiers = 500\n")
    (ctx,) = contexts(path, 1)
    huge = "\n".join(f"ACC{i}" for i in range(501))
    with pytest.raises(InvalidInput, match="501 accession numbers .* at most 500 .* split the list"):
        search_jobs.submit(ctx, ALICE, "accessions", "alpha", "main", huge)
    with ctx.sessions() as session:
        assert session.scalars(select(SearchJob)).all() == []
    assert proxy.seen.finds == []


def _run_until(ctx: ServiceContext, job_id: int, done_at_least: int) -> tuple[threading.Thread, threading.Event]:
    stop = threading.Event()
    worker = threading.Thread(target=run_worker, args=(ctx, "w", stop))
    worker.start()
    deadline = time.monotonic() + 30
    while job_state(ctx, job_id).done < done_at_least:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    return worker, stop


def test_cancel_stops_the_job_and_keeps_what_it_found(tmp_path: Path, database_url: str, orthanc: RunningPacs,
                                                      proxy: Proxy) -> None:
    mrns = cohort(1000)
    path = site(tmp_path, database_url, proxy, orthanc, "default_queries_per_second = 200\n", mrns,
                "job_batch = 50\n")
    ctx, other = contexts(path, 2)
    ticket = search_jobs.submit(ctx, ALICE, "studies", "alpha", "main", "\n".join(mrns))
    assert isinstance(ticket, search_jobs.JobTicket)
    with pytest.raises(NotFound):  # another user's job is no job of theirs
        search_jobs.cancel_job(other, Principal("dave", Role.RESEARCHER), ticket.job_id)
    worker, stop = _run_until(ctx, ticket.job_id, 100)
    try:
        status = search_jobs.cancel_job(other, ALICE, ticket.job_id)
        assert status["state"] == "canceled"
        time.sleep(1.0)
        queried = len(proxy.seen.finds)
        time.sleep(1.0)
        assert len(proxy.seen.finds) == queried  # nothing more reached the PACS
    finally:
        stop.set()
        worker.join(30)
    job = job_state(ctx, ticket.job_id)
    assert job.state == "canceled" and 100 <= job.done < 1000
    assert len(proxy.seen.finds) <= job.done + 50  # at most the batch that was running
    results = search_jobs.job_results(ctx, ALICE, ticket.job_id)
    assert {s["patient_id"] for s in results["studies"]} == FOUND  # the known ones came first


@pytest.mark.parametrize("change", ["removed from the project", "IRB expired"])
def test_a_job_stops_when_its_user_may_no_longer_search(tmp_path: Path, database_url: str, orthanc: RunningPacs,
                                                        proxy: Proxy, change: str) -> None:
    mrns = cohort(1000)
    path = site(tmp_path, database_url, proxy, orthanc, "default_queries_per_second = 200\n", mrns,
                "job_batch = 50\n")
    ctx, admin_ctx = contexts(path, 2)
    ticket = search_jobs.submit(ctx, BOB, "studies", "alpha", "main", "\n".join(mrns))
    assert isinstance(ticket, search_jobs.JobTicket)
    worker, stop = _run_until(ctx, ticket.job_id, 100)
    try:
        text = path.read_text()
        if change == "IRB expired":
            text = text.replace('expires = 2099-12-31\nmrn_file = "alpha.mrns"', 'expires = 2020-12-31\nmrn_file = "alpha.mrns"')
        else:
            text = text.replace(', { login = "bob" }', "")
        assert text != path.read_text()
        path.write_text(text)
        admin_ctx.reload_config(ADMIN)
        deadline = time.monotonic() + 30
        while job_state(ctx, ticket.job_id).state == "running":
            assert time.monotonic() < deadline
            time.sleep(0.05)
        queried = len(proxy.seen.finds)
        time.sleep(0.5)
        assert len(proxy.seen.finds) == queried
    finally:
        stop.set()
        worker.join(30)
    job = job_state(ctx, ticket.job_id)
    assert job.state == "canceled" and job.done < 1000
    expected = "IRB" if change == "IRB expired" else "not a member"
    assert expected in (job.error or ""), job.error
    assert len(proxy.seen.finds) <= job.done + 50
    with pytest.raises(AccessDenied):  # and the results are closed to him too
        search_jobs.job_results(ctx, BOB, ticket.job_id)
    details = [json.loads(e.detail) for e in ctx.audit.list(ADMIN, AuditFilter(actor="bob"))]
    assert any(d.get("search_job") == ticket.job_id and d.get("event") == "canceled" for d in details), details
