"""Local commands that only read never migrate the database: they name `mi2b2 db upgrade` instead."""

from __future__ import annotations

from pathlib import Path

from alembic.script import ScriptDirectory
from sqlalchemy import inspect
from test_cli import mi2b2

from mi2b2.adapters.db import engine as db
from support.site import write_site

READ_ONLY = [
    ("audit", "verify"),
    ("audit", "list"),
    ("audit", "export", "--csv"),
    ("admin", "user", "list"),
    ("admin", "token", "list"),
    ("admin", "purge"),
    ("admin", "fsck"),
]


def _schema(url: str) -> tuple[bool, str | None]:
    engine = db.make_engine(url)
    try:
        return inspect(engine).has_table("alembic_version"), db.current_revision(engine)
    finally:
        engine.dispose()


def test_read_only_commands_on_a_database_without_schema_name_db_upgrade_and_create_nothing(
        tmp_path: Path, database_url: str) -> None:
    config = write_site(tmp_path, database_url=database_url)
    for command in READ_ONLY:
        refused = mi2b2(*command, config=config)
        assert refused.returncode != 0, command
        assert "run `mi2b2 db upgrade`" in refused.stderr, (command, refused.stderr)
    if database_url.startswith("sqlite"):
        assert not (tmp_path / "mi2b2.db").exists()  # not even an empty file
    else:
        assert _schema(database_url) == (False, None)


def test_a_read_only_command_on_a_database_behind_the_code_leaves_it_as_it_is_until_db_upgrade(
        tmp_path: Path, database_url: str) -> None:
    config = write_site(tmp_path, database_url=database_url)
    assert mi2b2("admin", "user", "add", "audrey", "--role", "auditor", "--no-password", config=config).returncode == 0
    scripts = ScriptDirectory.from_config(db.alembic_config(database_url))
    head = scripts.get_current_head()
    assert head is not None
    previous = scripts.get_revision(head).down_revision
    assert isinstance(previous, str)
    engine = db.make_engine(database_url)
    try:
        db.downgrade(engine, previous)
    finally:
        engine.dispose()

    for command in (("audit", "verify"), ("admin", "user", "list")):
        refused = mi2b2(*command, config=config)
        assert refused.returncode != 0
        assert f"is at schema revision {previous}, behind this version of mi2b2 ({head})" in refused.stderr
        assert "run `mi2b2 db upgrade`" in refused.stderr
        assert _schema(database_url) == (True, previous)

    assert mi2b2("db", "upgrade", config=config).returncode == 0
    assert _schema(database_url) == (True, head)
    assert mi2b2("audit", "verify", config=config).returncode == 0
    listed = mi2b2("admin", "user", "list", "--format", "csv", config=config)
    assert listed.returncode == 0 and "audrey" in listed.stdout


def test_a_command_that_writes_still_migrates(tmp_path: Path, database_url: str) -> None:
    config = write_site(tmp_path, database_url=database_url)
    assert mi2b2("admin", "user", "add", "eve", "--no-password", config=config).returncode == 0
    scripts = ScriptDirectory.from_config(db.alembic_config(database_url))
    assert _schema(database_url) == (True, scripts.get_current_head())
