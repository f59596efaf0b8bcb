"""/api/v1/docs needs nothing from outside: every script, style sheet and icon of the page is
served by mi2b2 itself, so the docs work on a hospital network without internet."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from support.api_client import faked_pacs_client

ASSET_URL = re.compile(r"""<(?:script|link|img)\b[^>]*\b(?:src|href)=["']([^"']+)["']""", re.IGNORECASE)
CONTENT_TYPES = {".js": "javascript", ".css": "text/css", ".png": "image/png"}


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory) -> TestClient:
    return faked_pacs_client(Path(tmp_path_factory.mktemp("docs")))


def _asset_urls(client: TestClient) -> list[str]:
    page = client.get("/api/v1/docs")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    return ASSET_URL.findall(page.text)


def test_every_asset_of_the_docs_page_is_same_origin(client: TestClient) -> None:
    urls = _asset_urls(client)
    assert len(urls) >= 3, urls  # the script, the style sheet and the icon
    for url in urls:
        assert url.startswith("/") and not url.startswith("//"), url
        assert "://" not in url, url


def test_every_asset_of_the_docs_page_answers_with_its_type(client: TestClient) -> None:
    for url in _asset_urls(client):
        answer = client.get(url)
        assert answer.status_code == 200, url
        expected = CONTENT_TYPES[Path(url).suffix]
        assert expected in answer.headers["content-type"], (url, answer.headers["content-type"])


def test_the_docs_page_loads_the_api_document(client: TestClient) -> None:
    page = client.get("/api/v1/docs").text
    assert "/api/v1/openapi.json" in page
    assert client.get("/api/v1/openapi.json").status_code == 200
