"""Every audit event, also to the security team's syslog collector as an IHE ATNA message.

Queued, never sent in the request path: `AtnaQueue.enqueue` writes the message into
``audit_syslog_outbox`` in the transaction of its audit event (both commit, or neither does),
and a worker's `AtnaDelivery` thread sends the queue in order and deletes what was sent. A
collector that is down, slow or refuses mi2b2's TLS costs a growing backlog
(``mi2b2_audit_syslog_backlog``) and a logged error, never an action and never a message.

Delivery is at least once: a process killed between sending and deleting sends those
few messages again (the SIEM sees the same trail row twice, recognisably: the message
names it). One process sends at a time (a lease row), so the collector gets the trail's order.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, insert, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.outage import is_outage
from mi2b2.adapters.db.tables import AuditSyslogOutbox, AuditSyslogSender
from mi2b2.adapters.syslog import SyslogConnection, SyslogTlsError, TlsSettings, rfc5424_message
from mi2b2.config import SiteConfig
from mi2b2.domain.atna import AtnaSite, AuditSource, Node, render_within
from mi2b2.domain.audit_chain import ChainedEvent
from mi2b2.domain.clock import Clock, as_utc
from mi2b2.errors import ConfigError

LOG = logging.getLogger(__name__)
MSGID = "IHE+RFC-3881"  # IHE ITI-20 Record Audit Event
HEADER_ROOM = 400  # the RFC 5424 header and BOM ahead of the XML, generously
LEASE = timedelta(seconds=30)
BATCH = 200  # messages read per round
DELETE_EVERY = 20  # sent messages deleted per transaction: at most this many are sent twice after a crash


class AtnaQueue:
    """Turns audit events into queued syslog messages, in the caller's transaction."""

    def __init__(self, site: AtnaSite, max_message_bytes: int, hostname: str | None = None) -> None:
        self.site = site
        self._max_bytes = max_message_bytes
        self._hostname = hostname or socket.gethostname()

    def message(self, event: ChainedEvent) -> bytes:
        xml = render_within(event, self.site, self._max_bytes - HEADER_ROOM)
        at = datetime.strptime(event.occurred_at, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=UTC)
        return rfc5424_message(MSGID, xml.decode(), at, self._hostname, utf8=True)

    def enqueue(self, session: Session, events: Sequence[ChainedEvent], now: datetime) -> None:
        session.execute(insert(AuditSyslogOutbox), [
            {"audit_seq": event.seq, "message": self.message(event), "created_at": now, "attempts": 0}
            for event in events])


def atna_site(config: SiteConfig) -> AtnaSite:
    atna = config.audit.atna
    host = socket.gethostname()
    nodes = {pacs.id: Node(pacs.ae_title, pacs.host) for pacs in config.all_pacs()}
    nodes.update({dest.id: Node(dest.ae_title, dest.host) for dest in config.destinations})
    source = AuditSource((atna.audit_source_id if atna else None) or host, atna.enterprise_site_id if atna else None)
    return AtnaSite(source, config.dicom.ae_title, host, nodes)


def atna_queue(config: SiteConfig) -> AtnaQueue | None:
    """The queue ``[audit.atna]`` asks for, or None."""
    if config.audit.atna is None:
        return None
    return AtnaQueue(atna_site(config), config.audit.atna.max_message_bytes)


def backlog(session: Session) -> int:
    """Messages queued and not yet delivered."""
    return session.scalar(select(func.count()).select_from(AuditSyslogOutbox)) or 0


