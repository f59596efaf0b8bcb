"""SQLAlchemy tables for the DESIGN.md domain model.

Times are stored as UTC. Every table is declared here so Alembic's autogenerate
and the migration test compare against one metadata.
"""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Any

from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    Date,
    DateTime,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    PrimaryKeyConstraint,
    String,
    Text,
    UniqueConstraint,
    false,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

UtcDateTime = DateTime(timezone=True)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


class Institution(Base):
    __tablename__ = "institutions"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    # MRN format and Issuer of Patient ID: every process judges patients by the same rules.
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)


class Department(Base):
    __tablename__ = "departments"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"))
    key: Mapped[str] = mapped_column(String(64))
    name: Mapped[str] = mapped_column(String(200), default="")
    active: Mapped[bool] = mapped_column(Boolean, default=True)
    __table_args__ = (UniqueConstraint("institution_id", "key"),)


class PacsNode(Base):
    __tablename__ = "pacs_nodes"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    department_id: Mapped[int] = mapped_column(ForeignKey("departments.id"))
    name: Mapped[str] = mapped_column(String(200), default="")
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    retrieve_method: Mapped[str] = mapped_column(String(8))
    query_model: Mapped[str] = mapped_column(String(8))
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # timeouts, windows, time zone
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Destination(Base):
    __tablename__ = "destinations"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    name: Mapped[str] = mapped_column(String(200), default="")
    ae_title: Mapped[str] = mapped_column(String(16))
    host: Mapped[str] = mapped_column(String(255))
    port: Mapped[int] = mapped_column(Integer)
    settings: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class Project(Base):
    __tablename__ = "projects"
    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    title: Mapped[str] = mapped_column(String(300))
    irb_number: Mapped[str] = mapped_column(String(100))
    expires_on: Mapped[date] = mapped_column(Date)
    quota_bytes: Mapped[int] = mapped_column(BigInteger)
    max_studies_per_patient: Mapped[int | None] = mapped_column(Integer, nullable=True)
    institutions: Mapped[list[str]] = mapped_column(JSON, default=list)
    active: Mapped[bool] = mapped_column(Boolean, default=True)


class ProjectMrn(Base):
    """The IRB allow-list, in the database so every worker and receiver sees the same list.

    An entry is (institution, MRN): the MRN in the institution's canonical form."""

    __tablename__ = "project_mrns"
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    institution_id: Mapped[str] = mapped_column(ForeignKey("institutions.id"), primary_key=True)
    mrn: Mapped[str] = mapped_column(String(64), primary_key=True)


class ProjectMember(Base):
    """Members are named by login so a site may list them before their account exists."""

    __tablename__ = "project_members"
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    login: Mapped[str] = mapped_column(String(64), primary_key=True)
    role: Mapped[str] = mapped_column(String(16))


class User(Base):
    __tablename__ = "users"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    login: Mapped[str] = mapped_column(String(64), unique=True)
    display_name: Mapped[str] = mapped_column(String(200), default="")
    email: Mapped[str | None] = mapped_column(String(320), nullable=True)
    role: Mapped[str] = mapped_column(String(16))
    password_hash: Mapped[str | None] = mapped_column(String(200), nullable=True)
    disabled: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class LoginFailure(Base):
    """Failed logins per (login typed, client address), whether or not the login exists.

    The login is kept as a SHA-256 (domain/login_throttle.login_digest): people
    type passwords into the login field."""

    __tablename__ = "login_failures"
    login_digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    client: Mapped[str] = mapped_column(String(64), primary_key=True)
    failures: Mapped[int] = mapped_column(Integer)
    last_failure: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class ApiToken(Base):
    """API tokens and browser sessions: only a SHA-256 of the secret is kept."""

    __tablename__ = "api_tokens"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id"))
    kind: Mapped[str] = mapped_column(String(16))  # "api" or "session"
    name: Mapped[str] = mapped_column(String(200), default="")
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_used_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    via: Mapped[str | None] = mapped_column(String(16), nullable=True)  # a session's sign-in: "ldap", "oidc"


