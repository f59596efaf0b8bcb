"""The receiver's refusals sorted into a few fixed kinds, for counting.

The receiver audits each refusal with its reason as a sentence, and some of those sentences
carry what the peer sent (an AE title, a file name). A monitoring label must come from a short
list fixed here, never from the peer: an unknown sentence becomes ``other``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# (how the receiver's sentence begins, or a pattern for it, the kind it counts as). Anchored at the
# start: what the peer chose (an AE title) only ever follows the fixed words, so it cannot pick a kind.
KINDS: tuple[tuple[re.Pattern[str], str], ...] = tuple((re.compile(pattern, re.DOTALL), kind) for pattern, kind in (
    (r"association refused: ", "unknown_peer_address"),  # a PACS's AE title from an address not configured for it
    (r"connection refused: ", "proxy_header"),  # a balancer without a PROXY header, or one from elsewhere (forged)
    (r"a Study, Series or SOP Instance UID is not a DICOM UID", "invalid_uid"),
    (r"sent for a C-MOVE issued by ", "foreign_move_originator"),
    (r"no retrieval in progress ", "no_retrieval_in_progress"),
    (r"the instance's PatientID differs ", "patient_mismatch"),
    (r"the instance's Issuer of Patient ID differs ", "issuer_mismatch"),
    (r"patient not on the project's IRB allow-list", "not_on_allow_list"),
    (r"series not among those requested", "series_not_requested"),
    (r"project cache quota reached", "quota_reached"),
    (r"SOP class not negotiated ", "sop_class_not_negotiated"),
    (r"larger than the receiver's maximum instance size", "too_large"),
    (r"the data set's SOP Instance UID differs from the request's", "sop_instance_mismatch"),
    (r"its header cannot be read ", "unreadable"),
    (r"[^\n]* is not a readable DICOM file \(\w+\)\Z", "unreadable"),  # adapters/dicom/files.py: name first
    (r"[^\n]* has no [^\n]*; it cannot be filed in the cache\Z", "unreadable"),
))
OTHER = "other"
ALL_KINDS: tuple[str, ...] = tuple(dict.fromkeys([kind for _, kind in KINDS] + [OTHER]))


def refusal_kind(reason: str) -> str:
    for pattern, kind in KINDS:
        if pattern.match(reason):
            return kind
    return OTHER


def refusals_in(detail: Mapping[str, Any]) -> dict[str, int]:
    """Instances (or associations) refused, by kind, in one of the receiver's audit details.

    An association's summary row holds ``reasons`` (sentence -> instances); a refused
    association holds one ``reason`` and counts once."""
    counts: dict[str, int] = {}
    reasons = detail.get("reasons")
    if isinstance(reasons, Mapping):
        for reason, count in reasons.items():
            if isinstance(count, int) and not isinstance(count, bool) and count > 0:
                kind = refusal_kind(str(reason))
                counts[kind] = counts.get(kind, 0) + count
    elif isinstance(detail.get("reason"), str):
        counts[refusal_kind(detail["reason"])] = 1
    return counts
