"""Benchmark: downloading a project's cache as ZIPs (plain, age-encrypted, de-identified) and with the CLI.

    python bench/download.py [--megabytes 1000] [--runs 3] [--page-cache drop|fadvise]

Generates synthetic CT studies (512x512, ~0.5 MB per instance) straight into
the cache of a fresh site, indexes them as the receiver would, starts
`mi2b2 serve` in a subprocess and creates a researcher with a token. Every
timed phase moves the whole cache (>= 1 GB by default) and starts with the
page cache dropped (``sync; echo 3 > /proc/sys/vm/drop_caches`` as root,
else posix_fadvise(DONTNEED) on each file; the line ``page cache:`` says
which), so every phase reads from disk as a download of a big cache does.
Each run times, in this order:

  disk           reading every file (all bytes, 1 MiB reads, one thread): the reference,
  plain          ``POST /api/v1/projects/P/download``, the plain ZIP, consumed by curl,
  encrypted      the same, encrypted to an age public key (recipients mode),
  cli plain      ``mi2b2 download P --all --to DIR``, through the command's entry point in this
                 process (a new process's start-up is printed apart),
  cli encrypted  the same with ``-r age1...`` (files encrypted as they arrive),
  deid           the plain ZIP of a project whose export policy is ``deidentified``, same studies.

curl writes the ZIPs to /dev/null (a ZIP written to the same disk would time
the disk's writes, not the download); after the runs one plain and one
encrypted ZIP are saved, checked member by member (the encrypted one
decrypted with ``mi2b2.services.export.reader``) and must have the byte count
of every timed run (give or take the random padding age puts in each header).
Each run's figures are printed; the ratios use the best of the runs:

  plain_vs_disk            plain ZIP / disk                 target >= 0.8
  encrypted_vs_plain       encrypted ZIP / plain ZIP        target >= 0.7
  cli_plain_vs_zip         CLI plain / plain ZIP            target >= 0.8
  cli_encrypted_vs_plain   CLI encrypted / CLI plain        target >= 0.7
  deid_vs_plain            de-identified ZIP / plain ZIP    target >= 0.7
  deid_first_vs_plain      the first de-identified ZIP (every header made) / plain ZIP
  encrypted_first_vs_plain the first encrypted ZIP (no SHA-256 remembered yet) / plain ZIP

and ``ratio: N``, the smallest of the first four each divided by its target:
ratio >= 1 means every target is met. Everything it starts is stopped, and
its temp folder removed, on exit.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import zipfile
from collections.abc import Callable, Sequence
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "bench"))  # _server, also when the suite imports this file

import httpx  # noqa: E402
import pyrage  # noqa: E402
from _server import BenchFailure, mi2b2_server, researcher_token  # noqa: E402

from mi2b2.adapters.db.engine import transaction  # noqa: E402
from mi2b2.adapters.dicom.files import read_instance_header  # noqa: E402
from mi2b2.config import load_config  # noqa: E402
from mi2b2.services.cache import cache_store, index_instance  # noqa: E402
from mi2b2.services.context import build_context  # noqa: E402
from mi2b2.services.export.reader import open_download  # noqa: E402
from mi2b2.synthetic import SyntheticStudy, write_study  # noqa: E402
from support.pacs import free_port  # noqa: E402

PROJECT = "bench"
DEID_PROJECT = "benchdeid"
RUNS = 3
INSTANCE_BYTES = 525_636  # one 512x512 16-bit CT instance as mi2b2.synthetic writes it
PER_SERIES = 25
AGE_GREASE = 512  # bytes the random "grease" stanza of an age header may add to a member (a few hundred at most)
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
TARGETS = {"plain_vs_disk": 0.8, "encrypted_vs_plain": 0.7, "cli_plain_vs_zip": 0.8, "cli_encrypted_vs_plain": 0.7}
PHASES = ("disk", "plain", "encrypted", "cli plain", "cli encrypted", "deid")


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
    (in both projects: the de-identified one holds hard links to the same files)."""
    token = researcher_token(config_path)
    ctx = build_context(load_config(config_path))
    try:
        store = cache_store(ctx)
        studies = max(1, math.ceil(megabytes * 1_000_000 / (INSTANCE_BYTES * PER_SERIES * 2)))
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
                            os.link(file, file.with_suffix(".copy"))  # the same bytes, no second write
                            size = store.place(file.with_suffix(".copy"), relative)
                        else:
                            size = store.place(file, relative)
                        index_instance(session, project, header, relative, size, ctx.clock.now(), "bench", "unused")
                        into.append(store.absolute(relative))
        shutil.rmtree(store.incoming_dir(), ignore_errors=True)
        return token, placed, copies
    finally:
        ctx.engine.dispose()


