"""The project cache against SQLite and PostgreSQL: indexing, usage, deletion, fsck, and its API."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select, update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedInstance, CachedStudy, Request
from mi2b2.adapters.dicom.files import read_instance_header
from mi2b2.api.app import create_app
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied, InvalidInput, NotFound
from mi2b2.services import cache
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.synthetic import SyntheticStudy, write_study
from mi2b2.testing import FakeClock
from support import studies
from support.site import load_site
from support.viewing import serving

ALICE = Principal("alice", Role.RESEARCHER)  # lead of alpha, member of beta
BOB = Principal("bob", Role.RESEARCHER)  # researcher in alpha
CAROL = Principal("carol", Role.RESEARCHER)  # beta only (IRB expired)
ROOT = Principal("root", Role.ADMIN)
AUDITOR = Principal("audrey", Role.AUDITOR)
PASSWORD = "a long enough password"


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> ServiceContext:
    return build_context(load_site(tmp_path / "site", database_url=database_url), clock=FakeClock())


@pytest.fixture
def source(tmp_path: Path) -> Path:
    return tmp_path / "source"


def receive(ctx: ServiceContext, project: str, study: SyntheticStudy, source: Path, fetched_by: str = "alice",
            index: bool = True) -> list[str]:
    """What the receiver does per file: write to incoming, place, index in one transaction."""
    store = cache.cache_store(ctx)
    placed = []
    for file in write_study(study, source):
        header = read_instance_header(file)
        relative = store.relative_path(project, header.study_uid, header.series_uid, header.sop_instance_uid)
        temp = store.incoming_dir() / f"{header.sop_instance_uid}.part"
        shutil.copyfile(file, temp)
        size = store.place(temp, relative)
        if index:
            with transaction(ctx.sessions) as session:
                assert cache.index_instance(session, project, header, relative, size, ctx.clock.now(), fetched_by, "main")
        placed.append(relative)
    return placed


def add_request(ctx: ServiceContext, project: str, study_uid: str, state: str, expected: int = 0, received: int = 0,
                kind: str = "retrieve", patient: str = "000123") -> int:
    with transaction(ctx.sessions) as session:
        row = Request(kind=kind, project_id=project, user_login="alice", pacs_id="main", patient_id=patient,
                      study_uid=study_uid, state=state, expected_bytes=expected, bytes=received,
                      created_at=ctx.clock.now())
        session.add(row)
        session.flush()
        return row.id


def study_row(ctx: ServiceContext, project: str, study_uid: str) -> CachedStudy | None:
    with ctx.sessions() as session:
        return session.scalar(select(CachedStudy).where(CachedStudy.project_id == project,
                                                        CachedStudy.study_uid == study_uid))


# indexing -------------------------------------------------------------------


def test_index_instance_fills_the_study_and_is_idempotent(ctx: ServiceContext, source: Path) -> None:
    paths = receive(ctx, "alpha", studies.BRAIN, source)
    store = cache.cache_store(ctx)
    total = sum(store.absolute(p).stat().st_size for p in paths)
    row = study_row(ctx, "alpha", studies.uid(studies.BRAIN))
    assert row is not None
    assert (row.instance_count, row.bytes) == (6, total)
    assert (row.patient_id, row.accession, row.study_date, row.modalities) == ("000123", "ACC-1001", "20210305", "MR")
    assert row.fetched_by == "alice" and row.pacs_id == "main" and row.fetched_at is not None

    header = read_instance_header(store.absolute(paths[0]))
    with transaction(ctx.sessions) as session:
        again = cache.index_instance(session, "alpha", header, paths[0], 999, ctx.clock.now(), "bob", None)
    assert again is False
    row = study_row(ctx, "alpha", studies.uid(studies.BRAIN))
    assert row is not None and (row.instance_count, row.bytes, row.fetched_by) == (6, total, "alice")

    # the same study in another project is a separate cache entry
    receive(ctx, "beta", studies.BRAIN, source)
    beta = study_row(ctx, "beta", studies.uid(studies.BRAIN))
    assert beta is not None and beta.instance_count == 6


def test_concurrent_receivers_of_one_study_keep_exact_totals(ctx: ServiceContext, source: Path) -> None:
    """Two receivers index instances of the same new study at once (the study row is created by either)."""
    store = cache.cache_store(ctx)
    headers = [read_instance_header(f) for f in write_study(studies.BRAIN, source)]
    barrier = threading.Barrier(2)
    problems: list[BaseException] = []

    def receiver(share: list) -> None:  # type: ignore[type-arg]
        barrier.wait()
        try:
            for header in share:
                relative = store.relative_path("alpha", header.study_uid, header.series_uid, header.sop_instance_uid)
                with transaction(ctx.sessions) as session:
                    cache.index_instance(session, "alpha", header, relative, 1000, ctx.clock.now(), "alice", "main")
        except BaseException as exc:  # surfaced below
            problems.append(exc)

    threads = [threading.Thread(target=receiver, args=(headers[n::2],)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not problems
    row = study_row(ctx, "alpha", studies.uid(studies.BRAIN))
    assert row is not None and (row.instance_count, row.bytes) == (6, 6000)


# usage ------------------------------------------------------------------------


def test_usage_counts_the_cache_and_what_running_retrievals_still_reserve(ctx: ServiceContext, source: Path) -> None:
    receive(ctx, "alpha", studies.BRAIN, source)
    used = study_row(ctx, "alpha", studies.uid(studies.BRAIN)).bytes  # type: ignore[union-attr]
    add_request(ctx, "alpha", "1.2.3", "processing", expected=5_000_000, received=1_000_000)  # holds 4 MB more
    add_request(ctx, "alpha", "1.2.4", "processing", expected=1_000, received=9_000)  # beyond its estimate: 0
    add_request(ctx, "alpha", "1.2.5", "scheduled", expected=7_000_000)  # not started: the scheduler's concern
    add_request(ctx, "alpha", "1.2.6", "processing", expected=7_000_000, kind="forward")  # reads, never writes
    add_request(ctx, "beta", "1.2.7", "processing", expected=7_000_000)  # another project
    usage = cache.project_usage(ctx, BOB, "alpha")
    quota = 10 * 2**30
    assert (usage.quota_bytes, usage.used_bytes, usage.in_flight_bytes) == (quota, used, 4_000_000)
    assert usage.free_bytes == quota - used - 4_000_000 and not usage.over_quota
    assert usage.study_count == 1

    add_request(ctx, "alpha", "1.2.8", "processing", expected=quota)
    over = cache.project_usage(ctx, ALICE, "alpha")
    assert over.free_bytes == 0 and over.over_quota


# deleting -------------------------------------------------------------------------


def test_delete_frees_space_at_once_and_is_audited_per_study(ctx: ServiceContext, source: Path) -> None:
    brain = receive(ctx, "alpha", studies.BRAIN, source)
    receive(ctx, "alpha", studies.TRAUMA, source)
    before = cache.project_usage(ctx, BOB, "alpha")
    brain_bytes = study_row(ctx, "alpha", studies.uid(studies.BRAIN)).bytes  # type: ignore[union-attr]

    report = cache.delete_studies(ctx, BOB, "alpha", [studies.uid(studies.BRAIN), "1.2.3.999"])
    assert report.deleted == [studies.uid(studies.BRAIN)]
    assert report.not_found == ["1.2.3.999"]
    assert report.bytes_freed == brain_bytes
    assert report.usage.used_bytes == before.used_bytes - brain_bytes
    assert cache.project_usage(ctx, BOB, "alpha").used_bytes == before.used_bytes - brain_bytes
    store = cache.cache_store(ctx)
    assert not any(store.absolute(p).exists() for p in brain)
    assert [s.study_uid for s in cache.list_studies(ctx, BOB, "alpha")] == [studies.uid(studies.TRAUMA)]
    with ctx.sessions() as session:
        assert session.scalar(select(CachedInstance.id).join(CachedStudy).where(
            CachedStudy.study_uid == studies.uid(studies.BRAIN))) is None

    events = ctx.audit.list(AUDITOR, AuditFilter(action="delete"))
    assert [(e.actor, e.project_id, e.patient_id, e.study_uid) for e in events] == [
        ("bob", "alpha", "000123", studies.uid(studies.BRAIN))]
    with pytest.raises(NotFound, match="none of these studies"):
        cache.delete_studies(ctx, BOB, "alpha", [studies.uid(studies.BRAIN)])


def test_delete_is_refused_while_the_study_is_being_retrieved(ctx: ServiceContext, source: Path) -> None:
    receive(ctx, "alpha", studies.BRAIN, source)
    request_id = add_request(ctx, "alpha", studies.uid(studies.BRAIN), "processing", expected=10)
    with pytest.raises(InvalidInput, match=f"#{request_id}.*cancel those requests first"):
        cache.delete_studies(ctx, ALICE, "alpha", [studies.uid(studies.BRAIN)])
    assert study_row(ctx, "alpha", studies.uid(studies.BRAIN)) is not None
    with ctx.sessions.begin() as session:
        session.execute(update(Request).where(Request.id == request_id).values(state="canceled"))
    assert cache.delete_studies(ctx, ALICE, "alpha", [studies.uid(studies.BRAIN)]).deleted


def test_only_members_and_admins_see_and_delete_even_after_the_irb_expired(ctx: ServiceContext, source: Path) -> None:
    receive(ctx, "alpha", studies.TRAUMA, source)
    receive(ctx, "beta", studies.BRAIN, source)
    for attempt in (lambda: cache.list_studies(ctx, CAROL, "alpha"),
                    lambda: cache.project_usage(ctx, CAROL, "alpha"),
                    lambda: cache.study_detail(ctx, CAROL, "alpha", studies.uid(studies.TRAUMA)),
                    lambda: cache.delete_studies(ctx, CAROL, "alpha", [studies.uid(studies.TRAUMA)])):
        with pytest.raises(AccessDenied, match="not a member"):
            attempt()
    assert len(ctx.audit.list(AUDITOR, AuditFilter(action="denied", actor="carol"))) == 4
    assert study_row(ctx, "alpha", studies.uid(studies.TRAUMA)) is not None
    with pytest.raises(NotFound):
        cache.list_studies(ctx, CAROL, "nosuch")

    # beta's IRB expired: its members may still look and clean up
    assert [s.patient_id for s in cache.list_studies(ctx, CAROL, "beta")] == ["000123"]
    assert cache.delete_studies(ctx, CAROL, "beta", [studies.uid(studies.BRAIN)]).deleted
    # a site admin who is no member
    assert cache.project_usage(ctx, ROOT, "alpha").study_count == 1


def test_study_detail_counts_series_and_instances(ctx: ServiceContext, source: Path) -> None:
    receive(ctx, "alpha", studies.BRAIN, source)
    detail = cache.study_detail(ctx, BOB, "alpha", studies.uid(studies.BRAIN))
    assert detail.series_count == 3
    assert [s.instance_count for s in detail.series] == [2, 2, 2]
    assert sum(s.bytes for s in detail.series) == detail.study.bytes
    with pytest.raises(NotFound, match="mi2b2 cache list alpha"):
        cache.study_detail(ctx, BOB, "alpha", "1.2.3")


def test_delete_needs_uids(ctx: ServiceContext) -> None:
    with pytest.raises(InvalidInput, match="at least one"):
        cache.delete_studies(ctx, BOB, "alpha", [" "])
    with pytest.raises(InvalidInput, match="not StudyInstanceUIDs"):
        cache.delete_studies(ctx, BOB, "alpha", ["../../etc"])


# fsck ---------------------------------------------------------------------------


def _dead_pid() -> str:
    return subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_fsck_finds_each_kind_of_difference_and_repair_makes_it_clean(ctx: ServiceContext, source: Path) -> None:
    store = cache.cache_store(ctx)
    brain = receive(ctx, "alpha", studies.BRAIN, source)
    trauma = receive(ctx, "alpha", studies.TRAUMA, source)
    assert cache.fsck(ctx, ROOT).differences == 0

    store.absolute(brain[0]).unlink()  # missing file
    with store.absolute(trauma[0]).open("ab") as grown:  # still the same instance, more bytes
        grown.write(b"\0" * 10)
    store.absolute(trauma[1]).write_bytes(b"not DICOM any more")  # size differs and the instance is gone
    allowed = receive(ctx, "alpha", studies.BRAIN_FOLLOW_UP, source, index=False)  # orphans of an allowed patient
    off_list = receive(ctx, "alpha", studies.OFF_LIST, source, index=False)  # orphans of a patient not on the list
    stray = store.root / "alpha" / "notes.txt"
    stray.write_text("someone's notes")
    with ctx.sessions.begin() as session:  # a study total that drifted
        session.execute(update(CachedStudy).where(CachedStudy.study_uid == studies.uid(studies.BRAIN))
                        .values(instance_count=99))
    dead = store.root / ".incoming" / f"{store.host}-{_dead_pid()}"
    dead.mkdir(parents=True)
    (dead / "half.part").write_bytes(b"half a file")
    running = receive(ctx, "alpha", studies.SAME_DIGITS, source, index=False)  # arriving right now
    add_request(ctx, "alpha", studies.uid(studies.SAME_DIGITS), "processing", expected=100, patient="123")

    found = cache.fsck(ctx, ROOT)
    assert found.missing_files == [brain[0]]
    assert {(m.path, m.disk_bytes - m.indexed_bytes) for m in found.size_mismatches} >= {(trauma[0], 10)}
    assert {m.path for m in found.size_mismatches} == {trauma[0], trauma[1]}
    assert set(found.orphan_files) == {*allowed, *off_list, "alpha/notes.txt"}
    assert [(a.study_uid, a.indexed_instances, a.actual_instances) for a in found.wrong_aggregates] == [
        (studies.uid(studies.BRAIN), 99, 6)]
    assert found.stale_incoming == [f".incoming/{dead.name}/half.part"]
    assert set(found.being_received) == set(running)
    assert found.differences == 1 + 2 + len(allowed) + len(off_list) + 1 + 1 + 1
    assert "OFFLIST-9" not in str(found) and "TEST^" not in str(found)
    assert cache.fsck(ctx, ROOT).differences == found.differences  # checking changed nothing

    fixed = cache.fsck(ctx, ROOT, repair=True)
    assert fixed.rows_dropped == 2 and fixed.sizes_fixed == 1
    assert sorted(fixed.orphans_indexed) == sorted(allowed)
    assert set(fixed.files_deleted) == {trauma[1], *off_list, "alpha/notes.txt"}
    assert fixed.incoming_removed == 1
    assert not any(store.absolute(p).exists() for p in off_list) and not stray.exists() and not dead.exists()
    assert all(store.absolute(p).exists() for p in running)

    after = cache.fsck(ctx, ROOT)
    assert after.differences == 0, after
    follow_up = study_row(ctx, "alpha", studies.uid(studies.BRAIN_FOLLOW_UP))
    assert follow_up is not None and follow_up.instance_count == len(allowed) and follow_up.fetched_by == "root"
    brain_row = study_row(ctx, "alpha", studies.uid(studies.BRAIN))
    assert brain_row is not None and brain_row.instance_count == 5
    assert study_row(ctx, "alpha", studies.uid(studies.OFF_LIST)) is None

    deletions = ctx.audit.list(AUDITOR, AuditFilter(action="delete", patient_id="OFFLIST-9"))
    assert len(deletions) == 1 and '"security":true' in deletions[0].detail
    assert f'"files":{len(off_list)}' in deletions[0].detail
    checks = ctx.audit.list(AUDITOR, AuditFilter(action="cache_check"))
    assert [('"repair":true' in c.detail) for c in checks] == [False, False, False, True, False]


def test_fsck_is_for_admins(ctx: ServiceContext) -> None:
    with pytest.raises(AccessDenied, match="admin"):
        cache.fsck(ctx, ALICE)


def test_fsck_drops_a_study_whose_files_are_all_gone(ctx: ServiceContext, source: Path) -> None:
    store = cache.cache_store(ctx)
    receive(ctx, "alpha", studies.TRAUMA, source)
    shutil.rmtree(store.study_dir("alpha", studies.uid(studies.TRAUMA)))
    report = cache.fsck(ctx, ROOT, repair=True)
    assert len(report.missing_files) == 2 and report.empty_studies_removed == 1
    assert study_row(ctx, "alpha", studies.uid(studies.TRAUMA)) is None
    assert cache.fsck(ctx, ROOT).differences == 0


# the HTTP API ------------------------------------------------------------------


@pytest.fixture
def api(ctx: ServiceContext) -> TestClient:
    for login, role in (("alice", "researcher"), ("bob", "researcher"), ("carol", "researcher"), ("root", "admin")):
        ctx.accounts.add_user(ROOT, login, role, PASSWORD)
    return TestClient(create_app(ctx))


def _as(api: TestClient, login: str) -> TestClient:
    client = TestClient(api.app)
    response = client.post("/api/v1/auth/login", json={"login": login, "password": PASSWORD})
    assert response.status_code == 200, response.text
    return client


def test_cache_api(ctx: ServiceContext, api: TestClient, source: Path) -> None:
    receive(ctx, "alpha", studies.BRAIN, source)
    receive(ctx, "alpha", studies.TRAUMA, source)
    bob = _as(api, "bob")
    listing = bob.get("/api/v1/projects/alpha/cache").json()
    assert listing["usage"]["study_count"] == 2 and len(listing["studies"]) == 2
    assert {"fetched_by", "fetched_at", "last_downloaded_by", "last_downloaded_at"} <= set(listing["studies"][0])
    detail = bob.get(f"/api/v1/projects/alpha/cache/studies/{studies.uid(studies.BRAIN)}").json()
    assert detail["series_count"] == 3

    carol = _as(api, "carol")
    assert carol.get("/api/v1/projects/alpha/cache").status_code == 403
    refused = carol.post("/api/v1/projects/alpha/cache/delete", json={"study_uids": [studies.uid(studies.BRAIN)]})
    assert refused.status_code == 403 and "not a member" in refused.json()["error"]
    assert bob.post("/api/v1/projects/alpha/cache/delete", json={"study_uids": []}).status_code == 422

    deleted = bob.post("/api/v1/projects/alpha/cache/delete", json={"study_uids": [studies.uid(studies.BRAIN)]})
    assert deleted.status_code == 200 and deleted.json()["deleted"] == [studies.uid(studies.BRAIN)]
    assert bob.get("/api/v1/projects/alpha/cache").json()["usage"]["study_count"] == 1

    assert bob.post("/api/v1/admin/fsck").status_code == 403
    root = _as(api, "root")
    check = root.post("/api/v1/admin/fsck", params={"repair": "false"})
    assert check.status_code == 200 and check.json()["differences"] == 0
    assert check.json()["counts"]["orphan_files"] == 0


# the command line -----------------------------------------------------------------


@pytest.fixture
def live_server(ctx: ServiceContext) -> Iterator[str]:
    """The API on a free 127.0.0.1 port, in this process so it shares the test's context."""
    with serving(create_app(ctx)) as url:
        yield url


