"""Benchmark: downloading a project's cache, plain and age-encrypted, vs. reading the same files from disk.

    python bench/download.py [--megabytes N]

Generates synthetic CT studies (512x512, ~0.5 MB per instance) straight into
the cache of a fresh site, indexes them as the receiver would, starts
`mi2b2 serve` in a subprocess and creates a researcher with a token. Before
each run the files are dropped from the page cache (posix_fadvise
DONTNEED), so every run reads from disk, as a download of a big cache does.
It times

  (a) reference: reading every file (all bytes, 1 MiB reads, one thread),
  (b) ``POST /api/v1/projects/P/download``: the plain ZIP, consumed with curl,
  (c) the same, encrypted to an age public key (recipients mode),
  (d) ``mi2b2 download P --all --to DIR`` and the same with ``-r age1...``: the CLI's
      plain and encrypted folder downloads, best of 3 each, run through the command's entry
      point in this process (a new process's start-up is printed apart),
  (e) the plain ZIP of a project whose export policy is ``deidentified`` holding the
      same studies, against (b) again: each phase repeats its download for at least
      1 s; best of several phases, alternating; the first de-identified download
      (no header made yet) is printed too,

checks that the ZIPs and the folder hold every file, prints MB/s and ends
with ``ratio: <(c) MB/s / (b) MB/s>`` (target >= 0.7; plain_vs_disk target >= 0.8;
deid_vs_plain target >= 0.7; cli_plain_vs_zip target >= 0.8; cli_encrypted_vs_plain target >= 0.7).
Everything it starts is stopped, and its temp folder removed, on exit.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import httpx  # noqa: E402
import pyrage  # noqa: E402
from _server import BenchFailure, mi2b2_server, researcher_token  # noqa: E402

from mi2b2.adapters.db.engine import transaction  # noqa: E402
from mi2b2.adapters.dicom.files import read_instance_header  # noqa: E402
from mi2b2.config import load_config  # noqa: E402
from mi2b2.services.cache import cache_store, index_instance  # noqa: E402
from mi2b2.services.context import build_context  # noqa: E402
from mi2b2.synthetic import SyntheticStudy, write_study  # noqa: E402
from support.pacs import free_port  # noqa: E402

PROJECT = "bench"
DEID_PROJECT = "benchdeid"
PHASE_SECONDS = 1.0
PHASES = 3
INSTANCE_BYTES = 525_636  # one 512x512 16-bit CT instance as mi2b2.synthetic writes it
PER_SERIES = 25



def write_site(folder: Path) -> Path:
    (folder / "bench.mrns").write_text("".join(f"BENCH{i:04d}\n" for i in range(1, 1000)), encoding="utf-8")
    path = folder / "mi2b2.toml"
    path.write_text(textwrap.dedent(f"""\
        [server]
        http_port = {free_port()}
        database_url = "sqlite:///mi2b2.db"
        cache_dir = "cache"

        [dicom]
        ae_title = "MI2B2"
        port = {free_port()}

        [[institutions]]
        id = "bench"

        [[institutions.departments]]
        id = "radiology"

        [[institutions.departments.pacs]]
        id = "unused"
        ae_title = "UNUSED"
        host = "127.0.0.1"
        port = {free_port()}

        [[projects]]
        id = "{PROJECT}"
        title = "Download benchmark"
        irb = "BENCH-0002"
        expires = 2099-12-31
        mrn_file = "bench.mrns"
        quota = "100 GiB"
        institutions = ["bench"]
        members = [{{ login = "bench" }}]

        [[projects]]
        id = "{DEID_PROJECT}"
        title = "Download benchmark, de-identified"
        irb = "BENCH-0003"
        expires = 2099-12-31
        mrn_file = "bench.mrns"
        quota = "100 GiB"
        institutions = ["bench"]
        members = [{{ login = "bench" }}]
        export = "deidentified"
        [projects.deidentification]
        options = ["retain_longitudinal_modified_dates"]
        """), encoding="utf-8")
    return path


def fill_cache(config_path: Path, megabytes: int) -> tuple[str, list[Path], list[Path]]:
    """Synthetic studies generated in the cache's incoming folder, placed and indexed as the receiver does
    (in both projects: the de-identified one holds copies of the same files)."""
    token = researcher_token(config_path)
    ctx = build_context(load_config(config_path))
    try:
        store = cache_store(ctx)
        studies = max(1, round(megabytes * 1_000_000 / (INSTANCE_BYTES * PER_SERIES * 2)))
        placed: list[Path] = []
        copies: list[Path] = []
        for n in range(1, studies + 1):
            study = SyntheticStudy(
                patient_id=f"BENCH{n:04d}", patient_name=f"BENCH^PATIENT{n:04d}", birth_date="19700101", sex="O",
                accession=f"BD{n:08d}", study_date="20240101", modality="CT", description="BENCH CT",
                series_count=2, instances_per_series=PER_SERIES, rows=512, cols=512,
            )
            generated = write_study(study, store.incoming_dir() / "generated")
            with transaction(ctx.sessions) as session:
                for file in generated:
                    header = read_instance_header(file)
                    for project, into in ((DEID_PROJECT, copies), (PROJECT, placed)):
                        relative = store.relative_path(project, header.study_uid, header.series_uid,
                                                       header.sop_instance_uid)
                        if project == DEID_PROJECT:
                            shutil.copyfile(file, file.with_suffix(".copy"))
                            size = store.place(file.with_suffix(".copy"), relative)
                        else:
                            size = store.place(file, relative)
                        index_instance(session, project, header, relative, size, ctx.clock.now(), "bench", "unused")
                        into.append(store.absolute(relative))
        shutil.rmtree(store.incoming_dir(), ignore_errors=True)
        return token, placed, copies
    finally:
        ctx.engine.dispose()


def evict(paths: list[Path]) -> None:
    """Drop the files from the page cache, so the next run reads them from disk."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm_up(url: str, token: str) -> None:
    """One small download first: the server loads its DICOM, ZIP and age code on the first one."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as http:
        studies = http.get(f"/api/v1/projects/{PROJECT}/cache").json()["studies"]
        response = http.post(f"/api/v1/projects/{PROJECT}/download", json={"study_uids": [studies[0]["study_uid"]]})
        if response.status_code != 200:
            raise BenchFailure(f"warm-up download failed: HTTP {response.status_code} {response.text[:500]}")


def time_disk(paths: list[Path]) -> tuple[float, int]:
    evict(paths)
    total = 0
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while chunk := file.read(1 << 20):
                total += len(chunk)
    return time.perf_counter() - started, total


def time_zip(url: str, token: str, paths: list[Path], out: Path, encryption: dict[str, object] | None,
             project: str = PROJECT) -> tuple[float, int]:
    """Consume the streamed ZIP with curl, as a researcher's script might.

    A C client: with a Python client on the same two cores the client, not the
    server, set the pace (httpx took ~150-500 MB/s where curl took ~850)."""
    evict(paths)
    body = json.dumps({"all": True, "encryption": encryption})
    started = time.perf_counter()
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail-with-body", "--request", "POST",
         "--header", f"Authorization: Bearer {token}", "--header", "Content-Type: application/json",
         "--data-binary", body, "--output", str(out), f"{url}/api/v1/projects/{project}/download"],
        capture_output=True, text=True, timeout=1800, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise BenchFailure(f"download failed (curl {result.returncode}): {result.stderr[-500:]} {out.read_bytes()[:500]!r}")
    return elapsed, out.stat().st_size


def time_cli(url: str, token: str, paths: list[Path], target: Path, options: list[str]) -> float:
    """Seconds of one fresh `mi2b2 download bench --all --to TARGET [options]`, page cache dropped.

    Run in this process through the command's own entry point (progress bar and all), so the
    Python start-up and imports of a new process (printed apart, ``cli_startup``) stay out of the
    transfer rate; the files are checked afterwards."""
    from typer.testing import CliRunner

    from mi2b2.cli.main import app

    shutil.rmtree(target, ignore_errors=True)
    evict(paths)
    started = time.perf_counter()
    result = CliRunner().invoke(app, ["download", PROJECT, "--all", "--to", str(target), *options,
                                      "--server", url, "--token", token], env={"COLUMNS": "120"})
    elapsed = time.perf_counter() - started
    if result.exit_code != 0:
        raise BenchFailure(f"mi2b2 download failed ({result.exit_code}): {result.output[-1500:]} {result.exception!r}")
    suffix = ".dcm.age" if options else ".dcm"
    stored = [p for p in target.rglob(f"*{suffix}")]
    if len(stored) != len(paths):
        raise BenchFailure(f"the CLI download holds {len(stored)} images, expected {len(paths)}")
    if not options and sum(p.stat().st_size for p in stored) != sum(p.stat().st_size for p in paths):
        raise BenchFailure("the CLI's plain download does not hold the bytes of the cache")
    return elapsed


def measure_cli_plain(url: str, token: str, paths: list[Path], root: Path, runs: int = PHASES) -> float:
    """MB/s of images of the CLI's plain folder download: best of ``runs`` fresh downloads."""
    size = sum(p.stat().st_size for p in paths)
    best = min(time_cli(url, token, paths, root / "cli-plain", []) for _ in range(runs))
    shutil.rmtree(root / "cli-plain", ignore_errors=True)
    return size / 1e6 / best


