"""Schemathesis over the OpenAPI document of a real `python -m mi2b2 serve`, with a researcher's token and
with none: no 5xx, no status code, content type or body outside the documented schema, and no read across
projects (project beta's UIDs and patient never appear in any answer to bob, who is a member of alpha only).

Bounded and repeatable: Hypothesis runs derandomized (the same cases every run), a fixed number of examples
per operation, with generated data and with the path aimed at alpha, at beta, and at beta's study through
alpha. Every failure is collected (one per operation and kind) and reported together, not shrunk.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from mi2b2.adapters.dicom.files import read_instance_header
from mi2b2.config import load_config
from mi2b2.services.context import build_context
from support import studies
from support.server import Mi2b2Server, start_server
from support.site import write_site
from support.viewing import BETA_STUDY, Cached, fill, free_port

EXAMPLES = 12  # per operation, generation mode and aim: about 2,000 requests per login, under a minute each
RESEARCHER = "bob"  # a member of alpha only
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_schema_conformance]
# Operations that end the caller's own credentials (the run would go on unauthenticated) or never end.
SKIPPED = {("DELETE", "/api/v1/tokens/{token_id}"), ("POST", "/api/v1/auth/logout"), ("POST", "/api/v1/logout")}
# Their documented 503 is the answer itself: this site runs no worker, so the readiness probe says not ready.
SERVER_ERROR_IS_AN_ANSWER = {"GET /health/ready"}
PROJECT_PARAMS = ("project_id", "project")
STUDY_PARAMS = ("study_uid",)


@dataclass
class Live:
    server: Mi2b2Server
    cached: Cached
    beta_secrets: tuple[str, ...]  # beta's study, series and SOP UIDs and its patient: never shown to bob

    @property
    def url(self) -> str:
        return self.server.url


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    folder = tmp_path_factory.mktemp("schemathesis")
    site = write_site(folder / "site", expired_b=False)  # beta's IRB current: only membership keeps bob out
    site.write_text(site.read_text().replace(
        "[server]\n", f"[server]\nhttp_port = {free_port()}\nrun_worker = false\nrun_receiver = false\n", 1))
    ctx = build_context(load_config(site))
    try:
        cached = fill(ctx, folder / "files")
    finally:
        ctx.engine.dispose()
    secrets = {BETA_STUDY.patient_name, BETA_STUDY.accession}
    for path in cached.files.values():
        header = read_instance_header(path)
        if header.patient_id == BETA_STUDY.patient_id:
            secrets |= {header.study_uid, header.series_uid, header.sop_instance_uid}
    assert len(secrets) >= 5, "beta's cache is empty: the cross-project check would check nothing"
    server = start_server(site)
    try:
        yield Live(server, cached, tuple(sorted(secrets)))
    finally:
        server.stop()


def aims(operation: Any, live: Live) -> list[dict[str, str]]:
    """Path parameters to fix besides none: the researcher's project, the other one, the other's study."""
    names = {parameter.name for parameter in operation.path_parameters}
    project = next((name for name in PROJECT_PARAMS if name in names), None)
    study = next((name for name in STUDY_PARAMS if name in names), None)
    fixed: list[dict[str, str]] = []
    if project:
        fixed += [{project: "alpha"}, {project: "beta"}]
    if study:
        fixed.append({**({project: "alpha"} if project else {}), study: studies.uid(BETA_STUDY)})
    return fixed


def what_was_sent(response: Any) -> str:
    """The request's URL and body: a UID the caller sent may come back in an error message, and that is no leak."""
    request = response.request
    body = request.body or b""
    return unquote(request.url or "") + (body.decode("utf-8", "replace") if isinstance(body, bytes) else str(body))


def fuzz_operation(operation: Any, live: Live, headers: dict[str, str], failures: dict[str, str]) -> int:
    """Runs the operation's cases; records the first failure of each kind. Returns how many requests it made."""
    strategies = [operation.as_strategy(), operation.as_strategy(generation_mode=GenerationMode.NEGATIVE)]
    strategies += [operation.as_strategy(path_parameters=fixed) for fixed in aims(operation, live)]
    session = requests.Session()
    sent = 0

    @settings(max_examples=EXAMPLES * len(strategies), derandomize=True, database=None, deadline=None,
              suppress_health_check=list(HealthCheck), phases=[Phase.explicit, Phase.generate])
    @given(case=st.one_of(strategies))
    def run(case: Any) -> None:
        nonlocal sent
        sent += 1
        try:
            response = case.call(base_url=live.url, session=session, headers=headers, timeout=30)
        except requests.RequestException as error:
            failures.setdefault(f"{operation.label}: connection", f"{type(error).__name__}: {error}")
            return
        checks = [c for c in CHECKS if c is not not_a_server_error] if operation.label in SERVER_ERROR_IS_AN_ANSWER else CHECKS
        try:
            case.validate_response(response, checks=checks, headers=headers)
        except FailureGroup as group:
            for failure in group.exceptions:
                failures.setdefault(f"{operation.label}: {failure.title} {response.status_code}",
                                    f"{case.as_curl_command(headers=headers)}\n{response.content[:300]!r}")
        leaked = [secret for secret in live.beta_secrets
                  if secret.encode() in response.content and secret not in what_was_sent(response)]
        if leaked:
            failures.setdefault(f"{operation.label}: beta's data shown to {RESEARCHER}",
                                f"{case.as_curl_command(headers=headers)}\n{leaked}")

    run()
    return sent


@pytest.mark.parametrize("login", [RESEARCHER, None], ids=["researcher", "anonymous"])
def test_openapi_operations_answer_within_their_schema(live: Live, login: str | None) -> None:
    headers = live.cached.headers(login) if login else {}
    schema = schemathesis.openapi.from_url(f"{live.url}/api/v1/openapi.json")
    failures: dict[str, str] = {}
    started, sent, operations = time.monotonic(), 0, 0
    for result in schema.get_all_operations():
        operation = result.ok()
        if (operation.method.upper(), operation.path) in SKIPPED or operation.path.endswith("/events"):
            continue
        operations += 1
        sent += fuzz_operation(operation, live, headers, failures)
    print(f"\nschemathesis ({login or 'no token'}): {operations} operations, {sent} requests, "
          f"{time.monotonic() - started:.0f} s, {len(failures)} failures")
    assert live.server.alive(), live.server.log_tail()
    if login:  # the run kept its credentials: what it sent was judged as bob, not as nobody
        assert requests.get(f"{live.url}/api/v1/auth/me", headers=headers, timeout=10).status_code == 200
    assert operations > 30
    assert not failures, "\n\n".join(f"{kind}\n{detail}" for kind, detail in sorted(failures.items()))


def test_a_body_that_is_not_json_text_gets_the_documented_error(live: Live) -> None:
    """What schemathesis found: bytes that are not UTF-8 got Starlette's {"detail": ...}, in no documented schema."""
    response = requests.post(f"{live.url}/api/v1/requests", data=b"{\x80\x81}", timeout=10,
                             headers={**live.cached.headers(RESEARCHER), "Content-Type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"error": "invalid request: the body is not JSON text; send a JSON object in UTF-8",
                               "kind": "BadRequest"}


def test_the_openapi_document_names_the_error_answers(live: Live) -> None:
    document = requests.get(f"{live.url}/api/v1/openapi.json", timeout=10).json()
    answers = document["paths"]["/api/v1/requests"]["post"]["responses"]
    assert {"400", "401", "403", "404", "413", "422"} <= set(answers)
    assert answers["422"]["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/ErrorBody"}
    assert "HTTPValidationError" not in document["components"]["schemas"]
