"""De-identified export end to end: studies retrieved from a real PACS (pynetdicom's qrscp) into a project whose
policy is ``deidentified``, then downloaded through the API (ZIP plain and encrypted, and the CLI's folder
download over real HTTP). Also: encrypted_only, a non-member; forward queues (it de-identifies).
DICOMweb and the viewer: tests/integration/test_deid_dicomweb.py."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pyrage
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from sqlalchemy import select

from mi2b2.adapters.db.tables import DeidKey, DeidMapping
from mi2b2.api.app import create_app
from mi2b2.client import Mi2b2Client
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext
from mi2b2.services.export import decrypt_download, open_download
from mi2b2.services.export.fetch import fetch_download
from mi2b2.services.forward import add_forwards
from mi2b2.services.requests import StudyPick, add_requests
from mi2b2.synthetic import write_study
from mi2b2.testing import FakeClock
from support import studies
from support.deid import ALICE, BIRTH, INSTITUTION, REFERRER, ROOT, api, brain_in, gamma_project, sample_study, tokens_for
from support.pacs import free_port, start_qrscp
from support.pipeline import Pipeline, cache_files, retrieval_site
from support.pipeline import by_sop as pipeline_by_sop
from support.site import pacs_block
from support.viewing import place, serving

PASSPHRASE = "correct horse battery staple"
SAMPLE_STUDY = "1.2.826.0.1.3680043.8.498.777"
# name -> (series number, SOP instance suffix); the US clip says nothing about burned-in text.
SAMPLES = {"CT_small.dcm": 1, "MR_small_bigendian.dcm": 2, "liver_1frame.dcm": 3, "test-SR.dcm": 4,
           "examples_rgb_color.dcm": 5}
PROJECTS = gamma_project() + """
    [[projects]]
    id = "delta"
    title = "De-identified, encrypted only"
    irb = "2026P000778"
    expires = 2099-12-31
    mrn_file = "alpha.mrns"
    quota = "10 GiB"
    institutions = ["general"]
    members = [{ login = "bob" }]
    export = "deidentified"
    encrypted_only = true

    [[destinations]]
    id = "xnat"
    ae_title = "XNAT"
    host = "127.0.0.1"
    port = 11999
