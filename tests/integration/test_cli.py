"""The `mi2b2` command as a user runs it: real processes, real server, real PACS."""

from __future__ import annotations

import os
import sqlite3
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from support import studies
from support.pacs import RunningPacs, free_port, start_orthanc
from support.site import pacs_block, write_site

ENV_PASSWORD = "a long enough password"


def mi2b2(*args: str, config: Path | None = None, stdin: str | None = None,
          columns: int = 200) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "mi2b2", *args]
    if config is not None:
        argv += ["--config", str(config)]
    result = subprocess.run(argv, capture_output=True, text=True, input=stdin, timeout=120, check=False,
                            env={"PATH": "/usr/bin:/bin", "MI2B2_PASSWORD": ENV_PASSWORD, "COLUMNS": str(columns),
                                 "PYTHONPATH": os.pathsep.join(sys.path)})  # the code under test, as the server runs
    assert "Traceback" not in result.stderr + result.stdout, result.stderr
    return result


def test_config_check_good_and_bad(tmp_path: Path) -> None:
    path = write_site(tmp_path)
    good = mi2b2("config", "check", str(path))
    assert good.returncode == 0 and "OK" in good.stdout
    path.write_text(path.read_text().replace("port = 11113", "port = -4"))
    bad = mi2b2("config", "check", str(path))
    assert bad.returncode == 2
    assert "pacs['main'].port" in bad.stderr and "greater than or equal to 1" in bad.stderr
    missing = mi2b2("config", "check", str(tmp_path / "absent.toml"))
    assert missing.returncode == 2 and "does not exist" in missing.stderr


def test_users_tokens_and_audit_verify(tmp_path: Path) -> None:
    config = write_site(tmp_path)
    assert mi2b2("db", "upgrade", config=config).returncode == 0
    assert mi2b2("admin", "user", "add", "audrey", "--role", "auditor", config=config).returncode == 0
    duplicate = mi2b2("admin", "user", "add", "audrey", config=config)
    assert duplicate.returncode == 2 and "already exists" in duplicate.stderr
    bad_role = mi2b2("admin", "user", "add", "eve", "--role", "overlord", config=config)
    assert bad_role.returncode == 2 and "is not a role" in bad_role.stderr
    token = mi2b2("admin", "token", "create", "audrey", config=config)
    assert token.returncode == 0 and "mi2b2_" in token.stdout
    listed = mi2b2("admin", "token", "list", "--format", "csv", config=config)
    assert "audrey" in listed.stdout and token.stdout.strip().splitlines()[-1] not in listed.stdout

    assert mi2b2("audit", "verify", config=config).returncode == 0
    export = mi2b2("audit", "export", "--csv", "--action", "user_admin", config=config)
    assert export.stdout.splitlines()[0].startswith("seq,occurred_at,actor")
    assert export.stdout.count("user_admin") == 1

    with sqlite3.connect(tmp_path / "mi2b2.db") as db:
        db.execute("update audit_events set actor='someone else' where seq=2")
    broken = mi2b2("audit", "verify", config=config)
    assert broken.returncode == 1
    assert "BROKEN at row 2" in broken.stderr and "edited" in broken.stderr


def test_pacs_echo_reports_each_pacs(tmp_path: Path, orthanc: RunningPacs) -> None:
    config = write_site(tmp_path, pacs_blocks=pacs_block("up", orthanc.ae_title, orthanc.port)
                        + pacs_block("down", "GONE", free_port()))
    result = mi2b2("pacs", "echo", config=config)
    assert result.returncode == 1
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│ ")}
    assert "reachable (" in lines["up"] and "NOT reachable" not in lines["up"]
    assert "NOT reachable" in lines["down"]
    assert mi2b2("pacs", "echo", "up", config=config).returncode == 0
    unknown = mi2b2("pacs", "echo", "nowhere", config=config)
    assert unknown.returncode == 2 and "unknown PACS 'nowhere'" in unknown.stderr


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPacs]:
    running = start_orthanc(tmp_path_factory.mktemp("orthanc"))
    try:
        running.load(studies.write_all(tmp_path_factory.mktemp("studies")))
        yield running
    finally:
        running.stop()


