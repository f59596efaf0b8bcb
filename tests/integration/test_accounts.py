"""Logins and tokens attacked: lifetimes, revocation, throttling, timing, reserved names (SQLite and PostgreSQL)."""

from __future__ import annotations

import re
import sqlite3
import statistics
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, insert, select

from mi2b2.adapters.crypto.secrets import new_token, token_digest
from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import ApiToken, LoginFailure, User
from mi2b2.api.app import create_app
from mi2b2.config import load_config
from mi2b2.domain.principal import RESERVED_LOGINS, Principal, Role
from mi2b2.errors import AccessDenied, ConfigError, InvalidInput
from mi2b2.services import auth
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.testing import FakeClock
from support.site import load_site, write_site

ROOT = Principal("root", Role.ADMIN)
AUDITOR = Principal("audrey", Role.AUDITOR)
PASSWORD = "correct horse battery"
WRONG = "wrong password!!"
SRC = Path(__file__).resolve().parents[2] / "src" / "mi2b2"


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> ServiceContext:
    context = build_context(load_site(tmp_path, database_url=database_url), clock=FakeClock())
    context.accounts.add_user(ROOT, "alice", "researcher", PASSWORD)
    return context


def _clock(ctx: ServiceContext) -> FakeClock:
    assert isinstance(ctx.clock, FakeClock)
    return ctx.clock


def _fail(ctx: ServiceContext, login: str, client: str, password: str = WRONG) -> str:
    with pytest.raises(AccessDenied) as refused:
        ctx.accounts.login(login, password, client)
    return str(refused.value)


# tokens -------------------------------------------------------------------------------------------------


def test_tokens_never_outlive_the_site_maximum(ctx: ServiceContext) -> None:
    now = _clock(ctx).now()
    longest = ctx.accounts.create_token(ROOT, "alice", "cli", None)  # {"days": null} used to mean "never"
    assert longest.expires_at == now + timedelta(days=90)
    for days in (91, 0, -1, float("nan"), float("inf"), 1e300):
        with pytest.raises(InvalidInput, match="at most 90 days \\(server.max_token_days\\)"):
            ctx.accounts.create_token(ROOT, "alice", "forever", days)

    # A token stored without an expiry (made before the limit existed) stops at the limit all the same.
    secret = new_token()
    with transaction(ctx.sessions) as session:
        user_id = session.scalar(select(User.id).where(User.login == "alice"))
        session.execute(insert(ApiToken).values(user_id=user_id, kind="api", name="old", token_hash=token_digest(secret),
                                                created_at=now, expires_at=None))
    _clock(ctx).advance(days=89)
    assert ctx.accounts.authenticate(secret) is not None
    _clock(ctx).advance(days=2)
    assert ctx.accounts.authenticate(secret) is None


def test_the_api_refuses_a_token_longer_than_the_maximum(tmp_path: Path) -> None:
    site = write_site(tmp_path)
    site.write_text(site.read_text().replace("[server]\n", "[server]\nmax_token_days = 30\n", 1))
    context = build_context(load_config(site), clock=FakeClock())
    context.accounts.add_user(ROOT, "alice", "researcher", PASSWORD)
    client = TestClient(create_app(context))
    assert client.post("/api/v1/auth/login", json={"login": "alice", "password": PASSWORD}).status_code == 200
    never = client.post("/api/v1/auth/tokens", json={"name": "forever", "days": None})
    assert never.status_code == 200
    assert never.json()["expires_at"].startswith(str((context.clock.now() + timedelta(days=30)).date()))
    too_long = client.post("/api/v1/auth/tokens", json={"name": "long", "days": 31})
    assert too_long.status_code == 422 and "at most 30 days (server.max_token_days)" in too_long.json()["error"]


