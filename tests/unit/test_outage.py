"""Telling a database outage from other database errors, and saying so once."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from sqlalchemy import create_engine, text
from sqlalchemy.exc import IntegrityError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from mi2b2.adapters.db.engine import make_engine
from mi2b2.adapters.db.outage import DatabaseUnavailable, OutageLog, as_outage, is_outage


def test_a_pool_with_no_free_connection_is_an_outage(tmp_path: Path) -> None:
    engine = create_engine(f"sqlite:///{tmp_path / 'db'}", pool_size=1, max_overflow=0, pool_timeout=0.1)
    with engine.connect(), pytest.raises(PoolTimeout) as timed_out, engine.connect():
        pass
    assert is_outage(timed_out.value)
    assert isinstance(as_outage(timed_out.value), DatabaseUnavailable)


def test_a_database_that_cannot_be_opened_is_unavailable(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'no such folder' / 'db'}")
    with pytest.raises(DatabaseUnavailable, match="the database is unreachable; retry in a moment"), engine.connect():
        pass


def test_statement_errors_on_a_live_connection_are_not_outages(tmp_path: Path) -> None:
    engine = make_engine(f"sqlite:///{tmp_path / 'db'}")
    with engine.begin() as connection:
        connection.execute(text("CREATE TABLE t (id INTEGER PRIMARY KEY)"))
        connection.execute(text("INSERT INTO t VALUES (1)"))
    with pytest.raises(IntegrityError) as duplicate, engine.begin() as connection:
        connection.execute(text("INSERT INTO t VALUES (1)"))
    with pytest.raises(OperationalError) as missing, engine.begin() as connection:
        connection.execute(text("SELECT * FROM no_such_table"))
    assert not is_outage(duplicate.value) and not is_outage(missing.value)
    assert as_outage(ValueError("x")) is None


def test_the_outage_is_said_once_and_the_waits_grow_to_a_limit(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="mi2b2.adapters.db.outage")
    log = OutageLog("worker", first_wait=1.0, longest_wait=5.0)
    assert [log.failed() for _ in range(5)] == [1.0, 2.0, 4.0, 5.0, 5.0]
    assert log.down
    log.succeeded()
    log.succeeded()
    assert not log.down
    assert [r.getMessage() for r in caplog.records] == [
        "worker: the database is unreachable; retrying until it is back", "worker: the database is reachable again"]
