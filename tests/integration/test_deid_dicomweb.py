"""DICOMweb and the viewer over a ``deidentified`` project: studies retrieved from a real PACS (pynetdicom's
qrscp) into project gamma, then read through QIDO-RS, WADO-RS, the rendered resources and the viewer's API.
They must show what a de-identified download of the same project shows - the same pseudonyms and UIDs, the
same bytes - and nothing identifying; a real UID finds nothing (on the audit trail); the doors' other
refusals stand. The identified doors are tests/integration/test_dicomweb.py and test_viewer.py."""

from __future__ import annotations

import io
import json
import shutil
import subprocess
import threading
from pathlib import Path

import pytest
from pydicom import dcmread
from test_deid_export import (  # the download test's samples, PACS and helpers
    PROJECTS,
    SAMPLE_STUDY,
    _key,
    identifiers,
    originals,
    qrscp,
    unzip,
)
from test_dicomweb_transfer_syntax import parts

from mi2b2.adapters.db.tables import DeidUid
from mi2b2.domain.deid.pseudonyms import Pseudonymizer
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import build_context
from mi2b2.services.export.pseudonymous import ORIGINAL_UID, deid_reads, fill
from mi2b2.services.requests import StudyPick, add_requests
from mi2b2.synthetic import write_study
from mi2b2.testing import FakeClock
from support import studies
from support.deid import api, tokens_for
from support.pipeline import ADMIN, ALICE, Pipeline, cache_files, retrieval_site
from support.pipeline import by_sop as pipeline_by_sop
from support.site import load_site, pacs_block
from support.viewing import place

__all__ = ["originals", "qrscp"]  # fixtures, shared with the download test
WEB = "/dicomweb/projects/gamma"
VIEWER = "/api/v1/projects/gamma/viewer"
AS_STORED = 'multipart/related; type="application/dicom"; transfer-syntax=*'
STUDY_UID, SERIES_UID, SOP_UID, PATIENT_ID = "0020000D", "0020000E", "00080018", "00100020"


def values(items: list[dict], tag: str) -> set[str]:  # type: ignore[type-arg]
    return {item[tag]["Value"][0] for item in items if item.get(tag, {}).get("Value")}


def clean(data: bytes, secrets: set[bytes]) -> bool:
    return not [secret for secret in secrets if secret in data]


