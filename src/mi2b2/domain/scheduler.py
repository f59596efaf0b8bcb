"""Which queued retrievals may start on one PACS now, and why the others wait.

This is the promise to radiology ("we will never hurt the PACS") as one pure
function. The caller reads the counters from the database under a lock, asks
`plan_pacs`, and writes the plan back in the same transaction, so several
workers hold the same limits together.

A request starts only if all of these hold:

* its project is active and its IRB has not expired (otherwise it is canceled),
* its patient is on the project's allow-list,
* its backoff delay (after a transient failure) has passed,
* no other request is retrieving the same study from this PACS,
* the PACS's active window is open, fewer than ``max_concurrent`` retrievals
  are active, and fewer than ``studies_per_minute`` / ``studies_per_hour``
  started in the last 60 / 3600 seconds (a sliding window, so no minute or
  hour, wherever it begins, sees more starts than the rate),
* the project's cache has room for its used space plus everything in flight
  plus this study's expected size.

Projects take turns (round-robin, continuing after the project served last);
inside a project the highest priority goes first, then the oldest request.

A tick never needs the whole queue: at most ``starts_left`` requests can start
on a PACS, so per project only its first ``starts_left`` requests that nothing
but the PACS limits holds back (``queue_heads``) decide the plan. Why the other
requests wait is one reason per project (``Plan.queue_reasons``) plus what is
true of the request itself, put together when the request is read
(``waiting_reason``), so a tick writes nothing for requests that did not change.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from mi2b2.domain.windows import Limits

MINUTE = timedelta(minutes=1)
HOUR = timedelta(hours=1)


@dataclass(frozen=True)
class Candidate:
    """A scheduled request waiting for this PACS."""

    request_id: int
    project_id: str
    priority: int
    created_at: datetime
    expected_bytes: int
    patient_allowed: bool = True
    not_before: datetime | None = None
    study_busy: bool = False  # the same study is being retrieved from this PACS


@dataclass(frozen=True)
class ProjectBudget:
    project_id: str
    may_retrieve: bool  # active and IRB not expired
    quota_bytes: int
    used_bytes: int
    in_flight_bytes: int
    closed_reason: str = "the project's IRB approval has expired"


@dataclass(frozen=True)
class PacsLoad:
    limits: Limits
    active: int
    recent_starts: Sequence[datetime]  # starts on this PACS within the last hour (any project, any worker)
    # Why nothing may start now although the PACS could send: its C-MOVE needs a
    # receiver of ours and none is alive (None when one is, or the PACS sends by C-GET).
    receiver_down: str | None = None


WAITING_FOR_SCHEDULER = "waiting for the scheduler"


@dataclass
class Plan:
    starts: list[int] = field(default_factory=list)  # request ids, in start order
    waiting: dict[int, str] = field(default_factory=dict)  # request id -> why it waits
    cancel: dict[int, str] = field(default_factory=dict)  # request id -> why it can never start
    last_project: str | None = None  # the round-robin cursor after this plan
    # project id -> why its requests that only the PACS limits or the project's in-flight
    # quota hold back wait; one per configured project, stored as one row per project and PACS
    queue_reasons: dict[str, str] = field(default_factory=dict)


def plan_pacs(
    now: datetime,
    load: PacsLoad,
    projects: Mapping[str, ProjectBudget],
    candidates: Sequence[Candidate],
    last_project: str | None,
) -> Plan:
    plan = Plan(last_project=last_project)
    queues = _eligible_queues(now, projects, candidates, plan)
    in_flight = {pid: projects[pid].in_flight_bytes for pid in queues}

    held: dict[str, str] = {}
    while queues and _starts_left(now, load, len(plan.starts))[0] > 0:
        project_id = _next_in_turn(sorted(queues), plan.last_project)
        queue = queues[project_id]
        room = _room(projects[project_id], in_flight[project_id])
        if queue and queue[0].expected_bytes <= room:
            head = queue.pop(0)
            plan.starts.append(head.request_id)
            plan.last_project = project_id
            in_flight[project_id] += head.expected_bytes
        elif queue:
            # The head would fit once running retrievals finish: hold the whole
            # project rather than let smaller studies overtake it forever.
            held[project_id] = (
                f"project cache quota: {_size(room)} free now, the next study needs about {_size(queue[0].expected_bytes)}"
            )
            plan.waiting.update({c.request_id: held[project_id] for c in queue})
            queue.clear()
        if not queue:
            del queues[project_id]

    left, held_because = _starts_left(now, load, len(plan.starts))
    for queue in queues.values():
        plan.waiting.update({c.request_id: held_because for c in queue})
    for project_id, project in projects.items():
        if not project.may_retrieve:
            plan.queue_reasons[project_id] = project.closed_reason
        else:
            plan.queue_reasons[project_id] = held.get(project_id, held_because if left == 0 else WAITING_FOR_SCHEDULER)
    return plan


def queue_heads(
    now: datetime, load: PacsLoad, projects: Mapping[str, ProjectBudget], candidates: Sequence[Candidate]
) -> list[Candidate]:
    """What a tick reads of the queue: per open project, the first ``starts_left`` requests
    (best first) that nothing of their own holds back, and every request of a closed project
    (to cancel). ``plan_pacs`` over these gives the starts it gives over the whole queue.

    This is the database query's specification; the scheduler service runs it as SQL."""
    n = _starts_left(now, load, 0)[0]
    def is_open(c: Candidate) -> bool:
        return c.project_id in projects and projects[c.project_id].may_retrieve

    closed = [c for c in candidates if not is_open(c)]
    open_ = sorted(
        (c for c in candidates if is_open(c) and _own_reason(now, c, _free(projects[c.project_id])) is None),
        key=_queue_order,
    )
    heads: list[Candidate] = []
    taken: dict[str, int] = {}
    for c in open_:
        if taken.get(c.project_id, 0) < n:
            heads.append(c)
            taken[c.project_id] = taken.get(c.project_id, 0) + 1
    return closed + heads


