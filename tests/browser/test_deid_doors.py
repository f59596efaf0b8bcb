"""A de-identified project in Chromium: the doors that do not de-identify yet refuse, with the reason shown.

The CSV export of selected studies holds identifiers: for a de-identified project the page refuses it
(no file is saved); the viewer's tree comes from the API, which refuses it too."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from playwright.sync_api import Page, expect

from support.browser_site import RESEARCHER, Catalog, login, serve
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