# the page cache ------------------------------------------------------------------


def page_cache_dropper(how: str) -> tuple[str, Callable[[list[Path]], None]]:
    """How each phase starts from disk: the whole page cache dropped (root), else each file advised out."""
    if how == "drop":
        try:
            drop_all([])
            return f"dropped whole ({DROP_CACHES})", drop_all
        except OSError as exc:
            print(f"cannot write {DROP_CACHES} ({exc.strerror}); using posix_fadvise(DONTNEED) per file instead")
    return "posix_fadvise(DONTNEED) on each file", advise_out


def drop_all(_paths: list[Path]) -> None:
    os.sync()
    DROP_CACHES.write_text("3\n", encoding="ascii")


def advise_out(paths: list[Path]) -> None:
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# the phases: each returns its seconds (and checks what it got) ---------------------


def warm_up(url: str, token: str) -> None:
    """One small download first: the server loads its DICOM, ZIP and age code on the first one."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as http:
        studies = http.get(f"/api/v1/projects/{PROJECT}/cache").json()["studies"]
        response = http.post(f"/api/v1/projects/{PROJECT}/download", json={"study_uids": [studies[0]["study_uid"]]})
        if response.status_code != 200:
            raise BenchFailure(f"warm-up download failed: HTTP {response.status_code} {response.text[:500]}")


def time_disk(paths: list[Path]) -> tuple[float, int]:
    total = 0
    started = time.perf_counter()
    for path in paths:
        with open(path, "rb", buffering=0) as file:
            while chunk := file.read(1 << 20):
                total += len(chunk)
    return time.perf_counter() - started, total


def time_zip(url: str, token: str, out: Path | None, encryption: dict[str, object] | None,
             project: str = PROJECT) -> tuple[float, int]:
    """(seconds, ZIP bytes) of one ZIP download consumed by curl, as a researcher's script might;
    ``out`` None sends it to /dev/null.

    A C client: with a Python client on the same two cores the client, not the
    server, set the pace (httpx took ~150-500 MB/s where curl took ~850)."""
    body = json.dumps({"all": True, "encryption": encryption})
    started = time.perf_counter()
    result = subprocess.run(
        ["curl", "--silent", "--show-error", "--fail", "--request", "POST",
         "--header", f"Authorization: Bearer {token}", "--header", "Content-Type: application/json",
         "--data-binary", body, "--output", str(out or os.devnull), "--write-out", "%{size_download}",
         f"{url}/api/v1/projects/{project}/download"],
        capture_output=True, text=True, timeout=1800, check=False)
    elapsed = time.perf_counter() - started
    if result.returncode != 0:
        raise BenchFailure(f"{project} download failed (curl {result.returncode}): {result.stderr[-500:]}")
    return elapsed, int(result.stdout)


def time_cli_plain(url: str, token: str, paths: list[Path], target: Path) -> float:
    """``mi2b2 download --all`` into ``target``: a plain folder download."""
    elapsed = _run_cli(url, token, target, [])
    _check_folder(target, len(paths), ".dcm")
    return elapsed


def time_cli(url: str, token: str, paths: list[Path], target: Path, recipient: str) -> float:
    """``mi2b2 download --all -r RECIPIENT`` into ``target``: an encrypted folder download."""
    elapsed = _run_cli(url, token, target, ["-r", recipient])
    _check_folder(target, len(paths), ".dcm.age")
    return elapsed


def _run_cli(url: str, token: str, target: Path, extra: list[str]) -> float:
    """Seconds of `mi2b2 download` run through the command's own entry point (progress bar and all) in this
    process: a new process's Python start-up and imports (``cli_startup``, printed apart) are not the
    download's speed, and at 1 GB they would weigh as much as the transfer."""
    from typer.testing import CliRunner

    from mi2b2.cli.main import app

    started = time.perf_counter()
    result = CliRunner().invoke(app, ["download", PROJECT, "--all", "--to", str(target), *extra,
                                      "--server", url, "--token", token], env={"COLUMNS": "120"})
    elapsed = time.perf_counter() - started
    if result.exit_code != 0:
        raise BenchFailure(f"mi2b2 download failed ({result.exit_code}): {result.output[-1500:]} {result.exception!r}")
    return elapsed


