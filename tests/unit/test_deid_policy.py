"""The action table comes from the shipped PS3.15 Table E.1-1; the options change what they name; the site
configuration's export policy is validated with messages naming the fix."""

from __future__ import annotations

import textwrap

import pytest

from mi2b2.config import parse_config
from mi2b2.config.export_policy import export_policy
from mi2b2.domain.deid.burned_in import burned_in_verdict
from mi2b2.domain.deid.profile import Profile, ProfileOption
from mi2b2.domain.deid.pseudonyms import Pseudonymizer, shift_date, shift_datetime
from mi2b2.domain.deid.table import Action, action_table, basic_profile, table_source
from mi2b2.errors import ConfigError

PATIENT_NAME, ACCESSION, INSTITUTION, STUDY_UID = 0x00100010, 0x00080050, 0x00080080, 0x0020000D
STUDY_DATE, STUDY_TIME, BIRTH_DATE, SEX, STATION = 0x00080020, 0x00080030, 0x00100030, 0x00100040, 0x00081010
STUDY_DESCRIPTION, OVERLAY_COMMENT = 0x00081030, 0x60024000


def test_the_basic_profile_is_the_shipped_table_and_nothing_typed_here() -> None:
    exact, masked = basic_profile()
    assert table_source().name == "dicomfields_2026c.py"
    assert len(exact) > 600 and masked
    table = action_table(Profile.of())
    assert table.action_for(PATIENT_NAME) is Action.EMPTY  # Z in Table E.1-1 (mi2b2 then writes the pseudonym)
    assert table.action_for(ACCESSION) is Action.EMPTY
    assert table.action_for(STUDY_UID) is Action.UID
    assert table.action_for(INSTITUTION) is Action.DUMMY  # X/Z/D: a value, so that no IOD loses it
    assert table.action_for(OVERLAY_COMMENT) is Action.REMOVE  # a repeating group, by mask
    assert table.action_for(0x00280010) is None  # Rows: not in the table, kept


def test_each_option_changes_only_what_it_names() -> None:
    basic = action_table(Profile.of())
    dates = action_table(Profile.of([ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES]))
    assert (basic.action_for(STUDY_DATE), dates.action_for(STUDY_DATE)) == (Action.EMPTY, Action.SHIFT)
    assert dates.action_for(STUDY_TIME) is Action.KEEP
    assert dates.action_for(BIRTH_DATE) is basic.action_for(BIRTH_DATE)  # outside the option
    patient = action_table(Profile.of([ProfileOption.RETAIN_PATIENT_CHARACTERISTICS]))
    assert (basic.action_for(SEX), patient.action_for(SEX)) == (Action.EMPTY, Action.KEEP)
    assert patient.action_for(PATIENT_NAME) is Action.EMPTY
    device = action_table(Profile.of([ProfileOption.RETAIN_DEVICE_IDENTITY]))
    assert device.action_for(STATION) is Action.KEEP and device.action_for(INSTITUTION) is Action.DUMMY
    institution = action_table(Profile.of([ProfileOption.RETAIN_INSTITUTION_IDENTITY]))
    assert institution.action_for(INSTITUTION) is Action.KEEP
    clean = action_table(Profile.of([ProfileOption.CLEAN_DESCRIPTORS]))
    assert (basic.action_for(STUDY_DESCRIPTION), clean.action_for(STUDY_DESCRIPTION)) == (Action.REMOVE, Action.CLEAN)


def test_pseudonyms_are_stable_distinct_and_valid_uids() -> None:
    one, other = Pseudonymizer(b"1" * 32), Pseudonymizer(b"2" * 32)
    uid = one.uid("1.2.3.4")
    assert uid == one.uid("1.2.3.4") != other.uid("1.2.3.4") and uid.startswith("2.25.") and len(uid) <= 64
    assert one.uid("1.2.840.10008.5.1.4.1.1.2") == "1.2.840.10008.5.1.4.1.1.2"  # a SOP class stays
    assert one.patient_id("123", "GEN") != one.patient_id("123", "CHILD")  # one MRN, two institutions
    assert one.date_shift("123") == one.date_shift("123") and one.date_shift("123").days < 0
    assert shift_date("20240301", one.date_shift("123")) is not None
    assert shift_date("2024", one.date_shift("123")) is None and shift_datetime("garbage", one.date_shift("x")) is None


@pytest.mark.parametrize(("burned", "modality", "sop_class", "withheld"), [
    ("YES", "CT", "1.2.840.10008.5.1.4.1.1.2", True),
    ("", "US", "1.2.840.10008.5.1.4.1.1.6.1", True),
    ("NO", "US", "1.2.840.10008.5.1.4.1.1.6.1", False),
    ("", "OT", "1.2.840.10008.5.1.4.1.1.7", True),
    ("", "CT", "1.2.840.10008.5.1.4.1.1.2", False),
    ("", "MR", "1.2.840.10008.5.1.4.1.1.104.1", True),  # an encapsulated PDF
])
def test_burned_in_verdicts(burned: str, modality: str, sop_class: str, withheld: bool) -> None:
    assert burned_in_verdict(Profile.of(), burned, modality, sop_class, "1.2.3").withhold is withheld
    assert not burned_in_verdict(Profile.of(cleared_series=["1.2.3"]), burned, modality, sop_class, "1.2.3").withhold


SITE = """
[[institutions]]
id = "general"
name = "General"
[[projects]]
id = "lung"
title = "Lung"
irb = "1"
expires = 2099-01-01
mrn_file = "x.mrns"
quota = "1 GiB"
institutions = ["general"]
"""


def test_the_export_policy_is_identified_by_default_and_validated() -> None:
    config = parse_config(SITE)
    assert not export_policy(config.projects[0], "lung").deidentified
    config = parse_config(SITE + textwrap.dedent("""
        export = "deidentified"
        encrypted_only = true
        [projects.deidentification]
        options = ["retain_longitudinal_modified_dates", "clean_descriptors"]
        burned_in_cleared_sop_classes = ["1.2.840.10008.5.1.4.1.1.7"]
        safe_private = ["GEMS_PARM_01:10"]
    """))
    policy = export_policy(config.projects[0], "lung")
    assert policy.deidentified and policy.encrypted_only and policy.profile is not None
    assert policy.audit_detail() == {"export": "deidentified",
                                     "profile": ["basic", "retain_longitudinal_modified_dates", "clean_descriptors"]}
    assert policy.profile.safe_private == frozenset({("GEMS_PARM_01", 0x10)})
    for bad, words in (('export = "anonymous"', "identified"), ('export = "deidentified"\n[projects.deidentification]\n'
                                                                'options = ["retain_everything"]', "retain_safe_private"),
                       ('[projects.deidentification]\nsafe_private = ["GEMS"]', "PRIVATE CREATOR:xx"),
                       ('[projects.deidentification]\nburned_in_cleared_series = ["x.y"]', "not UIDs")):
        with pytest.raises(ConfigError, match="projects") as error:
            parse_config(SITE + bad)
        assert words in str(error.value)