class OidcLogin(Base):
    """A sign-in through the OpenID provider in progress: used once, by the browser that started it.

    Only SHA-256 digests of the state and of the browser's cookie are kept."""

    __tablename__ = "oidc_logins"
    state_digest: Mapped[str] = mapped_column(String(64), primary_key=True)
    browser_digest: Mapped[str] = mapped_column(String(64))
    nonce: Mapped[str] = mapped_column(String(128))
    code_verifier: Mapped[str] = mapped_column(String(128))
    started_at: Mapped[datetime] = mapped_column(UtcDateTime, index=True)


class Query(Base):
    __tablename__ = "queries"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_login: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    pacs_id: Mapped[str] = mapped_column(ForeignKey("pacs_nodes.id"))
    kind: Mapped[str] = mapped_column(String(16))  # patients, studies, accessions, series
    keys: Mapped[dict[str, Any]] = mapped_column(JSON)
    result_count: Mapped[int] = mapped_column(Integer, default=0)
    refused_count: Mapped[int] = mapped_column(Integer, default=0)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Request(Base):
    __tablename__ = "requests"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(String(16), default="retrieve")
    batch_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    user_login: Mapped[str] = mapped_column(String(64))
    pacs_id: Mapped[str | None] = mapped_column(ForeignKey("pacs_nodes.id"), nullable=True)
    destination_id: Mapped[str | None] = mapped_column(ForeignKey("destinations.id"), nullable=True)
    patient_id: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str] = mapped_column(String(64))
    accession: Mapped[str] = mapped_column(String(64), default="")
    series_uids: Mapped[list[str]] = mapped_column(JSON, default=list)
    priority: Mapped[int] = mapped_column(Integer, default=0)
    state: Mapped[str] = mapped_column(String(16), default="scheduled")
    waiting_reason: Mapped[str | None] = mapped_column(String(200), nullable=True)
    expected_instances: Mapped[int] = mapped_column(Integer, default=0)
    expected_bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    received: Mapped[int] = mapped_column(Integer, default=0)
    failed: Mapped[int] = mapped_column(Integer, default=0)
    warnings: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    last_status: Mapped[int | None] = mapped_column(Integer, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(100), nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # When the PACS finished sending (its C-MOVE or C-GET answered): from then on
    # the request no longer loads the PACS, though it stays processing until its
    # last instances are durable and counted.
    pacs_done_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    not_before: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    # The receiver's word to the retrieval (services/receipts.py): it could not
    # write this attempt's instances to the cache, why and when. The attempt fails.
    write_failure: Mapped[str | None] = mapped_column(Text, nullable=True)
    write_failed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    # The C-MOVE this attempt sent, so the receiver can tell its instances from
    # another project's retrieval of the same study (their Move Originator Message ID).
    move_message_id: Mapped[int | None] = mapped_column(Integer, nullable=True)
    move_destination_ae: Mapped[str | None] = mapped_column(String(16), nullable=True)
    __table_args__ = (
        Index("ix_requests_state_pacs", "state", "pacs_id"),
        # The request log's pages: newest first, with or without a state filter (keyset on id).
        Index("ix_requests_project_id", "project_id", "id"),
        Index("ix_requests_project_state_id", "project_id", "state", "id"),
    )


# A project's queue on one PACS in the order it is served (priority, then age), so a
# scheduler tick reads only the heads of the queues (services/scheduler.py).
Index(
    "ix_requests_queue", Request.pacs_id, Request.project_id, Request.state, Request.kind,
    Request.priority.desc(), Request.created_at, Request.id,
)
# A project's queue of forwards to one destination in the order it is served, so a forward
# tick reads only its heads (services/forward.py); destination and state first, so that
# "is anything queued for this destination" is one probe too.
Index(
    "ix_requests_forward_queue", Request.destination_id, Request.state, Request.kind, Request.project_id,
    Request.priority.desc(), Request.created_at, Request.id,
)


class PacsStart(Base):
    """One row per retrieval started on a PACS: the rate limits count these.

    Kept in the database (not in a worker) so several workers share one budget;
    rows older than an hour no longer matter and are pruned."""

    __tablename__ = "pacs_starts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pacs_id: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str] = mapped_column(String(64))
    request_id: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    __table_args__ = (Index("ix_pacs_starts_pacs_started", "pacs_id", "started_at"),)


class CursorKind(StrEnum):
    """What a round-robin turns over: the retrievals from one PACS, or the forwards to one destination."""

    PACS = "pacs"
    DESTINATION = "destination"


class SchedulerCursor(Base):
    """Per PACS (retrievals) and per destination (forwards), the project served
    last: where round-robin continues."""

    __tablename__ = "scheduler_cursors"
    kind: Mapped[str] = mapped_column(String(16), primary_key=True)  # a CursorKind
    target_id: Mapped[str] = mapped_column(String(64), primary_key=True)  # the PACS's or the destination's id
    last_project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)


