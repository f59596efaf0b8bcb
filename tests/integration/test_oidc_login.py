"""OpenID Connect sign-in against a real provider (npm oidc-provider on 127.0.0.1): the authorization code flow
with PKCE through its login and consent forms, roles from groups, and every misuse refused, audited, half-done never."""

from __future__ import annotations

import base64
import json
import secrets
import ssl
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select

from mi2b2.adapters.db.tables import OidcLogin
from mi2b2.adapters.oidc_provider import OidcRefused, OpenIdProvider
from mi2b2.api.app import create_app
from mi2b2.config import OidcConfig, load_config, parse_config
from mi2b2.domain.clock import SystemClock
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied, ConfigError
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.testing import FakeClock
from support.ldap import make_ca, server_certificate
from support.oidc import CLIENT_ID, CLIENT_SECRET, ROLES, USERS, RunningProvider, browser_sign_in, start_provider
from support.pacs import free_port
from support.site import write_site

ROOT = Principal("root", Role.ADMIN)
AUDITOR = Principal("audit", Role.AUDITOR)
BREAK_GLASS_PASSWORD = "break glass password"
APP = "http://testserver"  # the TestClient's address: mi2b2's redirect URI is built from it
CALLBACK = f"{APP}/api/v1/auth/oidc/callback"


@pytest.fixture(scope="module")
def provider(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningProvider]:
    running = start_provider(tmp_path_factory.mktemp("oidc-provider"), [CALLBACK], [f"{APP}/app/"])
    yield running
    running.stop()


def _oidc_section(issuer: str, extra: str = "") -> str:
    roles = "\n".join(f'"{group}" = "{role}"' for group, role in ROLES.items())
    return f"""
[oidc]
name = "Hospital Login"
issuer = "{issuer}"
client_id = "{CLIENT_ID}"
client_secret_file = "oidc.secret"
scopes = ["openid", "profile", "groups"]
timeout_seconds = 3
{extra}

[oidc.roles]
{roles}
"""


def _context(folder: Path, issuer: str, extra: str = "") -> ServiceContext:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "oidc.secret").write_text(CLIENT_SECRET + "\n")
    site = write_site(folder, extra=_oidc_section(issuer, extra))
    # The provider stamps its tokens with the real time; the fake clock starts there and moves only when told.
    context = build_context(load_config(site), clock=FakeClock(SystemClock().now()))
    context.accounts.add_user(ROOT, "root", "admin", BREAK_GLASS_PASSWORD)
    return context


@pytest.fixture
def ctx(tmp_path: Path, provider: RunningProvider) -> ServiceContext:
    return _context(tmp_path, provider.issuer)


@pytest.fixture
def app(ctx: ServiceContext) -> TestClient:
    return TestClient(create_app(ctx), base_url=APP)


@pytest.fixture
def idp(provider: RunningProvider) -> Iterator[httpx.Client]:
    """The browser's side at the provider: its cookies, its forms."""
    with httpx.Client(base_url=provider.issuer, timeout=10) as client:
        yield client


def _to_provider(app: TestClient) -> str:
    started = app.get("/api/v1/auth/oidc/start", follow_redirects=False)
    assert started.status_code == 303, started.text
    return started.headers["location"]


def _back_from_provider(app: TestClient, idp: httpx.Client, login: str, password: str | None = None) -> str:
    """Start at mi2b2, sign in at the provider: the callback URL the provider sends the browser to."""
    answer = browser_sign_in(idp, _to_provider(app), login, password or USERS[login].password)
    assert answer.is_redirect and answer.headers["location"].startswith(CALLBACK), answer.text
    return answer.headers["location"]


def _login_events(ctx: ServiceContext) -> list[tuple[str, str, dict[str, object]]]:
    """Sign-ins and refusals, the latest first."""
    events = [(e.actor, e.outcome, json.loads(e.detail or "{}"))
              for e in ctx.audit.list(AUDITOR, AuditFilter(action="login"))]
    return events[::-1]


def _logins(ctx: ServiceContext) -> set[str]:
    return {user.login for user in ctx.accounts.list_users()}


def _pending(ctx: ServiceContext) -> int:
    with ctx.sessions() as session:
        return int(session.scalar(select(func.count()).select_from(OidcLogin)) or 0)