@pytest.mark.pacs
def test_dicomweb_and_the_viewer_show_a_de_identified_project_as_its_downloads_do(
        tmp_path: Path, qrscp: tuple[int, int], originals: dict[str, list[Path]]) -> None:
    pacs_port, receiver_port = qrscp
    clock = FakeClock()
    site = retrieval_site(tmp_path, receiver_port, pacs_block("main", "QRSCP", pacs_port, 'retrieve = "c-move"\n'),
                          projects=PROJECTS)
    uids = [studies.uid(studies.BRAIN), studies.uid(studies.BRAIN_FOLLOW_UP), SAMPLE_STUDY]
    with Pipeline(site, clock=clock) as pipe:
        report = add_requests(pipe.ctx, ALICE, "gamma", "main", [StudyPick(uid) for uid in uids])
        rows = pipe.wait(report.created)
        assert [r.state for r in rows] == ["completed"] * 3, [(r.state, r.last_error) for r in rows]
        ctx = pipe.ctx
        tokens = tokens_for(ctx)
        bob = api(ctx, tokens["bob"])
        everything = [f for group in originals.values() for f in group]
        secrets = identifiers(everything)
        cached = pipeline_by_sop(cache_files(ctx.config.cache_dir()))

        # What a de-identified download of the project gives: the reference for every other door.
        downloaded = unzip(bob.post("/api/v1/projects/gamma/download", json={"study_uids": uids}).content)
        downloaded.pop("deidentification-report.json")
        download = {str(ds.SOPInstanceUID): (ds, data) for data in downloaded.values()
                    if (ds := dcmread(io.BytesIO(data)))}
        study_of = {str(ds.StudyInstanceUID) for ds, _ in download.values()}

        # QIDO-RS: pseudonymous UIDs and patients, de-identified values, the burned-in US left out.
        found = bob.get(f"{WEB}/studies", params={"includefield": "all"})
        assert found.status_code == 200 and clean(found.content, secrets), found.text
        assert values(found.json(), STUDY_UID) == study_of
        assert values(found.json(), PATIENT_ID) == {str(ds.PatientID) for ds, _ in download.values()}
        series = bob.get(f"{WEB}/series")
        assert clean(series.content, secrets)
        assert values(series.json(), SERIES_UID) == {str(ds.SeriesInstanceUID) for ds, _ in download.values()}
        instances = bob.get(f"{WEB}/instances", params={"includefield": "all"})
        assert instances.status_code == 200 and clean(instances.content, secrets)
        assert values(instances.json(), SOP_UID) == set(download)

        # Matching meets the pseudonymous values only: real identifiers find nothing.
        sample_ds = next(ds for ds, _ in download.values() if ds.Modality == "CT")
        for real in ({"PatientID": "PAT004"}, {"PatientID": "000123"}, {"PatientName": "SAMPLE*"},
                     {"AccessionNumber": "ACC-SAMPLE"}, {"StudyInstanceUID": SAMPLE_STUDY},
                     {"StudyDate": "20240202"}, {"ReferringPhysicianName": "REFERRER*"}):
            assert bob.get(f"{WEB}/studies", params=real).json() == [], real
        by_pseudonym = bob.get(f"{WEB}/studies", params={"PatientID": str(sample_ds.PatientID),
                                                          "StudyDate": str(sample_ds.StudyDate)}).json()
        assert values(by_pseudonym, STUDY_UID) == {str(sample_ds.StudyInstanceUID)}
        assert bob.get(f"{WEB}/studies", params={"PatientName": f"{str(sample_ds.PatientName)[:4]}*"}).json()

        # WADO-RS: metadata and instances are the download's copies; pixel data as cached; DCMTK reads them.
        for study in study_of:
            metadata = bob.get(f"{WEB}/studies/{study}/metadata")
            assert metadata.status_code == 200 and clean(metadata.content, secrets)
            assert values(metadata.json(), SOP_UID) == {s for s, (ds, _) in download.items()
                                                         if ds.StudyInstanceUID == study}
            sent = bob.get(f"{WEB}/studies/{study}", headers={"Accept": AS_STORED})
            assert sent.status_code == 200 and clean(sent.content, secrets)
            for _type, body in parts(sent):  # type: ignore[arg-type]
                sop = str(dcmread(io.BytesIO(body), stop_before_pixels=True).SOPInstanceUID)
                assert body == download[sop][1]
        dcmdump = shutil.which("dcmdump")
        assert dcmdump is not None, "DCMTK is part of the set-up (scripts/setup.sh)"
        pseudo = Pseudonymizer(_key(ctx, "gamma"))
        for original_sop, path in cached.items():
            stored = dcmread(path)
            mine = pseudo.uid(original_sop) if pseudo.uid(original_sop) in download else None
            if stored.Modality == "US":
                assert mine is None
                continue
            assert mine is not None
            ds = download[mine][0]
            url = f"{WEB}/studies/{ds.StudyInstanceUID}/series/{ds.SeriesInstanceUID}/instances/{mine}"
            ((_type, body),) = parts(bob.get(url, headers={"Accept": AS_STORED}))  # type: ignore[arg-type]
            assert dcmread(io.BytesIO(body)).get("PixelData") == stored.get("PixelData")
            copy = tmp_path / f"{mine}.dcm"
            copy.write_bytes(body)
            dumped = subprocess.run([dcmdump, "-q", str(copy)], capture_output=True, timeout=60)
            assert dumped.returncode == 0 and b"PAT004" not in dumped.stdout, dumped.stderr
            if stored.Modality == "CT":
                # The default (Explicit VR Little Endian) de-identified too; rendered from the stored pixels.
                ((_type, converted),) = parts(bob.get(url, headers={"Accept": "multipart/related; "
                                                      'type="application/dicom"'}))  # type: ignore[arg-type]
                assert clean(converted, secrets) and dcmread(io.BytesIO(converted)).PatientID == ds.PatientID
                rendered = bob.get(f"{url}/rendered", headers={"Accept": "image/png"})
                assert rendered.status_code == 200 and rendered.content.startswith(b"\x89PNG")
                assert bob.get(f"{url}/frames/1").status_code == 200
            assert original_sop not in url

        # The burned-in US clip: not served by any resource, with the reason.
        us = next(p for p in cached.values() if dcmread(p, stop_before_pixels=True).Modality == "US")
        us_ds = dcmread(us, stop_before_pixels=True)
        us_url = (f"{WEB}/studies/{pseudo.uid(str(us_ds.StudyInstanceUID))}/series/"
                  f"{pseudo.uid(str(us_ds.SeriesInstanceUID))}/instances/{pseudo.uid(str(us_ds.SOPInstanceUID))}")
        for path in ("", "/metadata", "/frames/1", "/rendered"):
            refused = bob.get(us_url + path)
            assert refused.status_code == 404 and "withheld" in refused.json()["error"], (path, refused.text)
        assert bob.get(f"{VIEWER}/instances/{pseudo.uid(str(us_ds.SOPInstanceUID))}/frames/1.png").status_code == 404

        # The viewer: the same pseudonyms in the tree, the study, the tag panel; frames render.
        tree = bob.get(f"{VIEWER}/tree")
        assert tree.status_code == 200 and clean(tree.content, secrets)
        assert {p["patient_id"] for p in tree.json()["patients"]} == {str(ds.PatientID) for ds, _ in download.values()}
        assert {s["study_uid"] for p in tree.json()["patients"] for s in p["studies"]} == study_of
        for study in study_of:
            opened = bob.get(f"{VIEWER}/studies/{study}")
            assert opened.status_code == 200 and clean(opened.content, secrets)
            shown = {i["sop_uid"] for s in opened.json()["series"] for i in s["instances"]}
            assert shown == {s for s, (ds, _) in download.items() if ds.StudyInstanceUID == study}
        tags = bob.get(f"{VIEWER}/instances/{sample_ds.SOPInstanceUID}/tags")
        assert tags.status_code == 200 and clean(tags.content, secrets)
        shown_tags = {t["keyword"]: t["value"] for t in tags.json()["tags"]}
        assert shown_tags["PatientID"] == sample_ds.PatientID and tags.json()["study_uid"] in study_of
        frame = bob.get(f"{VIEWER}/instances/{sample_ds.SOPInstanceUID}/frames/1.png")
        assert frame.status_code == 200 and frame.content.startswith(b"\x89PNG")

        # A real UID in the URL finds nothing, and the attempt is on the audit trail.
        brain = next(p for p in cached.values() if dcmread(p, stop_before_pixels=True).StudyInstanceUID == uids[0])
        real = dcmread(brain, stop_before_pixels=True)
        assert bob.get(f"{WEB}/studies/{uids[0]}/metadata").status_code == 404
        assert bob.get(f"{WEB}/studies/{uids[0]}/series/{real.SeriesInstanceUID}/instances/{real.SOPInstanceUID}",
                       headers={"Accept": AS_STORED}).status_code == 404
        assert bob.get(f"{VIEWER}/studies/{uids[0]}").status_code == 404
        assert bob.get(f"{VIEWER}/instances/{real.SOPInstanceUID}/tags").status_code == 404
        probes = [json.loads(e.detail) for e in ctx.audit.list(ADMIN, AuditFilter(action="denied", project_id="gamma"))]
        assert sum(p["reason"] == ORIGINAL_UID for p in probes) >= 4

        # Every read through these doors is on record with the policy and profile applied.
        reads = [json.loads(e.detail) for action in ("view", "download")
                 for e in ctx.audit.list(ADMIN, AuditFilter(action=action, project_id="gamma"))]
        doors = [r for r in reads if r.get("via") in ("dicomweb", "viewer")]
        assert {r["via"] for r in doors} == {"dicomweb", "viewer"}
        assert all(r["export"] == "deidentified" and r["profile"] == ["basic", "retain_longitudinal_modified_dates"]
                   for r in doors)

        # The doors' refusals stand: a non-member, then everyone once the IRB approval has ended.
        carol = api(ctx, tokens["carol"])
        assert carol.get(f"{WEB}/studies").status_code == 403
        assert carol.get(f"{VIEWER}/tree").status_code == 403
        clock.advance(days=365 * 80)
        bob = api(ctx, ctx.accounts.create_token(ADMIN, "bob", "after the IRB", 30).secret)
        for path in (f"{WEB}/studies", f"{WEB}/studies/{sample_ds.StudyInstanceUID}/metadata", f"{VIEWER}/tree",
                     f"{VIEWER}/instances/{sample_ds.SOPInstanceUID}/frames/1.png"):
            refused = bob.get(path)
            assert refused.status_code == 403 and "IRB" in refused.text, (path, refused.text)


