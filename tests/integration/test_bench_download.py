"""bench/download.py's code path on a tiny cache (the benchmark itself is not part of the suite)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench" / "download.py"
RATIOS = ("plain_vs_disk", "encrypted_vs_plain", "cli_plain_vs_zip", "cli_encrypted_vs_plain", "deid_vs_plain",
          "deid_first_vs_plain", "encrypted_first_vs_plain")


def test_the_download_benchmark_times_every_phase_checks_the_zips_and_prints_its_ratios(
        capsys: pytest.CaptureFixture[str]) -> None:
    spec = importlib.util.spec_from_file_location("bench_download", BENCH)
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    sys.modules["bench_download"] = bench
    spec.loader.exec_module(bench)
    bench.PER_SERIES = 2  # one study of 2 series of 2 instances: ~2 MB
    ratio = bench.main(["--megabytes", "1", "--runs", "1", "--page-cache", "fadvise"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[-1] == f"ratio: {ratio:.3f}"
    assert any(line.startswith("page cache: posix_fadvise") for line in lines)
    runs = [line for line in lines if line.startswith("run ")]
    assert [line.split(":")[0] for line in runs] == ["run 1"]
    assert all(f"{phase} " in runs[0] for phase in bench.PHASES)
    for name in RATIOS:
        value = next(line for line in lines if line.startswith(f"{name}: "))
        assert float(value.split(": ")[1]) > 0
