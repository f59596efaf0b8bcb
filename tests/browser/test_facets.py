"""Faceted filters in Chromium: AND across columns, OR within one, counts per value,
filters that survive a change of tab, CSV export of what is selected, and a table
of 10,000 rows that keeps only one page in the document."""

from __future__ import annotations

import csv
import io
import re

from playwright.sync_api import Page, expect

from support.browser_site import RESEARCHER, Catalog, login, screenshot


def studies_of_everyone_allowed(page: Page, catalog: Catalog) -> None:
    login(page, RESEARCHER)
    page.goto("/app/#patients")
    mrn_list = "\n".join(catalog.on_list)
    page.get_by_label("upload an MRN list").set_input_files(
        files=[{"name": "mrns.txt", "mimeType": "text/plain", "buffer": mrn_list.encode()}])
    expect(page.locator("#mrn-input")).to_have_value(mrn_list)  # read in the browser, sent in the POST body
    page.get_by_role("button", name="Search patients").click()
    in_pacs = {s.patient_id for s in catalog.studies_of(*catalog.on_list)}
    expect(page.locator("#page-patients tbody tr[data-key]")).to_have_count(len(in_pacs))
    page.get_by_role("button", name="Find studies for selected patients").click()
    expect(page.locator("#page-studies tbody tr[data-key]")).to_have_count(len(catalog.studies_of(*catalog.on_list)))


def shown_accessions(page: Page) -> list[str]:
    return sorted(page.locator("#page-studies tbody tr[data-key] td[data-col=accession]").all_inner_texts())


def test_a_date_range_and_a_modality_give_exactly_the_expected_studies(page: Page, catalog: Catalog) -> None:
    studies_of_everyone_allowed(page, catalog)
    facets = page.locator('#page-studies [data-facet="study_date"]')
    facets.get_by_label("Date from").fill("2022-01-01")
    facets.get_by_label("Date to").fill("2023-12-31")
    in_range = catalog.between("20220101", "20231231", catalog.on_list)
    assert {s.modality for s in in_range} == {"CT", "MR"}  # the catalogue makes this test meaningful
    expect(page.locator("#page-studies tbody tr[data-key]")).to_have_count(len(in_range))

    modality = page.locator('#page-studies [data-facet="modalities"]')
    for value in ("CT", "MR"):  # counts given the date range: what ticking the value would show
        count = sum(1 for s in in_range if s.modality == value)
        expect(modality.locator("label", has_text=value).locator(".count")).to_have_text(f"({count})")
    modality.get_by_label("CT").check()
    expected = sorted(s.accession for s in in_range if s.modality == "CT")
    expect(page.locator("#page-studies tbody tr[data-key]")).to_have_count(len(expected))
    assert shown_accessions(page) == expected
    screenshot(page, "facets-date-and-modality")

    modality.get_by_label("MR").check()  # OR within the column
    expect(page.locator("#page-studies tbody tr[data-key]")).to_have_count(len(in_range))
    assert shown_accessions(page) == sorted(s.accession for s in in_range)
    modality.get_by_label("MR").uncheck()

    # filters survive switching tabs
    page.locator("#tab-patients").click()
    page.locator("#tab-studies").click()
    expect(facets.get_by_label("Date from")).to_have_value("2022-01-01")
    expect(modality.get_by_label("CT")).to_be_checked()
    assert shown_accessions(page) == expected

    # select what is shown, export it
    page.locator("#page-studies thead input[type=checkbox]").check()
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Export selected to CSV").click()
    path = download_info.value.path()
    rows = list(csv.DictReader(io.StringIO(path.read_text())))
    assert sorted(row["Accession"] for row in rows) == expected

    page.locator("#page-studies").get_by_role("button", name="clear filters").click()
    expect(page.locator("#page-studies tbody tr[data-key]")).to_have_count(len(catalog.studies_of(*catalog.on_list)))


TEN_THOUSAND = """async () => {
  const { FacetTable } = await import("/app/js/table.js");
  const table = new FacetTable({
    name: "load", key: (row) => String(row.id),
    columns: [
      { key: "id", label: "#", type: "number" },
      { key: "kind", label: "Kind", type: "set", facet: true },
      { key: "size", label: "Size", type: "number", facet: true },
    ],
  });
  const rows = Array.from({ length: 10000 }, (_, id) => ({ id, kind: ["CT", "MR", "US"][id % 3], size: id % 1000 }));
  document.getElementById("pages").replaceChildren(table.element);
  table.setRows(rows);
  window.loadTable = table;
}"""


def test_ten_thousand_rows_keep_one_page_in_the_document(page: Page) -> None:
    login(page, RESEARCHER)
    page.goto("/app/#patients")
    expect(page.locator("#page-patients")).to_be_visible()
    page.evaluate(TEN_THOUSAND)
    table = page.locator('[data-table="load"]')
    expect(table.locator(".table-summary")).to_have_text("10000 of 10000 rows · showing 1–100")
    expect(table.locator("tbody tr")).to_have_count(100)
    kind = table.locator('[data-facet="kind"]')
    expect(kind.get_by_label("CT")).to_be_visible()
    size = table.locator('[data-facet="size"]')
    size.get_by_label("Size from").fill("100")
    size.get_by_label("Size to").fill("199")
    kind.get_by_label("CT").check()
    expected = sum(1 for i in range(10000) if i % 3 == 0 and 100 <= i % 1000 <= 199)
    assert expected > 100
    expect(table.locator(".table-summary")).to_have_text(f"{expected} of 10000 rows · showing 1–100")
    expect(table.locator("tbody tr")).to_have_count(100)
    table.get_by_role("button", name="next ›").click()
    expect(table.locator(".table-summary")).to_have_text(f"{expected} of 10000 rows · showing 101–200")
    expect(kind.locator("label", has_text="MR").locator(".count")).to_have_text(
        f"({sum(1 for i in range(10000) if i % 3 == 1 and 100 <= i % 1000 <= 199)})")

    # the keyboard stays where it was when a tick redraws the table
    first_box = table.locator("tbody tr[data-key] input[type=checkbox]").first
    first_box.focus()
    page.keyboard.press("Space")
    expect(table.locator("tbody tr[data-key]").first.locator("input[type=checkbox]")).to_be_focused()
    expect(table.locator(".table-summary")).to_contain_text("1 selected")

    # a ticked value whose rows are all gone keeps its box, so it can be unticked
    page.evaluate("window.loadTable.setRows(window.loadTable.rows.filter((row) => row.kind !== 'CT'))")
    ct = kind.locator("label", has_text="CT")
    expect(ct.locator("input")).to_be_checked()
    expect(ct.locator(".count")).to_have_text("(0)")
    expect(table.locator(".table-summary")).to_have_text(re.compile(r"^0 of 6666 rows"))
    ct.locator("input").click()  # unticked, the value has no rows left and leaves the list
    expect(ct).to_have_count(0)
    expect(table.locator(".table-summary")).to_have_text(re.compile(r"^\d+ of 6666 rows"))
    assert table.locator("tbody tr[data-key]").count() > 0