def measure_cli_encrypted(url: str, token: str, paths: list[Path], root: Path, recipient: str,
                          runs: int = PHASES) -> float:
    """MB/s of images of the CLI's folder download encrypted to an age public key: best of ``runs``."""
    size = sum(p.stat().st_size for p in paths)
    best = min(time_cli(url, token, paths, root / "cli-encrypted", ["-r", recipient]) for _ in range(runs))
    shutil.rmtree(root / "cli-encrypted", ignore_errors=True)
    return size / 1e6 / best


def phase(url: str, token: str, paths: list[Path], out: Path, project: str) -> tuple[float, int]:
    """(seconds, downloads) of as many downloads as fill PHASE_SECONDS."""
    elapsed, runs = 0.0, 0
    while elapsed < PHASE_SECONDS:
        seconds, _size = time_zip(url, token, paths, out, None, project)
        elapsed += seconds
        runs += 1
    return elapsed, runs


def time_deid_vs_plain(url: str, token: str, paths: list[Path], copies: list[Path], root: Path
                       ) -> tuple[float, float, float]:
    """(first de-identified run, best de-identified phase, best plain phase), in seconds per download."""
    first, _size = time_zip(url, token, copies, root / "deid.zip", None, DEID_PROJECT)
    check_zip(root / "deid.zip", len(copies), encrypted=False, report=True)
    best_plain = best_deid = float("inf")
    for _ in range(PHASES):
        seconds, runs = phase(url, token, paths, root / "plain.zip", PROJECT)
        best_plain = min(best_plain, seconds / runs)
        seconds, runs = phase(url, token, copies, root / "deid.zip", DEID_PROJECT)
        best_deid = min(best_deid, seconds / runs)
    check_zip(root / "deid.zip", len(copies), encrypted=False, report=True)
    (root / "plain.zip").unlink()
    (root / "deid.zip").unlink()
    return first, best_deid, best_plain


