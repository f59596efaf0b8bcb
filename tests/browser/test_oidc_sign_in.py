"""Single sign-on in Chromium: "Sign in with <provider>", the real provider's login and consent pages
(npm oidc-provider on 127.0.0.1), back in mi2b2 signed in, an API token made, and logout at both ends."""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, Route, expect

from support.browser_site import Mi2b2Server, screenshot, serve
from support.oidc import CLIENT_ID, CLIENT_SECRET, ROLES, USERS, RunningProvider, start_provider
from support.pacs import free_port

PROVIDER_NAME = "Hospital Login"


@dataclass(frozen=True)
class SingleSignOnSite:
    server: Mi2b2Server
    provider: RunningProvider


@pytest.fixture(scope="module")
def sso_site(orthanc: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SingleSignOnSite]:
    """mi2b2 with [oidc] pointing at a provider that starts once mi2b2's address is known."""
    folder = tmp_path_factory.mktemp("oidc-browser-site")
    (folder / "oidc.secret").write_text(CLIENT_SECRET)
    port = free_port()
    roles = "\n".join(f'"{group}" = "{role}"' for group, role in ROLES.items())
    section = (f'[oidc]\nname = "{PROVIDER_NAME}"\nissuer = "http://127.0.0.1:{port}"\nclient_id = "{CLIENT_ID}"\n'
               f'client_secret_file = "oidc.secret"\nscopes = ["openid", "profile", "groups"]\n'
               f'local_passwords = false\nlocal_logins = ["root"]\n\n[oidc.roles]\n{roles}\n')
    with serve(folder, orthanc.pacs, site_extra=section) as server:
        # This provider puts the groups into the ID token itself (the API test reads them from userinfo).
        provider = start_provider(folder / "provider", [f"{server.url}/api/v1/auth/oidc/callback"],
                                  [f"{server.url}/app/"], port=port, id_token_claims=True)
        try:
            yield SingleSignOnSite(server, provider)
        finally:
            provider.stop()


@pytest.fixture(scope="module")
def mi2b2_server(sso_site: SingleSignOnSite) -> Mi2b2Server:
    """The conftest's pages and contexts go to this module's single sign-on site."""
    return sso_site.server


def _loopback_only(route: Route) -> None:
    # The provider's stock pages import a web font; nothing here may leave the machine.
    route.abort()


def test_a_researcher_signs_in_with_the_provider_makes_a_token_and_logs_out_at_both_ends(
        page: Page, sso_site: SingleSignOnSite) -> None:
    page.context.route(re.compile(r"^https?://(?!127\.0\.0\.1[:/])"), _loopback_only)
    page.goto("/app/")
    expect(page.locator("#password-note")).to_be_visible()  # local passwords are for the break-glass account only
    page.get_by_role("link", name=f"Sign in with {PROVIDER_NAME}").click()

    expect(page).to_have_url(re.compile(rf"^{re.escape(sso_site.provider.issuer)}/interaction/"))
    page.locator("input[name=login]").fill("olivia")
    page.locator("input[name=password]").fill(USERS["olivia"].password)
    page.get_by_role("button", name="Sign-in").click()
    page.get_by_role("button", name="Continue").click()  # the provider's consent page

    expect(page).to_have_url(f"{sso_site.server.url}/app/")
    expect(page.locator("#who")).to_have_text("Olivia Imaging (researcher)")
    expect(page.locator("#login")).to_be_hidden()
    screenshot(page, "oidc-signed-in")

    page.get_by_role("button", name="API tokens").click()
    page.get_by_label("Name").fill("analysis script")
    page.get_by_role("button", name="Create token").click()
    secret = page.locator("#token-value")
    expect(secret).to_have_text(re.compile(r"\S{20,}"))
    expect(page.locator("#token-list")).to_contain_text("analysis script: valid until")
    token = secret.inner_text()
    me = httpx.get(f"{sso_site.server.url}/api/v1/auth/me", headers={"Authorization": f"Bearer {token}"})
    assert me.json()["login"] == "olivia"

    page.get_by_role("button", name="Log out").click()
    expect(page).to_have_url(re.compile(rf"^{re.escape(sso_site.provider.issuer)}/session/end"))
    page.get_by_role("button", name="Yes, sign me out").click()
    expect(page).to_have_url(f"{sso_site.server.url}/app/")
    expect(page.get_by_role("link", name=f"Sign in with {PROVIDER_NAME}")).to_be_visible()
    assert page.request.get("/api/v1/auth/me").status == 401  # the mi2b2 session is over
    # ... and so is the provider's: signing in again asks for the password.
    page.get_by_role("link", name=f"Sign in with {PROVIDER_NAME}").click()
    expect(page.locator("input[name=password]")).to_be_visible()
