"""The honest broker: after a real de-identified download filled the mapping, the project's lead and admins
turn pseudonyms (PatientID, Study, Series, SOP Instance UIDs) back into originals, each call audited with its
justification; members, auditors and other projects' leads are refused (and audited), bad input and unknown
pseudonyms get clear errors, and no answer or log line carries the mapping or the key to anyone else."""

from __future__ import annotations

import io
import json
import logging
import zipfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from typer.testing import CliRunner

from mi2b2.adapters.db.tables import DeidKey
from mi2b2.api.app import create_app
from mi2b2.cli.main import app as cli
from mi2b2.client import Mi2b2Client
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied, NotFound
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.export.deid import record_mappings
from mi2b2.services.reidentify import reidentify
from mi2b2.synthetic import write_study
from mi2b2.testing import FakeClock
from support import studies
from support.deid import ROOT, api, gamma_project, tokens_for
from support.site import load_site
from support.viewing import place, serving

REASON = "Incidental finding in series 2; IRB amendment 2026P000777-A3 allows recontact"
ROUTE = "/api/v1/projects/{}/deidentification/reidentify"
PROJECTS = gamma_project(options=()) + gamma_project(
    options=(), members='{ login = "carol", role = "lead" }', project_id="epsilon", irb="2026P000779")


@pytest.fixture
def site(tmp_path: Path) -> Iterator[tuple[ServiceContext, dict[str, str], dict[str, dict[str, str]]]]:
    """gamma and epsilon each hold the same study; bob (gamma) and carol (epsilon) each downloaded it de-identified.
    Yields the context, tokens, and per project the pseudonyms the download handed out (kind -> pseudonym)."""
    ctx = build_context(load_site(tmp_path / "site", extra=PROJECTS), clock=FakeClock())
    tokens = tokens_for(ctx, (("alice", "researcher"), ("bob", "researcher"), ("carol", "researcher"),
                              ("dana", "auditor"), ("root", "admin")))
    for project in ("gamma", "epsilon"):
        for file in write_study(studies.BRAIN, tmp_path / "synthetic"):
            place(ctx, project, file)
    handed_out = {}
    for project, login in (("gamma", "bob"), ("epsilon", "carol")):
        answer = api(ctx, tokens[login]).post(f"/api/v1/projects/{project}/download",
                                              json={"study_uids": [studies.uid(studies.BRAIN)]})
        assert answer.status_code == 200, answer.text
        with zipfile.ZipFile(io.BytesIO(answer.content)) as archive:
            first = next(n for n in archive.namelist() if n.endswith(".dcm"))
            ds = dcmread(io.BytesIO(archive.read(first)))
        handed_out[project] = {"patient": str(ds.PatientID), "study": str(ds.StudyInstanceUID),
                               "series": str(ds.SeriesInstanceUID), "instance": str(ds.SOPInstanceUID)}
    yield ctx, tokens, handed_out
    ctx.engine.dispose()


def originals_of(project_files: Path) -> dict[str, str]:
    ds = dcmread(project_files, stop_before_pixels=True)
    return {"patient": str(ds.PatientID), "study": str(ds.StudyInstanceUID), "series": str(ds.SeriesInstanceUID),
            "instance": str(ds.SOPInstanceUID)}


def audit_rows(ctx: ServiceContext, action: str) -> list[dict[str, object]]:
    return [{"actor": e.actor, "outcome": e.outcome, "patient_id": e.patient_id, **json.loads(e.detail)}
            for e in ctx.audit.list(ROOT, AuditFilter(action=action, project_id="gamma"))]


