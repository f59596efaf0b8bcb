"""WADO-RS transfer syntaxes against a real server on 127.0.0.1: PS3.18's default (Explicit VR Little
Endian, compressed instances decoded), OHIF's ``transfer-syntax=*`` (byte for byte as stored), and 406
for what mi2b2 cannot produce. Checked independently with DCMTK's dcmdump."""

from __future__ import annotations

import io
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from mi2b2.api.app import create_app
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.testing import FakeClock
from support.site import load_site
from support.viewing import SAMPLE_STUDY, Cached, fill, place, serving

ELE = "1.2.840.10008.1.2.1"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
MPEG2 = "1.2.840.10008.1.2.4.100"  # no decoder for it is installed
JPEG_SERIES = SAMPLE_STUDY + ".7"
NO_DECODER_SERIES = SAMPLE_STUDY + ".8"
DICOM = 'multipart/related; type="application/dicom"'


def sample_in(series_uid: str, folder: Path, syntax: str | None = None) -> Path:
    """pydicom's JPEG baseline RGB sample as an instance of the sample study (optionally claiming ``syntax``)."""
    path = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    assert path is not None
    ds = dcmread(path)
    ds.PatientID, ds.PatientName = "PAT004", "SAMPLE^PATIENT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = SAMPLE_STUDY, series_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(entropy_srcs=[series_uid])
    if syntax:
        ds.file_meta.TransferSyntaxUID = syntax
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{series_uid}.dcm"
    ds.save_as(out, enforce_file_format=True)
    return out


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> ServiceContext:
    return build_context(load_site(tmp_path / "site", database_url=database_url), clock=FakeClock())


@pytest.fixture
def cached(ctx: ServiceContext, tmp_path: Path) -> Cached:
    seeded = fill(ctx, tmp_path / "files")
    for series_uid, syntax in ((JPEG_SERIES, None), (NO_DECODER_SERIES, MPEG2)):
        stored = place(ctx, "alpha", sample_in(series_uid, tmp_path / "extra", syntax))
        seeded.files[dcmread(stored, stop_before_pixels=True).SOPInstanceUID] = stored
    return seeded


@pytest.fixture
def server(ctx: ServiceContext, cached: Cached) -> Iterator[str]:
    with serving(create_app(ctx)) as url:
        yield url


def only_sop(cached: Cached, series_uid: str) -> str:
    return next(sop for sop, path in cached.files.items() if f"/{series_uid}/" in path.as_posix())


def parts(response: requests.Response) -> list[tuple[str, bytes]]:
    """Each part's Content-Type and body, cut by the Content-Length each part declares."""
    boundary = response.headers["content-type"].split("boundary=")[1].strip('"').encode()
    data, found, at = response.content, [], 0
    while data.startswith(b"--" + boundary + b"\r\n", at):
        head_end = data.index(b"\r\n\r\n", at)
        headers = dict(line.split(": ", 1) for line in data[at:head_end].decode().split("\r\n")[1:])
        start = head_end + 4
        end = start + int(headers["Content-Length"])
        found.append((headers["Content-Type"], data[start:end]))
        assert data[end:end + 2] == b"\r\n"
        at = end + 2
    assert data[at:] == b"--" + boundary + b"--\r\n"  # closed: no part half-written
    return found


def get(server: str, cached: Cached, path: str, accept: str) -> requests.Response:
    return requests.get(f"{server}/dicomweb/projects/alpha/studies/{path}",
                        headers={**cached.headers("alice"), "Accept": accept}, timeout=60)


def dcmdump_syntax(data: bytes, folder: Path) -> str:
    """The transfer syntax as DCMTK reads it from the file, not as pydicom does."""
    dcmdump = shutil.which("dcmdump")
    if dcmdump is None:
        pytest.skip("DCMTK dcmdump is not installed")
    file = folder / f"part-{len(list(folder.iterdir()))}.dcm"
    file.write_bytes(data)
    shown = subprocess.run([dcmdump, "+P", "0002,0010", str(file)], capture_output=True, text=True, check=True)
    return shown.stdout.split("=", 1)[1].split()[0]