def waiting_reason(now: datetime, c: Candidate, free_bytes: int, queue_reason: str | None) -> str:
    """Why a scheduled request waits, put together when it is read: what holds it back
    itself, or else what holds back its project's queue on its PACS (``Plan.queue_reasons``).
    For every request ``plan_pacs`` leaves waiting this is the reason the plan gives it."""
    return _own_reason(now, c, free_bytes) or queue_reason or WAITING_FOR_SCHEDULER


def _own_reason(now: datetime, c: Candidate, free_bytes: int) -> str | None:
    if not c.patient_allowed:
        return "patient no longer on the project's IRB allow-list"
    if c.not_before is not None and c.not_before > now:
        return f"retry after a transient failure, not before {c.not_before:%Y-%m-%d %H:%M:%S} UTC"
    if c.study_busy:
        return "the same study is being retrieved from this PACS for another request"
    if c.expected_bytes > free_bytes:
        # It would not fit even with nothing in flight: someone must free space or raise the quota.
        return (
            f"project cache full: {_size(free_bytes)} free, this study needs about {_size(c.expected_bytes)}; "
            "delete studies from the cache or ask the site admin to raise the quota"
        )
    return None


def _queue_order(c: Candidate) -> tuple[int, datetime, int]:
    return (-c.priority, c.created_at, c.request_id)


def _eligible_queues(
    now: datetime, projects: Mapping[str, ProjectBudget], candidates: Sequence[Candidate], plan: Plan
) -> dict[str, list[Candidate]]:
    """Per project, the requests that only the PACS limits can still hold back, best first."""
    queues: dict[str, list[Candidate]] = {}
    for c in candidates:
        project = projects.get(c.project_id)
        if project is None:
            plan.cancel[c.request_id] = "the project is no longer configured"
        elif not project.may_retrieve:
            plan.cancel[c.request_id] = project.closed_reason
        elif (reason := _own_reason(now, c, _free(project))) is not None:
            plan.waiting[c.request_id] = reason
        else:
            queues.setdefault(c.project_id, []).append(c)
    for queue in queues.values():
        queue.sort(key=_queue_order)
    return queues


def starts_left(now: datetime, load: PacsLoad) -> int:
    """How many retrievals may start on the PACS now: per project, how many heads a tick reads."""
    return _starts_left(now, load, 0)[0]


def _starts_left(now: datetime, load: PacsLoad, started: int) -> tuple[int, str]:
    """How many more retrievals may start now after ``started`` began in this
    plan, and the reason to give the requests held back when that is none."""
    limits = load.limits
    if limits.closed:
        return 0, f"PACS closed now ({limits.window})"
    if load.receiver_down is not None:
        return 0, load.receiver_down
    active = load.active + started
    cap = limits.max_concurrent
    options = [(cap - active, f"PACS busy: {active} of {cap} retrievals active ({limits.window})")]
    starts = [*load.recent_starts, *([now] * started)]
    for rate, span, unit in ((limits.studies_per_minute, MINUTE, "minute"), (limits.studies_per_hour, HOUR, "hour")):
        if rate is None:
            continue
        recent = sorted(t for t in starts if t > now - span)
        # When the budget is spent, the next slot opens as the oldest counted start leaves the window.
        opens = recent[-rate] + span if len(recent) >= rate else now
        reason = f"rate limit: {rate} studies per {unit} ({limits.window}); next start after {opens:%H:%M:%S} UTC"
        options.append((rate - len(recent), reason))
    left, reason = min(options, key=lambda option: option[0])
    return max(left, 0), reason


def _next_in_turn(project_ids: list[str], last_project: str | None) -> str:
    """The first project after ``last_project`` in a fixed cyclic order."""
    if last_project is not None:
        for project_id in project_ids:
            if project_id > last_project:
                return project_id
    return project_ids[0]


def _free(project: ProjectBudget) -> int:
    """Space the project's cache has with nothing in flight."""
    return project.quota_bytes - project.used_bytes


def _room(project: ProjectBudget, in_flight: int) -> int:
    return project.quota_bytes - project.used_bytes - in_flight


def _size(n: int) -> str:
    value = float(max(n, 0))
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024:
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"
