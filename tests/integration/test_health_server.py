"""/health/live and /health/ready of a real `mi2b2 serve` (its receiver running, no worker of its own):
not ready naming the worker until a worker's heartbeat is fresh, then ready, then not ready naming the
migrations while the database's schema is behind this version of mi2b2."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from alembic.script import ScriptDirectory
from sqlalchemy import text

from mi2b2.adapters.db.engine import alembic_config, transaction
from mi2b2.config import load_config
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.scheduler import heartbeat
from support.pacs import free_port
from support.server import Mi2b2Server, start_server
from support.site import write_site


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Mi2b2Server, ServiceContext]]:
    site = write_site(tmp_path / "site")
    site.write_text(site.read_text().replace(
        "[server]\n", f"[server]\nhttp_port = {free_port()}\nrun_worker = false\nreceiver_process = false\n"))
    server = start_server(site)
    try:
        yield server, build_context(load_config(site))
    finally:
        server.stop()


def ready(server: Mi2b2Server) -> tuple[int, dict[str, Any]]:
    answer = httpx.get(f"{server.url}/health/ready", timeout=10)
    body: dict[str, Any] = answer.json()
    return answer.status_code, body


def failed_checks(body: dict[str, Any]) -> list[str]:
    return [failure["check"] for failure in body["failed"]]


def test_ready_follows_the_worker_heartbeat_and_the_schema(served: tuple[Mi2b2Server, ServiceContext]) -> None:
    server, ctx = served
    live = httpx.get(f"{server.url}/health/live", timeout=10)
    assert (live.status_code, live.json()) == (200, {"status": "live"})

    status, body = ready(server)
    assert status == 503 and failed_checks(body) == ["worker"], body
    assert {"database", "migrations", "receiver", "cache"} == set(body["passed"])
    assert "heartbeat" in body["failed"][0]["reason"] and body["kind"] == "NotReady"

    heartbeat(ctx, "health-test-worker")  # what a worker in another process writes every poll
    status, body = ready(server)
    assert (status, body["status"], body["failed"]) == (200, "ready", []), body

    scripts = ScriptDirectory.from_config(alembic_config(str(ctx.engine.url)))
    head = scripts.get_current_head()
    assert head is not None
    previous = scripts.get_revision(head).down_revision
    assert isinstance(previous, str)
    with transaction(ctx.sessions) as session:  # as if this version of mi2b2 were deployed before `db upgrade`
        session.execute(text("UPDATE alembic_version SET version_num = :previous"), {"previous": previous})
    status, body = ready(server)
    assert status == 503 and failed_checks(body) == ["migrations"], body
    assert previous in body["failed"][0]["reason"] and "mi2b2 db upgrade" in body["failed"][0]["reason"]
    assert "sqlite" not in body["error"]  # no database URL (which could hold a password) in the answer
