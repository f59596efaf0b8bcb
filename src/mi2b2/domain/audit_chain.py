"""The audit hash chain and its signed checkpoints, as pure functions.

Each event's hash covers a canonical JSON encoding of its fields and the
previous event's hash. Editing a row changes its hash; deleting or reordering
rows breaks a ``prev_hash`` link or the sequence; deleting the last rows is
caught by the head record that stores the newest seq and hash.

That alone only catches accidents: anyone who can write to the database can
recompute plain SHA-256 hashes. So from ``AuditKey.keyed_from`` on, the hash is
an HMAC-SHA256 under a key kept outside the database, and checkpoints of the
chain head, signed with the same key, are appended to a file outside the
database: a rewrite without the key fails the HMAC at its first row, and
deleting the newest rows (head moved back too) contradicts a later checkpoint.
Rows before ``keyed_from`` come from before the site had a key; they stay plain
SHA-256, and the first keyed row links to them, so they cannot change either.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64
KEY_BYTES = 32
_CHECKPOINT_CONTEXT = b"mi2b2 audit checkpoint\n"  # a checkpoint MAC can never pass for a row MAC


@dataclass(frozen=True)
class AuditKey:
    """The secret, and the first seq it covers (1 for a trail that was keyed from the start)."""

    secret: bytes
    keyed_from: int = 1

    def __post_init__(self) -> None:
        if len(self.secret) < KEY_BYTES:
            raise ValueError(f"an audit key needs at least {KEY_BYTES} bytes")
        if self.keyed_from < 1:
            raise ValueError("keyed_from is a seq, 1 or more")

    def secret_for(self, seq: int) -> bytes | None:
        return self.secret if seq >= self.keyed_from else None


@dataclass(frozen=True)
class ChainedEvent:
    seq: int
    occurred_at: str
    actor: str
    client: str
    action: str
    outcome: str
    project_id: str | None
    pacs_id: str | None
    patient_id: str | None
    study_uid: str | None
    detail: str
    prev_hash: str
    hash: str = ""


def canonical_time(moment: datetime) -> str:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def canonical_detail(detail: dict[str, Any]) -> str:
    return _storable(json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str))


def fit_field(value: str | None, size: int) -> str | None:
    """``value`` as a column of ``size`` characters will take it: always insertable.

    Values come from the network (a PatientID or UID in a forged header can be
    any length, hold NUL or broken text) and an audit row that fails to insert
    loses the very event worth keeping. Too long: the first characters, ``~``
    and 16 hex digits of the SHA-256 of the whole value, so distinct values stay
    distinct. Done before the row is hashed: the chain covers what is stored.
    """
    if value is None:
        return None
    clean = _storable(value)
    if len(clean) <= size:
        return clean
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return clean[: size - len(digest) - 1] + "~" + digest


def _storable(text: str) -> str:
    # PostgreSQL text takes no NUL character and only valid UTF-8 (no lone surrogates).
    return text.replace("\x00", "\ufffd").encode("utf-8", "replace").decode("utf-8")


def event_hash(event: ChainedEvent, secret: bytes | None = None) -> str:
    """SHA-256 of the canonical row, or HMAC-SHA256 under ``secret`` for the keyed part."""
    fields = [
        event.seq, event.occurred_at, event.actor, event.client, event.action, event.outcome,
        event.project_id, event.pacs_id, event.patient_id, event.study_uid, event.detail, event.prev_hash,
    ]
    encoded = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    if secret is None:
        return hashlib.sha256(encoded).hexdigest()
    return hmac.new(secret, encoded, hashlib.sha256).hexdigest()


# --- checkpoints --------------------------------------------------------------------


@dataclass(frozen=True)
class Checkpoint:
    seq: int
    hash: str
    at: str  # canonical UTC time it was written
    keyed_from: int
    mac: str = ""


class CheckpointForged(ValueError):
    """A checkpoint line that is not what the key signed (edited, or not a checkpoint at all)."""

    def __init__(self, line_number: int, reason: str) -> None:
        super().__init__(f"checkpoint line {line_number} {reason}")
        self.line_number = line_number


def _checkpoint_mac(secret: bytes, seq: int, head_hash: str, at: str, keyed_from: int) -> str:
    body = json.dumps({"at": at, "hash": head_hash, "keyed_from": keyed_from, "seq": seq},
                      sort_keys=True, separators=(",", ":")).encode("utf-8")
    return hmac.new(secret, _CHECKPOINT_CONTEXT + body, hashlib.sha256).hexdigest()


def sign_checkpoint(key: AuditKey, seq: int, head_hash: str, at: str) -> Checkpoint:
    return Checkpoint(seq, head_hash, at, key.keyed_from, _checkpoint_mac(key.secret, seq, head_hash, at, key.keyed_from))


def checkpoint_line(checkpoint: Checkpoint) -> str:
    """One line of the checkpoint file (JSON, no newline)."""
    return json.dumps({"seq": checkpoint.seq, "hash": checkpoint.hash, "at": checkpoint.at,
                       "keyed_from": checkpoint.keyed_from, "mac": checkpoint.mac}, separators=(",", ":"))


def parse_checkpoints(lines: Iterable[str], key: AuditKey) -> list[Checkpoint]:
    """Every non-blank line, each checked against its signature; raises CheckpointForged naming the line."""
    checkpoints = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            data = json.loads(line)
            checkpoint = Checkpoint(int(data["seq"]), str(data["hash"]), str(data["at"]), int(data["keyed_from"]),
                                    str(data["mac"]))
        except (ValueError, KeyError, TypeError):
            raise CheckpointForged(number, "is not a checkpoint (damaged or edited)") from None
        expected = _checkpoint_mac(key.secret, checkpoint.seq, checkpoint.hash, checkpoint.at, checkpoint.keyed_from)
        if not hmac.compare_digest(expected, checkpoint.mac):
            raise CheckpointForged(number, "does not match its signature (edited, or signed with another key)")
        checkpoints.append(checkpoint)
    return checkpoints


# --- verification -------------------------------------------------------------------


@dataclass(frozen=True)
class ChainVerdict:
    ok: bool
    checked: int
    bad_seq: int | None = None
    problem: str = ""
    keyed_from: int | None = None  # None: no key, only the plain chain was checked
    keyed_rows: int = 0
    checkpoints: int = 0
    newest_checkpoint: int | None = None

    @property
    def summary(self) -> str:
        """What was checked, in words."""
        if self.keyed_from is None:
            parts = [f"{self.checked} events, plain SHA-256 chain only (no key: a rewrite with database access "
                     "alone would not be caught)"]
        else:
            plain = min(self.checked, self.keyed_from - 1)
            parts = [f"{self.checked} events", f"{self.keyed_rows} keyed (HMAC, from row {self.keyed_from})"]
            if plain:
                parts.append(f"{plain} from before the key (SHA-256, sealed by the first keyed row)")
            if self.checkpoints:
                parts.append(f"{self.checkpoints} signed checkpoints (newest at row {self.newest_checkpoint})")
            else:
                parts.append("no checkpoints yet")
        return ", ".join(parts)


def verify_chain(
    events: Iterable[ChainedEvent],
    head_seq: int,
    head_hash: str,
    key: AuditKey | None = None,
    checkpoints: Sequence[Checkpoint] = (),
) -> ChainVerdict:
    """Walk the events in seq order and name the first one that does not fit.

    ``checkpoints`` must already have passed ``parse_checkpoints``."""
    pinned: dict[int, list[Checkpoint]] = {}
    for checkpoint in checkpoints:
        pinned.setdefault(checkpoint.seq, []).append(checkpoint)
    newest = max(checkpoints, key=lambda c: c.seq, default=None)
    expected_seq = 1
    expected_prev = GENESIS
    checked = keyed = 0

    def verdict(ok: bool, bad_seq: int | None = None, problem: str = "") -> ChainVerdict:
        return ChainVerdict(ok, checked, bad_seq, problem, keyed_from=key.keyed_from if key else None, keyed_rows=keyed,
                            checkpoints=len(checkpoints), newest_checkpoint=newest.seq if newest else None)

    def broken(seq: int, problem: str) -> ChainVerdict:
        return verdict(False, seq, problem)

    for event in events:
        if event.seq != expected_seq:
            if event.seq > expected_seq:
                return broken(expected_seq, f"rows {expected_seq}..{event.seq - 1} are missing (deleted)")
            return broken(event.seq, "row appears out of order or twice")
        if event.prev_hash != expected_prev:
            return broken(event.seq, "does not link to the row before it (rows deleted or reordered)")
        secret = key.secret_for(event.seq) if key else None
        if not hmac.compare_digest(event_hash(event, secret), event.hash):
            if secret is None:
                return broken(event.seq, "contents do not match its hash (row edited)")
            return broken(event.seq, "contents do not match its keyed hash (row edited or rewritten without the key)")
        for checkpoint in pinned.get(event.seq, ()):
            if checkpoint.hash != event.hash:
                return broken(event.seq, f"differs from the checkpoint written at {checkpoint.at} (row rewritten)")
        expected_prev = event.hash
        expected_seq += 1
        checked += 1
        keyed += secret is not None
    if newest is not None and newest.seq > checked:
        return broken(checked + 1, f"the checkpoint written at {newest.at} names row {newest.seq}, but the trail ends "
                                   f"at row {checked}: the newest rows were deleted")
    if checked != head_seq or expected_prev != head_hash:
        return broken(checked + 1, f"the newest {head_seq - checked} row(s) are missing (deleted)")
    if key is not None and key.keyed_from > checked + 1:
        return broken(checked + 1, f"the key file says keyed rows start at row {key.keyed_from}, but the trail "
                                   f"ends at row {checked}: the newest rows were deleted, or the key is another trail's")
    return verdict(True)
