"""Audit checkpoints also go to a real rsyslog ([audit] syslog), and a syslog that is down costs a warning only."""

from __future__ import annotations

import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from typer.testing import CliRunner

from mi2b2.cli.main import app
from mi2b2.config import load_config
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import ConfigError
from mi2b2.services.audit import Action
from mi2b2.services.context import build_context
from mi2b2.testing import FakeClock
from support.pacs import free_port
from support.site import write_site

pytestmark = pytest.mark.skipif(shutil.which("rsyslogd") is None, reason="rsyslog is not installed")

ALICE = Principal("alice", Role.RESEARCHER)
MRN = "000123"
# What rsyslog parsed out of each RFC 5424 message, one line per message.
TEMPLATE = "%protocol-version%|%syslogfacility%|%app-name%|%msgid%|%msg%\\n"


@dataclass
class Rsyslog:
    tcp_port: int
    udp_port: int
    received: Path

    def messages(self, count: int, timeout: float = 10.0) -> list[list[str]]:
        """The first ``count`` messages rsyslog wrote, split into version, facility, app, msgid, msg."""
        deadline = time.monotonic() + timeout
        while True:
            lines = self.received.read_text().splitlines() if self.received.exists() else []
            if len(lines) >= count or time.monotonic() > deadline:
                return [line.split("|", 4) for line in lines]
            time.sleep(0.05)


@pytest.fixture
def rsyslog(tmp_path: Path) -> Iterator[Rsyslog]:
    work = tmp_path / "rsyslog"
    work.mkdir()
    server = Rsyslog(free_port(), free_port(), work / "received.log")
    conf = work / "rsyslog.conf"
    conf.write_text(f"""
global(workDirectory="{work}")
module(load="imtcp")
module(load="imudp")
template(name="parsed" type="string" string="{TEMPLATE}")
ruleset(name="received") {{
  action(type="omfile" file="{server.received}" template="parsed")
}}
input(type="imtcp" address="127.0.0.1" port="{server.tcp_port}" ruleset="received")
input(type="imudp" address="127.0.0.1" port="{server.udp_port}" ruleset="received")
""")
    process = subprocess.Popen(["rsyslogd", "-n", "-f", str(conf), "-i", str(work / "pid")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                socket.create_connection(("127.0.0.1", server.tcp_port), timeout=1).close()
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"rsyslogd did not start: {process.stderr.read().decode()}") from None
                time.sleep(0.05)
        yield server
    finally:
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=10)


def _site(tmp_path: Path, database_url: str, syslog: str) -> Path:
    return write_site(tmp_path / "site", database_url=database_url, extra=f'\n[audit]\nsyslog = "{syslog}"\n')


def _fill(site: Path, events: int) -> None:
    ctx = build_context(load_config(site), clock=FakeClock())
    for n in range(events):
        ctx.audit.record(ALICE, Action.QUERY, project_id="alpha", patient_id=MRN, detail={"n": n})
    ctx.engine.dispose()


def _assert_same_as_file(received: list[list[str]], checkpoint_file: Path) -> None:
    lines = checkpoint_file.read_text().splitlines()
    assert len(received) == len(lines)
    for (version, facility, app_name, msgid, msg), line in zip(received, lines, strict=True):
        assert (version, facility, app_name, msgid) == ("1", "13", "mi2b2", "audit-checkpoint")
        assert msg == line
        assert set(json.loads(line)) == {"seq", "hash", "at", "keyed_from", "mac"}, "a checkpoint holds no PHI"


def test_the_checkpoint_command_sends_the_files_signed_line_over_tcp(tmp_path: Path, database_url: str,
                                                                      rsyslog: Rsyslog) -> None:
    site = _site(tmp_path, database_url, f"tcp://127.0.0.1:{rsyslog.tcp_port}")
    _fill(site, 2)
    runner = CliRunner()
    first = runner.invoke(app, ["audit", "checkpoint", "--config", str(site)])
    assert first.exit_code == 0, first.output
    _fill(site, 1)
    second = runner.invoke(app, ["audit", "checkpoint", "--config", str(site)])
    assert second.exit_code == 0, second.output
    received = rsyslog.messages(2)
    _assert_same_as_file(received, load_config(site).audit_checkpoint_file())
    assert len(received) == 2, "two checkpoints over one TCP input must stay two records"
    assert all(MRN not in fields[4] and "alice" not in fields[4] for fields in received)


def test_udp_delivers_the_same_line(tmp_path: Path, database_url: str, rsyslog: Rsyslog) -> None:
    site = _site(tmp_path, database_url, f"udp://127.0.0.1:{rsyslog.udp_port}")
    _fill(site, 1)
    ctx = build_context(load_config(site), clock=FakeClock())
    assert ctx.audit.checkpoint() is not None
    ctx.engine.dispose()
    _assert_same_as_file(rsyslog.messages(1), load_config(site).audit_checkpoint_file())


