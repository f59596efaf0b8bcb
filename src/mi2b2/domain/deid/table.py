"""The action for each attribute under the Basic Profile and the project's options.

The Basic Profile's actions are PS3.15 Table E.1-1 as dicom-anonymizer ships it
(``dicomfields_2026c``, generated from the standard's own table and pinned in
constraints.txt). It is read as data: its file is parsed, never executed, so
the library's engine and globals stay out of mi2b2.

The options' columns of the table are not shipped by any installable package.
They are applied as the rules the standard states for each option, over the
attributes the Basic Profile names (an option never reaches an attribute the
table does not list):

- Retain Longitudinal Temporal Information with Modified Dates: every date and
  date-time becomes "shifted", times are kept; the patient's birth date and time
  are not covered by the option and stay as the Basic Profile says.
- Retain Patient Characteristics, Device Identity, Institution Identity: the
  attributes of those kinds (by keyword) are kept.
- Clean Descriptors: free-text descriptions and comments are kept, cleaned of
  the instance's own identifying values.
- Retain Safe Private: private elements the project lists are kept; every other
  private element is removed, as under the Basic Profile.
"""

from __future__ import annotations

import ast
import importlib.util
import re
import threading
from dataclasses import dataclass
from enum import StrEnum
from functools import cache
from pathlib import Path

from pydicom.datadict import dictionary_VR, keyword_for_tag

from mi2b2.domain.deid.profile import Profile, ProfileOption

TABLE_PACKAGE = "dicomanonymizer"
TABLE_MODULE = "dicom_anonymization_databases/dicomfields_2026c.py"


class Action(StrEnum):
    REMOVE = "X"
    EMPTY = "Z"
    DUMMY = "D"  # a harmless value of the attribute's VR (or the patient's pseudonym)
    UID = "U"  # the project's consistent replacement UID
    KEEP = "K"
    SHIFT = "C"  # a date moved by the patient's constant shift
    CLEAN = "CLEAN"  # kept, with the instance's identifying values cut out
    WALK = "WALK"  # a sequence kept, the table applied to its items


# Table E.1-1's compound codes, resolved so that the result stays valid in every IOD:
# where the standard allows removal "or" a value, we keep an (empty or dummy) element.
_RESOLVED: dict[str, Action] = {
    "D_TAGS": Action.DUMMY, "Z_TAGS": Action.EMPTY, "X_TAGS": Action.REMOVE, "U_TAGS": Action.UID,
    "Z_D_TAGS": Action.DUMMY, "X_Z_TAGS": Action.EMPTY, "X_D_TAGS": Action.DUMMY, "X_Z_D_TAGS": Action.DUMMY,
    "X_Z_U_STAR_TAGS": Action.WALK,
}
# A sequence's "dummy" is its items with the table applied (the only way to keep SR and
# SEG references valid); a sequence "emptied" or "removed" loses every item.
_SEQUENCE: dict[Action, Action] = {Action.DUMMY: Action.WALK, Action.UID: Action.WALK, Action.WALK: Action.WALK,
                                   Action.EMPTY: Action.EMPTY, Action.REMOVE: Action.REMOVE}

_BIRTH = {0x00100030, 0x00100032}  # Patient's Birth Date and Time: outside the longitudinal option
_PATIENT_CHARACTERISTICS = re.compile(
    r"^(PatientAge|PatientSex|PatientSize|PatientWeight|EthnicGroup|SmokingStatus|PregnancyStatus|Allergies|"
    r"PatientSexNeutered|SpecialNeeds|PatientState|PatientSpecies\w*|PatientBreed\w*|PatientSizeCodeSequence)$")
_DEVICE = re.compile(r"Device|StationName|Detector|Gantry|Plate|Cassette|Generator|Manufacturer|SerialNumber"
                     r"|Transducer|SourceSerial")
