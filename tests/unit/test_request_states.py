"""The request state table: walked whole, driven by random event sequences, and enforced by the services."""

from __future__ import annotations

from itertools import product
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st
from sqlalchemy import select

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import Request
from mi2b2.domain.principal import Principal, Role
from mi2b2.domain.request_states import (
    ENDED,
    ENDING,
    INITIAL,
    TABLE,
    Event,
    IllegalTransition,
    RequestState,
    allows,
    apply,
    sources,
)
from mi2b2.domain.requests import CANCELABLE, RETRYABLE
from mi2b2.errors import InvalidInput, Mi2b2Error
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.request_rows import mark_ended
from mi2b2.services.requests import StudyPick, add_requests, cancel_requests, retry_requests
from mi2b2.testing import FakeClock, FakeFindSession
from support.site import load_site

ALICE = Principal("alice", Role.RESEARCHER)
PAIRS = list(product(RequestState, Event))


@pytest.mark.parametrize(("state", "event"), PAIRS, ids=[f"{s}-{e.name}" for s, e in PAIRS])
def test_every_pair_is_either_in_the_table_or_refused(state: RequestState, event: Event) -> None:
    if (state, event) in TABLE:
        assert apply(state, event) is TABLE[state, event]
        assert allows(state, event) and state in sources(event)
    else:
        with pytest.raises(IllegalTransition) as refused:
            apply(state, event)
        assert f"a {state} request cannot {event.value}" in str(refused.value)
        assert not allows(state, event) and state not in sources(event)


def test_the_table_as_the_request_log_explains_it() -> None:
    assert apply(INITIAL, Event.START) is RequestState.PROCESSING
    assert {apply(RequestState.PROCESSING, e) for e in (Event.BACK_OFF, Event.REQUEUE)} == {RequestState.SCHEDULED}
    assert {state: apply(RequestState.PROCESSING, event) for state, event in ENDING.items()} == {s: s for s in ENDED}
    # Only the scheduler's refusal and a cancel end a request that never ran.
    assert {e for s, e in TABLE if s is RequestState.SCHEDULED and TABLE[s, e] in ENDED} == {Event.CANCEL, Event.REFUSE}
    assert not any(s is RequestState.COMPLETED for s, _ in TABLE)  # a completed request is done for good


def test_what_users_may_ask_for_is_read_from_the_table() -> None:
    assert {RequestState.SCHEDULED, RequestState.PROCESSING} == CANCELABLE
    assert {RequestState.FAILED, RequestState.INCOMPLETE, RequestState.CANCELED} == RETRYABLE


def test_an_unknown_state_is_refused_too() -> None:
    with pytest.raises(IllegalTransition, match="a paused request cannot start"):
        apply("paused", Event.START)


def test_the_refusal_is_one_of_the_project_errors_and_names_what_may_happen() -> None:
    with pytest.raises(Mi2b2Error, match="from canceled only retry may happen"):
        apply(RequestState.CANCELED, Event.COMPLETE)
    with pytest.raises(IllegalTransition, match="from completed only nothing may happen"):
        apply(RequestState.COMPLETED, Event.RETRY)


@given(st.lists(st.sampled_from(list(Event)), max_size=60))
def test_random_event_sequences_never_reach_an_illegal_state(events: list[Event]) -> None:
    state = INITIAL
    seen = {state}
    for event in events:
        if not allows(state, event):
            with pytest.raises(IllegalTransition):
                apply(state, event)
            continue  # a refused event leaves the request as it was
        before, state = state, apply(state, event)
        seen.add(state)
        assert state in RequestState
        if before in ENDED:
            # An ended request leaves its end only by being retried, and then waits in the queue again.
            assert event is Event.RETRY and state is RequestState.SCHEDULED
        if state is RequestState.PROCESSING:
            assert before is RequestState.SCHEDULED and event is Event.START
        if state in ENDED:
            assert before in (RequestState.SCHEDULED, RequestState.PROCESSING)
            assert before is RequestState.PROCESSING or event in (Event.CANCEL, Event.REFUSE)
    assert seen <= set(RequestState)


@given(st.lists(st.sampled_from(list(Event)), max_size=60))
def test_every_state_a_sequence_reaches_is_one_the_table_leads_to(events: list[Event]) -> None:
    reachable = {INITIAL} | set(TABLE.values())
    state = INITIAL
    for event in events:
        if allows(state, event):
            state = apply(state, event)
        assert state in reachable


# --- the services refuse what the table refuses ------------------------------------------


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ctx(tmp_path: Path, clock: FakeClock) -> ServiceContext:
    pacs = FakeFindSession([{"PatientID": "77", "StudyInstanceUID": "1.2", "StudyDate": "20200101"}])
    return build_context(load_site(tmp_path), clock=clock, open_find=lambda _c, _p: pacs)


def _stored(ctx: ServiceContext, request_id: int) -> Request:
    with ctx.sessions() as session:
        row = session.execute(select(Request).where(Request.id == request_id)).scalar_one()
        session.expunge(row)
        return row


def test_a_canceled_request_cannot_be_completed_and_nothing_is_written(ctx: ServiceContext, clock: FakeClock) -> None:
    [request_id] = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.2")]).created
    assert _stored(ctx, request_id).state == INITIAL
    cancel_requests(ctx, ALICE, [request_id])
    before = _stored(ctx, request_id)
    assert before.state == RequestState.CANCELED

    clock.advance(minutes=5)  # a new end time would show
    with transaction(ctx.sessions) as session:
        row = session.get_one(Request, request_id)
        with pytest.raises(IllegalTransition, match="a canceled request cannot complete"):
            mark_ended(row, RequestState.COMPLETED, None, 0, ctx.clock.now())
        assert row.state == RequestState.CANCELED  # refused before the row was touched

    after = _stored(ctx, request_id)
    assert (after.state, after.ended_at, after.last_error) == (before.state, before.ended_at, before.last_error)


def test_user_actions_the_table_refuses_are_refused_with_the_reason(ctx: ServiceContext) -> None:
    [request_id] = add_requests(ctx, ALICE, "alpha", "main", [StudyPick("1.2")]).created
    with pytest.raises(InvalidInput, match=f"request {request_id}: a scheduled request cannot be retried"):
        retry_requests(ctx, ALICE, [request_id])
    cancel_requests(ctx, ALICE, [request_id])
    with pytest.raises(InvalidInput, match="a canceled request cannot be canceled"):
        cancel_requests(ctx, ALICE, [request_id])
    retry_requests(ctx, ALICE, [request_id])
    assert _stored(ctx, request_id).state == RequestState.SCHEDULED