def test_a_worker_sends_its_checkpoints_to_syslog(tmp_path: Path, database_url: str, rsyslog: Rsyslog) -> None:
    from mi2b2.runtime import make_sink
    from mi2b2.worker.loop import Worker

    site = _site(tmp_path, database_url, f"tcp://127.0.0.1:{rsyslog.tcp_port}")
    _fill(site, 2)
    ctx = build_context(load_config(site), clock=FakeClock())
    sink = make_sink(ctx)
    worker = Worker(ctx, sink, poll_seconds=0.05)
    worker.start()
    try:
        assert rsyslog.messages(1, timeout=20), "the running worker sent no checkpoint"
        ctx.audit.record(ALICE, Action.QUERY, project_id="alpha", patient_id=MRN)
    finally:
        worker.stop()
        sink.close()
        ctx.engine.dispose()
    received = rsyslog.messages(2)
    _assert_same_as_file(received, load_config(site).audit_checkpoint_file())
    assert json.loads(received[-1][4])["seq"] == 3, "the checkpoint at stop signs the newest row"


def test_a_syslog_that_is_down_costs_a_warning_not_the_checkpoint(tmp_path: Path, database_url: str,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    down = free_port()  # nothing listens here
    site = _site(tmp_path, database_url, f"tcp://127.0.0.1:{down}")
    _fill(site, 1)
    ctx = build_context(load_config(site), clock=FakeClock())
    with caplog.at_level(logging.WARNING, logger="mi2b2.services.audit"):
        checkpoint = ctx.audit.checkpoint()
    ctx.engine.dispose()
    assert checkpoint is not None
    lines = load_config(site).audit_checkpoint_file().read_text().splitlines()
    assert len(lines) == 1 and json.loads(lines[0])["seq"] == checkpoint.seq
    warnings = [r for r in caplog.records if "not sent to syslog" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelno == logging.WARNING
    assert f"not sent to syslog tcp://127.0.0.1:{down}" in warnings[0].getMessage()
    assert MRN not in caplog.text and "alice" not in caplog.text


def test_a_worker_carries_on_when_syslog_is_down(tmp_path: Path, database_url: str,
                                                 caplog: pytest.LogCaptureFixture) -> None:
    from mi2b2.runtime import make_sink
    from mi2b2.worker.loop import Worker

    site = _site(tmp_path, database_url, f"tcp://127.0.0.1:{free_port()}")
    _fill(site, 1)
    ctx = build_context(load_config(site), clock=FakeClock())
    path = load_config(site).audit_checkpoint_file()
    sink = make_sink(ctx)
    worker = Worker(ctx, sink, poll_seconds=0.05)
    with caplog.at_level(logging.WARNING):
        worker.start()
        try:
            deadline = time.monotonic() + 20
            while not path.exists() and time.monotonic() < deadline:
                time.sleep(0.05)
            ctx.audit.record(ALICE, Action.QUERY, project_id="alpha", patient_id=MRN)
        finally:
            worker.stop()
            sink.close()
            ctx.engine.dispose()
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [line["seq"] for line in lines] == [1, 2], "both checkpoints in the file although syslog is down"
    assert "not sent to syslog" in caplog.text and MRN not in caplog.text


def _config_check(site: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "mi2b2", "config", "check", str(site)], capture_output=True,
                          text=True, timeout=60, check=False,
                          env={"PATH": "/usr/bin:/bin", "COLUMNS": "200", "PYTHONPATH": os.pathsep.join(sys.path)})


@pytest.mark.parametrize(("value", "names"), [
    ("tls://127.0.0.1:6514", "TLS syslog is not supported yet"),
    ("http://127.0.0.1:514", "must start with tcp:// or udp://"),
    ("127.0.0.1:514", "must start with tcp:// or udp://"),
    ("tcp://127.0.0.1", "a host and a port"),
    ("tcp://127.0.0.1:99999", "a host and a port"),
    ("udp://:514", "a host and a port"),
    ("tcp://user@127.0.0.1:514", "a host and a port"),
    ("tcp://127.0.0.1:514/path", "a host and a port"),
])
def test_a_bad_syslog_url_is_refused_by_config_check(tmp_path: Path, value: str, names: str) -> None:
    site = _site(tmp_path, "", value)
    result = _config_check(site)
    said = " ".join((result.stdout + result.stderr).split())
    assert result.returncode != 0 and "Traceback" not in said
    assert "audit.syslog" in said and names in said and "tcp://127.0.0.1:6514" in said, said
    with pytest.raises(ConfigError):
        load_config(site)


def test_a_good_syslog_url_passes_config_check(tmp_path: Path) -> None:
    site = _site(tmp_path, "", "udp://[::1]:514")
    result = _config_check(site)
    assert result.returncode == 0, result.stdout + result.stderr
    assert str(load_config(site).audit.syslog_target()) == "udp://[::1]:514"
