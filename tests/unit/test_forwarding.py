"""The pure rules of forwarding: who may, what starts, which syntax, how it ended."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

from mi2b2.domain.forwarding import (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    MAX_CONTEXTS,
    DestinationRules,
    ForwardCandidate,
    SyntaxChoice,
    choose_syntax,
    destination_allows,
    forward_denial,
    forward_outcome,
    forward_waiting_reason,
    plan_destination,
    proposed_contexts,
)
from mi2b2.domain.governance import Denial, ProjectPolicy
from mi2b2.domain.requests import RequestState

NOW = datetime(2026, 3, 2, 10, 0, tzinfo=UTC)
TODAY = NOW.date()
MR = "1.2.840.10008.5.1.4.1.1.4"
CT = "1.2.840.10008.5.1.4.1.1.2"
JPEG_LS = "1.2.840.10008.1.2.4.80"
RULES = DestinationRules("xnat", configured=True, max_concurrent=2)
OPEN = {"alpha": None, "beta": None, "gamma": None}


def _policy(expires: date = date(2099, 1, 1), active: bool = True) -> ProjectPolicy:
    return ProjectPolicy("alpha", "IRB-1", expires, active, frozenset({"general"}), {"alice": "lead", "bob": "researcher"})


def _c(rid: int, project: str = "alpha", priority: int = 0, age: int = 0, **kw: object) -> ForwardCandidate:
    return ForwardCandidate(rid, project, priority, NOW - timedelta(minutes=age), **kw)  # type: ignore[arg-type]


def test_members_of_any_role_may_forward_while_the_irb_is_active_and_admins_only_as_members() -> None:
    assert forward_denial(_policy(), "alice", False, TODAY) is None
    assert forward_denial(_policy(), "bob", False, TODAY) is None
    assert forward_denial(_policy(), "root", True, TODAY) is Denial.ADMIN_NOT_MEMBER  # admins manage, members read
    assert forward_denial(_policy(), "carol", False, TODAY) is Denial.NOT_MEMBER
    assert forward_denial(_policy(expires=TODAY), "bob", False, TODAY) is None  # the expiry day is still covered
    assert forward_denial(_policy(expires=TODAY - timedelta(days=1)), "bob", False, TODAY) is Denial.IRB_EXPIRED
    assert forward_denial(_policy(expires=TODAY - timedelta(days=1)), "alice", True, TODAY) is Denial.IRB_EXPIRED
    assert forward_denial(_policy(active=False), "alice", False, TODAY) is Denial.PROJECT_INACTIVE


def test_an_empty_project_list_means_every_project() -> None:
    assert destination_allows([], "alpha")
    assert destination_allows(["alpha"], "alpha")
    assert not destination_allows(["beta"], "alpha")


def test_cap_round_robin_priority_then_age() -> None:
    candidates = [_c(1, "alpha", age=30), _c(2, "alpha", priority=5, age=1), _c(3, "beta", age=10), _c(4, "gamma")]
    plan = plan_destination(NOW, RULES, 0, OPEN, candidates, last_project="alpha")
    assert plan.starts == [3, 4]  # beta, then gamma: alpha was served last
    assert plan.last_project == "gamma"
    assert plan.waiting == {1: "destination busy: 2 of 2 forwards active", 2: "destination busy: 2 of 2 forwards active"}
    plan = plan_destination(NOW, RULES, 1, OPEN, candidates, last_project="gamma")
    assert plan.starts == [2]  # alpha's turn; its higher priority first although younger


def test_running_forwards_count_against_the_cap() -> None:
    plan = plan_destination(NOW, RULES, 2, OPEN, [_c(1)], None)
    assert plan.starts == [] and plan.waiting == {1: "destination busy: 2 of 2 forwards active"}


def test_closed_projects_cancel_and_forwards_no_longer_allowed_fail() -> None:
    closed = {"alpha": None, "beta": "the project's IRB approval has expired"}
    plan = plan_destination(NOW, RULES, 0, closed, [_c(1, "beta"), _c(2, "gone"), _c(3, patient_allowed=False)], None)
    assert plan.cancel == {1: "the project's IRB approval has expired", 2: "the project is no longer configured"}
    assert plan.fail == {3: "the patient is no longer on the project's IRB allow-list"}
    limited = DestinationRules("xnat", True, 2, frozenset({"beta"}))
    assert plan_destination(NOW, limited, 0, OPEN, [_c(4)], None).fail == {
        4: "destination 'xnat' no longer accepts forwards from project 'alpha'"}
    removed = DestinationRules("xnat", False, 1)
    assert plan_destination(NOW, removed, 0, OPEN, [_c(5)], None).fail == {5: "destination 'xnat' is no longer configured"}


def test_backoff_and_the_same_study_in_flight_wait() -> None:
    later = NOW + timedelta(seconds=30)
    plan = plan_destination(NOW, RULES, 0, OPEN, [_c(1, not_before=later), _c(2, study_busy=True),
                                                  _c(3, not_before=NOW - timedelta(seconds=1))], None)
    assert plan.starts == [3]
    assert plan.waiting[1].startswith("retry after a transient failure, not before 2026-03-02 10:00:30")
    assert "being forwarded to this destination" in plan.waiting[2]


def test_a_queued_forwards_reason_is_read_by_the_rule_the_planner_applies() -> None:
    """The scheduler writes nothing on forwards that wait; a reader derives the same reason."""
    later = NOW + timedelta(seconds=30)
    waiting = [_c(1, not_before=later), _c(2, study_busy=True), _c(3), _c(4)]
    plan = plan_destination(NOW, RULES, 2, OPEN, waiting, None)
    assert plan.starts == []
    assert {c.request_id: forward_waiting_reason(NOW, c, 2, RULES.max_concurrent) for c in waiting} == plan.waiting
    # Between ticks, with a slot free: held back by nothing but its turn.
    assert forward_waiting_reason(NOW, _c(4), 1, RULES.max_concurrent) == "waiting for the scheduler"
    assert forward_waiting_reason(later, _c(1, not_before=later), 1, 2) == "waiting for the scheduler"  # retry due


def test_contexts_offer_the_stored_syntax_alone_then_uncompressed_fallbacks() -> None:
    contexts = proposed_contexts([(MR, JPEG_LS), (MR, JPEG_LS), (MR, EXPLICIT_VR_LITTLE_ENDIAN), (CT, IMPLICIT_VR_LITTLE_ENDIAN)])
    assert contexts == [
        (MR, (JPEG_LS,)), (MR, (EXPLICIT_VR_LITTLE_ENDIAN,)), (CT, (IMPLICIT_VR_LITTLE_ENDIAN,)),
        (MR, (IMPLICIT_VR_LITTLE_ENDIAN,)), (CT, (EXPLICIT_VR_LITTLE_ENDIAN,)),
    ]
    many = proposed_contexts([(f"1.2.3.{n}", JPEG_LS) for n in range(100)])
    assert len(many) == MAX_CONTEXTS and all(syntaxes == (JPEG_LS,) for _, syntaxes in many[:100])


def test_syntax_choice_streams_the_stored_one_or_converts_to_uncompressed() -> None:
    assert choose_syntax(JPEG_LS, {JPEG_LS, EXPLICIT_VR_LITTLE_ENDIAN}) == SyntaxChoice(JPEG_LS, False)
    assert choose_syntax(JPEG_LS, {IMPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_LITTLE_ENDIAN}) == SyntaxChoice(
        EXPLICIT_VR_LITTLE_ENDIAN, True)
    assert choose_syntax(EXPLICIT_VR_LITTLE_ENDIAN, {IMPLICIT_VR_LITTLE_ENDIAN}) == SyntaxChoice(
        IMPLICIT_VR_LITTLE_ENDIAN, True)
    assert choose_syntax(JPEG_LS, set()) is None


def test_outcome() -> None:
    assert forward_outcome(3, 3, 0).state is RequestState.COMPLETED
    incomplete = forward_outcome(3, 2, 1, "status 0xA900")
    assert incomplete.state is RequestState.INCOMPLETE
    assert incomplete.reason == "1 of 3 instances were not stored (first problem: status 0xA900)"
    assert forward_outcome(3, 0, 3).state is RequestState.FAILED
    assert forward_outcome(0, 0, 0).reason == "no instance of the study is in the project's cache any more"
