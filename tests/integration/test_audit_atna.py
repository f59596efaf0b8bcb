"""Every audit event reaches a real rsyslog as an IHE ATNA message that parses against DICOM PS3.15 A.5.1.

The collector is Debian's rsyslog with its GnuTLS driver, started by the tests on free 127.0.0.1
ports, with a TLS input that demands mi2b2's client certificate (CN=client) and a UDP input. The
messages are checked with Debian's jing against the schema in tests/support/atna/.
"""

from __future__ import annotations

import logging
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from sqlalchemy import func, select

from mi2b2.adapters.db.tables import AuditEvent, AuditSyslogOutbox
from mi2b2.config import load_config
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied, ConfigError
from mi2b2.services.audit import Action, AuditFilter
from mi2b2.services.audit_syslog import AtnaSender
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.export.download import download_manifest
from mi2b2.services.forward import add_forwards
from mi2b2.services.metrics import site_registry
from mi2b2.services.requests import StudyPick, add_requests
from mi2b2.services.search import search_studies
from mi2b2.synthetic import write_study
from support import studies
from support.atna import Collector, Message, Pki, have_tools, make_pki, schema_errors
from support.pacs import RunningPacs, free_port, start_qrscp, start_storescp
from support.pipeline import Pipeline
from support.site import pacs_block, write_site

pytestmark = pytest.mark.skipif(not have_tools(), reason="needs rsyslog, rsyslog-gnutls, jing and openssl "
                                                         "(scripts/setup.sh installs them)")

ROOT = Principal("root", Role.ADMIN)
ALICE = Principal("alice", Role.RESEARCHER, client="192.0.2.7")
CAROL = Principal("carol", Role.RESEARCHER)
PASSWORD = "a long enough password"
MRN = studies.BRAIN.patient_id


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture
def collector(tmp_path: Path, pki: Pki) -> Iterator[Collector]:
    running = Collector(tmp_path / "collector", pki)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def atna_block(url: str, pki: Pki | None = None, client_cert: bool = True) -> str:
    tls = ""
    if pki is not None:
        tls = f'ca_file = "{pki.ca}"\n'
        if client_cert:
            tls += f'cert_file = "{pki.client_cert}"\nkey_file = "{pki.client_key}"\n'
    return textwrap.dedent(f"""
        [audit.atna]
        syslog = "{url}"
        audit_source_id = "mi2b2-test"
        enterprise_site_id = "General Hospital"
        retry_max_seconds = 0.2
    """) + tls


def tls_url(collector: Collector) -> str:
    return f"tls://127.0.0.1:{collector.tls_port}"


def rows(ctx: ServiceContext) -> tuple[int, int]:
    """Audit rows, and ATNA messages still queued."""
    with ctx.sessions() as session:
        events = session.scalar(select(func.count()).select_from(AuditEvent)) or 0
        queued = session.scalar(select(func.count()).select_from(AuditSyslogOutbox)) or 0
    return events, queued


def backlog_metric(ctx: ServiceContext) -> float | None:
    return site_registry(ctx).get_sample_value("mi2b2_audit_syslog_backlog")


def drained(ctx: ServiceContext, timeout: float = 20.0) -> int:
    """Audit rows, once the sender has deleted every message it sent (it deletes after the collector has them)."""
    deadline = time.monotonic() + timeout
    while (counts := rows(ctx))[1] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counts[1] == 0, f"{counts[1]} messages still queued"
    return counts[0]


def assert_complete(ctx: ServiceContext, received: list[Message]) -> None:
    """Every row of the trail arrived once, in order, as a valid ATNA message."""
    events = drained(ctx)
    assert [m.seq for m in received] == list(range(1, events + 1))
    assert {(m.version, m.facility, m.app_name, m.msgid) for m in received} == {("1", "13", "mi2b2", "IHE+RFC-3881")}
    assert schema_errors([m.xml for m in received]) == ""


def wait_for_head(ctx: ServiceContext, condition: Callable[[AuditSyslogOutbox], bool],
                  timeout: float = 20.0) -> AuditSyslogOutbox:
    """The oldest queued message, once ``condition`` holds for it."""
    deadline = time.monotonic() + timeout
    while True:
        with ctx.sessions() as session:
            head = session.execute(select(AuditSyslogOutbox).order_by(AuditSyslogOutbox.id).limit(1)).scalar_one()
        if condition(head) or time.monotonic() > deadline:
            return head
        time.sleep(0.05)


