"""Who is acting: users, their site role, and what each role may do."""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Role(StrEnum):
    ADMIN = "admin"
    AUDITOR = "auditor"
    RESEARCHER = "researcher"


@dataclass(frozen=True)
class Principal:
    login: str
    role: Role
    display_name: str = ""
    client: str = ""  # address the request came from, for the audit trail

    @property
    def may_read_audit(self) -> bool:
        return self.role in (Role.ADMIN, Role.AUDITOR)

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


SYSTEM = Principal(login="system", role=Role.ADMIN, display_name="mi2b2")
