"""Fakes that unit tests of other layers may use."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: datetime | None = None) -> None:
        self._now = start or datetime(2026, 1, 5, 12, 0, tzinfo=UTC)
        self._mono = 0.0

    def now(self) -> datetime:
        return self._now

    def monotonic(self) -> float:
        return self._mono

    def advance(self, **delta: float) -> None:
        step = timedelta(**delta)
        self._now += step
        self._mono += step.total_seconds()

    def sleep(self, seconds: float) -> None:
        self.advance(seconds=seconds)

    def set(self, when: datetime) -> None:
        self._mono += (when - self._now).total_seconds()
        self._now = when


class ScaledClock:
    """Wall time running ``factor`` times faster, from ``start``: lets a test
    watch per-minute rate limits hold against a real PACS in a few seconds.

    Processes that must agree on the time (workers and receivers started as
    separate commands) pass the same ``start`` and ``origin_monotonic`` (a
    ``time.monotonic()`` reading, which every process on the machine shares)."""

    def __init__(self, factor: float, start: datetime | None = None, origin_monotonic: float | None = None) -> None:
        import time

        self._time = time
        self.factor = factor
        self._origin_real = time.monotonic() if origin_monotonic is None else origin_monotonic
        self._origin = start or datetime(2026, 1, 5, 12, 0, tzinfo=UTC)

    @property
    def origin_monotonic(self) -> float:
        return self._origin_real

    @property
    def start(self) -> datetime:
        return self._origin

    def now(self) -> datetime:
        return self._origin + timedelta(seconds=(self._time.monotonic() - self._origin_real) * self.factor)

    def monotonic(self) -> float:
        return self._time.monotonic() * self.factor

    def sleep(self, seconds: float) -> None:
        self._time.sleep(seconds / self.factor)


class FakeFindSession:
    """An in-memory stand-in for one PACS's C-FIND, for unit tests of the search service.

    Matches single values exactly, StudyDate ranges "A-B" and (unless ``uid_lists``
    is off, as on a PACS that does not) lists of UIDs "A\\B"; records every query so
    tests can prove what was (not) sent. Integration tests use real PACS.
    """

    def __init__(self, studies: list[dict[str, str]], series: list[dict[str, str]] | None = None,
                 result_limit: int = 0, uid_lists: bool = True) -> None:
        self.studies = studies
        self.series = series or []
        self.result_limit = result_limit
        self.uid_lists = uid_lists
        self.queries: list[tuple[str, str, dict[str, str | None]]] = []

    def __enter__(self) -> FakeFindSession:
        return self

    def __exit__(self, *_exc: object) -> None:
        return None

    def find(self, model: str, level: str, keys: Mapping[str, str | None]) -> list[dict[str, str]]:
        self.queries.append((model, level, dict(keys)))
        rows = self.series if level == "SERIES" else self.studies
        answers = [dict(row) for row in rows
                   if all(_matches(row.get(k, ""), v, self.uid_lists and k.endswith("UID")) for k, v in keys.items())]
        if level == "PATIENT":
            unique = {a["PatientID"]: a for a in answers}
            answers = list(unique.values())
        return answers[: self.result_limit] if self.result_limit else answers

    def sent_values(self, keyword: str) -> set[str]:
        return {str(keys.get(keyword)) for _m, _l, keys in self.queries if keys.get(keyword)}


def _matches(value: str, wanted: str | None, uid_list: bool = False) -> bool:
    if not wanted:
        return True
    if uid_list and "\\" in wanted:
        return value in wanted.split("\\")
    if "-" in wanted and len(wanted) == 17 and wanted[8] == "-":
        return bool(value) and wanted[:8] <= value <= wanted[9:]
    return value == wanted
