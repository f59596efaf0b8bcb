"""The governance scheduler, driven through random workloads on a simulated clock.

Each example builds projects (quotas, requests with priorities and sizes),
PACS windows (closed spans, concurrency caps, per-minute and per-hour rates)
and cancellations, then runs `plan_pacs` every 7 simulated seconds (jumping over idle spans) for eight
days while retrievals take their random durations. The invariants are the
promises made to radiology and to researchers.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime, time, timedelta
from zoneinfo import ZoneInfo

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mi2b2.domain.scheduler import Candidate, PacsLoad, ProjectBudget, plan_pacs
from mi2b2.domain.windows import GovernanceWindow, limits_at

START = datetime(2026, 11, 23, 0, 0, tzinfo=UTC)  # a Monday
TICK = timedelta(seconds=7)
MiB = 1024 * 1024


@dataclass
class SimRequest:
    request_id: int
    project_id: str
    priority: int
    created_at: datetime
    size: int
    duration: timedelta
    cancel_at: datetime | None = None
    state: str = "scheduled"
    started_at: datetime | None = None


@dataclass
class SimProject:
    project_id: str
    quota: int
    used: int = 0
    in_flight: int = 0


@dataclass
class Workload:
    projects: dict[str, SimProject]
    requests: list[SimRequest]
    windows: tuple[GovernanceWindow, ...]
    default_max_concurrent: int
    zone: ZoneInfo
    starts: list[tuple[datetime, str]] = field(default_factory=list)


@st.composite
def windows(draw: st.DrawFn) -> tuple[GovernanceWindow, ...]:
    result = []
    for n in range(draw(st.integers(0, 3))):
        start = time(draw(st.integers(0, 23)))
        end = time(draw(st.integers(0, 23)))
        result.append(
            GovernanceWindow(
                name=f"w{n}",
                days=frozenset(draw(st.sets(st.integers(0, 6), min_size=1))),
                start=start,
                end=end,
                closed=draw(st.booleans()),
                max_concurrent=draw(st.none() | st.integers(1, 4)),
                studies_per_minute=draw(st.none() | st.integers(1, 5)),
                studies_per_hour=draw(st.none() | st.integers(1, 40)),
            )
        )
    # An always-open catch-all at the end, so every workload can finish in time.
    result.append(GovernanceWindow("rest", frozenset(range(7)), time(0), time(0), max_concurrent=draw(st.integers(1, 3))))
    return tuple(result)


@st.composite
def workloads(draw: st.DrawFn) -> Workload:
    project_ids = [f"p{n}" for n in range(draw(st.integers(1, 4)))]
    projects = {pid: SimProject(pid, quota=draw(st.integers(20, 200)) * MiB) for pid in project_ids}
    requests = []
    for n in range(draw(st.integers(1, 40))):
        pid = draw(st.sampled_from(project_ids))
        created = START + timedelta(minutes=draw(st.integers(0, 120)))
        cancel = draw(st.none() | st.integers(0, 300)) if draw(st.integers(0, 9)) == 0 else None
        requests.append(
            SimRequest(
                request_id=n + 1,
                project_id=pid,
                priority=draw(st.integers(0, 3)),
                created_at=created,
                size=draw(st.integers(1, 20)) * MiB,
                duration=timedelta(seconds=draw(st.integers(5, 600))),
                cancel_at=created + timedelta(minutes=cancel) if cancel is not None else None,
            )
        )
    zone = ZoneInfo(draw(st.sampled_from(["UTC", "America/New_York", "Asia/Kolkata"])))
    return Workload(projects, requests, draw(windows()), draw(st.integers(1, 3)), zone)


def simulate(w: Workload) -> list[str]:
    """Run the workload; return the invariant violations seen (empty when all hold)."""
    problems: list[str] = []
    cursor: str | None = None
    now = START
    end = START + timedelta(days=8)
    while now < end and any(r.state == "processing" or _could_start(r, w) for r in w.requests):
        _finish_and_cancel(w, now)
        limits = limits_at(w.windows, now, w.zone, w.default_max_concurrent)
        active = [r for r in w.requests if r.state == "processing"]
        load = PacsLoad(limits, len(active), [t for t, _ in w.starts if t > now - timedelta(hours=1)])
        budgets = {
            p.project_id: ProjectBudget(p.project_id, True, p.quota, p.used, p.in_flight) for p in w.projects.values()
        }
        queued = [r for r in w.requests if r.state == "scheduled" and r.created_at <= now]
        candidates = [Candidate(r.request_id, r.project_id, r.priority, r.created_at, r.size) for r in queued]
        plan = plan_pacs(now, load, budgets, candidates, cursor)
        problems += _check_plan_order(plan.starts, queued, cursor, budgets, w)
        cursor = plan.last_project
        by_id = {r.request_id: r for r in w.requests}
        for request_id in plan.starts:
            r = by_id[request_id]
            r.state, r.started_at = "processing", now
            w.projects[r.project_id].in_flight += r.size
            w.starts.append((now, r.project_id))
        problems += _check_limits(w, now, limits, len(active) + len(plan.starts), bool(plan.starts))
        missing = {r.request_id for r in queued} - set(plan.starts) - set(plan.waiting)
        if missing:
            problems.append(f"{now}: requests {sorted(missing)} neither started nor given a waiting reason")
        now = now + TICK if plan.starts else _next_event(w, now)
    left = [r.request_id for r in w.requests if r.state == "processing" or _could_start(r, w)]
    # A site may close its PACS for most of the week; progress is promised
    # when it is open at least an hour a day (then 8 days is plenty).
    if left and not any(window.closed for window in w.windows):
        problems.append(f"starved: requests {left} never finished in eight days")
    return problems


def _next_event(w: Workload, now: datetime) -> datetime:
    """When anything the plan depends on can next change: a retrieval ends, a
    request arrives or is canceled, a rate slot opens, or a window turns (on
    the hour). Jumping there keeps three simulated days cheap."""
    times = [now.replace(minute=0, second=0) + timedelta(hours=1)]
    for r in w.requests:
        if r.state == "processing" and r.started_at is not None:
            times.append(r.started_at + r.duration)
        if r.state == "scheduled":
            times += [t for t in (r.created_at, r.cancel_at) if t is not None and t > now]
    times += [t + span for t, _ in w.starts for span in (timedelta(minutes=1), timedelta(hours=1)) if t + span > now]
    return max(min(times), now + TICK)


def _could_start(r: SimRequest, w: Workload) -> bool:
    """Still queued and not held forever by its own project's full cache."""
    project = w.projects[r.project_id]
    return r.state == "scheduled" and r.size <= project.quota - project.used

