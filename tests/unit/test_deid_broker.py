"""Who may re-identify: admins always, a project's lead while the project and its IRB approval run."""

from __future__ import annotations

import pytest

from mi2b2.domain.deid.broker import CLOSED, NOT_LEAD, reidentify_denial


@pytest.mark.parametrize(("admin", "lead", "active", "irb", "expected"), [
    (True, False, False, False, None),
    (False, True, True, True, None),
    (False, False, True, True, NOT_LEAD),
    (False, True, False, True, CLOSED),
    (False, True, True, False, CLOSED),
    (False, False, False, False, NOT_LEAD),
])
def test_reidentify_denial(admin: bool, lead: bool, active: bool, irb: bool, expected: str | None) -> None:
    assert reidentify_denial(admin=admin, lead=lead, project_active=active, irb_active=irb) == expected
