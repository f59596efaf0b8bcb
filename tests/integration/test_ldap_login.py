"""LDAP sign-in against a real OpenLDAP slapd (StartTLS and ldaps with a test CA): roles from groups, refusals audited."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mi2b2.adapters.ldap_directory import DirectoryRefused, LdapDirectory
from mi2b2.api.app import create_app
from mi2b2.config import LdapConfig, load_config
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied, PermanentError, RetriableError
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.testing import FakeClock
from support.ldap import (
    ANN_PASSWORD,
    AUDITORS,
    AUDREY_PASSWORD,
    NOROLE_PASSWORD,
    PEOPLE,
    READER_DN,
    READER_PASSWORD,
    RESEARCHERS,
    STAFF,
    SUFFIX,
    RunningSlapd,
    start_slapd,
)
from support.site import write_site

ROOT = Principal("root", Role.ADMIN)
AUDITOR = Principal("audit", Role.AUDITOR)
LOCAL_PASSWORD = "break glass password"


@pytest.fixture(scope="module")
def slapd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningSlapd]:
    running = start_slapd(tmp_path_factory.mktemp("slapd"))
    yield running
    running.stop()


def _ldap_section(slapd: RunningSlapd, url: str | None = None, ca_file: Path | None = None) -> str:
    return f"""
[ldap]
servers = ["{url or slapd.url}"]
ca_file = "{ca_file or slapd.ca_file}"
bind_dn = "{READER_DN}"
bind_password_file = "reader.password"
user_base = "{PEOPLE}"
local_logins = ["root"]
timeout_seconds = 3

