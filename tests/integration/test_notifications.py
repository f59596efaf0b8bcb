"""Notices when retrievals end: in the app, by e-mail to a real SMTP server, idempotent, free of PHI."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from datetime import timedelta
from email import message_from_bytes, policy
from email.message import Message
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from fastapi.testclient import TestClient
from sqlalchemy import event, select, update

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import Notification, Request
from mi2b2.api.app import create_app
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import InvalidInput, NotFound
from mi2b2.services import notifications
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.testing import FakeClock
from support.pacs import free_port
from support.site import load_site

ROOT = Principal("root", Role.ADMIN)
ALICE = Principal("alice", Role.RESEARCHER)
BOB = Principal("bob", Role.RESEARCHER)
PASSWORD = "a long enough password"
# What the test requests are about: none of it may reach a notice or an e-mail.
PATIENT, NAME, ACCESSION = "000123", "TEST^000123", "ACC-1001"
STUDY_UIDS = ["1.2.826.0.1.3680043.8.498.101", "1.2.826.0.1.3680043.8.498.102", "1.2.826.0.1.3680043.8.498.103"]
PHI = [PATIENT, NAME, ACCESSION, "TEST", *STUDY_UIDS]
LEAKY_ERROR = (f"C-MOVE failed: 0xA702 out of resources for PatientID={PATIENT} ({NAME}), accession {ACCESSION}, "
               f"study {STUDY_UIDS[1]}; also saw MRN-0002 and 77")


class Mailbox:
    def __init__(self) -> None:
        self.messages: list[Message] = []
        self.recipients: list[list[str]] = []

    async def handle_DATA(self, _server: object, _session: object, envelope: object) -> str:
        self.messages.append(message_from_bytes(envelope.content, policy=policy.default))  # type: ignore[attr-defined]
        self.recipients.append(list(envelope.rcpt_tos))  # type: ignore[attr-defined]
        return "250 OK"


@pytest.fixture
def smtp() -> Iterator[tuple[Mailbox, int]]:
    mailbox = Mailbox()
    port = free_port()
    controller = Controller(mailbox, hostname="127.0.0.1", port=port)
    controller.start()
    try:
        yield mailbox, port
    finally:
        controller.stop()


def make_ctx(folder: Path, database_url: str, smtp_block: str = "") -> ServiceContext:
    ctx = build_context(load_site(folder, database_url=database_url, extra=smtp_block), clock=FakeClock())
    ctx.accounts.add_user(ROOT, "alice", "researcher", PASSWORD, email="alice@example.org")
    ctx.accounts.add_user(ROOT, "bob", "researcher", PASSWORD)  # no e-mail address
    return ctx


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> ServiceContext:
    return make_ctx(tmp_path, database_url)


def add_batch(ctx: ServiceContext, size: int = 3, batch_id: str | None = "batch-1", user: str = "alice") -> list[int]:
    ids = []
    with transaction(ctx.sessions) as session:
        for n in range(size):
            row = Request(kind="retrieve", batch_id=batch_id, project_id="alpha", user_login=user, pacs_id="main",
                          patient_id=PATIENT, study_uid=STUDY_UIDS[n % 3], accession=ACCESSION, state="processing",
                          expected_instances=12, created_at=ctx.clock.now())
            session.add(row)
            session.flush()
            ids.append(row.id)
    return ids


def end(ctx: ServiceContext, request_id: int, state: str, error: str | None = None, received: int = 12) -> None:
    ctx.clock.advance(minutes=1)  # type: ignore[attr-defined]
    with transaction(ctx.sessions) as session:
        session.execute(update(Request).where(Request.id == request_id).values(
            state=state, ended_at=ctx.clock.now(), last_error=error, received=received,
            last_status=0xA702 if error else None, attempts=1))


def all_notices(ctx: ServiceContext) -> list[Notification]:
    with ctx.sessions() as session:
        return list(session.scalars(select(Notification).order_by(Notification.id)))


def assert_no_phi(*texts: str) -> None:
    for text in texts:
        for value in PHI:
            assert value not in text, f"{value!r} leaked into {text!r}"


def test_a_batch_gets_one_summary_when_its_last_request_ends(ctx: ServiceContext) -> None:
    first, second, third = add_batch(ctx)
    end(ctx, first, "completed")
    assert notifications.on_request_ended(ctx, first) == []
    end(ctx, second, "incomplete", received=10)
    assert notifications.on_request_ended(ctx, second) == []
    end(ctx, third, "canceled", received=0)
    created = notifications.on_request_ended(ctx, third)
    assert len(created) == 1
    assert notifications.on_request_ended(ctx, third) == []  # called twice: still one
    assert notifications.on_request_ended(ctx, first) == []

    [notice] = all_notices(ctx)
    assert notice.kind == "batch_ended" and notice.user_login == "alice" and notice.batch_id == "batch-1"
    assert notice.subject == "1 of 3 studies ready in project alpha; 1 incomplete, 1 canceled"
    assert "project alpha (Brain MRI cohort)" in notice.body and f"#{first}, #{second}, #{third}" in notice.body
    assert_no_phi(notice.subject, notice.body)
    assert notice.emailed_at is None and notice.email_error is None  # no [smtp] configured


def test_a_failure_is_notified_at_once_without_phi(ctx: ServiceContext) -> None:
    first, second, third = add_batch(ctx)
    end(ctx, second, "failed", error=LEAKY_ERROR, received=0)
    [failure_id] = notifications.on_request_ended(ctx, second)
    [failure] = all_notices(ctx)
    assert failure.id == failure_id and failure.kind == "request_failed"
    assert failure.subject == "A retrieval failed in project alpha"
    assert f"request #{second} (study 2 of 3 in its batch)" in failure.body
    assert "0xA702" in failure.body and "0 of 12 received" in failure.body
    assert "out of resources" in failure.body  # the useful part of the reason survives
    assert_no_phi(failure.subject, failure.body)
    assert "MRN-0002" not in failure.body  # another MRN of the allow-list
    assert notifications.on_request_ended(ctx, second) == []

    end(ctx, first, "completed")
    end(ctx, third, "completed")
    notifications.on_request_ended(ctx, first)
    notifications.on_request_ended(ctx, third)
    summary = [n for n in all_notices(ctx) if n.kind == "batch_ended"]
    assert [n.subject for n in summary] == ["2 of 3 studies ready in project alpha; 1 failed"]


def test_a_lone_request_gets_a_summary_or_its_failure_notice(ctx: ServiceContext) -> None:
    [done] = add_batch(ctx, 1, batch_id=None)
    end(ctx, done, "completed")
    notifications.on_request_ended(ctx, done)
    [failed] = add_batch(ctx, 1, batch_id=None)
    end(ctx, failed, "failed", error="the PACS sent no instances", received=0)
    notifications.on_request_ended(ctx, failed)
    assert [(n.kind, n.subject) for n in all_notices(ctx)] == [
        ("batch_ended", "1 study ready in project alpha"),
        ("request_failed", "A retrieval failed in project alpha"),
    ]
    # a retried request that fails again is news again
    with transaction(ctx.sessions) as session:
        session.execute(update(Request).where(Request.id == failed).values(state="processing"))
    end(ctx, failed, "failed", error="the PACS sent no instances", received=0)
    assert len(notifications.on_request_ended(ctx, failed)) == 1


def test_unended_requests_are_not_notified(ctx: ServiceContext) -> None:
    [running] = add_batch(ctx, 1)
    assert notifications.on_request_ended(ctx, running) == []
    with pytest.raises(NotFound):
        notifications.on_request_ended(ctx, 10_000)


def _end_many(ctx: ServiceContext, ids: list[int], state: str, error: str | None = None) -> None:
    with transaction(ctx.sessions) as session:
        session.execute(update(Request).where(Request.id.in_(ids)).values(
            state=state, ended_at=ctx.clock.now(), last_error=error, received=0, attempts=1))


def _batch_reads(ctx: ServiceContext, ids: list[int]) -> tuple[list[int], int]:
    """The notices for ``ids``, and how many queries of the requests table made them."""
    reads = 0

    def count(_conn: object, _cursor: object, statement: str, *_args: object) -> None:
        nonlocal reads
        reads += "FROM requests" in statement

    event.listen(ctx.engine, "after_cursor_execute", count)
    try:
        created = notifications.on_requests_ended(ctx, ids)
    finally:
        event.remove(ctx.engine, "after_cursor_execute", count)
    return created, reads


def test_many_ends_of_one_batch_read_the_batch_once(ctx: ServiceContext) -> None:
    """A sweep (an IRB that lapsed) ends hundreds of one batch in a tick: one read of it, not one each."""
    ids = add_batch(ctx, 600)
    canceled, failed, last = ids[:400], ids[400:403], ids[403:]
    _end_many(ctx, canceled, "canceled")
    _end_many(ctx, failed, "failed", error="the PACS refused")
    created, _ = _batch_reads(ctx, canceled + failed)
    assert [n.kind for n in all_notices(ctx)] == ["request_failed"] * 3 and len(created) == 3

    _end_many(ctx, last, "completed")
    created, reads = _batch_reads(ctx, last)
    [summary] = [n for n in all_notices(ctx) if n.kind == "batch_ended"]
    assert created == [summary.id]
    assert summary.subject == "197 of 600 studies ready in project alpha; 3 failed, 400 canceled"
    assert reads <= 5, f"{reads} queries of the requests table for {len(last)} ends of one batch"
    assert notifications.on_requests_ended(ctx, last) == []  # asked again: nothing new
    with pytest.raises(NotFound):
        notifications.on_requests_ended(ctx, [*last[:1], 10_000])


def test_concurrent_calls_for_the_last_request_notify_once(ctx: ServiceContext) -> None:
    ids = add_batch(ctx)
    for request_id in ids:
        end(ctx, request_id, "completed")
    results: list[list[int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def call(request_id: int) -> None:
        barrier.wait()
        try:
            results.append(notifications.on_request_ended(ctx, request_id))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=call, args=(request_id,)) for request_id in (*ids, ids[-1])]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sorted(len(r) for r in results) == [0, 0, 0, 1]
    assert len(all_notices(ctx)) == 1


def test_email_reaches_a_real_smtp_server_without_phi(tmp_path: Path, database_url: str,
                                                      smtp: tuple[Mailbox, int]) -> None:
    mailbox, port = smtp
    ctx = make_ctx(tmp_path, database_url, f'\n[smtp]\nhost = "127.0.0.1"\nport = {port}\nsender = "mi2b2@hospital.test"\n')
    first, second, third = add_batch(ctx)
    for request_id, state in ((first, "completed"), (second, "failed"), (third, "completed")):
        end(ctx, request_id, state, error=LEAKY_ERROR if state == "failed" else None, received=0)
        notifications.on_request_ended(ctx, request_id)

    subjects = [m["Subject"] for m in mailbox.messages]
    assert subjects == ["[mi2b2] A retrieval failed in project alpha",
                        "[mi2b2] 2 of 3 studies ready in project alpha; 1 failed"]
    assert mailbox.recipients == [["alice@example.org"], ["alice@example.org"]]
    for message in mailbox.messages:
        assert message["From"] == "mi2b2@hospital.test"
        assert message["Auto-Submitted"] == "auto-generated"
        assert_no_phi(message.as_string())
    assert all(n.emailed_at is not None and n.email_error is None for n in all_notices(ctx))

    # bob has no address: in-app only
    [bobs] = add_batch(ctx, 1, batch_id="batch-2", user="bob")
    end(ctx, bobs, "completed")
    notifications.on_request_ended(ctx, bobs)
    assert len(mailbox.messages) == 2
    assert all_notices(ctx)[-1].emailed_at is None


def test_email_failures_are_recorded_not_raised(tmp_path: Path, database_url: str, smtp: tuple[Mailbox, int]) -> None:
    _mailbox, port = smtp
    closed = free_port()
    ctx = make_ctx(tmp_path / "a", database_url, f'\n[smtp]\nhost = "127.0.0.1"\nport = {closed}\n')
    [request_id] = add_batch(ctx, 1)
    end(ctx, request_id, "completed")
    notifications.on_request_ended(ctx, request_id)
    [notice] = all_notices(ctx)
    assert notice.emailed_at is None and notice.email_error is not None
    assert f"cannot reach the mail relay 127.0.0.1:{closed}" in notice.email_error

    # a relay that does not offer STARTTLS when the site asks for it
    ctx.config = ctx.config.model_copy(update={"smtp": ctx.config.smtp.model_copy(  # type: ignore[union-attr]
        update={"port": port, "starttls": True})})
    [again] = add_batch(ctx, 1, batch_id="batch-3")
    end(ctx, again, "completed")
    notifications.on_request_ended(ctx, again)
    assert "does not offer STARTTLS" in (all_notices(ctx)[-1].email_error or "")


def test_listing_and_marking_read(ctx: ServiceContext) -> None:
    for n in range(3):
        [request_id] = add_batch(ctx, 1, batch_id=f"b{n}")
        end(ctx, request_id, "completed")
        notifications.on_request_ended(ctx, request_id)
    [bobs] = add_batch(ctx, 1, batch_id="bob-1", user="bob")
    end(ctx, bobs, "completed")
    notifications.on_request_ended(ctx, bobs)

    mine = notifications.list_notifications(ctx, ALICE)
    assert len(mine) == 3 and mine[0].id > mine[-1].id  # newest first, only alice's
    assert notifications.mark_read(ctx, ALICE, [mine[0].id]) == 1
    assert len(notifications.list_notifications(ctx, ALICE, unread_only=True)) == 2
    bob_id = notifications.list_notifications(ctx, BOB)[0].id
    with pytest.raises(NotFound, match=str(bob_id)):
        notifications.mark_read(ctx, ALICE, [bob_id])
    with pytest.raises(InvalidInput):
        notifications.mark_read(ctx, ALICE)
    ctx.clock.advance(seconds=5)  # type: ignore[attr-defined]
    assert notifications.mark_read(ctx, ALICE, everything=True) == 2
    assert notifications.list_notifications(ctx, ALICE, unread_only=True) == []
    assert notifications.list_notifications(ctx, BOB, unread_only=True)[0].read_at is None
    read_times = [n.read_at for n in notifications.list_notifications(ctx, ALICE)]
    assert read_times == [ctx.clock.now() - timedelta(seconds=5), ctx.clock.now(), ctx.clock.now()]


def test_notifications_api(ctx: ServiceContext) -> None:
    for n in range(2):
        [request_id] = add_batch(ctx, 1, batch_id=f"b{n}")
        end(ctx, request_id, "completed")
        notifications.on_request_ended(ctx, request_id)
    app = create_app(ctx)
    alice, bob = TestClient(app), TestClient(app)
    for client, login in ((alice, "alice"), (bob, "bob")):
        assert client.post("/api/v1/auth/login", json={"login": login, "password": PASSWORD}).status_code == 200
    assert TestClient(app).get("/api/v1/notifications").status_code == 401
    listed = alice.get("/api/v1/notifications", params={"unread": "true"}).json()
    assert len(listed) == 2 and listed[0]["subject"].startswith("1 study ready in project alpha")
    assert bob.get("/api/v1/notifications").json() == []
    assert bob.post("/api/v1/notifications/read", json={"ids": [listed[0]["id"]]}).status_code == 404
    assert alice.post("/api/v1/notifications/read", json={"ids": [listed[0]["id"]]}).json() == {"marked": 1}
    assert len(alice.get("/api/v1/notifications?unread=true").json()) == 1
    assert alice.post("/api/v1/notifications/read", json={}).status_code == 422
    assert alice.post("/api/v1/notifications/read", json={"all": True}).json() == {"marked": 1}
    assert alice.get("/api/v1/notifications?unread=true").json() == []
