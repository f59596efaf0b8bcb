"""The keyed audit chain and its checkpoints, as pure functions."""

from __future__ import annotations

import dataclasses

import pytest

from mi2b2.domain.audit_chain import (
    GENESIS,
    AuditKey,
    ChainedEvent,
    CheckpointForged,
    checkpoint_line,
    event_hash,
    parse_checkpoints,
    sign_checkpoint,
    verify_chain,
)

KEY = AuditKey(b"k" * 32, keyed_from=3)
OTHER = AuditKey(b"o" * 32, keyed_from=3)


def _chain(count: int, key: AuditKey | None) -> list[ChainedEvent]:
    events, prev = [], GENESIS
    for seq in range(1, count + 1):
        event = ChainedEvent(seq, "2026-01-01T00:00:00.000000Z", "alice", "", "query", "ok", "alpha", None,
                             "000123", None, f'{{"n":{seq}}}', prev)
        event = dataclasses.replace(event, hash=event_hash(event, key.secret_for(seq) if key else None))
        events.append(event)
        prev = event.hash
    return events


def _resigned_plain(events: list[ChainedEvent], first: int) -> list[ChainedEvent]:
    """An attacker without the key: edit row ``first``, recompute plain SHA-256 from there on."""
    out, prev = [], events[first - 2].hash if first > 1 else GENESIS
    for event in events:
        if event.seq < first:
            out.append(event)
            continue
        changed = dataclasses.replace(event, detail='{"n":"forged"}' if event.seq == first else event.detail,
                                      prev_hash=prev)
        changed = dataclasses.replace(changed, hash=event_hash(changed))
        out.append(changed)
        prev = changed.hash
    return out


def test_keyed_rows_use_hmac_and_the_rows_before_the_key_stay_plain() -> None:
    events = _chain(5, KEY)
    assert events[0].hash == event_hash(events[0])  # before keyed_from: plain SHA-256
    assert events[3].hash != event_hash(events[3])  # keyed part: not plain SHA-256
    verdict = verify_chain(events, 5, events[-1].hash, KEY)
    assert verdict.ok and verdict.keyed_rows == 3 and "2 from before the key" in verdict.summary


@pytest.mark.parametrize("first", [3, 4, 5])
def test_a_plain_sha256_rewrite_of_the_keyed_part_is_named_at_its_first_row(first: int) -> None:
    forged = _resigned_plain(_chain(5, KEY), first)
    verdict = verify_chain(forged, 5, forged[-1].hash, KEY)
    assert not verdict.ok and verdict.bad_seq == first
    if first == KEY.keyed_from:  # every keyed row re-hashed: only the key tells
        assert verify_chain(forged, 5, forged[-1].hash, None).ok


def test_a_rewrite_of_the_part_before_the_key_breaks_the_first_keyed_row() -> None:
    forged = _resigned_plain(_chain(5, KEY), 1)
    verdict = verify_chain(forged, 5, forged[-1].hash, KEY)
    assert not verdict.ok and verdict.bad_seq == 3


def test_the_wrong_key_fails_at_the_first_keyed_row() -> None:
    events = _chain(4, KEY)
    assert verify_chain(events, 4, events[-1].hash, OTHER).bad_seq == 3


def test_a_checkpoint_beyond_the_trail_catches_a_consistent_tail_deletion() -> None:
    events = _chain(6, KEY)
    checkpoint = sign_checkpoint(KEY, 6, events[-1].hash, "2026-01-01T00:05:00.000000Z")
    kept = events[:4]
    verdict = verify_chain(kept, 4, kept[-1].hash, KEY, [checkpoint])
    assert not verdict.ok and verdict.bad_seq == 5 and "names row 6" in verdict.problem
    assert verify_chain(kept, 4, kept[-1].hash, KEY).ok  # the head alone cannot tell


def test_a_row_that_differs_from_its_checkpoint_is_named() -> None:
    events = _chain(4, None)  # an unkeyed chain: only a checkpoint can pin it
    checkpoint = sign_checkpoint(KEY, 2, events[1].hash, "t")
    forged = _resigned_plain(events, 2)
    verdict = verify_chain(forged, 4, forged[-1].hash, None, [checkpoint])
    assert not verdict.ok and verdict.bad_seq == 2 and "checkpoint" in verdict.problem


def test_checkpoint_lines_are_signed() -> None:
    line = checkpoint_line(sign_checkpoint(KEY, 7, "ab" * 32, "2026-01-01T00:00:00.000000Z"))
    (parsed,) = parse_checkpoints([line, ""], KEY)
    assert (parsed.seq, parsed.keyed_from) == (7, 3)
    with pytest.raises(CheckpointForged, match="line 1 does not match its signature"):
        parse_checkpoints([line.replace('"seq":7', '"seq":6')], KEY)
    with pytest.raises(CheckpointForged, match="signature"):
        parse_checkpoints([line], OTHER)
    with pytest.raises(CheckpointForged, match="line 2 is not a checkpoint"):
        parse_checkpoints([line, "{not json"], KEY)


def test_a_key_file_that_claims_more_keyed_rows_than_exist_fails() -> None:
    events = _chain(2, None)
    verdict = verify_chain(events, 2, events[-1].hash, AuditKey(b"k" * 32, keyed_from=5))
    assert not verdict.ok and verdict.bad_seq == 3


def test_keys_must_be_long_enough() -> None:
    with pytest.raises(ValueError, match="32 bytes"):
        AuditKey(b"short")