class QueueReason(Base):
    """Why a project's queued retrievals on one PACS wait, one row per (PACS, project),
    written by the scheduler only when it changes. A request's own waiting reason is
    derived from this row and its own state when it is read (services/waiting.py)."""

    __tablename__ = "queue_reasons"
    pacs_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    project_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    reason: Mapped[str] = mapped_column(Text)
    updated_at: Mapped[datetime] = mapped_column(UtcDateTime)


class WorkerKind(StrEnum):
    WORKER = "worker"
    RECEIVER = "receiver"


class Worker(Base):
    """A running worker or receiver process. A stale heartbeat (or a dead pid
    on this host) means a worker's processing requests go back to the queue;
    with no receiver alive, no retrieval starts."""

    __tablename__ = "workers"
    id: Mapped[str] = mapped_column(String(100), primary_key=True)
    kind: Mapped[str] = mapped_column(String(16), default=WorkerKind.WORKER, server_default=WorkerKind.WORKER.value)
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    started_at: Mapped[datetime] = mapped_column(UtcDateTime)
    heartbeat_at: Mapped[datetime] = mapped_column(UtcDateTime)


class Notification(Base):
    """In-app notices (and the record of e-mails sent). Bodies carry counts and
    project names, never patient data."""

    __tablename__ = "notifications"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_login: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    batch_id: Mapped[str | None] = mapped_column(String(36), nullable=True)
    kind: Mapped[str] = mapped_column(String(32))
    subject: Mapped[str] = mapped_column(String(200))
    body: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    read_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    emailed_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    email_error: Mapped[str | None] = mapped_column(Text, nullable=True)
    __table_args__ = (Index("ix_notifications_user", "user_login", "read_at"),)


class CachedStudy(Base):
    __tablename__ = "cached_studies"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    study_uid: Mapped[str] = mapped_column(String(64))
    patient_id: Mapped[str] = mapped_column(String(64))
    # IssuerOfPatientID as the files carry it ("" for none); NULL: cached before it was kept, read on first show.
    patient_id_issuer: Mapped[str | None] = mapped_column(String(64), nullable=True)
    patient_name: Mapped[str] = mapped_column(String(200), default="")
    accession: Mapped[str] = mapped_column(String(64), default="")
    study_date: Mapped[str] = mapped_column(String(8), default="")
    modalities: Mapped[str] = mapped_column(String(64), default="")
    description: Mapped[str] = mapped_column(String(200), default="")
    pacs_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    instance_count: Mapped[int] = mapped_column(Integer, default=0)
    bytes: Mapped[int] = mapped_column(BigInteger, default=0)
    fetched_by: Mapped[str] = mapped_column(String(64), default="")
    fetched_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_downloaded_by: Mapped[str | None] = mapped_column(String(64), nullable=True)
    last_downloaded_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    __table_args__ = (UniqueConstraint("project_id", "study_uid"),)


