"""A member of one project can read nothing of another's: every project endpoint, found from the app's routes.

The endpoints are not listed by hand: every operation of the app's OpenAPI
document with a project in its path (under /api/v1/projects/{project}/... and
/dicomweb/projects/{project}/...) is called, with the other project's study, series and SOP UIDs in its path and
body, so endpoints added later (downloads, forwarding, ...) are covered
without touching this file. A body is built from the route's OpenAPI schema;
if a new endpoint needs a body this builder cannot make, the test says so.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from mi2b2.api.app import create_app
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.synthetic import series_instance_uid, sop_instance_uid
from mi2b2.testing import FakeClock
from support import studies
from support.site import load_site
from support.viewing import AUDITOR, BETA_STUDY, Cached, fill

PROJECT_PARAMS = ("project_id", "project")
# A destination every project may use, so a forward gets as far as the membership check.
# Nothing listens there: no forward is ever started (this test runs no worker).
DESTINATION = """
[[destinations]]
id = "research"
ae_title = "RESEARCH"
host = "127.0.0.1"
port = 9
"""


@dataclass(frozen=True)
class Target:
    project: str
    study: str
    series: str
    sop: str
    secrets: tuple[str, ...]  # what must never show up for an outsider: patient id and name


ALPHA = Target("alpha", studies.uid(studies.BRAIN), series_instance_uid(studies.BRAIN, 1),
               sop_instance_uid(studies.BRAIN, 1, 1), ("000123", studies.BRAIN.patient_name))
BETA = Target("beta", studies.uid(BETA_STUDY), series_instance_uid(BETA_STUDY, 1), sop_instance_uid(BETA_STUDY, 1, 1),
              ("B-1", BETA_STUDY.patient_name))


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> ServiceContext:
    return build_context(load_site(tmp_path / "site", database_url=database_url, extra=DESTINATION), clock=FakeClock())


@pytest.fixture
def cached(ctx: ServiceContext, tmp_path: Path) -> Cached:
    return fill(ctx, tmp_path / "files")


def project_routes(app: FastAPI) -> list[tuple[str, str]]:
    """(method, path) of every operation with a project in its path.

    Read from the OpenAPI document: FastAPI nests included routers, so
    ``app.routes`` does not list them flat. Every project endpoint is in the
    schema (only the static viewer page is left out, and it names no project)."""
    found = []
    for path, operations in app.openapi()["paths"].items():
        if set(re.findall(r"{(\w+)(?::\w+)?}", path)) & set(PROJECT_PARAMS):
            found.extend((method.upper(), path) for method in sorted(operations) if method not in ("head", "options"))
    return found


def fill_path(path: str, target: Target) -> str:
    values = {"project_id": target.project, "project": target.project, "study_uid": target.study,
              "series_uid": target.series, "sop_uid": target.sop, "number": "1", "frame_list": "1"}
    return re.sub(r"{(\w+)(?::\w+)?}", lambda m: values.get(m.group(1), "1"), path)


def _resolve(schema: dict[str, Any], spec: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        name = schema["$ref"].rsplit("/", 1)[1]
        schema = spec["components"]["schemas"][name]
    if "anyOf" in schema:  # Optional[X]: take the first non-null branch
        branches = [b for b in schema["anyOf"] if b.get("type") != "null"]
        return _resolve(branches[0], spec) if branches else {"type": "null"}
    return schema


def example(schema: dict[str, Any], spec: dict[str, Any], name: str, target: Target) -> Any:
    """A minimal valid value, with the target project's UIDs where a field names a study, series or SOP."""
    schema = _resolve(schema, spec)
    lowered = name.lower()
    kind = schema.get("type")
    if "enum" in schema:
        return schema["enum"][0]
    if kind == "object":
        # Required fields, and any naming a study, series or SOP: those point the call at the target's data.
        wanted = set(schema.get("required", []))
        wanted |= {key for key in schema.get("properties", {}) if any(w in key.lower() for w in ("study", "series", "sop"))}
        return {key: example(value, spec, key, target) for key, value in schema.get("properties", {}).items()
                if key in wanted}
    if kind == "array":
        return [example(schema.get("items", {}), spec, name, target)]
    if kind == "boolean":
        return True
    if kind in ("integer", "number"):
        return max(int(schema.get("minimum", 1)), 1)
    if kind == "string":
        if "study" in lowered:
            return target.study
        if "series" in lowered:
            return target.series
        if "sop" in lowered:
            return target.sop
        if "project" in lowered:
            return target.project
        if "destination" in lowered:
            return "research"
        if "passphrase" in lowered:
            return "a long enough passphrase for tests"
        return "x" * max(int(schema.get("minLength", 1)), 1)
    return None


