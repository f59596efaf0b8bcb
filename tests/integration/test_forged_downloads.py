"""Forged downloads: names that would write (or read) outside the folder the researcher chose.

age does not authenticate the sender: anyone holding a researcher's public key can build an encrypted
download that decrypts cleanly. These are built exactly so, with the Debian `age` tool and the public key
only. A lying server (or whatever answers at its address) can likewise name any path in a folder
download's listing. `mi2b2 decrypt`, `mi2b2 view` and `mi2b2 download` must refuse, say why, and write
nothing at all, inside the target or out of it."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

CLI_TIMEOUT = 90
LEGIT = "P1/20240101_ACC1/001_MR/0001.dcm"  # listed first: not even this may be written


def run_cli(*args: str, timeout: float = CLI_TIMEOUT) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "200"}
    if env.get("PYTHONPATH"):
        env["PYTHONPATH"] = os.pathsep.join(str(Path(p).resolve()) for p in env["PYTHONPATH"].split(os.pathsep) if p)
    return subprocess.run([sys.executable, "-m", "mi2b2", *args], capture_output=True, text=True, timeout=timeout,
                          env=env, stdin=subprocess.DEVNULL)


def every_file(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


@dataclass
class Key:
    file: Path  # the researcher's private key
    public: str  # all the forger has


@pytest.fixture
def key(tmp_path: Path) -> Key:
    file = tmp_path / "keys" / "researcher.txt"
    file.parent.mkdir()
    subprocess.run(["age-keygen", "-o", str(file)], check=True, capture_output=True)
    public = next(line.split(": ", 1)[1] for line in file.read_text().splitlines() if line.startswith("# public key"))
    return Key(file, public)


def age_encrypt(data: bytes, public: str) -> bytes:
    return subprocess.run(["age", "-r", public], input=data, capture_output=True, check=True).stdout


def tiny_image(n: int) -> bytes:
    """A real DICOM image, so that a viewer that does not refuse the download would show it."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = f"1.2.3.4.{n}"
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.PatientID = "1.2.3", "1.2.3.4", "P1"
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = bytes(range(64))
    buffer = DicomBytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def forge(folder: Path, public: str, files: list[tuple[str, str]], stored_in: Path | None = None) -> Path:
    """An encrypted download as mi2b2 makes one, naming (stored name, readable path) pairs; the image
    files are written where the stored names point (from `stored_in`, the folder by default)."""
    folder.mkdir(parents=True)
    entries = []
    for n, (stored, readable) in enumerate(files, start=1):
        data = tiny_image(n)
        target = (stored_in or folder) / stored
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(age_encrypt(data, public))
        entries.append({"path": stored, "readable": readable, "sha256": hashlib.sha256(data).hexdigest(),
                        "size": len(data), "study_uid": "1.2.3", "series_uid": "1.2.3.4", "sop_uid": f"1.2.3.4.{n}"})
    manifest = {"format": "mi2b2-download/1", "project": "alpha", "mode": "recipients", "name_key": "00" * 32,
                "recipients": [public], "created_at": "2026-01-01T00:00:00Z", "files": entries}
    (folder / "manifest.age").write_bytes(age_encrypt(json.dumps(manifest).encode(), public))
    return folder


STORED = "aaaaaaaaaaaaaaaa/bbbbbbbbbbbbbbbb/{n:04d}.dcm.age"


def escapes(tmp_path: Path) -> dict[str, str]:
    """Readable paths a forger would like mi2b2 to write, by kind."""
    site_packages = tmp_path / "venv" / "lib" / "python3.11" / "site-packages"
    site_packages.mkdir(parents=True)
    return {
        "dot-dot": "../escaped.dcm",
        "absolute": str(tmp_path / "elsewhere" / "absolute.dcm"),
        "pth-in-a-virtualenv": "../venv/lib/python3.11/site-packages/mi2b2_forged.pth",
        "pth-inside": "forged.pth",
        "backslash": "..\\escaped.dcm",
        "nul": "P1/x\x00.dcm",
    }


KINDS = ["dot-dot", "absolute", "pth-in-a-virtualenv", "pth-inside", "backslash", "nul"]


@pytest.mark.parametrize("kind", KINDS)
def test_decrypt_refuses_a_forged_manifest_and_writes_nothing(tmp_path: Path, key: Key, kind: str) -> None:
    bad = escapes(tmp_path)[kind]
    source = forge(tmp_path / "download", key.public, [(STORED.format(n=1), LEGIT), (STORED.format(n=2), bad)])
    before = every_file(tmp_path)
    done = run_cli("decrypt", str(source), "--to", str(tmp_path / "out"), "--identity", str(key.file))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "refused and nothing was written" in output, output
    assert every_file(tmp_path) == before  # not the escape, not the legitimate file, not even --to


def test_decrypt_does_not_follow_a_symbolic_link_out_of_the_target(tmp_path: Path, key: Key) -> None:
    (tmp_path / "elsewhere").mkdir()
    out = tmp_path / "out"
    out.mkdir()
    (out / "P1").symlink_to(tmp_path / "elsewhere")  # planted earlier, or by a previous forged download
    source = forge(tmp_path / "download", key.public, [(STORED.format(n=1), "P0/0001.dcm"),
                                                       (STORED.format(n=2), LEGIT)])
    before = every_file(tmp_path)
    done = run_cli("decrypt", str(source), "--to", str(out), "--identity", str(key.file))
    assert done.returncode != 0 and "symbolic link" in done.stdout + done.stderr, done.stdout + done.stderr
    assert every_file(tmp_path) == before


