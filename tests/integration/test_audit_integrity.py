"""The audit trail cannot lose an action's rows or be rewritten unnoticed, on SQLite and PostgreSQL.

Attacks here use database access alone (plain SQL), as someone with the
database password but without the key file would."""

from __future__ import annotations

import hashlib
import json
import stat
from pathlib import Path

import pytest
from sqlalchemy import event, func, select, text
from typer.testing import CliRunner

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import AuditEvent, CachedStudy, Request, User
from mi2b2.cli.main import app
from mi2b2.config import load_config
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import ConfigError, InvalidInput
from mi2b2.services import cache
from mi2b2.services.audit import Action, AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.requests import StudyPick, add_requests
from mi2b2.testing import FakeClock, FakeFindSession
from support.site import write_site

ALICE = Principal("alice", Role.RESEARCHER)
ROOT = Principal("root", Role.ADMIN)
MANY = 300
STUDIES = [{"PatientID": "000123", "StudyInstanceUID": f"1.2.{n}", "AccessionNumber": f"A{n}",
            "NumberOfStudyRelatedInstances": "3"} for n in range(1, MANY + 1)]


@pytest.fixture
def site(tmp_path: Path, database_url: str) -> Path:
    return write_site(tmp_path / "site", database_url=database_url)


@pytest.fixture
def ctx(site: Path) -> ServiceContext:
    context = build_context(load_config(site), clock=FakeClock(),
                            open_find=lambda _c, _p: FakeFindSession(STUDIES))
    yield context
    context.engine.dispose()


def _fill(ctx: ServiceContext, events: int) -> None:
    for n in range(events):
        ctx.audit.record(ALICE, Action.QUERY, project_id="alpha", patient_id="000123", detail={"n": n})


def _rows(ctx: ServiceContext) -> list[AuditEvent]:
    with ctx.sessions() as session:
        return list(session.scalars(select(AuditEvent).order_by(AuditEvent.seq)))


def _count(ctx: ServiceContext, model: type, *where: object) -> int:
    with ctx.sessions() as session:
        return session.scalar(select(func.count()).select_from(model).where(*where)) or 0


# --- an action and its audit rows: both or neither ------------------------------------------


def _break_audit_writes(ctx: ServiceContext) -> None:
    """A trigger that makes every audit insert fail, as a full disk or a constraint would."""
    with ctx.engine.begin() as connection:
        if ctx.engine.dialect.name == "postgresql":
            connection.execute(text("CREATE FUNCTION audit_fails() RETURNS trigger AS $$ BEGIN "
                                    "RAISE EXCEPTION 'audit write failed'; END $$ LANGUAGE plpgsql"))
            connection.execute(text("CREATE TRIGGER audit_fails BEFORE INSERT ON audit_events "
                                    "FOR EACH ROW EXECUTE FUNCTION audit_fails()"))
        else:
            connection.execute(text("CREATE TRIGGER audit_fails BEFORE INSERT ON audit_events "
                                    "BEGIN SELECT RAISE(ABORT, 'audit write failed'); END"))


def test_a_failed_audit_write_rolls_the_action_back(ctx: ServiceContext) -> None:
    with transaction(ctx.sessions) as session:
        session.add(CachedStudy(project_id="alpha", study_uid="1.2.999", patient_id="000123", instance_count=1,
                                bytes=10, fetched_by="alice"))
    events_before = len(_rows(ctx))
    _break_audit_writes(ctx)

    with pytest.raises(Exception, match="audit write failed"):
        cache.delete_studies(ctx, ALICE, "alpha", ["1.2.999"])
    assert _count(ctx, CachedStudy, CachedStudy.study_uid == "1.2.999") == 1

    with pytest.raises(Exception, match="audit write failed"):
        add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.2.1"), StudyPick("1.2.2")])
    assert _count(ctx, Request) == 0

    with pytest.raises(Exception, match="audit write failed"):
        ctx.accounts.add_user(ROOT, "mallory", "admin", "a long enough password")
    assert _count(ctx, User, User.login == "mallory") == 0
    assert len(_rows(ctx)) == events_before


