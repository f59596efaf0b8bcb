"""The ``[ldap]`` section: sign users in against the site's LDAP / Active Directory."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlsplit

from pydantic import Field, field_validator, model_validator

from mi2b2.config.fields import Strict
from mi2b2.domain.principal import Role


class LdapConfig(Strict):
    servers: list[str] = Field(min_length=1, description='"ldap://host:389" (always upgraded with StartTLS) or '
                                                         '"ldaps://host:636"; tried in order')
    ca_file: Path | None = Field(None, description="CA certificates the directory's certificate must chain to "
                                                   "(default: the system's)")
    bind_dn: str | None = Field(None, description="the search account; none: search anonymously")
    bind_password_file: Path | None = Field(None, description="file holding the search account's password")
    user_base: str = Field(min_length=1, description='where users are searched, e.g. "ou=people,dc=example,dc=org"')
    user_filter: str = Field("(uid={login})", description='"{login}" is replaced by the escaped login; '
                                                          'Active Directory: "(sAMAccountName={login})"')
    group_attribute: str = Field("memberOf", min_length=1, description="the user's attribute listing its group DNs")
    group_base: str | None = Field(None, description='search groups here instead of reading group_attribute, for '
                                                     'directories without memberOf, e.g. "ou=groups,dc=example,dc=org"')
    group_filter: str = Field("(member={dn})", description='with group_base: "{dn}" is replaced by the escaped user '
                                                           'DN; posixGroup: "(memberUid={login})"')
    display_name_attribute: str = Field("cn", min_length=1)
    roles: dict[str, Role] = Field(min_length=1, description="group DN -> mi2b2 role; a user in none is refused")
    local_logins: list[str] = Field(default_factory=list, description="accounts that keep signing in with their "
                                                                      "local password (break-glass admins)")
    # An integer: ldap3 packs the receive timeout into a socket option as whole seconds.
    timeout_seconds: int = Field(5, ge=1, le=60, description="connect and answer timeout per server")

    @field_validator("servers")
    @classmethod
    def _servers(cls, servers: list[str]) -> list[str]:
        for url in servers:
            parsed = urlsplit(url)
            if parsed.scheme not in ("ldap", "ldaps") or not parsed.hostname or parsed.path not in ("", "/"):
                raise ValueError(f"ldap server {url!r} must be ldap://host[:port] (StartTLS) or ldaps://host[:port]")
        return servers

    @field_validator("user_filter")
    @classmethod
    def _filter(cls, value: str) -> str:
        if "{login}" not in value or not (value.startswith("(") and value.endswith(")")):
            raise ValueError(f'user_filter {value!r} must be an LDAP filter in parentheses containing "{{login}}"')
        return value

    @field_validator("group_filter")
    @classmethod
    def _group_filter(cls, value: str) -> str:
        if not ("{dn}" in value or "{login}" in value) or not (value.startswith("(") and value.endswith(")")):
            raise ValueError(f'group_filter {value!r} must be an LDAP filter in parentheses containing "{{dn}}" '
                             f'or "{{login}}"')
        return value

    @model_validator(mode="after")
    def _bind(self) -> LdapConfig:
        if (self.bind_dn is None) != (self.bind_password_file is None):
            raise ValueError("ldap: give both bind_dn and bind_password_file, or neither (anonymous search)")
        return self
