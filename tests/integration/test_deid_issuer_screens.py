"""A de-identified project's screens name a patient as its files do when the files carry an Issuer of Patient ID.

The files' pseudonym and date shift are made from (IssuerOfPatientID, PatientID); the cache list, a cached
study and a member's request log must show the same ones, and record for the broker the original as downloads
do (``issuer/ID``). A study cached before the issuer was kept (its row's issuer NULL, as revision 0014 leaves
it) learns the issuer from one of its files on first show, and is named as its files are from then on."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import text

from mi2b2.domain.deid.pseudonyms import Pseudonymizer
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.export.deid import project_key
from mi2b2.synthetic import write_study
from mi2b2.testing import FakeClock
from support import studies
from support.deid import PATIENT, api, gamma_project, sample_study, tokens_for
from support.pacs import free_port, start_qrscp
from support.pipeline import Pipeline, retrieval_site
from support.site import load_site, pacs_block
from support.viewing import place

ISSUED = "1.2.826.0.1.3680043.8.498.941"  # a study whose files name an issuer
ISSUER = "GENERAL_HOSPITAL_MRN"
REASON = "Recontact approved under IRB amendment 2026P000777-A4"


@pytest.fixture(scope="module")
def qrscp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    folder = tmp_path_factory.mktemp("deid-issuer")
    files = sample_study(folder / "sample", ISSUED, {"CT_small.dcm": 1, "MR_small.dcm": 2}, issuer=ISSUER)
    receiver_port = free_port()
    pacs = start_qrscp(tmp_path_factory.mktemp("qrscp"), move_destinations={"MI2B2": ("127.0.0.1", receiver_port)})
    try:
        pacs.load(files)
        yield pacs.port, receiver_port
    finally:
        pacs.stop()


def downloaded(member: TestClient, study_uid: str) -> set[tuple[str, str, str]]:
    """(PatientID, IssuerOfPatientID, StudyDate) of every file a member downloads of the study named so."""
    zipped = member.post("/api/v1/projects/gamma/download", json={"study_uids": [study_uid]})
    assert zipped.status_code == 200, zipped.text
    found = set()
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
        for name in archive.namelist():
            if name.endswith(".dcm"):
                ds = dcmread(io.BytesIO(archive.read(name)), stop_before_pixels=True)
                found.add((str(ds.PatientID), str(ds.get("IssuerOfPatientID", "")), str(ds.StudyDate)))
    assert found
    return found


def issuers_stored(ctx: ServiceContext) -> dict[str, str | None]:
    with ctx.engine.connect() as connection:
        return {uid: issuer for uid, issuer in connection.execute(text(
            "select study_uid, patient_id_issuer from cached_studies where project_id = 'gamma'"))}


def forget_issuers(ctx: ServiceContext) -> None:
    """The rows as revision 0014 leaves a study cached before it: issuer not known."""
    with ctx.engine.begin() as connection:
        connection.execute(text("update cached_studies set patient_id_issuer = null"))
    assert set(issuers_stored(ctx).values()) == {None}


@pytest.mark.pacs
def test_every_screen_names_the_patient_as_the_files_do(tmp_path: Path, qrscp: tuple[int, int]) -> None:
    pacs_port, receiver_port = qrscp
    site = retrieval_site(tmp_path, receiver_port, pacs_block("main", "QRSCP", pacs_port, 'retrieve = "c-move"\n'),
                          projects=gamma_project())
    with Pipeline(site, clock=FakeClock()) as pipe:
        ctx = pipe.ctx
        tokens = tokens_for(ctx)
        alice, bob = api(ctx, tokens["alice"]), api(ctx, tokens["bob"])
        added = alice.post("/api/v1/requests", json={"project": "gamma", "pacs": "main",
                                                     "studies": [{"study_uid": ISSUED}]})
        assert added.status_code < 300, added.text
        rows = pipe.wait(added.json()["created"])
        assert [r.state for r in rows] == ["completed"], [(r.state, r.last_error) for r in rows]
        assert issuers_stored(ctx) == {ISSUED: ISSUER}  # kept at receipt, from the header the receiver read

        (listed,) = bob.get("/api/v1/projects/gamma/cache").json()["studies"]
        files = downloaded(bob, listed["study_uid"])
        (patient, issuer, date), = files
        # The files' pseudonym is made with the issuer (and the issuer itself removed): not the bare ID's.
        assert issuer == "" and patient != Pseudonymizer(project_key(ctx, "gamma")).patient_id(PATIENT)
        assert (listed["patient_id"], listed["study_date"]) == (patient, date)
        shown = bob.get(f"/api/v1/projects/gamma/cache/studies/{listed['study_uid']}").json()["study"]
        assert (shown["patient_id"], shown["study_date"]) == (patient, date)
        (logged,) = bob.get("/api/v1/projects/gamma/requests").json()
        assert (logged["study_uid"], logged["patient_id"]) == (listed["study_uid"], patient)
        request = bob.get(f"/api/v1/requests/{logged['id']}")
        assert request.status_code == 200 and request.json()["patient_id"] == patient, request.text
        # A member filters the request log by the pseudonym shown.
        page = bob.get("/api/v1/projects/gamma/requests/page", params={"patient_id": patient}).json()
        assert [r["id"] for r in page["rows"]] == [logged["id"]]

        # The broker's table holds one patient pseudonym, named issuer/ID as downloads name it.
        with ctx.engine.connect() as connection:
            assert [tuple(row) for row in connection.execute(text(
                "select original, pseudonym from deid_mappings where project_id = 'gamma' and kind = 'patient'"
            ))] == [(f"{ISSUER}/{PATIENT}", patient)]
        answer = alice.post("/api/v1/projects/gamma/deidentification/reidentify",
                            json={"pseudonym": patient, "justification": REASON})
        assert answer.status_code == 200 and answer.json()["originals"][0]["original"] == f"{ISSUER}/{PATIENT}"

        # A row cached before the issuer was kept: the request log learns it from the file, and stores it.
        forget_issuers(ctx)
        assert [r["patient_id"] for r in bob.get("/api/v1/projects/gamma/requests").json()] == [patient]
        assert issuers_stored(ctx) == {ISSUED: ISSUER}
        forget_issuers(ctx)
        assert bob.get(f"/api/v1/requests/{logged['id']}").json()["patient_id"] == patient
        assert issuers_stored(ctx) == {ISSUED: ISSUER}


@pytest.fixture
def placed(tmp_path: Path, database_url: str) -> Iterator[tuple[ServiceContext, TestClient]]:
    """Two studies placed in gamma's cache: the sample whose files name an issuer, a brain study with none."""
    ctx = build_context(load_site(tmp_path / "site", extra=gamma_project(), database_url=database_url),
                        clock=FakeClock())
    for file in [*sample_study(tmp_path / "sample", ISSUED, {"CT_small.dcm": 1}, issuer=ISSUER),
                 *write_study(studies.BRAIN, tmp_path / "brain")]:
        place(ctx, "gamma", file)
    yield ctx, api(ctx, tokens_for(ctx)["bob"])
    ctx.engine.dispose()


