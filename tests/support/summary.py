"""Lines a test wants in pytest's terminal summary (its measurements), shown even without `-s`."""

from __future__ import annotations

SECTIONS: dict[str, list[str]] = {}


def report(section: str, *lines: str) -> None:
    SECTIONS.setdefault(section, []).extend(lines)