"""


def unzip(data: bytes) -> dict[str, bytes]:
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        assert archive.testzip() is None
        return {info.filename: archive.read(info) for info in archive.infolist()}


def identifiers(files: list[Path]) -> set[bytes]:
    """What must not survive: names, IDs, dates of birth, accession, institution, referrer, every UID."""
    found = {INSTITUTION.encode(), REFERRER.encode(), BIRTH.encode()}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        found |= {str(ds.PatientName).encode(), str(ds.PatientID).encode(), str(ds.AccessionNumber).encode(),
                  str(ds.StudyInstanceUID).encode(), str(ds.SeriesInstanceUID).encode(),
                  str(ds.SOPInstanceUID).encode()}
        found |= {str(e.value).encode() for e in ds.iterall() if e.keyword == "ReferencedSOPInstanceUID"}
    return {value for value in found if len(value) >= 5}


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Path]]:
    folder = tmp_path_factory.mktemp("deid-originals")
    return {"brain": write_study(studies.BRAIN, folder), "follow_up": write_study(studies.BRAIN_FOLLOW_UP, folder),
            "samples": sample_study(folder / "samples", SAMPLE_STUDY, SAMPLES)}


@pytest.fixture(scope="module")
def qrscp(tmp_path_factory: pytest.TempPathFactory, originals: dict[str, list[Path]]) -> Iterator[tuple[int, int]]:
    receiver_port = free_port()
    pacs = start_qrscp(tmp_path_factory.mktemp("qrscp"), move_destinations={"MI2B2": ("127.0.0.1", receiver_port)})
    try:
        pacs.load([f for files in originals.values() for f in files])
        yield pacs.port, receiver_port
    finally:
        pacs.stop()


@pytest.mark.pacs
def test_retrieved_studies_download_de_identified_consistently(tmp_path: Path, qrscp: tuple[int, int],
                                                               originals: dict[str, list[Path]]) -> None:
    pacs_port, receiver_port = qrscp
    block = pacs_block("main", "QRSCP", pacs_port, 'retrieve = "c-move"\n')
    clock = FakeClock()
    site = retrieval_site(tmp_path, receiver_port, block, projects=PROJECTS)
    uids = [studies.uid(studies.BRAIN), studies.uid(studies.BRAIN_FOLLOW_UP), SAMPLE_STUDY]
    with Pipeline(site, clock=clock) as pipe:
        report = add_requests(pipe.ctx, ALICE, "gamma", "main", [StudyPick(uid) for uid in uids])
        assert report.not_found == [] and report.not_permitted == []
        rows = pipe.wait(report.created)
        assert [r.state for r in rows] == ["completed"] * 3, [(r.state, r.last_error) for r in rows]
        ctx = pipe.ctx
        tokens = tokens_for(ctx)
        bob = api(ctx, tokens["bob"])

        first = bob.post("/api/v1/projects/gamma/download", json={"study_uids": uids})
        assert first.status_code == 200, first.text
        assert "deidentified" in first.headers["content-disposition"]
        files = unzip(first.content)
        report_json = json.loads(files.pop("deidentification-report.json"))
        everything = [f for group in originals.values() for f in group]
        secrets = identifiers(everything)
        by_sop = {str(dcmread(f, stop_before_pixels=True).SOPInstanceUID): f for f in everything}

        # Nothing identifying anywhere, in names or bytes; pixel data as stored.
        exported = {}
        for name, data in files.items():
            assert not any(secret in data or secret in name.encode() for secret in secrets), name
            ds = dcmread(io.BytesIO(data))
            exported[str(ds.SOPInstanceUID)] = ds
        assert len(exported) == len(everything) - 1  # the US clip is withheld
        key = _key(ctx, "gamma")
        cached = pipeline_by_sop(cache_files(ctx.config.cache_dir()))  # as received (a PACS may transcode)
        assert sorted(cached) == sorted(by_sop)
        for sop, cached_path in cached.items():
            original = dcmread(cached_path)
            new = exported.get(_uid(key, sop))
            if original.Modality == "US":
                assert new is None
                continue
            assert new is not None and new.get("PixelData") == original.get("PixelData")
        assert report_json["withheld_instances"] == 1 and report_json["exported_instances"] == len(exported)
        assert report_json["withheld_series"][0]["modality"] == "US"
        assert report_json["profile"] == ["basic", "retain_longitudinal_modified_dates"]

        # One pseudonymous study per study, its three series kept; one patient pseudonym; intervals kept.
        brain = [ds for ds in exported.values() if ds.StudyInstanceUID == _uid(key, uids[0])]
        assert len(brain) == 6 and len({ds.SeriesInstanceUID for ds in brain}) == 3
        follow_up = next(ds for ds in exported.values() if ds.StudyInstanceUID == _uid(key, uids[1]))
        assert {ds.PatientID for ds in brain} == {follow_up.PatientID} and follow_up.PatientID.startswith("P")
        assert _days(follow_up.StudyDate) - _days(brain[0].StudyDate) == _days("20220611") - _days("20210305")
        assert brain[0].StudyDate != "20210305"
        seg = next(ds for ds in exported.values() if ds.Modality == "SEG")
        refs = [str(e.value) for e in seg.iterall() if e.keyword == "ReferencedSOPInstanceUID"]
        assert refs and all(ref.startswith("2.25.") for ref in refs)

        # A day later: the same pseudonyms, UIDs and bytes.
        clock.advance(days=1)
        again = unzip(bob.post("/api/v1/projects/gamma/download", json={"study_uids": uids}).content)
        again.pop("deidentification-report.json")
        assert {n: hashlib.sha256(d).hexdigest() for n, d in again.items()} == {
            n: hashlib.sha256(d).hexdigest() for n, d in files.items()}

        # Encrypted: the same de-identified files inside.
        encrypted = bob.post("/api/v1/projects/gamma/download",
                             json={"study_uids": uids, "encryption": {"passphrase": PASSPHRASE}})
        assert encrypted.status_code == 200
        (tmp_path / "e.zip").write_bytes(encrypted.content)
        with open_download(tmp_path / "e.zip", passphrase=PASSPHRASE) as download:
            assert {e.path: download.read(e) for e in download.entries()} == files
            assert {e.study_uid for e in download.entries()} == {_uid(key, u) for u in uids}

        # The CLI's folder download over real HTTP: the same files, resumable, verified by SHA-256.
        with serving(create_app(ctx)) as url, Mi2b2Client(url, tokens["bob"]) as client:
            fetch_download(client, "gamma", uids, tmp_path / "folder")
            folder = {p.relative_to(tmp_path / "folder").as_posix(): p.read_bytes()
                      for p in (tmp_path / "folder").rglob("*.dcm")}
        assert folder == files

        # Audited with the policy; the honest broker's table filled, for lead and admin later.
        events = ctx.audit.list(ROOT, AuditFilter(action="download"))
        assert events and all('"export":"deidentified"' in e.detail and "retain_longitudinal" in e.detail
                              for e in events)
        with ctx.sessions() as session:
            mapped = {(m.kind, m.original): m.pseudonym for m in session.scalars(select(DeidMapping))}
        assert mapped[("study", uids[0])] == _uid(key, uids[0])
        assert mapped[("patient", "000123")] == follow_up.PatientID


def _key(ctx: ServiceContext, project: str) -> bytes:
    with ctx.sessions() as session:
        row = session.get(DeidKey, project)
        assert row is not None
        return bytes.fromhex(row.secret)


def _uid(key: bytes, uid: str) -> str:
    from mi2b2.domain.deid.pseudonyms import Pseudonymizer

    return Pseudonymizer(key).uid(uid)


def _days(text: str) -> int:
    from datetime import date

    return date(int(text[:4]), int(text[4:6]), int(text[6:])).toordinal()


# doors, with files placed as the receiver places them ---------------------------------------------------


@pytest.fixture
def placed(tmp_path: Path) -> Iterator[tuple[ServiceContext, dict[str, str]]]:
    with brain_in(tmp_path, PROJECTS, ("gamma", "delta", "alpha")) as placed_site:
        yield placed_site


def test_encrypted_only_refuses_plain_downloads_and_a_non_member_stays_refused(
        placed: tuple[ServiceContext, dict[str, str]]) -> None:
    ctx, tokens = placed
    uid = studies.uid(studies.BRAIN)
    bob = api(ctx, tokens["bob"])
    for path in ("", "/manifest"):
        plain = bob.post(f"/api/v1/projects/delta/download{path}", json={"study_uids": [uid]})
        assert plain.status_code == 403 and "encrypted downloads only" in plain.json()["error"], plain.text
    encrypted = bob.post("/api/v1/projects/delta/download",
                         json={"study_uids": [uid], "encryption": {"passphrase": PASSPHRASE}})
    assert encrypted.status_code == 200 and len(unzip(encrypted.content)) > 3
    # The IRB door comes first and is unchanged: carol is in no de-identified project.
    refused = api(ctx, tokens["carol"]).post("/api/v1/projects/gamma/download", json={"study_uids": [uid]})
    assert refused.status_code == 403 and "not a member" in refused.json()["error"]
    denials = ctx.audit.list(ROOT, AuditFilter(action="denied"))
    assert {json.loads(d.detail)["reason"] for d in denials} >= {"encrypted downloads only"}
    # What the browser reads to mark a de-identified project's screens.
    mine = {p["id"]: (p["export"], p["encrypted_only"]) for p in bob.get("/api/v1/projects").json()}
    assert mine == {"alpha": ("identified", False), "gamma": ("deidentified", False), "delta": ("deidentified", True)}


def test_encrypted_only_fetches_refuse_plain_and_send_age_files_only(
        placed: tuple[ServiceContext, dict[str, str]], tmp_path: Path) -> None:
    ctx, tokens = placed
    bob = api(ctx, tokens["bob"])
    manifest = bob.post("/api/v1/projects/delta/download/manifest",
                        json={"study_uids": [studies.uid(studies.BRAIN)], "encryption": "recipients"}).json()
    assert manifest["server_encrypts"] is True
    study, files = manifest["studies"][0], manifest["files"][:3]
    asked = [{"download_id": study["download_id"], "study_uid": study["study_uid"], "sop_uid": f["sop_uid"]}
             for f in files]
    # Claiming encryption in the manifest gets no plaintext: a fetch without the encryption is refused, audited.
    before = len(ctx.audit.list(ROOT, AuditFilter(action="denied")))
    for path, body in (("/files", {"files": asked}), ("/instance", asked[0])):
        plain = bob.post(f"/api/v1/projects/delta/download{path}", json=body)
        assert plain.status_code == 403, plain.text
        assert "encrypted downloads only" in plain.json()["error"] and '"encryption"' in plain.json()["error"]
    assert len(ctx.audit.list(ROOT, AuditFilter(action="denied"))) == before + 2
    # A non-member is refused as a non-member: the project's encryption rule is not theirs to learn.
    carol = api(ctx, tokens["carol"])
    for path, body in (("/files", {"files": asked}), ("/instance", asked[0])):
        outsider = carol.post(f"/api/v1/projects/delta/download{path}", json=body)
        assert outsider.status_code == 403 and "not a member" in outsider.json()["error"], outsider.text
        assert "encrypt" not in outsider.json()["error"], outsider.text
    forged = bob.post("/api/v1/projects/delta/download/files",
                      json={"files": asked, "encryption": {"recipients": ["age1notakey"]}})
    assert forged.status_code == 422 and "public key" in forged.json()["error"], forged.text
    # A passphrase would cost the server a scrypt per file of the batch: public keys only.
    costly = bob.post("/api/v1/projects/delta/download/files",
                      json={"files": asked, "encryption": {"passphrase": PASSPHRASE}})
    assert costly.status_code == 422 and "public keys only" in costly.json()["error"], costly.text

    # With public keys: each file an age file, then the SHA-256 of that ciphertext; Debian's age opens it.
    identity = pyrage.x25519.Identity.generate()
    (tmp_path / "key.txt").write_text(f"{identity}\n")
    answer = bob.post("/api/v1/projects/delta/download/files",
                      json={"files": asked, "encryption": {"recipients": [str(identity.to_public())]}})
    assert answer.status_code == 200
    with tarfile.open(fileobj=io.BytesIO(answer.content)) as tar:
        members = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}  # type: ignore[union-attr]
    assert sorted(members) == sorted([f["sop_uid"] for f in files] + [f["sop_uid"] + ".sha256" for f in files])
    for f in files:
        sealed = members[f["sop_uid"]]
        assert sealed.startswith(b"age-encryption.org/v1\n") and sealed[128:132] != b"DICM"
        assert hashlib.sha256(sealed).hexdigest() == members[f["sop_uid"] + ".sha256"].decode()
        (tmp_path / "file.age").write_bytes(sealed)
        opened = subprocess.run(["age", "-d", "-i", str(tmp_path / "key.txt"), str(tmp_path / "file.age")],
                                capture_output=True, check=True).stdout
        assert hashlib.sha256(opened).hexdigest() == f["sha256"] and opened[128:132] == b"DICM"

    # One file with a passphrase: an age file, its SHA-256 in a header.
    one = bob.post("/api/v1/projects/delta/download/instance",
                   json={**asked[0], "encryption": {"passphrase": PASSPHRASE}})
    assert one.status_code == 200 and one.content[128:132] != b"DICM"
    assert one.headers["X-Mi2b2-Ciphertext-SHA256"] == hashlib.sha256(one.content).hexdigest()
    assert hashlib.sha256(pyrage.passphrase.decrypt(one.content, PASSPHRASE)).hexdigest() == files[0]["sha256"]


def test_the_cli_download_of_an_encrypted_only_project_is_encrypted_by_the_server_and_resumes(
        placed: tuple[ServiceContext, dict[str, str]], tmp_path: Path) -> None:
    ctx, tokens = placed
    uid = studies.uid(studies.BRAIN)
    folder = tmp_path / "folder"
    sent: list[dict[str, object] | None] = []
    with serving(create_app(ctx)) as url, Mi2b2Client(url, tokens["bob"]) as client:
        fetch_files = client.download_files

        def spy(project: str, files: list[tuple[int, str, str]],
                encryption: dict[str, object] | None = None) -> Iterator[bytes]:
            sent.append(encryption)
            return fetch_files(project, files, encryption)

        client.download_files = spy  # type: ignore[method-assign]
        first = fetch_download(client, "delta", [uid], folder, passphrase=PASSPHRASE)
        assert first.failed == [] and first.downloaded == first.files > 0
        # The server encrypted: each batch carried the download's public key, never the passphrase.
        assert sent and all(e is not None and list(e) == ["recipients"] for e in sent)
        stored = [p for p in folder.rglob("*") if p.is_file()]
        assert all(p.read_bytes()[128:132] != b"DICM" and not p.name.endswith(".dcm") for p in stored)
        # Resumed: a file lost is fetched again, the rest kept.
        next(p for p in stored if p.suffix == ".age" and p.name != "manifest.age" and p.name != "identity.age"
             ).unlink()
        again = fetch_download(client, "delta", [uid], folder, passphrase=PASSPHRASE)
        assert again.failed == [] and (again.downloaded, again.skipped) == (1, first.files - 1)
        manifest = client.download_manifest("delta", [uid], False, "passphrase")
    report = decrypt_download(folder, tmp_path / "plain", passphrase=PASSPHRASE)
    assert report.files == first.files
    readable = {p.relative_to(tmp_path / "plain").as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in (tmp_path / "plain").rglob("*.dcm")}
    assert readable == {f["path"]: f["sha256"] for f in manifest["files"]}


def test_encrypted_only_files_too_big_to_hold_are_encrypted_through_a_spool_to_public_keys_only(
        placed: tuple[ServiceContext, dict[str, str]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mi2b2.services.export import batch, download, sources

    for module in (sources, download, batch):  # every file counts as big: the streamed path, with small files
        monkeypatch.setattr(module, "LARGE_MEMBER", 256)
    ctx, tokens = placed
    uid = studies.uid(studies.BRAIN)
    identity = pyrage.x25519.Identity.generate()
    (tmp_path / "key.txt").write_text(f"{identity}\n")
    with serving(create_app(ctx)) as url, Mi2b2Client(url, tokens["bob"]) as client:
        report = fetch_download(client, "delta", [uid], tmp_path / "folder", recipients=[str(identity.to_public())])
        assert report.failed == [] and report.downloaded == report.files > 0
        manifest = client.download_manifest("delta", [uid], False, "recipients")
    decrypt_download(tmp_path / "folder", tmp_path / "plain", identities=[tmp_path / "key.txt"])
    readable = {p.relative_to(tmp_path / "plain").as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
                for p in (tmp_path / "plain").rglob("*.dcm")}
    assert readable == {f["path"]: f["sha256"] for f in manifest["files"]}
    # A passphrase would cost a scrypt over a file held whole: refused, naming public keys.
    study, entry = manifest["studies"][0], manifest["files"][0]
    asked = {"download_id": study["download_id"], "study_uid": study["study_uid"], "sop_uid": entry["sop_uid"]}
    bob = api(ctx, tokens["bob"])
    refused = bob.post("/api/v1/projects/delta/download/instance", json={**asked, "encryption": {"passphrase": PASSPHRASE}})
    assert refused.status_code == 422 and "recipients" in refused.json()["error"]
    one = bob.post("/api/v1/projects/delta/download/instance",
                   json={**asked, "encryption": {"recipients": [str(identity.to_public())]}})
    assert one.headers["X-Mi2b2-Ciphertext-SHA256"] == hashlib.sha256(one.content).hexdigest()
    assert hashlib.sha256(pyrage.decrypt(one.content, [identity])).hexdigest() == entry["sha256"]


def test_a_forged_download_id_or_an_identified_uid_fetches_nothing(
        placed: tuple[ServiceContext, dict[str, str]]) -> None:
    ctx, tokens = placed
    uid = studies.uid(studies.BRAIN)
    bob = api(ctx, tokens["bob"])
    manifest = bob.post("/api/v1/projects/gamma/download/manifest", json={"study_uids": [uid]}).json()
    study = manifest["studies"][0]
    assert study["study_uid"] != uid and all(f["study_uid"] == study["study_uid"] for f in manifest["files"])
    entry = manifest["files"][0]
    good = {"download_id": study["download_id"], "study_uid": study["study_uid"], "sop_uid": entry["sop_uid"]}
    fetched = bob.post("/api/v1/projects/gamma/download/instance", json=good)
    assert fetched.status_code == 200 and hashlib.sha256(fetched.content).hexdigest() == entry["sha256"]
    for forged in ({**good, "study_uid": uid}, {**good, "download_id": study["download_id"] + 999},
                   {**good, "sop_uid": "1.2.3.4"}):
        answer = bob.post("/api/v1/projects/gamma/download/instance", json=forged)
        assert answer.status_code in (403, 404), answer.text
    # The identified project next door is unchanged: its download is the cache's bytes, identifiers and all.
    identified = unzip(bob.post("/api/v1/projects/alpha/download", json={"study_uids": [uid]}).content)
    assert all(name.startswith("000123/") and b"000123" in data for name, data in identified.items())


def test_the_forward_door_queues_a_de_identified_projects_forward_with_its_policy_on_record(
        placed: tuple[ServiceContext, dict[str, str]]) -> None:
    """Forward de-identifies (tests/integration/test_deid_forward.py sends to Orthanc): it no longer refuses."""
    ctx, tokens = placed
    uid = studies.uid(studies.BRAIN)
    assert len(add_forwards(ctx, ALICE, "gamma", "xnat", [uid]).created) == 1
    answer = api(ctx, tokens["alice"]).post("/api/v1/projects/gamma/forward",
                                            json={"destination": "xnat", "study_uids": [uid]})
    assert answer.status_code < 300 and answer.json()["already_queued"] == [uid], answer.text
    (requested,) = [json.loads(e.detail) for e in ctx.audit.list(ROOT, AuditFilter(action="forward",
                                                                                  project_id="gamma"))]
    assert requested["export"] == "deidentified" and requested["profile"][0] == "basic"


def test_a_big_instance_streams_its_header_then_its_pixel_data_as_stored(
        placed: tuple[ServiceContext, dict[str, str]], tmp_path: Path) -> None:
    """Above the in-memory size (LARGE_MEMBER) a file is never held whole: the new header, then the
    cache's pixel bytes in chunks, in the ZIP and in the CLI's file fetch."""
    ctx, tokens = placed
    source = dcmread(get_testdata_file("CT_small.dcm"))
    source.PatientID, source.PatientName = "PAT004", "BIG^PATIENT"
    source.Rows = source.Columns = 4200  # 35 MB of 16-bit pixels
    source.PixelData = (bytes(range(256)) * (4200 * 4200 * 2 // 256 + 1))[:4200 * 4200 * 2]
    big = tmp_path / "big.dcm"
    source.save_as(big, enforce_file_format=True)
    place(ctx, "gamma", big)
    study = str(source.StudyInstanceUID)
    bob = api(ctx, tokens["bob"])
    files = unzip(bob.post("/api/v1/projects/gamma/download", json={"study_uids": [study]}).content)
    (data,) = [d for n, d in files.items() if n.endswith(".dcm")]
    assert b"BIG^PATIENT" not in data and str(source.SOPInstanceUID).encode() not in data
    assert data.endswith(bytes(source.PixelData)) and dcmread(io.BytesIO(data)).PatientID.startswith("P")
    manifest = bob.post("/api/v1/projects/gamma/download/manifest", json={"study_uids": [study]}).json()
    (entry,) = manifest["files"]
    fetched = bob.post("/api/v1/projects/gamma/download/instance", json={
        "download_id": manifest["studies"][0]["download_id"], "study_uid": entry["study_uid"],
        "sop_uid": entry["sop_uid"]})
    assert fetched.status_code == 200 and int(fetched.headers["content-length"]) == entry["size"] == len(data)
    assert fetched.content == data
