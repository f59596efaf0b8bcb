"""The life of a request (retrieve or forward) as one table: (state, event) -> state.

    (added) ─> scheduled ──start──> processing ──complete──> completed
                 │  ^  ^               │  │  ├───partial───> incomplete
                 │  │  └─back_off──────┤  │  └───fail──────> failed
                 │  └────requeue───────┘  └───cancel──────> canceled
                 ├──refuse─────────────────────────────────> failed
                 └──cancel─────────────────────────────────> canceled

    failed | incomplete | canceled ──retry──> scheduled

Every change of a request's state is one `apply` of an event; a pair the table
does not list raises `IllegalTransition`, so a race or a bug (completing a
request a user canceled, ending one a second worker has requeued) is refused
where it happens instead of being written. What a user may ask for (cancel,
retry) is read from the same table.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

from mi2b2.errors import Mi2b2Error


class RequestState(StrEnum):
    SCHEDULED = "scheduled"
    PROCESSING = "processing"
    COMPLETED = "completed"
    INCOMPLETE = "incomplete"
    FAILED = "failed"
    CANCELED = "canceled"


class Event(StrEnum):
    """What happens to a request."""

    START = "start"  # the scheduler gives it a slot and a worker
    BACK_OFF = "back off"  # an attempt met a transient failure; it waits for its next try
    REQUEUE = "requeue"  # the worker running it is gone
    COMPLETE = "complete"  # every expected instance arrived (or was stored)
    PARTIAL = "partial"  # it ended with some instances missing
    FAIL = "fail"  # the attempt failed for good
    REFUSE = "refuse"  # the scheduler finds a queued request can never run (its destination no longer allows it)
    CANCEL = "cancel"  # a user, the scheduler or a configuration change ends it
    RETRY = "retry"  # a user queues an ended request again


# New requests enter here; a request is never created in any other state.
INITIAL = RequestState.SCHEDULED

TABLE: Mapping[tuple[RequestState, Event], RequestState] = {
    (RequestState.SCHEDULED, Event.START): RequestState.PROCESSING,
    (RequestState.SCHEDULED, Event.REFUSE): RequestState.FAILED,
    (RequestState.SCHEDULED, Event.CANCEL): RequestState.CANCELED,
    (RequestState.PROCESSING, Event.BACK_OFF): RequestState.SCHEDULED,
    (RequestState.PROCESSING, Event.REQUEUE): RequestState.SCHEDULED,
    (RequestState.PROCESSING, Event.COMPLETE): RequestState.COMPLETED,
    (RequestState.PROCESSING, Event.PARTIAL): RequestState.INCOMPLETE,
    (RequestState.PROCESSING, Event.FAIL): RequestState.FAILED,
    (RequestState.PROCESSING, Event.CANCEL): RequestState.CANCELED,
    # Canceling is also how a user pauses a retrieval (a PACS busy today, a wrong priority); retry resumes it.
    (RequestState.FAILED, Event.RETRY): RequestState.SCHEDULED,
    (RequestState.INCOMPLETE, Event.RETRY): RequestState.SCHEDULED,
    (RequestState.CANCELED, Event.RETRY): RequestState.SCHEDULED,
}

ENDED = frozenset({RequestState.COMPLETED, RequestState.INCOMPLETE, RequestState.FAILED, RequestState.CANCELED})

# The event that ends a running request in each end state (a judged outcome names its state).
ENDING = {
    RequestState.COMPLETED: Event.COMPLETE,
    RequestState.INCOMPLETE: Event.PARTIAL,
    RequestState.FAILED: Event.FAIL,
    RequestState.CANCELED: Event.CANCEL,
}


class IllegalTransition(Mi2b2Error):
    """A state change the table does not allow: a bug or a race, never written."""

    def __init__(self, state: str, event: Event) -> None:
        allowed = sorted(e.value for s, e in TABLE if s == state)
        super().__init__(
            f"a {state} request cannot {event.value}: from {state} only "
            + (", ".join(allowed) if allowed else "nothing") + " may happen"
        )
        self.state = state
        self.event = event


def apply(state: str, event: Event) -> RequestState:
    """The state after ``event``; raises `IllegalTransition` for any pair the table does not list."""
    try:
        return TABLE[RequestState(state), event]
    except (KeyError, ValueError):
        raise IllegalTransition(state, event) from None


def allows(state: str, event: Event) -> bool:
    return (state, event) in TABLE


def sources(event: Event) -> frozenset[RequestState]:
    """The states ``event`` may happen in: the WHERE clause of a bulk change, and what a user may ask for."""
    return frozenset(state for state, e in TABLE if e is event)
