"""Hostile requests against a real `python -m mi2b2 serve`: a backtracking wildcard, a frame list that
repeats one frame thousands of times, a 200 MB body without credentials. Each must answer at once, keep
the server answering everyone else, and leave the server's memory (its RSS, read from /proc) where it was.

Every wait is bounded: a server that hangs fails these tests, it does not hang the suite."""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import requests
from pydicom.datadict import DicomDictionary
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from mi2b2.config import load_config
from mi2b2.services.context import build_context
from mi2b2.services.dicomweb.query import MAX_FRAMES, MAX_LIMIT, MAX_PARAMETERS, MAX_PATTERN_CHARS
from support.server import Mi2b2Server, start_server
from support.site import write_site
from support.viewing import Cached, fill, free_port, place

MIB = 1024 * 1024
TIMEOUT = 20  # seconds any one answer may take here; the old code's wildcard took minutes
BIG_STUDY = "1.2.826.0.1.3680043.8.498.77001"
BIG_SERIES = BIG_STUDY + ".1"
FRAME_ROWS = 256  # two 16-bit frames of 256 x 256: 128 KiB each, a 263 KB file


@dataclass
class Live:
    server: Mi2b2Server
    cached: Cached
    big_sop: str

    @property
    def url(self) -> str:
        return self.server.url

    def headers(self, login: str = "alice") -> dict[str, str]:
        return self.cached.headers(login)


def two_frame_image(folder: Path) -> Path:
    """A native (uncompressed) two-frame image of PAT004, large frames: what repeated frame lists multiply."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # multi-frame grayscale word secondary capture
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["hostile", "two frames"])
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.PatientID, ds.PatientName = "PAT004", "SAMPLE^PATIENT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = BIG_STUDY, BIG_SERIES
    ds.StudyDate, ds.Modality, ds.AccessionNumber = "20240303", "OT", "ACC-BIG"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.Rows = ds.Columns = FRAME_ROWS
    ds.NumberOfFrames = 2
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.random.default_rng(7).integers(0, 4096, (2, FRAME_ROWS, FRAME_ROWS), dtype=np.uint16).tobytes()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "two-frames.dcm"
    ds.save_as(path, enforce_file_format=True)
    return path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("hostile")
    site = write_site(folder / "site")
    site.write_text(site.read_text().replace(
        "[server]\n", f"[server]\nhttp_port = {free_port()}\nrun_worker = false\nrun_receiver = false\n", 1))
    ctx = build_context(load_config(site))
    try:
        cached = fill(ctx, folder / "files")
        big = place(ctx, "alpha", two_frame_image(folder / "big"))
    finally:
        ctx.engine.dispose()
    server = start_server(site)
    try:
        yield Live(server, cached, big.stem)
    finally:
        server.stop()


# --- measuring the server ---------------------------------------------------------------------------


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc")


class PeakRss:
    """The highest RSS of a process while the block runs (sampled every 5 ms), above its RSS before."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.before = self.peak = rss_bytes(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes(self.pid))
            time.sleep(0.005)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        time.sleep(0.3)  # what the request left behind counts too
        self._stop.set()
        self._thread.join(timeout=5)

    @property
    def growth(self) -> int:
        return self.peak - self.before