def security_actions(ctx: ServiceContext) -> None:
    """Service actions that need no PACS: an account made, a login, a failed login, an IRB refusal, an audit read."""
    ctx.accounts.add_user(ROOT, "alice", "researcher", PASSWORD)
    ctx.accounts.login("alice", PASSWORD, "192.0.2.7")
    with pytest.raises(AccessDenied):
        ctx.accounts.login("alice", "not the password at all", "192.0.2.7")
    with pytest.raises(AccessDenied):  # project beta's IRB protocol expired
        search_studies(ctx, CAROL, "beta", "main", "B-1")
    ctx.audit.list(ROOT, AuditFilter(patient_id=MRN))


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPacs]:
    folder = tmp_path_factory.mktemp("qrscp")
    running = start_qrscp(folder)
    try:
        running.load(write_study(studies.BRAIN, tmp_path_factory.mktemp("originals")))
        yield running
    finally:
        running.stop()


@pytest.mark.pacs
def test_every_kind_of_event_arrives_over_tls_and_parses_against_the_schema(
        tmp_path: Path, pki: Pki, collector: Collector, pacs: RunningPacs) -> None:
    destination = start_storescp(tmp_path / "storescp", "DEST")
    try:
        site = write_site(tmp_path / "site", pacs_blocks=pacs_block("main", pacs.ae_title, pacs.port,
                                                                    'retrieve = "c-get"\n'),
                          extra=atna_block(tls_url(collector), pki) + textwrap.dedent(f"""
                              [[destinations]]
                              id = "dest"
                              ae_title = "DEST"
                              host = "127.0.0.1"
                              port = {destination.port}
                              projects = ["alpha"]
                          """))
        with Pipeline(site, poll_seconds=0.1) as pipe:
            ctx = pipe.ctx
            security_actions(ctx)
            assert [hit.study_uid for hit in search_studies(ctx, ALICE, "alpha", "main", MRN).studies] == [
                studies.uid(studies.BRAIN)]
            study = studies.uid(studies.BRAIN)
            requested = add_requests(ctx, ALICE, "alpha", "main", [StudyPick(study)]).created
            assert [r.state for r in pipe.wait(requested)] == ["completed"]
            download_manifest(ctx, ALICE, "alpha", [study])
            forwarded = add_forwards(ctx, ALICE, "alpha", "dest", [study]).created
            assert [r.state for r in pipe.wait(forwarded)] == ["completed"]
            ctx.audit.list(ROOT, AuditFilter())
            events, _ = rows(ctx)
            received = collector.messages(events)
            assert_complete(ctx, received)
    finally:
        destination.stop()
    kinds = {m.event_id for m in received}
    assert {"110114", "110112", "110113", "110102", "110104", "110106", "110101"} <= kinds, kinds
    login_failed = [m for m in received if m.event_id == "110114" and m.outcome != "0"]
    assert len(login_failed) == 1 and login_failed[0].outcome == "4"
    irb = [m for m in received if m.event_id == "110113" and m.outcome == "4"]
    assert irb and any("expired" in (m.root.findtext("EventIdentification/EventOutcomeDescription") or "") for m in irb)
    transferred = [m for m in received if m.event_id == "110104"]
    assert {m.root.find("EventIdentification").attrib["EventActionCode"] for m in transferred} == {"C", "R"}  # type: ignore[union-attr]
    assert all(MRN in [o.attrib["ParticipantObjectID"] for o in m.objects("2")] for m in transferred)
    query = [m for m in received if m.event_id == "110112"]
    assert len(query) == 1 and MRN.encode() in (query[0].query() or b"")


def test_a_collector_down_loses_nothing_and_blocks_nothing(tmp_path: Path, pki: Pki, collector: Collector,
                                                           database_url: str) -> None:
    site = write_site(tmp_path / "site", database_url=database_url, extra=atna_block(tls_url(collector), pki))
    with Pipeline(site, poll_seconds=0.05, receiver=False) as pipe:
        ctx = pipe.ctx
        ctx.audit.list(ROOT, AuditFilter())
        assert_complete(ctx, collector.messages(rows(ctx)[0]))

        collector.stop()
        security_actions(ctx)  # every action succeeds while the collector is down
        events, queued = rows(ctx)
        assert queued > 0 and backlog_metric(ctx) == queued
        head = wait_for_head(ctx, lambda row: row.attempts >= 2)
        assert head.last_error, "the sender kept trying, and says why it failed"
        assert rows(ctx) == (events, queued), "nothing sent, nothing dropped"

        collector.start()
        received = collector.messages(events)
        assert_complete(ctx, received)
        assert backlog_metric(ctx) == 0


