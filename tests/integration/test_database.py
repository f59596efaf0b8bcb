"""Schema, migrations, audit chain and accounts against SQLite and PostgreSQL."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from sqlalchemy import text

from mi2b2.adapters.db import engine as db
from mi2b2.adapters.db.tables import Base
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied
from mi2b2.services.audit import Action, AuditFilter, Outcome
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.testing import FakeClock
from support.site import load_site

AUDITOR = Principal("audrey", Role.AUDITOR)
RESEARCHER = Principal("alice", Role.RESEARCHER)


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> ServiceContext:
    return build_context(load_site(tmp_path, database_url=database_url), clock=FakeClock())


def test_migrations_match_models_and_round_trip(ctx: ServiceContext) -> None:
    with ctx.engine.connect() as connection:
        diff = compare_metadata(MigrationContext.configure(connection, opts={"compare_type": True}), Base.metadata)
    assert diff == []
    db.downgrade(ctx.engine, "base")
    assert db.current_revision(ctx.engine) is None
    db.upgrade(ctx.engine, "0001")
    assert db.current_revision(ctx.engine) == "0001"
    db.upgrade(ctx.engine)
    head = ScriptDirectory.from_config(db.alembic_config(str(ctx.engine.url))).get_current_head()
    assert db.current_revision(ctx.engine) == head
    assert head is not None and head != "0001"


def test_a_receiver_write_failure_marked_the_old_way_keeps_its_meaning(ctx: ServiceContext) -> None:
    """Before 0008 the receiver marked "could not write" with 0xA700 in last_status;
    an ended request's 0xA700 is what the PACS said, and stays only that."""
    db.downgrade(ctx.engine, "0006")
    with ctx.engine.begin() as connection:
        for state, error in [("processing", "cannot write to the cache: No space left on device"),
                             ("failed", "the PACS is out of resources")]:
            connection.execute(text(
                "insert into requests (kind, project_id, user_login, patient_id, study_uid, accession, series_uids,"
                " priority, state, expected_instances, expected_bytes, received, failed, warnings, bytes, attempts,"
                " last_error, last_status, created_at, started_at, cancel_requested)"
                " values ('retrieve', 'alpha', 'alice', '77', '1.2.3', '', '[]', 0, :state, 1, 0, 0, 1, 0, 0, 1,"
                " :error, 42752, :now, :now, false)"), {"state": state, "error": error, "now": ctx.clock.now()})
    db.upgrade(ctx.engine)
    with ctx.engine.connect() as connection:
        rows = connection.execute(text(
            "select state, write_failure, write_failed_at is not null, last_status from requests order by id")).all()
    assert [tuple(r) for r in rows] == [
        ("processing", "cannot write to the cache: No space left on device", True, 0xA700),
        ("failed", None, False, 0xA700),
    ]
    db.downgrade(ctx.engine, "0006")  # and back: the old code reads the mark again
    with ctx.engine.connect() as connection:
        assert connection.execute(text("select last_status, last_error from requests where state = 'processing'")).one() \
            == (0xA700, "cannot write to the cache: No space left on device")


def test_config_is_mirrored_and_reload_is_audited(tmp_path: Path, ctx: ServiceContext) -> None:
    with ctx.engine.connect() as connection:
        assert connection.execute(text("select count(*) from project_mrns where project_id='alpha'")).scalar() == 5
    (tmp_path / "alpha.mrns").write_text("000123\nNEW-1\n")
    changes = ctx.reload_config(Principal("root", Role.ADMIN))
    assert "allow-list of alpha (+1 -4)" in changes.changed
    with ctx.engine.connect() as connection:
        assert connection.execute(text("select count(*) from project_mrns where project_id='alpha'")).scalar() == 2
    assert [e.action for e in ctx.audit.list(AUDITOR, AuditFilter(action="config_reload"))] == ["config_reload"]


