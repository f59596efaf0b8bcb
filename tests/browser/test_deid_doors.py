"""A de-identified project in Chromium: the doors that do not de-identify yet refuse, with the reason shown;
the viewer shows the project under its pseudonyms.

The CSV export of selected studies holds identifiers: for a de-identified project the page refuses it
(no file is saved). The viewer's tree, labels and tag panel come from the API, which de-identifies them."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from support.browser_site import PACS_ID, RESEARCHER, Catalog, login, serve
from support.server import Mi2b2Server

GAMMA = """
[[projects]]
id = "gamma"
title = "De-identified cohort"
irb = "2026P000777"
expires = 2099-12-31
mrn_file = "alpha.mrns"
quota = "1 GiB"
institutions = ["general"]
members = [{ login = "bob" }]
export = "deidentified"
"""


@pytest.fixture(scope="module")
def mi2b2_server(orthanc: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mi2b2Server]:
    """conftest's server (``orthanc`` is its BrowserPacs), with project gamma de-identified."""
    with serve(tmp_path_factory.mktemp("deid-browser-site"), orthanc.pacs, site_extra=GAMMA) as server:
        yield server


def test_csv_export_of_a_de_identified_project_is_refused(page: Page, catalog: Catalog) -> None:
    login(page, RESEARCHER)
    page.goto("/app/#patients")
    page.locator("#project").select_option("gamma")
    page.locator("#mrn-input").fill("\n".join(catalog.on_list))
    page.get_by_role("button", name="Search patients").click()
    expect(page.locator("#page-patients tbody tr[data-key]")).not_to_have_count(0)
    page.get_by_role("button", name="Find studies for selected patients").click()
    expect(page.locator("#page-studies tbody tr[data-key]")).not_to_have_count(0)
    page.locator("#page-studies thead input[type=checkbox]").check()
    downloads: list[object] = []
    page.on("download", lambda download: downloads.append(download))
    page.get_by_role("button", name="Export selected to CSV").click()
    expect(page.locator("#messages .message.error")).to_contain_text(
        "project 'gamma' exports de-identified data only; CSV export does not de-identify yet")
    assert downloads == []


def test_the_viewer_shows_a_de_identified_project_under_its_pseudonyms(page: Page, catalog: Catalog,
                                                                       console: list[str]) -> None:
    login(page, RESEARCHER)
    study = catalog.study("BR-2001")
    added = page.request.post("/api/v1/requests", data={"project": "gamma", "pacs": PACS_ID,
                                                        "studies": [{"study_uid": study.uid}]})
    assert added.ok and len(added.json()["created"]) == 1, added.text()
    deadline = time.monotonic() + 60
    while (row := page.request.get("/api/v1/projects/gamma/requests").json()[0])["state"] in ("scheduled",
                                                                                             "processing"):
        assert time.monotonic() < deadline, f"retrieval not done in 60 s: {row}"
        page.wait_for_timeout(250)
    assert row["state"] == "completed", row
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
