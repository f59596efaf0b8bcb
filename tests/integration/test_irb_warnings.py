"""Leads are warned before their IRB approval ends: once per expiry date, in the app and by e-mail, without PHI."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import UTC, datetime, time, timedelta
from email import message_from_bytes, policy
from email.message import Message
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from aiosmtpd.controller import Controller
from sqlalchemy import select, update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedStudy, User
from mi2b2.config import load_config
from mi2b2.domain.principal import Principal, Role
from mi2b2.services import notifications
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.testing import FakeClock
from support.pacs import free_port
from support.site import write_site
from support.viewing import fill

ZONE = "America/New_York"
ENDS = datetime(2099, 12, 31).date()


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []

    async def handle_DATA(self, _server: object, _session: object, envelope: object) -> str:
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))  # type: ignore[attr-defined]
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    mailbox, port = Mailbox(), free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


def local(day: int, hour: int, minute: int = 0, second: int = 0) -> datetime:
    return datetime(2099, 12, day, hour, minute, second, tzinfo=ZoneInfo(ZONE)).astimezone(UTC)


def site(folder: Path, database_url: str, port: int) -> tuple[ServiceContext, Path]:
    toml = write_site(folder / "site", database_url=database_url, expired_b=False, extra=(
        f'\n[site]\ntimezone = "{ZONE}"\nirb_warning_days = 14\n'
        f'\n[smtp]\nhost = "127.0.0.1"\nport = {port}\nsender = "mi2b2@hospital.test"\n'))
    ctx = build_context(load_config(toml), clock=FakeClock(local(16, 23, 59, 59)))
    fill(ctx, folder / "files")
    with transaction(ctx.sessions) as session:
        session.execute(update(User).values(email=User.login + "@hospital.test"))
    return ctx, toml


def test_leads_are_warned_once_in_app_and_by_email_with_counts_and_no_phi(
        tmp_path: Path, database_url: str, smtp: tuple[Mailbox, int]) -> None:
    mailbox, port = smtp
    ctx, toml = site(tmp_path, database_url, port)
    clock = ctx.clock
    assert isinstance(clock, FakeClock)
    # 23:59:59 in New York, 15 days before the last day: too early (in UTC it is already the 17th).
    assert clock.now().date() == local(17, 0).date()
    assert notifications.warn_irb_expiring(ctx) == []
    clock.set(local(17, 0, 0, 1))  # 14 days left, local time
    ids = notifications.warn_irb_expiring(ctx)
    assert len(ids) == 1  # alice leads alpha; bob is a researcher, beta has no lead
    (notice,) = notifications.list_notifications(ctx, Principal("alice", Role.RESEARCHER))
    assert notice.kind == "irb_expiring" and notice.project_id == "alpha"
    assert notice.subject == f"IRB approval of project alpha ends on {ENDS.isoformat()}"
    assert "in 14 days" in notice.body and "Cached now: 3 studies" in notice.body and ZONE in notice.body
    assert notice.emailed_at is not None
    assert notifications.list_notifications(ctx, Principal("bob", Role.RESEARCHER)) == []
    assert len(mailbox.messages) == 1
    mail = mailbox.messages[0]
    assert mail["To"] == "alice@hospital.test" and mail["Subject"] == f"[mi2b2] {notice.subject}"
    with ctx.sessions() as session:
        phi = {v for row in session.execute(select(CachedStudy.patient_id, CachedStudy.patient_name,
                                                   CachedStudy.accession, CachedStudy.study_uid)).all() for v in row}
    text = notice.subject + notice.body + mail.get_content()
    words = set(re.findall(r"[A-Za-z0-9.^-]+", text)) | set(re.findall(r"[A-Za-z0-9^-]+", text))
    assert "77" in phi and "000123" in phi and not phi & words  # (the IRB number 2026P000123 is no MRN)

    # Once per expiry date: later ticks (and other workers) add nothing.
    for _ in range(3):
        clock.advance(days=1)
        assert notifications.warn_irb_expiring(ctx) == []
    assert len(mailbox.messages) == 1
    # A renewed approval is warned about again when its own date comes near.
    toml.write_text(toml.read_text().replace("expires = 2099-12-31\nmrn_file = \"alpha.mrns\"",
                                             "expires = 2100-01-10\nmrn_file = \"alpha.mrns\""))
    ctx.reload_config(Principal("root", Role.ADMIN))
    assert notifications.warn_irb_expiring(ctx) == []  # 20 days left
    clock.set(datetime.combine(datetime(2100, 1, 10).date() - timedelta(days=14), time(12), ZoneInfo(ZONE)))
    assert len(notifications.warn_irb_expiring(ctx)) == 1
    assert len(mailbox.messages) == 2 and "2100-01-10" in mailbox.messages[1]["Subject"]


def test_the_worker_sends_the_warning_and_zero_days_turns_it_off(
        tmp_path: Path, database_url: str, smtp: tuple[Mailbox, int]) -> None:
    from mi2b2.services.cache import cache_store
    from mi2b2.services.receiver import ReceiverSink
    from mi2b2.worker.loop import Worker

    mailbox, port = smtp
    ctx, toml = site(tmp_path, database_url, port)
    assert isinstance(ctx.clock, FakeClock)
    ctx.clock.set(local(20, 12))
    sink = ReceiverSink(ctx, cache_store(ctx))
    try:
        Worker(ctx, sink).tick()
    finally:
        sink.close()
    assert len(mailbox.messages) == 1
    toml.write_text(toml.read_text().replace("irb_warning_days = 14", "irb_warning_days = 0"))
    ctx.reload_config(Principal("root", Role.ADMIN))
    toml.write_text(toml.read_text().replace("expires = 2099-12-31\nmrn_file = \"alpha.mrns\"",
                                             "expires = 2099-12-30\nmrn_file = \"alpha.mrns\""))
    ctx.reload_config(Principal("root", Role.ADMIN))
    assert notifications.warn_irb_expiring(ctx) == []