def raw_post(port: int, path: str, head: dict[str, str], body: Callable[[socket.socket], None]) -> tuple[int, dict]:  # type: ignore[type-arg]
    """Send a request whose body `body` writes while the answer is read: a server that answers before
    reading the body (as it must, for a body it refuses) is heard even while the body is still going."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=TIMEOUT)
    try:
        lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", *(f"{k}: {v}" for k, v in head.items()), "", ""]
        sock.sendall("\r\n".join(lines).encode())

        def pump() -> None:
            with contextlib.suppress(OSError):  # the server closed the connection: it will not read the rest
                body(sock)

        sender = threading.Thread(target=pump, daemon=True)
        sender.start()
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(65536)
            assert chunk, f"the server closed the connection without an answer: {answer!r}"
            answer += chunk
        header, _, rest = answer.partition(b"\r\n\r\n")
        status = int(header.split()[1])
        length = next(int(line.split(b":")[1]) for line in header.split(b"\r\n") if line.lower().startswith(b"content-length"))
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
        sender.join(timeout=TIMEOUT)
        return status, json.loads(rest[:length])
    finally:
        sock.close()


def zeros(total: int) -> Callable[[socket.socket], None]:
    def send(sock: socket.socket) -> None:
        block = b"0" * MIB
        for _ in range(total // MIB):
            sock.sendall(block)
    return send


def chunked_zeros(total: int) -> Callable[[socket.socket], None]:
    def send(sock: socket.socket) -> None:
        block = b"%x\r\n" % MIB + b"0" * MIB + b"\r\n"
        for _ in range(total // MIB):
            sock.sendall(block)
        sock.sendall(b"0\r\n\r\n")
    return send


# --- request bodies ---------------------------------------------------------------------------------


def test_a_200_mb_body_without_credentials_is_refused_before_it_is_read(live: Live) -> None:
    port = live.server.http_port
    with PeakRss(live.server.process.pid) as memory:
        status, answer = raw_post(port, "/api/v1/auth/login", {"Content-Type": "application/json",
                                                               "Content-Length": str(200 * MIB)}, zeros(200 * MIB))
    assert status == 413 and "max_body" in answer["error"], answer
    assert memory.growth < 8 * MIB, f"the server grew by {memory.growth / MIB:.0f} MiB"

    # Without a length to judge by, it stops reading at the limit for callers it does not know.
    with PeakRss(live.server.process.pid) as memory:
        status, answer = raw_post(port, "/api/v1/search/patients", {
            "Content-Type": "application/json", "Transfer-Encoding": "chunked",
            "Authorization": "Bearer not-a-token"}, chunked_zeros(200 * MIB))
    assert status == 413 and "max_anonymous_body" in answer["error"], answer
    assert memory.growth < 8 * MIB, f"the server grew by {memory.growth / MIB:.0f} MiB"


def test_a_known_caller_may_send_more_but_not_without_limit(live: Live) -> None:
    port = live.server.http_port
    body = json.dumps({"ids": [], "all": True}).encode() + b" " * (100 * 1024)
    assert len(body) > 64 * 1024  # over the anonymous limit, far under the authenticated one
    anonymous = requests.post(f"{live.url}/api/v1/notifications/read", data=body, timeout=TIMEOUT,
                              headers={"Content-Type": "application/json"})
    assert anonymous.status_code == 413 and "max_anonymous_body" in anonymous.json()["error"]
    known = requests.post(f"{live.url}/api/v1/notifications/read", data=body, timeout=TIMEOUT,
                          headers={"Content-Type": "application/json", **live.headers()})
    assert known.status_code == 200, known.text[:300]
    with PeakRss(live.server.process.pid) as memory:
        status, answer = raw_post(port, "/api/v1/notifications/read", {
            "Content-Type": "application/json", "Content-Length": str(200 * MIB), **live.headers()}, zeros(200 * MIB))
    assert status == 413 and "64 MiB" in answer["error"], answer
    assert memory.growth < 8 * MIB


# --- WADO-RS frames ---------------------------------------------------------------------------------


def test_a_frame_list_repeating_frames_is_sent_once_per_frame_in_bounded_memory(live: Live) -> None:
    url = (f"{live.url}/dicomweb/projects/alpha/studies/{BIG_STUDY}/series/{BIG_SERIES}/instances/{live.big_sop}"
           "/frames/")
    accept = {"Accept": 'multipart/related; type="application/octet-stream"', **live.headers()}
    once = requests.get(url + "1,2", headers=accept, timeout=TIMEOUT)  # warm: modules loaded, caches filled
    assert once.status_code == 200
    frame_bytes = 2 * FRAME_ROWS * FRAME_ROWS
    with PeakRss(live.server.process.pid) as memory:
        repeated = requests.get(url + ",".join(["1", "2"] * 1000), headers=accept, timeout=TIMEOUT)
    assert repeated.status_code == 200
    assert repeated.content.count(b"Content-Type: application/octet-stream") == 2  # each frame once
    assert len(repeated.content) < 2 * frame_bytes + 4096
    assert memory.growth < 32 * MIB, f"the server grew by {memory.growth / MIB:.0f} MiB for two frames"

    too_many = requests.get(url + ",".join(["1"] * 4001), headers=accept, timeout=TIMEOUT)
    assert too_many.status_code == 400 and str(MAX_FRAMES) in too_many.json()["error"]


# --- QIDO-RS ----------------------------------------------------------------------------------------


def test_every_query_parameter_has_a_limit_named_in_a_400(live: Live) -> None:
    studies = f"{live.url}/dicomweb/projects/alpha/studies"

    def ask(params: object) -> requests.Response:
        return requests.get(studies, params=params, headers=live.headers(), timeout=TIMEOUT)  # type: ignore[arg-type]

    cases = {
        str(MAX_PATTERN_CHARS): {"PatientName": "*?" * MAX_PATTERN_CHARS},
        str(MAX_LIMIT): {"limit": str(MAX_LIMIT + 1)},
        "1000000": {"offset": "9" * 40},
        str(MAX_PARAMETERS): [("PatientID", str(n)) for n in range(MAX_PARAMETERS + 1)],
        "200": {"includefield": ",".join(entry[4] for entry in list(DicomDictionary.values())[:250] if entry[4])},
    }
    for limit, params in cases.items():
        answer = ask(params)
        assert answer.status_code == 400 and limit in answer.json()["error"], (params, answer.text)
    assert ask({"limit": str(MAX_LIMIT)}).status_code == 200


# Last in the module: on code that backtracks, this leaves the server stuck (the fixture then kills it).
def test_a_backtracking_wildcard_answers_at_once_and_the_server_keeps_answering(live: Live) -> None:
    studies = f"{live.url}/dicomweb/projects/alpha/studies"
    result: dict[str, object] = {}

    def search() -> None:
        try:
            answer = requests.get(studies, params={"StudyInstanceUID": "*?" * 30 + "x"}, headers=live.headers(),
                                  timeout=TIMEOUT)
            result["status"], result["body"] = answer.status_code, answer.json()
        except requests.RequestException as exc:
            result["error"] = exc

    started = time.monotonic()
    worker = threading.Thread(target=search, daemon=True)
    worker.start()
    time.sleep(0.2)
    try:
        health = requests.get(f"{live.url}/api/v1/health", timeout=5)
    except requests.Timeout:
        pytest.fail("/api/v1/health did not answer within 5 s while a wildcard search ran")
    assert health.status_code == 200
    worker.join(timeout=TIMEOUT + 5)
    assert result.get("status") == 200 and result["body"] == [], result
    assert time.monotonic() - started < 5
    # and wildcards still match what they should
    found = requests.get(studies, params={"StudyInstanceUID": "1.2.826.0.1.3680043.8.498.77*?"},
                         headers=live.headers(), timeout=TIMEOUT).json()
    assert [s["0020000D"]["Value"][0] for s in found] == [BIG_STUDY]
    assert os.path.exists(f"/proc/{live.server.process.pid}")
