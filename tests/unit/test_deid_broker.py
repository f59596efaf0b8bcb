"""Who may re-identify: admins always, a project's lead while the project and its IRB approval run."""

from __future__ import annotations

import pytest

from mi2b2.domain.deid.broker import (
    CLOSED,
    NOT_LEAD,
    SEARCH_REFUSED,
    reidentify_denial,
    search_denial,
    sees_identifiers,
)


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


@pytest.mark.parametrize(("admin", "lead", "searches"), [
    (True, False, True), (False, True, True), (True, True, True), (False, False, False)])
def test_only_the_honest_broker_searches_and_sees_the_request_logs_identifiers(
        admin: bool, lead: bool, searches: bool) -> None:
    assert search_denial(admin=admin, lead=lead) == (None if searches else SEARCH_REFUSED)
    assert sees_identifiers(admin=admin, lead=lead) is searches
