"""An API client over a site whose PACS is faked, with a researcher, an auditor and an admin (unit tests)."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient

from mi2b2.api.app import create_app
from mi2b2.domain.principal import Principal, Role
from mi2b2.services.context import build_context
from mi2b2.testing import FakeClock, FakeFindSession
from support.site import load_site

ROOT = Principal("root", Role.ADMIN)
PASSWORD = "a long enough password"


def faked_pacs_client(folder: Path) -> TestClient:
    pacs = FakeFindSession([{"PatientID": "77", "StudyInstanceUID": "1.2", "StudyDate": "20200101"}])
    ctx = build_context(load_site(folder), clock=FakeClock(), open_find=lambda _c, _p: pacs)
    for login, role in (("alice", "researcher"), ("audrey", "auditor"), ("root", "admin")):
        ctx.accounts.add_user(ROOT, login, role, PASSWORD)
    return TestClient(create_app(ctx))


def log_in(client: TestClient, login: str) -> None:
    response = client.post("/api/v1/auth/login", json={"login": login, "password": PASSWORD})
    assert response.status_code == 200, response.text
