"""Fixtures of the browser tests: a real Orthanc with known studies, `mi2b2 serve`, and Chromium.

Scopes (the CI machine has two cores):
* `orthanc`, `playwright`, `browser` - once for tests/browser (package scope);
* `mi2b2_server` - once per test module: a fresh site, database and cache;
* `context`, `page`, `console`, `new_page` - fresh for every test.

Playwright's sync API marks the main thread as running its asyncio loop for as
long as it is started, so `asyncio.run()` would fail there meanwhile. That is
why Playwright lives in package scope (this folder has an __init__.py): it
stops after the last browser test instead of at the end of the whole session,
and later tests get a clean thread. Nothing in this folder may use asyncio
itself.

Helpers (import them from `support.browser_site`): `login(page, user, password)`,
`screenshot(page, name)`, the users `USERS` / `RESEARCHER` / `LEAD` / `ADMIN` /
`AUDITOR`, and the `Catalog` of what the PACS holds.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from playwright.sync_api import Browser, BrowserContext, ConsoleMessage, Page, Playwright, expect, sync_playwright

from support.browser_site import (
    CHROMIUM,
    CHROMIUM_ARGS,
    RECEIVER_AE,
    SCREENSHOTS,
    Catalog,
    Mi2b2Server,
    orthanc_instance_count,
    serve,
    write_catalog,
)
from support.pacs import RunningPacs, free_port, start_orthanc

TIMEOUT_MS = 15_000
HERE = Path(__file__).parent


@dataclass(frozen=True)
class BrowserPacs:
    pacs: RunningPacs  # Orthanc: .ae_title, .port, .http_url, .log_text()
    catalog: Catalog  # what it holds


# --- markers and failure reports -------------------------------------------------------------


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).parents:
            item.add_marker(pytest.mark.pacs)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """On failure: a screenshot, the browser console and the tail of the server's log go into the report."""
    report: pytest.TestReport = yield
    if report.failed and HERE in Path(item.path).parents:
        funcargs = getattr(item, "funcargs", {})
        page = funcargs.get("page")
        if report.when == "call" and isinstance(page, Page) and not page.is_closed():
            try:
                shot = _failure_screenshot(page, item.nodeid)
                report.sections.append(("failure screenshot", str(shot)))
            except Exception as error:  # the page may be broken; the report must still be written
                report.sections.append(("failure screenshot", f"not taken: {error}"))
        console = funcargs.get("console")
        if console:
            report.sections.append(("browser console", "\n".join(console)))
        server = funcargs.get("mi2b2_server")
        if isinstance(server, Mi2b2Server):
            state = "running" if server.alive() else f"exited with {server.process.returncode}"
            report.sections.append((f"mi2b2 serve log ({state}; {server.log_path})", server.log_tail()))
    return report


def _failure_screenshot(page: Page, nodeid: str) -> Path:
    module, _, test = nodeid.partition("::")
    name = "FAILED-" + re.sub(r"[^A-Za-z0-9._-]+", "_", f"{Path(module).stem}-{test}")
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True, timeout=5_000)
    return path


# --- the PACS and the server ------------------------------------------------------------------


@pytest.fixture(scope="package")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserPacs]:
    """One Orthanc for every browser test, loaded with the studies of support.browser_site.STUDIES."""
    catalog, files = write_catalog(tmp_path_factory.mktemp("browser-studies"))
    # The destination's port is a placeholder: each mi2b2_server points it at its own receiver.
    pacs = start_orthanc(tmp_path_factory.mktemp("browser-orthanc"), move_destinations={RECEIVER_AE: ("127.0.0.1", free_port())})
    try:
        pacs.load(files)
        assert orthanc_instance_count(pacs) == len(files), pacs.log_tail()
        yield BrowserPacs(pacs, catalog)
    finally:
        pacs.stop()


@pytest.fixture(scope="package")
def catalog(orthanc: BrowserPacs) -> Catalog:
    return orthanc.catalog


@pytest.fixture(scope="module")
def mi2b2_server(orthanc: BrowserPacs, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mi2b2Server]:
    """`mi2b2 serve` on a fresh site (database, cache, users with passwords) for this module's tests."""
    with serve(tmp_path_factory.mktemp("browser-site"), orthanc.pacs) as server:
        yield server


# --- the browser -------------------------------------------------------------------------------


@pytest.fixture(scope="package")
def playwright() -> Iterator[Playwright]:
    if not CHROMIUM.exists():
        pytest.fail(f"{CHROMIUM} is missing: run scripts/setup.sh, which installs Debian's chromium package "
                    "(never `playwright install`)", pytrace=False)
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="package")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=str(CHROMIUM), headless=True, args=CHROMIUM_ARGS)
    expect.set_options(timeout=TIMEOUT_MS)
    try:
        yield browser
    finally:
        browser.close()


def _new_context(browser: Browser, server: Mi2b2Server) -> BrowserContext:
    context = browser.new_context(base_url=server.url, viewport={"width": 1280, "height": 800},
                                  locale="en-US", timezone_id="UTC")
    context.set_default_timeout(TIMEOUT_MS)
    context.set_default_navigation_timeout(TIMEOUT_MS)
    return context


@pytest.fixture
def context(browser: Browser, mi2b2_server: Mi2b2Server) -> Iterator[BrowserContext]:
    """A fresh browser profile (no cookies) whose relative URLs go to this module's server."""
    context = _new_context(browser, mi2b2_server)
    try:
        yield context
    finally:
        context.close()


@pytest.fixture
def new_page(browser: Browser, mi2b2_server: Mi2b2Server, console: list[str]) -> Iterator[Callable[[], Page]]:
    """A factory of further pages, each in a profile of its own: two users side by side."""
    contexts: list[BrowserContext] = []

    def make() -> Page:
        contexts.append(_new_context(browser, mi2b2_server))
        return _watched(contexts[-1].new_page(), console, f"page {len(contexts) + 1}: ")

    try:
        yield make
    finally:
        for context in contexts:
            context.close()


@pytest.fixture
def console() -> list[str]:
    """What the page wrote to its console, and its uncaught errors ("pageerror: ..."), in order."""
    return []


@pytest.fixture
def page(context: BrowserContext, console: list[str]) -> Page:
    return _watched(context.new_page(), console)


def _watched(page: Page, console: list[str], prefix: str = "") -> Page:
    def on_console(message: ConsoleMessage) -> None:
        console.append(f"{prefix}{message.type}: {message.text}")

    page.on("console", on_console)
    page.on("pageerror", lambda error: console.append(f"{prefix}pageerror: {error}"))
    return page
