"""What a user does to studies and requests through the client, in Chromium, against Orthanc:

forward a cached study from Tab 3 to a DICOM destination (DCMTK storescp) and watch it
complete in Tab 5; download a study encrypted with a passphrase and open it with the Debian
`age` tool typing that passphrase at a terminal; an admin adds a user who then logs in;
change the priority of, cancel and retry requests in the Request Log.

One server for the module. Its site has, besides the Orthanc PACS "main", the destination
"dcmtk" (a storescp the module starts) and the PACS "gated": the same Orthanc behind a
governance window closed all week, so requests to it stay scheduled with a waiting reason.
"""

from __future__ import annotations

import io
import os
import select
import shutil
import subprocess
import textwrap
import time
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom
import pytest
from playwright.sync_api import Page, expect

from support.browser_site import (
    ADMIN,
    PACS_ID,
    RESEARCHER,
    Catalog,
    Mi2b2Server,
    StudyInfo,
    login,
    screenshot,
    serve,
)
from support.pacs import RunningPacs, free_port, start_storescp

if TYPE_CHECKING:
    from .conftest import BrowserPacs

PROJECT = "alpha"
DESTINATION = "dcmtk"
DESTINATION_NAME = "Research archive"
GATED = "gated"
WINDOW = "maintenance"
AGE = shutil.which("age") or "/usr/bin/age"
SETSID = shutil.which("setsid") or "/usr/bin/setsid"
RETRIEVAL_SECONDS = 60
ENDED = {"completed", "incomplete", "failed", "canceled"}


def gated_pacs(ae_title: str, port: int, closed: bool = True) -> str:
    """The Orthanc again as PACS "gated": closed all week, or open with one attempt per retrieval."""
    block = textwrap.dedent(f"""
        [[institutions.departments.pacs]]
        id = "{GATED}"
        name = "Gated PACS"
        ae_title = "{ae_title}"
        host = "127.0.0.1"
        port = {port}
    """)
    if closed:
        return block + textwrap.dedent(f"""
            [[institutions.departments.pacs.windows]]
            name = "{WINDOW}"
            days = "mon-sun"
            closed = true
        """)
    return block + "[institutions.departments.pacs.retries]\nmax_attempts = 1\n"


def destination_toml(port: int, ae_title: str) -> str:
    return textwrap.dedent(f"""
        [[destinations]]
        id = "{DESTINATION}"
        name = "{DESTINATION_NAME}"
        ae_title = "{ae_title}"
        host = "127.0.0.1"
        port = {port}
        projects = ["{PROJECT}"]
    """)


@pytest.fixture(scope="module")
def storescp(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningPacs]:
    destination = start_storescp(tmp_path_factory.mktemp("storescp"))
    try:
        yield destination
    finally:
        destination.stop()


@pytest.fixture(scope="module")
def mi2b2_server(orthanc: BrowserPacs, storescp: RunningPacs,
                 tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mi2b2Server]:
    """This module's server: the conftest's site plus the destination and the gated PACS."""
    gated = gated_pacs(orthanc.pacs.ae_title, orthanc.pacs.port)
    with serve(tmp_path_factory.mktemp("browser-site"), orthanc.pacs, pacs_extra=gated,
               site_extra=destination_toml(storescp.port, storescp.ae_title)) as server:
        yield server


# --- helpers ----------------------------------------------------------------------------------


def api(page: Page, method: str, path: str, data: Any = None) -> Any:
    """The API with the page's own session cookie."""
    response = page.request.fetch(f"/api/v1{path}", method=method, data=data)
    assert response.ok, f"{method} {path}: HTTP {response.status} {response.text()}"
    return response.json()


def wait_for_request(page: Page, request_id: int, done: Callable[[dict[str, Any]], bool],
                     timeout: float = RETRIEVAL_SECONDS) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        row: dict[str, Any] = api(page, "GET", f"/requests/{request_id}")
        if done(row):
            return row
        if time.monotonic() > deadline:
            raise AssertionError(f"request {request_id} did not get there in {timeout:g} s: {row}")
        time.sleep(0.2)


