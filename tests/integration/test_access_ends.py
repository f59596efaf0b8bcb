"""When access ends (IRB expired at local midnight, project removed, patient withdrawn), every read door closes at once.

Every door is called over the HTTP API (the paths the browser, the CLI and
DICOMweb clients use), on SQLite and PostgreSQL: ZIP download, the CLI's
manifest and file fetch, the viewer, QIDO-RS, WADO-RS and forward. Listing
and deleting keep working; `purge` removes exactly what is closed; every
refusal and deletion is audited with its reason. Site admins manage but read
images only where they are members; a member removed from a project loses
their queued requests.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import httpx
import pytest
from fastapi.testclient import TestClient
from sqlalchemy import select

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedStudy, Request
from mi2b2.api.app import create_app
from mi2b2.domain.principal import Principal, Role
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.forward import schedule_forwards
from mi2b2.services.scheduler import schedule_once
from mi2b2.services.search import search_studies
from mi2b2.synthetic import sop_instance_uid
from mi2b2.testing import FakeClock, FakeFindSession
from support import studies
from support.site import write_site
from support.viewing import BETA_STUDY, ROOT, SAMPLE_STUDY, Cached, fill, serving

ALICE = Principal("alice", Role.RESEARCHER)
BRAIN, TRAUMA, BETA = studies.uid(studies.BRAIN), studies.uid(studies.TRAUMA), studies.uid(BETA_STUDY)
SOP = {BRAIN: sop_instance_uid(studies.BRAIN, 1, 1), BETA: sop_instance_uid(BETA_STUDY, 1, 1),
       TRAUMA: sop_instance_uid(studies.TRAUMA, 1, 1)}
DESTINATION = """
[[destinations]]
id = "research"
ae_title = "RESEARCH"
host = "127.0.0.1"
port = 9
"""
BETA_ENDS = date(2026, 1, 10)  # the fake clock starts on 2026-01-05
AFTER_BETA = datetime(2026, 1, 12, 12, tzinfo=UTC)
EXPIRED = "the project's IRB approval has expired"
REMOVED = "the project is no longer configured"
WITHDRAWN = "patient not on the project's IRB allow-list"
ADMIN_NOT_MEMBER = "site admins read images only in projects they are members of"


@dataclass
class Site:
    ctx: ServiceContext
    cached: Cached
    api: TestClient
    toml: Path

    @property
    def clock(self) -> FakeClock:
        assert isinstance(self.ctx.clock, FakeClock)
        return self.ctx.clock

    def as_(self, login: str) -> Callable[..., httpx.Response]:
        def call(method: str, path: str, headers: dict[str, str] | None = None, **kwargs: Any) -> httpx.Response:
            return self.api.request(method, path, headers={**self.cached.headers(login), **(headers or {})}, **kwargs)
        return call

    def edit(self, old: str, new: str, file: str | None = None) -> None:
        path = self.toml.parent / file if file else self.toml
        text = path.read_text()
        assert old in text, old
        path.write_text(text.replace(old, new))

    def reload(self) -> None:
        self.ctx.reload_config(ROOT)


def make_site(folder: Path, database_url: str, extra: str = "", clock: FakeClock | None = None,
              open_find: Any = None) -> Site:
    toml = write_site(folder / "site", database_url=database_url, expired_b=False, extra=DESTINATION + extra)
    beta = 'expires = 2099-12-31\nmrn_files = { general = "beta.mrns" }'
    assert beta in toml.read_text()
    toml.write_text(toml.read_text().replace(beta, beta.replace("2099-12-31", BETA_ENDS.isoformat())))
    from mi2b2.config import load_config

    ctx = build_context(load_config(toml), clock=clock or FakeClock(), open_find=open_find)
    cached = fill(ctx, folder / "files")
    return Site(ctx, cached, TestClient(create_app(ctx)), toml)


def read_doors(site: Site, login: str, project: str, study: str) -> dict[str, httpx.Response]:
    """Every door that shows or sends out images of ``study``, as ``login``."""
    call = site.as_(login)
    base, web = f"/api/v1/projects/{project}", f"/dicomweb/projects/{project}"
    return {
        "zip": call("POST", f"{base}/download", json={"study_uids": [study]}),
        "manifest": call("POST", f"{base}/download/manifest", json={"study_uids": [study]}),
        "viewer study": call("GET", f"{base}/viewer/studies/{study}"),
        "viewer frame": call("GET", f"{base}/viewer/instances/{SOP[study]}/frames/1.png"),
        "qido": call("GET", f"{web}/studies", params={"StudyInstanceUID": study}),
        "wado": call("GET", f"{web}/studies/{study}/metadata"),
        "forward": call("POST", f"{base}/forward", json={"destination": "research", "study_uids": [study]}),
    }


def assert_all_refused(doors: dict[str, httpx.Response], reason: str) -> None:
    for door, response in doors.items():
        assert response.status_code == 403, (door, response.status_code, response.text[:200])
        assert reason in response.json()["error"], (door, response.text)


def assert_all_open(doors: dict[str, httpx.Response]) -> None:
    for door, response in doors.items():
        assert response.status_code == 200, (door, response.status_code, response.text[:300])
    assert doors["forward"].json()["created"], doors["forward"].text


def denials(ctx: ServiceContext, actor: str) -> list[dict[str, Any]]:
    return [json.loads(e.detail) for e in ctx.audit.list(ROOT, AuditFilter(action="denied", actor=actor, limit=5000))]


def cached_uids(ctx: ServiceContext, project: str) -> set[str]:
    with ctx.sessions() as session:
        return set(session.scalars(select(CachedStudy.study_uid).where(CachedStudy.project_id == project)))


# --- local midnight ---------------------------------------------------------------------------


def last_second(expires: date, zone: str) -> datetime:
    return datetime.combine(expires + timedelta(days=1), time(0), ZoneInfo(zone)).astimezone(UTC) - timedelta(seconds=1)


@pytest.mark.parametrize("zone", ["America/New_York", "Pacific/Auckland"])
def test_the_irb_ends_at_local_midnight_at_every_door(tmp_path: Path, database_url: str, zone: str) -> None:
    ends = date(2026, 3, 10)
    before = last_second(ends, zone)  # 23:59:59 local time on the last day
    clock = FakeClock(before)
    pacs = FakeFindSession([{"PatientID": "000123", "StudyInstanceUID": BRAIN, "StudyDate": "20250101",
                             "AccessionNumber": "A1"}])
    site = make_site(tmp_path, database_url, f'[site]\ntimezone = "{zone}"\n', clock, lambda _c, _p: pacs)
    site.edit("expires = 2099-12-31\nmrn_file = \"alpha.mrns\"", f"expires = {ends.isoformat()}\nmrn_file = \"alpha.mrns\"")
    site.reload()
    # West of UTC the UTC date is already past the last day; east of it, it is not yet.
    assert (before.date() > ends) == (zone == "America/New_York")

    def scheduled(study_uid: str) -> int:
        with transaction(site.ctx.sessions) as session:
            row = Request(project_id="alpha", user_login="alice", pacs_id="main", patient_id="000123",
                          study_uid=study_uid, state="scheduled", created_at=clock.now())
            session.add(row)
            session.flush()
            return row.id

    def state(request_id: int) -> tuple[str, str | None]:
        with site.ctx.sessions() as session:
            row = session.get_one(Request, request_id)
            return row.state, row.last_error

    def admin_says_expired() -> bool:
        return next(p["expired"] for p in site.as_("root")("GET", "/api/v1/admin/projects").json() if p["id"] == "alpha")

    early = scheduled("1.2.3.4.1")
    doors = read_doors(site, "alice", "alpha", BRAIN)
    assert_all_open(doors)
    assert search_studies(site.ctx, ALICE, "alpha", "main", "000123").studies
    assert site.as_("alice")("GET", "/api/v1/projects").json()[0]["expired"] is False
    assert not admin_says_expired()
    schedule_once(site.ctx, "test-worker")
    assert state(early)[0] != "canceled"
    assert schedule_forwards(site.ctx, "test-worker") == doors["forward"].json()["created"]  # the forward starts

    clock.set(before + timedelta(seconds=2))  # 00:00:01 local time on the next day
    late = scheduled("1.2.3.4.2")
    assert_all_refused(read_doors(site, "alice", "alpha", BRAIN), EXPIRED)
    with pytest.raises(Exception, match="IRB approval has expired"):
        search_studies(site.ctx, ALICE, "alpha", "main", "000123")
    assert site.as_("alice")("GET", "/api/v1/projects").json()[0]["expired"] is True
    assert admin_says_expired()
    schedule_once(site.ctx, "test-worker")
    assert state(late) == ("canceled", f"canceled: {EXPIRED}")
    with transaction(site.ctx.sessions) as session:  # a forward queued before midnight is canceled after it
        queued = Request(kind="forward", project_id="alpha", user_login="alice", destination_id="research",
                         patient_id="000123", study_uid=BRAIN, state="scheduled", created_at=clock.now())
        session.add(queued)
        session.flush()
        forward_id = queued.id
    assert schedule_forwards(site.ctx, "test-worker") == []
    assert state(forward_id) == ("canceled", f"canceled: {EXPIRED}")
    # Listing and deleting still work.
    assert site.as_("alice")("GET", "/api/v1/projects/alpha/cache").status_code == 200
    assert site.as_("alice")("POST", "/api/v1/projects/alpha/cache/delete", json={"study_uids": [BRAIN]}).status_code == 200


# --- after access ends ----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["expired", "removed", "withdrawn"])
def test_after_access_ends_reads_close_list_and_delete_stay_and_purge_takes_exactly_that(
        tmp_path: Path, database_url: str, case: str) -> None:
    site = make_site(tmp_path, database_url)
    project, study, reason = {"expired": ("beta", BETA, EXPIRED), "removed": ("beta", BETA, REMOVED),
                              "withdrawn": ("alpha", BRAIN, WITHDRAWN)}[case]
    bob = "bob" if project == "alpha" else "carol"  # another member, to show the rule is not per user
    ticket = site.as_("alice")("POST", f"/api/v1/projects/{project}/download/manifest",
                               json={"study_uids": [study]}).json()  # started while access lasted
    if case == "expired":
        site.clock.set(AFTER_BETA)
    elif case == "removed":
        text = site.toml.read_text()
        site.toml.write_text(text[:text.index('[[projects]]\nid = "beta"')] + DESTINATION)
        site.reload()
    else:
        site.edit("000123\n", "", file="alpha.mrns")
        site.reload()

    for login in ("alice", bob):
        assert_all_refused(read_doors(site, login, project, study), reason)
    # A CLI download under way stops: each file asks again.
    fetch = site.as_("alice")("POST", f"/api/v1/projects/{project}/download/instance",
                              json={"download_id": ticket["studies"][0]["download_id"], "study_uid": study,
                                    "sop_uid": ticket["files"][0]["sop_uid"]})
    assert fetch.status_code == 403 and reason in fetch.json()["error"]
    # QIDO without naming the study: a closed project refuses; a withdrawn patient's study is simply absent.
    qido = site.as_("alice")("GET", f"/dicomweb/projects/{project}/studies")
    if case == "withdrawn":
        assert qido.status_code == 200 and study not in qido.text and TRAUMA in qido.text
        tree = site.as_("alice")("GET", f"/api/v1/projects/{project}/viewer/tree")
        assert tree.status_code == 200 and study not in tree.text and "000123" not in tree.text
        everything = site.as_("alice")("POST", f"/api/v1/projects/{project}/download/manifest", json={"all": True})
        assert everything.status_code == 200 and study not in {s["study_uid"] for s in everything.json()["studies"]}
        assert_all_open(read_doors(site, "alice", project, TRAUMA))  # only that patient's studies closed
    else:
        assert qido.status_code == 403 and reason in qido.json()["error"]
    events = [d for d in denials(site.ctx, "alice") if d.get("reason") == reason]
    assert len(events) == 7 + 1 + (case != "withdrawn")  # the doors, the file fetch, QIDO of the whole project

    # Listing still works and says why the study is closed; so does a study's detail.
    listing = site.as_("alice")("GET", f"/api/v1/projects/{project}/cache").json()["studies"]
    closed = {s["study_uid"]: s["closed_reason"] for s in listing}
    assert closed[study] == reason
    assert site.as_("alice")("GET", f"/api/v1/projects/{project}/cache/studies/{study}").status_code == 200

    # Purge: the dry run lists exactly what is closed, across projects; --yes deletes exactly that.
    everything_before = {p: cached_uids(site.ctx, p) for p in ("alpha", "beta")}
    dry = site.as_("root")("GET", "/api/v1/admin/purge").json()
    assert {(s["project_id"], s["study_uid"], s["reason"]) for s in dry["studies"]} == {(project, study, reason)}
    assert {p: cached_uids(site.ctx, p) for p in ("alpha", "beta")} == everything_before
    done = site.as_("root")("POST", "/api/v1/admin/purge").json()
    assert [(s["project_id"], s["study_uid"]) for s in done["studies"]] == [(project, study)]
    assert cached_uids(site.ctx, project) == everything_before[project] - {study}
    assert not (site.ctx.config.cache_dir() / project / study).exists()
    other = "beta" if project == "alpha" else "alpha"
    assert cached_uids(site.ctx, other) == everything_before[other]
    deleted = [e for e in site.ctx.audit.list(ROOT, AuditFilter(action="delete", actor="root"))
               if e.study_uid == study]
    assert len(deleted) == 1 and json.loads(deleted[0].detail)["reason"] == reason
    assert site.as_("root")("GET", "/api/v1/admin/purge").json()["studies"] == []


def test_members_still_delete_after_the_irb_expired(tmp_path: Path, database_url: str) -> None:
    site = make_site(tmp_path, database_url)
    site.clock.set(AFTER_BETA)
    assert site.as_("carol")("GET", "/api/v1/projects/beta/cache").status_code == 200
    gone = site.as_("carol")("POST", "/api/v1/projects/beta/cache/delete", json={"study_uids": [BETA]})
    assert gone.status_code == 200 and gone.json()["deleted"] == [BETA]
    assert [e.actor for e in site.ctx.audit.list(ROOT, AuditFilter(action="delete"))] == ["carol"]


def test_read_only_policy_keeps_reads_and_forward_open_after_expiry_but_not_for_a_withdrawn_patient(
        tmp_path: Path, database_url: str) -> None:
    site = make_site(tmp_path, database_url, '[site]\ndata_policy = "read-only"\n')
    site.clock.set(AFTER_BETA)  # beta's IRB has expired
    assert_all_open(read_doors(site, "carol", "beta", BETA))
    assert site.as_("carol")("GET", "/dicomweb/projects/beta/studies").status_code == 200
    assert site.as_("root")("GET", "/api/v1/admin/purge").json()["studies"] == []
    # Forwards queued in a read-only project are not canceled by the scheduler when the IRB has expired.
    schedule_forwards(site.ctx, "test-worker")
    with site.ctx.sessions() as session:
        states = set(session.scalars(select(Request.state).where(Request.kind == "forward")))
    assert "canceled" not in states
    site.edit("000123\n", "", file="alpha.mrns")
    site.reload()
    assert_all_refused(read_doors(site, "alice", "alpha", BRAIN), WITHDRAWN)


def test_a_project_may_override_the_sites_policy(tmp_path: Path, database_url: str) -> None:
    site = make_site(tmp_path, database_url)
    site.edit('mrn_files = { general = "beta.mrns" }', 'mrn_files = { general = "beta.mrns" }\ndata_policy = "read-only"')
    site.reload()
    site.clock.set(AFTER_BETA)
    assert_all_open(read_doors(site, "carol", "beta", BETA))
    assert site.as_("root")("GET", "/api/v1/admin/purge").json()["studies"] == []
    site.edit('data_policy = "read-only"', 'data_policy = "closed"')
    site.reload()
    assert_all_refused(read_doors(site, "carol", "beta", BETA), EXPIRED)


# --- least privilege ----------------------------------------------------------------------------


def test_an_admin_who_is_not_a_member_manages_but_reads_no_images(tmp_path: Path, database_url: str) -> None:
    site = make_site(tmp_path, database_url)
    root = site.as_("root")
    doors = read_doors(site, "root", "alpha", BRAIN)
    doors["cache detail"] = root("GET", f"/api/v1/projects/alpha/cache/studies/{BRAIN}")
    doors["viewer tree"] = root("GET", "/api/v1/projects/alpha/viewer/tree")
    doors["qido all"] = root("GET", "/dicomweb/projects/alpha/studies")
    doors["wado"] = root("GET", f"/dicomweb/projects/alpha/studies/{BRAIN}",
                         headers={"Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'})
    assert_all_refused(doors, ADMIN_NOT_MEMBER)
    assert len([d for d in denials(site.ctx, "root") if d["reason"] == ADMIN_NOT_MEMBER]) >= len(doors)
    # Managing: list, delete, purge, reload the configuration, see every project.
    assert root("GET", "/api/v1/projects/alpha/cache").status_code == 200
    assert root("POST", "/api/v1/projects/alpha/cache/delete", json={"study_uids": [TRAUMA]}).status_code == 200
    assert root("GET", "/api/v1/admin/purge").status_code == 200
    assert root("POST", "/api/v1/admin/config/reload").status_code == 200
    assert {p["id"] for p in root("GET", "/api/v1/admin/projects").json()} == {"alpha", "beta"}
    # Made a member, the same admin reads.
    site.edit('members = [{ login = "alice", role = "lead" }, { login = "bob" }]',
              'members = [{ login = "alice", role = "lead" }, { login = "bob" }, { login = "root" }]')
    site.reload()
    assert root("GET", f"/api/v1/projects/alpha/viewer/studies/{BRAIN}").status_code == 200


def test_a_removed_member_loses_their_queued_requests_with_the_reason(tmp_path: Path, database_url: str) -> None:
    site = make_site(tmp_path, database_url)
    now = site.clock.now()
    with transaction(site.ctx.sessions) as session:
        rows = {
            name: Request(kind=kind, project_id="alpha", user_login=login, pacs_id="main" if kind == "retrieve" else None,
                          destination_id="research" if kind == "forward" else None, patient_id="000123",
                          study_uid=f"1.2.3.{i}", state=state, created_at=now)
            for i, (name, kind, login, state) in enumerate([
                ("bob queued", "retrieve", "bob", "scheduled"), ("bob forward", "forward", "bob", "scheduled"),
                ("bob running", "retrieve", "bob", "processing"), ("alice queued", "retrieve", "alice", "scheduled"),
            ])
        }
        session.add_all(rows.values())
        session.flush()
        ids = {name: row.id for name, row in rows.items()}
    site.edit('members = [{ login = "alice", role = "lead" }, { login = "bob" }]',
              'members = [{ login = "alice", role = "lead" }]')
    site.reload()
    with site.ctx.sessions() as session:
        after = {name: session.get_one(Request, rid) for name, rid in ids.items()}
        for name in ("bob queued", "bob forward"):
            assert after[name].state == "canceled"
            assert after[name].last_error == "canceled: bob is no longer a member of project alpha"
            assert after[name].ended_at is not None and after[name].waiting_reason is None
        assert after["bob running"].state == "processing"
        assert after["alice queued"].state == "scheduled"
    events = [e for e in site.ctx.audit.list(ROOT, AuditFilter(limit=5000)) if e.action in ("retrieve", "forward")]
    assert {json.loads(e.detail)["request"] for e in events if e.outcome == "denied"} == {
        ids["bob queued"], ids["bob forward"]}
    reload_event = site.ctx.audit.list(ROOT, AuditFilter(action="config_reload"))[0]
    assert json.loads(reload_event.detail)["requests_canceled"] == 2


# --- the command line -------------------------------------------------------------------------


def mi2b2(*args: str) -> subprocess.CompletedProcess[str]:
    env = {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "PYTHONPATH": os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-m", "mi2b2", *args], capture_output=True, text=True, timeout=120,
                            check=False, env=env)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def test_cli_download_is_refused_with_the_reason_and_admin_purge_dry_runs_then_deletes(
        tmp_path: Path, database_url: str) -> None:
    site = make_site(tmp_path, database_url)
    site.clock.set(AFTER_BETA)  # the server's clock: beta's IRB has expired (so has it by the wall clock)
    with serving(create_app(site.ctx)) as url:
        refused = mi2b2("download", "beta", BETA, "--to", str(tmp_path / "out"), "--server", url,
                        "--token", site.cached.tokens["carol"])
    assert refused.returncode == 2 and EXPIRED in refused.stderr, refused.stderr
    assert not list((tmp_path / "out").rglob("*.dcm"))

    dry = mi2b2("admin", "purge", "--config", str(site.toml), "--format", "json")
    assert dry.returncode == 0, dry.stderr
    assert [(s["project_id"], s["study_uid"], s["reason"]) for s in json.loads(dry.stdout)] == [("beta", BETA, EXPIRED)]
    assert cached_uids(site.ctx, "beta") == {BETA}
    table = mi2b2("admin", "purge", "--config", str(site.toml))
    assert "would be deleted; run `mi2b2 admin purge --yes`" in table.stdout
    done = mi2b2("admin", "purge", "--yes", "--config", str(site.toml))
    assert done.returncode == 0 and "purged 1 closed studies" in done.stdout, done.stdout + done.stderr
    assert cached_uids(site.ctx, "beta") == set() and cached_uids(site.ctx, "alpha") == {BRAIN, TRAUMA, SAMPLE_STUDY}
    again = mi2b2("admin", "purge", "--config", str(site.toml))
    assert "nothing to purge" in again.stdout
    purged = [e for e in site.ctx.audit.list(ROOT, AuditFilter(action="delete", limit=100)) if e.study_uid == BETA]
    assert len(purged) == 1 and purged[0].actor.startswith("cli:") and EXPIRED in purged[0].detail
