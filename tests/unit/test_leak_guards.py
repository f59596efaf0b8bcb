"""What must not leak or slip through: trailing newlines past validators, messages into logs, routes by GET."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mi2b2.adapters.process import WITHHELD, exception_text, withhold_exception_messages
from mi2b2.adapters.storage.cache_files import _check_uid
from mi2b2.config import check_ae_title, check_identifier
from mi2b2.domain.identifiers import looks_like_uid
from mi2b2.domain.principal import login_problem
from mi2b2.errors import InvalidInput
from mi2b2.services.audit import AuditFilter
from support.api_client import ROOT, faked_pacs_client, log_in


def test_a_trailing_newline_passes_no_validator() -> None:
    assert looks_like_uid("1.2.3") and not looks_like_uid("1.2.3\n")
    assert login_problem("alice") is None and login_problem("alice\n") is not None
    for check, good in ((check_identifier, "alpha"), (check_ae_title, "MI2B2")):
        assert check(good) == good
        with pytest.raises(ValueError):
            check(good + "\n")
    assert _check_uid("1.2.3", "study") == "1.2.3"
    with pytest.raises(InvalidInput):
        _check_uid("1.2.3\n", "study")


NAME, MRN, OTHER_MRN = "DOE^JANE", "000123", "MRN-0002"  # the traceback shows source lines: keep them out of it


def _nested_failure() -> None:
    try:
        raise KeyError(OTHER_MRN)
    except KeyError as first:
        raise ValueError(f"PatientName {NAME}, PatientID {MRN}") from first


def test_logged_exceptions_keep_their_type_and_frames_but_not_their_message() -> None:
    with pytest.raises(ValueError) as raised:
        _nested_failure()
    text = exception_text(raised.value)
    assert "DOE^JANE" not in text and "000123" not in text and "MRN-0002" not in text
    assert "builtins.ValueError: " + WITHHELD in text and "builtins.KeyError: " in text
    assert "_nested_failure" in text and "direct cause" in text

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)  # any handler: the record carries the withheld text itself
    logger = logging.getLogger("mi2b2.test_leaks")
    logger.addHandler(handler)
    factory = logging.getLogRecordFactory()
    withhold_exception_messages()
    try:
        try:
            _nested_failure()
        except ValueError:
            logger.exception("request failed")
    finally:
        logging.setLogRecordFactory(factory)
        logger.removeHandler(handler)
    logged = stream.getvalue()
    assert "request failed" in logged and "ValueError" in logged and "000123" not in logged


@pytest.fixture
def client(tmp_path: Path) -> TestClient:
    return faked_pacs_client(tmp_path)


def _login(client: TestClient, login: str) -> None:
    log_in(client, login)


def test_audit_search_takes_no_patient_in_the_url(client: TestClient) -> None:
    _login(client, "audrey")
    assert client.get("/api/v1/audit", params={"patient": "000123"}).status_code in (404, 405)
    assert client.get("/api/v1/audit/export.csv", params={"patient": "000123"}).status_code == 405
    assert client.post("/api/v1/audit/search", json={"patient": "000123"}).status_code == 200


@pytest.mark.parametrize(("method", "path", "route"), [
    ("GET", "/api/v1/admin/users", "GET /admin/users"),
    ("POST", "/api/v1/admin/config/reload", "POST /admin/config/reload"),
    ("POST", "/api/v1/admin/projects/alpha/mrns", "POST /admin/projects/{project_id}/mrns"),
])
def test_refused_admin_calls_are_audited(client: TestClient, method: str, path: str, route: str) -> None:
    _login(client, "alice")
    assert client.request(method, path, json={"mrns": "000123"}).status_code == 403
    ctx = client.app.state.context  # type: ignore[attr-defined]
    denied = ctx.audit.list(ROOT, AuditFilter(actor="alice", action="denied"))
    assert len(denied) == 1 and denied[0].outcome == "denied"
    assert f'"operation":"{route}"' in denied[0].detail  # the route's template: no id from the URL


def test_revoking_another_users_token_is_refused_and_audited(client: TestClient) -> None:
    ctx = client.app.state.context  # type: ignore[attr-defined]
    theirs = ctx.accounts.create_token(ROOT, "root", "admin's", 1)
    _login(client, "alice")
    assert client.delete(f"/api/v1/auth/tokens/{theirs.id}").status_code == 403
    assert ctx.accounts.authenticate(theirs.secret) is not None
    denied = ctx.audit.list(ROOT, AuditFilter(actor="alice", action="denied"))
    assert len(denied) == 1 and "revoke another user's token" in denied[0].detail