def test_pseudonyms_are_found_back_per_project_including_instances_cached_since(tmp_path: Path,
                                                                               database_url: str) -> None:
    """The lookup table: filled by two processes at once without harm, per project (gamma's pseudonym means
    nothing in delta, whose key differs), and a study cached after the table was filled is found on first ask."""
    ctx = build_context(load_site(tmp_path / "site", database_url=database_url, extra=PROJECTS), clock=FakeClock())
    for project in ("gamma", "delta", "alpha"):
        for file in write_study(studies.BRAIN, tmp_path / "synthetic"):
            place(ctx, project, file)
    bob = api(ctx, tokens_for(ctx)["bob"])
    gamma = deid_reads(ctx, "gamma")
    assert gamma is not None
    filling = [threading.Thread(target=fill, args=(ctx, gamma)) for _ in range(2)]
    for thread in filling:
        thread.start()
    for thread in filling:
        thread.join()
    with ctx.sessions() as session:
        levels = [row.level for row in session.query(DeidUid).filter_by(project_id="gamma")]
    assert sorted(levels) == ["instance"] * 6 + ["series"] * 3 + ["study"]

    (study,) = values(bob.get(f"{WEB}/studies").json(), STUDY_UID)
    assert bob.get(f"{WEB}/studies/{study}/metadata").status_code == 200
    elsewhere = bob.get(f"/dicomweb/projects/delta/studies/{study}/metadata")
    assert elsewhere.status_code == 404 and "pseudonymous" in elsewhere.json()["error"]
    (delta_study,) = values(bob.get("/dicomweb/projects/delta/studies").json(), STUDY_UID)
    assert delta_study != study and bob.get(f"/dicomweb/projects/delta/studies/{delta_study}").status_code == 200

    added = write_study(studies.BRAIN_FOLLOW_UP, tmp_path / "later")
    for file in added:
        place(ctx, "gamma", file)
    later = gamma.uid(studies.uid(studies.BRAIN_FOLLOW_UP))
    assert len(bob.get(f"{WEB}/studies/{later}/metadata").json()) == len(added)
    opened = bob.get(f"{VIEWER}/studies/{later}").json()
    assert sum(len(series["instances"]) for series in opened["series"]) == len(added)
    # A made-up UID is not a probe of a real one: refused, not put on record as one.
    assert bob.get(f"{WEB}/studies/2.25.12345/metadata").status_code == 404
    probes = [json.loads(e.detail) for e in ctx.audit.list(ADMIN, AuditFilter(action="denied"))]
    assert not [p for p in probes if p["reason"] == ORIGINAL_UID]
    # The identified project next door is unchanged: real UIDs, real patient.
    identified = bob.get("/dicomweb/projects/alpha/studies").json()
    assert values(identified, STUDY_UID) == {studies.uid(studies.BRAIN)} and values(identified, PATIENT_ID) == {"000123"}
    ctx.engine.dispose()
