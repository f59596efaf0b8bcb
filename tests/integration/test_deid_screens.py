"""A de-identified project's screens and the honest broker's workflow, against a real PACS (pynetdicom's qrscp).

The lead searches and requests (identifiers, audited); a member's search or request is refused naming who may.
The member's cache list, cached study, request log and notifications, through the API and the CLI, carry no
identifier: the downloads' pseudonyms, shifted dates. Those pseudonyms work for download, show, forward and
delete; the lead re-identifies one on the record. An identified project's screens are as before."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from mi2b2.api.app import create_app
from mi2b2.cli.main import app as cli
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext
from mi2b2.synthetic import write_study
from mi2b2.testing import FakeClock
from support import studies
from support.deid import (
    ACCESSION,
    PATIENT,
    PATIENT_NAME,
    ROOT,
    SECRETS,
    STUDY_DATE,
    api,
    brain_in,
    gamma_project,
    sample_study,
    tokens_for,
)
from support.pacs import free_port, start_qrscp
from support.pipeline import Pipeline, retrieval_site
from support.site import pacs_block
from support.viewing import serving

SAMPLE = "1.2.826.0.1.3680043.8.498.931"
REASON = "Recontact approved under IRB amendment 2026P000777-A4"
PROJECTS = gamma_project() + """
    [[destinations]]
    id = "xnat"
    ae_title = "XNAT"
    host = "127.0.0.1"
    port = 11999
