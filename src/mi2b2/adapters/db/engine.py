"""Engines, sessions and schema upgrades.

SQLite is the zero-setup default: WAL so readers never block the writer, and
``BEGIN IMMEDIATE`` so a transaction takes the write lock up front instead of
failing half-way when it first writes. PostgreSQL is the multi-host choice.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sqlalchemy import CursorResult, Engine, create_engine, event, inspect, text
from sqlalchemy.exc import ArgumentError, OperationalError
from sqlalchemy.orm import Session, sessionmaker
from sqlalchemy.sql.dml import UpdateBase

from mi2b2.adapters.db.outage import DatabaseUnavailable, translate_outages
from mi2b2.errors import ConfigError, PermanentError, RetriableError

if TYPE_CHECKING:  # Alembic loads only where a schema is read or migrated, not in every receiver or worker
    from alembic.config import Config as AlembicConfig

MIGRATIONS = Path(__file__).parent / "migrations"


def make_engine(url: str) -> Engine:
    # hide_parameters: a statement's parameters (MRNs, names) stay out of error messages and so out of logs.
    try:
        if url.startswith("sqlite"):
            engine = create_engine(url, connect_args={"timeout": 30, "check_same_thread": False}, hide_parameters=True)
            _tune_sqlite(engine)
        else:
            engine = create_engine(url, pool_pre_ping=True, pool_size=10, max_overflow=20, hide_parameters=True)
    except (ArgumentError, ModuleNotFoundError) as exc:
        raise ConfigError(
            f"server.database_url {url!r} is not usable ({exc}); "
            "use sqlite:///path/mi2b2.db or postgresql+psycopg://user@host/db"
        ) from None
    translate_outages(engine)
    return engine


def _tune_sqlite(engine: Engine) -> None:
    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # we issue BEGIN ourselves
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA foreign_keys=ON")
        cursor.execute("PRAGMA busy_timeout=30000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(connection: Any) -> None:
        # Units of work take the write lock up front, so two never deadlock
        # upgrading a read lock; plain reads stay deferred, so in WAL mode
        # they neither wait for nor block a writer.
        writes = connection.get_execution_options().get(_WRITES, False)
        connection.exec_driver_sql("BEGIN IMMEDIATE" if writes else "BEGIN")


_WRITES = "mi2b2_writes"


def make_sessionmaker(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


def rows_changed(session: Session, statement: UpdateBase) -> int:
    """Run an UPDATE or DELETE; how many rows it changed."""
    result = session.execute(statement)
    # Only a cursor result counts rows, and a statement without RETURNING always gives one.
    if not isinstance(result, CursorResult):
        raise TypeError(f"{type(statement).__name__} gave no row count")
    return result.rowcount or 0


@contextmanager
def transaction(sessions: sessionmaker[Session]) -> Iterator[Session]:
    """One unit of work: commit on success, roll back on any error."""
    with sessions() as session, session.begin():
        session.connection(execution_options={_WRITES: True})
        yield session


def alembic_config(url: str) -> AlembicConfig:
    from alembic.config import Config as AlembicConfig

    config = AlembicConfig()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


def upgrade(engine: Engine, revision: str = "head") -> None:
    try:
        with engine.begin() as connection:
            config = alembic_config(str(engine.url))
            config.attributes["connection"] = connection
            from alembic import command

            command.upgrade(config, revision)
    except DatabaseUnavailable as exc:
        raise RetriableError(f"cannot reach the database at {engine.url!r}: {exc.__cause__}") from None
    except OperationalError as exc:
        raise RetriableError(f"cannot reach the database at {engine.url!r}: {exc.orig}") from None


def downgrade(engine: Engine, revision: str) -> None:
    with engine.begin() as connection:
        config = alembic_config(str(engine.url))
        config.attributes["connection"] = connection
        from alembic import command

        command.downgrade(config, revision)


def current_revision(engine: Engine) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with engine.connect() as connection:
        return MigrationContext.configure(connection).get_current_revision()


class SchemaNotCurrent(PermanentError):
    """The database's schema is not the one this version of mi2b2 was written for."""


def require_current_schema(engine: Engine) -> None:
    """Refuse, naming the fix, a database whose schema is missing or behind this code's head
    revision (or ahead of it). Changes nothing: for commands that only read."""
    where = f"the database at {engine.url.render_as_string(hide_password=True)}"
    upgrade_first = "run `mi2b2 db upgrade` (with the same --config) first: a command that only reads never changes the schema"
    if _sqlite_file_missing(engine):  # connecting would create an empty file
        raise SchemaNotCurrent(f"{where} does not exist yet; {upgrade_first}")
    from alembic.script import ScriptDirectory
    from alembic.util import CommandError

    current = current_revision(engine)
    scripts = ScriptDirectory.from_config(alembic_config(str(engine.url)))
    head = scripts.get_current_head()
    if current == head:
        return
    if current is None:
        raise SchemaNotCurrent(f"{where} has no mi2b2 schema yet; {upgrade_first}")
    try:
        known = scripts.get_revision(current) is not None
    except CommandError:
        known = False
    if not known:
        raise SchemaNotCurrent(f"{where} is at schema revision {current}, which this version of mi2b2 does not know "
                               "(a newer version migrated it); use that version")
    raise SchemaNotCurrent(f"{where} is at schema revision {current}, behind this version of mi2b2 ({head}); "
                           f"{upgrade_first}")


def _sqlite_file_missing(engine: Engine) -> bool:
    database = engine.url.database
    if engine.dialect.name != "sqlite" or not database or database == ":memory:":
        return False
    return not Path(database).exists()


def has_schema(engine: Engine) -> bool:
    return inspect(engine).has_table("alembic_version")


SCHEDULER_LOCK = 0x6D693262  # "mi2b"; any constant shared by every worker


def serialize_scheduling(session: Session) -> None:
    """Make this transaction the only one scheduling, across all workers.

    PostgreSQL: a transaction-scoped advisory lock. SQLite: the write lock
    BEGIN IMMEDIATE already took does the same."""
    if session.get_bind().dialect.name == "postgresql":
        session.execute(text("SELECT pg_advisory_xact_lock(:key)"), {"key": SCHEDULER_LOCK})