def cli_startup() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mi2b2", "--help"], capture_output=True, check=True, timeout=120)
    return time.perf_counter() - started


def check_zip(path: Path, expected: int, encrypted: bool, report: bool = False) -> None:
    with zipfile.ZipFile(path) as archive:
        if report and "deidentification-report.json" not in archive.namelist():
            raise BenchFailure(f"{path.name} has no deidentification-report.json")
        names = [n for n in archive.namelist() if n.endswith(".dcm.age" if encrypted else ".dcm")]
        if len(names) != expected:
            raise BenchFailure(f"{path.name} holds {len(names)} images, expected {expected}")
        if archive.testzip() is not None:
            raise BenchFailure(f"{path.name} has a damaged member")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=300)
    megabytes = parser.parse_args().megabytes
    root = Path(tempfile.mkdtemp(prefix="mi2b2-bench-download-"))
    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    try:
        with ExitStack() as stack:
            site = root / "site"
            site.mkdir()
            config_path = write_site(site)
            t0 = time.perf_counter()
            token, paths, copies = fill_cache(config_path, megabytes)
            size = sum(p.stat().st_size for p in paths)
            print(f"setup: {len(paths)} instances, {size / 1e6:.0f} MB generated and indexed in "
                  f"{time.perf_counter() - t0:.1f} s")
            url = stack.enter_context(mi2b2_server(config_path)).url
            warm_up(url, token)

            disk, read = time_disk(paths)
            plain, plain_bytes = time_zip(url, token, paths, root / "plain.zip", None)
            check_zip(root / "plain.zip", len(paths), encrypted=False)
            encrypted, encrypted_bytes = time_zip(url, token, paths, root / "encrypted.zip", {"recipients": [recipient]})
            check_zip(root / "encrypted.zip", len(paths), encrypted=True)
            (root / "plain.zip").unlink()
            (root / "encrypted.zip").unlink()
            cli_plain = measure_cli_plain(url, token, paths, root)
            cli_encrypted = measure_cli_encrypted(url, token, paths, root, recipient)
            startup = cli_startup()
            deid_first, deid_best, plain_best = time_deid_vs_plain(url, token, paths, copies, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)

    if read != size:
        raise BenchFailure(f"read {read} bytes from disk, expected {size}")

    def rate(seconds: float) -> float:
        return size / 1e6 / seconds

    print(f"reference, reading the files from disk (page cache dropped): {disk:.2f} s, {rate(disk):.0f} MB/s")
    print(f"mi2b2 API, plain ZIP: {plain:.2f} s, {rate(plain):.0f} MB/s of images ({plain_bytes / 1e6:.0f} MB ZIP)")
    print(f"mi2b2 API, age-encrypted ZIP (recipients): {encrypted:.2f} s, {rate(encrypted):.0f} MB/s of images "
          f"({encrypted_bytes / 1e6:.0f} MB ZIP)")
    print(f"mi2b2 CLI, best of {PHASES}: plain folder download {cli_plain:.0f} MB/s of images, age-encrypted "
          f"(recipients) {cli_encrypted:.0f} MB/s (the command's start-up, excluded: {startup:.2f} s)")
    print(f"mi2b2 API, de-identified ZIP, first download (every header made): {deid_first:.2f} s, "
          f"{rate(deid_first):.0f} MB/s of images")
    print(f"mi2b2 API, best of {PHASES} phases of >= {PHASE_SECONDS:g} s: plain ZIP {plain_best:.2f} s "
          f"({rate(plain_best):.0f} MB/s), de-identified ZIP {deid_best:.2f} s ({rate(deid_best):.0f} MB/s)")
    print(f"plain_vs_disk: {rate(plain) / rate(disk):.3f}")
    print(f"deid_first_vs_plain: {rate(deid_first) / rate(plain_best):.3f}")
    print(f"deid_vs_plain: {rate(deid_best) / rate(plain_best):.3f}")
    print(f"cli_plain_vs_zip: {cli_plain / rate(plain_best):.3f}")
    print(f"cli_encrypted_vs_plain: {cli_encrypted / cli_plain:.3f}")
    print(f"ratio: {rate(encrypted) / rate(plain):.3f}")


if __name__ == "__main__":
    try:
        main()
    except BenchFailure as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
