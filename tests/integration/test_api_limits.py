"""Out-of-range ids and numbers, over-long lists and repeated frames through the API, on SQLite and PostgreSQL.

Every id or number is checked against its column's range before it reaches the database: 2**63 made
SQLite raise OverflowError (a 500), -1 went looking for a row that cannot exist."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from mi2b2.api.app import create_app
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.dicomweb.query import MAX_FRAMES
from mi2b2.testing import FakeClock
from support.site import load_site
from support.viewing import ROOT, SAMPLE_SERIES, SAMPLE_STUDY, Cached, fill

OUT_OF_RANGE = [2**63, -1, 2**64, 2**31]  # ids are INTEGER columns: 2**31 is out of PostgreSQL's range


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> ServiceContext:
    return build_context(load_site(tmp_path / "site", database_url=database_url), clock=FakeClock())


@pytest.fixture
def api(ctx: ServiceContext) -> Iterator[TestClient]:
    with TestClient(create_app(ctx), raise_server_exceptions=False) as client:
        yield client


@pytest.fixture
def tokens(ctx: ServiceContext) -> dict[str, str]:
    found = {}
    for login, role in (("alice", "researcher"), ("audrey", "auditor")):
        ctx.accounts.add_user(ROOT, login, role, None)
        found[login] = ctx.accounts.create_token(ROOT, login, "tests").secret
    return found


def _as(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


# (method, path, body): {n} is the number under test
ID_DOORS = [
    ("POST", "/api/v1/requests/cancel", {"ids": ["{n}"]}),
    ("POST", "/api/v1/requests/retry", {"ids": ["{n}"]}),
    ("POST", "/api/v1/requests/priority", {"ids": ["{n}"], "priority": 1}),
    ("GET", "/api/v1/requests/{n}", None),
    ("GET", "/api/v1/search/jobs/{n}", None),  # found by schemathesis: an OverflowError, a 500
    ("GET", "/api/v1/search/jobs/{n}/results", None),
    ("POST", "/api/v1/search/jobs/{n}/cancel", None),
    ("DELETE", "/api/v1/auth/tokens/{n}", None),
    ("POST", "/api/v1/notifications/read", {"ids": ["{n}"]}),
    ("GET", "/api/v1/notifications?limit={n}", None),
    ("GET", "/api/v1/projects/alpha/queries?limit={n}", None),
    ("POST", "/api/v1/audit/search", {"offset": "{n}"}),
    ("POST", "/api/v1/projects/alpha/download/instance", {"download_id": "{n}", "study_uid": "1.2.3", "sop_uid": "1.2.3.4"}),
    ("GET", "/api/v1/projects/alpha/viewer/instances/1.2.3.4/frames/{n}.png", None),
    ("GET", f"/dicomweb/projects/alpha/studies/{SAMPLE_STUDY}/series/1.2/instances/1.2.3/frames/{{n}}/rendered", None),
]


def _fill(value: object, n: int) -> object:
    if value == "{n}":
        return n
    if isinstance(value, dict):
        return {k: _fill(v, n) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, n) for v in value]
    return value


@pytest.mark.parametrize("n", OUT_OF_RANGE, ids=["2^63", "-1", "2^64", "2^31"])
def test_every_id_and_number_out_of_its_column_range_is_a_422_never_a_500(
    api: TestClient, tokens: dict[str, str], n: int
) -> None:
    for method, path, body in ID_DOORS:
        login = "audrey" if "/audit" in path else "alice"
        # -1 in a negative offset or limit is not an id: it must be refused all the same
        answer = api.request(method, path.replace("{n}", str(n)), json=_fill(body, n), headers=_as(tokens[login]))
        assert answer.status_code == 422, (method, path, n, answer.status_code, answer.text[:300])
        assert answer.json()["kind"] == "InvalidInput" and "than or equal to" in answer.json()["error"], answer.text


def test_the_largest_id_is_accepted_and_simply_not_found(api: TestClient, tokens: dict[str, str]) -> None:
    largest = 2**31 - 1
    assert api.get(f"/api/v1/requests/{largest}", headers=_as(tokens["alice"])).status_code == 404
    assert api.post("/api/v1/requests/cancel", json={"ids": [largest]},
                    headers=_as(tokens["alice"])).status_code in (200, 404)


def test_an_mrn_list_over_the_site_maximum_is_refused_with_the_way_on(tmp_path: Path, database_url: str) -> None:
    config = load_site(tmp_path / "site", database_url=database_url)
    config = config.model_copy(update={"search": config.search.model_copy(update={"max_identifiers": 50})})
    ctx = build_context(config, clock=FakeClock())
    ctx.accounts.add_user(ROOT, "alice", "researcher", None)
    token = ctx.accounts.create_token(ROOT, "alice", "tests").secret
    with TestClient(create_app(ctx), raise_server_exceptions=False) as api:
        mrns = "\n".join(f"MRN-{n:05d}" for n in range(51))
        for path, field in (("patients", "mrns"), ("studies", "mrns"), ("accessions", "accessions")):
            answer = api.post(f"/api/v1/search/{path}", json={"project": "alpha", "pacs": "main", field: mrns},
                              headers=_as(token))
            assert answer.status_code == 400, answer.text[:300]
            error = answer.json()["error"]
            assert "51" in error and "max_identifiers" in error and "search job" in error
        # 50 is not refused for its length (it goes on to the PACS, which this test does not run)
        within = api.post("/api/v1/search/patients", json={"project": "alpha", "pacs": "main",
                                                           "mrns": "\n".join(mrns.splitlines()[:50])},
                          headers=_as(token))
        assert "max_identifiers" not in within.text


def test_the_body_limits_follow_the_site_configuration(tmp_path: Path, database_url: str) -> None:
    config = load_site(tmp_path / "site", database_url=database_url)
    server = config.server.model_copy(update={"max_body": 256 * 1024, "max_anonymous_body": 2048})
    ctx = build_context(config.model_copy(update={"server": server}), clock=FakeClock())
    ctx.accounts.add_user(ROOT, "alice", "researcher", None)
    token = ctx.accounts.create_token(ROOT, "alice", "tests").secret
    padded = b'{"ids": [], "all": true}' + b" " * 4096
    with TestClient(create_app(ctx), raise_server_exceptions=False) as api:
        post = "/api/v1/notifications/read"
        anonymous = api.post(post, content=padded, headers={"Content-Type": "application/json"})
        assert anonymous.status_code == 413 and "2 KiB" in anonymous.json()["error"]
        assert api.post(post, content=padded, headers={"Content-Type": "application/json", **_as(token)}).json() == {
            "marked": 0}
        ctx.accounts.add_user(ROOT, "bob", "researcher", "a long enough password 1")
        cookie = ctx.accounts.login("bob", "a long enough password 1")[1].secret  # a browser session counts too
        assert api.post(post, content=padded, headers={"Content-Type": "application/json",
                                                       "Cookie": f"mi2b2_session={cookie}"}).status_code == 200
        huge = b'{"ids": [], "all": true}' + b" " * (300 * 1024)
        refused = api.post(post, content=huge, headers={"Content-Type": "application/json", **_as(token)})
        assert refused.status_code == 413 and "256 KiB" in refused.json()["error"]

        def chunks() -> Iterator[bytes]:  # no Content-Length: counted as it streams
            yield b'{"ids": [], "all": true}'
            for _ in range(40):
                yield b" " * 8192
        streamed = api.post(post, content=chunks(), headers={"Content-Type": "application/json", **_as(token)})
        assert streamed.status_code == 413 and "256 KiB" in streamed.json()["error"]


def test_a_repeated_frame_list_is_deduplicated_and_a_long_one_refused(
    ctx: ServiceContext, api: TestClient, tmp_path: Path
) -> None:
    cached: Cached = fill(ctx, tmp_path / "files")
    clip = next(sop for sop, path in cached.files.items()
                if f"/{SAMPLE_SERIES['examples_ybr_color.dcm']}/" in path.as_posix())
    url = (f"/dicomweb/projects/alpha/studies/{SAMPLE_STUDY}/series/{SAMPLE_SERIES['examples_ybr_color.dcm']}"
           f"/instances/{clip}/frames/")
    accept = {"Accept": 'multipart/related; type="image/jpeg"', **cached.headers("alice")}
    one = api.get(url + "3", headers=accept)
    two = api.get(url + "7", headers=accept)
    assert one.status_code == two.status_code == 200
    repeated = api.get(url + ",".join(["3", "7"] * 1500), headers=accept)
    assert repeated.status_code == 200
    assert repeated.content.count(b"Content-Type: image/jpeg") == 2
    body = repeated.content
    assert body.index(_part(one.content)) < body.index(_part(two.content))  # in the order first asked

    eight_thousand = api.get(url + ",".join(["3"] * 8000), headers=accept)
    assert eight_thousand.status_code == 400 and str(MAX_FRAMES) in eight_thousand.json()["error"]
    every = api.get(url + ",".join(str(n % 30 + 1) for n in range(MAX_FRAMES + 1)), headers=accept)
    assert every.status_code == 200  # over the cap as written, but 30 distinct frames: deduplicated first
    assert every.content.count(b"Content-Type: image/jpeg") == 30


def _part(multipart: bytes) -> bytes:
    """The payload of a one-part multipart/related answer."""
    payload = multipart.split(b"\r\n\r\n", 1)[1]
    return payload.rsplit(b"\r\n--", 1)[0][:2000]
