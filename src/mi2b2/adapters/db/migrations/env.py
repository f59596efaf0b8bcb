"""Alembic environment: always given a connection by ``engine.upgrade``."""

from alembic import context
from sqlalchemy import Connection, create_engine

from mi2b2.adapters.db.tables import Base

config = context.config
connection = config.attributes.get("connection")


def run(conn: Connection) -> None:
    context.configure(
        connection=conn,
        target_metadata=Base.metadata,
        render_as_batch=conn.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


if connection is None:
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("alembic needs a connection in config.attributes or sqlalchemy.url in its configuration")
    with create_engine(url).begin() as conn:
        run(conn)
else:
    run(connection)
