"""The audit hash chain, as pure functions.

Each event's hash is SHA-256 over a canonical JSON encoding of its fields and
the previous event's hash. Editing a row changes its hash; deleting or
reordering rows breaks a ``prev_hash`` link or the sequence; deleting the last
rows is caught by the head record that stores the newest seq and hash.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

GENESIS = "0" * 64


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
    return json.dumps(detail, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)


def event_hash(event: ChainedEvent) -> str:
    fields = [
        event.seq, event.occurred_at, event.actor, event.client, event.action, event.outcome,
        event.project_id, event.pacs_id, event.patient_id, event.study_uid, event.detail, event.prev_hash,
    ]
    encoded = json.dumps(fields, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return hashlib.sha256(encoded).hexdigest()


@dataclass(frozen=True)
class ChainVerdict:
    ok: bool
    checked: int
    bad_seq: int | None = None
    problem: str = ""


def verify_chain(events: Iterable[ChainedEvent], head_seq: int, head_hash: str) -> ChainVerdict:
    """Walk the events in seq order and name the first one that does not fit."""
    expected_seq = 1
    expected_prev = GENESIS
    checked = 0
    for event in events:
        if event.seq != expected_seq:
            if event.seq > expected_seq:
                problem = f"rows {expected_seq}..{event.seq - 1} are missing (deleted)"
            else:
                problem = "row appears out of order or twice"
            return ChainVerdict(False, checked, expected_seq if event.seq > expected_seq else event.seq, problem)
        if event.prev_hash != expected_prev:
            return ChainVerdict(False, checked, event.seq, "does not link to the row before it (rows deleted or reordered)")
        if event_hash(event) != event.hash:
            return ChainVerdict(False, checked, event.seq, "contents do not match its hash (row edited)")
        expected_prev = event.hash
        expected_seq += 1
        checked += 1
    if checked != head_seq or expected_prev != head_hash:
        return ChainVerdict(False, checked, checked + 1, f"the newest {head_seq - checked} row(s) are missing (deleted)")
    return ChainVerdict(True, checked)