def mi2b2(*args: str) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "mi2b2", *args], capture_output=True, text=True, timeout=120,
                            check=False, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200"})
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def test_cache_commands(ctx: ServiceContext, live_server: str, source: Path) -> None:
    receive(ctx, "alpha", studies.BRAIN, source)
    receive(ctx, "alpha", studies.TRAUMA, source)
    ctx.accounts.add_user(ROOT, "bob", "researcher", PASSWORD)
    ctx.accounts.add_user(ROOT, "carol", "researcher", PASSWORD)
    bob = ctx.accounts.create_token(ROOT, "bob", "cli", 1).secret
    carol = ctx.accounts.create_token(ROOT, "carol", "cli", 1).secret
    common = ["--server", live_server, "--token", bob]

    usage = mi2b2("cache", "usage", "alpha", *common, "--format", "json")
    assert usage.returncode == 0, usage.stderr
    assert json.loads(usage.stdout)[0]["quota"] == "10.0 GiB"
    listed = mi2b2("cache", "list", "alpha", *common, "--format", "csv")
    assert listed.returncode == 0 and len(listed.stdout.strip().splitlines()) == 3
    assert listed.stdout.splitlines()[0].startswith("patient_id,accession,study_date")

    refused = mi2b2("cache", "delete", "alpha", studies.uid(studies.BRAIN), "--server", live_server, "--token", carol)
    assert refused.returncode == 2 and "not a member of the project" in refused.stderr
    deleted = mi2b2("cache", "delete", "alpha", studies.uid(studies.BRAIN), "1.2.3", *common)
    assert deleted.returncode == 0, deleted.stderr
    assert "deleted 1 study from alpha" in deleted.stdout and "not in the cache" in deleted.stderr
    assert study_row(ctx, "alpha", studies.uid(studies.BRAIN)) is None

    none = mi2b2("notifications", "--unread", *common)
    assert none.returncode == 0 and "no notifications unread" in none.stdout


def test_admin_fsck_command(ctx: ServiceContext, source: Path) -> None:
    assert ctx.config.source is not None
    config = str(ctx.config.source)
    trauma = receive(ctx, "alpha", studies.TRAUMA, source)
    assert mi2b2("admin", "fsck", "--config", config).returncode == 0

    cache.cache_store(ctx).absolute(trauma[0]).unlink()
    found = mi2b2("admin", "fsck", "--config", config)
    assert found.returncode == 1
    assert "1 indexed but missing on disk" in found.stdout and trauma[0] in found.stdout
    assert "mi2b2 admin fsck --repair" in found.stderr
    repaired = mi2b2("admin", "fsck", "--repair", "--config", config)
    assert repaired.returncode == 0 and "1 index rows dropped" in repaired.stdout
    assert mi2b2("admin", "fsck", "--config", config).returncode == 0
