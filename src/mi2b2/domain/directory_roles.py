"""Which mi2b2 role a user's groups give, from the site's directory (LDAP) or its OpenID provider."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mi2b2.domain.principal import Role

# A user in several mapped groups gets the strongest role among them.
_STRENGTH = {Role.RESEARCHER: 0, Role.AUDITOR: 1, Role.ADMIN: 2}


def normal_dn(dn: str) -> str:
    """DNs compare case-insensitively and without the spaces some directories put after commas."""
    return ",".join(part.strip() for part in dn.split(",")).lower()


def role_for_groups(groups: Iterable[str], roles: Mapping[str, Role],
                    normal: Callable[[str], str] = normal_dn) -> Role | None:
    """The strongest role any of ``groups`` maps to, or None if none is mapped.

    ``normal`` says when two group names are the same: DNs by default; an OpenID
    provider's group names compare exactly (``normal=str``)."""
    mapped = {normal(name): role for name, role in roles.items()}
    found = [mapped[name] for name in map(normal, groups) if name in mapped]
    return max(found, key=_STRENGTH.__getitem__, default=None)


def groups_in_claim(claims: Mapping[str, Any], path: str) -> list[str]:
    """The groups (or roles) a token's claim lists; a dotted path reaches into objects (Keycloak's
    ``realm_access.roles``). A single string is one group; anything else is none."""
    value: Any = claims
    for part in path.split("."):
        value = value.get(part) if isinstance(value, Mapping) else None
    if isinstance(value, str):
        return [value]
    if isinstance(value, list):
        return [item for item in value if isinstance(item, str)]
    return []
