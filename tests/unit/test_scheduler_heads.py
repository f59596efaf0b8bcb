"""Planning over the heads of the queues is planning over the whole queue.

A tick reads per project only its first ``starts_left`` requests that nothing of
their own holds back (``queue_heads``, which the scheduler service runs as SQL).
For any queue, PACS load and project budgets, the plan over those heads must
start the same requests in the same order, cancel the same ones, move the
round-robin cursor the same way, and give the same per-project reasons; and
every request the whole-queue plan leaves waiting must read (``waiting_reason``)
the reason that plan gave it.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mi2b2.domain.scheduler import (
    WAITING_FOR_SCHEDULER,
    Candidate,
    PacsLoad,
    Plan,
    ProjectBudget,
    plan_pacs,
    queue_heads,
    waiting_reason,
)
from mi2b2.domain.windows import GovernanceWindow, limits_at

NOW = datetime(2026, 11, 23, 12, 0, tzinfo=UTC)
MiB = 1024 * 1024


@st.composite
def situations(draw: st.DrawFn) -> tuple[PacsLoad, dict[str, ProjectBudget], list[Candidate], str | None]:
    project_ids = [f"p{n}" for n in range(draw(st.integers(1, 5)))]
    projects = {
        pid: ProjectBudget(pid, draw(st.integers(0, 7)) > 0, quota_bytes=draw(st.integers(5, 60)) * MiB,
                           used_bytes=draw(st.integers(0, 30)) * MiB, in_flight_bytes=draw(st.integers(0, 20)) * MiB)
        for pid in project_ids
    }
    candidates = []
    for n in range(draw(st.integers(0, 60))):
        not_before = draw(st.none() | st.integers(-600, 600).map(lambda s: NOW + timedelta(seconds=s)))
        candidates.append(Candidate(
            request_id=n + 1, project_id=draw(st.sampled_from(project_ids)), priority=draw(st.integers(-2, 2)),
            created_at=NOW - timedelta(minutes=draw(st.integers(0, 30))), expected_bytes=draw(st.integers(1, 25)) * MiB,
            patient_allowed=draw(st.integers(0, 9)) > 0, not_before=not_before, study_busy=draw(st.integers(0, 9)) == 0,
        ))
    window = GovernanceWindow(
        "w", frozenset(range(7)), time(0), time(0), closed=draw(st.integers(0, 9)) == 0,
        max_concurrent=draw(st.integers(1, 6)), studies_per_minute=draw(st.none() | st.integers(1, 6)),
        studies_per_hour=draw(st.none() | st.integers(1, 30)),
    )
    limits = limits_at((window,), NOW, ZoneInfo("UTC"), 2)
    recent = [NOW - timedelta(seconds=draw(st.integers(1, 3599))) for _ in range(draw(st.integers(0, 10)))]
    load = PacsLoad(limits, draw(st.integers(0, 6)), recent)
    cursor = draw(st.none() | st.sampled_from(project_ids))
    return load, projects, candidates, cursor


def _derived(plan: Plan, c: Candidate, projects: dict[str, ProjectBudget]) -> str:
    project = projects[c.project_id]
    return waiting_reason(NOW, c, project.quota_bytes - project.used_bytes, plan.queue_reasons.get(c.project_id))


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(situations())
def test_planning_over_the_heads_gives_the_plan_over_the_whole_queue(situation) -> None:  # type: ignore[no-untyped-def]
    load, projects, candidates, cursor = situation
    whole = plan_pacs(NOW, load, projects, candidates, cursor)
    heads = queue_heads(NOW, load, projects, candidates)
    planned = plan_pacs(NOW, load, projects, heads, cursor)
    assert planned.starts == whole.starts
    assert planned.cancel == whole.cancel
    assert planned.last_project == whole.last_project
    assert planned.queue_reasons == whole.queue_reasons
    for c in candidates:
        if c.request_id in whole.waiting:
            assert _derived(planned, c, projects) == whole.waiting[c.request_id]


@settings(max_examples=200, deadline=None)
@given(situations())
def test_the_heads_are_few_whatever_the_queue(situation) -> None:  # type: ignore[no-untyped-def]
    load, projects, candidates, _ = situation
    heads = queue_heads(NOW, load, projects, candidates)
    open_heads = [c for c in heads if projects[c.project_id].may_retrieve]
    cap = max(load.limits.max_concurrent - load.active, 0)
    assert len(open_heads) <= cap * len(projects)


def test_a_tick_with_no_start_left_reads_no_head_and_every_project_learns_why() -> None:
    projects = {"a": ProjectBudget("a", True, 100 * MiB, 0, 0), "b": ProjectBudget("b", True, 100 * MiB, 0, 0)}
    queue = [Candidate(n, "a" if n % 2 else "b", 0, NOW, MiB) for n in range(1, 1001)]
    load = PacsLoad(limits_at((), NOW, ZoneInfo("UTC"), 2), 2, [])
    assert queue_heads(NOW, load, projects, queue) == []
    plan = plan_pacs(NOW, load, projects, [], None)
    assert plan.queue_reasons == {"a": "PACS busy: 2 of 2 retrievals active (default)",
                                  "b": "PACS busy: 2 of 2 retrievals active (default)"}


def test_a_request_holding_itself_back_says_so_before_its_queue_does() -> None:
    c = Candidate(1, "a", 0, NOW, 5 * MiB, not_before=NOW + timedelta(minutes=2))
    assert waiting_reason(NOW, c, 100 * MiB, "PACS busy").startswith("retry after a transient failure")
    assert waiting_reason(NOW, Candidate(2, "a", 0, NOW, 5 * MiB), MiB, "PACS busy").startswith("project cache full")
    assert waiting_reason(NOW, Candidate(3, "a", 0, NOW, MiB), MiB, None) == WAITING_FOR_SCHEDULER