def test_no_transfer_syntax_parameter_gets_explicit_vr_little_endian(server: str, cached: Cached,
                                                                     tmp_path: Path) -> None:
    sop = only_sop(cached, JPEG_SERIES)
    response = get(server, cached, f"{SAMPLE_STUDY}/series/{JPEG_SERIES}/instances/{sop}", DICOM)
    assert response.status_code == 200
    ((content_type, body),) = parts(response)
    assert content_type == f"application/dicom; transfer-syntax={ELE}"
    sent, stored = dcmread(io.BytesIO(body)), dcmread(cached.files[sop])
    assert stored.file_meta.TransferSyntaxUID == JPEG_BASELINE
    assert sent.file_meta.TransferSyntaxUID == ELE and sent.SOPInstanceUID == sop
    assert np.array_equal(sent.pixel_array, stored.pixel_array)
    assert dcmdump_syntax(body, tmp_path) == "LittleEndianExplicit"


def test_a_whole_study_by_default_is_all_explicit_vr_little_endian(server: str, cached: Cached) -> None:
    web = DICOMwebClient(url=f"{server}/dicomweb/projects/alpha", headers=cached.headers("alice"))
    decodable = [sop for sop, path in cached.files.items()
                 if f"/{SAMPLE_STUDY}/" in path.as_posix() and f"/{NO_DECODER_SERIES}/" not in path.as_posix()]
    for series_uid in {cached.files[sop].parent.name for sop in decodable}:
        for ds in web.retrieve_series(SAMPLE_STUDY, series_uid):  # dicomweb-client asks with no transfer-syntax
            stored = dcmread(cached.files[ds.SOPInstanceUID])
            assert ds.file_meta.TransferSyntaxUID == ELE
            assert np.array_equal(ds.pixel_array, stored.pixel_array)


def test_star_gets_the_stored_bytes(server: str, cached: Cached, tmp_path: Path) -> None:
    sop = only_sop(cached, JPEG_SERIES)
    response = get(server, cached, f"{SAMPLE_STUDY}/series/{JPEG_SERIES}", f"{DICOM}; transfer-syntax=*")
    ((content_type, body),) = parts(response)
    assert content_type == f"application/dicom; transfer-syntax={JPEG_BASELINE}"
    assert body == cached.files[sop].read_bytes()
    assert dcmdump_syntax(body, tmp_path) == "JPEGBaseline"
    named = get(server, cached, f"{SAMPLE_STUDY}/series/{JPEG_SERIES}", f"{DICOM}; transfer-syntax={JPEG_BASELINE}")
    assert parts(named)[0][1] == body


def test_a_syntax_neither_stored_nor_explicit_vr_little_endian_is_406(server: str, cached: Cached) -> None:
    response = get(server, cached, f"{SAMPLE_STUDY}/series/{JPEG_SERIES}",
                   f"{DICOM}; transfer-syntax=1.2.840.10008.1.2.4.80")
    assert response.status_code == 406
    error = response.json()["error"]
    assert f"transfer-syntax={JPEG_BASELINE}" in error and ELE in error and "transfer-syntax=*" in error


def test_an_instance_without_a_decoder_is_406_by_default_and_sent_as_stored_with_star(server: str,
                                                                                       cached: Cached) -> None:
    sop = only_sop(cached, NO_DECODER_SERIES)
    path = f"{SAMPLE_STUDY}/series/{NO_DECODER_SERIES}/instances/{sop}"
    refused = get(server, cached, path, DICOM)
    assert refused.status_code == 406 and refused.headers["content-type"] == "application/json"
    assert "no decoder for MPEG2" in refused.json()["error"]
    whole_study = get(server, cached, SAMPLE_STUDY, DICOM)  # refused before any part is sent
    assert whole_study.status_code == 406
    as_stored = get(server, cached, path, f"{DICOM}; transfer-syntax=*")
    ((_, body),) = parts(as_stored)
    assert body == cached.files[sop].read_bytes()
