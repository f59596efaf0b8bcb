"""The life of a request (retrieve or forward), as pure rules.

Its states and every change between them are one table in
`mi2b2.domain.request_states`; this module adds what users may ask of a
request, the estimates of its size, and the judging of a finished retrieval.
A processing request that meets a transient failure goes back to scheduled
with a ``not_before`` time (exponential backoff) until its attempts run out.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from enum import StrEnum

# The states live with their table; the request log still finds them here.
from mi2b2.domain.request_states import ENDED as ENDED
from mi2b2.domain.request_states import Event, allows, sources
from mi2b2.domain.request_states import RequestState as RequestState


class RequestKind(StrEnum):
    RETRIEVE = "retrieve"
    FORWARD = "forward"


CANCELABLE = sources(Event.CANCEL)
RETRYABLE = sources(Event.RETRY)

# Until an instance has arrived we know only how many to expect; this is a
# CT/MR slice with headroom. Once bytes arrive the estimate follows them.
DEFAULT_INSTANCE_BYTES = 600 * 1024
MIN_STUDY_ESTIMATE = 1024 * 1024


class TransitionRefused(Exception):
    """A user asked for a state change the request's state does not allow."""


def allowed_changes(state: str) -> dict[str, bool]:
    """What a user may do to a request in this state; the checks below refuse the rest."""
    return {"cancel": allows(state, Event.CANCEL), "retry": allows(state, Event.RETRY),
            "priority": state == RequestState.SCHEDULED}


def check_cancel(state: str) -> None:
    if not allows(state, Event.CANCEL):
        raise TransitionRefused(f"a {state} request cannot be canceled: only scheduled or processing ones can")


def check_retry(state: str) -> None:
    if not allows(state, Event.RETRY):
        raise TransitionRefused(f"a {state} request cannot be retried: only failed, incomplete or canceled ones can")


def check_priority_change(state: str) -> None:
    if not allowed_changes(state)["priority"]:
        raise TransitionRefused(f"the priority of a {state} request cannot change: only scheduled ones can")


def estimated_bytes(expected_instances: int, received: int, received_bytes: int) -> int:
    """What a study will occupy in the cache, as well as we know now."""
    if received > 0:
        per_instance = received_bytes / received
        return max(received_bytes, round(per_instance * max(expected_instances, received)))
    return max(MIN_STUDY_ESTIMATE, expected_instances * DEFAULT_INSTANCE_BYTES)


def reserved_bytes(expected_bytes: int, received_bytes: int) -> int:
    """Space an in-flight request still holds beyond what it already wrote."""
    return max(expected_bytes - received_bytes, 0)


@dataclass(frozen=True)
class Outcome:
    state: RequestState
    reason: str | None


def retrieval_outcome(expected: int, received: int, failed_suboperations: int, refused: int) -> Outcome:
    """Judge a retrieval whose C-MOVE/C-GET has finished.

    ``expected`` is the larger of what C-FIND counted and what the PACS said it
    would send; ``received`` counts instances now in the cache for it.
    """
    if received == 0:
        reason = "the PACS sent no instances"
        if refused:
            reason = f"all {refused} instances the PACS sent were refused"
        elif failed_suboperations:
            reason = f"the PACS reported {failed_suboperations} failed sub-operations and sent nothing"
        return Outcome(RequestState.FAILED, reason)
    missing = max(expected - received, 0)
    if missing or failed_suboperations or refused:
        parts = []
        if missing:
            parts.append(f"{missing} of {expected} instances never arrived")
        if failed_suboperations:
            parts.append(f"the PACS reported {failed_suboperations} failed sub-operations")
        if refused:
            parts.append(f"{refused} instances were refused")
        return Outcome(RequestState.INCOMPLETE, "; ".join(parts))
    return Outcome(RequestState.COMPLETED, None)


@dataclass(frozen=True)
class RetryPolicy:
    max_attempts: int = 5
    first_delay: timedelta = timedelta(seconds=30)
    max_delay: timedelta = timedelta(minutes=30)

    def next_try(self, attempts: int, now: datetime) -> datetime | None:
        """When to try again after ``attempts`` transient failures; None when they are used up."""
        if attempts >= self.max_attempts:
            return None
        delay = self.first_delay * (1 << max(attempts - 1, 0))
        return now + min(delay, self.max_delay)
