"""Which instances may carry identifiers burned into their pixels, and so are withheld from a de-identified export.

Pixel data is never decoded, so nothing can be masked: an instance is sent as
stored or not at all. It is withheld when it says Burned In Annotation YES, or
when it is of a kind known to carry text in its pixels (ultrasound, secondary
captures, photographs, scanned documents) and does not say NO; unless the
project names its series or its SOP class as cleared.
"""

from __future__ import annotations

from dataclasses import dataclass

from mi2b2.domain.deid.profile import Profile

RISKY_MODALITIES = frozenset({"US", "SC", "OT", "XC", "ES", "GM", "SM", "DOC"})
RISKY_SOP_CLASSES = frozenset({
    "1.2.840.10008.5.1.4.1.1.6.1",  # Ultrasound Image
    "1.2.840.10008.5.1.4.1.1.6.2",  # Enhanced US Volume
    "1.2.840.10008.5.1.4.1.1.3.1",  # Ultrasound Multi-frame Image
    "1.2.840.10008.5.1.4.1.1.6",  # Ultrasound Image (retired)
    "1.2.840.10008.5.1.4.1.1.3",  # Ultrasound Multi-frame Image (retired)
    "1.2.840.10008.5.1.4.1.1.7",  # Secondary Capture
    "1.2.840.10008.5.1.4.1.1.7.1",  # Multi-frame Single Bit SC
    "1.2.840.10008.5.1.4.1.1.7.2",  # Multi-frame Grayscale Byte SC
    "1.2.840.10008.5.1.4.1.1.7.3",  # Multi-frame Grayscale Word SC
    "1.2.840.10008.5.1.4.1.1.7.4",  # Multi-frame True Color SC
    "1.2.840.10008.5.1.4.1.1.77.1.1",  # VL Endoscopic Image
    "1.2.840.10008.5.1.4.1.1.77.1.4",  # VL Photographic Image
    "1.2.840.10008.5.1.4.1.1.104.1",  # Encapsulated PDF
    "1.2.840.10008.5.1.4.1.1.104.2",  # Encapsulated CDA
})


@dataclass(frozen=True)
class BurnedInVerdict:
    withhold: bool
    reason: str


def burned_in_verdict(profile: Profile, burned_in: str, modality: str, sop_class: str,
                      series_uid: str) -> BurnedInVerdict:
    said = burned_in.strip().upper()
    if series_uid in profile.cleared_series or sop_class in profile.cleared_sop_classes:
        return BurnedInVerdict(False, "cleared by the project")
    if said == "YES":
        return BurnedInVerdict(True, "Burned In Annotation is YES")
    risky = modality.strip().upper() in RISKY_MODALITIES or sop_class in RISKY_SOP_CLASSES
    if risky and said != "NO":
        return BurnedInVerdict(True, f"{modality.strip() or 'this kind of'} images may carry burned-in text "
                                     "and Burned In Annotation is not NO")
    return BurnedInVerdict(False, "no burned-in annotation")
