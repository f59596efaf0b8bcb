"""Forward from a ``deidentified`` project to a real Orthanc: de-identified copies made in memory before each
C-STORE, with the download's pseudonyms and UIDs; a burned-in US instance withheld and reported; a cached file
that is not readable DICOM withheld, never sent as it is; a forward queued while the project was identified
de-identified all the same. What Orthanc holds is read back through its REST API."""

from __future__ import annotations

import io
import json
import re
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from sqlalchemy import select

from mi2b2.adapters.db.tables import AuditEvent
from mi2b2.adapters.dicom.store_scu import MadeInstance, store_files
from mi2b2.config import load_config
from mi2b2.services.context import build_context
from mi2b2.services.export import deid
from mi2b2.services.export.download import download_manifest
from mi2b2.services.forward import add_forwards, peer_for_destination
from mi2b2.services.pacs import local_ae
from support.deid import ACCESSION, BIRTH, BOB, INSTITUTION, REFERRER, gamma_project, sample_study
from support.pacs import RunningPacs, start_orthanc
from support.pipeline import Pipeline
from support.site import write_site
from support.viewing import place

STUDY, OTHER_STUDY = "1.2.826.0.1.3680043.8.498.915", "1.2.826.0.1.3680043.8.498.916"
# Several SOP classes and transfer syntaxes (big endian, JPEG-LS); the US image says nothing about burned-in text.
SAMPLES = {"CT_small.dcm": 1, "MR_small_bigendian.dcm": 2, "MR_small_jpeg_ls_lossless.dcm": 3,
           "liver_1frame.dcm": 4, "test-SR.dcm": 5, "examples_rgb_color.dcm": 6}
PROJECT = gamma_project() + """
    [[destinations]]
    id = "orthanc"
    ae_title = "ORTHANC"
    host = "127.0.0.1"
    port = PORT
"""


def secrets_of(files: list[Path]) -> set[bytes]:
    found = {INSTITUTION.encode(), REFERRER.encode(), BIRTH.encode(), b"PAT004", b"SAMPLE^PATIENT",
             ACCESSION.encode()}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        found |= {str(ds.StudyInstanceUID).encode(), str(ds.SeriesInstanceUID).encode(),
                  str(ds.SOPInstanceUID).encode()}
        found |= {str(e.value).encode() for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    return {value for value in found if len(value) >= 5}


def dicom_errors(path: Path) -> set[str]:
    """dciodvfy's errors (Debian's dicom3tools), UIDs masked: a pseudonymous UID is not a new error."""
    run = subprocess.run(["dciodvfy", str(path)], capture_output=True, text=True, timeout=60, check=False)
    return {re.sub(r"[0-9]+(\.[0-9]+)+", "<uid>", line) for line in (run.stdout + run.stderr).splitlines()
            if line.startswith("Error")}


def orthanc_files(peer: RunningPacs) -> dict[str, bytes]:
    """Every instance Orthanc holds, as the file it serves, by SOP Instance UID."""
    with urllib.request.urlopen(f"{peer.http_url}/instances", timeout=10) as response:
        ids = json.load(response)
    files = {}
    for orthanc_id in ids:
        with urllib.request.urlopen(f"{peer.http_url}/instances/{orthanc_id}/file", timeout=10) as response:
            data = response.read()
        files[str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)] = data
    return files


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPacs]:
    peer = start_orthanc(tmp_path_factory.mktemp("orthanc-deid"), ae_title="ORTHANC")
    try:
        yield peer
    finally:
        peer.stop()


def gamma_site(folder: Path, orthanc: RunningPacs) -> Path:
    return write_site(folder, extra=PROJECT.replace("PORT", str(orthanc.port)))


