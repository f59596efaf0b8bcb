"""What a request's state allows, as the client is told it, agrees with what the checks enforce."""

from __future__ import annotations

import pytest

from mi2b2.domain.requests import (
    RequestState,
    TransitionRefused,
    allowed_changes,
    check_cancel,
    check_priority_change,
    check_retry,
)

CHECKS = {"cancel": check_cancel, "retry": check_retry, "priority": check_priority_change}


@pytest.mark.parametrize("state", list(RequestState))
def test_allowed_changes_are_exactly_what_the_checks_let_through(state: RequestState) -> None:
    allowed = allowed_changes(state)
    assert set(allowed) == set(CHECKS)
    for action, check in CHECKS.items():
        if allowed[action]:
            check(state)
        else:
            with pytest.raises(TransitionRefused):
                check(state)


def test_the_usual_states() -> None:
    assert allowed_changes(RequestState.SCHEDULED) == {"cancel": True, "retry": False, "priority": True}
    assert allowed_changes(RequestState.PROCESSING) == {"cancel": True, "retry": False, "priority": False}
    assert allowed_changes(RequestState.FAILED) == {"cancel": False, "retry": True, "priority": False}
    assert allowed_changes(RequestState.CANCELED) == {"cancel": False, "retry": True, "priority": False}
    assert allowed_changes(RequestState.COMPLETED) == {"cancel": False, "retry": False, "priority": False}