def test_a_request_for_many_studies_writes_its_audit_rows_in_one_transaction(ctx: ServiceContext) -> None:
    commits: list[int] = []
    head_updates: list[str] = []

    def on_execute(conn, _cursor, statement, _params, _context, _many) -> None:  # type: ignore[no-untyped-def]
        words = statement.lstrip().upper()
        if words.startswith("UPDATE AUDIT_HEAD"):
            head_updates.append(statement)
        if words.startswith(("INSERT INTO REQUESTS", "INSERT INTO AUDIT_EVENTS", "UPDATE AUDIT_HEAD")):
            conn.info["wrote requests or audit"] = True

    def on_commit(conn) -> None:  # type: ignore[no-untyped-def]
        # The query governor commits its own lease and rate rows during the PACS look-up; only
        # transactions that wrote requests or audit rows count here.
        if conn.info.pop("wrote requests or audit", False):
            commits.append(1)

    event.listen(ctx.engine, "before_cursor_execute", on_execute)
    event.listen(ctx.engine, "commit", on_commit)
    try:
        report = add_requests(ctx, ALICE, "alpha", "main", [StudyPick(s["StudyInstanceUID"]) for s in STUDIES])
    finally:
        event.remove(ctx.engine, "before_cursor_execute", on_execute)
        event.remove(ctx.engine, "commit", on_commit)
    assert len(report.created) == MANY
    assert len(head_updates) == 1, "the head is updated once for the whole batch"
    assert len(commits) == 1, "the requests and their audit rows commit together, once"
    requested = [e for e in _rows(ctx) if e.action == "retrieve" and '"event":"requested"' in e.detail]
    assert len(requested) == MANY
    assert sorted(json.loads(e.detail)["request"] for e in requested) == sorted(report.created)
    assert ctx.audit.verify(ROOT).ok


# --- the keyed chain, attacked with database access alone --------------------------------------


def _plain_sha256(row: dict[str, object], prev_hash: str) -> str:
    """What an attacker without the key computes: the documented canonical row, plain SHA-256."""
    fields = [row["seq"], row["occurred_at"], row["actor"], row["client"], row["action"], row["outcome"],
              row["project_id"], row["pacs_id"], row["patient_id"], row["study_uid"], row["detail"], prev_hash]
    return hashlib.sha256(json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode()).hexdigest()


def _rewrite_from(ctx: ServiceContext, first: int, new_detail: str) -> None:
    """Edit row ``first`` and recompute every hash from there on, then move the head: plain SQL only."""
    with ctx.engine.begin() as connection:
        rows = [dict(r._mapping) for r in connection.execute(text("SELECT * FROM audit_events ORDER BY seq"))]
        prev = next(r["hash"] for r in rows if r["seq"] == first - 1) if first > 1 else "0" * 64
        for row in rows:
            if row["seq"] < first:
                continue
            if row["seq"] == first:
                row["detail"] = new_detail
            digest = _plain_sha256(row, prev)
            connection.execute(text("UPDATE audit_events SET detail = :d, prev_hash = :p, hash = :h WHERE seq = :s"),
                               {"d": row["detail"], "p": prev, "h": digest, "s": row["seq"]})
            prev = digest
        connection.execute(text("UPDATE audit_head SET hash = :h WHERE id = 1"), {"h": prev})


def test_a_rewrite_with_database_access_alone_is_found_at_its_first_row(ctx: ServiceContext, site: Path) -> None:
    _fill(ctx, 6)
    rows = _rows(ctx)
    assert ctx.audit.verify(ROOT).ok
    target = rows[2].seq
    _rewrite_from(ctx, target, '{"n":"nothing to see"}')

    verdict = ctx.audit.verify(ROOT)
    assert not verdict.ok and verdict.bad_seq == target and "keyed hash" in verdict.problem

    result = CliRunner().invoke(app, ["audit", "verify", "--config", str(site)])
    assert result.exit_code == 1
    assert f"BROKEN at row {target}" in result.output


def test_deleting_the_newest_rows_and_moving_the_head_back_contradicts_a_checkpoint(ctx: ServiceContext) -> None:
    _fill(ctx, 5)
    signed = ctx.audit.checkpoint()
    assert signed is not None
    keep = signed.seq - 3
    with ctx.engine.begin() as connection:
        kept_hash = connection.execute(text("SELECT hash FROM audit_events WHERE seq = :s"), {"s": keep}).scalar_one()
        connection.execute(text("DELETE FROM audit_events WHERE seq > :s"), {"s": keep})
        connection.execute(text("UPDATE audit_head SET seq = :s, hash = :h WHERE id = 1"), {"s": keep, "h": kept_hash})

    verdict = ctx.audit.verify(ROOT)
    assert not verdict.ok
    assert verdict.problem.startswith("the checkpoint written at") and f"names row {signed.seq}" in verdict.problem
    # verify's own audit row (AUDIT_READ) was appended at keep + 1, so the trail is checked up to there.
    assert verdict.bad_seq == keep + 2