class CachedInstance(Base):
    __tablename__ = "cached_instances"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    cached_study_id: Mapped[int] = mapped_column(ForeignKey("cached_studies.id", ondelete="CASCADE"))
    series_uid: Mapped[str] = mapped_column(String(64))
    sop_instance_uid: Mapped[str] = mapped_column(String(64))
    sop_class_uid: Mapped[str] = mapped_column(String(64), default="")
    instance_number: Mapped[int | None] = mapped_column(Integer, nullable=True)
    relative_path: Mapped[str] = mapped_column(String(400))
    bytes: Mapped[int] = mapped_column(BigInteger)
    received_at: Mapped[datetime] = mapped_column(UtcDateTime)
    __table_args__ = (UniqueConstraint("cached_study_id", "sop_instance_uid"),)


class AuditEvent(Base):
    """Append-only and hash-chained: ``hash`` = SHA-256(canonical row + prev_hash)."""

    __tablename__ = "audit_events"
    seq: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=False)
    occurred_at: Mapped[str] = mapped_column(String(32))  # canonical UTC text: what was hashed
    actor: Mapped[str] = mapped_column(String(64))
    client: Mapped[str] = mapped_column(String(100), default="")
    action: Mapped[str] = mapped_column(String(32))
    outcome: Mapped[str] = mapped_column(String(16))
    project_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    pacs_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    patient_id: Mapped[str | None] = mapped_column(String(64), nullable=True)
    study_uid: Mapped[str | None] = mapped_column(String(64), nullable=True)
    detail: Mapped[str] = mapped_column(Text, default="{}")  # canonical JSON text: what was hashed
    prev_hash: Mapped[str] = mapped_column(String(64))
    hash: Mapped[str] = mapped_column(String(64))
    __table_args__ = (
        Index("ix_audit_events_action", "action"),
        Index("ix_audit_events_project", "project_id"),
        Index("ix_audit_events_patient", "patient_id"),
    )


class AuditHead(Base):
    """One row: the newest seq and hash. Locking it serialises appends across
    processes, and it lets verification notice a deleted last row."""

    __tablename__ = "audit_head"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    seq: Mapped[int] = mapped_column(BigInteger)
    hash: Mapped[str] = mapped_column(String(64))


class AuditSyslogOutbox(Base):
    """ATNA messages waiting for the security team's syslog collector, written in the transaction
    of their audit event and deleted once sent, oldest first. ``attempts``, ``next_attempt_at``
    and ``last_error`` describe the oldest row's delivery while the collector is unreachable."""

    __tablename__ = "audit_syslog_outbox"
    id: Mapped[int] = mapped_column(BigInteger().with_variant(Integer, "sqlite"), primary_key=True, autoincrement=True)
    audit_seq: Mapped[int] = mapped_column(BigInteger, index=True)
    message: Mapped[bytes] = mapped_column(LargeBinary)  # the RFC 5424 message, framed at sending
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    attempts: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_attempt_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    last_error: Mapped[str | None] = mapped_column(Text, nullable=True)


class AuditSyslogSender(Base):
    """One row: which process delivers the outbox, until when. One sender keeps the messages in order."""

    __tablename__ = "audit_syslog_sender"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    holder: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)


class QueryLease(Base):
    """One open query association on a PACS (``granted``), or a search waiting for
    one: searches count the granted ones against ``max_concurrent_queries`` and
    are served in the order they asked. A lease nobody renews expires, so a
    killed process cannot hold a slot, or its place in line, for ever."""

    __tablename__ = "query_leases"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    pacs_id: Mapped[str] = mapped_column(String(64))
    holder: Mapped[str] = mapped_column(String(128))
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int] = mapped_column(Integer)
    granted: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())
    acquired_at: Mapped[datetime] = mapped_column(UtcDateTime)
    expires_at: Mapped[datetime] = mapped_column(UtcDateTime)
    __table_args__ = (Index("ix_query_leases_pacs_expires", "pacs_id", "expires_at"),)


class QueryPacer(Base):
    """Per PACS, the latest rate bucket handed out and how many queries it holds
    (see domain/query_governance.py)."""

    __tablename__ = "query_pacers"
    pacs_id: Mapped[str] = mapped_column(String(64), primary_key=True)
    bucket: Mapped[int | None] = mapped_column(BigInteger, nullable=True)
    used: Mapped[int] = mapped_column(Integer, default=0)


