"""The two pure rules behind every cache door: the IRB's last day in local time, and who may do what with cached data."""

from __future__ import annotations

from datetime import UTC, date, datetime, time, timedelta
from itertools import product
from zoneinfo import ZoneInfo

import pytest

from mi2b2.config import parse_config
from mi2b2.domain.governance import (
    DataPolicy,
    DataUse,
    Denial,
    cached_data_denial,
    closed_to_reads,
    irb_active_at,
    local_date,
)
from mi2b2.errors import ConfigError

EXPIRES = date(2026, 3, 10)


def local_midnight_after(expires: date, zone: str) -> datetime:
    """The instant the approval ends: midnight at the start of the day after ``expires``, in ``zone``, as UTC."""
    return datetime.combine(expires + timedelta(days=1), time(0), ZoneInfo(zone)).astimezone(UTC)


@pytest.mark.parametrize("zone", ["America/New_York", "Pacific/Auckland", "Asia/Tokyo", "UTC"])
def test_the_last_day_lasts_until_local_midnight(zone: str) -> None:
    end = local_midnight_after(EXPIRES, zone)
    assert irb_active_at(EXPIRES, end - timedelta(seconds=1), zone)
    assert not irb_active_at(EXPIRES, end + timedelta(seconds=1), zone)
    assert local_date(end - timedelta(seconds=1), zone) == EXPIRES


def test_utc_date_would_be_wrong_both_ways() -> None:
    # West of UTC: at 23:59:59 in New York on the last day it is already the next day in UTC.
    west = local_midnight_after(EXPIRES, "America/New_York") - timedelta(seconds=1)
    assert west.date() > EXPIRES and irb_active_at(EXPIRES, west, "America/New_York")
    # East of UTC: at 00:00:01 in Auckland the day after, UTC still shows the last day.
    east = local_midnight_after(EXPIRES, "Pacific/Auckland") + timedelta(seconds=1)
    assert east.date() == EXPIRES and not irb_active_at(EXPIRES, east, "Pacific/Auckland")


def _denial(use: DataUse, member: bool = True, admin: bool = False, active: bool = True, irb: bool = True,
            allowed: bool = True, policy: DataPolicy = DataPolicy.CLOSED) -> Denial | None:
    return cached_data_denial(use, member=member, admin=admin, project_active=active, irb_active=irb,
                              patient_allowed=allowed, policy=policy)


READS = (DataUse.READ, DataUse.FORWARD)


def test_members_read_while_access_lasts() -> None:
    for use in DataUse:
        assert _denial(use) is None


@pytest.mark.parametrize("ended", [{"active": False}, {"irb": False}])
def test_closed_policy_leaves_list_and_delete_once_access_ends(ended: dict[str, bool]) -> None:
    expected = Denial.PROJECT_INACTIVE if "active" in ended else Denial.IRB_EXPIRED
    for use in READS:
        assert _denial(use, **ended) is expected  # type: ignore[arg-type]
    for use in (DataUse.LIST, DataUse.DELETE, DataUse.DETAIL):
        assert _denial(use, **ended) is None  # type: ignore[arg-type]
    for use in READS:  # read-only keeps reads open, and forward follows downloads
        assert _denial(use, policy=DataPolicy.READ_ONLY, **ended) is None  # type: ignore[arg-type]


def test_a_withdrawn_patient_is_unreadable_under_every_policy_but_still_listed() -> None:
    for use, policy in product(READS, DataPolicy):
        assert _denial(use, allowed=False, policy=policy) is Denial.PATIENT_NOT_ALLOWED
    assert _denial(DataUse.LIST, allowed=False) is None
    assert _denial(DataUse.DELETE, allowed=False) is None


def test_admins_manage_everywhere_and_read_only_as_members() -> None:
    for use in (DataUse.LIST, DataUse.DELETE):
        assert _denial(use, member=False, admin=True, irb=False) is None
    for use in (*READS, DataUse.DETAIL):
        assert _denial(use, member=False, admin=True) is Denial.ADMIN_NOT_MEMBER
        assert _denial(use, member=False, admin=False) is Denial.NOT_MEMBER
    assert _denial(DataUse.READ, member=True, admin=True) is None
    assert _denial(DataUse.LIST, member=False, admin=False) is Denial.NOT_MEMBER


def test_closed_to_reads_names_what_purge_removes() -> None:
    assert closed_to_reads(True, True, True, DataPolicy.CLOSED) is None
    assert closed_to_reads(True, False, True, DataPolicy.CLOSED) == Denial.IRB_EXPIRED.value
    assert closed_to_reads(False, True, True, DataPolicy.CLOSED) == Denial.PROJECT_INACTIVE.value
    assert closed_to_reads(True, False, True, DataPolicy.READ_ONLY) is None
    assert closed_to_reads(True, True, False, DataPolicy.READ_ONLY) == Denial.PATIENT_NOT_ALLOWED.value


def test_site_and_project_settings() -> None:
    config = parse_config("""
        [site]
        timezone = "America/New_York"
        irb_warning_days = 30
        [[institutions]]
        id = "general"
        [[projects]]
        id = "east"
        title = "t"
        irb = "1"
        expires = 2026-03-10
        mrn_file = "x.mrns"
        quota = "1 GiB"
        institutions = ["general"]
        timezone = "Asia/Tokyo"
        data_policy = "read-only"
    """)
    assert config.project_zone("east") == "Asia/Tokyo"
    assert config.project_zone("removed-project") == "America/New_York"
    assert config.project_data_policy("east") is DataPolicy.READ_ONLY
    assert config.project_data_policy("removed-project") is DataPolicy.CLOSED
    with pytest.raises(ConfigError, match="site.data_policy"):
        parse_config('[site]\ndata_policy = "open"\n')
    with pytest.raises(ConfigError, match="not a time zone"):
        parse_config('[site]\ntimezone = "New York"\n')
