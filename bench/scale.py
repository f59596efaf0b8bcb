"""Benchmark: a queue of 200,000 studies costs what a queue of 1,000 does.

    python bench/scale.py [--requests N] [--reference-requests N] [--audit-rows N]
                          [--reference-audit-rows N] [--forwards N] [--reference-forwards N]
                          [--projects N] [--no-sqlite]

For each database (PostgreSQL at 127.0.0.1:5432 with trust auth, a database
created and dropped by the benchmark; then SQLite, for information) it builds
two sites in the same run, filled with SQL (multi-row INSERTs, not through the
services, so filling takes minutes):

  big:       200,000 scheduled retrievals across 50 projects, 2,000,000 audit rows
             (a valid keyed hash chain, so `audit verify` reads them all), and then
             200,000 scheduled forwards to one destination (each of a cached study),
  reference: 1,000 scheduled retrievals across 50 projects, 10,000 audit rows,
             then 1,000 scheduled forwards,

and measures on each

  - a scheduler tick (`schedule_once`, the whole tick a worker runs under the
    scheduling lock), median of 20; each tick starts up to `max_concurrent`
    retrievals, which are put back in the queue (outside the timing) so every
    tick sees the same queue;
  - one page of the request log API (`GET /api/v1/projects/P/requests/page`,
    filtered on a state, with its counts per state) through the FastAPI app
    in-process, p95 of 50 calls; the page holds PAGE_ROWS rows in both sites (the
    reference has 20 requests per project), alternately the first page and a
    later one (keyset on the id);
  - `mi2b2 audit verify` (the service it calls) on the big trail: rows per second;
  - once the forwards are added (after the figures above, which they leave as they
    were), a forward scheduler tick (`schedule_forwards`, the whole tick), best of 20;
    each starts up to the destination's `max_concurrent` forwards, put back in the
    queue outside the timing.

It prints the figures, `tick_growth: N`, `list_growth: N` and `forward_tick_growth: N`
(big over reference; target <= 2 each), `verify_rows_per_s: N`, the SQLite figures
(information), and ends with `ratio: N`, the largest growth on PostgreSQL.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

from fastapi.testclient import TestClient
from sqlalchemy import delete, insert, text, update
from sqlalchemy.orm import Session

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the suite's fresh_database and site blocks

from mi2b2.adapters.crypto.audit_key import read_key_file  # noqa: E402
from mi2b2.adapters.db.engine import transaction  # noqa: E402
from mi2b2.adapters.db.tables import AuditEvent, AuditHead, CachedStudy, PacsStart, Request  # noqa: E402
from mi2b2.api.app import create_app  # noqa: E402
from mi2b2.config import load_config  # noqa: E402
from mi2b2.domain.audit_chain import ChainedEvent, canonical_detail, canonical_time, event_hash  # noqa: E402
from mi2b2.domain.principal import SYSTEM, Principal, Role  # noqa: E402
from mi2b2.services.context import ServiceContext, build_context  # noqa: E402
from mi2b2.services.forward import schedule_forwards  # noqa: E402
from mi2b2.services.scheduler import schedule_once  # noqa: E402
from support.databases import fresh_database  # noqa: E402
from support.site import pacs_block, site_head  # noqa: E402

CHUNK = 5000
TICKS = 20
PAGES = 50
MRNS_PER_PROJECT = 10
STATE_FILTER = "scheduled"
PAGE_ROWS = 10
WARM_UP = 3


@dataclass(frozen=True)
class Figures:
    requests: int
    audit_rows: int
    fill_requests_s: float
    fill_audit_s: float
    tick_s: float  # median
    page_s: float  # p95
    verify_rows_per_s: float | None
    forwards: int
    fill_forwards_s: float
    forward_tick_s: float  # best of TICKS


def write_site(folder: Path, url: str, projects: int) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    blocks = []
    for p in range(projects):
        (folder / f"p{p:02d}.mrns").write_text("".join(f"M{p:02d}{m:04d}\n" for m in range(MRNS_PER_PROJECT)))
        blocks.append(textwrap.dedent(f"""
            [[projects]]
            id = "p{p:02d}"
            title = "Scale project {p}"
            irb = "2026P{p:06d}"
            expires = 2099-12-31
            mrn_file = "p{p:02d}.mrns"
            quota = "100 TiB"
            institutions = ["general"]
            members = [{{ login = "bench", role = "lead" }}]
        """))
    text_ = site_head(url, 11112) + pacs_block("main", "PACS", 11113, "default_max_concurrent = 5\n") + textwrap.dedent("""
        [[destinations]]
        id = "xnat"
        ae_title = "XNAT"
        host = "127.0.0.1"
        port = 11114
        max_concurrent = 5
    """) + "".join(blocks)
    path = folder / "mi2b2.toml"
    path.write_text(text_)
    return path


def fill_requests(ctx: ServiceContext, n: int, projects: int, rng: random.Random) -> float:
    started = time.perf_counter()
    base = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(n):
        p = i % projects
        rows.append(dict(
            kind="retrieve", batch_id=None, project_id=f"p{p:02d}", user_login="bench", pacs_id="main",
            patient_id=f"M{p:02d}{rng.randrange(MRNS_PER_PROJECT):04d}", study_uid=f"1.2.826.0.1.3680043.10.9.{i}",
            accession=f"A{i}", series_uids=[], priority=rng.randint(-2, 2), state="scheduled",
            waiting_reason="waiting for the scheduler", expected_instances=200, expected_bytes=100 * 2**20,
            received=0, failed=0, warnings=0, bytes=0, attempts=0, created_at=base + timedelta(seconds=i),
            cancel_requested=False,
        ))
    with ctx.engine.begin() as connection:
        for start in range(0, len(rows), CHUNK):
            connection.execute(insert(Request), rows[start:start + CHUNK])
    return time.perf_counter() - started


def fill_forwards(ctx: ServiceContext, n: int, projects: int, rng: random.Random) -> float:
    """``n`` forwards queued to the destination, each of a study in its project's cache (from PACS
    main, which tells the allow-list whose patient it is), as `add_forwards` leaves them."""
    started = time.perf_counter()
    base = datetime(2026, 2, 1, tzinfo=UTC)
    studies, forwards = [], []
    for i in range(n):
        p = i % projects
        patient, uid = f"M{p:02d}{rng.randrange(MRNS_PER_PROJECT):04d}", f"1.2.826.0.1.3680043.10.8.{i}"
        studies.append(dict(project_id=f"p{p:02d}", study_uid=uid, patient_id=patient, pacs_id="main",
                            instance_count=200, bytes=100 * 2**20))
        forwards.append(dict(
            kind="forward", batch_id=None, project_id=f"p{p:02d}", user_login="bench", destination_id="xnat",
            patient_id=patient, study_uid=uid, accession=f"F{i}", series_uids=[], priority=rng.randint(-2, 2),
            state="scheduled", waiting_reason="waiting for the scheduler", expected_instances=200,
            expected_bytes=100 * 2**20, received=0, failed=0, warnings=0, bytes=0, attempts=0,
            created_at=base + timedelta(seconds=i), cancel_requested=False,
        ))
    with ctx.engine.begin() as connection:
        for start in range(0, n, CHUNK):
            connection.execute(insert(CachedStudy), studies[start:start + CHUNK])
            connection.execute(insert(Request), forwards[start:start + CHUNK])
    return time.perf_counter() - started


def fill_audit(ctx: ServiceContext, n: int) -> float:
    """``n`` audit rows continuing the site's keyed chain, so verification reads every one."""
    started = time.perf_counter()
    key = read_key_file(ctx.config.audit_key_file())
    with ctx.engine.begin() as connection:
        seq, prev = connection.execute(text("SELECT seq, hash FROM audit_head WHERE id = 1")).one()
        at = canonical_time(datetime(2026, 1, 1, tzinfo=UTC))
        batch = []
        for _ in range(n):
            seq += 1
            event = ChainedEvent(seq, at, "bench", "127.0.0.1", "retrieve", "success", f"p{seq % 50:02d}", "main",
                                 f"M{seq % 50:02d}0001", f"1.2.826.0.1.3680043.10.9.{seq}",
                                 canonical_detail({"request": seq, "event": "requested"}), prev)
            prev = event_hash(event, key.secret_for(seq))
            batch.append({**event.__dict__, "hash": prev})
            if len(batch) == CHUNK:
                connection.execute(insert(AuditEvent), batch)
                batch = []
        if batch:
            connection.execute(insert(AuditEvent), batch)
        connection.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=seq, hash=prev))
    return time.perf_counter() - started