@pytest.mark.parametrize("change", ["reset_password", "disable_user"])
def test_a_password_reset_or_disable_revokes_every_token_and_session(ctx: ServiceContext, change: str) -> None:
    _, session = ctx.accounts.login("alice", PASSWORD, "10.0.0.1")
    token = ctx.accounts.create_token(ROOT, "alice", "cli", 30)
    assert ctx.accounts.authenticate(session.secret) and ctx.accounts.authenticate(token.secret)
    if change == "reset_password":
        ctx.accounts.reset_password(ROOT, "alice", "a brand new password")
    else:
        ctx.accounts.disable_user(ROOT, "alice")
    assert ctx.accounts.authenticate(session.secret) is None
    assert ctx.accounts.authenticate(token.secret) is None
    events = ctx.audit.list(AUDITOR, AuditFilter(action="user_admin"))
    assert '"revoked":2' in events[-1].detail


# throttling ---------------------------------------------------------------------------------------------


def test_unknown_logins_are_throttled_like_known_ones(ctx: ServiceContext) -> None:
    answers = {}
    for login in ("alice", "ghost"):
        answers[login] = [_fail(ctx, login, "10.0.0.66") for _ in range(6)]
    assert answers["alice"] == answers["ghost"]
    assert answers["ghost"][:5] == ["wrong login or password"] * 5
    assert answers["ghost"][5].startswith("too many failed logins; try again in 31 s")


def test_a_guesser_cannot_lock_a_user_out_and_delays_grow_but_end(ctx: ServiceContext) -> None:
    clock = _clock(ctx)
    waits = []
    for _ in range(12):
        message = _fail(ctx, "alice", "10.0.0.66")
        if message.startswith("too many"):
            waits.append(int(re.findall(r"in (\d+) s", message)[0]))
            clock.advance(seconds=waits[-1])
            _fail(ctx, "alice", "10.0.0.66")  # the guess allowed after the wait: counted, and wrong
    assert waits == sorted(waits) and waits[0] == 31 and waits[-1] == 15 * 60 + 1  # growing, capped at 15 min
    # Meanwhile alice, from her own address, is not affected at all.
    principal, _ = ctx.accounts.login("alice", PASSWORD, "10.0.0.1")
    assert principal.login == "alice"
    # And the guesser's own pair is never locked for good: after the longest delay, a try is allowed.
    clock.advance(minutes=15)
    ctx.accounts.login("alice", PASSWORD, "10.0.0.66")
    with ctx.sessions() as session:  # a success forgets that pair's failures
        assert session.scalar(select(func.count()).select_from(LoginFailure)) == 0


def test_failures_are_kept_hashed_and_forgotten_after_a_day(ctx: ServiceContext) -> None:
    _fail(ctx, "my password typed as login", "10.0.0.9")
    with ctx.sessions() as session:
        rows = session.scalars(select(LoginFailure)).all()
    assert [(len(r.login_digest), r.client, r.failures) for r in rows] == [(64, "10.0.0.9", 1)]
    assert "password" not in rows[0].login_digest
    _clock(ctx).advance(days=2)
    _fail(ctx, "ghost", "10.0.0.9")
    with ctx.sessions() as session:
        assert [r.failures for r in session.scalars(select(LoginFailure))] == [1]  # the old row is gone


