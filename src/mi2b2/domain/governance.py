"""IRB rules, as pure functions.

Every door (query, answers, receipt, download) asks these functions; none of
them touch the network, the database or the wall clock, so tests can drive
them with any date and any allow-list.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import TypeVar

T = TypeVar("T")
K = TypeVar("K")


class Denial(StrEnum):
    NOT_MEMBER = "not a member of the project"
    IRB_EXPIRED = "the project's IRB approval has expired"
    PROJECT_INACTIVE = "the project is no longer configured"
    INSTITUTION_NOT_ALLOWED = "the project may not reach this institution"
    MRN_NOT_ALLOWED = "MRN not on the project's IRB allow-list"
    PATIENT_NOT_ALLOWED = "patient not on the project's IRB allow-list"


@dataclass(frozen=True)
class ProjectPolicy:
    project_id: str
    irb: str
    expires: date
    active: bool
    institutions: frozenset[str]
    members: Mapping[str, str]  # login -> project role
    max_studies_per_patient: int | None = None


def irb_active(expires: date, today: date) -> bool:
    """The expiry date is the last day the approval covers."""
    return today <= expires


def project_access(
    policy: ProjectPolicy, login: str, today: date, institution: str | None = None
) -> Denial | None:
    """Why ``login`` may not act in this project now, or None if it may."""
    if login not in policy.members:
        return Denial.NOT_MEMBER
    if not policy.active:
        return Denial.PROJECT_INACTIVE
    if not irb_active(policy.expires, today):
        return Denial.IRB_EXPIRED
    if institution is not None and institution not in policy.institutions:
        return Denial.INSTITUTION_NOT_ALLOWED
    return None


def split_allowed(values: Iterable[str], allowed: Callable[[str], bool]) -> tuple[list[str], list[str]]:
    """(on the allow-list, refused), order kept."""
    kept: list[str] = []
    refused: list[str] = []
    for value in values:
        (kept if allowed(value) else refused).append(value)
    return kept, refused


def filter_answers(
    answers: Iterable[T], patient_of: Callable[[T], K], allowed: Callable[[K], bool]
) -> tuple[list[T], list[T]]:
    """Second check, after the PACS replied: a PACS may match more loosely than asked
    (case folding, issuer of patient id, fuzzy matching), so keep only exact allowed IDs."""
    kept: list[T] = []
    dropped: list[T] = []
    for answer in answers:
        (kept if allowed(patient_of(answer)) else dropped).append(answer)
    return kept, dropped


def cap_per_patient(
    studies: Sequence[T], patient_of: Callable[[T], str], date_of: Callable[[T], str], cap: int | None
) -> tuple[list[T], dict[str, int]]:
    """Keep at most ``cap`` studies per patient, the most recent first.

    Returns the kept studies (in their original order) and, per patient, how
    many were left out, so the user is told rather than silently short-changed.
    """
    if cap is None:
        return list(studies), {}
    by_patient: dict[str, list[int]] = defaultdict(list)
    for index, study in enumerate(studies):
        by_patient[patient_of(study)].append(index)
    keep: set[int] = set()
    left_out: dict[str, int] = {}
    for patient, indexes in by_patient.items():
        newest_first = sorted(indexes, key=lambda i: date_of(studies[i]), reverse=True)
        keep.update(newest_first[:cap])
        if len(indexes) > cap:
            left_out[patient] = len(indexes) - cap
    return [s for i, s in enumerate(studies) if i in keep], left_out