def test_the_lead_and_an_admin_get_the_originals_on_the_record(
        site: tuple[ServiceContext, dict[str, str], dict[str, dict[str, str]]], tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    ctx, tokens, handed_out = site
    pseudonyms = handed_out["gamma"]
    study_uid = studies.uid(studies.BRAIN)
    files = {originals_of(p)["instance"]: originals_of(p) for p in (tmp_path / "synthetic").rglob("*.dcm")}
    alice = api(ctx, tokens["alice"])
    caplog.set_level(logging.DEBUG)
    found = {}
    for kind, pseudonym in pseudonyms.items():
        answer = alice.post(ROUTE.format("gamma"), json={"pseudonym": pseudonym, "justification": REASON})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["pseudonym"] == pseudonym and body["audit_seq"] > 0
        (original,) = body["originals"]
        assert original["kind"] == kind
        found[kind] = original
    assert found["patient"]["original"] == found["patient"]["patient_id"] == "000123"
    assert found["study"] == {"kind": "study", "original": study_uid, "study_uid": study_uid, "patient_id": "000123"}
    instance = files[found["instance"]["original"]]  # a real SOP Instance UID of the cached study
    assert found["series"]["original"] == instance["series"] and found["instance"]["study_uid"] == study_uid
    # Nothing of it in the ordinary log.
    assert "000123" not in caplog.text and study_uid not in caplog.text and REASON not in caplog.text

    # An admin, through the Python client over real HTTP and through the CLI.
    with serving(create_app(ctx)) as url:
        with Mi2b2Client(url, tokens["root"]) as client:
            answer = client.reidentify("gamma", pseudonyms["study"], REASON)
        assert [o.original for o in answer.originals] == [study_uid]
        result = CliRunner().invoke(cli, ["reidentify", "gamma", pseudonyms["patient"], "--reason", REASON,
                                          "--server", url, "--token", tokens["root"], "--format", "json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)[0]["original"] == "000123"

    rows = audit_rows(ctx, "reidentify")
    assert [(r["actor"], r["outcome"]) for r in rows] == [("alice", "ok")] * 4 + [("root", "ok")] * 2
    assert all(r["justification"] == REASON and r["operation"] == "reidentify" for r in rows)
    assert {r["pseudonym"] for r in rows} == set(pseudonyms.values())
    assert all(r["patient_id"] == "000123" for r in rows)  # the disclosed patient, searchable in the trail
    assert any(r["found"] == [{"kind": "instance", "original": found["instance"]["original"]}] for r in rows)


def test_members_auditors_and_other_leads_are_refused_audited_and_told_nothing(
        site: tuple[ServiceContext, dict[str, str], dict[str, dict[str, str]]]) -> None:
    ctx, tokens, handed_out = site
    study_uid = studies.uid(studies.BRAIN)
    for login in ("bob", "dana", "carol"):
        for pseudonym in handed_out["gamma"].values():
            answer = api(ctx, tokens[login]).post(ROUTE.format("gamma"),
                                                  json={"pseudonym": pseudonym, "justification": REASON})
            assert answer.status_code == 403, answer.text
            assert "only its lead or an admin" in answer.json()["error"]
            assert "000123" not in answer.text and study_uid not in answer.text
    denied = [r for r in audit_rows(ctx, "denied") if r.get("operation") == "reidentify"]
    assert sorted({str(r["actor"]) for r in denied}) == ["bob", "carol", "dana"] and len(denied) == 12
    assert all(r["outcome"] == "denied" and r["justification"] == REASON and r["patient_id"] is None
               for r in denied)
    assert audit_rows(ctx, "reidentify") == []
    # carol leads epsilon: gamma's pseudonyms mean nothing there (each project has its own key) ...
    answer = api(ctx, tokens["carol"]).post(ROUTE.format("epsilon"), json={
        "pseudonym": handed_out["gamma"]["patient"], "justification": REASON})
    assert answer.status_code == 404 and "000123" not in answer.text
    # ... and her own do.
    answer = api(ctx, tokens["carol"]).post(ROUTE.format("epsilon"), json={
        "pseudonym": handed_out["epsilon"]["patient"], "justification": REASON})
    assert answer.status_code == 200 and answer.json()["originals"][0]["original"] == "000123"
    assert handed_out["epsilon"]["patient"] != handed_out["gamma"]["patient"]


def test_a_justification_is_required_and_bounded_and_an_unknown_pseudonym_is_not_found(
        site: tuple[ServiceContext, dict[str, str], dict[str, dict[str, str]]]) -> None:
    ctx, tokens, handed_out = site
    alice = api(ctx, tokens["alice"])
    pseudonym = handed_out["gamma"]["patient"]
    missing = alice.post(ROUTE.format("gamma"), json={"pseudonym": pseudonym})
    assert missing.status_code == 422 and "justification" in missing.text
    huge = alice.post(ROUTE.format("gamma"), json={"pseudonym": pseudonym, "justification": "x" * 100_000})
    assert huge.status_code == 422 and "000123" not in huge.text
    cases = {"too short": ("ok", "at least 10 characters"), "oversized": ("y" * 1001, "at most 1000"),
             "control characters": ("a reason\x1b[2J with an escape", "control characters"),
             "blank": (" " * 20, "at least 10 characters")}
    for _case, (justification, hint) in cases.items():
        answer = alice.post(ROUTE.format("gamma"), json={"pseudonym": pseudonym, "justification": justification})
        assert answer.status_code == 422 and hint in answer.json()["error"], answer.text
        assert "000123" not in answer.text
    for bad in ("P' OR 1=1 --", "../deid_keys", "2.25." + "9" * 100):
        answer = alice.post(ROUTE.format("gamma"), json={"pseudonym": bad, "justification": REASON})
        assert answer.status_code == 422 and "pseudonym" in answer.json()["error"]
    for unknown in ("PAAAAAAAAAAAA", "2.25.1234567890", studies.uid(studies.BRAIN), "000123"):
        answer = alice.post(ROUTE.format("gamma"), json={"pseudonym": unknown, "justification": REASON})
        assert answer.status_code == 404 and "handed out no pseudonym" in answer.json()["error"], answer.text
    failed = audit_rows(ctx, "reidentify")
    assert len(failed) == len(cases) + 3 + 4 and {r["outcome"] for r in failed} == {"failed"}
    reasons = [str(r["reason"]) for r in failed]
    assert reasons.count("unknown pseudonym") == 4 and sum("control characters" in r for r in reasons) == 1
    assert all(len(str(r["justification"])) <= 1000 for r in failed)
    # A member with bad input is still refused as a member (no hint whether the input would have worked).
    bob = api(ctx, tokens["bob"]).post(ROUTE.format("gamma"), json={"pseudonym": "x", "justification": "x"})
    assert bob.status_code == 403


def test_no_route_hands_out_the_pseudonym_key(
        site: tuple[ServiceContext, dict[str, str], dict[str, dict[str, str]]]) -> None:
    ctx, tokens, _handed_out = site
    with ctx.sessions() as session:
        secrets = [row.secret for row in session.query(DeidKey).all()]
    assert len(secrets) == 2
    app = create_app(ctx)
    root, alice = api(ctx, tokens["root"]), api(ctx, tokens["alice"])
    paths = [path.replace("{project_id}", "gamma").replace("{project}", "gamma")
             for path, methods in app.openapi()["paths"].items() if "get" in methods] + ["/metrics"]
    read = 0
    for path in paths:
        if "{" in path:
            continue
        for client in (root, alice):
            answer = client.get(path)
            read += 1
            assert not any(secret in answer.text for secret in secrets), path
    assert read > 40
    # No route, client or CLI module reads the key table itself: only services do, to de-identify.
    source = Path(__file__).resolve().parents[2] / "src" / "mi2b2"
    doors = [p for folder in ("api", "client", "cli") for p in (source / folder).rglob("*.py")]
    assert len(doors) > 20
    assert [p.name for p in doors if "DeidKey" in p.read_text() or "deid_keys" in p.read_text()] == []


def test_the_service_itself_refuses_a_member_and_names_an_unknown_project(
        site: tuple[ServiceContext, dict[str, str], dict[str, dict[str, str]]]) -> None:
    ctx, _tokens, handed_out = site
    with pytest.raises(AccessDenied):
        reidentify(ctx, Principal("bob", Role.RESEARCHER), "gamma", handed_out["gamma"]["patient"], REASON)
    with pytest.raises(NotFound, match="no project 'nope'"):
        reidentify(ctx, ROOT, "nope", handed_out["gamma"]["patient"], REASON)
    answer = reidentify(ctx, ROOT, "gamma", handed_out["gamma"]["series"], REASON)
    assert [o.kind for o in answer.originals] == ["series"]
    # A patient whose files named an issuer is mapped as "issuer/ID"; the audit's patient column gets the ID.
    record_mappings(ctx, "gamma", [("patient", "urn:oid:1.2.3/HOSP/000123", "PISSUERISSUER")])
    (original,) = reidentify(ctx, ROOT, "gamma", "PISSUERISSUER", REASON).originals
    assert (original.original, original.patient_id) == ("urn:oid:1.2.3/HOSP/000123", "000123")
    (event,) = [e for e in ctx.audit.list(ROOT, AuditFilter(action="reidentify")) if "PISSUERISSUER" in e.detail]
    assert event.patient_id == "000123"


def test_after_the_irb_approval_ends_only_an_admin_re_identifies(
        site: tuple[ServiceContext, dict[str, str], dict[str, dict[str, str]]]) -> None:
    ctx, _tokens, handed_out = site
    assert isinstance(ctx.clock, FakeClock)
    ctx.clock.advance(days=30_000)  # past gamma's expiry, 2099-12-31
    tokens = {login: ctx.accounts.create_token(ROOT, login, "later", 30).secret for login in ("alice", "root")}
    body = {"pseudonym": handed_out["gamma"]["patient"], "justification": REASON}
    refused = api(ctx, tokens["alice"]).post(ROUTE.format("gamma"), json=body)
    assert refused.status_code == 403 and "IRB approval has ended" in refused.json()["error"]
    assert "000123" not in refused.text
    (denied,) = [r for r in audit_rows(ctx, "denied") if r.get("operation") == "reidentify"]
    assert denied["actor"] == "alice" and denied["justification"] == REASON
    answer = api(ctx, tokens["root"]).post(ROUTE.format("gamma"), json=body)
    assert answer.status_code == 200 and answer.json()["originals"][0]["original"] == "000123"
