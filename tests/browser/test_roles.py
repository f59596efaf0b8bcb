"""The admin and auditor pages in Chromium, and what a researcher cannot reach."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from support.browser_site import ADMIN, AUDITOR, PACS_ID, RESEARCHER, Catalog, login, screenshot


def test_an_admin_reloads_the_configuration_and_sees_the_pacs_governance_now(page: Page, catalog: Catalog) -> None:
    login(page, ADMIN)
    page.goto("/app/#admin")
    expect(page.locator("#tab-admin")).to_have_attribute("aria-current", "page")
    page.get_by_role("button", name="Reload configuration").click()
    result = page.locator(".reload-result")
    expect(result).to_contain_text("Configuration reloaded")
    expect(result).to_contain_text(f"allow-list sizes: alpha {len(catalog.allow_list)}")

    pacs = page.locator(f'[data-table="admin-pacs"] tr[data-key="{PACS_ID}"]')
    expect(pacs.locator("td[data-col=echo]")).to_have_text(re.compile(r"^ok \(\d+ ms\)$"))
    expect(pacs.locator("td[data-col=active]")).to_have_text(re.compile(r"^0 / \d+$"))
    expect(pacs.locator("td[data-col=minute]")).to_have_text(re.compile(r"^\d+ / (\d+|∞)$"))
    expect(pacs.locator("td[data-col=window]")).not_to_be_empty()
    projects = page.locator('[data-table="admin-projects"]')
    expect(projects.locator('tr[data-key="beta"] td[data-col=status]')).to_have_text("IRB expired")
    expect(projects.locator('tr[data-key="alpha"] td[data-col=allow_list_size]')).to_have_text(str(len(catalog.allow_list)))
    screenshot(page, "admin")

    # replace alpha's allow-list from the page: the overview follows
    page.get_by_label("project whose allow-list to replace").select_option("alpha")
    page.get_by_label("new allow-list, one MRN per line").fill("\n".join([*catalog.allow_list, "NEW-7"]))
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Replace allow-list").click()
    expect(page.locator("#messages")).to_contain_text(f"allow-list of alpha now holds {len(catalog.allow_list) + 1} MRNs")
    expect(projects.locator('tr[data-key="alpha"] td[data-col=allow_list_size]')).to_have_text(
        str(len(catalog.allow_list) + 1))
    page.get_by_label("new allow-list, one MRN per line").fill("000123\nBAD*MRN")
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Replace allow-list").click()
    expect(page.locator("#messages .message.error")).to_contain_text("line 2")
    expect(projects.locator('tr[data-key="alpha"] td[data-col=allow_list_size]')).to_have_text(
        str(len(catalog.allow_list) + 1))


def test_an_auditor_verifies_the_chain(page: Page) -> None:
    login(page, AUDITOR)
    page.goto("/app/#audit")
    page.get_by_role("button", name="Verify the chain").click()
    expect(page.locator(".verdict")).to_have_text(re.compile(r"^Chain verified: \d+ events, \d+ keyed \(HMAC, from row 1\)"))
    page.get_by_label("action (e.g. search/patients)").fill("login")
    page.get_by_role("button", name="Search", exact=True).click()
    actions = page.locator('[data-table="audit"] tbody td[data-col=action]')
    expect(actions.first).to_have_text("login")
    assert set(actions.all_inner_texts()) == {"login"}
    screenshot(page, "audit")


def test_a_researcher_reaches_neither_admin_nor_audit_pages_nor_another_project(
        page: Page, catalog: Catalog) -> None:
    login(page, RESEARCHER)
    page.goto("/app/#admin")
    expect(page.locator("#messages")).to_contain_text("the admin page needs the admin role")
    expect(page.locator("#tab-patients")).to_have_attribute("aria-current", "page")
    expect(page.locator("#tab-admin")).to_have_count(0)
    page.goto("/app/#audit")
    expect(page.locator("#messages")).to_contain_text("the audit page needs the auditor or admin role")
    expect(page.locator("#tab-audit")).to_have_count(0)
    expect(page.locator("#project option")).to_have_text([re.compile(r"^alpha ")])

    # the API behind the pages says no as well, with the browser's own session
    for path in ("/api/v1/admin/projects", "/api/v1/admin/users", "/api/v1/audit/verify"):
        answer = page.request.get(path)
        assert answer.status == 403, (path, answer.status)
    for path in ("/api/v1/projects/beta/cache", "/api/v1/projects/beta/requests", "/api/v1/projects/beta/viewer/tree"):
        answer = page.request.get(path)
        assert answer.status == 403 and "not a member" in answer.json()["error"], (path, answer.text())
    search = page.request.post("/api/v1/search/patients", data={"project": "beta", "pacs": PACS_ID,
                                                                "mrns": catalog.on_list[0]})
    assert search.status == 403, search.text()


def test_an_admin_names_the_institution_of_a_list_for_a_project_of_several(page: Page) -> None:
    login(page, ADMIN)
    page.goto("/app/#admin")
    institution = page.get_by_label("institution whose allow-list to replace")
    page.get_by_label("project whose allow-list to replace").select_option("alpha")
    expect(institution).to_be_hidden()  # alpha reaches one institution: nothing to choose
    page.get_by_label("project whose allow-list to replace").select_option("beta")
    expect(institution).to_be_visible()
    institution.select_option("general")
    page.get_by_label("new allow-list, one MRN per line").fill("B-1\nB-2\nB-3")
    questions: list[str] = []
    page.once("dialog", lambda dialog: (questions.append(dialog.message), dialog.accept()))
    page.get_by_role("button", name="Replace allow-list").click()
    expect(page.locator("#messages")).to_contain_text("allow-list of beta now holds 3 MRNs")
    assert questions == ["Replace the whole allow-list of beta at general?"]
    expect(page.locator('[data-table="admin-projects"] tr[data-key="beta"] td[data-col=allow_list_size]')).to_have_text("3")
