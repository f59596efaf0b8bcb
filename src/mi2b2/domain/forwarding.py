"""Forwarding cached studies to other DICOM nodes, as pure rules.

A forward sends a study (or some of its series) from a project's cache to a
destination configured by the site (XNAT, OsiriX, a research PACS). These
functions decide who may forward, which queued forwards start now, which
transfer syntax each instance goes out in, and how a finished forward is
judged. No network, no database, no clock: the services pass all of it in.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime

from mi2b2.domain.governance import DataUse, Denial, ProjectPolicy, cached_data_denial, irb_active
from mi2b2.domain.requests import Outcome, RequestState

EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
# Every DICOM storage SCP must accept Implicit VR Little Endian (PS3.5 10.1)
# and nearly all take Explicit: the fallbacks when the stored syntax is refused.
UNCOMPRESSED = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)
MAX_CONTEXTS = 128  # PS3.8: presentation context ids are the odd numbers 1-255
PATIENT_LEFT = "the patient is no longer on the project's IRB allow-list"


# --- who may forward where -----------------------------------------------------------


def forward_denial(policy: ProjectPolicy, login: str, is_admin: bool, today: date) -> Denial | None:
    """Why ``login`` may not forward from this project now, or None.

    ``today`` is the project's local date. Forwarding sends images out, so it
    follows the rule for reading them (`cached_data_denial`): members only,
    site admins included only where they are members; once the IRB approval
    has lapsed or the project is removed, only under the ``read-only`` data
    policy. Whether each study's patient is still allowed is checked per study."""
    return cached_data_denial(
        DataUse.FORWARD, member=login in policy.members, admin=is_admin, project_active=policy.active,
        irb_active=irb_active(policy.expires, today), patient_allowed=True, policy=policy.data_policy,
    )


def destination_allows(allowed_projects: Collection[str], project_id: str) -> bool:
    """A destination's ``projects`` list names who may use it; an empty list means every project."""
    return not allowed_projects or project_id in allowed_projects


# --- scheduling ----------------------------------------------------------------------


@dataclass(frozen=True)
class DestinationRules:
    """What the site configuration says about one destination now."""

    destination_id: str
    configured: bool  # False: the destination was removed from the configuration
    max_concurrent: int
    projects: frozenset[str] = frozenset()  # empty = every project


@dataclass(frozen=True)
class ForwardCandidate:
    """A scheduled forward waiting for its destination."""

    request_id: int
    project_id: str
    priority: int
    created_at: datetime
    not_before: datetime | None = None
    patient_allowed: bool = True
    study_busy: bool = False  # the same study is being forwarded to this destination for another request


@dataclass
class ForwardPlan:
    starts: list[int] = field(default_factory=list)  # request ids, in start order
    waiting: dict[int, str] = field(default_factory=dict)  # request id -> why it waits
    cancel: dict[int, str] = field(default_factory=dict)  # the project may no longer forward at all
    fail: dict[int, str] = field(default_factory=dict)  # this forward is no longer allowed
    last_project: str | None = None  # the round-robin cursor after this plan


def plan_destination(
    now: datetime,
    rules: DestinationRules,
    active: int,
    closed_projects: Mapping[str, str | None],
    candidates: Sequence[ForwardCandidate],
    last_project: str | None,
) -> ForwardPlan:
    """Which forwards to one destination start now, and why the others do not.

    ``closed_projects`` maps every known project to None (open) or the reason
    it may not forward (IRB expired, project removed); a project missing from
    it is no longer configured. At most ``rules.max_concurrent`` forwards run
    at once; projects take turns after ``last_project``; inside a project the
    highest priority goes first, then the oldest request.

    A closed project's forwards are canceled (as retrievals are when the IRB
    lapses); a forward the destination no longer accepts, or of a patient no
    longer on the allow-list, fails with the reason, so its owner is told.

    A tick passes only the heads of the queue (`forward_heads`), not all of it.
    """
    plan = ForwardPlan(last_project=last_project)
    queues: dict[str, list[ForwardCandidate]] = {}
    for c in candidates:
        end = _project_end(rules, closed_projects, c.project_id)
        if end is not None:
            (plan.cancel if end[0] == RequestState.CANCELED else plan.fail)[c.request_id] = end[1]
        elif not c.patient_allowed:
            plan.fail[c.request_id] = PATIENT_LEFT
        elif (held := _held_back(now, c)) is not None:
            plan.waiting[c.request_id] = held
        else:
            queues.setdefault(c.project_id, []).append(c)
    for queue in queues.values():
        queue.sort(key=_queue_order)

    running = active
    while queues and running < rules.max_concurrent:
        project_id = _next_in_turn(sorted(queues), plan.last_project)
        queue = queues[project_id]
        plan.starts.append(queue.pop(0).request_id)
        plan.last_project = project_id
        running += 1
        if not queue:
            del queues[project_id]
    busy = _busy(running, rules.max_concurrent)
    for queue in queues.values():
        plan.waiting.update({c.request_id: busy for c in queue})
    return plan


