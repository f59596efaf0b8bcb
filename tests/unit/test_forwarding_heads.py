"""Planning a destination over the heads of its queue is planning over the whole queue.

A forward tick reads per project only what it can act on (``forward_heads``, which the
forward scheduler runs as SQL): a batch of the forwards that must end, else a few more
than the free slots of those that may start now. For any queue, destination and
projects, the plan over those heads must start the same forwards in the same order and
move the round-robin cursor the same way, as long as no project has more heads to fail
at once than ``FAILING_HEADS``; it ends only forwards the whole-queue plan ends, with
the same reasons; and it never reads more than the free slots allow plus one batch.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mi2b2.domain.forwarding import (
    FAILING_HEADS,
    SWEEP_BATCH,
    DestinationRules,
    ForwardCandidate,
    forward_heads,
    forward_waiting_reason,
    heads_to_read,
    plan_destination,
)

NOW = datetime(2026, 12, 5, 10, 0, tzinfo=UTC)
Situation = tuple[DestinationRules, int, dict[str, str | None], list[ForwardCandidate], str | None, int]


@st.composite
def situations(draw: st.DrawFn) -> Situation:
    project_ids = [f"p{n}" for n in range(draw(st.integers(1, 5)))]
    closed = {pid: draw(st.sampled_from([None, None, None, "the project's IRB approval has expired"]))
              for pid in project_ids}
    unknown = draw(st.booleans())  # a project no longer configured at all
    candidates = []
    for n in range(draw(st.integers(0, 80))):
        not_before = draw(st.none() | st.integers(-600, 600).map(lambda s: NOW + timedelta(seconds=s)))
        candidates.append(ForwardCandidate(
            request_id=n + 1, project_id=draw(st.sampled_from(project_ids + (["gone"] if unknown else []))),
            priority=draw(st.integers(-2, 2)), created_at=NOW - timedelta(minutes=draw(st.integers(0, 30))),
            not_before=not_before, patient_allowed=draw(st.integers(0, 6)) > 0, study_busy=draw(st.integers(0, 9)) == 0,
        ))
    accepted = draw(st.sets(st.sampled_from(project_ids)))
    rules = DestinationRules("xnat", configured=draw(st.integers(0, 9)) > 0, max_concurrent=draw(st.integers(1, 6)),
                             projects=frozenset(accepted))
    active = draw(st.integers(0, 6))
    cursor = draw(st.none() | st.sampled_from(project_ids))
    sweep = draw(st.sampled_from([SWEEP_BATCH, 7, 1, 0]))
    return rules, active, closed, candidates, cursor, sweep


def _failing_heads(situation: Situation) -> int:
    """The most heads of one project that fail when read (patient no longer allowed), among those
    a tick reads of a project that may start forwards."""
    rules, active, closed, candidates, _, sweep = situation
    worst = 0
    for project_id in {c.project_id for c in candidates}:
        read = heads_to_read(rules, active, closed, project_id, sweep)
        if not read.ending:
            heads = [c for c in forward_heads(NOW, rules, active, closed, candidates, sweep) if c.project_id == project_id]
            worst = max(worst, sum(1 for c in heads if not c.patient_allowed))
    return worst


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(situations())
def test_planning_over_the_heads_gives_the_plan_over_the_whole_queue(situation: Situation) -> None:
    rules, active, closed, candidates, cursor, sweep = situation
    whole = plan_destination(NOW, rules, active, closed, candidates, cursor)
    heads = forward_heads(NOW, rules, active, closed, candidates, sweep)
    planned = plan_destination(NOW, rules, active, closed, heads, cursor)
    # What the heads plan ends, the whole plan ends too, for the same reason.
    assert planned.cancel.items() <= whole.cancel.items()
    assert planned.fail.items() <= whole.fail.items()
    if _failing_heads(situation) <= FAILING_HEADS:
        assert planned.starts == whole.starts
        assert planned.last_project == whole.last_project
    else:  # heads that fail fill the read: fewer start this tick, none that the whole plan would not start
        assert set(planned.starts) <= {c.request_id for c in candidates if c.patient_allowed}


@settings(max_examples=300, deadline=None)
@given(situations())
def test_a_tick_reads_the_free_slots_and_one_batch_to_end_whatever_the_queue(situation: Situation) -> None:
    rules, active, closed, candidates, _, sweep = situation
    heads = forward_heads(NOW, rules, active, closed, candidates, sweep)
    ending = [c for c in heads if heads_to_read(rules, active, closed, c.project_id, sweep).ending]
    assert len(ending) <= sweep
    free = max(rules.max_concurrent - active, 0)
    projects = {c.project_id for c in candidates}
    assert len(heads) - len(ending) <= (free + FAILING_HEADS if free else 0) * len(projects)


def test_every_forward_of_a_closed_project_ends_batch_by_batch_and_none_starts() -> None:
    rules = DestinationRules("xnat", True, 2)
    closed: dict[str, str | None] = {"alpha": None, "beta": "the project's IRB approval has expired"}
    queue = [ForwardCandidate(n, "beta", 0, NOW - timedelta(seconds=n)) for n in range(1, 1201)]
    queue += [ForwardCandidate(2000 + n, "alpha", 0, NOW) for n in range(1, 4)]
    canceled: list[int] = []
    ticks = 0
    while queue:
        heads = forward_heads(NOW, rules, 0, closed, queue)
        plan = plan_destination(NOW, rules, 0, closed, heads, None)
        assert len(plan.cancel) <= SWEEP_BATCH and all(c.project_id == "alpha" for c in heads if c.request_id in plan.starts)
        canceled += plan.cancel
        queue = [c for c in queue if c.request_id not in plan.cancel and c.request_id not in plan.starts]
        ticks += 1
    assert ticks == 3 and sorted(canceled) == list(range(1, 1201))  # 500, 500, 200; alpha's started meanwhile
    assert canceled[:3] == [1200, 1199, 1198]  # in queue order: the oldest first


def test_a_head_whose_patient_left_fails_and_the_next_one_starts() -> None:
    rules = DestinationRules("xnat", True, 1)
    queue = [ForwardCandidate(1, "alpha", 5, NOW, patient_allowed=False), ForwardCandidate(2, "alpha", 0, NOW)]
    plan = plan_destination(NOW, rules, 0, {"alpha": None}, forward_heads(NOW, rules, 0, {"alpha": None}, queue), None)
    assert plan.fail == {1: "the patient is no longer on the project's IRB allow-list"} and plan.starts == [2]
    # With the destination busy nothing of the project is read, and so nothing fails yet.
    assert forward_heads(NOW, rules, 1, {"alpha": None}, queue) == []
    assert forward_waiting_reason(NOW, queue[0], 1, 1) == (  # and it says so meanwhile
        "the patient is no longer on the project's IRB allow-list: the forward fails when it reaches the head of the queue")


def test_forwards_held_back_take_no_place_among_the_heads() -> None:
    """However many forwards wait for their retry or for their study in flight, the ones behind that may start do."""
    rules = DestinationRules("xnat", True, 1)
    later = NOW + timedelta(minutes=5)
    queue = [ForwardCandidate(n, "alpha", 5, NOW, not_before=later) for n in range(1, 31)]
    queue += [ForwardCandidate(100 + n, "alpha", 5, NOW, study_busy=True) for n in range(1, 31)]
    queue.append(ForwardCandidate(200, "alpha", 0, NOW))
    heads = forward_heads(NOW, rules, 0, {"alpha": None}, queue)
    assert [c.request_id for c in heads] == [200]
    assert plan_destination(NOW, rules, 0, {"alpha": None}, heads, None).starts == [200]