@pytest.fixture
def server(tmp_path: Path, orthanc: RunningPacs) -> Iterator[tuple[str, Path]]:
    port = free_port()
    config = write_site(tmp_path, pacs_blocks=pacs_block("main", orthanc.ae_title, orthanc.port, 'retrieve = "c-get"\n'))
    config.write_text(config.read_text().replace("[server]", f"[server]\nhttp_port = {port}"))
    process = subprocess.Popen([sys.executable, "-m", "mi2b2", "serve", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{url}/api/v1/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.2)
        else:
            process.kill()
            pytest.fail(f"server did not start: {process.communicate()[1][-2000:]}")
        yield url, config
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_search_through_the_server_and_reload(server: tuple[str, Path], tmp_path: Path) -> None:
    url, config = server
    for login, role in (("alice", "researcher"), ("root", "admin")):
        assert mi2b2("admin", "user", "add", login, "--role", role, config=config).returncode == 0
    alice = mi2b2("admin", "token", "create", "alice", config=config).stdout.strip().splitlines()[-1]
    root = mi2b2("admin", "token", "create", "root", config=config).stdout.strip().splitlines()[-1]

    found = mi2b2("search", "studies", "--project", "alpha", "--pacs", "main", "--server", url, "--token", alice,
                  "--format", "csv", "000123", "OFFLIST-9")
    assert found.returncode == 0, found.stderr
    rows = found.stdout.strip().splitlines()
    assert rows[0].startswith("patient_id,patient_name,accession")
    assert sorted(r.split(",")[2] for r in rows[1:]) == ["ACC-1001", "ACC-1002"]
    assert "refused (not on the IRB list, never sent to the PACS): OFFLIST-9" in found.stderr

    from_file = tmp_path / "mrns.csv"
    from_file.write_text("MRN,comment\n77,trauma\n")
    by_file = mi2b2("search", "patients", "--project", "alpha", "--pacs", "main", "--server", url, "--token", alice,
                    "--file", str(from_file), "--format", "json")
    assert '"patient_id": "77"' in by_file.stdout

    series = mi2b2("search", "series", studies.uid(studies.BRAIN), "--project", "alpha", "--pacs", "main",
                   "--server", url, "--token", alice, "--format", "csv")
    assert len(series.stdout.strip().splitlines()) == 4

    denied = mi2b2("config", "reload", "--server", url, "--token", alice)
    assert denied.returncode == 2 and "admin role" in denied.stderr
    (tmp_path / "alpha.mrns").write_text("000123\n")
    reloaded = mi2b2("config", "reload", "--server", url, "--token", root)
    assert reloaded.returncode == 0 and "allow-list of alpha" in reloaded.stdout
    now_refused = mi2b2("search", "studies", "--project", "alpha", "--pacs", "main", "--server", url,
                        "--token", alice, "77")
    assert "refused (not on the IRB list, never sent to the PACS): 77" in now_refused.stderr

    no_token = mi2b2("search", "studies", "--project", "alpha", "--pacs", "main", "--server", url, "77")
    assert no_token.returncode == 2 and "no API token" in no_token.stderr
    bad_token = mi2b2("search", "studies", "--project", "alpha", "--pacs", "main", "--server", url,
                      "--token", "mi2b2_forged", "77")
    assert bad_token.returncode == 2 and "log in first" in bad_token.stderr
    no_server = mi2b2("projects", "--server", f"http://127.0.0.1:{free_port()}", "--token", alice)
    assert no_server.returncode == 2 and "cannot reach the mi2b2 server" in no_server.stderr


def test_serves_https_when_the_site_configures_a_certificate(tmp_path: Path) -> None:
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
                    "-addext", "subjectAltName=IP:127.0.0.1", "-keyout", str(key), "-out", str(cert)],
                   check=True, capture_output=True, timeout=60)
    port = free_port()
    config = write_site(tmp_path)
    config.write_text(config.read_text().replace(
        "[server]", f'[server]\nhttp_port = {port}\ntls_cert = "{cert}"\ntls_key = "{key}"'))
    process = subprocess.Popen([sys.executable, "-m", "mi2b2", "serve", "--config", str(config)],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    trust = ssl.create_default_context(cafile=str(cert))
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                response = httpx.get(f"https://127.0.0.1:{port}/api/v1/health", verify=trust, timeout=1)
                break
            except httpx.HTTPError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        assert response.json()["status"] == "ok"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/api/v1/health", timeout=2)  # no plain HTTP on that port
    finally:
        process.terminate()
        process.wait(timeout=15)


def test_request_watch_cache_and_notifications_from_the_command_line(server: tuple[str, Path]) -> None:
    url, config = server
    assert mi2b2("admin", "user", "add", "alice", "--role", "researcher", config=config).returncode == 0
    alice = mi2b2("admin", "token", "create", "alice", config=config).stdout.strip().splitlines()[-1]
    common = ["--server", url, "--token", alice]

    added = mi2b2("request", "add", "alpha", "--pacs", "main", *common, studies.uid(studies.BRAIN), studies.uid(studies.OFF_LIST))
    assert added.returncode == 0, added.stderr
    assert "1 requests queued" in added.stdout and "refused: patient not on the IRB list" in added.stderr

    watched = mi2b2("request", "list", "alpha", "--watch", "--interval", "0.3", *common)
    assert watched.returncode == 0 and "1 completed" in watched.stdout, watched.stdout
    listed = mi2b2("request", "list", "alpha", "--format", "csv", *common).stdout.splitlines()
    assert listed[0].startswith("id,state,accession") and ",completed," in listed[1] and ",6,6," in listed[1]
    # A terminal too narrow for every column shows the leading ones whole, and says what it left out.
    narrow = mi2b2("request", "list", "alpha", *common, columns=80)
    assert all(len(line) <= 80 for line in narrow.stdout.splitlines()), narrow.stdout
    assert "completed" in narrow.stdout and studies.BRAIN.accession in narrow.stdout, narrow.stdout
    assert "columns not shown" in narrow.stderr and "study_uid" in narrow.stderr, narrow.stderr

    usage = mi2b2("cache", "usage", "alpha", *common)
    assert usage.returncode == 0, usage.stderr
    cached = mi2b2("cache", "list", "alpha", "--format", "csv", *common)
    assert studies.uid(studies.BRAIN) in cached.stdout
    notices = mi2b2("notifications", *common)
    assert "1 study ready in project alpha" in notices.stdout, notices.stdout
    clean = mi2b2("admin", "fsck", config=config)
    assert clean.returncode == 0, clean.stdout + clean.stderr
    deleted = mi2b2("cache", "delete", "alpha", studies.uid(studies.BRAIN), *common)
    assert deleted.returncode == 0, deleted.stderr
    assert studies.uid(studies.BRAIN) not in mi2b2("cache", "list", "alpha", "--format", "csv", *common).stdout
    not_yours = mi2b2("request", "cancel", "1", "--server", url, "--token", "mi2b2_forged")
    assert not_yours.returncode == 2