[ldap.roles]
"{RESEARCHERS}" = "researcher"
"{AUDITORS.upper()}" = "auditor"
"""


def _context(folder: Path, slapd: RunningSlapd, **section: object) -> ServiceContext:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "reader.password").write_text(READER_PASSWORD + "\n")
    site = write_site(folder, extra=_ldap_section(slapd, **section))  # type: ignore[arg-type]
    context = build_context(load_config(site), clock=FakeClock())
    context.accounts.add_user(ROOT, "root", "admin", LOCAL_PASSWORD)
    return context


@pytest.fixture
def ctx(tmp_path: Path, slapd: RunningSlapd) -> ServiceContext:
    return _context(tmp_path, slapd)


def _login_events(ctx: ServiceContext) -> list[tuple[str, str, str]]:
    return [(e.actor, e.outcome, e.detail or "") for e in ctx.audit.list(AUDITOR, AuditFilter(action="login"))]


def test_a_researcher_signs_in_through_the_api_and_appears_with_the_role_of_her_group(ctx: ServiceContext) -> None:
    client = TestClient(create_app(ctx))
    answer = client.post("/api/v1/auth/login", json={"login": "ann", "password": ANN_PASSWORD})
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"login": "ann", "role": "researcher", "display_name": "Ann Researcher"}
    assert client.get("/api/v1/auth/me").json()["role"] == "researcher"
    ann = next(u for u in ctx.accounts.list_users() if u.login == "ann")
    assert ann.role == "researcher" and not ann.disabled
    # The group DN in [ldap.roles] was written in capitals: DNs compare case-insensitively.
    assert ctx.accounts.login("audrey", AUDREY_PASSWORD)[0].role is Role.AUDITOR
    actor, outcome, detail = _login_events(ctx)[0]
    assert (actor, outcome) == ("ann", "ok") and '"via":"ldap"' in detail


def test_no_local_password_is_stored_and_the_break_glass_account_keeps_its_own(ctx: ServiceContext) -> None:
    ctx.accounts.login("ann", ANN_PASSWORD)
    ctx.accounts.disable_user(ROOT, "ann")
    with pytest.raises(AccessDenied, match="disabled in mi2b2"):
        ctx.accounts.login("ann", ANN_PASSWORD)
    assert ctx.accounts.login("root", LOCAL_PASSWORD)[0].role is Role.ADMIN  # not asked of the directory


def test_a_wrong_password_is_refused_audited_and_throttled(ctx: ServiceContext) -> None:
    client = TestClient(create_app(ctx))
    answer = client.post("/api/v1/auth/login", json={"login": "ann", "password": "not ann's password"})
    assert answer.status_code == 403 and "wrong login or password" in answer.json()["error"]
    actor, outcome, detail = _login_events(ctx)[0]
    assert (actor, outcome) == ("ann", "failed") and "invalid credentials" in detail
    answers = set()
    for _ in range(10):
        with pytest.raises(AccessDenied) as refused:
            ctx.accounts.login("ann", "still wrong", "10.0.0.9")
        answers.add(str(refused.value).split(";")[0])
    assert answers == {"wrong login or password", "too many failed logins"}
    with pytest.raises(AccessDenied, match="too many failed logins"):
        ctx.accounts.login("ann", ANN_PASSWORD, "10.0.0.9")  # throttled before the directory is asked


def test_the_disabled_account_cannot_sign_in(ctx: ServiceContext) -> None:
    # dora is in the researchers group, but her entry has no password: no bind succeeds as her.
    for password in ("anything at all", ANN_PASSWORD):
        with pytest.raises(AccessDenied, match="wrong login or password"):
            ctx.accounts.login("dora", password)
    assert all(outcome == "failed" for _, outcome, _ in _login_events(ctx))


def test_an_empty_password_is_refused_before_any_bind(tmp_path: Path) -> None:
    # With the directory stopped, any attempt to reach it would be "cannot be reached", not a refusal.
    stopped = start_slapd(tmp_path / "slapd")
    ctx = _context(tmp_path / "site", stopped)
    stopped.stop()
    with pytest.raises(AccessDenied, match="wrong login or password"):
        ctx.accounts.login("ann", "")
    assert "empty password" in _login_events(ctx)[0][2]


def test_filter_metacharacters_in_the_login_find_nobody(ctx: ServiceContext, slapd: RunningSlapd) -> None:
    with pytest.raises(AccessDenied, match="wrong login or password"):
        ctx.accounts.login("*)(uid=*", ANN_PASSWORD)  # not even a login name: never sent
    config = LdapConfig(servers=[slapd.url], bind_dn=READER_DN, bind_password_file=Path("unused"), user_base=PEOPLE,
                        roles={RESEARCHERS: Role.RESEARCHER})
    directory = LdapDirectory(config, slapd.ca_file, READER_PASSWORD)
    for login in ("*)(uid=*", "*", "ann)(|(uid=*", "a*"):
        with pytest.raises(DirectoryRefused, match="no such user"):
            directory.authenticate(login, ANN_PASSWORD)


def test_groups_are_searched_under_group_base_where_the_directory_keeps_no_member_of(slapd: RunningSlapd) -> None:
    # "description" is on no user entry: every group below comes from the group search.
    config = LdapConfig(servers=[slapd.url], bind_dn=READER_DN, bind_password_file=Path("unused"), user_base=PEOPLE,
                        group_attribute="description", group_base=f"ou=groups,{SUFFIX}",
                        roles={RESEARCHERS: Role.RESEARCHER})
    directory = LdapDirectory(config, slapd.ca_file, READER_PASSWORD)
    ann = directory.authenticate("ann", ANN_PASSWORD)
    assert {group.lower() for group in ann.groups} == {RESEARCHERS.lower(), STAFF.lower()}
    assert directory.authenticate("audrey", AUDREY_PASSWORD).groups == (AUDITORS,)
    with pytest.raises(DirectoryRefused, match="bind refused"):
        directory.authenticate("ann", "not ann's password")  # groups are read, but nothing is returned without a bind
    # A filter may name the login rather than the DN (as posixGroup's memberUid does).
    by_login = config.model_copy(update={"group_filter": f"(member=uid={{login}},{PEOPLE})"})
    assert len(LdapDirectory(by_login, slapd.ca_file, READER_PASSWORD).authenticate("ann", ANN_PASSWORD).groups) == 2
    with pytest.raises(ValueError, match="group_filter"):
        LdapConfig(servers=[slapd.url], user_base=PEOPLE, roles={RESEARCHERS: Role.RESEARCHER},
                   group_filter="member=uid=ann")


def test_a_user_in_no_mapped_group_is_refused_with_the_reason(ctx: ServiceContext) -> None:
    client = TestClient(create_app(ctx))
    answer = client.post("/api/v1/auth/login", json={"login": "norole", "password": NOROLE_PASSWORD})
    assert answer.status_code == 403
    assert "none of your groups is mapped" in answer.json()["error"]
    assert "norole" not in {u.login for u in ctx.accounts.list_users()}
    actor, outcome, detail = _login_events(ctx)[0]
    assert (actor, outcome) == ("norole", "denied") and "no directory group" in detail


def test_an_unreachable_directory_is_a_retriable_error_naming_it(tmp_path: Path) -> None:
    stopped = start_slapd(tmp_path / "slapd")
    ctx = _context(tmp_path / "site", stopped)
    stopped.stop()
    with pytest.raises(RetriableError, match=f"directory cannot be reached: {stopped.url}"):
        ctx.accounts.login("ann", ANN_PASSWORD)
    answer = TestClient(create_app(ctx)).post("/api/v1/auth/login", json={"login": "ann", "password": ANN_PASSWORD})
    assert answer.status_code == 503 and stopped.url in answer.json()["error"]
    assert "wrong" not in answer.json()["error"]
    assert all(outcome == "failed" and "cannot be reached" in detail for _, outcome, detail in _login_events(ctx))


def test_starttls_and_ldaps_need_the_directory_certificate_to_chain_to_the_ca_file(
        tmp_path: Path, slapd: RunningSlapd) -> None:
    for n, url in enumerate((slapd.url, slapd.ldaps_url)):
        trusted = _context(tmp_path / f"good-{n}", slapd, url=url)
        assert trusted.accounts.login("ann", ANN_PASSWORD)[0].role is Role.RESEARCHER
        wrong_ca = _context(tmp_path / f"bad-{n}", slapd, url=url, ca_file=slapd.other_ca_file)
        with pytest.raises(PermanentError, match="CERTIFICATE_VERIFY_FAILED.*ca_file"):
            wrong_ca.accounts.login("ann", ANN_PASSWORD)