def _refusal(answer: httpx.Response, status: int, words: str) -> None:
    assert answer.status_code == status, answer.text
    assert answer.headers["content-type"].startswith("text/html")
    assert "Sign-in refused" in answer.text and words in answer.text
    assert "mi2b2_session" not in answer.headers.get("set-cookie", "")


# --- the flow ---------------------------------------------------------------------------------------------------


def test_a_researcher_signs_in_appears_with_her_role_makes_an_api_token_and_logs_out(
        ctx: ServiceContext, app: TestClient, idp: httpx.Client, provider: RunningProvider) -> None:
    assert app.get("/api/v1/auth/methods").json() == {
        "password": "everyone", "provider": {"name": "Hospital Login", "url": "/api/v1/auth/oidc/start"}}
    authorization = _to_provider(app)
    assert "code_challenge_method=S256" in authorization and "nonce=" in authorization
    assert "olivia" not in _logins(ctx)
    landed = app.get(_back_from_provider(app, idp, "olivia"), follow_redirects=False)
    assert landed.status_code == 303 and landed.headers["location"] == "/app/", landed.text
    assert app.get("/api/v1/auth/me").json() == {"login": "olivia", "role": "researcher",
                                                 "display_name": "Olivia Imaging"}
    assert _pending(ctx) == 1  # the finished sign-in is gone; the first one, never finished, waits out its time
    actor, outcome, detail = _login_events(ctx)[0]
    assert (actor, outcome, detail["via"]) == ("olivia", "ok", "oidc")

    issued = app.post("/api/v1/auth/tokens", json={"name": "laptop", "days": 30})
    assert issued.status_code == 200, issued.text
    with TestClient(create_app(ctx), base_url=APP) as script:
        headers = {"Authorization": f"Bearer {issued.json()['token']}"}
        assert script.get("/api/v1/auth/me", headers=headers).json()["login"] == "olivia"

    logged_out = app.post("/api/v1/auth/logout").json()
    assert logged_out["status"] == "logged out"
    assert logged_out["provider_logout"].startswith(f"{provider.issuer}/session/end?client_id={CLIENT_ID}")
    assert app.get("/api/v1/auth/me").status_code == 401
    assert script.get("/api/v1/auth/me", headers=headers).status_code == 200  # the API token outlives the session


def test_the_strongest_role_among_the_groups_wins_and_follows_the_provider(
        ctx: ServiceContext, app: TestClient, idp: httpx.Client) -> None:
    app.get(_back_from_provider(app, idp, "adam"), follow_redirects=False)
    assert app.get("/api/v1/auth/me").json()["role"] == "admin"
    # A password sign-in of the same person returns no session: the account has no local password.
    assert app.post("/api/v1/auth/login", json={"login": "adam", "password": USERS["adam"].password}).status_code == 403


def test_a_huge_display_name_is_cut_to_what_the_user_row_holds(
        ctx: ServiceContext, app: TestClient, idp: httpx.Client) -> None:
    app.get(_back_from_provider(app, idp, "lars"), follow_redirects=False)
    assert app.get("/api/v1/auth/me").json()["display_name"] == "L" * 200


def test_project_membership_comes_from_the_site_configuration_by_login(app: TestClient, idp: httpx.Client) -> None:
    app.get(_back_from_provider(app, idp, "alice"), follow_redirects=False)  # the site's file names "alice" in projects
    assert {project["id"] for project in app.get("/api/v1/projects").json()} == {"alpha", "beta"}


def test_a_user_whose_groups_give_no_role_is_refused_with_a_clear_page_and_no_user_row(
        ctx: ServiceContext, app: TestClient, idp: httpx.Client) -> None:
    refused = app.get(_back_from_provider(app, idp, "nora"), follow_redirects=False)
    _refusal(refused, 403, "none of your groups is mapped in the site&#x27;s [oidc] roles")
    assert "nora" not in _logins(ctx)
    assert app.get("/api/v1/auth/me").status_code == 401
    actor, outcome, detail = _login_events(ctx)[0]
    assert (actor, outcome, detail["reason"]) == ("nora", "denied", "no group maps to a role")


def test_a_wrong_password_at_the_provider_sends_nobody_back(app: TestClient, idp: httpx.Client) -> None:
    answer = browser_sign_in(idp, _to_provider(app), "olivia", "not olivia's password")
    assert answer.status_code == 401 and "Wrong login or password" in answer.text