def _check_folder(target: Path, expected: int, suffix: str) -> None:
    stored = [p for p in target.rglob(f"*{suffix}") if suffix == ".dcm.age" or not p.name.endswith(".age")]
    if len(stored) != expected:
        raise BenchFailure(f"the CLI download into {target.name} holds {len(stored)} images, expected {expected}")


def cli_startup() -> float:
    started = time.perf_counter()
    subprocess.run([sys.executable, "-m", "mi2b2", "--help"], capture_output=True, check=True, timeout=120)
    return time.perf_counter() - started


def check_zip(path: Path, expected: int, encrypted: bool, report: bool = False,
              identity: pyrage.x25519.Identity | None = None) -> None:
    with zipfile.ZipFile(path) as archive:
        if report and "deidentification-report.json" not in archive.namelist():
            raise BenchFailure(f"{path.name} has no deidentification-report.json")
        names = [n for n in archive.namelist() if n.endswith(".dcm.age" if encrypted else ".dcm")]
        if len(names) != expected:
            raise BenchFailure(f"{path.name} holds {len(names)} images, expected {expected}")
        if archive.testzip() is not None:
            raise BenchFailure(f"{path.name} has a damaged member")
    if identity is not None:  # every member decrypts and matches the manifest's size and SHA-256
        with open_download(path, identities=[identity]) as download:
            for entry in download.entries():
                download.read(entry)


# the runs -------------------------------------------------------------------------


class Runs:
    """Seconds of every run of every phase, and the bytes the ZIP phases received."""

    def __init__(self) -> None:
        self.seconds: dict[str, list[float]] = {phase: [] for phase in PHASES}
        self.zip_bytes: dict[str, set[int]] = {"plain": set(), "encrypted": set(), "deid": set()}

    def best(self, phase: str) -> float:
        return min(self.seconds[phase])


def one_run(number: int, runs: Runs, url: str, token: str, paths: list[Path], copies: list[Path], root: Path,
            recipient: str, evict: Callable[[list[Path]], None], size: int) -> None:
    def timed(phase: str, evicting: list[Path], measure: Callable[[], float]) -> None:
        evict(evicting)
        seconds = measure()
        runs.seconds[phase].append(seconds)
        figures.append(f"{phase} {seconds:.2f} s ({size / 1e6 / seconds:.0f} MB/s)")

    def zip_phase(phase: str, encryption: dict[str, object] | None, project: str) -> float:
        seconds, received = time_zip(url, token, None, encryption, project)
        runs.zip_bytes[phase].add(received)
        return seconds

    def cli_phase(run: Callable[[Path], float]) -> float:
        target = root / "folder"
        try:
            return run(target)
        finally:
            shutil.rmtree(target, ignore_errors=True)  # untimed; the next phase's sync writes it out

    figures: list[str] = []
    disk_bytes: list[int] = []

    def disk() -> float:
        seconds, read = time_disk(paths)
        disk_bytes.append(read)
        return seconds

    timed("disk", paths, disk)
    timed("plain", paths, lambda: zip_phase("plain", None, PROJECT))
    timed("encrypted", paths, lambda: zip_phase("encrypted", {"recipients": [recipient]}, PROJECT))
    timed("cli plain", paths, lambda: cli_phase(lambda t: time_cli_plain(url, token, paths, t)))
    timed("cli encrypted", paths, lambda: cli_phase(lambda t: time_cli(url, token, paths, t, recipient)))
    timed("deid", copies, lambda: zip_phase("deid", None, DEID_PROJECT))
    if disk_bytes != [size]:
        raise BenchFailure(f"read {disk_bytes} bytes from disk, expected {size}")
    print(f"run {number}: " + ", ".join(figures), flush=True)


