"""/metrics: the collector's values per PACS, project and worker on a small SQLite site; who may
read them (token, address list); no patient id anywhere in the exposition."""

from __future__ import annotations

from pathlib import Path

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedStudy, Request, WorkerKind
from mi2b2.api.app import create_app
from mi2b2.config import load_config
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.metrics import metrics_refusal
from mi2b2.services.scheduler import heartbeat
from mi2b2.testing import FakeClock
from support.site import write_site

TOKEN = "s3cret-metrics-token"
PATIENT = "PAT-SECRET-4711"


def metrics_site(folder: Path, allow_from: str = "[]", token: bool = True) -> ServiceContext:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "metrics.token").write_text(TOKEN + "\n")
    token_line = 'token_file = "metrics.token"\n' if token else ""
    site = write_site(folder, extra=f"\n[metrics]\nenabled = true\n{token_line}allow_from = {allow_from}\n")
    return build_context(load_config(site), clock=FakeClock())


def add_requests(ctx: ServiceContext) -> None:
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        for state, received, size in (("scheduled", 0, 0), ("scheduled", 0, 0), ("completed", 3, 3000),
                                      ("processing", 1, 500)):
            session.add(Request(project_id="alpha", user_login="alice", pacs_id="main", patient_id=PATIENT,
                                study_uid=f"1.2.{received}.{state}", state=state, received=received, bytes=size,
                                created_at=now))
        session.add(CachedStudy(project_id="alpha", study_uid="1.2.3", patient_id=PATIENT,
                                patient_name="Doe^Jane", instance_count=3, bytes=3000))
    heartbeat(ctx, "worker:host:1")
    heartbeat(ctx, "receiver:host:2", WorkerKind.RECEIVER)


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def scrape(ctx: ServiceContext) -> str:
    answer = TestClient(create_app(ctx)).get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"})
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return answer.text


def test_values_per_pacs_project_and_worker(tmp_path: Path) -> None:
    ctx = metrics_site(tmp_path)
    add_requests(ctx)
    assert isinstance(ctx.clock, FakeClock)
    ctx.clock.advance(seconds=7)
    values = samples(scrape(ctx))
    pacs = (("pacs", "main"),)
    cap = ctx.config.all_pacs()[0].default_max_concurrent
    assert values[("mi2b2_pacs_queued_requests", pacs)] == 2
    assert values[("mi2b2_pacs_active_retrievals", pacs)] == 1
    assert values[("mi2b2_pacs_max_concurrent", pacs)] == cap
    assert values[("mi2b2_pacs_window_open", pacs)] == 1
    assert values[("mi2b2_pacs_starts_last_hour", pacs)] == 0
    assert values[("mi2b2_project_requests", (("project", "alpha"), ("state", "scheduled")))] == 2
    assert values[("mi2b2_project_requests", (("project", "alpha"), ("state", "completed")))] == 1
    assert values[("mi2b2_project_requests", (("project", "alpha"), ("state", "failed")))] == 0
    assert values[("mi2b2_project_requests", (("project", "beta"), ("state", "scheduled")))] == 0
    assert values[("mi2b2_project_cache_used_bytes", (("project", "alpha"),))] == 3000
    assert values[("mi2b2_project_cache_used_bytes", (("project", "beta"),))] == 0
    assert values[("mi2b2_project_cache_quota_bytes", (("project", "alpha"),))] > 0
    assert values[("mi2b2_worker_heartbeat_age_seconds", (("worker", "worker:host:1"),))] == 7
    assert values[("mi2b2_receiver_heartbeat_age_seconds", (("receiver", "receiver:host:2"),))] == 7
    assert ("mi2b2_worker_heartbeat_age_seconds", (("worker", "receiver:host:2"),)) not in values  # not a worker
    assert values[("mi2b2_receiver_instances_received", ())] == 4
    assert values[("mi2b2_receiver_bytes_received", ())] == 3500


def test_no_patient_data_in_the_exposition(tmp_path: Path) -> None:
    ctx = metrics_site(tmp_path)
    add_requests(ctx)
    text = scrape(ctx)
    assert PATIENT not in text and "Doe" not in text and "1.2.3" not in text


def test_token_is_required_and_checked(tmp_path: Path) -> None:
    client = TestClient(create_app(metrics_site(tmp_path)))
    missing = client.get("/metrics")
    assert missing.status_code == 401 and "bearer token" in missing.json()["error"]
    assert missing.headers["www-authenticate"].startswith("Bearer")
    wrong = client.get("/metrics", headers={"Authorization": "Bearer not-it"})
    assert (wrong.status_code, wrong.json()["error"]) == (403, "the metrics token is wrong")
    assert client.get("/metrics", headers={"Authorization": "Basic " + TOKEN}).status_code == 401


def test_allowed_networks_need_no_token(tmp_path: Path) -> None:
    ctx = metrics_site(tmp_path, allow_from='["10.1.0.0/16", "::1/128"]', token=False)
    assert metrics_refusal(ctx, "10.1.2.3", None) is None
    assert metrics_refusal(ctx, "::1", None) is None
    refused = metrics_refusal(ctx, "10.2.0.1", None)
    assert refused is not None and refused[0] == 403 and "allow_from" in refused[1]
    refused = metrics_refusal(ctx, "10.2.0.1", f"Bearer {TOKEN}")  # this site has no token to match
    assert refused is not None and refused[0] == 403


def test_off_by_default(tmp_path: Path) -> None:
    site = write_site(tmp_path)
    answer = TestClient(create_app(build_context(load_config(site), clock=FakeClock()))).get("/metrics")
    assert answer.status_code == 404 and "not enabled" in answer.json()["error"]


def test_enabled_without_a_reader_is_a_config_error(tmp_path: Path) -> None:
    import pytest

    from mi2b2.errors import ConfigError
    with pytest.raises(ConfigError, match="nobody may read it"):
        load_config(write_site(tmp_path, extra="\n[metrics]\nenabled = true\n"))


def test_near_misses_of_the_token_are_refused(tmp_path: Path) -> None:
    ctx = metrics_site(tmp_path, allow_from='["10.1.0.0/16"]')
    client = TestClient(create_app(ctx))
    for near in (TOKEN[:-1], TOKEN + "x", TOKEN.upper(), f"{TOKEN} {TOKEN}", ""):
        answer = client.get("/metrics", headers={"Authorization": f"Bearer {near}"})
        assert answer.status_code == 403, near
        assert TOKEN not in answer.text and "mi2b2_" not in answer.text
    assert client.get("/metrics", params={"token": TOKEN}).status_code == 401  # only the header is read
    # An emptied token file (a botched rotation) opens nothing, not even to an empty token.
    (tmp_path / "metrics.token").write_text("\n")
    assert client.get("/metrics", headers={"Authorization": "Bearer "}).status_code == 403
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 403
    # Outside allow_from, the addresses only decide when no token is sent.
    outside = metrics_refusal(ctx, "10.2.0.1", None)
    assert outside is not None and outside[0] == 401
    assert metrics_refusal(ctx, "10.1.9.9", None) is None