# --- misuse -----------------------------------------------------------------------------------------------------


def test_a_forged_state_is_refused_and_audited(ctx: ServiceContext, app: TestClient) -> None:
    _to_provider(app)  # a real sign-in in progress, whose state the forger does not know
    refused = app.get("/api/v1/auth/oidc/callback", params={"state": "forged", "code": "stolen"})
    _refusal(refused, 403, "unknown or already used state")
    actor, outcome, detail = _login_events(ctx)[0]
    assert (actor, outcome, detail["via"]) == ("(oidc sign-in)", "failed", "oidc")
    assert _pending(ctx) == 1  # the real one is untouched


def test_a_replayed_callback_and_a_replayed_code_are_refused(
        ctx: ServiceContext, app: TestClient, idp: httpx.Client) -> None:
    callback = _back_from_provider(app, idp, "olivia")
    assert app.get(callback, follow_redirects=False).status_code == 303
    app.post("/api/v1/auth/logout")
    _refusal(app.get(callback, follow_redirects=False), 403, "unknown or already used state")
    # The same code with a fresh state of this browser: the provider itself refuses a code used once.
    code = httpx.URL(callback).params["code"]
    fresh_state = httpx.URL(_to_provider(app)).params["state"]
    refused = app.get("/api/v1/auth/oidc/callback", params={"state": fresh_state, "code": code})
    _refusal(refused, 403, "the provider refused the authorization code: invalid_grant")
    assert app.get("/api/v1/auth/me").status_code == 401
    reasons = [detail["reason"] for _, _, detail in _login_events(ctx)[:2]]
    assert "invalid_grant" in str(reasons[0]) and "already used" in str(reasons[1])


def test_a_sign_in_finished_in_another_browser_is_refused_and_spent(
        ctx: ServiceContext, app: TestClient, idp: httpx.Client) -> None:
    callback = _back_from_provider(app, idp, "olivia")
    with TestClient(create_app(ctx), base_url=APP) as victim:  # a login CSRF: the attacker's code, the victim's browser
        _refusal(victim.get(callback, follow_redirects=False), 403, "started in another browser")
        assert victim.get("/api/v1/auth/me").status_code == 401
    _refusal(app.get(callback, follow_redirects=False), 403, "already used")
    assert "olivia" not in _logins(ctx)


def test_the_provider_saying_no_is_a_clear_refusal_and_its_words_stay_text(ctx: ServiceContext, app: TestClient) -> None:
    state = httpx.URL(_to_provider(app)).params["state"]
    refused = app.get("/api/v1/auth/oidc/callback", params={"state": state, "error": "access_denied",
                                                            "error_description": "<script>alert(1)</script>"})
    _refusal(refused, 403, "the provider ended the sign-in: access_denied: &lt;script&gt;alert(1)&lt;/script&gt;")
    assert "<script>" not in refused.text


def test_an_answer_from_another_issuer_is_a_mix_up_and_refused(
        ctx: ServiceContext, app: TestClient, idp: httpx.Client) -> None:
    callback = httpx.URL(_back_from_provider(app, idp, "olivia"))
    assert ctx.config.oidc is not None and callback.params["iss"] == ctx.config.oidc.issuer
    mixed_up = callback.copy_set_param("iss", "https://evil.example.org")
    _refusal(app.get(str(mixed_up), follow_redirects=False), 403, "not from")
    assert "olivia" not in _logins(ctx)


def test_a_provider_without_the_login_claim_is_refused_naming_the_setting(
        tmp_path: Path, provider: RunningProvider, idp: httpx.Client) -> None:
    ctx = _context(tmp_path, provider.issuer, 'login_claim = "employee_id"')
    app = TestClient(create_app(ctx), base_url=APP)
    _refusal(app.get(_back_from_provider(app, idp, "olivia"), follow_redirects=False), 403,
             "sent no &#x27;employee_id&#x27; claim (set [oidc] login_claim")
    assert _logins(ctx) == {"root"}


def test_a_sign_in_left_too_long_is_refused(ctx: ServiceContext, app: TestClient, idp: httpx.Client) -> None:
    callback = _back_from_provider(app, idp, "olivia")
    assert isinstance(ctx.clock, FakeClock)
    ctx.clock.advance(minutes=11)
    _refusal(app.get(callback, follow_redirects=False), 403, "took longer than 10 minutes")


