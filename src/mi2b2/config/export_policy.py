"""A project's export policy: ``identified`` (the default) or ``deidentified`` under PS3.15 Annex E.

    [[projects]]
    id = "lung"
    ...
    export = "deidentified"
    encrypted_only = true
    [projects.deidentification]
    options = ["retain_longitudinal_modified_dates", "retain_patient_characteristics"]
    burned_in_cleared_series = ["1.2.3.4.5"]
    burned_in_cleared_sop_classes = ["1.2.840.10008.5.1.4.1.1.7"]
    safe_private = ["GEMS_PARM_01:0010"]
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from pydantic import Field, field_validator

from mi2b2.config.fields import Strict
from mi2b2.domain.deid.profile import ExportMode, Profile, ProfileOption

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_PRIVATE = re.compile(r"^[ -~]{1,64}:[0-9A-Fa-f]{2}$")


class DeidentificationConfig(Strict):
    """[projects.deidentification]: the options of the Basic Application Level Confidentiality Profile."""

    options: list[ProfileOption] = Field(default_factory=list,
                                         description="PS3.15 Annex E profile options on top of the Basic Profile")
    burned_in_cleared_series: list[str] = Field(
        default_factory=list, description="SeriesInstanceUIDs checked and cleared of burned-in identifiers")
    burned_in_cleared_sop_classes: list[str] = Field(
        default_factory=list, description="SOP Class UIDs this project's IRB cleared of burned-in identifiers")
    safe_private: list[str] = Field(
        default_factory=list, description='private elements kept under retain_safe_private, as "CREATOR:xx" '
                                          '(private creator and the element byte, e.g. "GEMS_PARM_01:10")')

    @field_validator("burned_in_cleared_series", "burned_in_cleared_sop_classes")
    @classmethod
    def _uids(cls, value: list[str]) -> list[str]:
        bad = [uid for uid in value if len(uid) > 64 or not _UID.match(uid)]
        if bad:
            raise ValueError(f"not UIDs (digits and dots, at most 64): {', '.join(repr(b) for b in bad[:5])}")
        return value

    @field_validator("safe_private")
    @classmethod
    def _private(cls, value: list[str]) -> list[str]:
        bad = [item for item in value if not _PRIVATE.match(item)]
        if bad:
            raise ValueError(f"write each as \"PRIVATE CREATOR:xx\" with xx the element byte in hex, "
                             f"e.g. \"GEMS_PARM_01:10\"; not {', '.join(repr(b) for b in bad[:5])}")
        return value


class ExportPolicyFields(Strict):
    """The export fields of a [[projects]] entry (ProjectConfig inherits them)."""

    export: ExportMode = Field(ExportMode.IDENTIFIED, description='"identified" (as stored) or "deidentified" '
                                                                  "(PS3.15 Annex E at every door out)")
    encrypted_only: bool = Field(False, description="plain (unencrypted) downloads are refused")
    deidentification: DeidentificationConfig = DeidentificationConfig()


@dataclass(frozen=True)
class ExportPolicy:
    """What a project's doors out must do; ``profile`` is None for an identified project."""

    project_id: str
    profile: Profile | None
    encrypted_only: bool

    @property
    def deidentified(self) -> bool:
        return self.profile is not None

    def audit_detail(self) -> dict[str, object]:
        """What each export's audit event records about the policy applied."""
        if self.profile is None:
            return {"export": ExportMode.IDENTIFIED.value}
        return {"export": ExportMode.DEIDENTIFIED.value, "profile": self.profile.names()}


def export_policy(project: ExportPolicyFields | None, project_id: str) -> ExportPolicy:
    """The policy of a configured project; a project no longer configured exports nothing identified either
    way, so it falls back to the default (its other doors refuse it for being unconfigured)."""
    if project is None or project.export is ExportMode.IDENTIFIED:
        return ExportPolicy(project_id, None, bool(project and project.encrypted_only))
    settings = project.deidentification
    return ExportPolicy(project_id, Profile.of(settings.options, settings.burned_in_cleared_series,
                                               settings.burned_in_cleared_sop_classes, settings.safe_private),
                        project.encrypted_only)
