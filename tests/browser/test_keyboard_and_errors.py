"""The client with the keyboard alone, and the API's refusals shown as messages."""

from __future__ import annotations

import re

from playwright.sync_api import Page, expect

from support.browser_site import LEAD, RESEARCHER, Catalog, screenshot


def test_a_lead_works_by_keyboard_and_sees_the_expired_irb_refused(page: Page, catalog: Catalog) -> None:
    page.goto("/")
    expect(page.locator("#login input[name=login]")).to_be_focused()
    page.keyboard.type(LEAD.login)
    page.keyboard.press("Tab")
    page.keyboard.type(LEAD.password)
    page.keyboard.press("Enter")
    expect(page.locator("#tab-patients")).to_have_attribute("aria-current", "page")

    # what was found under alpha does not stay on screen under beta
    page.locator("#mrn-input").fill(catalog.on_list[0])
    page.get_by_role("button", name="Search patients").click()
    expect(page.locator("#page-patients tbody tr[data-key]")).to_have_count(1)

    # both projects are offered; the expired one says so
    options = page.locator("#project option")
    expect(options).to_have_count(2)
    expect(options.filter(has_text="beta")).to_contain_text("(IRB expired)")
    page.locator("#project").focus()
    page.keyboard.press("ArrowDown")  # alpha -> beta
    expect(page.locator("#project")).to_have_value("beta")
    expect(page.locator("#irb-state")).to_have_class("error")
    expect(page.locator("#irb-state")).to_contain_text("expired")
    expect(page.locator("#page-patients tbody tr[data-key]")).to_have_count(0)
    expect(page.locator("#page-patients .stats")).to_be_empty()

    # search by keyboard: the MRN field, then Tab to the button, Enter
    page.locator("#mrn-input").fill("")
    page.locator("#mrn-input").focus()
    page.keyboard.type(catalog.on_list[0])
    page.keyboard.press("Tab")  # the file chooser
    page.keyboard.press("Tab")  # Search patients
    expect(page.get_by_role("button", name="Search patients")).to_be_focused()
    page.keyboard.press("Enter")
    error = page.locator("#messages .message.error")
    expect(error).to_have_count(1)
    expect(error).to_contain_text(re.compile("expired", re.IGNORECASE))
    expect(error).to_have_attribute("role", "alert")
    screenshot(page, "error-expired-irb")

    # the tabs are links: focus and Enter
    page.locator("#tab-requests").focus()
    page.keyboard.press("Enter")
    expect(page.locator("#tab-requests")).to_have_attribute("aria-current", "page")


def test_a_wrong_password_and_an_ended_session_are_explained(page: Page) -> None:
    page.goto("/")
    page.locator("#login input[name=login]").fill(RESEARCHER.login)
    page.locator("#login input[name=password]").fill("not-the-password")
    page.locator("#login button[type=submit]").click()
    expect(page.locator("#login-error")).not_to_be_empty()
    expect(page.locator("#tabs")).to_be_hidden()

    page.locator("#login input[name=password]").fill(RESEARCHER.password)
    page.locator("#login button[type=submit]").click()
    expect(page.locator("#tab-patients")).to_have_attribute("aria-current", "page")
    page.request.post("/api/v1/auth/logout")  # the session ends behind the page's back
    page.locator("#mrn-input").fill("000123")
    page.get_by_role("button", name="Search patients").click()
    expect(page.locator("#login")).to_be_visible()
    expect(page.locator("#login-error")).to_have_text("Your session has ended; log in again.")