def test_a_disabled_account_signs_in_no_more(ctx: ServiceContext, app: TestClient, idp: httpx.Client) -> None:
    app.get(_back_from_provider(app, idp, "olivia"), follow_redirects=False)
    ctx.accounts.disable_user(ROOT, "olivia")
    assert app.get("/api/v1/auth/me").status_code == 401
    _refusal(app.get(_back_from_provider(app, idp, "olivia"), follow_redirects=False), 403, "disabled in mi2b2")


def test_sign_ins_in_progress_are_bounded(ctx: ServiceContext, app: TestClient) -> None:
    assert ctx.oidc is not None
    ctx.oidc.max_pending = 3  # anyone may start a sign-in: a flood of starts must not fill the database
    for _ in range(3):
        _to_provider(app)
    answer = app.get("/api/v1/auth/oidc/start", follow_redirects=False)
    assert answer.status_code == 503 and "sign-ins are in progress" in answer.text
    assert _pending(ctx) == 3
    assert isinstance(ctx.clock, FakeClock)
    ctx.clock.advance(minutes=11)  # the abandoned ones expire and make room
    _to_provider(app)
    assert _pending(ctx) == 1


def test_a_wrong_issuer_is_named_with_its_fix(tmp_path: Path, provider: RunningProvider) -> None:
    ctx = _context(tmp_path, provider.issuer + "/")
    answer = TestClient(create_app(ctx), base_url=APP).get("/api/v1/auth/oidc/start", follow_redirects=False)
    assert answer.status_code == 502 and "set [oidc] issuer to exactly the provider" in answer.text
    assert _pending(ctx) == 0
    assert _login_events(ctx)[0][1] == "failed"


def test_a_provider_that_is_down_is_a_retriable_error(tmp_path: Path) -> None:
    ctx = _context(tmp_path, f"http://127.0.0.1:{free_port()}")
    answer = TestClient(create_app(ctx), base_url=APP).get("/api/v1/auth/oidc/start", follow_redirects=False)
    assert answer.status_code == 503 and "cannot be reached" in answer.text


def test_an_https_provider_must_chain_to_the_configured_ca(tmp_path: Path) -> None:
    ca_key, ca = make_ca(tmp_path, "provider-ca")
    _, other_ca = make_ca(tmp_path, "other-ca")
    https = start_provider(tmp_path / "tls", [CALLBACK], tls=server_certificate(tmp_path, ca_key, ca))
    try:
        ctx = _context(tmp_path / "trusting", https.issuer, f'ca_file = "{ca}"')
        app = TestClient(create_app(ctx), base_url=APP)
        with httpx.Client(base_url=https.issuer, verify=ssl.create_default_context(cafile=str(ca)), timeout=10) as idp:
            app.get(_back_from_provider(app, idp, "olivia"), follow_redirects=False)  # code and tokens over TLS
        assert app.get("/api/v1/auth/me").json()["login"] == "olivia"

        wary = _context(tmp_path / "wary", https.issuer, f'ca_file = "{other_ca}"')
        answer = TestClient(create_app(wary), base_url=APP).get("/api/v1/auth/oidc/start", follow_redirects=False)
        assert answer.status_code == 502 and "its certificate must chain to [oidc] ca_file" in answer.text
        assert _login_events(wary)[0][1] == "failed"
    finally:
        https.stop()


# --- the ID token itself ----------------------------------------------------------------------------------------


def _real_tokens(provider: RunningProvider, idp: httpx.Client, relying_party: OpenIdProvider) -> tuple[str, str, str]:
    """(id_token, access_token, nonce) of a real sign-in of olivia, through the relying party's own requests."""
    state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
    answer = browser_sign_in(idp, relying_party.authorization_url(CALLBACK, state, nonce, verifier), "olivia",
                             USERS["olivia"].password)
    code = httpx.URL(answer.headers["location"]).params["code"]
    tokens = relying_party.exchange(code, CALLBACK, verifier)
    assert tokens.access_token is not None
    return tokens.id_token, tokens.access_token, nonce


