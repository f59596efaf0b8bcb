"""bench/scale.py's code path, on small numbers and SQLite (the benchmark itself is not part of the suite)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "scale.py"


def test_the_scale_benchmark_fills_ticks_pages_and_verifies(capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_scale", BENCH)
    assert spec is not None and spec.loader is not None
    scale = importlib.util.module_from_spec(spec)
    sys.modules["bench_scale"] = scale
    spec.loader.exec_module(scale)
    scale.TICKS, scale.PAGES = 3, 4
    ratio = scale.main(["--requests", "120", "--reference-requests", "50", "--audit-rows", "300",
                        "--reference-audit-rows", "20", "--forwards", "120", "--reference-forwards", "50",
                        "--projects", "5", "--no-postgres"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"ratio: {ratio:.2f}"
    assert any(line.startswith("sqlite_tick_growth: ") for line in lines)
    assert any(line.startswith("sqlite_list_growth: ") for line in lines)
    assert any(line.startswith("sqlite_forward_tick_growth: ") for line in lines)
    rate = next(line for line in lines if line.startswith("sqlite_verify_rows_per_s: "))
    assert float(rate.split(": ")[1]) > 0
