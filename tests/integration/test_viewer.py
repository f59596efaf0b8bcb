"""The viewer end to end: its API over a real project cache (SQLite and PostgreSQL), its page, and `mi2b2 view`."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from mi2b2.api.app import create_app
from mi2b2.domain.principal import Principal, Role
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.synthetic import series_instance_uid, sop_instance_uid, write_study
from mi2b2.testing import FakeClock
from support import studies
from support.site import load_site
from support.viewing import AUDITOR, BETA_STUDY, SAMPLE_SERIES, SAMPLE_STUDY, Cached, fill, reidentified_sample

BRAIN = studies.uid(studies.BRAIN)
MR = sop_instance_uid(studies.BRAIN, 2, 1)  # series 2, image 1: a 16x16 MR slice
CT = sop_instance_uid(studies.TRAUMA, 1, 1)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ctx(tmp_path: Path, database_url: str, clock: FakeClock) -> ServiceContext:
    return build_context(load_site(tmp_path / "site", database_url=database_url), clock=clock)


@pytest.fixture
def cached(ctx: ServiceContext, tmp_path: Path) -> Cached:
    return fill(ctx, tmp_path / "files")


@pytest.fixture
def client(ctx: ServiceContext) -> TestClient:
    return TestClient(create_app(ctx))


def sop_of(cached: Cached, name: str) -> str:
    series = SAMPLE_SERIES[name]
    return next(sop for sop, path in cached.files.items() if f"/{series}/" in path.as_posix())


def api(project: str = "alpha") -> str:
    return f"/api/v1/projects/{project}/viewer"


def png(response: httpx.Response) -> np.ndarray:
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "image/png"
    assert response.headers["cache-control"] == "no-store"
    return np.asarray(Image.open(io.BytesIO(response.content)))


def views(ctx: ServiceContext, actor: str | None = None) -> list:  # type: ignore[type-arg]
    return ctx.audit.list(AUDITOR, AuditFilter(action="view", actor=actor))


def test_tree_lists_patients_and_studies_in_the_body(client: TestClient, cached: Cached) -> None:
    response = client.get(f"{api()}/tree", headers=cached.headers("alice"))
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    tree = response.json()
    patients = {p["patient_id"]: p for p in tree["patients"]}
    assert set(patients) == {"000123", "77", "PAT004"}
    (brain,) = patients["000123"]["studies"]
    assert (brain["study_uid"], brain["series_count"], brain["instance_count"], brain["modalities"]) == (BRAIN, 3, 6, "MR")
    assert patients["PAT004"]["patient_name"] == "SAMPLE^PATIENT"
    assert {p["key"] for p in tree["presets"]} >= {"brain", "bone", "lung", "abdomen", "soft_tissue"}
    assert "B-1" not in response.text  # beta's patient stays in beta


def test_study_lists_series_and_images_in_order(client: TestClient, cached: Cached) -> None:
    study = client.get(f"{api()}/studies/{BRAIN}", headers=cached.headers("bob")).json()
    assert [s["series_number"] for s in study["series"]] == [1, 2, 3]
    assert [s["description"] for s in study["series"]] == ["AX T1", "AX T2", "AX FLAIR"]
    assert {s["modality"] for s in study["series"]} == {"MR"}
    second = study["series"][1]
    assert second["series_uid"] == series_instance_uid(studies.BRAIN, 2)
    assert [i["instance_number"] for i in second["instances"]] == [1, 2]
    assert second["instances"][0]["sop_uid"] == MR


def test_frames_render_as_png_with_window_and_presets(client: TestClient, cached: Cached) -> None:
    alice = cached.headers("alice")
    default = client.get(f"{api()}/instances/{MR}/frames/1.png", headers=alice)
    base = png(default)
    assert base.shape == (16, 16) and default.headers["x-frames"] == "1"
    assert {"x-window-center", "x-window-width"} <= set(default.headers)
    narrow = client.get(f"{api()}/instances/{MR}/frames/1.png", params={"center": 300, "width": 50}, headers=alice)
    assert (narrow.headers["x-window-center"], narrow.headers["x-window-width"]) == ("300", "50")
    assert not np.array_equal(base, png(narrow))

    # CT: the file's window (40/400 HU after RescaleIntercept), and the presets
    ct = client.get(f"{api()}/instances/{CT}/frames/1.png", headers=alice)
    assert (ct.headers["x-window-center"], ct.headers["x-window-width"]) == ("40", "400")
    lung = client.get(f"{api()}/instances/{CT}/frames/1.png", params={"preset": "lung"}, headers=alice)
    assert (lung.headers["x-window-center"], lung.headers["x-window-width"]) == ("-600", "1500")
    assert not np.array_equal(png(ct), png(lung))

    # JPEG 2000, and a multi-frame JPEG baseline YBR ultrasound clip
    j2k = png(client.get(f"{api()}/instances/{sop_of(cached, 'JPEG2000.dcm')}/frames/1.png", headers=alice))
    assert j2k.shape == (1024, 256)
    clip = sop_of(cached, "examples_ybr_color.dcm")
    last = client.get(f"{api()}/instances/{clip}/frames/30.png", headers=alice)
    assert png(last).shape == (240, 320, 3) and last.headers["x-frames"] == "30"
    assert "x-window-center" not in last.headers  # colour: no window
    past = client.get(f"{api()}/instances/{clip}/frames/31.png", headers=alice)
    assert past.status_code == 404 and "this image has 30 frames" in past.json()["error"]
    assert client.get(f"{api()}/instances/{clip}/frames/0.png", headers=alice).status_code == 422
    bad = client.get(f"{api()}/instances/{MR}/frames/1.png", params={"preset": "kidney"}, headers=alice)
    assert bad.status_code == 422 and "use one of brain" in bad.json()["error"]
    assert client.get(f"{api()}/instances/1.2.3/frames/1.png", headers=alice).status_code == 404
    assert client.get(f"{api()}/instances/not-a-uid/frames/1.png", headers=alice).status_code == 422


def test_tags_panel(client: TestClient, cached: Cached) -> None:
    clip = sop_of(cached, "examples_ybr_color.dcm")
    response = client.get(f"{api()}/instances/{clip}/tags", headers=cached.headers("alice"))
    assert response.status_code == 200 and response.headers["cache-control"] == "no-store"
    body = response.json()
    assert body["study_uid"] == SAMPLE_STUDY and body["series_uid"] == SAMPLE_SERIES["examples_ybr_color.dcm"]
    assert body["image"]["frames"] == 30
    assert (body["image"]["columns"], body["image"]["rows"]) == (320, 240)
    assert body["image"]["transfer_syntax"] == "JPEG Baseline (Process 1)"
    tags = {t["keyword"]: t["value"] for t in body["tags"]}
    assert tags["PatientID"] == "PAT004" and tags["Modality"] == "US"


def test_viewing_is_audited_once_per_study_and_session(client: TestClient, ctx: ServiceContext, cached: Cached,
                                                       clock: FakeClock) -> None:
    alice = cached.headers("alice")
    client.get(f"{api()}/studies/{BRAIN}", headers=alice)
    for number in range(5):  # scrolling and dragging: many frames, one study
        client.get(f"{api()}/instances/{MR}/frames/1.png", params={"center": 100 + number}, headers=alice)
    client.get(f"{api()}/instances/{MR}/tags", headers=alice)
    client.get(f"{api()}/instances/{sop_instance_uid(studies.BRAIN, 3, 2)}/frames/1.png", headers=alice)
    client.get(f"{api()}/tree", headers=alice)  # the tree is a listing, like the cache's: not a view
    (event,) = views(ctx, "alice")
    assert (event.project_id, event.patient_id, event.study_uid) == ("alpha", "000123", BRAIN)
    assert '"via":"viewer"' in event.detail and '"first":"study"' in event.detail

    client.get(f"{api()}/instances/{CT}/frames/1.png", headers=alice)  # another study: its own event
    client.get(f"{api()}/instances/{MR}/frames/1.png", headers=cached.headers("bob"))  # another user too
    assert len(views(ctx, "alice")) == 2 and len(views(ctx, "bob")) == 1
    clock.advance(hours=9)  # a new working session
    client.get(f"{api()}/instances/{MR}/frames/1.png", headers=alice)
    assert len(views(ctx, "alice")) == 3


def test_only_members_may_view_and_admins_only_where_members(client: TestClient, ctx: ServiceContext,
                                                             cached: Cached) -> None:
    paths = [f"{api()}/tree", f"{api()}/studies/{BRAIN}", f"{api()}/instances/{MR}/tags",
             f"{api()}/instances/{MR}/frames/1.png"]
    for path in paths:
        assert client.get(path).status_code == 401
        for outsider in ("carol", "dave", "audrey"):
            response = client.get(path, headers=cached.headers(outsider))
            assert response.status_code == 403, (outsider, path)
            assert "not a member" in response.json()["error"]
            assert response.headers["cache-control"] == "no-store"
        admin = client.get(path, headers=cached.headers("root"))  # admins manage; they read only as members
        assert admin.status_code == 403, path
        assert "site admins read images only in projects they are members of" in admin.json()["error"]
        assert client.get(path, headers=cached.headers("bob")).status_code == 200
    assert len(ctx.audit.list(AUDITOR, AuditFilter(action="denied", actor="root"))) == len(paths)
    denied = ctx.audit.list(AUDITOR, AuditFilter(action="denied", actor="carol"))
    assert len(denied) == len(paths)
    assert not views(ctx, "carol")
    # beta's images are not in alpha's cache, even for alice who is in both
    beta_sop = sop_instance_uid(BETA_STUDY, 1, 1)
    hidden = client.get(f"{api()}/instances/{beta_sop}/frames/1.png", headers=cached.headers("alice"))
    assert hidden.status_code == 404
    expired = client.get(f"{api('beta')}/instances/{beta_sop}/frames/1.png", headers=cached.headers("alice"))
    assert expired.status_code == 403 and "IRB approval has expired" in expired.json()["error"]  # beta's IRB ended
    assert client.get(f"{api('nosuch')}/tree", headers=cached.headers("root")).status_code == 404


def test_a_missing_file_is_reported_with_the_fix(client: TestClient, cached: Cached) -> None:
    cached.files[MR].unlink()
    response = client.get(f"{api()}/instances/{MR}/frames/1.png", headers=cached.headers("alice"))
    assert response.status_code == 404 and "mi2b2 admin fsck --repair" in response.json()["error"]


def test_the_page_is_served_without_outside_resources(client: TestClient) -> None:
    page = client.get("/viewer/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    assert "default-src 'self'" in page.headers["content-security-policy"]
    assert page.headers["cache-control"] == "no-store"
    script = client.get("/viewer/viewer.js")
    assert script.status_code == 200 and script.headers["content-type"].startswith("text/javascript")
    assert client.get("/viewer/viewer.css").status_code == 200
    assert client.get("/viewer/secrets.txt").status_code == 404
    assert client.get("/viewer", follow_redirects=False).headers["location"] == "/viewer/"
    for text in (page.text, script.text, client.get("/viewer/viewer.css").text):
        assert not re.search(r"(src|href)=\"https?://|@import|url\(http|fonts\.googleapis", text)


# --- `mi2b2 view` ------------------------------------------------------------------------------------


@pytest.fixture
def mi2b2_view() -> Iterator[object]:
    started: list[subprocess.Popen[str]] = []

    def run(*args: str) -> tuple[subprocess.Popen[str], str]:
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        process = subprocess.Popen([sys.executable, "-m", "mi2b2", "view", *args], stdout=subprocess.PIPE,
                                   stderr=subprocess.PIPE, text=True, env=env)
        started.append(process)
        assert process.stdout is not None
        for line in process.stdout:
            found = re.search(r"viewer at (http://127\.0\.0\.1:\d+/[A-Za-z0-9_-]+/)", line)
            if found:
                return process, found.group(1)
        raise AssertionError(f"`mi2b2 view` printed no URL; stderr: {process.stderr.read() if process.stderr else ''}")

    yield run
    for process in started:
        process.terminate()
        process.wait(timeout=20)


def test_mi2b2_view_serves_a_plain_folder_with_its_token_only(tmp_path: Path, mi2b2_view) -> None:  # type: ignore[no-untyped-def]
    folder = tmp_path / "download"
    write_study(studies.BRAIN, folder / "brain")
    reidentified_sample("examples_ybr_color.dcm", folder / "clip")
    (folder / "README.txt").write_text("not DICOM")
    _process, url = mi2b2_view(str(folder))
    base = url.rstrip("/")
    origin, token = base.rsplit("/", 1)

    page = httpx.get(url)
    assert page.status_code == 200 and "mi2b2 viewer" in page.text and page.headers["cache-control"] == "no-store"
    tree = httpx.get(f"{base}/api/tree").json()
    assert tree["skipped_files"] == 1
    assert {p["patient_id"] for p in tree["patients"]} == {"000123", "PAT004"}
    study = httpx.get(f"{base}/api/studies/{BRAIN}").json()
    assert [s["description"] for s in study["series"]] == ["AX T1", "AX T2", "AX FLAIR"]
    frame = httpx.get(f"{base}/api/instances/{MR}/frames/1.png", params={"preset": "brain"})
    assert png(frame).shape == (16, 16) and frame.headers["x-window-center"] == "40"
    clip = next(i["sop_uid"] for s in httpx.get(f"{base}/api/studies/{SAMPLE_STUDY}").json()["series"]
                for i in s["instances"])
    tags = httpx.get(f"{base}/api/instances/{clip}/tags")
    assert tags.status_code == 200 and tags.json()["image"]["frames"] == 30
    assert tags.headers["cache-control"] == "no-store"
    assert png(httpx.get(f"{base}/api/instances/{clip}/frames/12.png")).shape == (240, 320, 3)

    # without the token, with a wrong one, or under another host name: refused
    for path in ("/", "/api/tree", f"/{'x' * len(token)}/api/tree", f"/{token[:-1]}/api/tree",
                 f"/{'x' * len(token)}/api/instances/{MR}/frames/1.png"):
        refused = httpx.get(origin + path)
        assert refused.status_code in (403, 404), path
        assert refused.headers.get("content-type", "").startswith("application/json")
    assert httpx.get(f"{origin}/{'x' * len(token)}/").status_code == 403
    assert httpx.get(f"{base}/api/tree", headers={"Host": "attacker.example:80"}).status_code == 403


def test_mi2b2_view_opens_an_encrypted_download_in_memory(tmp_path: Path, mi2b2_view) -> None:  # type: ignore[no-untyped-def]
    from mi2b2.services.export.download import Encryption, zip_download

    ctx = build_context(load_site(tmp_path / "site"), clock=FakeClock())
    fill(ctx, tmp_path / "files")
    archive = tmp_path / "encrypted.zip"
    result = zip_download(ctx, Principal("alice", Role.RESEARCHER), "alpha", [BRAIN],
                          encryption=Encryption(passphrase="correct horse battery"))
    with open(archive, "wb") as out:
        for chunk in result.chunks:
            out.write(chunk)
    secret = tmp_path / "passphrase.txt"
    secret.write_text("correct horse battery\n")
    before = {p for p in tmp_path.rglob("*")}

    wrong = subprocess.run([sys.executable, "-m", "mi2b2", "view", str(archive)], capture_output=True, text=True,
                           timeout=120)
    assert wrong.returncode == 2 and "encrypted download: give --passphrase" in wrong.stderr
    assert "Traceback" not in wrong.stderr

    _process, url = mi2b2_view(str(archive), "--passphrase-file", str(secret))
    base = url.rstrip("/")
    tree = httpx.get(f"{base}/api/tree").json()
    assert [p["patient_id"] for p in tree["patients"]] == ["000123"]
    assert png(httpx.get(f"{base}/api/instances/{MR}/frames/1.png")).shape == (16, 16)
    assert httpx.get(f"{base}/api/instances/{MR}/tags").json()["image"]["rows"] == 16
    assert {p for p in tmp_path.rglob("*")} == before  # nothing decrypted was written anywhere


def test_python_client_reads_the_viewer(ctx: ServiceContext, cached: Cached) -> None:
    from mi2b2.client import Mi2b2Client
    from mi2b2.errors import AccessDenied
    from support.viewing import serving

    with serving(create_app(ctx)) as url:
        with Mi2b2Client(url, cached.tokens["alice"]) as alice:
            assert {p["patient_id"] for p in alice.viewer_tree("alpha")["patients"]} == {"000123", "77", "PAT004"}
            assert len(alice.viewer_study("alpha", BRAIN)["series"]) == 3
            assert alice.viewer_tags("alpha", MR)["image"]["rows"] == 16
            image = Image.open(io.BytesIO(alice.viewer_frame("alpha", CT, preset="bone")))
            assert image.size == (16, 16) and image.mode == "L"
        with Mi2b2Client(url, cached.tokens["carol"]) as carol, pytest.raises(AccessDenied, match="not a member"):
            carol.viewer_frame("alpha", MR)


def test_local_library_reads_what_the_fast_header_parser_cannot(tmp_path: Path) -> None:
    import shutil

    from pydicom.data import get_testdata_file

    from mi2b2.errors import InvalidInput
    from mi2b2.services.viewer import LocalLibrary, PlainFolder, open_local

    folder = tmp_path / "download"
    folder.mkdir()
    shutil.copy(str(get_testdata_file("MR_small_bigendian.dcm")), folder / "big-endian")  # any name, no .dcm
    (folder / "notes.txt").write_text("not DICOM")
    (folder / ".hidden.dcm").write_bytes(b"left out")
    library = LocalLibrary(open_local(folder))
    assert isinstance(library.source, PlainFolder)
    (entry,) = library.instances.values()
    assert library.skipped == 1
    study = library.study(entry.study_uid)
    assert study["series"][0]["instances"][0]["sop_uid"] == entry.sop_uid
    assert library.frame(entry.sop_uid, 1).window is not None
    with pytest.raises(InvalidInput, match="not an encrypted download"):
        open_local(folder, passphrase="anything at all")
