"""The channel between a retrieval and the receiver that takes in its instances.

They may run in different processes, so they speak only through the request's
row, in columns named for what they say:

* retrieval -> receiver: `record_attempt` names the C-MOVE this attempt sends
  (its Message ID and destination AE), which the receiver matches arriving
  instances by (`domain.receipt.match_retrieval`); it also clears what the
  receiver said about an earlier attempt.
* receiver -> retrieval: `record_write_failure` says the receiver could not
  write this attempt's instances to the cache, and why; the instances it did
  write it counts in `received` as it indexes them.
* `receipt_of` is what retrieval reads back: how many instances are counted,
  and the write failure, if any. A retrieval ends only once the request counts
  what the PACS says was acknowledged, or the receiver reported it cannot write.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from sqlalchemy import select, update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import Request
from mi2b2.domain.receipt import StoreStatus
from mi2b2.errors import RetriableError
from mi2b2.services.context import ServiceContext

LOG = logging.getLogger(__name__)


@dataclass(frozen=True)
class MoveSent:
    """The C-MOVE a retrieval attempt sends: the PACS echoes its message id in each C-STORE."""

    message_id: int
    destination_ae: str


@dataclass(frozen=True)
class Receipt:
    """What the receiver has done for one retrieval attempt so far."""

    received: int  # instances indexed and counted
    write_failure: str | None  # why it could not write to the cache, if it could not

    def accounts_for(self, acknowledged: int) -> bool:
        """Nothing more to wait for: every acknowledged instance counted, or the attempt failed."""
        return self.received >= acknowledged or self.write_failure is not None


class ReceiptLost(RetriableError):
    """The PACS says mi2b2's receiver took more instances than any receiver counted: one died between
    its answer and its index (answers come before indexing, in groups), or indexing lagged behind.
    Ours, not the PACS's: the study is asked for again (what was counted stays, nothing is stored twice)."""

    def __init__(self, acknowledged: int, counted: int) -> None:
        super().__init__(f"the PACS says {acknowledged} instances were delivered and acknowledged, but mi2b2 "
                         f"counted {counted}: a receiver stopped before it indexed them, so the study is asked "
                         "for again")


def record_attempt(ctx: ServiceContext, request_id: int, move: MoveSent | None) -> None:
    """Before the PACS is asked to send: which C-MOVE (None for a C-GET) this attempt is."""
    with transaction(ctx.sessions) as session:
        session.execute(update(Request).where(Request.id == request_id).values(
            move_message_id=move.message_id if move else None,
            move_destination_ae=move.destination_ae if move else None,
            write_failure=None, write_failed_at=None))


def record_write_failure(ctx: ServiceContext, request_id: int, reason: str) -> None:
    """The receiver could not write an instance of this request to the cache: the attempt fails."""
    LOG.error("request %s: %s", request_id, reason)
    with transaction(ctx.sessions) as session:
        # last_status and last_error show users what the receiver answered the PACS meanwhile.
        session.execute(update(Request).where(Request.id == request_id).values(
            failed=Request.failed + 1, last_error=reason, last_status=int(StoreStatus.OUT_OF_RESOURCES),
            write_failure=reason, write_failed_at=ctx.clock.now()))


def receipt_of(ctx: ServiceContext, request_id: int) -> Receipt:
    with ctx.sessions() as session:
        received, failure = session.execute(
            select(Request.received, Request.write_failure).where(Request.id == request_id)).one()
    return Receipt(int(received), failure)
