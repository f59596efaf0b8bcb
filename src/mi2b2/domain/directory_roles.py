"""Which mi2b2 role a directory user's groups give."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from mi2b2.domain.principal import Role

# A user in several mapped groups gets the strongest role among them.
_STRENGTH = {Role.RESEARCHER: 0, Role.AUDITOR: 1, Role.ADMIN: 2}


def normal_dn(dn: str) -> str:
    """DNs compare case-insensitively and without the spaces some directories put after commas."""
    return ",".join(part.strip() for part in dn.split(",")).lower()


def role_for_groups(groups: Iterable[str], roles: Mapping[str, Role]) -> Role | None:
    """The strongest role any of ``groups`` maps to, or None if none is mapped."""
    mapped = {normal_dn(dn): role for dn, role in roles.items()}
    found = [mapped[dn] for dn in map(normal_dn, groups) if dn in mapped]
    return max(found, key=_STRENGTH.__getitem__, default=None)
