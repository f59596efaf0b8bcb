"""Export modes and the PS3.15 Annex E profile options a project may choose."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum


class ExportMode(StrEnum):
    IDENTIFIED = "identified"
    DEIDENTIFIED = "deidentified"


class ProfileOption(StrEnum):
    RETAIN_LONGITUDINAL_MODIFIED_DATES = "retain_longitudinal_modified_dates"
    RETAIN_PATIENT_CHARACTERISTICS = "retain_patient_characteristics"
    RETAIN_DEVICE_IDENTITY = "retain_device_identity"
    RETAIN_INSTITUTION_IDENTITY = "retain_institution_identity"
    CLEAN_DESCRIPTORS = "clean_descriptors"
    RETAIN_SAFE_PRIVATE = "retain_safe_private"


BASIC_PROFILE = "basic"
# PS3.16 CID 7050 (De-identification Method): written into every exported instance.
BASIC_CODE = ("113100", "Basic Application Confidentiality Profile")
OPTION_CODES: dict[ProfileOption, tuple[str, str]] = {
    ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES: ("113107", "Retain Longitudinal Temporal Information Modified "
                                                                 "Dates Option"),
    ProfileOption.RETAIN_PATIENT_CHARACTERISTICS: ("113108", "Retain Patient Characteristics Option"),
    ProfileOption.RETAIN_DEVICE_IDENTITY: ("113109", "Retain Device Identity Option"),
    ProfileOption.RETAIN_INSTITUTION_IDENTITY: ("113112", "Retain Institution Identity Option"),
    ProfileOption.CLEAN_DESCRIPTORS: ("113105", "Clean Descriptors Option"),
    ProfileOption.RETAIN_SAFE_PRIVATE: ("113111", "Retain Safe Private Option"),
}


@dataclass(frozen=True)
class Profile:
    """The Basic Profile plus the chosen options, and what the project cleared by hand."""

    options: frozenset[ProfileOption] = frozenset()
    cleared_series: frozenset[str] = frozenset()
    cleared_sop_classes: frozenset[str] = frozenset()
    safe_private: frozenset[tuple[str, int]] = frozenset()  # (private creator, element byte)

    @classmethod
    def of(cls, options: Iterable[ProfileOption | str] = (), cleared_series: Iterable[str] = (),
           cleared_sop_classes: Iterable[str] = (), safe_private: Iterable[str] = ()) -> Profile:
        private = set()
        for item in safe_private:
            creator, _, element = item.rpartition(":")
            private.add((creator.strip(), int(element, 16)))
        return cls(frozenset(ProfileOption(o) for o in options), frozenset(cleared_series),
                   frozenset(cleared_sop_classes), frozenset(private))

    def has(self, option: ProfileOption) -> bool:
        return option in self.options

    def names(self) -> list[str]:
        """For the audit trail and the report: "basic" then the options, in the standard's order."""
        return [BASIC_PROFILE, *(o.value for o in ProfileOption if o in self.options)]

    def codes(self) -> list[tuple[str, str]]:
        return [BASIC_CODE, *(OPTION_CODES[o] for o in ProfileOption if o in self.options)]

    def method_text(self) -> str:
        """De-identification Method (0012,0063): LO, at most 64 characters."""
        return ("mi2b2 PS3.15 E " + " ".join(code for code, _ in self.codes()))[:64]
