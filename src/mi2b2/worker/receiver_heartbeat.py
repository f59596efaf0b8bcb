"""A receiver's heartbeat: while it beats, workers may start C-MOVEs that send to us.

Receivers (in `mi2b2 serve`, or `mi2b2 receiver` on any host) keep a row in the
workers table, kind "receiver". With receivers known and none alive, the
scheduler starts no C-MOVE and says why in the waiting reason; a receiver that
stops marks its row stale at once, rather than letting the PACS try to send to
nobody until the heartbeat would have gone stale by itself.
"""

from __future__ import annotations

import logging
import threading

from sqlalchemy import update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import Worker, WorkerKind
from mi2b2.domain.health import worker_stale_after
from mi2b2.services.context import ServiceContext
from mi2b2.services.scheduler import heartbeat, new_worker_id

LOG = logging.getLogger(__name__)


class ReceiverHeartbeat:
    def __init__(self, ctx: ServiceContext, interval: float | None = None) -> None:
        self.ctx = ctx
        self.interval = interval or ctx.config.server.worker_poll_seconds
        self.receiver_id = new_worker_id("receiver")
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        heartbeat(self.ctx, self.receiver_id, WorkerKind.RECEIVER)  # alive before the first C-MOVE may start
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="mi2b2-receiver-heartbeat", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(10)
        try:  # stale at once: no worker should start a C-MOVE to a receiver that is gone
            stale = self.ctx.clock.now() - 2 * worker_stale_after(self.interval)
            with transaction(self.ctx.sessions) as session:
                session.execute(update(Worker).where(Worker.id == self.receiver_id).values(heartbeat_at=stale))
        except Exception as exc:  # the database may be what went away; the row then goes stale by itself
            LOG.warning("the receiver could not mark its heartbeat stopped (%s)", type(exc).__name__)

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                heartbeat(self.ctx, self.receiver_id, WorkerKind.RECEIVER)
            except Exception as exc:  # a database outage: beat again next time
                LOG.warning("receiver heartbeat failed (%s)", type(exc).__name__)
