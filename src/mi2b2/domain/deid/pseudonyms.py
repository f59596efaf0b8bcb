"""Consistent pseudonyms from a project's secret key: the same input always gives the same output.

HMAC-SHA256 keyed with the project's secret, one label per kind, so a UID and a
patient ID that happen to share digits never share a pseudonym. Nothing here is
reversible without the key; the server keeps a mapping for the honest broker.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass
from datetime import date, timedelta

STANDARD_ROOT = "1.2.840.10008."  # UIDs the standard defines (SOP classes, codes): never identifying
MAX_SHIFT_DAYS = 3650


@dataclass(frozen=True)
class Pseudonymizer:
    key: bytes

    def _digest(self, kind: str, value: str) -> bytes:
        return hmac.new(self.key, f"{kind}\x00{value}".encode(), hashlib.sha256).digest()

    def uid(self, original: str) -> str:
        """2.25.<128-bit integer> (PS3.5 B.2): at most 44 characters, the same for the same UID."""
        original = original.strip().rstrip("\x00")
        if not original or original.startswith(STANDARD_ROOT):
            return original
        return "2.25." + str(int.from_bytes(self._digest("uid", original)[:16], "big"))

    def patient_id(self, original: str, issuer: str = "") -> str:
        """``P`` and 12 letters and digits: one per (issuer, patient ID) in the project."""
        token = base64.b32encode(self._digest("patient", f"{issuer}\x00{original.strip()}")).decode()
        return "P" + token[:12]

    def date_shift(self, patient_id: str, issuer: str = "") -> timedelta:
        """A constant move back in time for one patient, 1 to MAX_SHIFT_DAYS days: intervals survive."""
        number = int.from_bytes(self._digest("shift", f"{issuer}\x00{patient_id.strip()}")[:8], "big")
        return -timedelta(days=1 + number % MAX_SHIFT_DAYS)


def patient_original(patient_id: str, issuer: str) -> str:
    """A patient as the honest broker's table names it: ``issuer/ID`` when the files name an issuer."""
    return f"{issuer}/{patient_id}" if issuer else patient_id


def shift_date(value: str, shift: timedelta) -> str | None:
    """A DA value (YYYYMMDD) moved by ``shift``; None if it is not a date (the caller empties it)."""
    text = value.strip()
    if len(text) != 8 or not text.isdigit():
        return None
    try:
        moved = date(int(text[:4]), int(text[4:6]), int(text[6:])) + shift
    except (ValueError, OverflowError):
        return None
    return moved.strftime("%Y%m%d") if moved.year >= 1 else None


def shift_datetime(value: str, shift: timedelta) -> str | None:
    """A DT value: its date part moved, the time and offset kept; None if its date part is not whole."""
    text = value.strip()
    moved = shift_date(text[:8], shift)
    return None if moved is None else moved + text[8:]
