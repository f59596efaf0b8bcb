"""The browser harness itself: users log in, the session cookie works in the page, the
viewer page renders, and a retrieval from the test Orthanc completes end to end."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from playwright.sync_api import Page, expect

from support.browser_site import ADMIN, AUDITOR, PACS_ID, RESEARCHER, USERS, Catalog, Mi2b2Server, login, screenshot


def test_researcher_session_sees_alpha_only(page: Page) -> None:
    assert login(page, RESEARCHER.login, RESEARCHER.password) == {"login": "bob", "role": "researcher",
                                                                   "display_name": "bob"}
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "mi2b2_session"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"

    me = page.goto("/api/v1/auth/me")
    assert me is not None and me.ok
    assert me.json()["login"] == "bob" and me.json()["role"] == "researcher"
    projects = page.goto("/api/v1/projects")
    assert projects is not None and projects.ok
    assert [p["id"] for p in projects.json()] == list(RESEARCHER.projects) == ["alpha"]


def test_without_login_the_api_answers_401(page: Page) -> None:
    response = page.goto("/api/v1/auth/me")
    assert response is not None and response.status == 401


@pytest.mark.parametrize("login_name", sorted(USERS))
def test_every_harness_user_logs_in_with_its_role(page: Page, login_name: str) -> None:
    user = USERS[login_name]
    assert login(page, user)["role"] == user.role
    projects = page.request.get("/api/v1/projects")
    assert projects.ok, projects.text()
    assert [p["id"] for p in projects.json()] == list(user.projects)


def test_two_users_side_by_side_have_separate_sessions(page: Page, new_page: Callable[[], Page]) -> None:
    other = new_page()
    login(page, RESEARCHER)
    login(other, ADMIN.login, ADMIN.password)
    assert page.request.get("/api/v1/auth/me").json()["login"] == "bob"
    assert other.request.get("/api/v1/auth/me").json()["role"] == "admin"
    page.request.post("/api/v1/auth/logout")
    assert page.request.get("/api/v1/auth/me").status == 401
    assert other.request.get("/api/v1/auth/me").ok
    assert login(other, AUDITOR)["role"] == "auditor"


def test_viewer_page_renders(page: Page, console: list[str]) -> None:
    login(page, RESEARCHER.login, RESEARCHER.password)
    page.goto("/viewer/")
    expect(page).to_have_title("mi2b2 viewer")
    expect(page.locator("header strong")).to_have_text("mi2b2 viewer")
    page.wait_for_load_state("networkidle")
    path = screenshot(page, "smoke-viewer")
    assert path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not [line for line in console if line.startswith("pageerror")], console


def test_a_study_is_retrieved_from_orthanc(page: Page, catalog: Catalog, mi2b2_server: Mi2b2Server) -> None:
    login(page, RESEARCHER.login, RESEARCHER.password)
    study = catalog.study("BR-2001")  # MRN-0002, CT, 2 series x 3
    off_list = catalog.studies_of(*catalog.off_list)[0]

    added = page.request.post("/api/v1/requests", data={
        "project": "alpha", "pacs": PACS_ID, "studies": [{"study_uid": study.uid}, {"study_uid": off_list.uid}]})
    assert added.ok, added.text()
    report = added.json()
    assert len(report["created"]) == 1 and report["not_permitted"] == [off_list.uid], report

    deadline = time.monotonic() + 60
    while True:
        listed = page.request.get("/api/v1/projects/alpha/requests")
        assert listed.ok, listed.text()
        (row,) = [r for r in listed.json() if r["id"] == report["created"][0]]
        if row["state"] not in ("scheduled", "processing"):
            break
        assert time.monotonic() < deadline, f"retrieval not done in 60 s: {row}"
        page.wait_for_timeout(250)
    assert row["state"] == "completed", row
    assert row["study_uid"] == study.uid and row["patient_id"] == study.patient_id
    assert row["received"] == row["expected_instances"] == study.instance_count == 6
    assert len(list((mi2b2_server.cache_dir / "alpha" / study.uid).rglob("*.dcm"))) == 6

    # The viewer shows what arrived.
    page.goto("/viewer/")
    expect(page.locator("#status")).to_have_text("1 patient, 1 study")
    expect(page.locator("#tree")).to_contain_text(study.description)
    page.wait_for_load_state("networkidle")  # the first image, too
    screenshot(page, "smoke-viewer-retrieved")