def request_studies(page: Page, pacs_id: str, *studies: StudyInfo) -> list[int]:
    report = api(page, "POST", "/requests", {"project": PROJECT, "pacs": pacs_id,
                                             "studies": [{"study_uid": s.uid} for s in studies]})
    assert len(report["created"]) == len(studies), report
    return list(report["created"])


def cache_study(page: Page, study: StudyInfo) -> None:
    """Set-up through the API: retrieve the whole study into alpha's cache and wait until it is there."""
    (request_id,) = request_studies(page, PACS_ID, study)
    row = wait_for_request(page, request_id, lambda r: r["state"] in ENDED)
    assert (row["state"], row["received"]) == ("completed", study.instance_count), row


def pick_in_repository(page: Page, study: StudyInfo) -> None:
    page.goto("/app/#repository")
    row = page.locator(f'#page-repository tr[data-key="{study.uid}"]')
    expect(row.locator("td[data-col=instance_count]")).to_have_text(str(study.instance_count))
    row.locator("input[type=checkbox]").check()
    expect(page.locator("#page-repository .table-summary")).to_contain_text("1 selected")


def sop_uids_in(folder: Path) -> list[str]:
    return sorted(str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
                  for p in folder.rglob("*") if p.is_file())


def age_with_passphrase(args: list[str], passphrase: str, cwd: Path, timeout: float = 60.0) -> str:
    """Run the Debian `age` on a terminal of its own (a pty) and type `passphrase` when it asks.

    age reads passphrases from /dev/tty only, never from a pipe; `setsid -c` makes the pty
    the controlling terminal of a new session. Returns what age wrote to the terminal."""
    master, slave = os.openpty()
    try:
        process = subprocess.Popen([SETSID, "-w", "-c", AGE, *args], stdin=slave, stdout=slave, stderr=slave,
                                   cwd=cwd)
    finally:
        os.close(slave)
    seen, typed = b"", False
    deadline = time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([master], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                process.kill()
                raise AssertionError(f"age did not finish within {timeout:g} s; terminal: {seen!r}")
            try:
                chunk = os.read(master, 4096)
            except OSError:  # EIO: every end of the terminal's slave side is closed, age has exited
                break
            if not chunk:
                break
            seen += chunk
            if not typed and b"passphrase" in seen.lower():
                os.write(master, passphrase.encode() + b"\n")
                typed = True
    finally:
        os.close(master)
    returncode = process.wait(timeout=timeout)
    terminal = seen.decode(errors="replace")
    assert typed, f"age never asked for the passphrase: {terminal!r}"
    assert returncode == 0, f"age exited with {returncode}: {terminal!r}"
    return terminal


def age_decrypt(identity: Path, data: bytes) -> bytes:
    result = subprocess.run([AGE, "-d", "-i", str(identity)], input=data, capture_output=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def no_page_errors(console: list[str]) -> None:
    assert not [line for line in console if "pageerror" in line], console


# --- the tests -----------------------------------------------------------------------------------


def test_forward_a_cached_study_to_a_destination(page: Page, catalog: Catalog, storescp: RunningPacs,
                                                 console: list[str]) -> None:
    study = catalog.study("BR-3003")  # 77, CT ABDOMEN: 2 series of 2
    login(page, RESEARCHER)
    cache_study(page, study)
    assert sop_uids_in(storescp.workdir / "received") == []

    # --- Tab 3: pick the study, forward it to the project's destination ----------------------------------
    pick_in_repository(page, study)
    where = page.get_by_label("forward destination")
    expect(where).to_have_value(DESTINATION)
    expect(where.locator("option")).to_have_text([f"{DESTINATION_NAME} ({storescp.ae_title})"])
    page.get_by_role("button", name="Forward selected").click()
    expect(page.locator("#messages")).to_contain_text(f"1 forward request(s) queued to {DESTINATION}")

    # --- Tab 5: the forward appears and completes without a reload ------------------------------------
    page.evaluate("window.__sameDocument = 'yes'")
    page.locator("#tab-requests").click()
    forward = page.locator("#page-requests tbody tr[data-key]").filter(
        has=page.locator("td[data-col=kind]", has_text="forward"))
    expect(forward).to_have_count(1)
    expect(forward.locator("td[data-col=where]")).to_have_text(DESTINATION)
    expect(forward.locator("td[data-col=study]")).to_have_text(study.accession)
    expect(forward.locator("td[data-col=state]")).to_have_text("completed", timeout=RETRIEVAL_SECONDS * 1000)
    count = study.instance_count
    expect(forward.locator("td[data-col=progress]")).to_contain_text(f"{count} / {count} images")
    assert page.evaluate("window.__sameDocument") == "yes"
    screenshot(page, "forward")

    # --- the destination holds exactly the study; the server says the same ---------------------------
    assert sop_uids_in(storescp.workdir / "received") == sorted(sop for s in study.series for sop in s.sop_uids)
    rows = [r for r in api(page, "GET", f"/projects/{PROJECT}/requests") if r["kind"] == "forward"]
    assert [(r["destination_id"], r["study_uid"], r["state"], r["received"]) for r in rows] == [
        (DESTINATION, study.uid, "completed", count)]
    assert forward.get_attribute("data-key") == str(rows[0]["id"])
    no_page_errors(console)


def test_download_encrypted_with_a_passphrase_opens_with_age(page: Page, catalog: Catalog, tmp_path: Path,
                                                             console: list[str]) -> None:
    study = catalog.study("BR-5001")  # P005 (never a substring of the hex names), MR KNEE: 2 series of 2
    passphrase = "correct horse battery staple"
    login(page, RESEARCHER)
    cache_study(page, study)
    pick_in_repository(page, study)

    # --- Tab 3: a passphrase typed twice; a mismatch is refused before anything is fetched -------------
    page.get_by_label("download as").select_option("passphrase")
    page.get_by_label("passphrase", exact=True).fill(passphrase)
    page.get_by_label("passphrase again", exact=True).fill(passphrase + "!")
    page.get_by_role("button", name="Download selected").click()
    expect(page.locator("#messages .message.error")).to_contain_text("the two passphrases differ")
    page.get_by_label("passphrase again", exact=True).fill(passphrase)
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download selected").click()
    archive = tmp_path / "download.zip"
    download_info.value.save_as(archive)
    expect(page.get_by_label("passphrase", exact=True)).to_have_value("")  # not kept in the page
    screenshot(page, "download-passphrase")

    # --- what a researcher does with the README's commands ------------------------------------------
    opened = tmp_path / "opened"
    with zipfile.ZipFile(archive) as zipped:
        names = zipped.namelist()
        assert {"README.txt", "identity.age", "manifest.age"} <= set(names)
        assert all(study.patient_id not in n and study.uid not in n for n in names)
        zipped.extractall(opened)
    assert "age -d -o key.txt identity.age" in (opened / "README.txt").read_text()
    age_with_passphrase(["-d", "-o", "key.txt", "identity.age"], passphrase, cwd=opened)
    key = opened / "key.txt"
    images = [n for n in names if n.endswith(".dcm.age")]
    assert len(images) == study.instance_count
    decrypted = sorted(str(pydicom.dcmread(io.BytesIO(age_decrypt(key, (opened / n).read_bytes()))).SOPInstanceUID)
                       for n in images)
    assert decrypted == sorted(sop for s in study.series for sop in s.sop_uids)
    assert study.uid.encode() in age_decrypt(key, (opened / "manifest.age").read_bytes())

    # the page counts it as done; the repository knows who downloaded it
    page.locator("#tab-view").click()
    expect(page.locator(".downloads li[data-state=done]")).to_have_count(1)
    page.locator("#tab-repository").click()
    expect(page.locator(f'#page-repository tr[data-key="{study.uid}"] td[data-col=last_downloaded_by]')
           ).to_have_text(RESEARCHER.login)
    no_page_errors(console)


def test_an_admin_adds_a_user_who_then_logs_in(page: Page, new_page: Callable[[], Page],
                                               console: list[str]) -> None:
    login(page, ADMIN)
    page.goto("/app/#admin")
    users = page.locator("section[aria-label=users]")
    form = users.locator("form")
    form.locator("input[name=login]").fill("erin")
    form.locator("select[name=role]").select_option("auditor")
    form.locator("input[name=display_name]").fill("Erin Example")
    form.locator("input[name=password]").fill("erin-password-1")
    form.get_by_role("button", name="Add user").click()
    expect(page.locator("#messages")).to_contain_text("user erin added")
    row = users.locator('[data-table="admin-users"] tr[data-key="erin"]')
    expect(row.locator("td[data-col=role]")).to_have_text("auditor")
    expect(row.locator("td[data-col=display_name]")).to_have_text("Erin Example")
    expect(form.locator("input[name=login]")).to_have_value("")
    expect(form.locator("input[name=password]")).to_have_value("")
    screenshot(page, "admin-add-user")
    erin = [u for u in api(page, "GET", "/admin/users") if u["login"] == "erin"]
    assert [(u["role"], u["display_name"], u["disabled"]) for u in erin] == [("auditor", "Erin Example", False)]

    # --- the new user logs in through the form, in a browser profile of their own -------------------
    fresh = new_page()
    fresh.goto("/app/")
    fresh.locator("#login input[name=login]").fill("erin")
    fresh.locator("#login input[name=password]").fill("erin-password-1")
    fresh.locator("#login button[type=submit]").click()
    expect(fresh.locator("#who")).to_have_text("Erin Example (auditor)")
    expect(fresh.locator("#tab-audit")).to_be_visible()
    expect(fresh.locator("#tab-admin")).to_have_count(0)
    assert api(fresh, "GET", "/auth/me")["login"] == "erin"
    no_page_errors(console)


def test_request_log_priority_cancel_and_retry(page: Page, catalog: Catalog, mi2b2_server: Mi2b2Server,
                                               orthanc: BrowserPacs, new_page: Callable[[], Page],
                                               console: list[str]) -> None:
    held, failing = catalog.study("BR-1002"), catalog.study("BR-3002")  # 4 images each, not cached
    login(page, RESEARCHER)
    held_id, failing_id = request_studies(page, GATED, held, failing)

    page.goto("/app/#requests")
    page.evaluate("window.__sameDocument = 'yes'")
    log = page.locator("#page-requests")
    expect(log.locator(".live")).to_have_text("● live")
    held_row = log.locator(f'tbody tr[data-key="{held_id}"]')
    failing_row = log.locator(f'tbody tr[data-key="{failing_id}"]')
    cancel = log.get_by_role("button", name="Cancel selected")
    retry = log.get_by_role("button", name="Retry selected")
    set_priority = log.get_by_role("button", name="Set priority")

    # --- it cannot start, and the log says why ------------------------------------------------------
    closed = f"PACS closed now ({WINDOW})"
    for row in (held_row, failing_row):
        expect(row.locator("td[data-col=state]")).to_have_text("scheduled")
        expect(row.locator("td[data-col=waiting_reason]")).to_have_text(closed)
        expect(row.locator("td[data-col=where]")).to_have_text(GATED)
    assert api(page, "GET", f"/requests/{held_id}")["waiting_reason"] == closed

    # --- a new priority ---------------------------------------------------------------------------------
    expect(set_priority).to_be_disabled()
    held_row.locator("input[type=checkbox]").check()
    expect(held_row.locator("td[data-col=priority]")).to_have_text("0")
    log.get_by_label("new priority").fill("7")
    set_priority.click()
    expect(page.locator("#messages")).to_contain_text("1 request(s) changed")
    expect(held_row.locator("td[data-col=priority]")).to_have_text("7")
    row = api(page, "GET", f"/requests/{held_id}")
    assert (row["state"], row["priority"]) == ("scheduled", 7)
    assert api(page, "GET", f"/requests/{failing_id}")["priority"] == 0

    # --- canceled: it may only be retried ------------------------------------------------------------
    expect(retry).to_be_disabled()  # a scheduled request is not retried
    cancel.click()
    expect(page.locator("#messages")).to_contain_text("1 request(s) canceled")
    expect(held_row.locator("td[data-col=state]")).to_have_text("canceled")
    expect(held_row.locator("td[data-col=waiting_reason]")).to_have_text("canceled by a user")
    # At once, not after the next live update: a second click would send no request at all.
    assert [b.is_disabled() for b in (cancel, retry, set_priority)] == [True, False, True]
    row = api(page, "GET", f"/requests/{held_id}")
    assert (row["state"], row["last_error"]) == ("canceled", "canceled by a user")
    assert row["allowed"] == {"cancel": False, "retry": True, "priority": False}
    expect(failing_row.locator("td[data-col=state]")).to_have_text("scheduled")
    held_row.locator("input[type=checkbox]").uncheck()

    # --- the server filters by state and counts each state ------------------------------------------------
    project = api(page, "GET", f"/requests/{held_id}")["project_id"]
    counts = api(page, "GET", f"/projects/{project}/requests/page?limit=1")["state_counts"]
    state_filter = log.get_by_label("show requests in state")
    expect(state_filter.locator("option[value=canceled]")).to_have_text(f"canceled ({counts['canceled']})")
    state_filter.select_option("canceled")
    expect(failing_row).to_have_count(0)  # scheduled: not on the server's page any more
    expect(held_row.locator("td[data-col=state]")).to_have_text("canceled")
    expect(log.locator(".request-summary")).to_have_text(f"showing {counts['canceled']} of {counts['canceled']}")
    state_filter.select_option("")
    expect(failing_row.locator("td[data-col=state]")).to_have_text("scheduled")

    # --- the other fails: the admin points "gated" at a port where nothing listens and opens it -------
    admin = new_page()
    login(admin, ADMIN)
    admin.goto("/app/#admin")
    gated_window = admin.locator(f'[data-table="admin-pacs"] tr[data-key="{GATED}"] td[data-col=window]')
    expect(gated_window).to_have_text(f"{WINDOW} (closed)")
    site = mi2b2_server.site
    original = site.read_text()
    closed_block = gated_pacs(orthanc.pacs.ae_title, orthanc.pacs.port)
    broken_block = gated_pacs(orthanc.pacs.ae_title, free_port(), closed=False)
    assert closed_block in original
    try:
        site.write_text(original.replace(closed_block, broken_block))
        admin.get_by_role("button", name="Reload configuration").click()
        expect(admin.locator(".reload-result")).to_contain_text(f"changed: pacs {GATED}")
        expect(gated_window).to_have_text("default")
        expect(failing_row.locator("td[data-col=state]")).to_have_text("failed", timeout=RETRIEVAL_SECONDS * 1000)
        expect(failing_row.locator("td[data-col=waiting_reason]")).to_contain_text("gave up after 1 attempts")
        failed = api(page, "GET", f"/requests/{failing_id}")
        assert (failed["state"], failed["attempts"], failed["allowed"]["retry"]) == ("failed", 1, True)
    finally:
        # ...and back: the PACS is reachable again, but closed
        site.write_text(original)
    admin.get_by_role("button", name="Reload configuration").click()
    expect(gated_window).to_have_text(f"{WINDOW} (closed)")

    # --- retried: scheduled again, waiting for the window ---------------------------------------------
    failing_row.locator("input[type=checkbox]").check()
    expect(cancel).to_be_disabled()
    expect(set_priority).to_be_disabled()
    retry.click()
    expect(page.locator("#messages")).to_contain_text("1 request(s) retried")
    expect(failing_row.locator("td[data-col=state]")).to_have_text("scheduled")
    assert [b.is_disabled() for b in (cancel, retry, set_priority)] == [False, True, False]
    expect(failing_row.locator("td[data-col=waiting_reason]")).to_have_text(closed)
    row = api(page, "GET", f"/requests/{failing_id}")
    assert (row["state"], row["attempts"], row["waiting_reason"]) == ("scheduled", 0, closed)
    failing_row.locator("input[type=checkbox]").uncheck()

    # --- the canceled one resumes the same way --------------------------------------------------------
    held_row.locator("input[type=checkbox]").check()
    retry.click()
    expect(held_row.locator("td[data-col=state]")).to_have_text("scheduled")
    expect(held_row.locator("td[data-col=waiting_reason]")).to_have_text(closed)
    row = api(page, "GET", f"/requests/{held_id}")
    assert (row["state"], row["priority"], row["waiting_reason"]) == ("scheduled", 7, closed)
    assert page.evaluate("window.__sameDocument") == "yes"
    screenshot(page, "request-log-actions")
    no_page_errors(console)