def verify_zips(url: str, token: str, runs: Runs, paths: list[Path], root: Path, recipient: str,
                identity: pyrage.x25519.Identity) -> None:
    """One ZIP of each kind saved and checked; every timed run must have received as many bytes."""
    kinds: list[tuple[str, dict[str, object] | None, str]] = [
        ("plain", None, PROJECT), ("encrypted", {"recipients": [recipient]}, PROJECT), ("deid", None, DEID_PROJECT)]
    for phase, encryption, project in kinds:
        out = root / f"{phase}.zip"
        _seconds, received = time_zip(url, token, out, encryption, project)
        check_zip(out, len(paths), encrypted=phase == "encrypted", report=phase == "deid",
                  identity=identity if phase == "encrypted" else None)
        # age headers carry a random-length "grease" stanza: an encrypted ZIP's size varies a little.
        slack = AGE_GREASE * (len(paths) + 2) if phase == "encrypted" else 0
        if any(abs(timed - received) > slack for timed in runs.zip_bytes[phase]):
            raise BenchFailure(f"the timed {phase} ZIPs had {sorted(runs.zip_bytes[phase])} bytes, "
                               f"the checked one {received}")
        out.unlink()


def main(argv: Sequence[str] | None = None) -> float:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--megabytes", type=int, default=1000, help="size of the cache (default 1000: >= 1 GB)")
    parser.add_argument("--runs", type=int, default=RUNS, help="runs of every phase (the best counts)")
    parser.add_argument("--page-cache", choices=("drop", "fadvise"), default="drop",
                        help="how each phase starts from disk (drop: the whole page cache, needs root)")
    args = parser.parse_args(argv)
    root = Path(tempfile.mkdtemp(prefix="mi2b2-bench-download-"))
    identity = pyrage.x25519.Identity.generate()
    recipient = str(identity.to_public())
    runs = Runs()
    try:
        with ExitStack() as stack:
            site = root / "site"
            site.mkdir()
            config_path = write_site(site)
            t0 = time.perf_counter()
            token, paths, copies = fill_cache(config_path, args.megabytes)
            size = sum(p.stat().st_size for p in paths)
            print(f"setup: {len(paths)} instances, {size / 1e6:.0f} MB generated and indexed in "
                  f"{time.perf_counter() - t0:.1f} s" + ("" if size >= 1e9 else " (under 1 GB: a smoke run)"))
            how, evict = page_cache_dropper(args.page_cache)
            print(f"page cache: {how} before every phase")
            url = stack.enter_context(mi2b2_server(config_path)).url
            warm_up(url, token)
            for number in range(1, args.runs + 1):
                one_run(number, runs, url, token, paths, copies, root, recipient, evict, size)
            verify_zips(url, token, runs, paths, root, recipient, identity)
            startup = cli_startup()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return report(runs, size, startup)


def report(runs: Runs, size: int, startup: float) -> float:
    def rate(seconds: float) -> float:
        return size / 1e6 / seconds

    best = {phase: rate(runs.best(phase)) for phase in PHASES}
    count = len(runs.seconds["disk"])
    print(f"best of {count}: " + ", ".join(f"{phase} {best[phase]:.0f} MB/s" for phase in PHASES)
          + f" (the CLI's start-up alone: {startup:.2f} s)")
    ratios = {
        "plain_vs_disk": best["plain"] / best["disk"],
        "encrypted_vs_plain": best["encrypted"] / best["plain"],
        "cli_plain_vs_zip": best["cli plain"] / best["plain"],
        "cli_encrypted_vs_plain": best["cli encrypted"] / best["cli plain"],
    }
    for name, value in ratios.items():
        print(f"{name}: {value:.3f}")
    print(f"deid_vs_plain: {best['deid'] / best['plain']:.3f}")
    print(f"deid_first_vs_plain: {rate(runs.seconds['deid'][0]) / best['plain']:.3f}")
    print(f"encrypted_first_vs_plain: {rate(runs.seconds['encrypted'][0]) / best['plain']:.3f}")
    ratio = min(value / TARGETS[name] for name, value in ratios.items())
    print(f"ratio: {ratio:.3f}")
    return ratio


if __name__ == "__main__":
    try:
        main()
    except BenchFailure as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