def test_an_edited_checkpoint_line_fails_its_signature(ctx: ServiceContext, site: Path) -> None:
    _fill(ctx, 3)
    first = ctx.audit.checkpoint()
    _fill(ctx, 1)
    second = ctx.audit.checkpoint()
    assert first is not None and second is not None and second.seq > first.seq
    path = load_config(site).audit_checkpoint_file()
    lines = path.read_text().splitlines()
    assert len(lines) == 2
    assert ctx.audit.verify(ROOT).ok

    forged = json.loads(lines[1])
    forged["seq"] = first.seq  # as if the trail had ended earlier
    path.write_text(lines[0] + "\n" + json.dumps(forged) + "\n")
    verdict = ctx.audit.verify(ROOT)
    assert not verdict.ok and "checkpoint line 2" in verdict.problem and "signature" in verdict.problem


def test_checkpoints_are_appended_and_never_rewritten(ctx: ServiceContext, site: Path) -> None:
    path = load_config(site).audit_checkpoint_file()
    _fill(ctx, 2)
    assert ctx.audit.checkpoint() is not None
    before = path.read_bytes()
    assert ctx.audit.checkpoint() is None, "nothing new since the last checkpoint: no line"
    _fill(ctx, 1)
    assert ctx.audit.checkpoint() is not None
    after = path.read_bytes()
    assert after.startswith(before) and after.count(b"\n") == 2
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_forged_head_is_never_signed(ctx: ServiceContext, site: Path) -> None:
    _fill(ctx, 4)
    _rewrite_from(ctx, 2, '{"n":"forged"}')
    with pytest.raises(Exception, match="does not match its keyed hash"):
        ctx.audit.checkpoint()
    assert not load_config(site).audit_checkpoint_file().exists()


def test_verify_says_what_it_checked(ctx: ServiceContext, site: Path) -> None:
    _fill(ctx, 3)
    ctx.audit.checkpoint()
    result = CliRunner().invoke(app, ["audit", "verify", "--config", str(site)])
    assert result.exit_code == 0, result.output
    assert "keyed (HMAC, from row 1)" in result.output and "1 signed checkpoints" in result.output


# --- the key file ---------------------------------------------------------------------------


def test_the_key_is_made_for_an_empty_trail_and_required_once_there_are_rows(ctx: ServiceContext, site: Path) -> None:
    key_file = load_config(site).audit_key_file()
    assert key_file.exists() and stat.S_IMODE(key_file.stat().st_mode) == 0o600
    _fill(ctx, 1)
    ctx.engine.dispose()
    key_file.rename(key_file.with_suffix(".elsewhere"))
    with pytest.raises(ConfigError) as refused:
        build_context(load_config(site), clock=FakeClock())
    assert "mi2b2 audit init-key" in str(refused.value) and "[audit] key_file" in str(refused.value)
    assert not key_file.exists(), "a trail with rows never gets a fresh key behind the site's back"


def test_init_key_never_overwrites_a_key(ctx: ServiceContext, site: Path) -> None:
    key_file = load_config(site).audit_key_file()
    before = key_file.read_bytes()
    result = CliRunner().invoke(app, ["audit", "init-key", "--config", str(site)])
    assert result.exit_code != 0
    assert isinstance(result.exception, InvalidInput) and "already exists" in str(result.exception)
    assert key_file.read_bytes() == before


def _legacy_trail(site: Path, events: int) -> ServiceContext:
    """A database from before keyed audit: plain SHA-256 rows and no key file."""
    legacy = build_context(load_config(site), clock=FakeClock(), audit_key=False)
    _fill(legacy, events)
    legacy.engine.dispose()
    return legacy


