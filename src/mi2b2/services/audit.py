"""The audit trail: append-only, hash-chained, and itself access-controlled.

Each event is written in its own transaction. A refusal must stay on record
even though the refused operation raises and rolls back its own work.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import AuditEvent, AuditHead
from mi2b2.domain.audit_chain import (
    ChainedEvent,
    ChainVerdict,
    canonical_detail,
    canonical_time,
    event_hash,
    verify_chain,
)
from mi2b2.domain.clock import Clock
from mi2b2.domain.principal import Principal
from mi2b2.errors import AccessDenied


class Action(StrEnum):
    LOGIN = "login"
    LOGOUT = "logout"
    CONFIG_RELOAD = "config_reload"
    QUERY = "query"
    DENIED = "denied"
    RETRIEVE = "retrieve"
    RECEIVE = "receive"
    DOWNLOAD = "download"
    FORWARD = "forward"
    DELETE = "delete"
    VIEW = "view"
    AUDIT_READ = "audit_read"
    USER_ADMIN = "user_admin"
    TOKEN_ADMIN = "token_admin"
    CACHE_CHECK = "cache_check"  # fsck: index and disk compared (and repaired)
    ALLOW_LIST = "allow_list"  # an admin replaced a project's MRN allow-list (detail: counts only)


class Outcome(StrEnum):
    OK = "ok"
    FAILED = "failed"
    DENIED = "denied"


@dataclass(frozen=True)
class AuditFilter:
    actor: str | None = None
    project_id: str | None = None
    action: str | None = None
    patient_id: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    limit: int = 1000
    offset: int = 0


EXPORT_COLUMNS = [
    "seq", "occurred_at", "actor", "client", "action", "outcome", "project_id",
    "pacs_id", "patient_id", "study_uid", "detail", "prev_hash", "hash",
]


class AuditTrail:
    def __init__(self, sessions: sessionmaker[Session], clock: Clock) -> None:
        self._sessions = sessions
        self._clock = clock

    def record(
        self,
        who: Principal | str,
        action: Action,
        outcome: Outcome = Outcome.OK,
        *,
        project_id: str | None = None,
        pacs_id: str | None = None,
        patient_id: str | None = None,
        study_uid: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> int:
        actor = who.login if isinstance(who, Principal) else who
        client = who.client if isinstance(who, Principal) else ""
        with transaction(self._sessions) as session:
            # Locking the head row orders appends across processes (row lock on
            # PostgreSQL; SQLite already holds the write lock from BEGIN IMMEDIATE).
            head = session.execute(select(AuditHead).where(AuditHead.id == 1).with_for_update()).scalar_one()
            event = ChainedEvent(
                seq=head.seq + 1,
                occurred_at=canonical_time(self._clock.now()),
                actor=actor,
                client=client,
                action=str(action),
                outcome=str(outcome),
                project_id=project_id,
                pacs_id=pacs_id,
                patient_id=patient_id,
                study_uid=study_uid,
                detail=canonical_detail(detail or {}),
                prev_hash=head.hash,
            )
            digest = event_hash(event)
            session.add(AuditEvent(**{**event.__dict__, "hash": digest}))
            session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=event.seq, hash=digest))
        return event.seq

    def list(self, reader: Principal, query: AuditFilter) -> list[AuditEvent]:
        self._authorise(reader, query)
        with self._sessions() as session:
            statement = _filtered(query).order_by(AuditEvent.seq).offset(query.offset).limit(query.limit)
            return list(session.scalars(statement))

    def export_csv(self, reader: Principal, query: AuditFilter) -> Iterator[str]:
        """CSV text in chunks; the hashes are included so an export can be re-verified offline.

        A cell a spreadsheet would run as a formula (it starts with = + - @, a tab or a
        carriage return: a PatientID from the network can) gets a leading apostrophe;
        strip one leading apostrophe from such cells before recomputing a hash."""
        self._authorise(reader, query, export=True)
        buffer = io.StringIO()
        writer = csv.writer(buffer)
        writer.writerow(EXPORT_COLUMNS)
        with self._sessions() as session:
            for row in session.scalars(_filtered(query).order_by(AuditEvent.seq).execution_options(yield_per=1000)):
                writer.writerow([spreadsheet_safe(getattr(row, column)) for column in EXPORT_COLUMNS])
                if buffer.tell() > 65536:
                    yield buffer.getvalue()
                    buffer.seek(0)
                    buffer.truncate()
        yield buffer.getvalue()

    def verify(self, reader: Principal) -> ChainVerdict:
        self._authorise(reader, AuditFilter(), verify=True)
        with self._sessions() as session:
            head = session.execute(select(AuditHead).where(AuditHead.id == 1)).scalar_one()
            rows = session.scalars(select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=2000))
            events = (
                ChainedEvent(**{column: getattr(row, column) for column in EXPORT_COLUMNS})
                for row in rows
            )
            return verify_chain(events, head.seq, head.hash)

    def _authorise(self, reader: Principal, query: AuditFilter, export: bool = False, verify: bool = False) -> None:
        filters = {k: str(v) for k, v in query.__dict__.items() if v is not None and k not in ("limit", "offset")}
        if not reader.may_read_audit:
            self.record(reader, Action.DENIED, Outcome.DENIED, detail={"wanted": "audit trail", **filters})
            raise AccessDenied("only admins and auditors may read the audit trail")
        kind = "verify" if verify else "export" if export else "list"
        # Reading is itself an auditable act; a patient filter is recorded in the patient column.
        self.record(reader, Action.AUDIT_READ, patient_id=query.patient_id, detail={"kind": kind, **filters})


def _filtered(query: AuditFilter):  # type: ignore[no-untyped-def]
    statement = select(AuditEvent)
    if query.actor:
        statement = statement.where(AuditEvent.actor == query.actor)
    if query.project_id:
        statement = statement.where(AuditEvent.project_id == query.project_id)
    if query.action:
        statement = statement.where(AuditEvent.action == query.action)
    if query.patient_id:
        # A search names many patients in its detail; match those too.
        quoted = '"' + query.patient_id.replace("\\", "\\\\").replace('"', '\\"') + '"'
        statement = statement.where(
            or_(AuditEvent.patient_id == query.patient_id, AuditEvent.detail.contains(quoted, autoescape=True))
        )
    if query.since:
        statement = statement.where(AuditEvent.occurred_at >= canonical_time(query.since))
    if query.until:
        statement = statement.where(AuditEvent.occurred_at < canonical_time(query.until))
    return statement


FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def spreadsheet_safe(value: Any) -> Any:
    """The value, with an apostrophe in front if a spreadsheet would run it as a formula."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value