def test_parallel_guesses_are_all_counted(ctx: ServiceContext) -> None:
    attempts = 12
    start = threading.Barrier(attempts)
    answers: list[str] = []
    lock = threading.Lock()

    def guess() -> None:
        start.wait()
        try:
            ctx.accounts.login("alice", WRONG, "10.0.0.66")
        except AccessDenied as refused:
            with lock:
                answers.append(str(refused))

    threads = [threading.Thread(target=guess) for _ in range(attempts)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert len(answers) == attempts
    wrong = answers.count("wrong login or password")
    assert wrong >= 5 and wrong + sum(a.startswith("too many") for a in answers) == attempts
    with ctx.sessions() as session:
        counted = session.scalar(select(LoginFailure.failures))
    assert counted == wrong  # every failed guess counted, none lost to a concurrent update


def test_unknown_and_known_logins_take_the_same_time(ctx: ServiceContext) -> None:
    """Through the API: medians of wrong passwords for a real login and for a login that does not exist."""
    ctx.accounts.add_user(ROOT, "dora", "researcher", PASSWORD)
    ctx.accounts.disable_user(ROOT, "dora")
    client = TestClient(create_app(ctx))
    times: dict[str, list[float]] = {"alice": [], "ghost": [], "dora": []}
    for _ in range(15):  # 45 tries, alternating, so that a busy machine slows all three alike
        for login in times:
            _clock(ctx).advance(minutes=16)  # throttling, tested above, would otherwise answer early
            began = time.perf_counter()
            response = client.post("/api/v1/auth/login", json={"login": login, "password": WRONG})
            times[login].append(time.perf_counter() - began)
            assert response.status_code == 403 and response.json()["error"] == "wrong login or password"
    known, unknown, disabled = (statistics.median(times[k]) for k in ("alice", "ghost", "dora"))
    assert 0.6 < unknown / known < 1.67, (known, unknown)
    assert 0.6 < disabled / known < 1.67, (known, disabled)


def test_argon2_runs_outside_the_sqlite_write_lock(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """While a password is hashed or checked, another connection can take SQLite's write lock at once."""
    context = build_context(load_site(tmp_path), clock=FakeClock())
    probes: list[str] = []

    def write_lock_is_free(what: str) -> None:
        other = sqlite3.connect(tmp_path / "mi2b2.db", timeout=0)
        try:
            other.execute("BEGIN IMMEDIATE")  # "database is locked" at once if a transaction holds the lock
            other.execute("ROLLBACK")
        finally:
            other.close()
        probes.append(what)

    real_hash, real_verify = auth.hash_password, auth.verify_password
    monkeypatch.setattr(auth, "hash_password", lambda password: (write_lock_is_free("hash"), real_hash(password))[1])
    monkeypatch.setattr(auth, "verify_password",
                        lambda stored, password: (write_lock_is_free("verify"), real_verify(stored, password))[1])
    context.accounts.add_user(ROOT, "alice", "researcher", PASSWORD)
    context.accounts.login("alice", PASSWORD, "10.0.0.1")
    _fail(context, "alice", "10.0.0.1")
    _fail(context, "ghost", "10.0.0.1")
    context.accounts.reset_password(ROOT, "alice", "a brand new password")
    assert probes == ["hash", "verify", "verify", "verify", "hash"]


# reserved logins ----------------------------------------------------------------------------------------


def test_system_actor_names_are_refused_as_logins(ctx: ServiceContext, tmp_path: Path) -> None:
    for login in ("system", "worker", "scheduler", "Scheduler", "SYSTEM"):
        with pytest.raises(InvalidInput, match="reserved for mi2b2's own entries"):
            ctx.accounts.add_user(ROOT, login, "admin", PASSWORD)
    with pytest.raises(InvalidInput, match="not a valid login"):
        ctx.accounts.add_user(ROOT, "alice2\n", "researcher", PASSWORD)  # a trailing newline is not a login

    site = write_site(tmp_path / "other")
    site.write_text(site.read_text().replace('{ login = "bob" }', '{ login = "worker" }'))
    with pytest.raises(ConfigError, match="reserved"):
        load_config(site)


def test_every_actor_name_the_code_writes_is_reserved() -> None:
    """Scan the source for actors written to the trail by name: each must be reserved or not a possible login."""
    literal = re.compile(r"""(?:audit\.record|AuditEntry)\(\s*f?["']([^"'{]*)""")
    written = {name for file in SRC.rglob("*.py") for name in literal.findall(file.read_text())}
    assert {"worker", "scheduler"} <= written  # the scan sees them
    for name in written:
        assert name.lower() in RESERVED_LOGINS or ":" in name, f"actor {name!r} could be a user's login"
    assert "system" in RESERVED_LOGINS
