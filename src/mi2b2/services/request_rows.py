"""The state changes every kind of request goes through, on its database row.

Retrievals and forwards run differently but start, back off and end the same
way; these helpers keep that one way. Every change of a row's state goes
through `change_state`, and so through the table in
`mi2b2.domain.request_states`: a change it does not allow raises before the
row is touched. They change the row in the caller's transaction and commit
nothing themselves.
"""

from __future__ import annotations

from datetime import datetime

from mi2b2.adapters.db.tables import Request
from mi2b2.domain.request_states import ENDING, Event, RequestState, apply


def change_state(row: Request, event: Event) -> None:
    row.state = apply(row.state, event)


def mark_started(row: Request, worker_id: str, now: datetime) -> None:
    change_state(row, Event.START)
    row.worker = worker_id
    row.started_at = now
    row.pacs_done_at = None
    row.attempts += 1
    row.waiting_reason = None
    row.received = row.failed = row.warnings = row.bytes = 0
    row.last_status = None


def mark_backing_off(row: Request, error: Exception, retry_at: datetime, status: int | None = None) -> None:
    """Back to the queue after a transient failure; nothing of this attempt counts."""
    change_state(row, Event.BACK_OFF)
    row.worker = None
    row.not_before = retry_at
    row.last_error = str(error)
    row.last_status = status
    row.received = row.failed = row.warnings = row.bytes = 0
    row.waiting_reason = f"attempt {row.attempts} failed ({type(error).__name__}); retrying after {retry_at:%H:%M:%S} UTC"


def mark_ended(row: Request, state: RequestState, reason: str | None, status: int | None, now: datetime) -> None:
    """End a request in ``state`` (an end state), by the event that ends a request there."""
    change_state(row, ENDING[state])
    row.ended_at = now
    row.waiting_reason = None
    row.cancel_requested = False
    row.last_error = reason
    row.last_status = status


def back_off_unless_canceled(
    row: Request, error: Exception, retry_at: datetime, now: datetime, status: int | None = None
) -> bool:
    """After a transient failure: back to the queue, or end as canceled if a
    user asked for that meanwhile. True when it went back to the queue."""
    if row.cancel_requested:
        mark_ended(row, RequestState.CANCELED, "canceled by a user", status, now)
        return False
    mark_backing_off(row, error, retry_at, status)
    return True
