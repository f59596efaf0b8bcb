"""The API docs render with the network cut off at the machine: nothing is fetched from outside."""

from __future__ import annotations

from urllib.parse import urlsplit

from playwright.sync_api import Page, Route, expect

LOCAL_HOST = "127.0.0.1"


def test_api_docs_render_without_internet(page: Page, console: list[str]) -> None:
    blocked: list[str] = []

    def only_local(route: Route) -> None:
        if urlsplit(route.request.url).hostname == LOCAL_HOST:
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    page.route("**/*", only_local)
    page.goto("/api/v1/docs")
    expect(page.locator(".opblock").first).to_be_visible()
    expect(page.locator(".swagger-ui .info .title")).to_contain_text("mi2b2")
    assert blocked == []
    assert not [line for line in console if line.startswith("pageerror")], console