def _tick_times(ctx: ServiceContext, tick: Callable[[], list[int]], what: str,
                clear: Callable[[Session], None] = lambda _session: None) -> list[float]:
    """``tick`` timed WARM_UP + TICKS times, the same queue each time: what it started is put back."""
    times = []
    for i in range(WARM_UP + TICKS):
        started = time.perf_counter()
        ids = tick()
        if i >= WARM_UP:
            times.append(time.perf_counter() - started)
        if not ids:
            raise RuntimeError(f"the benchmark's {what} started nothing: the queue is not what it should be")
        with transaction(ctx.sessions) as session:
            session.execute(update(Request).where(Request.id.in_(ids)).values(
                state="scheduled", worker=None, started_at=None, attempts=0))
            clear(session)
    return times


def tick_median(ctx: ServiceContext) -> float:
    return statistics.median(_tick_times(ctx, lambda: schedule_once(ctx, "worker:bench").started, "tick",
                                         lambda session: session.execute(delete(PacsStart))))


def forward_tick_best(ctx: ServiceContext) -> float:
    return min(_tick_times(ctx, lambda: schedule_forwards(ctx, "worker:bench"), "forward tick"))


def vacuum(ctx: ServiceContext, kind: str) -> None:
    if kind == "postgres":  # what autovacuum does after a bulk load, done now so every run sees it
        with ctx.engine.connect().execution_options(isolation_level="AUTOCOMMIT") as connection:
            connection.execute(text("VACUUM ANALYZE"))
    # SQLite gets no ANALYZE: mi2b2 never runs it, and its statistics (one state over 200,000
    # rows) would lead SQLite's planner to scan the table for the few running requests.


