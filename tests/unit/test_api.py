"""The HTTP layer: sessions, tokens, roles and error mapping (PACS faked; other tests use real ones)."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from support.api_client import PASSWORD, faked_pacs_client, log_in


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    return faked_pacs_client(tmp_path)


def _login(client: TestClient, login: str) -> None:
    log_in(client, login)


def test_session_cookie_is_http_only_and_same_site(client: TestClient) -> None:
    response = client.post("/api/v1/auth/login", json={"login": "alice", "password": PASSWORD})
    cookie = response.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/v1/auth/me").json()["login"] == "alice"
    client.post("/api/v1/auth/logout")
    assert client.get("/api/v1/auth/me").status_code == 401


def test_wrong_password_and_unknown_login_look_the_same(client: TestClient) -> None:
    response = client.post("/api/v1/auth/login", json={"login": "alice", "password": "nope"})
    assert response.status_code == 403 and response.json()["error"] == "wrong login or password"
    unknown = client.post("/api/v1/auth/login", json={"login": "ghost", "password": "nope"})
    assert unknown.json()["error"] == "wrong login or password"


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", "/api/v1/audit/search"), ("GET", "/api/v1/audit/verify"), ("POST", "/api/v1/audit/export.csv"),
     ("POST", "/api/v1/admin/config/reload"), ("GET", "/api/v1/admin/users"), ("GET", "/api/v1/admin/tokens")],
)
def test_researchers_cannot_reach_admin_or_audit_endpoints(client: TestClient, method: str, path: str) -> None:
    assert client.request(method, path, json={}).status_code == 401
    _login(client, "alice")
    assert client.request(method, path, json={}).status_code == 403


def test_auditor_reads_and_verifies_but_cannot_administer(client: TestClient) -> None:
    _login(client, "audrey")
    assert client.get("/api/v1/audit/verify").json()["ok"] is True
    csv_text = client.post("/api/v1/audit/export.csv", json={}).text
    assert csv_text.startswith("seq,occurred_at,actor")
    assert client.post("/api/v1/admin/config/reload").status_code == 403


def test_admin_reloads_configuration(client: TestClient) -> None:
    _login(client, "root")
    response = client.post("/api/v1/admin/config/reload")
    assert response.status_code == 200 and response.json()["status"] == "reloaded"


def test_tokens_are_shown_once_and_work_as_bearer(client: TestClient) -> None:
    _login(client, "alice")
    issued = client.post("/api/v1/auth/tokens", json={"name": "laptop", "days": 7}).json()
    listed = client.get("/api/v1/auth/tokens").json()
    assert issued["token"].startswith("mi2b2_") and issued["token"] not in str(listed)
    bare = TestClient(client.app)
    assert bare.get("/api/v1/projects", headers={"Authorization": f"Bearer {issued['token']}"}).json()[0]["id"] == "alpha"
    client.delete(f"/api/v1/auth/tokens/{issued['id']}")
    assert bare.get("/api/v1/projects", headers={"Authorization": f"Bearer {issued['token']}"}).status_code == 401


def test_projects_show_only_mine_with_expiry(client: TestClient) -> None:
    _login(client, "alice")
    projects = {p["id"]: p for p in client.get("/api/v1/projects").json()}
    assert set(projects) == {"alpha", "beta"}
    assert projects["beta"]["expired"] is True and projects["alpha"]["expired"] is False


def test_malformed_bodies_get_clear_messages(client: TestClient) -> None:
    _login(client, "alice")
    response = client.post("/api/v1/search/series", json={"project": "alpha", "pacs": "main", "studies": []})
    assert response.status_code == 422 and response.json()["error"].startswith("invalid request: studies")
    extra = client.post("/api/v1/search/studies", json={"project": "alpha", "pacs": "main", "mrns": "77", "x": 1})
    assert extra.status_code == 422 and "x: Extra inputs are not permitted" in extra.json()["error"]


def test_openapi_document_is_served(client: TestClient) -> None:
    spec = client.get("/api/v1/openapi.json").json()
    assert "/api/v1/search/studies" in spec["paths"]
    assert spec["paths"]["/api/v1/search/studies"]["post"]["operationId"] == "search_search_studies"


def test_request_lifecycle_over_the_api(client: TestClient) -> None:
    _login(client, "alice")
    added = client.post("/api/v1/requests", json={"project": "alpha", "pacs": "main", "priority": 2,
                                                  "studies": [{"study_uid": "1.2"}]})
    assert added.status_code == 200, added.text
    (request_id,) = added.json()["created"]
    listed = client.get("/api/v1/projects/alpha/requests", params={"state": ["scheduled"]}).json()
    assert [(r["id"], r["priority"], r["patient_id"]) for r in listed] == [(request_id, 2, "77")]
    assert client.post("/api/v1/requests/priority", json={"ids": [request_id], "priority": 7}).json() == {
        "changed": [request_id]}
    assert client.get(f"/api/v1/requests/{request_id}").json()["priority"] == 7
    assert client.post("/api/v1/requests/cancel", json={"ids": [request_id]}).json() == {"canceled": [request_id]}
    again = client.post("/api/v1/requests/cancel", json={"ids": [request_id]})
    assert again.status_code == 422 and "cannot be canceled" in again.json()["error"]
    missing = client.get("/api/v1/requests/4242")
    assert missing.status_code == 404
    unknown_state = client.get("/api/v1/projects/alpha/requests", params={"state": ["lost"]})
    assert unknown_state.status_code == 422 and "lost" in unknown_state.json()["error"]
    bad = client.post("/api/v1/requests", json={"project": "alpha", "pacs": "main", "studies": [{"study_uid": "x"}]})
    assert bad.status_code == 422 and "not a DICOM UID" in bad.json()["error"]


def test_non_members_see_no_requests(client: TestClient) -> None:
    _login(client, "audrey")
    assert client.get("/api/v1/projects/alpha/requests").status_code == 403
    refused = client.post("/api/v1/requests", json={"project": "alpha", "pacs": "main", "studies": [{"study_uid": "1.2"}]})
    assert refused.status_code == 403
