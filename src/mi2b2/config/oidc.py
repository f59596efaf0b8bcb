"""The ``[oidc]`` section: single sign-on through the site's OpenID Connect provider."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from mi2b2.config.fields import Strict
from mi2b2.domain.principal import Role, login_problem

LOOPBACK_NAMES = ("localhost",)


class OidcConfig(Strict):
    name: str = Field("single sign-on", min_length=1, max_length=60,
                      description='the provider as users know it: the client shows "Sign in with <name>"')
    issuer: str = Field(description="the provider's issuer URL, exactly as its discovery document states it")
    client_id: str = Field(min_length=1, max_length=200)
    client_secret_file: Path = Field(description="file holding the client secret the provider issued to mi2b2")
    ca_file: Path | None = Field(None, description="CA certificates the provider's certificate must chain to "
                                                   "(default: the system's)")
    scopes: list[str] = Field(["openid", "profile"], description='asked of the provider; must include "openid"')
    login_claim: str = Field("preferred_username", min_length=1, description="the claim holding the mi2b2 login")
    display_name_claim: str = Field("name", min_length=1)
    groups_claim: str = Field("groups", min_length=1, description='the claim listing the user\'s groups or roles; '
                                                                 'a dotted path reaches into objects, e.g. '
                                                                 '"realm_access.roles"')
    roles: dict[str, Role] = Field(min_length=1, description="group (exactly as the claim gives it) -> mi2b2 role; "
                                                             "a user in none is refused")
    local_passwords: bool = Field(True, description="false: local passwords work only for local_logins")
    local_logins: list[str] = Field(default_factory=list, description="break-glass accounts: they keep their local "
                                                                      "password and never sign in through the provider")
    timeout_seconds: float = Field(10, gt=0, le=120, description="per request to the provider")

    @field_validator("issuer")
    @classmethod
    def _issuer(cls, value: str) -> str:
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname or parsed.query or parsed.fragment:
            raise ValueError(f"oidc issuer {value!r} must be an https URL without query or fragment, "
                             "e.g. https://login.example.org/realms/hospital")
        if parsed.scheme == "http" and not _loopback(parsed.hostname):
            raise ValueError(f"oidc issuer {value!r} uses plain http: only a provider on this host (127.0.0.1) "
                             "may; use its https address")
        return value

    @field_validator("scopes")
    @classmethod
    def _scopes(cls, value: list[str]) -> list[str]:
        if "openid" not in value:
            raise ValueError('oidc scopes must include "openid" (without it there is no ID token)')
        if any(not scope or " " in scope for scope in value):
            raise ValueError("oidc scopes are single words, e.g. [\"openid\", \"profile\", \"groups\"]")
        return value

    @field_validator("local_logins")
    @classmethod
    def _logins(cls, value: list[str]) -> list[str]:
        for login in value:
            problem = login_problem(login)
            if problem:
                raise ValueError(f"oidc local_logins: {problem}")
        return value

    @model_validator(mode="after")
    def _break_glass(self) -> OidcConfig:
        if not self.local_passwords and not self.local_logins:
            raise ValueError("oidc local_passwords = false needs at least one break-glass admin in local_logins: "
                             "without one, nobody can sign in while the provider is down")
        return self


def _loopback(host: str) -> bool:
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
