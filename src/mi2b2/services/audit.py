"""The audit trail: append-only, hash-chained (keyed), and itself access-controlled.

An action that changes the database writes its audit rows in its own
transaction (``record(..., session=session)``, or ``record_many`` for a bulk
action: one lock of the head, one insert): both commit, or neither does. A
refusal is recorded in a transaction of its own, because the refused operation
raises and rolls back its own work, and the refusal must stay on record.

Every append locks the head row, so take it last in a transaction that locks
other rows too: appends are the final step of a unit of work.
"""

from __future__ import annotations

import csv
import hmac
import io
import logging
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from pathlib import Path
from typing import Any

from sqlalchemy import Select, String, insert, or_, select, update
from sqlalchemy.orm import Session, sessionmaker

from mi2b2.adapters import syslog
from mi2b2.adapters.crypto.audit_key import create_key_file, read_key_file
from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import AuditEvent as AuditEvent  # re-exported: `list` returns these rows
from mi2b2.adapters.db.tables import AuditHead
from mi2b2.adapters.storage.checkpoint_file import append_line, read_lines
from mi2b2.config import SyslogTarget
from mi2b2.domain.audit_chain import (
    AuditKey,
    ChainedEvent,
    ChainVerdict,
    Checkpoint,
    CheckpointForged,
    canonical_detail,
    canonical_time,
    checkpoint_line,
    event_hash,
    fit_field,
    parse_checkpoints,
    sign_checkpoint,
    verify_chain,
)
from mi2b2.domain.clock import Clock
from mi2b2.domain.principal import Principal
from mi2b2.errors import AccessDenied, ConfigError, InvalidInput, PermanentError
from mi2b2.services.audit_syslog import AtnaQueue

LOG = logging.getLogger(__name__)
INIT_KEY_COMMAND = "mi2b2 audit init-key"
CHECKPOINT_MSGID = "audit-checkpoint"


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
    AUDIT_KEY = "audit_key"  # the chain got its key (rows before it stay plain SHA-256, sealed by this one)
    REIDENTIFY = "reidentify"  # the honest broker turned a pseudonym back into the original (detail: why)
    LIST = "list"  # a de-identified project's cache or request log was shown (detail: the policy applied)


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


@dataclass(frozen=True)
class AuditEntry:
    """One event to append (``AuditTrail.record_many``)."""

    who: Principal | str
    action: Action
    outcome: Outcome = Outcome.OK
    project_id: str | None = None
    pacs_id: str | None = None
    patient_id: str | None = None
    study_uid: str | None = None
    detail: dict[str, Any] | None = None


