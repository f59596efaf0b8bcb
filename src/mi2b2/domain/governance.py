"""IRB rules, as pure functions.

Every door (query, answers, receipt, download) asks these functions; none of
them touch the network, the database or the wall clock, so tests can drive
them with any date and any allow-list.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import date, datetime
from enum import StrEnum
from typing import TypeVar
from zoneinfo import ZoneInfo

T = TypeVar("T")
K = TypeVar("K")


class Denial(StrEnum):
    NOT_MEMBER = "not a member of the project"
    IRB_EXPIRED = "the project's IRB approval has expired"
    PROJECT_INACTIVE = "the project is no longer configured"
    INSTITUTION_NOT_ALLOWED = "the project may not reach this institution"
    MRN_NOT_ALLOWED = "MRN not on the project's IRB allow-list"
    PATIENT_NOT_ALLOWED = "patient not on the project's IRB allow-list"
    ADMIN_NOT_MEMBER = "site admins read images only in projects they are members of"


class DataPolicy(StrEnum):
    """What members may do with a project's cached studies once access ends (IRB expired, project removed)."""

    CLOSED = "closed"  # list and delete only
    READ_ONLY = "read-only"  # reads (download, viewer, DICOMweb, forward) stay open


class DataUse(StrEnum):
    """What someone wants to do with a project's cached studies."""

    LIST = "list"  # see what is cached, how much, and delete it: managing, not reading
    DELETE = "delete"
    DETAIL = "detail"  # a cached study's series and instances: admins only where they are members
    READ = "read"  # download, viewer, DICOMweb
    FORWARD = "forward"  # send out to a DICOM node: the same rule as reading


MANAGING = frozenset({DataUse.LIST, DataUse.DELETE})


@dataclass(frozen=True)
class ProjectPolicy:
    project_id: str
    irb: str
    expires: date
    active: bool
    institutions: frozenset[str]
    members: Mapping[str, str]  # login -> project role
    max_studies_per_patient: int | None = None
    timezone: str = "UTC"  # the zone whose local date the expiry is compared with
    data_policy: DataPolicy = DataPolicy.CLOSED


def irb_active(expires: date, today: date) -> bool:
    """The expiry date is the last day the approval covers."""
    return today <= expires


def local_date(now: datetime, zone: str) -> date:
    """The calendar date at the site (or project) for the aware UTC instant ``now``."""
    return now.astimezone(ZoneInfo(zone)).date()


def irb_active_at(expires: date, now: datetime, zone: str) -> bool:
    """The approval covers its last day until local midnight in ``zone``, not UTC midnight."""
    return irb_active(expires, local_date(now, zone))


def cached_data_denial(
    use: DataUse,
    *,
    member: bool,
    admin: bool,
    project_active: bool,
    irb_active: bool,
    patient_allowed: bool,
    policy: DataPolicy,
) -> Denial | None:
    """Why this principal may not ``use`` a project's cached study now, or None if they may.

    - Listing and deleting are management: members and site admins, always
      (clearing out data is what an ended protocol must still allow).
    - Everything that shows or sends images needs membership, for admins too.
    - A patient who left the allow-list (consent withdrawn) is unreadable by
      everyone at once, whatever the data policy; the study waits for purge.
    - Once access ends (project removed, IRB expired), reads stay open only
      under the ``read-only`` data policy; forward follows reads.
    """
    if use in MANAGING:
        return None if member or admin else Denial.NOT_MEMBER
    if not member:
        return Denial.ADMIN_NOT_MEMBER if admin else Denial.NOT_MEMBER
    if use is DataUse.DETAIL:
        return None
    if not patient_allowed:
        return Denial.PATIENT_NOT_ALLOWED
    if policy is DataPolicy.READ_ONLY:
        return None
    if not project_active:
        return Denial.PROJECT_INACTIVE
    if not irb_active:
        return Denial.IRB_EXPIRED
    return None


def closed_to_reads(project_active: bool, irb_is_active: bool, patient_allowed: bool, policy: DataPolicy) -> str | None:
    """Why a cached study is closed to every reader (and so due for purge), or None if it is not."""
    denial = cached_data_denial(DataUse.READ, member=True, admin=False, project_active=project_active,
                                irb_active=irb_is_active, patient_allowed=patient_allowed, policy=policy)
    return denial.value if denial is not None else None


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