def page_p95(ctx: ServiceContext, token: str, project: str) -> float:
    client = TestClient(create_app(ctx))
    headers = {"Authorization": f"Bearer {token}"}
    path = f"/api/v1/projects/{project}/requests/page?state={STATE_FILTER}&limit={PAGE_ROWS}"
    times = []
    before = None
    for _ in range(WARM_UP):
        client.get(path, headers=headers)
    for i in range(PAGES):
        # Alternate the first page and a later one (keyset): both must stay cheap.
        url = path if i % 2 == 0 or before is None else f"{path}&before={before}"
        started = time.perf_counter()
        response = client.get(url, headers=headers)
        times.append(time.perf_counter() - started)
        if response.status_code != 200:
            raise RuntimeError(f"request log page: HTTP {response.status_code} {response.text[:300]}")
        answer = response.json()
        if i == 0:
            if len(answer["rows"]) != PAGE_ROWS or answer["state_counts"].get(STATE_FILTER, 0) == 0:
                raise RuntimeError(f"request log page is empty: {json.dumps(answer)[:300]}")
            before = answer["next_before"]
    return statistics.quantiles(times, n=20)[-1]


def measure(kind: str, folder: Path, requests: int, audit_rows: int, forwards: int, projects: int,
            verify: bool) -> Figures:
    rng = random.Random(15)
    with fresh_database(kind, folder) as url:
        ctx = build_context(load_config(write_site(folder, url, projects)), migrate=True, sync_config=True)
        try:
            ctx.accounts.add_user(SYSTEM, "bench", "researcher", "bench-password-1")
            token = ctx.accounts.create_token(SYSTEM, "bench", "bench", days=1).secret
            fill_r = fill_requests(ctx, requests, projects, rng)
            fill_a = fill_audit(ctx, audit_rows)
            vacuum(ctx, kind)
            tick = tick_median(ctx)
            page = page_p95(ctx, token, f"p{min(7, projects - 1):02d}")
            rate = None
            if verify:
                started = time.perf_counter()
                verdict = ctx.audit.verify(Principal("bench-auditor", Role.AUDITOR))
                elapsed = time.perf_counter() - started
                if not verdict.ok:
                    raise RuntimeError(f"the benchmark's audit chain does not verify: {verdict.problem}")
                rate = audit_rows / elapsed
            fill_f = fill_forwards(ctx, forwards, projects, rng)
            vacuum(ctx, kind)
            forward_tick = forward_tick_best(ctx)
            return Figures(requests, audit_rows, fill_r, fill_a, tick, page, rate, forwards, fill_f, forward_tick)
        finally:
            ctx.engine.dispose()