def test_broken_reload_keeps_the_running_configuration(tmp_path: Path, ctx: ServiceContext) -> None:
    config_file = tmp_path / "mi2b2.toml"
    config_file.write_text(config_file.read_text().replace('quota = "10 GiB"', 'quota = "ten gigs"'))
    with pytest.raises(Exception, match="quota"):
        ctx.reload_config(Principal("root", Role.ADMIN))
    assert ctx.config.projects[0].quota == 10 * 2**30
    assert ctx.audit.list(AUDITOR, AuditFilter(action="config_reload")) == []


def _tamper(ctx: ServiceContext, statement: str) -> None:
    with ctx.engine.begin() as connection:
        connection.execute(text(statement))


def _fill(ctx: ServiceContext, count: int = 6) -> None:
    for n in range(count):
        ctx.audit.record(RESEARCHER, Action.QUERY, project_id="alpha", patient_id=f"P{n}", detail={"n": n})


def test_intact_chain_verifies(ctx: ServiceContext) -> None:
    _fill(ctx)
    verdict = ctx.audit.verify(AUDITOR)
    assert verdict.ok and verdict.checked == 7  # six events and the verification read itself


@pytest.mark.parametrize(
    ("statement", "bad_row"),
    [
        ("update audit_events set patient_id='SOMEONE' where seq=3", 3),
        ("update audit_events set outcome='ok', action='login' where seq=4", 4),
        ("delete from audit_events where seq=2", 2),
        ("delete from audit_events where seq=6", 6),
        # reorder: swap the contents of rows 2 and 5
        ("update audit_events set seq = case seq when 2 then -5 when 5 then -2 end where seq in (2, 5);"
         "update audit_events set seq = -seq where seq < 0", 2),
    ],
    ids=["edit-patient", "edit-action", "delete-middle", "delete-last", "reorder"],
)
def test_tampering_is_detected_and_named(ctx: ServiceContext, statement: str, bad_row: int) -> None:
    _fill(ctx)
    for part in statement.split(";"):
        _tamper(ctx, part)
    verdict = ctx.audit.verify(AUDITOR)
    assert not verdict.ok
    assert verdict.bad_seq == bad_row


def test_only_admins_and_auditors_read_the_trail_and_reading_is_audited(ctx: ServiceContext) -> None:
    _fill(ctx, 2)
    with pytest.raises(AccessDenied):
        ctx.audit.list(RESEARCHER, AuditFilter())
    rows = ctx.audit.list(AUDITOR, AuditFilter(patient_id="P1"))
    assert [(r.action, r.patient_id) for r in rows] == [("query", "P1"), ("audit_read", "P1")]
    reads = ctx.audit.list(AUDITOR, AuditFilter(action="audit_read"))
    assert any(r.actor == "audrey" and r.patient_id == "P1" for r in reads)
    denied = ctx.audit.list(AUDITOR, AuditFilter(actor="alice", action="denied"))
    assert len(denied) == 1