# A tick reads of each project's queue to a destination only what it can act on: when every
# forward of the project there must end, a batch of them (the rest end in the next ticks, and
# none starts meanwhile); else, with a slot free, the heads that may start now, a few more than
# the free slots so that heads whose patient left the allow-list (they fail when read) do not
# hold back the ones after them. Never the whole queue: a tick costs what can start.
SWEEP_BATCH = 500  # forwards ended per tick at most, over every destination
FAILING_HEADS = 10  # heads read beyond the free slots, per project and destination


@dataclass(frozen=True)
class HeadsRead:
    """What a tick reads of one project's scheduled forwards to one destination, in queue order
    (priority, then age, then id)."""

    limit: int  # rows at most; 0: none
    ending: bool  # every forward of it ends: all are read, due or not; else only those that may start now


def heads_to_read(
    rules: DestinationRules, active: int, closed_projects: Mapping[str, str | None], project_id: str, sweep_left: int,
) -> HeadsRead:
    """How much of one project's queue to this destination a tick reads (see `forward_heads`)."""
    if _project_end(rules, closed_projects, project_id) is not None:
        return HeadsRead(max(sweep_left, 0), ending=True)
    free = rules.max_concurrent - active
    return HeadsRead(free + FAILING_HEADS if free > 0 else 0, ending=False)


def forward_heads(
    now: datetime,
    rules: DestinationRules,
    active: int,
    closed_projects: Mapping[str, str | None],
    candidates: Sequence[ForwardCandidate],
    sweep_left: int = SWEEP_BATCH,
) -> list[ForwardCandidate]:
    """What a tick reads of one destination's queue, projects in id order: `heads_to_read` rows
    of each, the forwards that must end first in queue order, else those nothing of their own
    holds back (retry not due, study in flight to this destination). ``plan_destination`` over
    these starts what it starts over the whole queue, unless more than `FAILING_HEADS` of a
    project's heads fail at once; those fail, and the next tick reads further.

    This is the database query's specification; the forward scheduler runs it as SQL."""
    queues: dict[str, list[ForwardCandidate]] = {}
    for c in sorted(candidates, key=_queue_order):
        queues.setdefault(c.project_id, []).append(c)
    heads: list[ForwardCandidate] = []
    for project_id in sorted(queues):
        read = heads_to_read(rules, active, closed_projects, project_id, sweep_left)
        queue = queues[project_id] if read.ending else [c for c in queues[project_id] if _held_back(now, c) is None]
        taken = queue[:read.limit]
        if read.ending:
            sweep_left -= len(taken)
        heads += taken
    return heads


def _project_end(
    rules: DestinationRules, closed_projects: Mapping[str, str | None], project_id: str,
) -> tuple[RequestState, str] | None:
    """How every queued forward of this project to this destination ends, if it must: canceled
    when the project may no longer forward, failed when the destination no longer takes it."""
    if project_id not in closed_projects:
        return RequestState.CANCELED, "the project is no longer configured"
    if closed_projects[project_id]:
        return RequestState.CANCELED, str(closed_projects[project_id])
    if not rules.configured:
        return RequestState.FAILED, f"destination {rules.destination_id!r} is no longer configured"
    if not destination_allows(rules.projects, project_id):
        return RequestState.FAILED, (
            f"destination {rules.destination_id!r} no longer accepts forwards from project {project_id!r}")
    return None


def _queue_order(c: ForwardCandidate) -> tuple[int, datetime, int]:
    return -c.priority, c.created_at, c.request_id