def run(kind: str, args: argparse.Namespace, root: Path) -> tuple[Figures, Figures]:
    reference = measure(kind, root / f"{kind}-reference", args.reference_requests, args.reference_audit_rows,
                        args.reference_forwards, args.projects, verify=False)
    big = measure(kind, root / f"{kind}-big", args.requests, args.audit_rows, args.forwards, args.projects,
                  verify=True)
    return reference, big


def report(kind: str, reference: Figures, big: Figures) -> tuple[float, float, float]:
    tick_growth = big.tick_s / reference.tick_s
    list_growth = big.page_s / reference.page_s
    forward_growth = big.forward_tick_s / reference.forward_tick_s
    for name, f in (("reference", reference), ("big", big)):
        print(f"{kind} {name}: {f.requests} requests, {f.audit_rows} audit rows; filled in "
              f"{f.fill_requests_s:.1f} s (requests) + {f.fill_audit_s:.1f} s (audit); "
              f"tick median {f.tick_s * 1000:.2f} ms; request log page p95 {f.page_s * 1000:.2f} ms")
        print(f"{kind} {name}: {f.forwards} forwards; filled in {f.fill_forwards_s:.1f} s; "
              f"forward tick best {f.forward_tick_s * 1000:.2f} ms")
    prefix = "" if kind == "postgres" else "sqlite_"
    print(f"{prefix}tick_growth: {tick_growth:.2f}")
    print(f"{prefix}list_growth: {list_growth:.2f}")
    print(f"{prefix}forward_tick_growth: {forward_growth:.2f}")
    if big.verify_rows_per_s is not None:
        print(f"{prefix}verify_rows_per_s: {big.verify_rows_per_s:.0f}")
    return tick_growth, list_growth, forward_growth


def main(argv: list[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--requests", type=int, default=200_000)
    parser.add_argument("--reference-requests", type=int, default=1_000)
    parser.add_argument("--audit-rows", type=int, default=2_000_000)
    parser.add_argument("--reference-audit-rows", type=int, default=10_000)
    parser.add_argument("--forwards", type=int, default=200_000)
    parser.add_argument("--reference-forwards", type=int, default=1_000)
    parser.add_argument("--projects", type=int, default=50)
    parser.add_argument("--no-sqlite", action="store_true", help="PostgreSQL only")
    parser.add_argument("--no-postgres", action="store_true", help="SQLite only (the figures are then information)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="mi2b2-scale-") as tmp:
        root = Path(tmp)
        growths: tuple[float, ...] | None = None
        if not args.no_postgres:
            growths = report("postgres", *run("postgres", args, root))
        if not args.no_sqlite:
            sqlite = report("sqlite", *run("sqlite", args, root))
            growths = growths or sqlite
    assert growths is not None, "nothing measured: drop --no-postgres or --no-sqlite"
    ratio = max(growths)
    print(f"ratio: {ratio:.2f}")
    return ratio


if __name__ == "__main__":
    sys.exit(0 if main() > 0 else 1)