def test_concurrent_appends_keep_one_chain(ctx: ServiceContext) -> None:
    def append(worker: int) -> None:
        for n in range(10):
            ctx.audit.record(f"worker{worker}", Action.QUERY, Outcome.OK, detail={"n": n})

    threads = [threading.Thread(target=append, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    verdict = ctx.audit.verify(AUDITOR)
    assert verdict.ok and verdict.checked == 41


def test_users_tokens_and_throttled_logins(ctx: ServiceContext) -> None:
    clock = ctx.clock
    assert isinstance(clock, FakeClock)
    admin = Principal("root", Role.ADMIN)
    ctx.accounts.add_user(admin, "alice", "researcher", "correct horse battery")
    principal, session = ctx.accounts.login("alice", "correct horse battery", "127.0.0.1")
    assert principal.login == "alice"
    assert ctx.accounts.authenticate(session.secret) == Principal("alice", Role.RESEARCHER, "alice")

    issued = ctx.accounts.create_token(admin, "alice", "cli", days=1)
    assert ctx.accounts.authenticate(issued.secret) is not None
    with ctx.engine.connect() as connection:
        stored = connection.execute(text("select token_hash from api_tokens where id=:i"), {"i": issued.id}).scalar()
    assert stored != issued.secret and issued.secret not in str(stored)
    clock.advance(days=2)
    assert ctx.accounts.authenticate(issued.secret) is None  # expired
    second = ctx.accounts.create_token(admin, "alice", "cli2", days=30)
    ctx.accounts.revoke_token(admin, second.id)
    assert ctx.accounts.authenticate(second.secret) is None  # revoked

    for _ in range(5):
        with pytest.raises(AccessDenied, match="wrong login or password"):
            ctx.accounts.login("alice", "wrong password!!")
    with pytest.raises(AccessDenied, match="too many failed logins"):
        ctx.accounts.login("alice", "correct horse battery")  # throttled even with the right password
    clock.advance(seconds=31)
    ctx.accounts.login("alice", "correct horse battery")
    failed = ctx.audit.list(AUDITOR, AuditFilter(actor="alice", action="login"))
    assert [e.outcome for e in failed].count("failed") == 5
    assert [e.outcome for e in failed].count("denied") == 1

    ctx.accounts.disable_user(admin, "alice")
    with pytest.raises(AccessDenied):
        ctx.accounts.login("alice", "correct horse battery")


def test_removed_project_is_deactivated_not_deleted(tmp_path: Path, ctx: ServiceContext) -> None:
    config_file = tmp_path / "mi2b2.toml"
    text_before = config_file.read_text()
    config_file.write_text(text_before[: text_before.index("[[projects]]\nid = \"beta\"")])
    changes = ctx.reload_config(Principal("root", Role.ADMIN))
    assert changes.deactivated == ["project beta"]
    with ctx.engine.connect() as connection:
        assert connection.execute(text("select active from projects where id='beta'")).scalar() in (False, 0)


def test_migrating_the_allow_list_keeps_single_institution_lists_and_fails_closed_for_the_rest(
    ctx: ServiceContext,
) -> None:
    """0004: a bare MRN of a one-institution project is that institution's; of a several-institution
    project nobody can tell whose, so it is dropped until the configuration is synced again."""
    db.downgrade(ctx.engine, "0003")
    with ctx.engine.begin() as connection:
        assert connection.execute(text("select count(*) from project_mrns where project_id='beta'")).scalar() == 2
        connection.execute(text("insert into project_mrns (project_id, mrn) values ('beta', 'SHARED-1')"))
    db.upgrade(ctx.engine)
    with ctx.engine.connect() as connection:
        rows = connection.execute(text("select project_id, institution_id, mrn from project_mrns")).all()
    assert sorted(rows) == sorted(("alpha", "general", mrn) for mrn in ["000123", "MRN-0002", "77", "PAT004", "P005"])
    # Syncing from the configuration (as every start does) brings beta's list back, per institution.
    ctx.reload_config(Principal("root", Role.ADMIN))
    with ctx.engine.connect() as connection:
        beta = connection.execute(text("select institution_id, mrn from project_mrns where project_id='beta'")).all()
    assert sorted(beta) == [("general", "B-1"), ("general", "B-2")]


def test_migrating_scheduler_cursors_gives_each_its_kind_and_round_trips(ctx: ServiceContext) -> None:
    """0007: the forward scheduler's "@destination" keys in the PACS column become destination cursors."""
    db.downgrade(ctx.engine, "0006")
    with ctx.engine.begin() as connection:
        connection.execute(text("insert into scheduler_cursors (pacs_id, last_project_id) values "
                                "('main', 'alpha'), ('@xnat', 'beta'), ('@main', null)"))
    db.upgrade(ctx.engine, "0007")
    with ctx.engine.connect() as connection:
        rows = connection.execute(text("select kind, target_id, last_project_id from scheduler_cursors")).all()
    assert sorted(rows, key=str) == sorted([("pacs", "main", "alpha"), ("destination", "xnat", "beta"),
                                            ("destination", "main", None)], key=str)
    db.downgrade(ctx.engine, "0006")
    with ctx.engine.connect() as connection:
        old = connection.execute(text("select pacs_id, last_project_id from scheduler_cursors")).all()
    assert sorted(old, key=str) == sorted([("main", "alpha"), ("@xnat", "beta"), ("@main", None)], key=str)
    db.upgrade(ctx.engine)
