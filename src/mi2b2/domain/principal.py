"""Who is acting: users, their site role, and what each role may do."""

from __future__ import annotations

import re
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


LOGIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}\Z")
# The actors mi2b2 itself writes to the audit trail (SYSTEM above, the scheduler,
# the retrieval and forward workers; "dicom:AE" and "cli:user" cannot be logins,
# a colon is not allowed). A user of the same name would be indistinguishable
# from them in the trail, so none may exist. Compared case-insensitively.
RESERVED_LOGINS = frozenset({SYSTEM.login, "worker", "scheduler", "receiver", "mi2b2"})


def login_problem(login: str) -> str | None:
    """Why `login` may not name a user, or None if it may."""
    if not LOGIN.match(login):
        return f"{login!r} is not a valid login; use letters, digits, '.', '_', '-' or '@' (at most 64)"
    if login.lower() in RESERVED_LOGINS:
        return f"{login!r} is reserved for mi2b2's own entries in the audit trail; pick another login"
    return None