def forward_waiting_reason(now: datetime, c: ForwardCandidate, active: int, max_concurrent: int) -> str:
    """Why a queued forward waits, as a reader sees it between two ticks: by the rules
    `plan_destination` applies (the scheduler writes nothing on the requests that wait). One whose
    patient left the allow-list fails when a tick reads it among the heads; until then it says so."""
    if not c.patient_allowed:
        return f"{PATIENT_LEFT}: the forward fails when it reaches the head of the queue"
    held = _held_back(now, c)
    if held is not None:
        return held
    if active >= max_concurrent:
        return _busy(active, max_concurrent)
    return "waiting for the scheduler"


def _held_back(now: datetime, c: ForwardCandidate) -> str | None:
    """What holds this forward back itself, whatever the destination's load."""
    if c.not_before is not None and c.not_before > now:
        return f"retry after a transient failure, not before {c.not_before:%Y-%m-%d %H:%M:%S} UTC"
    if c.study_busy:
        return "the same study is being forwarded to this destination by another request"
    return None


def _busy(active: int, max_concurrent: int) -> str:
    return f"destination busy: {active} of {max_concurrent} forwards active"


def _next_in_turn(project_ids: list[str], last_project: str | None) -> str:
    """The first project after ``last_project`` in a fixed cyclic order."""
    if last_project is not None:
        for project_id in project_ids:
            if project_id > last_project:
                return project_id
    return project_ids[0]


# --- transfer syntaxes ---------------------------------------------------------------


def proposed_contexts(instances: Iterable[tuple[str, str]]) -> list[tuple[str, tuple[str, ...]]]:
    """Presentation contexts to propose for instances given as (SOP class, stored transfer syntax).

    Per SOP class: one context for each stored syntax alone, so that a
    destination accepting it gets the files byte for byte; then one context
    with the uncompressed syntaxes not already proposed, the fallback a
    conversion needs. Stored-syntax contexts come first: if a study has more
    classes than an association can carry, fallbacks are what is dropped.
    """
    stored: dict[str, list[str]] = {}
    for sop_class, syntax in instances:
        syntaxes = stored.setdefault(sop_class, [])
        if syntax not in syntaxes:
            syntaxes.append(syntax)
    contexts: list[tuple[str, tuple[str, ...]]] = [
        (sop_class, (syntax,)) for sop_class, syntaxes in stored.items() for syntax in syntaxes
    ]
    for sop_class, syntaxes in stored.items():
        fallback = tuple(s for s in UNCOMPRESSED if s not in syntaxes)
        if fallback:
            contexts.append((sop_class, fallback))
    return contexts[:MAX_CONTEXTS]


@dataclass(frozen=True)
class SyntaxChoice:
    transfer_syntax: str
    convert: bool  # decode and re-encode: the destination refused the stored syntax


def choose_syntax(stored: str, accepted: Collection[str]) -> SyntaxChoice | None:
    """The syntax to send an instance in, given those the destination accepted for its SOP class.

    The stored syntax if accepted (the file is streamed unchanged), else the
    first accepted uncompressed one (the instance is converted); None if the
    destination accepted neither."""
    if stored in accepted:
        return SyntaxChoice(stored, convert=False)
    for syntax in UNCOMPRESSED:
        if syntax in accepted:
            return SyntaxChoice(syntax, convert=True)
    return None


# --- judging -------------------------------------------------------------------------


def forward_outcome(expected: int, stored: int, failed: int, first_problem: str | None = None) -> Outcome:
    """Judge a forward that ran to its end (not canceled, no transient error).

    ``expected`` counts the instances selected from the cache, ``stored``
    those the destination acknowledged (success or warning), ``failed`` the
    rest (refused by the destination, unreadable or gone from the cache)."""
    why = f" (first problem: {first_problem})" if first_problem else ""
    if expected == 0:
        return Outcome(RequestState.FAILED, "no instance of the study is in the project's cache any more")
    if stored == 0:
        return Outcome(RequestState.FAILED, f"the destination stored none of the {expected} instances{why}")
    missing = max(expected - stored, failed, 0)
    if missing:
        return Outcome(RequestState.INCOMPLETE, f"{missing} of {expected} instances were not stored{why}")
    return Outcome(RequestState.COMPLETED, None)
