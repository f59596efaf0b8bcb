"""`request add` asks the PACS about many studies in one C-FIND (List of UID matching).

A cohort of thousands of studies must not cost the PACS a query per study; a
PACS that does not match lists still finds every study; a PACS that answers
with studies nobody asked for is not believed about them.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from mi2b2.adapters.dicom.errors import DimseFailure
from mi2b2.domain.principal import Principal, Role
from mi2b2.services.context import build_context
from mi2b2.services.requests import UIDS_PER_FIND, StudyPick, add_requests
from mi2b2.testing import FakeClock, FakeFindSession
from support.site import load_site

ALICE = Principal("alice", Role.RESEARCHER)
COHORT = 250  # three lists: 100, 100, 50
ALLOWED, NOT_ALLOWED = "77", "B-1"  # on project alpha's allow-list, and not


def _study(n: int, patient: str = ALLOWED) -> dict[str, str]:
    return {"PatientID": patient, "StudyInstanceUID": f"1.2.826.0.1.{n}", "AccessionNumber": f"A{n}",
            "NumberOfStudyRelatedInstances": "3"}


def _study_queries(pacs: FakeFindSession) -> list[str]:
    return [str(keys["StudyInstanceUID"]) for _model, level, keys in pacs.queries if level == "STUDY"]


def _add(tmp_path: Path, pacs: FakeFindSession, uids: list[str]) -> tuple[list[int], list[str], list[str]]:
    ctx = build_context(load_site(tmp_path), clock=FakeClock(), open_find=lambda _c, _p: pacs)
    try:
        report = add_requests(ctx, ALICE, "alpha", "main", [StudyPick(uid) for uid in uids])
        return report.created, report.not_found, report.not_permitted
    finally:
        ctx.engine.dispose()


def test_a_cohort_costs_the_pacs_one_query_per_hundred_studies(tmp_path: Path) -> None:
    studies = [_study(n) for n in range(COHORT)] + [_study(COHORT, NOT_ALLOWED)]
    pacs = FakeFindSession(studies)
    unknown = ["1.2.826.0.9.1", "1.2.826.0.9.2"]
    created, not_found, not_permitted = _add(tmp_path, pacs, [s["StudyInstanceUID"] for s in studies] + unknown)

    assert len(created) == COHORT
    assert not_found == unknown and not_permitted == [studies[-1]["StudyInstanceUID"]]
    asked = _study_queries(pacs)
    assert len(asked) == -(-(COHORT + 3) // UIDS_PER_FIND) == 3
    assert [len(q.split("\\")) for q in asked] == [100, 100, 53]


def test_a_pacs_without_list_matching_still_finds_every_study(tmp_path: Path) -> None:
    studies = [_study(n) for n in range(COHORT)]
    pacs = FakeFindSession(studies, uid_lists=False)
    created, not_found, _ = _add(tmp_path, pacs, [s["StudyInstanceUID"] for s in studies])

    assert len(created) == COHORT and not_found == []
    asked = _study_queries(pacs)
    # The first list found nothing, its studies one by one did: no more lists are sent.
    assert sum("\\" in q for q in asked) == 1 and len(asked) == 1 + COHORT


def test_a_list_of_studies_the_pacs_does_not_hold_is_one_query(tmp_path: Path) -> None:
    pacs = FakeFindSession([_study(n) for n in range(3)])
    unknown = [f"1.2.826.0.9.{n}" for n in range(40)]
    created, not_found, _ = _add(tmp_path, pacs, unknown)
    # A list matched nothing, nor did each of its studies: the PACS matches lists, it holds none of them.
    assert created == [] and not_found == unknown
    assert len(_study_queries(pacs)) == 1 + len(unknown)


class _Talkative(FakeFindSession):
    """A PACS that answers every query with every study it holds."""

    def find(self, model: str, level: str, keys: Mapping[str, str | None]) -> list[dict[str, str]]:
        self.queries.append((model, level, dict(keys)))
        return [dict(row) for row in self.studies]


def test_studies_a_pacs_volunteers_are_not_requested(tmp_path: Path) -> None:
    studies = [_study(n) for n in range(10)]
    pacs = _Talkative(studies)
    asked = [s["StudyInstanceUID"] for s in studies[:3]] + ["1.2.826.0.9.1"]
    created, not_found, _ = _add(tmp_path, pacs, asked)
    assert len(created) == 3 and not_found == ["1.2.826.0.9.1"]


class _RefusesLists(FakeFindSession):
    """A PACS that fails any query naming several UIDs (as pynetdicom's qrscp does, 0xC320)."""

    def find(self, model: str, level: str, keys: Mapping[str, str | None]) -> list[dict[str, str]]:
        if "\\" in str(keys.get("StudyInstanceUID") or ""):
            self.queries.append((model, level, dict(keys)))
            raise DimseFailure("PACS", "C-FIND", 0xC320, "Unable to Process")
        return super().find(model, level, keys)


def test_a_pacs_that_refuses_lists_is_asked_study_by_study(tmp_path: Path) -> None:
    studies = [_study(n) for n in range(COHORT)]
    pacs = _RefusesLists(studies)
    created, not_found, _ = _add(tmp_path, pacs, [s["StudyInstanceUID"] for s in studies])
    assert len(created) == COHORT and not_found == []
    asked = _study_queries(pacs)
    assert sum("\\" in q for q in asked) == 1 and len(asked) == 1 + COHORT