def _relying_party(provider: RunningProvider, client_id: str = CLIENT_ID) -> OpenIdProvider:
    config = OidcConfig(issuer=provider.issuer, client_id=client_id, client_secret_file=Path("unused"),
                        roles={"it-admins": Role.ADMIN})
    return OpenIdProvider(config, CLIENT_SECRET)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def test_an_expired_tampered_foreign_or_misaddressed_id_token_is_refused(
        provider: RunningProvider, idp: httpx.Client, tmp_path: Path) -> None:
    relying_party = _relying_party(provider)
    id_token, access_token, nonce = _real_tokens(provider, idp, relying_party)
    now = SystemClock().now()
    assert relying_party.verify_id_token(id_token, nonce, now, access_token)["sub"] == "olivia"

    with pytest.raises(OidcRefused, match="expired"):
        relying_party.verify_id_token(id_token, nonce, now + timedelta(hours=2), access_token)
    with pytest.raises(OidcRefused, match="nonce"):
        relying_party.verify_id_token(id_token, "another sign-in's nonce", now, access_token)
    header, payload, signature = id_token.split(".")
    claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    forged = _b64(json.dumps(claims | {"sub": "adam"}).encode())
    with pytest.raises(OidcRefused, match="signature"):
        relying_party.verify_id_token(f"{header}.{forged}.{signature}", nonce, now, access_token)
    unsigned = _b64(json.dumps({"alg": "none"}).encode())
    with pytest.raises(OidcRefused, match="signature"):
        relying_party.verify_id_token(f"{unsigned}.{payload}.", nonce, now, access_token)
    with pytest.raises(OidcRefused, match="at_hash"):  # an ID token with another sign-in's access token
        relying_party.verify_id_token(id_token, nonce, now, "another access token")
    with pytest.raises(OidcRefused, match="aud"):  # issued to another client of the same provider
        _relying_party(provider, "someone-else").verify_id_token(id_token, nonce, now, access_token)

    # Another provider (its own keys) on another port: its token does not verify against this one's keys.
    other = start_provider(tmp_path / "other", [CALLBACK])
    try:
        with httpx.Client(base_url=other.issuer, timeout=10) as other_browser:
            foreign, foreign_access, foreign_nonce = _real_tokens(other, other_browser, _relying_party(other))
    finally:
        other.stop()
    with pytest.raises(OidcRefused, match="signature"):
        relying_party.verify_id_token(foreign, foreign_nonce, now, foreign_access)


# --- local passwords off ----------------------------------------------------------------------------------------


def test_local_passwords_off_leave_only_the_break_glass_admin(tmp_path: Path, provider: RunningProvider,
                                                              idp: httpx.Client) -> None:
    ctx = _context(tmp_path, provider.issuer, 'local_passwords = false\nlocal_logins = ["root"]')
    ctx.accounts.add_user(ROOT, "bob", "researcher", "bob's local password")
    app = TestClient(create_app(ctx), base_url=APP)
    assert app.get("/api/v1/auth/methods").json()["password"] == "break-glass"
    assert ctx.accounts.login("root", BREAK_GLASS_PASSWORD)[0].role is Role.ADMIN
    with pytest.raises(AccessDenied, match="only for break-glass accounts"):
        ctx.accounts.login("bob", "bob's local password")
    actor, outcome, detail = _login_events(ctx)[0]
    assert (actor, outcome, detail["reason"]) == ("bob", "failed", "local passwords are off for this login")
    # Nobody at the provider can take the break-glass account over (its "root" is somebody else).
    _refusal(app.get(_back_from_provider(app, idp, "root"), follow_redirects=False), 403, "break-glass account")
    assert next(u for u in ctx.accounts.list_users() if u.login == "root").display_name == "root"


def test_a_missing_client_secret_stops_the_start_naming_the_file(tmp_path: Path) -> None:
    site = write_site(tmp_path, extra=_oidc_section("https://login.example.org"))
    with pytest.raises(ConfigError, match=r"oidc client_secret_file .*oidc.secret: No such file"):
        build_context(load_config(site), clock=FakeClock())


def test_local_passwords_off_need_a_break_glass_account() -> None:
    section = _oidc_section("https://login.example.org", "local_passwords = false")
    with pytest.raises(ConfigError, match="at least one break-glass admin"):
        parse_config(section)
    with pytest.raises(ConfigError, match="plain http"):
        parse_config(_oidc_section("http://login.example.org"))