"""


@pytest.fixture(scope="module")
def qrscp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int, list[Path]]]:
    folder = tmp_path_factory.mktemp("deid-screens")
    files = [*sample_study(folder / "sample", SAMPLE, {"CT_small.dcm": 1, "MR_small_bigendian.dcm": 2}),
             *write_study(studies.BRAIN, folder / "brain")]
    receiver_port = free_port()
    pacs = start_qrscp(tmp_path_factory.mktemp("qrscp"), move_destinations={"MI2B2": ("127.0.0.1", receiver_port)})
    try:
        pacs.load(files)
        yield pacs.port, receiver_port, files
    finally:
        pacs.stop()


def originals_of(files: list[Path]) -> set[str]:
    """Every identifier the cached files carry that a member must never see."""
    found = set(SECRETS) | {"000123", STUDY_DATE}
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        found |= {str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.PatientName), str(ds.StudyDate),
                  str(ds.get("AccessionNumber", ""))}
    return {value for value in found if len(value) >= 5}


def leaked(text: str, secrets: set[str]) -> list[str]:
    return sorted(secret for secret in secrets if secret in text)


@pytest.mark.pacs
def test_the_lead_searches_and_a_member_works_from_pseudonyms_only(
        tmp_path: Path, qrscp: tuple[int, int, list[Path]]) -> None:
    pacs_port, receiver_port, files = qrscp
    secrets = originals_of(files)
    site = retrieval_site(tmp_path, receiver_port, pacs_block("main", "QRSCP", pacs_port, 'retrieve = "c-move"\n'),
                          projects=PROJECTS)
    with Pipeline(site, clock=FakeClock()) as pipe:
        ctx = pipe.ctx
        tokens = tokens_for(ctx)
        alice, bob = api(ctx, tokens["alice"]), api(ctx, tokens["bob"])
        search = {"project": "gamma", "pacs": "main", "mrns": f"{PATIENT}\n000123"}

        # A member may neither search nor request: refused, naming who may, audited.
        for path, body in (("/api/v1/search/patients", search), ("/api/v1/search/studies", search),
                           ("/api/v1/requests", {"project": "gamma", "pacs": "main",
                                                 "studies": [{"study_uid": SAMPLE}]})):
            refused = bob.post(path, json=body)
            assert refused.status_code == 403, refused.text
            message = refused.json()["error"]
            assert "is de-identified: only its lead or a site admin may search" in message and "(alice)" in message
        denied = [json.loads(e.detail) for e in ctx.audit.list(ROOT, AuditFilter(action="denied", actor="bob"))]
        assert len(denied) == 3 and {d["operation"] for d in denied} == {"search", "request studies"}

        # The lead searches (identifiers, the query audited with the policy) and requests.
        found = alice.post("/api/v1/search/studies", json=search)
        assert found.status_code == 200, found.text
        hits = found.json()["studies"]
        assert {h["patient_id"] for h in hits} == {PATIENT, "000123"}
        (query,) = [json.loads(e.detail) for e in ctx.audit.list(ROOT, AuditFilter(action="query", actor="alice"))]
        assert (query["export"], query["view"], query["profile"][0]) == ("deidentified", "identified", "basic")
        uids = sorted(h["study_uid"] for h in hits)
        added = alice.post("/api/v1/requests", json={"project": "gamma", "pacs": "main",
                                                     "studies": [{"study_uid": u} for u in uids]})
        assert added.status_code < 300, added.text
        rows = pipe.wait(added.json()["created"])
        assert [r.state for r in rows] == ["completed"] * len(uids), [(r.state, r.last_error) for r in rows]

        # The member's cache list: pseudonyms, shifted dates, nothing else identifying.
        listed = bob.get("/api/v1/projects/gamma/cache")
        assert listed.status_code == 200 and leaked(listed.text, secrets) == []
        cached = listed.json()["studies"]
        assert len(cached) == len(uids)
        assert all(s["study_uid"].startswith("2.25.") and s["patient_id"].startswith("P") and s["patient_name"] == ""
                   and s["accession"] == "" and len(s["study_date"]) == 8 for s in cached)
        # The lead's cache list is the same pseudonymous view.
        assert alice.get("/api/v1/projects/gamma/cache").json()["studies"] == cached

        # What a member downloads is named as the list named it.
        sample = next(s for s in cached if s["instance_count"] == 2)  # the brain study has 6
        zipped = bob.post("/api/v1/projects/gamma/download", json={"study_uids": [sample["study_uid"]]})
        assert zipped.status_code == 200, zipped.text
        with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
            first = dcmread(io.BytesIO(archive.read(next(n for n in archive.namelist() if n.endswith(".dcm")))))
        assert (first.StudyInstanceUID, first.PatientID, first.StudyDate) == (
            sample["study_uid"], sample["patient_id"], sample["study_date"])
        shown = bob.get(f"/api/v1/projects/gamma/cache/studies/{sample['study_uid']}")
        assert shown.status_code == 200 and leaked(shown.text, secrets) == []
        assert all(s["series_uid"].startswith("2.25.") for s in shown.json()["series"])

        # The request log: pseudonyms for the member (also filtered by one), identifiers for the lead.
        log = bob.get("/api/v1/projects/gamma/requests")
        assert log.status_code == 200 and leaked(log.text, secrets) == []
        assert {r["study_uid"] for r in log.json()} == {s["study_uid"] for s in cached}
        mine = bob.get("/api/v1/projects/gamma/requests/page", params={"patient_id": sample["patient_id"]}).json()
        assert [r["study_uid"] for r in mine["rows"]] == [sample["study_uid"]]
        assert {r["patient_id"] for r in alice.get("/api/v1/projects/gamma/requests").json()} == {PATIENT, "000123"}

        # The CLI over real HTTP: cache list, request list and a member's search.
        with serving(create_app(ctx)) as url:
            auth = ["--server", url, "--token", tokens["bob"]]
            for command in (["cache", "list", "gamma"], ["request", "list", "gamma"]):
                result = CliRunner().invoke(cli, [*command, *auth, "--format", "csv"])
                assert result.exit_code == 0, result.output
                assert leaked(result.stdout, secrets) == [] and sample["study_uid"] in result.stdout
                assert list(csv.DictReader(io.StringIO(result.stdout)))
            run = subprocess.run(  # the real entry point: one clear line, exit code 2
                [sys.executable, "-m", "mi2b2", "search", "patients", PATIENT, "--project", "gamma", "--pacs", "main",
                 *auth], capture_output=True, text=True, timeout=120, check=False,
                env={"PATH": "/usr/bin:/bin", "COLUMNS": "300", "PYTHONPATH": os.pathsep.join(sys.path)})
            assert run.returncode == 2 and "only its lead or a site admin may search" in run.stderr, run.stderr
            assert "Traceback" not in run.stderr + run.stdout

            # Forward and delete by pseudonym; the forward's notice tells the member nothing identifying.
            forwarded = bob.post("/api/v1/projects/gamma/forward",
                                 json={"destination": "xnat", "study_uids": [sample["study_uid"]]})
            assert forwarded.status_code < 300 and leaked(forwarded.text, secrets) == [], forwarded.text
            assert bob.post("/api/v1/requests/cancel", json={"ids": forwarded.json()["created"]}).status_code == 200
            result = CliRunner().invoke(cli, ["notifications", *auth])
            assert result.exit_code == 0 and "1 forward" in result.stdout and "canceled" in result.stdout
            assert leaked(result.stdout, secrets) == []
        for login in ("alice", "bob"):
            notes = api(ctx, tokens[login]).get("/api/v1/notifications").json()
            assert notes and leaked(json.dumps(notes), secrets) == [], login
        deleted = bob.post("/api/v1/projects/gamma/cache/delete", json={"study_uids": [sample["study_uid"]]})
        assert deleted.status_code == 200 and deleted.json()["deleted"] == [sample["study_uid"]], deleted.text
        assert len(bob.get("/api/v1/projects/gamma/cache").json()["studies"]) == len(uids) - 1

        # Every pseudonymous listing is on the record with its policy; the lead turns a pseudonym shown back.
        lists = [json.loads(e.detail) for e in ctx.audit.list(ROOT, AuditFilter(action="list", project_id="gamma"))]
        assert {d["operation"] for d in lists} >= {"cache list", "cached study", "request log"}
        assert all(d["export"] == "deidentified" and d["view"] == "pseudonymous" and d["profile"][0] == "basic"
                   for d in lists)
        answer = alice.post("/api/v1/projects/gamma/deidentification/reidentify",
                            json={"pseudonym": sample["patient_id"], "justification": REASON})
        assert answer.status_code == 200 and answer.json()["originals"][0]["original"] == PATIENT


@pytest.fixture
def placed(tmp_path: Path) -> Iterator[tuple[ServiceContext, dict[str, str]]]:
    with brain_in(tmp_path, PROJECTS, ("gamma", "alpha")) as placed_site:
        yield placed_site


def test_forged_pseudonyms_find_nothing_and_an_identified_project_is_unchanged(
        placed: tuple[ServiceContext, dict[str, str]]) -> None:
    ctx, tokens = placed
    bob = api(ctx, tokens["bob"])
    uid = studies.uid(studies.BRAIN)
    pseudonym = bob.get("/api/v1/projects/gamma/cache").json()["studies"][0]["study_uid"]
    forged = "2.25.1234567890123456789"
    for path, body in (("/download", {"study_uids": [forged]}), ("/cache/delete", {"study_uids": [forged]})):
        answer = bob.post(f"/api/v1/projects/gamma{path}", json=body)
        assert answer.status_code == 404 and "mi2b2 cache list gamma" in answer.json()["error"], answer.text
    assert bob.get(f"/api/v1/projects/gamma/cache/studies/{forged}").status_code == 404
    forward = bob.post("/api/v1/projects/gamma/forward", json={"destination": "xnat", "study_uids": [forged]})
    assert forward.status_code < 300 and forward.json()["not_cached"] == [forged]
    # gamma's pseudonym means nothing in alpha, whose screens show the study as stored, unaudited as before.
    alpha = bob.get("/api/v1/projects/alpha/cache").json()["studies"]
    assert [(s["study_uid"], s["patient_id"]) for s in alpha] == [(uid, "000123")]
    assert bob.post("/api/v1/projects/alpha/cache/delete", json={"study_uids": [pseudonym]}).status_code == 404
    assert ctx.audit.list(ROOT, AuditFilter(action="list", project_id="alpha")) == []
    # The original UID still names a study (its lead knows it), and the report says it back as it was named.
    deleted = bob.post("/api/v1/projects/gamma/cache/delete", json={"study_uids": [uid]})
    assert deleted.status_code == 200 and deleted.json()["deleted"] == [uid]
    assert ACCESSION not in deleted.text and PATIENT_NAME not in deleted.text