def test_a_proper_download_still_decrypts(tmp_path: Path, key: Key) -> None:
    source = forge(tmp_path / "download", key.public, [(STORED.format(n=1), LEGIT)])
    done = run_cli("decrypt", str(source), "--to", str(tmp_path / "out"), "--identity", str(key.file))
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out" / LEGIT).read_bytes() == tiny_image(1)


@pytest.mark.parametrize("stored", ["../outside.dcm.age", "dot-dot"])
def test_view_refuses_a_forged_download_at_once(tmp_path: Path, key: Key, stored: str) -> None:
    """`mi2b2 view` writes nothing, but must not read outside the download either, nor serve a forged one."""
    if stored == "dot-dot":
        source = forge(tmp_path / "download", key.public, [(STORED.format(n=1), "../escaped.dcm")])
    else:  # the stored name reaches out of the download, to a file the forger placed beside it
        source = forge(tmp_path / "download", key.public, [(stored, LEGIT)], stored_in=tmp_path / "download")
    try:
        done = run_cli("view", str(source), "--identity", str(key.file), timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("mi2b2 view served a forged download instead of refusing it")
    assert done.returncode != 0 and "was refused" in done.stdout + done.stderr, done.stdout + done.stderr


# --- a lying server -----------------------------------------------------------------------------


def tar_of(members: list[tuple[str, bytes]]) -> bytes:
    """A batch answer as an mi2b2 server makes it: one tar member per file, named by its SOP UID."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


class HostileServer:
    """Answers the calls of a folder download with a listing, and files, of its choosing."""

    def __init__(self, files: list[dict[str, object]], data: bytes, rename: dict[str, str] | None = None) -> None:
        listing = {"studies": [{"study_uid": "1.2.3", "download_id": 1}], "files": files,
                   "created_at": "2026-01-01T00:00:00Z"}
        asked: list[str] = []
        self.asked = asked

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                request = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
                asked.append(self.path)
                if self.path.endswith("/download/manifest"):
                    body, kind = json.dumps(listing).encode(), "application/json"
                else:  # each file asked for, under the name the server chooses
                    names = [f["sop_uid"] for f in request["files"]]
                    body, kind = tar_of([((rename or {}).get(n, n), data) for n in names]), "application/x-tar"
                self.send_response(200)
                self.send_header("Content-Type", kind)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: object) -> None:
                pass

        self.http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.http.server_address[1]}"
        self.thread = threading.Thread(target=self.http.serve_forever, daemon=True)

    def __enter__(self) -> HostileServer:
        self.thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.http.shutdown()
        self.http.server_close()


@pytest.fixture
def image() -> Iterator[bytes]:
    yield b"\0" * 128 + b"DICM" + b"a forged image"


def listed(path: str, data: bytes, number: str = "0001", sop: str = "1.2.3.4.5") -> dict[str, object]:
    return {"path": path, "number": number, "study_uid": "1.2.3", "series_uid": "1.2.3.4", "sop_uid": sop,
            "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@pytest.mark.parametrize("encrypted", [False, True], ids=["plain", "encrypted"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_folder_download_refuses_a_lying_servers_paths_and_writes_nothing(
    tmp_path: Path, key: Key, image: bytes, kind: str, encrypted: bool
) -> None:
    bad = escapes(tmp_path)[kind]
    files = [listed(LEGIT, image), listed(bad, image, "0002", "1.2.3.4.6")]
    before = every_file(tmp_path)
    with HostileServer(files, image) as server:
        done = run_cli("download", "alpha", "1.2.3", "--to", str(tmp_path / "out"), "--server", server.url,
                       "--token", "t", *(["--recipient", key.public] if encrypted else []))
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "nothing was written" in output, output
    assert every_file(tmp_path) == before
    assert not any(path.endswith("/files") for path in server.asked)  # refused before fetching an image


def test_an_encrypted_folder_download_refuses_a_file_number_that_is_a_path(tmp_path: Path, key: Key,
                                                                          image: bytes) -> None:
    before = every_file(tmp_path)
    with HostileServer([listed(LEGIT, image, "../../../escaped")], image) as server:
        done = run_cli("download", "alpha", "1.2.3", "--to", str(tmp_path / "out"), "--server", server.url,
                       "--token", "t", "--recipient", key.public)
    assert done.returncode != 0 and "nothing was written" in done.stdout + done.stderr, done.stdout + done.stderr
    assert every_file(tmp_path) == before


def test_a_truthful_listing_still_downloads(tmp_path: Path, image: bytes) -> None:
    with HostileServer([listed(LEGIT, image)], image) as server:
        done = run_cli("download", "alpha", "1.2.3", "--to", str(tmp_path / "out"), "--server", server.url,
                       "--token", "t")
    assert done.returncode == 0, done.stdout + done.stderr
    assert (tmp_path / "out" / LEGIT).read_bytes() == image


@pytest.mark.parametrize("sent_as", ["../../escaped.dcm", "1.2.3.4.99", "/etc/passwd"])
def test_a_folder_download_refuses_files_sent_under_another_name(tmp_path: Path, image: bytes, sent_as: str) -> None:
    """The batch answer's member names are only checked against the file due, never used as paths."""
    before = every_file(tmp_path)
    with HostileServer([listed(LEGIT, image)], image, rename={"1.2.3.4.5": sent_as}) as server:
        done = run_cli("download", "alpha", "1.2.3", "--to", str(tmp_path / "out"), "--server", server.url,
                       "--token", "t")
    output = done.stdout + done.stderr
    assert done.returncode != 0 and "where 1.2.3.4.5 was due" in output, output
    assert "Traceback" not in output
    written = every_file(tmp_path) - before
    assert not any(path.endswith(".dcm") for path in written), written