_INSTITUTION = re.compile(r"^Institution")
_DESCRIPTOR = re.compile(r"(Description|Comments?|ProtocolName|Label)$")
_TEXT_VRS = {"LO", "SH", "LT", "ST", "UT"}


@dataclass(frozen=True)
class MaskedAction:
    tag: int
    mask: int
    action: Action


@dataclass(frozen=True)
class ActionTable:
    """Tag -> action, for one profile; ``action_for`` answers None for an attribute the table does not list."""

    exact: dict[int, Action]
    masked: tuple[MaskedAction, ...]

    def action_for(self, tag: int) -> Action | None:
        found = self.exact.get(tag)
        if found is not None:
            return found
        for entry in self.masked:
            if tag & entry.mask == entry.tag:
                return entry.action
        return None


def table_source() -> Path:
    """The shipped table's file, found without importing (and so running) the library."""
    spec = importlib.util.find_spec(TABLE_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"the {TABLE_PACKAGE} package (PS3.15 Table E.1-1) is not installed; "
                           "run scripts/setup.sh or pip install -c constraints.txt .")
    return Path(next(iter(spec.submodule_search_locations))) / TABLE_MODULE


_PARSING = threading.Lock()  # CPython 3.11's ast.parse can fail with SystemError when two threads parse at once


def basic_profile() -> tuple[dict[int, Action], tuple[MaskedAction, ...]]:
    """Table E.1-1's Basic Profile column: (exact tags, masked repeating groups)."""
    with _PARSING:
        return _parsed_table()


@cache
def _parsed_table() -> tuple[dict[int, Action], tuple[MaskedAction, ...]]:
    tree = ast.parse(table_source().read_text(encoding="utf-8"))
    exact: dict[int, Action] = {}
    masked: list[MaskedAction] = []
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        action = _RESOLVED.get(node.targets[0].id)
        if action is None:
            continue
        for entry in ast.literal_eval(node.value):
            if len(entry) == 2:
                exact[(entry[0] << 16) | entry[1]] = action
            else:  # (group, element, group mask, element mask): overlays and curves
                mask = (entry[2] << 16) | entry[3]
                masked.append(MaskedAction(((entry[0] << 16) | entry[1]) & mask, mask, action))
    if len(exact) < 500:  # the 2026c table lists about 650 attributes: a truncated file must not pass
        raise RuntimeError(f"{table_source()} lists only {len(exact)} attributes; reinstall {TABLE_PACKAGE}")
    return exact, tuple(masked)


def _vr(tag: int) -> str:
    try:
        return str(dictionary_VR(tag))
    except KeyError:
        return ""


def _keyword(tag: int) -> str:
    return keyword_for_tag(tag) or ""


def resolve(tag: int, basic: Action, profile: Profile) -> Action:
    """The action for one listed attribute under the profile's options."""
    vr, keyword = _vr(tag), _keyword(tag)
    if profile.has(ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES) and tag not in _BIRTH:
        if vr in ("DA", "DT"):
            return Action.SHIFT
        if vr == "TM":
            return Action.KEEP
    if profile.has(ProfileOption.RETAIN_PATIENT_CHARACTERISTICS) and _PATIENT_CHARACTERISTICS.match(keyword):
        return Action.KEEP
    if profile.has(ProfileOption.RETAIN_DEVICE_IDENTITY) and _DEVICE.search(keyword):
        return Action.KEEP
    if profile.has(ProfileOption.RETAIN_INSTITUTION_IDENTITY) and _INSTITUTION.match(keyword):
        return Action.KEEP
    if profile.has(ProfileOption.CLEAN_DESCRIPTORS) and vr in _TEXT_VRS and _DESCRIPTOR.search(keyword):
        return Action.CLEAN
    if vr == "SQ":
        return _SEQUENCE[basic]
    return basic


@cache
def action_table(profile: Profile) -> ActionTable:
    exact, masked = basic_profile()
    return ActionTable({tag: resolve(tag, action, profile) for tag, action in exact.items()}, masked)