class SearchJob(Base):
    """A large search run in the background: progress, cancel, resume, results kept."""

    __tablename__ = "search_jobs"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    user_login: Mapped[str] = mapped_column(String(64))
    project_id: Mapped[str] = mapped_column(String(64))
    pacs_id: Mapped[str] = mapped_column(String(64))
    kind: Mapped[str] = mapped_column(String(16))  # patients | studies | accessions
    state: Mapped[str] = mapped_column(String(16), default="queued")
    total: Mapped[int] = mapped_column(Integer)
    done: Mapped[int] = mapped_column(Integer, default=0)
    screened: Mapped[dict[str, Any]] = mapped_column(JSON, default=dict)  # refused, duplicates, invalid at submission
    waiting_reason: Mapped[str | None] = mapped_column(Text, nullable=True)
    error: Mapped[str | None] = mapped_column(Text, nullable=True)
    worker: Mapped[str | None] = mapped_column(String(128), nullable=True)
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    started_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    ended_at: Mapped[datetime | None] = mapped_column(UtcDateTime, nullable=True)
    __table_args__ = (Index("ix_search_jobs_state", "state"),)


class SearchJobItem(Base):
    """One identifier of a job; ``done`` once its query's results are stored, so a
    resumed job never asks the PACS for it again."""

    __tablename__ = "search_job_items"
    job_id: Mapped[int] = mapped_column(ForeignKey("search_jobs.id", ondelete="CASCADE"), primary_key=True)
    position: Mapped[int] = mapped_column(Integer, primary_key=True)
    value: Mapped[str] = mapped_column(String(128))
    done: Mapped[bool] = mapped_column(Boolean, default=False, server_default=false())


class SearchJobPart(Base):
    """The report of one batch of a job (one stored, audited query)."""

    __tablename__ = "search_job_parts"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    job_id: Mapped[int] = mapped_column(ForeignKey("search_jobs.id", ondelete="CASCADE"), index=True)
    first_position: Mapped[int] = mapped_column(Integer)
    query_id: Mapped[int] = mapped_column(Integer)
    report: Mapped[dict[str, Any]] = mapped_column(JSON)


class DeidKey(Base):
    """A de-identified project's pseudonym secret: made on first use, never leaves the server."""

    __tablename__ = "deid_keys"
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"), primary_key=True)
    secret: Mapped[str] = mapped_column(String(128))  # hex
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)


class DeidMapping(Base):
    """Original -> pseudonym of each patient and study a de-identified export handed out (the honest
    broker's table: for the project's lead and admins only, never for members)."""

    __tablename__ = "deid_mappings"
    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=True)
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    kind: Mapped[str] = mapped_column(String(16))  # "patient" or "study"
    original: Mapped[str] = mapped_column(String(200))
    pseudonym: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(UtcDateTime)
    __table_args__ = (UniqueConstraint("project_id", "kind", "original"),)


class DeidUid(Base):
    """Pseudonymous UID -> cached original, per de-identified project: how DICOMweb and the viewer find the
    study, series or instance a pseudonymous URL names (the pseudonym, an HMAC, cannot be reversed).

    Filled from the cache index when a pseudonym is first not found (``services.export.pseudonymous``);
    rows of instances since deleted stay and resolve to nothing, and the same instance cached again
    gets the same pseudonym."""

    __tablename__ = "deid_uids"
    project_id: Mapped[str] = mapped_column(ForeignKey("projects.id"))
    level: Mapped[str] = mapped_column(String(8))  # study, series or instance
    pseudonym: Mapped[str] = mapped_column(String(64))
    original: Mapped[str] = mapped_column(String(64))
    study_uid: Mapped[str] = mapped_column(String(64))  # the original study it belongs to
    # Each index leads with the UID it is searched by: no planner, however stale its statistics,
    # then mistakes one for the other and scans a whole project's rows for one UID.
    __table_args__ = (PrimaryKeyConstraint("pseudonym", "project_id", "level"),
                      Index("ix_deid_uids_original", "original", "project_id", "level"))
