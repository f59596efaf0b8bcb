"""A de-identified project in Chromium: the honest broker's workflow, and the viewer under pseudonyms.

A member's search is refused, the page naming who may search. The lead searches, exports the studies found
to CSV (identifiers the lead already sees, the searches audited) and moves one to the repository. The member's
Image Repository tab and Request Log show it only under its pseudonyms, and deleting it by the row shown works.
The viewer's tree, labels and tag panel come from the API, which de-identifies them."""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from support.browser_site import LEAD, PACS_ID, RESEARCHER, Catalog, login, serve
from support.deid import gamma_project
from support.server import Mi2b2Server

RETRIEVAL_SECONDS = 90


@pytest.fixture(scope="module")
def mi2b2_server(orthanc: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mi2b2Server]:
    """conftest's server (``orthanc`` is its BrowserPacs), with project gamma de-identified (alice lead, bob)."""
    with serve(tmp_path_factory.mktemp("deid-browser-site"), orthanc.pacs, site_extra=gamma_project()) as server:
        yield server


def search_patients(page: Page, mrns: str) -> None:
    page.goto("/app/#patients")
    page.locator("#project").select_option("gamma")
    page.locator("#mrn-input").fill(mrns)
    page.get_by_role("button", name="Search patients").click()


def test_a_members_search_is_refused_naming_who_may_search(page: Page, catalog: Catalog) -> None:
    login(page, RESEARCHER)
    search_patients(page, "\n".join(catalog.on_list))
    expect(page.locator("#messages .message.error")).to_contain_text(
        "project 'gamma' is de-identified: only its lead or a site admin may search the PACS and request studies; "
        "ask its lead (alice)")
    expect(page.locator("#page-patients tbody tr[data-key]")).to_have_count(0)


def test_the_lead_moves_a_study_and_a_member_sees_only_its_pseudonyms(
        new_page: Callable[[], Page], catalog: Catalog, mi2b2_server: Mi2b2Server, tmp_path: Path) -> None:
    study = catalog.study("BR-1001")
    lead = new_page()
    login(lead, LEAD)
    search_patients(lead, study.patient_id)
    expect(lead.locator("#page-patients tbody tr[data-key]")).to_have_count(1)
    lead.get_by_role("button", name="Find studies for selected patients").click()
    row = lead.locator(f'#page-studies tr[data-key="{study.uid}"]')
    row.locator("input[type=checkbox]").check()
    with lead.expect_download() as saved:
        lead.get_by_role("button", name="Export selected to CSV").click()
    saved.value.save_as(tmp_path / "studies.csv")
    assert study.accession in (tmp_path / "studies.csv").read_text()  # what the broker sees, saved
    lead.get_by_role("button", name="Move to repository").click()
    expect(lead.locator("#messages")).to_contain_text("1 retrieval request queued")
    lead.locator("#tab-requests").click()
    log_row = lead.locator("#page-requests tbody tr[data-key]").filter(has_text=study.accession)
    expect(log_row.locator("td[data-col=state]")).to_have_text("completed", timeout=RETRIEVAL_SECONDS * 1000)

    member = new_page()
    login(member, RESEARCHER)
    member.goto("/app/#patients")
    member.locator("#project").select_option("gamma")
    member.locator("#tab-repository").click()
    cached = member.locator("#page-repository tbody tr[data-key]")
    expect(cached).to_have_count(1)
    expect(member.locator("#page-repository [data-deidentified]")).to_be_visible()
    pseudonym = cached.get_attribute("data-key") or ""
    assert pseudonym.startswith("2.25.") and pseudonym != study.uid
    expect(cached.locator("td[data-col=patient_id]")).to_have_text(re.compile(r"^P[A-Z2-7]{12}$"))
    shown = member.locator("#page-repository").inner_text()
    for secret in (study.patient_id, study.accession, study.patient_name.split("^")[0], study.uid, study.iso_date):
        assert secret not in shown, secret
    member.locator("#tab-requests").click()
    member_log = member.locator("#page-requests tbody tr[data-key]")
    expect(member_log).to_have_count(1)
    expect(member_log.locator("td[data-col=state]")).to_have_text("completed")
    logged = member.locator("#page-requests").inner_text()
    assert study.patient_id not in logged and study.accession not in logged and study.uid not in logged

    # The row shown is the name every action takes: delete it.
    member.locator("#tab-repository").click()
    cached.locator("input[type=checkbox]").check()
    member.once("dialog", lambda dialog: dialog.accept())
    member.get_by_role("button", name="Delete selected").click()
    expect(cached).to_have_count(0)
    assert not (mi2b2_server.cache_dir / "gamma" / study.uid).exists()


def test_the_viewer_shows_a_de_identified_project_under_its_pseudonyms(
        page: Page, new_page: Callable[[], Page], catalog: Catalog, console: list[str]) -> None:
    """After the test above deleted its study, the lead requests another; the member views it."""
    lead = new_page()
    login(lead, LEAD)
    study = catalog.study("BR-2001")
    added = lead.request.post("/api/v1/requests", data={"project": "gamma", "pacs": PACS_ID,
                                                        "studies": [{"study_uid": study.uid}]})
    assert added.ok and len(added.json()["created"]) == 1, added.text()
    (request_id,) = added.json()["created"]
    deadline = time.monotonic() + 60
    while (row := lead.request.get(f"/api/v1/requests/{request_id}").json())["state"] in ("scheduled", "processing"):
        assert time.monotonic() < deadline, f"retrieval not done in 60 s: {row}"
        lead.wait_for_timeout(250)
    assert row["state"] == "completed", row
    login(page, RESEARCHER)
    (patient,) = page.request.get("/api/v1/projects/gamma/viewer/tree").json()["patients"]
    pseudonym = patient["patient_id"]
    assert pseudonym.startswith("P") and pseudonym != study.patient_id

    page.goto("/viewer/?project=gamma")
    expect(page.locator("#status")).to_have_text("1 patient, 1 study")
    expect(page.locator("#tree")).to_contain_text(pseudonym)
    expect(page.locator("#tag-table")).to_contain_text(pseudonym)  # the first image opened, its tags shown
    expect(page.locator("#image")).to_have_attribute("src", re.compile("^blob:"))
    for real in (study.patient_id, study.patient_name.split("^")[0], study.accession, study.uid):
        expect(page.locator("body")).not_to_contain_text(real)
    assert not [line for line in console if line.startswith("pageerror")], console