def test_a_study_cached_before_the_issuer_was_kept_learns_it_from_its_file(
        placed: tuple[ServiceContext, TestClient]) -> None:
    ctx, bob = placed
    brain = studies.uid(studies.BRAIN)
    assert issuers_stored(ctx) == {ISSUED: ISSUER, brain: ""}
    before = {s["patient_id"]: s for s in bob.get("/api/v1/projects/gamma/cache").json()["studies"]}

    forget_issuers(ctx)
    after = {s["patient_id"]: s for s in bob.get("/api/v1/projects/gamma/cache").json()["studies"]}
    assert after == before
    assert issuers_stored(ctx) == {ISSUED: ISSUER, brain: ""}  # learnt once: stored for the next screens
    for study in after.values():
        assert {(patient, date) for patient, _issuer, date in downloaded(bob, study["study_uid"])} == {
            (study["patient_id"], study["study_date"])}

    # A cached study shown on its own learns it too.
    forget_issuers(ctx)
    sample = next(s for s in after.values() if s["instance_count"] == 1)
    shown = bob.get(f"/api/v1/projects/gamma/cache/studies/{sample['study_uid']}").json()["study"]
    assert (shown["patient_id"], shown["study_date"]) == (sample["patient_id"], sample["study_date"])
    assert issuers_stored(ctx)[ISSUED] == ISSUER
