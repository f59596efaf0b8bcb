"""The admin endpoints of the API: every project at a glance, MRN allow-list upload, token revocation.

The allow-list's source of truth is the file the site configuration names, so
an upload is checked on disk, in the database, in the running configuration
and through a search, on SQLite and PostgreSQL. C-FIND is faked.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import AuditEvent, ProjectMrn, Request
from mi2b2.api.app import create_app
from mi2b2.services import cache
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.testing import FakeClock, FakeFindSession
from support.site import ALLOWED_A, ALLOWED_B, load_site
from support.viewing import ROOT, Cached, fill

PACS_STUDIES = [
    {"PatientID": pid, "PatientName": f"{pid}^TEST", "StudyInstanceUID": f"1.7.{n}", "AccessionNumber": f"A{n}",
     "StudyDate": "20200101", "NumberOfStudyRelatedInstances": "1"}
    for n, pid in enumerate(["000123", "77", "NEW-1"], 1)
]
GAMMA_SHARES_ALPHAS_FILE = """
[[projects]]
id = "gamma"
title = "Shares a file"
irb = "2026P000777"
expires = 2099-12-31
mrn_file = "alpha.mrns"
quota = "1 GiB"
institutions = ["general"]
"""


def make_context(folder: Path, database_url: str, extra: str = "") -> ServiceContext:
    config = load_site(folder, database_url=database_url, extra=extra)
    return build_context(config, clock=FakeClock(datetime(2026, 3, 2, 12, 0, tzinfo=UTC)),
                         open_find=lambda _c, _p: FakeFindSession(PACS_STUDIES))


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> Iterator[ServiceContext]:
    context = make_context(tmp_path / "site", database_url)
    yield context
    context.engine.dispose()


@pytest.fixture
def site(ctx: ServiceContext, tmp_path: Path) -> Cached:
    """Users with tokens (alice, bob, carol, dave researchers; root admin; audrey auditor) and filled caches."""
    return fill(ctx, tmp_path / "files")


@pytest.fixture
def client(ctx: ServiceContext) -> TestClient:
    return TestClient(create_app(ctx))


def allow_list(ctx: ServiceContext, project_id: str) -> set[str]:
    with ctx.sessions() as session:
        return set(session.scalars(select(ProjectMrn.mrn).where(ProjectMrn.project_id == project_id)))


def audit_events(ctx: ServiceContext, action: str) -> list[AuditEvent]:
    with ctx.sessions() as session:
        return list(session.scalars(select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.seq)))


def upload(client: TestClient, site: Cached, text: str, project: str = "alpha", login: str = "root") -> object:
    return client.post(f"/api/v1/admin/projects/{project}/mrns", json={"mrns": text}, headers=site.headers(login))


# who may ------------------------------------------------------------------------------


def test_only_an_admin_reaches_any_admin_endpoint(client: TestClient, site: Cached) -> None:
    """Every /api/v1/admin operation in the OpenAPI document, so endpoints added later are covered too."""
    routes = [(method.upper(), path) for path, operations in client.app.openapi()["paths"].items()  # type: ignore[attr-defined]
              if path.startswith("/api/v1/admin/") for method in operations]
    assert ("GET", "/api/v1/admin/projects") in routes and ("POST", "/api/v1/admin/projects/{project_id}/mrns") in routes
    for method, template in routes:
        path = re.sub(r"{\w+}", lambda m: "alpha" if "project" in m.group(0) else "1", template)
        body = {"mrns": "000123"} if path.endswith("/mrns") else {} if method == "POST" else None
        assert client.request(method, path, json=body).status_code == 401, f"{method} {path} without a login"
        for login in ("alice", "bob", "audrey"):
            response = client.request(method, path, json=body, headers=site.headers(login))
            assert response.status_code == 403, f"{method} {path} as {login}: {response.status_code}"
            assert "admin" in response.json()["error"]
    assert allow_list(client.app.state.context, "alpha") == set(ALLOWED_A)  # type: ignore[attr-defined]


def test_an_admin_may_revoke_any_users_token(client: TestClient, ctx: ServiceContext, site: Cached) -> None:
    (alices,) = ctx.accounts.list_tokens("alice")
    (carols,) = ctx.accounts.list_tokens("carol")
    assert client.get("/api/v1/auth/me", headers=site.headers("alice")).status_code == 200
    refused = client.delete(f"/api/v1/auth/tokens/{carols.id}", headers=site.headers("bob"))
    assert refused.status_code == 403 and "only your own" in refused.json()["error"]
    revoked = client.delete(f"/api/v1/auth/tokens/{alices.id}", headers=site.headers("root"))
    assert revoked.status_code == 200 and revoked.json() == {"status": "revoked"}
    assert client.get("/api/v1/auth/me", headers=site.headers("alice")).status_code == 401
    listed = {t["id"]: t for t in client.get("/api/v1/admin/tokens", headers=site.headers("root")).json()}
    assert listed[alices.id]["revoked_at"] is not None and listed[carols.id]["revoked_at"] is None
    missing = client.delete("/api/v1/auth/tokens/99999", headers=site.headers("root"))
    assert missing.status_code == 404 and "mi2b2 admin token list" in missing.json()["error"]
    assert [json.loads(e.detail) for e in audit_events(ctx, "token_admin") if e.actor == "root"][-1] == \
        {"op": "revoke", "token": alices.id}


# every project ------------------------------------------------------------------------


def test_admin_lists_every_project_with_members_usage_and_allow_list(
    client: TestClient, ctx: ServiceContext, site: Cached
) -> None:
    # A running retrieval: its reserved bytes count as in flight.
    with transaction(ctx.sessions) as session:
        session.add(Request(kind="retrieve", project_id="alpha", user_login="alice", pacs_id="main", patient_id="77",
                            study_uid="1.7.2", state="processing", expected_bytes=5_000_000, bytes=1_000_000,
                            created_at=ctx.clock.now()))
    response = client.get("/api/v1/admin/projects", headers=site.headers("root"))
    assert response.status_code == 200
    projects = {p["id"]: p for p in response.json()}
    assert sorted(projects) == ["alpha", "beta"]
    alpha, beta = projects["alpha"], projects["beta"]
    assert {k: alpha[k] for k in ("title", "irb", "expires", "expired", "active", "institutions", "quota_bytes",
                                  "allow_list_size", "max_studies_per_patient")} == {
        "title": "Brain MRI cohort", "irb": "2026P000123", "expires": "2099-12-31", "expired": False, "active": True,
        "institutions": ["general"], "quota_bytes": 10 * 1024**3, "allow_list_size": len(ALLOWED_A),
        "max_studies_per_patient": 20,
    }
    assert alpha["members"] == [{"login": "alice", "role": "lead"}, {"login": "bob", "role": "researcher"}]
    assert alpha["mrn_file"].endswith("alpha.mrns")
    assert (beta["expired"], beta["allow_list_size"], beta["expires"]) == (True, len(ALLOWED_B), "2020-01-31")
    for project_id, row in projects.items():
        usage = cache.project_usage(ctx, ROOT, project_id)
        assert (row["used_bytes"], row["in_flight_bytes"]) == (usage.used_bytes, usage.in_flight_bytes)
        assert row["used_bytes"] > 0
    assert alpha["in_flight_bytes"] > 0 and beta["in_flight_bytes"] == 0
    # Patients stay out of an overview: no MRN of either list is in it.
    assert not [mrn for mrn in (*ALLOWED_A, *ALLOWED_B) if f'"{mrn}"' in response.text]


# allow-list upload ----------------------------------------------------------------------


def test_an_upload_replaces_the_allow_list_and_changes_who_can_be_searched(
    client: TestClient, ctx: ServiceContext, site: Cached
) -> None:
    def search(mrns: str) -> dict[str, object]:
        response = client.post("/api/v1/search/studies", json={"project": "alpha", "pacs": "main", "mrns": mrns},
                               headers=site.headers("alice"))
        assert response.status_code == 200, response.text
        return response.json()  # type: ignore[no-any-return]

    before = search("77\nNEW-1")
    assert before["refused"] == ["NEW-1"] and [s["patient_id"] for s in before["studies"]] == ["77"]

    # A CSV export with a names column: only the MRN column is kept, and no name reaches the file.
    response = upload(client, site, "MRN,Name\n000123,DOE^JOHN\nNEW-1,ROE^JANE\nNEW-1,ROE^JANE\n")
    assert response.status_code == 200, response.text
    report = response.json()
    assert (report["project_id"], report["allow_list_size"], report["duplicates"]) == ("alpha", 2, 1)
    assert report["file"].endswith("alpha.mrns")
    assert "allow-list of alpha (+1 -4)" in report["reload"]["changed"]
    assert report["reload"]["allow_list_sizes"]["alpha"] == 2

    written = Path(report["file"]).read_text()
    assert [line for line in written.splitlines() if not line.startswith("#")] == ["000123", "NEW-1"]
    assert "DOE" not in written and "ROE" not in written
    assert allow_list(ctx, "alpha") == {"000123", "NEW-1"}
    (alpha,) = [p for p in ctx.config.projects if p.id == "alpha"]
    assert ctx.config.allow_list(alpha) == [("general", "000123"), ("general", "NEW-1")]  # the running configuration too
    assert allow_list(ctx, "beta") == set(ALLOWED_B)

    after = search("77\nNEW-1")
    assert after["refused"] == ["77"] and [s["patient_id"] for s in after["studies"]] == ["NEW-1"]
    listed = client.get("/api/v1/admin/projects", headers=site.headers("root")).json()
    assert {p["id"]: p["allow_list_size"] for p in listed} == {"alpha": 2, "beta": len(ALLOWED_B)}

    (event,) = audit_events(ctx, "allow_list")
    assert (event.actor, event.project_id, event.outcome, event.patient_id) == ("root", "alpha", "ok", None)
    assert json.loads(event.detail) == {"op": "replace", "institution": "general", "count": 2, "duplicates": 1}
    for logged in (event, *audit_events(ctx, "config_reload")):
        # The reloaded file's path is the test's temp folder, whose number may contain an MRN's digits.
        detail = json.dumps({k: v for k, v in json.loads(logged.detail).items() if k != "file"})
        assert not [mrn for mrn in ("000123", "NEW-1", *ALLOWED_A) if mrn in detail], logged.detail


def test_a_bad_line_writes_nothing(client: TestClient, ctx: ServiceContext, site: Cached) -> None:
    file = Path(ctx.config.resolve(ctx.config.projects[0].mrn_file))
    original = file.read_bytes()
    response = upload(client, site, "000123\nNEW*2\nNEW-3\n")
    assert response.status_code == 422
    error = response.json()["error"]
    assert "line 2" in error and "wildcard" in error and "correct or remove it" in error and "Nothing was changed" in error
    empty = upload(client, site, "\n# nothing here\n")
    assert empty.status_code == 422 and "no MRNs found" in empty.json()["error"]
    too_long = upload(client, site, "000123\n" + "9" * 65 + "\n")
    assert too_long.status_code == 422 and "line 2" in too_long.json()["error"]
    assert file.read_bytes() == original
    assert allow_list(ctx, "alpha") == set(ALLOWED_A)
    assert audit_events(ctx, "allow_list") == [] and audit_events(ctx, "config_reload") == []
    assert not list(file.parent.glob(".alpha.mrns.*")), "no temp file left behind"


def test_an_unknown_project_is_404(client: TestClient, ctx: ServiceContext, site: Cached) -> None:
    response = upload(client, site, "000123", project="nope")
    assert response.status_code == 404
    error = response.json()["error"]
    assert "no project 'nope'" in error and "alpha, beta" in error and "Add the project" in error
    assert audit_events(ctx, "allow_list") == []


def test_a_broken_configuration_file_writes_nothing(client: TestClient, ctx: ServiceContext, site: Cached) -> None:
    assert ctx.config.source is not None
    ctx.config.source.write_text(ctx.config.source.read_text() + "\n[[projects]\n")
    file = Path(ctx.config.resolve(ctx.config.projects[0].mrn_file))
    original = file.read_bytes()
    response = upload(client, site, "000123\nNEW-1\n")
    assert response.status_code == 422
    assert "is not valid TOML" in response.json()["error"]
    assert file.read_bytes() == original and allow_list(ctx, "alpha") == set(ALLOWED_A)


def test_a_file_two_projects_share_is_refused(tmp_path: Path, database_url: str) -> None:
    ctx = make_context(tmp_path / "site", database_url, extra=GAMMA_SHARES_ALPHAS_FILE)
    try:
        seeded = fill(ctx, tmp_path / "files")
        response = upload(TestClient(create_app(ctx)), seeded, "000123\n")
        assert response.status_code == 422
        assert "shares its MRN file" in response.json()["error"] and "gamma" in response.json()["error"]
        assert allow_list(ctx, "alpha") == allow_list(ctx, "gamma") == set(ALLOWED_A)
    finally:
        ctx.engine.dispose()


# allow-lists of projects that reach several institutions ---------------------------------

DELTA_ONE_CSV = """
[[projects]]
id = "delta"
title = "One CSV for two institutions"
irb = "2026P000888"
expires = 2099-12-31
mrn_file = "delta.csv"
quota = "1 GiB"
institutions = ["general", "childrens"]
"""


def pairs(ctx: ServiceContext, project_id: str) -> set[tuple[str, str]]:
    with ctx.sessions() as session:
        return {(i, m) for i, m in session.execute(
            select(ProjectMrn.institution_id, ProjectMrn.mrn).where(ProjectMrn.project_id == project_id))}


def upload_for(client: TestClient, site: Cached, project: str, text: str, institution: str | None) -> object:
    return client.post(f"/api/v1/admin/projects/{project}/mrns", json={"mrns": text, "institution": institution},
                       headers=site.headers("root"))


def test_an_upload_for_a_project_of_several_institutions_names_the_institution(
    client: TestClient, ctx: ServiceContext, site: Cached
) -> None:
    unnamed = upload_for(client, site, "beta", "B-9\n", None)
    assert unnamed.status_code == 422
    assert "reaches institutions general, childrens: name the institution" in unnamed.json()["error"]
    elsewhere = upload_for(client, site, "beta", "B-9\n", "lakeside")
    assert elsewhere.status_code == 422 and "does not reach institution 'lakeside'" in elsewhere.json()["error"]
    no_file = upload_for(client, site, "beta", "B-9\n", "childrens")
    assert no_file.status_code == 422 and "mrn_files.childrens" in no_file.json()["error"]
    foreign_row = upload_for(client, site, "beta", "institution,mrn\nchildrens,B-9\n", "general")
    assert foreign_row.status_code == 422 and "this is the list of 'general'" in foreign_row.json()["error"]
    assert pairs(ctx, "beta") == {("general", m) for m in ALLOWED_B} and audit_events(ctx, "allow_list") == []

    named = upload_for(client, site, "beta", "B-9\nB-1\n", "general")
    assert named.status_code == 200, named.text
    assert named.json()["institution"] == "general" and named.json()["file"].endswith("beta.mrns")
    assert pairs(ctx, "beta") == {("general", "B-9"), ("general", "B-1")}
    (event,) = audit_events(ctx, "allow_list")
    assert json.loads(event.detail)["institution"] == "general"


def test_an_upload_into_a_shared_csv_replaces_only_that_institutions_rows(tmp_path: Path, database_url: str) -> None:
    folder = tmp_path / "site"
    folder.mkdir()
    (folder / "delta.csv").write_text("institution,mrn\ngeneral,000123\nchildrens,000123\nchildrens,K-2\n")
    ctx = make_context(folder, database_url, extra=DELTA_ONE_CSV)
    try:
        seeded = fill(ctx, tmp_path / "files")
        client = TestClient(create_app(ctx))
        response = upload_for(client, seeded, "delta", "K-7\n000123\n", "childrens")
        assert response.status_code == 200, response.text
        assert pairs(ctx, "delta") == {("general", "000123"), ("childrens", "K-7"), ("childrens", "000123")}
        written = (folder / "delta.csv").read_text()
        assert written.splitlines()[0] == "institution,mrn" and "general,000123" in written
        listed = {p["id"]: p for p in client.get("/api/v1/admin/projects", headers=seeded.headers("root")).json()}
        assert set(listed["delta"]["mrn_files"]) == {"general", "childrens"}
        assert listed["delta"]["allow_list_size"] == 3
    finally:
        ctx.engine.dispose()