def test_init_key_seals_an_older_unkeyed_trail(tmp_path: Path, database_url: str) -> None:
    site = write_site(tmp_path / "site", database_url=database_url)
    legacy = _legacy_trail(site, 4)
    key_file = load_config(site).audit_key_file()
    assert not key_file.exists()
    with pytest.raises(ConfigError, match="init-key"):
        build_context(load_config(site), clock=FakeClock())

    result = CliRunner().invoke(app, ["audit", "init-key", "--config", str(site)])
    assert result.exit_code == 0, result.output
    assert "4 earlier events verified" in result.output and "keyed from row 5" in result.output
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600

    ctx = build_context(load_config(site), clock=FakeClock())
    _fill(ctx, 2)
    verdict = ctx.audit.verify(ROOT)
    assert verdict.ok and verdict.keyed_from == 5 and verdict.keyed_rows == verdict.checked - 4
    assert "4 from before the key" in verdict.summary
    sealed = [e for e in _rows(ctx) if e.action == "audit_key"]
    assert [e.seq for e in sealed] == [5]

    # The old part cannot change either: the first keyed row links to it.
    _rewrite_from(ctx, 2, '{"n":"forged"}')
    verdict = ctx.audit.verify(ROOT)
    assert not verdict.ok and verdict.bad_seq == 5
    ctx.engine.dispose()
    del legacy


def test_init_key_refuses_to_seal_a_broken_trail(tmp_path: Path, database_url: str) -> None:
    site = write_site(tmp_path / "site", database_url=database_url)
    legacy = _legacy_trail(site, 3)
    with legacy.engine.begin() as connection:
        connection.execute(text("UPDATE audit_events SET detail = '{\"n\":\"edited\"}' WHERE seq = 2"))
    result = CliRunner().invoke(app, ["audit", "init-key", "--config", str(site)])
    assert result.exit_code != 0
    assert "broken at row 2" in str(result.exception)
    assert not load_config(site).audit_key_file().exists()


def test_the_auditor_page_verify_reports_the_keyed_check(ctx: ServiceContext) -> None:
    from fastapi.testclient import TestClient

    from mi2b2.api.app import create_app

    ctx.accounts.add_user(ROOT, "audrey", "auditor", "a long enough password")
    token = ctx.accounts.create_token(ROOT, "audrey", "t").secret
    _fill(ctx, 2)
    ctx.audit.checkpoint()
    with TestClient(create_app(ctx, None)) as client:
        answer = client.get("/api/v1/audit/verify", headers={"Authorization": f"Bearer {token}"}).json()
    assert answer["ok"] and answer["keyed_from"] == 1 and answer["checkpoints"] == 1
    assert "keyed (HMAC" in answer["summary"]
    assert ctx.audit.list(ROOT, AuditFilter(action="audit_read"))


def test_the_key_and_checkpoint_files_follow_the_setting(tmp_path: Path, database_url: str) -> None:
    site = write_site(tmp_path / "site", database_url=database_url, extra='\n[audit]\nkey_file = "keys/site.key"\n')
    ctx = build_context(load_config(site), clock=FakeClock())
    _fill(ctx, 1)
    assert ctx.audit.checkpoint() is not None
    assert (tmp_path / "site" / "keys" / "site.key").exists()
    assert (tmp_path / "site" / "keys" / "audit-checkpoints.jsonl").exists()
    assert not (tmp_path / "site" / "audit.key").exists()
    ctx.engine.dispose()


def test_the_demo_writes_its_key_and_seals_an_older_demo_folder(tmp_path: Path, database_url: str) -> None:
    from mi2b2.demo import _prepare_accounts

    site = write_site(tmp_path / "site", database_url=database_url)
    _legacy_trail(site, 2)  # a demo folder left by a version without keyed audit
    _prepare_accounts(site)
    ctx = build_context(load_config(site), clock=FakeClock())
    verdict = ctx.audit.verify(ROOT)
    assert verdict.ok and verdict.keyed_from == 3
    ctx.engine.dispose()
    key_bytes = load_config(site).audit_key_file().read_bytes()
    _prepare_accounts(site)  # a second run keeps the key it has
    assert load_config(site).audit_key_file().read_bytes() == key_bytes


def test_a_worker_signs_the_head_while_it_runs_and_when_it_stops(ctx: ServiceContext, site: Path) -> None:
    import time

    from mi2b2.runtime import make_sink
    from mi2b2.worker.loop import Worker

    path = load_config(site).audit_checkpoint_file()
    _fill(ctx, 2)
    sink = make_sink(ctx)
    worker = Worker(ctx, sink, poll_seconds=0.05)
    worker.start()
    try:
        deadline = time.monotonic() + 20
        while not path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert path.exists(), "the running worker wrote no checkpoint"
        _fill(ctx, 1)
        newest = len(_rows(ctx))
    finally:
        worker.stop()
        sink.close()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(lines) == 2 and lines[-1]["seq"] == newest
    assert ctx.audit.verify(ROOT).ok
