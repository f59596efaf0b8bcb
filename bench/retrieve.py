"""Benchmark: receiving C-MOVEs into mi2b2's cache vs. into DCMTK storescp and a second Orthanc.

    python bench/retrieve.py [--processes 2] [--studies 14] [--instances 150] [--big-gb 1.0] [--concurrency 4] [--repeat 3]

Generates (or reuses, from a temp folder keyed by the sizes) synthetic MR
studies of ~512 KB slices (512x512, 16 bit, random pixels, so nothing would
compress; by default 14 x 150 slices = 1.1 GB per timed phase), plus one big
study, and loads them into one Orthanc, the PACS (TCP_NODELAY=1,
MaximumPduLength 131072). Then it times, alternating, --repeat runs of each
receiver getting the same C-MOVEs from that PACS, --concurrency at a time:

  (a) reference: DCMTK ``storescp`` (bit-preserving, TCP_NODELAY=1, ``--fork``
      when mi2b2 runs more than one receiver process) as the C-MOVE
      destination; ``movescu`` asks the PACS for each study; the time runs
      until the last C-MOVE has answered, i.e. every file is written
      (storescp does not fsync; the time to fsync its files afterwards gives
      the durable reference, as mi2b2 fsyncs every file);
  (b) a second Orthanc as the C-MOVE destination, the same way;
  (c) mi2b2: ``mi2b2 serve`` whose receiver runs as --processes processes
      sharing the DICOM port (SO_REUSEPORT), with a governance window wide
      open (max_concurrent = --concurrency, no rates), one ``POST
      /api/v1/requests`` for all studies, then ``GET
      /api/v1/projects/{id}/requests`` until all are completed; the time runs
      from the POST to the last request's ``ended_at``;

checks that each received every instance (count, bytes within the size of a
file meta header, pixel data of a sample), and prints every run's throughput
and the best (MB = 10^6 bytes). Then it requests the big study alone and
reports ``rss_mb``, the peak resident set of mi2b2's receiver processes (all
of them together) while they received it (target < 300), ``vs_orthanc`` (mi2b2
MB/s over the second Orthanc's; target >= 1.5), ``durable_ratio`` (mi2b2 over
storescp plus the fsync of its files; target >= 1.0) and last ``ratio: <mi2b2
MB/s / storescp MB/s>`` (target >= 0.9). Every side gets one untimed warm-up
study first. Everything it starts is stopped, and its work folder removed, on exit.

Where the time goes (py-spy on both receiver processes, 2-core machine, 1.1 GB):
fdatasync of the received files ~15-18% of samples (on the indexer thread; on
this disk flushing 1.1 GB takes 5.5-6 s, longer than storescp's whole phase,
which is why ``ratio`` stays near 0.5 while ``durable_ratio`` is near 1);
pynetdicom's association reactor, which sleeps 1 ms in a loop even though
C-STOREs never reach it, ~13-15%; reading PDUs (``pdu_reader``, the 1 ms
``select`` of the network thread) ~15-25%; writing the files 5-8%; indexing 4%.
A receiver process is ~150 MB resident before it receives a byte (its imports:
SQLAlchemy, Alembic, pydantic, pydicom with numpy and Pillow, pynetdicom);
receiving a 1 GB study adds ~20 MB.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

import numpy as np  # noqa: E402
import pydicom  # noqa: E402
from _server import BenchFailure, log_tail, mi2b2_server, researcher_token, stop_group  # noqa: E402
from pydicom.dataset import Dataset, FileMetaDataset  # noqa: E402
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid  # noqa: E402

from mi2b2.config import load_config  # noqa: E402
from support.pacs import MAX_PDU, RunningPacs, free_port  # noqa: E402
from support.server import Mi2b2Server  # noqa: E402

PROJECT = "bench"
PACS_ID = "orthanc"
MI2B2_AE = "MI2B2"
REFERENCE_AE = "STORESCP"
ORTHANC_RECEIVER_AE = "ORTHANC2"
STALL_SECONDS = 60.0  # no new instance for this long = something is stuck
POLL_SECONDS = 0.25
DATA_VERSION = "2"  # bump when the generated files change
MB = 1e6


# --- synthetic studies ---------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    label: str
    patient_id: str
    study_uid: str
    files: tuple[Path, ...]
    bytes: int


def mrn(i: int) -> str:
    return f"{i:08d}"


def _write_study(folder: Path, label: str, patient_id: str, instances: int, rows: int, seed: int) -> Study:
    """One MR study, 50 slices per series, random 12-bit pixels."""
    # One entropy string with separators: generate_uid concatenates its sources, so ["1", "11"] == ["11", "1"].
    study_uid = str(generate_uid(entropy_srcs=[f"bench-retrieve/{DATA_VERSION}/{label}"]))
    study_dir = folder / label
    study_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    files: list[Path] = []
    total = 0
    per_series = 50
    for index in range(instances):
        series_number, instance_number = index // per_series + 1, index % per_series + 1
        series_uid = str(generate_uid(entropy_srcs=[f"{study_uid}/{series_number}"]))
        sop_uid = generate_uid(entropy_srcs=[f"{study_uid}/{series_number}/{instance_number}"])
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = sop_uid
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, sop_uid
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = f"BENCH^{label.upper()}", patient_id, "19700101", "O"
        ds.StudyInstanceUID, ds.StudyDate, ds.StudyTime = study_uid, "20240101", "093000"
        ds.AccessionNumber, ds.StudyID, ds.StudyDescription = f"BR{seed:08d}", str(seed), "BENCH MR BRAIN"
        ds.ReferringPhysicianName = ""
        ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = series_uid, series_number, f"AX T2 {series_number}"
        ds.Modality, ds.InstanceNumber = "MR", instance_number
        ds.ImagePositionPatient = [-120.0, -120.0, float(instance_number * 2)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 2.0
        ds.Rows = ds.Columns = rows
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.PixelData = rng.integers(0, 4096, size=(rows, rows), dtype="<u2").tobytes()
        path = study_dir / f"{series_number:03d}-{instance_number:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        total += path.stat().st_size
    return Study(label, patient_id, study_uid, tuple(files), total)


def generate(root: Path, studies: int, instances: int, big_instances: int, rows: int) -> tuple[list[Study], Study, Study, bool]:
    """(throughput studies, big study, warm-up study, reused?) under a folder keyed by the sizes."""
    key = hashlib.sha256(f"{DATA_VERSION}-{studies}-{instances}-{big_instances}-{rows}".encode()).hexdigest()[:12]
    folder = root / key
    index = folder / "index.json"
    if index.exists():
        try:
            listed = json.loads(index.read_text())
            loaded = [Study(s["label"], s["patient_id"], s["study_uid"], tuple(Path(f) for f in s["files"]), s["bytes"])
                      for s in listed]
            if all(f.exists() for s in loaded for f in s.files):
                return loaded[:-2], loaded[-2], loaded[-1], True
        except (ValueError, KeyError):
            pass
    shutil.rmtree(folder, ignore_errors=True)
    made = [_write_study(folder, f"study{i:03d}", mrn(i), instances, rows, i) for i in range(1, studies + 1)]
    made.append(_write_study(folder, "big", mrn(studies + 1), big_instances, rows, studies + 1))
    made.append(_write_study(folder, "warmup", mrn(studies + 2), 1, rows, studies + 2))
    uids = [sop_uid_of(f) for s in made for f in s.files]
    if len(set(uids)) != len(uids):
        raise BenchFailure("generated SOP Instance UIDs repeat; fix the entropy of generate_uid")
    index.write_text(json.dumps([{"label": s.label, "patient_id": s.patient_id, "study_uid": s.study_uid,
                                  "files": [str(f) for f in s.files], "bytes": s.bytes} for s in made]))
    return made[:-2], made[-2], made[-1], False


def pixel_data(path: Path) -> bytes:
    return bytes(pydicom.dcmread(path, stop_before_pixels=False).PixelData)


def sop_uid_of(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def check_received(label: str, studies: list[Study], received: dict[str, Path], total_bytes: int) -> None:
    """`received` maps SOP Instance UID -> received file; bytes may differ by each file's meta header."""
    expected = sum(len(s.files) for s in studies)
    source_bytes = sum(s.bytes for s in studies)
    if len(received) != expected:
        raise BenchFailure(f"{label} received {len(received)} instances, expected {expected}")
    if abs(total_bytes - source_bytes) > 512 * expected:
        raise BenchFailure(f"{label} received {total_bytes} bytes, the sent files hold {source_bytes}")
    for study in studies:  # one instance per study, pixel for pixel
        sample = study.files[len(study.files) // 2]
        uid = sop_uid_of(sample)
        if uid not in received:
            raise BenchFailure(f"{label} did not receive instance {uid} of {study.label}")
        if pixel_data(received[uid]) != pixel_data(sample):
            raise BenchFailure(f"{label}: the pixel data of {uid} ({study.label}) differs from what was sent")


# --- processes ------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    return {**os.environ, "TCP_NODELAY": "1"}


@contextmanager
def orthanc(folder: Path, destinations: dict[str, tuple[str, int]], ae_title: str = "ORTHANC",
            port: int | None = None) -> Iterator[RunningPacs]:
    """Orthanc as start_orthanc (tests/support/pacs.py) configures it, but without --verbose --trace-dicom:
    dumping every DIMSE message to its log costs Orthanc a third of its sending speed."""
    folder.mkdir(parents=True)
    port, http_port = port or free_port(), free_port()
    config = {
        "Name": f"mi2b2-bench-{port}", "StorageDirectory": str(folder / "storage"), "IndexDirectory": str(folder / "index"),
        "DicomAet": ae_title, "DicomPort": port, "HttpPort": http_port, "HttpServerEnabled": True,
        "RemoteAccessAllowed": False, "AuthenticationEnabled": False, "DicomCheckCalledAet": False,
        "DicomAlwaysAllowEcho": True, "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True,
        "DicomAlwaysAllowMove": True, "DicomModalities": {aet: [aet, host, p] for aet, (host, p) in destinations.items()},
        "MaximumPduLength": MAX_PDU, "TcpNoDelay": True, "DicomThreadsCount": 8, "Plugins": [],
        "StorageCompression": False, "SaveJobs": False, "DicomScuTimeout": 30,
    }
    config_path = folder / "orthanc.json"
    config_path.write_text(json.dumps(config, indent=2), encoding="utf-8")
    log_path = folder / "orthanc.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(["Orthanc", "--no-jobs", str(config_path)], cwd=folder, env=_env(),
                                   stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    pacs = RunningPacs("orthanc", ae_title, "127.0.0.1", port, http_port, folder, log_path, process)
    try:
        deadline = time.monotonic() + 30
        while True:
            if process.poll() is not None:
                raise BenchFailure(f"Orthanc exited with {process.returncode}:\n{pacs.log_tail()}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=1) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, OSError):
                pass
            if time.monotonic() > deadline:
                raise BenchFailure(f"Orthanc did not answer on its HTTP port within 30 s:\n{pacs.log_tail()}")
            time.sleep(0.1)
        yield pacs
    finally:
        stop_group(process)


@contextmanager
def storescp(folder: Path, port: int, fork: bool) -> Iterator[Path]:
    """DCMTK storescp, files written as received (+B) into folder/out; with `fork`, a process per association."""
    out = folder / "out"
    out.mkdir(parents=True)
    log_path = folder / "storescp.log"
    with log_path.open("ab") as log:
        process = subprocess.Popen(
            ["storescp", "-aet", REFERENCE_AE, "--max-pdu", str(MAX_PDU), "-dhl", "+B", *(["--fork"] if fork else []),
             "-od", str(out), str(port)],
            cwd=folder, env=_env(), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise BenchFailure(f"storescp exited with {process.returncode}:\n{log_tail(log_path)}")
            echo = subprocess.run(["echoscu", "-aec", REFERENCE_AE, "127.0.0.1", str(port)], env=_env(),
                                  capture_output=True, timeout=10, check=False)
            if echo.returncode == 0:
                break
            if time.monotonic() > deadline:
                raise BenchFailure(f"storescp did not answer C-ECHO on port {port}:\n{log_tail(log_path)}")
            time.sleep(0.1)
        yield out
    finally:
        stop_group(process)


# --- (a) reference ----------------------------------------------------------------------------


def movescu(pacs: RunningPacs, study: Study, timeout: float, destination: str = REFERENCE_AE) -> None:
    command = ["movescu", "-S", "-aet", "BENCHREF", "-aec", pacs.ae_title, "-aem", destination, "--max-pdu", str(MAX_PDU),
               "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.study_uid}", pacs.host, str(pacs.port)]
    try:
        result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        raise BenchFailure(f"movescu of {study.label} did not finish within {timeout:g} s; Orthanc log:\n"
                           f"{pacs.log_tail()}") from None
    if result.returncode != 0 or "Failed" in result.stdout + result.stderr:
        raise BenchFailure(f"movescu of {study.label} failed ({result.returncode}): {(result.stdout + result.stderr)[-1500:]}")


def files_by_sop(folder: Path) -> tuple[dict[str, Path], int]:
    found: dict[str, Path] = {}
    total = 0
    for path in folder.rglob("*"):
        if path.is_file() and not path.name.startswith((".", "incoming-")):
            found[sop_uid_of(path)] = path
            total += path.stat().st_size
    return found, total


def fsync_all(folder: Path) -> float:
    """Seconds to make storescp's files durable (it never fsyncs; mi2b2 fsyncs every file before it counts it)."""
    started = time.perf_counter()
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return time.perf_counter() - started


def move_all(pacs: RunningPacs, studies: list[Study], timeout: float, destination: str, concurrency: int) -> float:
    """C-MOVE every study to `destination`, `concurrency` at a time (as mi2b2's worker does); seconds."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(movescu, pacs, study, timeout, destination) for study in studies]:
            future.result()
    return time.perf_counter() - started


def run_reference(pacs: RunningPacs, out: Path, studies: list[Study], timeout: float,
                  concurrency: int) -> tuple[float, int, float]:
    """C-MOVE the studies into storescp; (seconds, bytes received, seconds to fsync them after)."""
    for path in out.iterdir():
        path.unlink()
    os.sync()  # start with no dirty pages from the previous run
    elapsed = move_all(pacs, studies, timeout, REFERENCE_AE, concurrency)
    durable = fsync_all(out)
    received, total = files_by_sop(out)
    check_received("storescp", studies, received, total)
    return elapsed, total, durable


# --- (b) a second Orthanc ---------------------------------------------------------------------


def orthanc_rest(receiver: RunningPacs, method: str, path: str) -> Any:
    request = urllib.request.Request(f"{receiver.http_url}{path}", method=method)
    with urllib.request.urlopen(request, timeout=120) as response:
        body = response.read()
    return json.loads(body) if body else None


def run_orthanc_receiver(pacs: RunningPacs, receiver: RunningPacs, studies: list[Study], timeout: float,
                         concurrency: int) -> tuple[float, int]:
    """C-MOVE the studies into the second Orthanc (emptied first); (seconds, bytes it stored)."""
    for study_id in orthanc_rest(receiver, "GET", "/studies"):
        orthanc_rest(receiver, "DELETE", f"/studies/{study_id}")
    os.sync()
    elapsed = move_all(pacs, studies, timeout, receiver.ae_title, concurrency)
    statistics = orthanc_rest(receiver, "GET", "/statistics")
    expected = sum(len(s.files) for s in studies)
    count, stored = int(statistics["CountInstances"]), int(statistics["TotalDiskSize"])
    if count != expected:
        raise BenchFailure(f"the second Orthanc holds {count} instances, expected {expected}")
    source_bytes = sum(s.bytes for s in studies)
    if abs(stored - source_bytes) > 512 * expected:
        raise BenchFailure(f"the second Orthanc stored {stored} bytes, the sent files hold {source_bytes}")
    return elapsed, stored


# --- (c) mi2b2 --------------------------------------------------------------------------------


def write_site(folder: Path, pacs: RunningPacs, dicom_port: int, patients: list[str], concurrency: int,
               processes: int) -> Path:
    (folder / "bench.mrns").write_text("\n".join(patients) + "\n", encoding="utf-8")
    path = folder / "mi2b2.toml"
    path.write_text(textwrap.dedent(f"""\
        [server]
        http_port = {free_port()}
        database_url = "sqlite:///mi2b2.db"
        cache_dir = "cache"

        [dicom]
        ae_title = "{MI2B2_AE}"
        port = {dicom_port}
        max_pdu = {MAX_PDU}
        processes = {processes}

        [[institutions]]
        id = "bench"

        [[institutions.departments]]
        id = "radiology"

        [[institutions.departments.pacs]]
        id = "{PACS_ID}"
        ae_title = "{pacs.ae_title}"
        host = "{pacs.host}"
        port = {pacs.port}
        query_model = "study"
        retrieve = "c-move"
        default_max_concurrent = {concurrency}

        [[institutions.departments.pacs.windows]]
        name = "wide open"
        max_concurrent = {concurrency}

        [[projects]]
        id = "{PROJECT}"
        title = "Retrieval benchmark"
        irb = "BENCH-0002"
        expires = 2099-12-31
        mrn_file = "bench.mrns"
        quota = "1 TiB"
        institutions = ["bench"]
        members = [{{ login = "bench" }}]
        """), encoding="utf-8")
    return path


def _utc(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


class RssWatch:
    """Peak resident set of mi2b2's receiver processes: every descendant of
    `mi2b2 serve` (its `mi2b2 receiver` child and, with several processes,
    that one's children sharing the port), summed: the sum of each one's
    VmHWM after a reset, cross-checked by sampling the summed VmRSS."""

    def __init__(self, pid: int) -> None:
        self.pids = self._descendants(pid)
        if not self.pids:
            raise BenchFailure("mi2b2 serve runs no receiver process to measure (is [server] receiver_process off?)")
        self.sampled_kb = 0
        self.reset_ok = False
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    @classmethod
    def _descendants(cls, pid: int) -> list[int]:
        children: list[int] = []
        with suppress(OSError, ValueError):
            children = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        return [p for child in children for p in (child, *cls._descendants(child))]

    def _status(self, pid: int, field: str) -> int:
        with open(f"/proc/{pid}/status", encoding="ascii") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
        return 0

    def _total(self, field: str) -> int:
        total = 0
        for pid in self.pids:
            with suppress(OSError, ValueError):
                total += self._status(pid, field)
        return total

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.sampled_kb = max(self.sampled_kb, self._total("VmRSS"))
            self._stop.wait(0.02)

    def __enter__(self) -> RssWatch:
        try:  # "5" resets the peak RSS (VmHWM) to the current RSS (Linux >= 4.0)
            for pid in self.pids:
                Path(f"/proc/{pid}/clear_refs").write_text("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def largest_mb(self) -> float:
        """The largest one process's peak (VmHWM), for information."""
        largest = 0
        for pid in self.pids:
            with suppress(OSError, ValueError):
                largest = max(largest, self._status(pid, "VmHWM"))
        return largest * 1024 / MB

    def peak_mb(self) -> float:
        peak = self.sampled_kb
        if self.reset_ok:
            peak = max(peak, self._total("VmHWM"))
        return peak * 1024 / MB


def retrieve(server: Mi2b2Server, token: str, studies: list[Study], timeout: float) -> tuple[float, list[dict[str, Any]]]:
    """Request `studies` in one call, wait until all completed; (seconds from the call to the last end, rows)."""
    import httpx

    with httpx.Client(base_url=server.url + "/api/v1", headers={"Authorization": f"Bearer {token}"}, timeout=120) as http:
        started_wall, started = datetime.now(UTC), time.perf_counter()
        response = http.post("/requests", json={"project": PROJECT, "pacs": PACS_ID, "priority": 0,
                                                "studies": [{"study_uid": s.study_uid} for s in studies]})
        if response.status_code != 200:
            raise BenchFailure(f"POST /requests failed: HTTP {response.status_code} {response.text[:500]}")
        report = response.json()
        ids = set(report["created"])
        if len(ids) != len(studies):
            raise BenchFailure(f"{len(ids)} of {len(studies)} requests created: {json.dumps(report)[:1000]}")
        deadline = started + timeout
        progress, progress_at = -1, time.perf_counter()
        while True:
            if server.process.poll() is not None:
                raise BenchFailure(f"mi2b2 serve exited with {server.process.returncode}:\n{server.log_tail()}")
            response = http.get(f"/projects/{PROJECT}/requests", params={"limit": 100000})
            if response.status_code != 200:
                raise BenchFailure(f"GET requests failed: HTTP {response.status_code} {response.text[:500]}")
            rows = [r for r in response.json() if r["id"] in ids]
            ended = [r for r in rows if r["state"] not in ("scheduled", "processing")]
            bad = [r for r in ended if r["state"] != "completed"]
            if bad:
                raise BenchFailure(f"request {bad[0]['id']} ended {bad[0]['state']}: {bad[0]['last_error']}\n"
                                   f"server log tail:\n{server.log_tail()}")
            if len(ended) == len(ids):
                break
            now = time.perf_counter()
            received = sum(r["received"] for r in rows)
            if received != progress:
                progress, progress_at = received, now
            if now - progress_at > STALL_SECONDS or now > deadline:
                states = {r["id"]: (r["state"], r["received"], r["waiting_reason"]) for r in rows}
                why = f"no progress for {now - progress_at:.0f} s" if now <= deadline else f"timeout of {timeout:g} s"
                raise BenchFailure(f"retrieval stalled at {received} instances ({why}); requests: {states}\n"
                                   f"server log tail:\n{server.log_tail()}")
            time.sleep(POLL_SECONDS)
    last_end = max(_utc(r["ended_at"]) for r in rows)
    return (last_end - started_wall).total_seconds(), rows


def cache_files(cache: Path, studies: list[Study]) -> tuple[dict[str, Path], int]:
    found: dict[str, Path] = {}
    total = 0
    for study in studies:
        for path in (cache / PROJECT / study.study_uid).rglob("*.dcm"):
            found[path.name.removesuffix(".dcm")] = path
            total += path.stat().st_size
    return found, total


def check_mi2b2(studies: list[Study], rows: list[dict[str, Any]], cache: Path) -> int:
    expected = sum(len(s.files) for s in studies)
    if sum(r["received"] for r in rows) != expected:
        raise BenchFailure(f"mi2b2 counted {sum(r['received'] for r in rows)} received instances, expected {expected}")
    received, total = cache_files(cache, studies)
    check_received("mi2b2", studies, received, total)
    if sum(r["bytes"] for r in rows) != total:
        raise BenchFailure(f"mi2b2 counted {sum(r['bytes'] for r in rows)} bytes, its cache holds {total}")
    return total


def run_mi2b2(server: Mi2b2Server, token: str, studies: list[Study], cache: Path, timeout: float) -> tuple[float, int]:
    """Request the studies in one call (emptying them from the cache first); (seconds, bytes received)."""
    import httpx

    headers = {"Authorization": f"Bearer {token}"}
    response = httpx.post(f"{server.url}/api/v1/projects/{PROJECT}/cache/delete", headers=headers, timeout=120,
                          json={"study_uids": [s.study_uid for s in studies]})
    if response.status_code not in (200, 404):  # 404: none of them cached (the first run)
        raise BenchFailure(f"emptying the cache failed: HTTP {response.status_code} {response.text[:500]}")
    os.sync()
    seconds, rows = retrieve(server, token, studies, timeout)
    return seconds, check_mi2b2(studies, rows, cache)


def figures(label: str, count: int, runs: list[tuple[float, int]]) -> float:
    """Print the best run (and every run when there are several); its MB/s."""
    seconds, got = min(runs, key=lambda run: run[0] / run[1])
    rate = got / MB / seconds
    every = f" (best of {len(runs)}: " + ", ".join(f"{g / MB / s:.1f}" for s, g in runs) + " MB/s)" if len(runs) > 1 else ""
    print(f"{label}: {count} studies, {got / MB:.1f} MB in {seconds:.2f} s = {rate:.1f} MB/s{every}", flush=True)
    return rate


# --- main ---------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--studies", type=int, default=14, help="studies timed on each side (default 14: 1.1 GB)")
    parser.add_argument("--instances", type=int, default=150, help="instances per study (default 150)")
    parser.add_argument("--big-gb", type=float, default=1.0, help="size of the study for the memory figure, GB (default 1.0)")
    parser.add_argument("--rows", type=int, default=512, help="rows = columns of each 16-bit slice (default 512)")
    parser.add_argument("--processes", type=int, default=2, help="mi2b2's receiver processes on the port (default 2)")
    parser.add_argument("--concurrency", type=int, default=4, help="C-MOVEs at a time, mi2b2's max_concurrent (default 4)")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per side, alternating; the best counts (default 3)")
    parser.add_argument("--timeout", type=float, default=900.0, help="seconds each timed phase may take (default 900)")
    parser.add_argument("--data-dir", type=Path, default=Path(tempfile.gettempdir()) / "mi2b2-bench-retrieve-data",
                        help="where generated studies are kept between runs")
    parser.add_argument("--keep", action="store_true", help="keep the work folder (logs, caches) for inspection")
    args = parser.parse_args()
    for tool in ("Orthanc", "storescp", "storescu", "movescu", "echoscu"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool}: apt-get install -y dcmtk orthanc")
    slice_bytes = args.rows * args.rows * 2
    big_instances = max(1, round(args.big_gb * 1e9 / slice_bytes))

    root = Path(tempfile.mkdtemp(prefix="mi2b2-bench-retrieve-"))
    try:
        with ExitStack() as stack:
            t0 = time.perf_counter()
            studies, big, warmup, reused = generate(args.data_dir, args.studies, args.instances, big_instances, args.rows)
            t1 = time.perf_counter()
            reference_port, dicom_port, orthanc_port = free_port(), free_port(), free_port()
            pacs = stack.enter_context(orthanc(root / "orthanc", {
                REFERENCE_AE: ("127.0.0.1", reference_port), MI2B2_AE: ("127.0.0.1", dicom_port),
                ORTHANC_RECEIVER_AE: ("127.0.0.1", orthanc_port)}))
            pacs.load([f for s in [*studies, big, warmup] for f in s.files])
            t2 = time.perf_counter()
            print(f"setup: {len(studies)} studies x {args.instances} instances ({sum(s.bytes for s in studies) / MB:.1f} MB) "
                  f"+ 1 study x {big_instances} ({big.bytes / MB:.1f} MB) {'reused' if reused else 'generated'} in "
                  f"{t1 - t0:.1f} s, loaded into Orthanc in {t2 - t1:.1f} s; {args.concurrency} C-MOVEs at a time, "
                  f"mi2b2 with {args.processes} receiver process{'es' if args.processes > 1 else ''}", flush=True)

            out = stack.enter_context(storescp(root / "storescp", reference_port, fork=args.processes > 1))
            receiver = stack.enter_context(orthanc(root / "orthanc2", {}, ORTHANC_RECEIVER_AE, orthanc_port))
            site = root / "site"
            site.mkdir()
            config_path = write_site(site, pacs, dicom_port, [s.patient_id for s in [*studies, big, warmup]],
                                     args.concurrency, args.processes)
            token = researcher_token(config_path)
            server = stack.enter_context(mi2b2_server(config_path, env=_env()))
            cache = load_config(config_path).cache_dir()
            # untimed warm-ups: first association, first C-MOVE, imports
            movescu(pacs, warmup, args.timeout)
            movescu(pacs, warmup, args.timeout, ORTHANC_RECEIVER_AE)
            retrieve(server, token, [warmup], args.timeout)

            reference_runs: list[tuple[float, int]] = []
            fsync_seconds: list[float] = []
            orthanc_runs: list[tuple[float, int]] = []
            our_runs: list[tuple[float, int]] = []
            for _ in range(args.repeat):  # alternating, so that all see the same machine
                seconds, got, durable = run_reference(pacs, out, studies, args.timeout, args.concurrency)
                reference_runs.append((seconds, got))
                fsync_seconds.append(durable)
                orthanc_runs.append(run_orthanc_receiver(pacs, receiver, studies, args.timeout, args.concurrency))
                our_runs.append(run_mi2b2(server, token, studies, cache, args.timeout))
            reference_rate = figures(f"reference, DCMTK storescp{' --fork' if args.processes > 1 else ''}",
                                     len(studies), reference_runs)
            best = reference_runs.index(min(reference_runs, key=lambda run: run[0] / run[1]))
            seconds, got = reference_runs[best]
            durable_rate = got / MB / (seconds + fsync_seconds[best])
            print(f"  (storescp never fsyncs; fsyncing its files afterwards took {fsync_seconds[best]:.2f} s more: "
                  f"{durable_rate:.1f} MB/s durable; per run: "
                  + ", ".join(f"{f:.2f} s" for f in fsync_seconds) + ")")
            orthanc_rate = figures("second Orthanc as the receiver", len(studies), orthanc_runs)
            rate = figures(f"mi2b2, {args.processes} receiver process{'es' if args.processes > 1 else ''}",
                           len(studies), our_runs)

            # memory while receiving the big study alone
            os.sync()
            with RssWatch(server.process.pid) as watch:
                big_seconds, big_rows = retrieve(server, token, [big], args.timeout)
            big_got = check_mi2b2([big], big_rows, cache)
            print(f"mi2b2, one big study: {big_got / MB:.1f} MB in {big_seconds:.2f} s = {big_got / MB / big_seconds:.1f} MB/s")
            together = f"the {len(watch.pids)} receiver processes together; " if len(watch.pids) > 1 else ""
            print(f"rss_mb: {watch.peak_mb():.0f} ({together}the largest alone {watch.largest_mb():.0f})")
            print(f"vs_orthanc: {rate / orthanc_rate:.3f}")
            print(f"durable_ratio: {rate / durable_rate:.3f}")
            print(f"ratio: {rate / reference_rate:.3f}")
    finally:
        if args.keep:
            print(f"work folder kept: {root}", file=sys.stderr)
        else:
            shutil.rmtree(root, ignore_errors=True)


def _terminate(_signum: int, _frame: object) -> None:
    raise SystemExit(143)  # unwinds through the context managers, which stop every process


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, _terminate)
    signal.signal(signal.SIGINT, signal.default_int_handler)  # also when started with SIGINT ignored (a background job)
    try:
        main()
    except BenchFailure as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print("interrupted; stopped everything it started", file=sys.stderr)
        sys.exit(130)
