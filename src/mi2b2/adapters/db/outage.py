"""A database that cannot be reached, told apart from every other database error.

An outage (the server is down, restarting, refusing connections, or dropped
ours; or the pool has no connection to give within its timeout) is worth
retrying: it becomes `DatabaseUnavailable`, the API answers it 503 with a
Retry-After, and the worker and the receiver wait it out. Any other error (a
constraint violation, a bad statement, a deadlock) is not an outage and keeps
its own type.

`translate_outages` hooks the engine so that the services see the translated
error wherever a statement or a connect fails; `is_outage` also recognises
what reaches the caller untranslated (the pool's own timeout, raised before
any driver call).
"""

from __future__ import annotations

import logging
import threading
from typing import Final

from sqlalchemy import Engine, event
from sqlalchemy import exc as sa_exc
from sqlalchemy.engine import ExceptionContext

from mi2b2.errors import RetriableError

LOG = logging.getLogger(__name__)

# SQLSTATEs that mean the connection, not the statement, failed: class 08
# (connection exception), and the server shutting down or not yet accepting
# connections (57P01-57P03). Other codes, constraint violations included, are not outages.
_CONNECTION_CLASS: Final = "08"
_SERVER_GOING_AWAY: Final = frozenset({"57P01", "57P02", "57P03"})


class DatabaseUnavailable(RetriableError):
    """The database cannot be reached right now; the same call may work in a moment."""

    retry_after = 5

    def __init__(self) -> None:
        super().__init__("the database is unreachable; retry in a moment — if it persists, "
                         "the site's administrator should check the database server")


def translate_outages(engine: Engine) -> None:
    """Make every connection-level failure on ``engine`` raise DatabaseUnavailable."""

    @event.listens_for(engine, "handle_error")
    def _outage(context: ExceptionContext) -> BaseException | None:
        if context.is_pre_ping:
            return None  # the pool replaces a dead pooled connection by itself; only its replacement failing counts
        if _connection_failed(context):
            return DatabaseUnavailable()
        return None


def _connection_failed(context: ExceptionContext) -> bool:
    if context.is_disconnect:
        return True
    if context.connection is None:  # the driver could not open a connection at all
        return True
    return _sqlstate_says_connection(context.original_exception)


def _sqlstate_says_connection(error: BaseException | None) -> bool:
    sqlstate = getattr(error, "sqlstate", None)  # psycopg's; SQLite has none
    return isinstance(sqlstate, str) and (sqlstate.startswith(_CONNECTION_CLASS) or sqlstate in _SERVER_GOING_AWAY)


def is_outage(error: BaseException) -> bool:
    """True for a database outage, translated or not; False for every other error."""
    if isinstance(error, DatabaseUnavailable | sa_exc.DisconnectionError):
        return True
    if isinstance(error, sa_exc.TimeoutError):  # the pool's: no connection free within its timeout
        return True
    if isinstance(error, sa_exc.DBAPIError) and isinstance(error, sa_exc.OperationalError | sa_exc.InterfaceError):
        return bool(error.connection_invalidated) or _sqlstate_says_connection(error.orig)
    return False


def as_outage(error: BaseException) -> DatabaseUnavailable | None:
    """The error as DatabaseUnavailable when it is an outage, else None."""
    if isinstance(error, DatabaseUnavailable):
        return error
    return DatabaseUnavailable() if is_outage(error) else None


class OutageLog:
    """Says once that the database went away and once that it came back,
    and spaces the retries in between: a loop that retries every poll must
    not fill the log with one traceback per poll."""

    def __init__(self, what: str, first_wait: float, longest_wait: float = 30.0) -> None:
        self.what = what
        self.first_wait = first_wait
        self.longest_wait = longest_wait
        self._wait: float | None = None
        self._lock = threading.Lock()  # the receiver's network threads and its indexer share one

    @property
    def down(self) -> bool:
        return self._wait is not None

    def failed(self) -> float:
        """Record one failed try; returns how long to wait before the next."""
        with self._lock:
            went_down = self._wait is None
            self._wait = self.first_wait if self._wait is None else min(self._wait * 2, self.longest_wait)
            wait = self._wait
        if went_down:
            LOG.warning("%s: the database is unreachable; retrying until it is back", self.what)
        return wait

    def succeeded(self) -> None:
        with self._lock:
            came_back, self._wait = self._wait is not None, None
        if came_back:
            LOG.warning("%s: the database is reachable again", self.what)
