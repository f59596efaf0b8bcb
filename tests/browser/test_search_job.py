"""Tab 1 with more MRNs than the search-job threshold: the search runs as a job on the
server, the page shows its progress, then the patients it found."""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest
from playwright.sync_api import Page, expect

from support.browser_site import OFF_LIST_PATIENT, RESEARCHER, Catalog, Mi2b2Server, login, screenshot, serve

if TYPE_CHECKING:
    from .conftest import BrowserPacs


@pytest.fixture(scope="module")
def mi2b2_server(orthanc: BrowserPacs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mi2b2Server]:
    """A site whose searches over more than 3 MRNs run as jobs, on a PACS paced to 2 queries a second."""
    with serve(tmp_path_factory.mktemp("browser-site"), orthanc.pacs, pacs_extra="default_queries_per_second = 2\n",
               site_extra="\n[search]\njob_threshold = 3\njob_batch = 1\n") as server:
        yield server


def test_a_large_mrn_list_shows_progress_then_results(page: Page, catalog: Catalog) -> None:
    login(page, RESEARCHER)
    page.goto("/app/#patients")
    page.locator("#mrn-input").fill("\n".join([*catalog.on_list, OFF_LIST_PATIENT]))
    page.get_by_role("button", name="Search patients").click()

    progress = page.locator("#page-patients .search-job")
    expect(progress).to_be_visible()
    expect(progress).to_contain_text(f"of {len(catalog.on_list)} searched")
    expect(progress.locator("progress")).to_have_attribute("max", str(len(catalog.on_list)))
    screenshot(page, "search-job-progress")

    in_pacs = {s.patient_id for s in catalog.studies_of(*catalog.on_list)}
    expect(page.locator("#page-patients tbody tr[data-key]")).to_have_count(len(in_pacs), timeout=30_000)
    expect(progress).to_contain_text("done")
    shown = set(page.locator("#page-patients tbody tr[data-key] td[data-col=patient_id]").all_inner_texts())
    assert shown == in_pacs
    expect(page.locator('#page-patients [data-stat="refused"] summary')).to_contain_text("1 refused")
    screenshot(page, "search-job-results")