@pytest.mark.pacs
def test_a_forward_from_a_deidentified_project_sends_the_downloads_pseudonymous_copies(
        tmp_path: Path, orthanc: RunningPacs) -> None:
    originals = sample_study(tmp_path / "originals", STUDY, SAMPLES)
    with Pipeline(gamma_site(tmp_path / "site", orthanc), receiver=False) as pipe:
        ctx = pipe.ctx
        cached = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): place(ctx, "gamma", f) for f in originals}
        (request_id,) = add_forwards(ctx, BOB, "gamma", "orthanc", [STUDY]).created
        (row,) = pipe.wait([request_id], timeout=60)
        assert (row.state, row.received, row.expected_instances, row.failed) == ("completed", 5, 5, 0), row.last_error
        # Only the US series: everything withheld, so the forward fails, saying why.
        (us_only,) = add_forwards(ctx, BOB, "gamma", "orthanc", [STUDY], series_uids=[f"{STUDY}.6"]).created
        (nothing,) = pipe.wait([us_only], timeout=60)
        assert (nothing.state, nothing.received, nothing.expected_instances) == ("failed", 0, 0)
        assert (nothing.last_error or "").startswith("nothing forwarded: forwarded 0 instances de-identified; "
                                                     "1 withheld: series 2.25.")
        manifest = download_manifest(ctx, BOB, "gamma", [STUDY])
        with ctx.sessions() as session:
            events = [json.loads(d) for d in session.execute(
                select(AuditEvent.detail).where(AuditEvent.action == "forward")).scalars()]

    # The download of the same study names the same pseudonymous UIDs Orthanc now holds.
    (study,) = manifest["studies"]
    held = {sop: data for sop, data in orthanc_files(orthanc).items()  # this study's: other tests share Orthanc
            if str(dcmread(io.BytesIO(data), stop_before_pixels=True).StudyInstanceUID) in (study["study_uid"], STUDY)}
    downloaded = {f["sop_uid"]: f for f in manifest["files"]}
    assert sorted(downloaded) == sorted(held) and len(held) == 5
    secrets = secrets_of(originals)
    for sop, data in held.items():
        assert not any(secret in data for secret in secrets), sop
        stored = dcmread(io.BytesIO(data))
        assert stored.PatientIdentityRemoved == "YES" and stored.PatientID.startswith("P")
        assert (stored.StudyInstanceUID, stored.SeriesInstanceUID) == (
            downloaded[sop]["study_uid"], downloaded[sop]["series_uid"])
    # Pixel data as stored: byte for byte, in the stored transfer syntax.
    by_number = {int(dcmread(io.BytesIO(d), stop_before_pixels=True).SeriesNumber): d for d in held.values()}
    for original in originals:
        source = dcmread(original)
        if source.Modality == "US":
            assert source.SeriesNumber not in by_number
            continue
        sent = dcmread(io.BytesIO(by_number[source.SeriesNumber]))
        assert sent.file_meta.TransferSyntaxUID == source.file_meta.TransferSyntaxUID
        assert sent.get("PixelData") == source.get("PixelData")
        # Valid DICOM as Orthanc keeps it: DCMTK reads it, dciodvfy finds nothing the original did not have.
        copy = tmp_path / f"orthanc-{source.SeriesNumber}.dcm"
        copy.write_bytes(by_number[source.SeriesNumber])  # the bytes Orthanc serves, as they are
        assert subprocess.run(["dcmdump", "-q", str(copy)], capture_output=True, timeout=60).returncode == 0
        assert dicom_errors(copy) <= dicom_errors(original), source.Modality
    assert len(cached) == 6

    # The US image is withheld and reported by its pseudonymous series, with no identifier in the report.
    report = row.last_error or ""
    assert "forwarded 5 instances de-identified; 1 withheld" in report and "(US, 1 instances" in report
    assert not any(secret.decode() in report for secret in secrets)
    # The policy applied is on record, when requested and when done.
    requested = next(e for e in events if e["event"] == "requested" and e["request"] == request_id)
    done = next(e for e in events if e["event"] == "completed" and e["request"] == request_id)
    assert requested["export"] == done["export"] == "deidentified"
    assert done["profile"] == ["basic", "retain_longitudinal_modified_dates"] and done["withheld"] == 1
    assert done["withheld_series"][0]["modality"] == "US"


@pytest.mark.pacs
def test_an_unreadable_cached_file_is_withheld_and_an_earlier_queued_forward_is_deidentified(
        tmp_path: Path, orthanc: RunningPacs) -> None:
    originals = sample_study(tmp_path / "originals", OTHER_STUDY, {"CT_small.dcm": 1, "MR_small_bigendian.dcm": 2})
    site = gamma_site(tmp_path / "site", orthanc)
    # The same site while the project was still identified: the forward is queued under that configuration.
    identified = site.with_name("identified.toml")
    identified.write_text(site.read_text().replace('export = "deidentified"', 'export = "identified"'))
    before = build_context(load_config(identified))
    with Pipeline(site, receiver=False) as pipe:
        cached = [place(pipe.ctx, "gamma", f) for f in originals]
        # A tampered cache file: its header cut short, so it cannot be de-identified. It must not leave as it is.
        cached[1].write_bytes(cached[1].read_bytes()[:300])
        (request_id,) = add_forwards(before, BOB, "gamma", "orthanc", [OTHER_STUDY]).created
        (row,) = pipe.wait([request_id], timeout=60)
        pseudonymous = deid.engine_for(pipe.ctx, deid.policy_of(pipe.ctx, "gamma")).pseudonyms.uid(OTHER_STUDY)
    assert (row.state, row.received, row.expected_instances, row.failed) == ("completed", 1, 1, 0), row.last_error
    assert "1 withheld" in (row.last_error or "") and "not readable as DICOM" in (row.last_error or "")
    everything = orthanc_files(orthanc)
    # Nothing of this study's original UIDs anywhere in Orthanc (other tests share it), and the copy it holds
    # of the readable instance carries no identifier at all.
    uids = {u for u in secrets_of(originals) if u.startswith(OTHER_STUDY.encode())}
    assert not any(uid in data for uid in uids for data in everything.values())
    (copy,) = [d for d in everything.values()
               if dcmread(io.BytesIO(d), stop_before_pixels=True).StudyInstanceUID == pseudonymous]
    assert not any(secret in copy for secret in secrets_of(originals[:1]))
    assert dcmread(io.BytesIO(copy)).get("PixelData") == dcmread(originals[0]).get("PixelData")


@pytest.mark.pacs
def test_made_instances_that_are_garbage_gone_or_skipped_fail_alone_and_the_rest_is_stored(
        tmp_path: Path, orthanc: RunningPacs) -> None:
    """The sending side of a copy made in memory, against the same Orthanc: a maker that returns bytes that are
    not DICOM, one whose file vanished, and one that says not to send, each counted; the good copy stored."""
    (original,) = sample_study(tmp_path / "originals", "1.2.826.0.1.3680043.8.498.917", {"CT_small.dcm": 1})
    config = load_config(gamma_site(tmp_path / "site", orthanc))
    good = original.read_bytes()

    def vanished() -> bytes:
        raise FileNotFoundError(str(original))

    result = store_files(local_ae(config), peer_for_destination(config.destinations[0], config), "orthanc", [
        MadeInstance(original, lambda: b"not DICOM at all"), MadeInstance(original, vanished),
        MadeInstance(original, lambda: None), MadeInstance(original, lambda: good)])
    assert (result.stored, result.failed, result.skipped, result.bytes) == (1, 2, 1, len(good))
    assert result.reasons == ["the copy made for sending is not readable DICOM (InvalidDicomError)",
                              "the file is no longer in the cache"]