class AtnaSender:
    """Sends the outbox, oldest first, over one kept-open connection; backs off while it cannot."""

    def __init__(self, sessions: sessionmaker[Session], clock: Clock, config: SiteConfig) -> None:
        atna = config.audit.atna
        if atna is None:
            raise ConfigError("[audit.atna] is not configured")
        self._sessions = sessions
        self._clock = clock
        self._retry_max = atna.retry_max_seconds
        self.holder = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"[:128]
        target = atna.target()
        files = {name: config.resolve(path) for name, path in
                 (("ca_file", atna.ca_file), ("cert_file", atna.cert_file), ("key_file", atna.key_file)) if path}
        for name, path in files.items():
            if not path.is_file():
                raise ConfigError(f"[audit.atna] {name}: {path} does not exist; fix {name} (a path relative to the "
                                  "configuration file's folder, or absolute)")
        tls = TlsSettings(files.get("ca_file"), files.get("cert_file"), files.get("key_file"), atna.server_name)
        try:
            self._connection = SyslogConnection(target, tls)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError: a file that is no certificate or key
            raise ConfigError(f"[audit.atna]: cannot load the TLS files ({exc}); ca_file must hold PEM CA "
                              "certificates, cert_file and key_file a PEM certificate and its key") from None
        self.target = target
        self._failing: str | None = None  # the error of the ongoing outage, logged once

    def deliver(self) -> int:
        """Send what is due; the number sent. Stops at the first message the collector did not take."""
        now = self._clock.now()
        with self._sessions() as session:
            head = session.execute(select(AuditSyslogOutbox.next_attempt_at).order_by(AuditSyslogOutbox.id)
                                   .limit(1)).first()
        if head is None or (head.next_attempt_at is not None and as_utc(head.next_attempt_at) > now):
            return 0
        if not self._claim(now):
            return 0  # another process is sending
        with self._sessions() as session:
            rows = session.execute(select(AuditSyslogOutbox.id, AuditSyslogOutbox.message, AuditSyslogOutbox.attempts)
                                   .order_by(AuditSyslogOutbox.id).limit(BATCH)).all()
        sent: list[int] = []
        try:
            for row in rows:
                try:
                    self._connection.send(row.message)
                except OSError as exc:
                    self._flush(sent)
                    self._failed(row.id, row.attempts + 1, exc)
                    return len(sent)
                sent.append(row.id)
                if len(sent) % DELETE_EVERY == 0:
                    self._flush(sent[-DELETE_EVERY:])
            self._flush(sent[len(sent) - len(sent) % DELETE_EVERY:])
        except Exception:
            self._connection.close()  # the database went away mid-round: start clean
            raise
        if self._failing is not None:
            LOG.warning("ATNA syslog collector %s takes messages again", self.target)
            self._failing = None
        return len(sent)

    def _claim(self, now: datetime) -> bool:
        with transaction(self._sessions) as session:
            claimed = session.execute(
                update(AuditSyslogSender)
                .where(AuditSyslogSender.id == 1,
                       or_(AuditSyslogSender.holder == self.holder, AuditSyslogSender.lease_until.is_(None),
                           AuditSyslogSender.lease_until < now))
                .values(holder=self.holder, lease_until=now + LEASE))
            return bool(claimed.rowcount)  # type: ignore[attr-defined]

    def _flush(self, ids: list[int]) -> None:
        if ids:
            with transaction(self._sessions) as session:
                session.execute(delete(AuditSyslogOutbox).where(AuditSyslogOutbox.id.in_(ids)))

    def _failed(self, row_id: int, attempts: int, error: OSError) -> None:
        wait = min(self._retry_max, 2.0 ** min(attempts - 1, 16))
        text = str(error) or type(error).__name__
        with transaction(self._sessions) as session:
            session.execute(update(AuditSyslogOutbox).where(AuditSyslogOutbox.id == row_id).values(
                attempts=attempts, next_attempt_at=self._clock.now() + timedelta(seconds=wait), last_error=text[:2000]))
            queued = backlog(session)
        if text != self._failing:
            # A certificate refused is the site's configuration to fix; a collector down is an outage.
            level = logging.ERROR if isinstance(error, SyslogTlsError) else logging.WARNING
            LOG.log(level, "ATNA audit messages wait for the syslog collector %s: %s; %d queued, nothing is lost, "
                    "retrying every %.0f s at most", self.target, text, queued, self._retry_max)
            self._failing = text

    def close(self) -> None:
        self._connection.close()
        try:
            with transaction(self._sessions) as session:
                session.execute(update(AuditSyslogSender)
                                .where(AuditSyslogSender.id == 1, AuditSyslogSender.holder == self.holder)
                                .values(holder=None, lease_until=None))
        except Exception as exc:  # the lease runs out by itself
            LOG.debug("ATNA sender lease not released: %s", exc)


class AtnaDelivery:
    """A worker's thread that runs `AtnaSender.deliver`, so a slow collector never holds up scheduling."""

    def __init__(self, sender: AtnaSender, poll_seconds: float) -> None:
        self.sender = sender
        self._poll = poll_seconds
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="atna-syslog", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                sent = self.sender.deliver()
            except Exception as exc:
                if not is_outage(exc):
                    LOG.exception("ATNA delivery round failed")
                sent = 0
            if sent < BATCH:
                self._stop.wait(self._poll)

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=30)
        # One last round: what the worker's final actions queued goes out before it exits.
        try:
            self.sender.deliver()
        except Exception as exc:
            LOG.warning("ATNA messages left queued at stop: %s", exc)
        self.sender.close()