class AuditTrail:
    def __init__(self, sessions: sessionmaker[Session], clock: Clock, key: AuditKey | None = None,
                 checkpoint_file: Path | None = None, syslog: SyslogTarget | None = None,
                 atna: AtnaQueue | None = None) -> None:
        self._sessions = sessions
        self.atna = atna  # every event also queued for the security team's syslog, in its own transaction
        self._clock = clock
        self._key = key
        self._checkpoint_file = checkpoint_file
        self._syslog = syslog
        self._last_checkpoint: tuple[int, str] | None = None

    @property
    def keyed(self) -> bool:
        return self._key is not None

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
        session: Session | None = None,
    ) -> int:
        """Append one event: inside ``session``'s transaction when given (it commits with the action),
        else in a transaction of its own (refusals, reads)."""
        entry = AuditEntry(who, action, outcome, project_id, pacs_id, patient_id, study_uid, detail)
        if session is not None:
            return self.record_many(session, [entry])[0]
        with transaction(self._sessions) as own:
            return self.record_many(own, [entry])[0]

    def record_many(self, session: Session, entries: Iterable[AuditEntry]) -> list[int]:
        """Append events in the caller's transaction: the head is locked and updated once, all rows in one insert."""
        entries = list(entries)
        if not entries:
            return []
        # Locking the head row orders appends across processes (row lock on
        # PostgreSQL; SQLite already holds the write lock from BEGIN IMMEDIATE).
        # Columns, not the ORM object: a session that appended before must not see a stale head.
        seq, prev_hash = session.execute(
            select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1).with_for_update()
        ).one()
        occurred_at = canonical_time(self._clock.now())
        rows: list[dict[str, Any]] = []
        for entry in entries:
            seq += 1
            event = ChainedEvent(
                seq=seq,
                occurred_at=occurred_at,
                actor=_fit("actor", entry.who.login if isinstance(entry.who, Principal) else entry.who) or "",
                client=_fit("client", entry.who.client if isinstance(entry.who, Principal) else "") or "",
                action=str(entry.action),
                outcome=str(entry.outcome),
                project_id=_fit("project_id", entry.project_id),
                pacs_id=_fit("pacs_id", entry.pacs_id),
                patient_id=_fit("patient_id", entry.patient_id),
                study_uid=_fit("study_uid", entry.study_uid),
                detail=canonical_detail(entry.detail or {}),
                prev_hash=prev_hash,
            )
            prev_hash = event_hash(event, self._key.secret_for(seq) if self._key else None)
            rows.append({**event.__dict__, "hash": prev_hash})
        session.execute(insert(AuditEvent), rows)
        if self.atna is not None:
            self.atna.enqueue(session, [ChainedEvent(**row) for row in rows], self._clock.now())
        session.execute(update(AuditHead).where(AuditHead.id == 1).values(seq=seq, hash=prev_hash))
        return [row["seq"] for row in rows]

    # --- key and checkpoints ---------------------------------------------------------

    def init_key(self, who: Principal, key_file: Path) -> tuple[AuditKey, ChainVerdict]:
        """Create the key file and seal the trail: the rows so far must verify as a plain chain,
        and the first keyed row (recorded here) links to the last of them."""
        if key_file.exists():
            raise InvalidInput(f"audit key file {key_file} already exists; {INIT_KEY_COMMAND} never overwrites a key "
                               "(the rows it signed could no longer be verified). Move it away first only if it "
                               "belongs to no trail.")
        with transaction(self._sessions) as session:
            head_seq, head_hash = session.execute(
                select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1).with_for_update()
            ).one()
            verdict = self._verdict(session, head_seq, head_hash, None, [])
            if not verdict.ok:
                raise InvalidInput(
                    f"the existing audit trail is broken at row {verdict.bad_seq} ({verdict.problem}); not sealing "
                    "it under a key. Restore the database from a backup whose trail verifies, then run "
                    f"{INIT_KEY_COMMAND} again.")
            try:
                key = create_key_file(key_file, keyed_from=head_seq + 1)
            except FileExistsError:
                raise InvalidInput(f"audit key file {key_file} was just created by another process") from None
            except OSError as exc:
                raise ConfigError(f"cannot write audit key file {key_file}: {exc}; "
                                  "fix the folder or set [audit] key_file") from None
            self._key = key
            self.record(who, Action.AUDIT_KEY, detail={"op": "init-key", "unkeyed_rows": head_seq,
                                                        "keyed_from": key.keyed_from}, session=session)
        return key, verdict

    def checkpoint(self) -> Checkpoint | None:
        """Sign the chain head and append it to the checkpoint file (and send it to syslog when configured).
        None when there is nothing new to sign.

        The newest row is checked against the key first, so a head forged in the
        database is never signed."""
        if self._key is None or self._checkpoint_file is None:
            return None
        with self._sessions() as session:
            seq, head_hash = session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).one()
            newest = session.get(AuditEvent, seq) if seq else None
            event = _chained(newest) if newest is not None else None
        if seq == 0 or self._last_checkpoint == (seq, head_hash):
            return None
        if event is None or event.hash != head_hash or not hmac.compare_digest(
                event_hash(event, self._key.secret_for(seq)), head_hash):
            raise PermanentError(f"audit row {seq} does not match its keyed hash; not signing a checkpoint of it. "
                                 "Run `mi2b2 audit verify`.")
        checkpoint = sign_checkpoint(self._key, seq, head_hash, canonical_time(self._clock.now()))
        line = checkpoint_line(checkpoint)
        try:
            append_line(self._checkpoint_file, line)
        except OSError as exc:
            raise ConfigError(f"cannot append to the audit checkpoint file {self._checkpoint_file}: {exc}; "
                              "fix the folder or set [audit] checkpoint_file") from None
        self._last_checkpoint = (seq, head_hash)
        self._send_to_syslog(seq, line)
        return checkpoint

    def _send_to_syslog(self, seq: int, line: str) -> None:
        """A copy for the site's log server; the file is the record, so a server that is down costs a warning only."""
        if self._syslog is None:
            return
        try:
            syslog.send(self._syslog, syslog.rfc5424_message(CHECKPOINT_MSGID, line, self._clock.now()))
        except OSError as exc:
            LOG.warning("audit checkpoint of row %d is in %s but was not sent to syslog %s: %s",
                        seq, self._checkpoint_file, self._syslog, exc)

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
        """The chain (keyed part with the key) and the signed checkpoints."""
        self._authorise(reader, AuditFilter(), verify=True)
        checkpoints: list[Checkpoint] = []
        if self._key is not None and self._checkpoint_file is not None:
            try:
                checkpoints = parse_checkpoints(read_lines(self._checkpoint_file), self._key)
            except CheckpointForged as forged:
                return ChainVerdict(False, 0, None, f"{self._checkpoint_file}: {forged}", self._key.keyed_from)
        with self._sessions() as session:
            head_seq, head_hash = session.execute(select(AuditHead.seq, AuditHead.hash).where(AuditHead.id == 1)).one()
            return self._verdict(session, head_seq, head_hash, self._key, checkpoints)

    @staticmethod
    def _verdict(session: Session, head_seq: int, head_hash: str, key: AuditKey | None,
                 checkpoints: Sequence[Checkpoint]) -> ChainVerdict:
        rows = session.scalars(select(AuditEvent).order_by(AuditEvent.seq).execution_options(yield_per=2000))
        return verify_chain((_chained(row) for row in rows), head_seq, head_hash, key, checkpoints)

    def _authorise(self, reader: Principal, query: AuditFilter, export: bool = False, verify: bool = False) -> None:
        filters = {k: str(v) for k, v in query.__dict__.items() if v is not None and k not in ("limit", "offset")}
        if not reader.may_read_audit:
            self.record(reader, Action.DENIED, Outcome.DENIED, detail={"wanted": "audit trail", **filters})
            raise AccessDenied("only admins and auditors may read the audit trail")
        kind = "verify" if verify else "export" if export else "list"
        # Reading is itself an auditable act; a patient filter is recorded in the patient column.
        self.record(reader, Action.AUDIT_READ, patient_id=query.patient_id, detail={"kind": kind, **filters})