def test_a_collector_with_a_certificate_from_another_ca_gets_nothing(
        tmp_path: Path, pki: Pki, caplog: pytest.LogCaptureFixture) -> None:
    impostor = Collector(tmp_path / "impostor", make_pki(tmp_path / "other-pki", "Other CA"))
    impostor.start()
    try:
        site = write_site(tmp_path / "site", extra=atna_block(tls_url(impostor), pki))
        ctx = build_context(load_config(site))
        sender = AtnaSender(ctx.sessions, ctx.clock, ctx.config)
        try:
            ctx.audit.record(ALICE, Action.QUERY, patient_id=MRN)
            with caplog.at_level(logging.ERROR, logger="mi2b2.services.audit_syslog"):
                assert sender.deliver() == 0
            events, queued = rows(ctx)
            assert queued == events > 0, "still queued, for when the site fixes its CA or the collector"
            head = wait_for_head(ctx, lambda row: True)
            assert head.attempts == 1 and "does not trust" in (head.last_error or "")
        finally:
            sender.close()
            ctx.engine.dispose()
    finally:
        impostor.stop()
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1 and "does not trust" in errors[0].getMessage() and "ca_file" in errors[0].getMessage()
    assert MRN not in caplog.text
    assert impostor.lines() == []


def test_without_its_client_certificate_mi2b2_is_not_accepted(tmp_path: Path, pki: Pki, collector: Collector) -> None:
    site = write_site(tmp_path / "site", extra=atna_block(tls_url(collector), pki, client_cert=False))
    ctx = build_context(load_config(site))
    sender = AtnaSender(ctx.sessions, ctx.clock, ctx.config)
    try:
        ctx.audit.record(ALICE, Action.QUERY, patient_id=MRN)
        assert sender.deliver() == 0
        head = wait_for_head(ctx, lambda row: True)
        assert rows(ctx)[1] == 1 and head.attempts == 1, "refused after the handshake: still queued, not taken for sent"
        assert "client certificate" in (head.last_error or "")
    finally:
        sender.close()
        ctx.engine.dispose()
    assert collector.lines() == [], "the collector demands a client certificate: nothing got through without one"


def test_udp_delivers_every_message_as_one_datagram(tmp_path: Path, collector: Collector) -> None:
    site = write_site(tmp_path / "site", extra=atna_block(f"udp://127.0.0.1:{collector.udp_port}"))
    ctx = build_context(load_config(site))
    sender = AtnaSender(ctx.sessions, ctx.clock, ctx.config)
    try:
        security_actions(ctx)
        events, _ = rows(ctx)
        assert sender.deliver() == events
        assert_complete(ctx, collector.messages(events))
    finally:
        sender.close()
        ctx.engine.dispose()


def test_missing_tls_files_stop_the_worker_from_starting_with_the_fix(tmp_path: Path, pki: Pki) -> None:
    site = write_site(tmp_path / "site", extra=atna_block(f"tls://127.0.0.1:{free_port()}", pki).replace(
        str(pki.ca), str(tmp_path / "missing-ca.pem")))
    ctx = build_context(load_config(site))
    try:
        with pytest.raises(ConfigError, match="ca_file: .*missing-ca.pem does not exist; fix ca_file"):
            AtnaSender(ctx.sessions, ctx.clock, ctx.config)
        (tmp_path / "not-a-key.pem").write_text("not a key")
        broken = load_config(write_site(tmp_path / "broken", extra=atna_block(f"tls://127.0.0.1:{free_port()}", pki)
                                        .replace(str(pki.client_key), str(tmp_path / "not-a-key.pem"))))
        with pytest.raises(ConfigError, match="cannot load the TLS files"):
            AtnaSender(ctx.sessions, ctx.clock, broken)
    finally:
        ctx.engine.dispose()