def _finish_and_cancel(w: Workload, now: datetime) -> None:
    for r in w.requests:
        project = w.projects[r.project_id]
        if r.state == "processing" and r.started_at is not None and now >= r.started_at + r.duration:
            r.state = "completed"
            project.in_flight -= r.size
            project.used += r.size
        elif r.cancel_at is not None and now >= r.cancel_at and r.state in ("scheduled", "processing"):
            if r.state == "processing":
                project.in_flight -= r.size
            r.state = "canceled"


def _check_limits(w: Workload, now: datetime, limits, active: int, started: bool) -> list[str]:
    problems = []
    if started and limits.closed:
        problems.append(f"{now}: started while the PACS was closed ({limits.window})")
    if active > limits.max_concurrent and started:
        problems.append(f"{now}: {active} active, cap {limits.max_concurrent}")
    for rate, span in ((limits.studies_per_minute, timedelta(minutes=1)), (limits.studies_per_hour, timedelta(hours=1))):
        if rate is not None and started:
            recent = sum(1 for t, _ in w.starts if t > now - span)
            if recent > rate:
                problems.append(f"{now}: {recent} starts in the last {span}, rate {rate}")
    for p in w.projects.values():
        if p.used + p.in_flight > p.quota:
            problems.append(f"{now}: project {p.project_id} over quota ({p.used + p.in_flight} > {p.quota})")
    return problems


def _check_plan_order(
    starts: list[int], queued: list[SimRequest], cursor: str | None, budgets, w: Workload
) -> list[str]:
    """Round-robin: turns go in cyclic project order after the cursor, and
    inside a project by priority then age."""
    problems = []
    by_id = {r.request_id: r for r in queued}
    order = [by_id[i].project_id for i in starts]
    turns = sorted({r.project_id for r in queued})
    # Among the projects that got a start, each one's first start comes in
    # cyclic order after the cursor.
    firsts = list(dict.fromkeys(order))
    expected = sorted(firsts, key=lambda pid: (pid <= (cursor or ""), pid)) if cursor else sorted(firsts)
    if firsts != expected:
        problems.append(f"turns {firsts} are not in cyclic order after {cursor} (queued: {turns})")
    # No project gets a second turn while another got none but still had work that fit.
    counts = Counter(order)
    if counts and max(counts.values()) > 1:
        for pid in turns:
            if counts[pid] == 0 and _head_fits(pid, queued, budgets):
                problems.append(f"{pid} skipped while others started twice: {order}")
    for pid in firsts:
        mine = [by_id[i] for i in starts if by_id[i].project_id == pid]
        free = budgets[pid].quota_bytes - budgets[pid].used_bytes
        rest = [r for r in queued if r.project_id == pid and r.request_id not in starts and r.size <= free]
        worst_started = min((-r.priority, r.created_at, r.request_id) for r in mine)
        if any((-r.priority, r.created_at, r.request_id) < worst_started for r in rest):
            problems.append(f"{pid}: a better request waited while a worse one started")
    return problems