def _fit(column: str, value: str | None) -> str | None:
    """The value as its column stores it (see `fit_field`)."""
    column_type = AuditEvent.__table__.c[column].type
    if not isinstance(column_type, String) or column_type.length is None:
        raise TypeError(f"audit_events.{column} is not a text column of bounded length")
    return fit_field(value, column_type.length)


def _chained(row: AuditEvent) -> ChainedEvent:
    return ChainedEvent(**{column: getattr(row, column) for column in EXPORT_COLUMNS})


def load_audit_key(sessions: sessionmaker[Session], key_file: Path) -> AuditKey:
    """The site's audit key. Zero setup: made here when the trail is still empty (logged);
    refused when the trail has rows, since a new key could not vouch for them."""
    try:
        return read_key_file(key_file)
    except FileNotFoundError:
        pass
    with transaction(sessions) as session:
        # The head stays locked until the key exists, so no unkeyed row slips in meanwhile.
        head_seq = session.execute(select(AuditHead.seq).where(AuditHead.id == 1).with_for_update()).scalar_one()
        if head_seq:
            raise ConfigError(
                f"the audit trail has {head_seq} events but its key file {key_file} does not exist. If this site has "
                f"a key, put it there (or point [audit] key_file in the configuration at it); if the trail never had "
                f"one (a database from before keyed audit), run `{INIT_KEY_COMMAND}` once, then copy the file to "
                "every host that runs mi2b2.")
        try:
            key = create_key_file(key_file, keyed_from=1)
        except FileExistsError:
            return read_key_file(key_file)
        except OSError as exc:
            raise ConfigError(f"cannot create the audit key file {key_file}: {exc}; "
                              "fix the folder or set [audit] key_file in the configuration") from None
    LOG.warning("audit trail is empty and had no key: created the audit key %s (mode 0600). Keep it out of the "
                "database's backups; every host running mi2b2 against this database needs a copy.", key_file)
    return key


def _filtered(query: AuditFilter) -> Select[AuditEvent]:
    statement = select(AuditEvent)
    if query.actor:
        statement = statement.where(AuditEvent.actor == query.actor)
    if query.project_id:
        statement = statement.where(AuditEvent.project_id == query.project_id)
    if query.action:
        statement = statement.where(AuditEvent.action == query.action)
    if query.patient_id:
        # A search names many patients in its detail; match those too. A long ID is stored fitted.
        fitted = _fit("patient_id", query.patient_id)
        quoted = '"' + query.patient_id.replace("\\", "\\\\").replace('"', '\\"') + '"'
        statement = statement.where(
            or_(AuditEvent.patient_id == fitted, AuditEvent.detail.contains(quoted, autoescape=True))
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