def request_body(app: FastAPI, path: str, method: str, target: Target) -> Any:
    spec = app.openapi()
    operation = spec["paths"].get(path, {}).get(method.lower(), {})
    content = operation.get("requestBody", {}).get("content", {}).get("application/json")
    if content is None:
        return None
    return example(content["schema"], spec, "", target)


def leaks(response: Any, target: Target) -> list[str]:
    body = response.content
    found = [secret for secret in target.secrets if secret.encode() in body]
    if b"DICM" in body:
        found.append("DICOM file bytes")
    if response.headers.get("content-type", "").startswith("image/"):
        found.append("an image")
    return found


@pytest.mark.parametrize(("intruder", "member_of", "victim"), [("bob", ALPHA, BETA), ("carol", BETA, ALPHA)],
                         ids=["alpha-member-into-beta", "beta-member-into-alpha"])
def test_no_project_endpoint_gives_another_projects_data(ctx: ServiceContext, cached: Cached, intruder: str,
                                                         member_of: Target, victim: Target) -> None:
    app = create_app(ctx)
    client = TestClient(app)
    headers = cached.headers(intruder)
    routes = project_routes(app)
    paths = {path for _method, path in routes}
    # the endpoints this issue added, and the ones others add alongside, are all in the sweep
    for expected in ("/api/v1/projects/{project_id}/viewer/tree", "/api/v1/projects/{project_id}/cache",
                     "/dicomweb/projects/{project_id}/studies", "/dicomweb/projects/{project_id}/studies/{study_uid}"):
        assert expected in paths
    problems: list[str] = []
    tried = 0
    for method, path in routes:
        body = request_body(app, path, method, victim)

        # 1. the other project's path: refused outright
        response = client.request(method, fill_path(path, victim), json=body, headers=headers)
        tried += 1
        if response.status_code == 422:
            problems.append(f"{method} {path}: the body this test built was refused ({response.text[:200]}); "
                            "teach example() this endpoint's body so its access check is reached")
        elif response.status_code not in (403, 404):
            problems.append(f"{method} {path} into {victim.project}: {response.status_code}, expected 403/404")
        if found := leaks(response, victim):
            problems.append(f"{method} {path} into {victim.project} gave {', '.join(found)}")

        # 2. the intruder's own project with the other project's UIDs: the data stays hidden
        smuggled = Target(member_of.project, victim.study, victim.series, victim.sop, victim.secrets)
        own = client.request(method, fill_path(path, smuggled),
                             json=request_body(app, path, method, smuggled), headers=headers)
        if found := leaks(own, victim):
            problems.append(f"{method} {path} via {member_of.project} gave {victim.project}'s {', '.join(found)}")
        names_victim_uid = any(p in path for p in ("{study_uid}", "{series_uid}", "{sop_uid}"))
        if names_victim_uid and own.is_success:
            problems.append(f"{method} {path} via {member_of.project} answered {own.status_code} "
                            f"for {victim.project}'s UIDs")
    assert not problems, "\n".join(problems)
    assert tried >= 20
    denied = ctx.audit.list(AUDITOR, AuditFilter(action="denied", actor=intruder, project_id=victim.project))
    assert denied, "refusals are audited"