def _head_fits(pid: str, queued: list[SimRequest], budgets) -> bool:
    b = budgets[pid]
    fitting = [r for r in queued if r.project_id == pid and r.size <= b.quota_bytes - b.used_bytes]
    mine = sorted(fitting, key=lambda r: (-r.priority, r.created_at, r.request_id))
    return bool(mine) and mine[0].size <= b.quota_bytes - b.used_bytes - b.in_flight_bytes


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(workloads())
def test_random_workloads_keep_every_governance_promise(w: Workload) -> None:
    assert simulate(w) == []


def test_three_projects_take_turns_when_one_slot_frees_at_a_time() -> None:
    w = Workload(
        projects={pid: SimProject(pid, quota=1000 * MiB) for pid in ("alpha", "beta", "gamma")},
        requests=[
            SimRequest(n + 1, pid, 0, START, MiB, timedelta(seconds=5))
            for n, pid in enumerate(["alpha"] * 4 + ["beta"] * 4 + ["gamma"] * 4)
        ],
        windows=(GovernanceWindow("all", frozenset(range(7)), time(0), time(0), max_concurrent=1),),
        default_max_concurrent=1,
        zone=ZoneInfo("UTC"),
    )
    assert simulate(w) == []
    assert [pid for _, pid in w.starts] == ["alpha", "beta", "gamma"] * 4


def test_a_full_cache_holds_only_its_own_project() -> None:
    now = START
    budgets = {
        "full": ProjectBudget("full", True, quota_bytes=10 * MiB, used_bytes=9 * MiB, in_flight_bytes=0),
        "roomy": ProjectBudget("roomy", True, quota_bytes=100 * MiB, used_bytes=0, in_flight_bytes=0),
    }
    candidates = [Candidate(1, "full", 0, now, 5 * MiB), Candidate(2, "roomy", 0, now, 5 * MiB)]
    load = PacsLoad(limits_at((), now, ZoneInfo("UTC"), 4), 0, [])
    plan = plan_pacs(now, load, budgets, candidates, None)
    assert plan.starts == [2]
    assert plan.waiting[1].startswith("project cache full: 1.0 MiB free, this study needs about 5.0 MiB")


def test_expired_irb_cancels_and_other_holds_say_why() -> None:
    now = START
    budgets = {
        "old": ProjectBudget("old", False, 10 * MiB, 0, 0),
        "live": ProjectBudget("live", True, 100 * MiB, 0, 0),
    }
    candidates = [
        Candidate(1, "old", 0, now, MiB),
        Candidate(2, "live", 0, now, MiB, patient_allowed=False),
        Candidate(3, "live", 0, now, MiB, not_before=now + timedelta(minutes=5)),
        Candidate(4, "live", 0, now, MiB, study_busy=True),
        Candidate(5, "live", 0, now, MiB),
        Candidate(6, "live", 0, now, MiB),
    ]
    load = PacsLoad(limits_at((), now, ZoneInfo("UTC"), 1), 0, [now - timedelta(seconds=5)])
    plan = plan_pacs(now, load, budgets, candidates, None)
    assert plan.cancel == {1: "the project's IRB approval has expired"}
    assert plan.starts == [5]
    assert plan.waiting[2] == "patient no longer on the project's IRB allow-list"
    assert plan.waiting[3].startswith("retry after a transient failure")
    assert plan.waiting[4].startswith("the same study is being retrieved")
    assert plan.waiting[6] == "PACS busy: 1 of 1 retrievals active (default)"


def test_rate_limit_reason_names_the_next_slot() -> None:
    now = START + timedelta(hours=10)
    window = GovernanceWindow("day", frozenset(range(7)), time(0), time(0), max_concurrent=5, studies_per_minute=2)
    recent = [now - timedelta(seconds=50), now - timedelta(seconds=20)]
    plan = plan_pacs(now, PacsLoad(limits_at((window,), now, ZoneInfo("UTC"), 2), 0, recent),
                     {"p": ProjectBudget("p", True, 100 * MiB, 0, 0)}, [Candidate(1, "p", 0, now, MiB)], None)
    assert plan.starts == []
    assert plan.waiting[1] == "rate limit: 2 studies per minute (day); next start after 10:00:10 UTC"
