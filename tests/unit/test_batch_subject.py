"""The batch notice says what happened: how many of the batch are ready, and what became of the rest."""

from __future__ import annotations

from mi2b2.domain.requests import RequestState
from mi2b2.services.notifications import batch_subject

C, INC, F, X = RequestState.COMPLETED, RequestState.INCOMPLETE, RequestState.FAILED, RequestState.CANCELED


def test_fifteen_of_twenty_ready_and_five_failed() -> None:
    assert batch_subject({C: 15, INC: 0, F: 5, X: 0}, "study", "studies", "ready", "c1") == \
        "15 of 20 studies ready in project c1; 5 failed"


def test_a_batch_all_ready_says_only_that() -> None:
    assert batch_subject({C: 20, INC: 0, F: 0, X: 0}, "study", "studies", "ready", "c1") == "20 studies ready in project c1"
    assert batch_subject({C: 1, INC: 0, F: 0, X: 0}, "study", "studies", "ready", "c1") == "1 study ready in project c1"


def test_nothing_ready_names_every_other_end() -> None:
    assert batch_subject({C: 0, INC: 1, F: 1, X: 2}, "forward", "forwards", "finished", "p") == \
        "0 of 4 forwards finished in project p; 1 incomplete, 1 failed, 2 canceled"
