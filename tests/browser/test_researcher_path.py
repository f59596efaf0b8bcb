"""A researcher's whole path through the five tabs, in Chromium, against Orthanc:

log in, paste MRNs (one off the IRB list), find studies, pick two series of one,
move them to the repository, watch the request log complete without reloading,
see the study and the usage in Tab 3, view it in Tab 4 and change the window,
download it encrypted (opened with the Debian `age` tool), delete it.
"""

from __future__ import annotations

import io
import re
import subprocess
import zipfile
from pathlib import Path

from playwright.sync_api import Frame, Page, expect
from pydicom import dcmread

from support.browser_site import RESEARCHER, Catalog, Mi2b2Server, screenshot

RETRIEVAL_SECONDS = 90


def log_in_with_the_form(page: Page) -> None:
    page.goto("/")
    expect(page.locator("#login")).to_be_visible()
    page.locator("#login input[name=login]").fill(RESEARCHER.login)
    page.locator("#login input[name=password]").fill(RESEARCHER.password)
    page.locator("#login button[type=submit]").click()
    expect(page.locator("#tab-patients")).to_have_attribute("aria-current", "page")


def viewer_frame(page: Page) -> Frame:
    page.wait_for_function("() => document.querySelector('#page-view iframe')?.contentDocument?.readyState === 'complete'")
    frame = next((f for f in page.frames if "/viewer/" in f.url), None)
    assert frame is not None, [f.url for f in page.frames]
    return frame


def cached_bytes(server: Mi2b2Server, study_uid: str) -> int:
    return sum(p.stat().st_size for p in (server.cache_dir / "alpha" / study_uid).rglob("*.dcm"))


def test_the_whole_path(page: Page, catalog: Catalog, mi2b2_server: Mi2b2Server, tmp_path: Path,
                        console: list[str]) -> None:
    study = catalog.study("BR-1001")  # 000123, MR, three series
    picked = study.series[:2]
    off_list = catalog.off_list[0]

    # --- log in; only my project is offered ------------------------------------------------------
    log_in_with_the_form(page)
    expect(page.locator("#project option")).to_have_count(1)
    expect(page.locator("#project")).to_have_value("alpha")

    # --- Tab 1: paste MRNs, one of them off the IRB list ------------------------------------------
    page.locator("#mrn-input").fill(f"{study.patient_id}\n77\n{off_list}\n")
    page.get_by_role("button", name="Search patients").click()
    rows = page.locator("#page-patients tbody tr[data-key]")
    expect(rows).to_have_count(2)
    refused = page.locator("#page-patients details[data-stat=refused]")
    expect(refused.locator("summary")).to_have_text("1 refused (not on the IRB list)")
    refused.locator("summary").click()
    expect(refused.locator("li")).to_have_text([off_list])
    screenshot(page, "tab1-search-patients")

    # only the study's patient goes on to Tab 2
    page.locator('#page-patients tr[data-key="77"] input[type=checkbox]').uncheck()
    page.get_by_role("button", name="Find studies for selected patients").click()
    expect(page.locator("#tab-studies")).to_have_attribute("aria-current", "page")
    study_rows = page.locator("#page-studies tbody tr[data-key]")
    expect(study_rows).to_have_count(len(catalog.studies_of(study.patient_id)))

    # --- Tab 2: expand the study, tick two of its three series, move them ------------------------
    row = page.locator(f'#page-studies tr[data-key="{study.uid}"]')
    row.locator("button.disclose").click()
    boxes = page.locator("#page-studies .series-pick input[type=checkbox]")
    expect(boxes).to_have_count(len(study.series))
    for series in picked:
        page.locator(f'#page-studies .series-pick input[value="{series.uid}"]').check()
    expect(row.locator("td[data-col=series_picked]")).to_have_text(f"2 of {len(study.series)}")
    expect(row.locator("input[type=checkbox]")).to_be_checked()
    page.get_by_label("priority").first.fill("3")
    screenshot(page, "tab2-search-studies")
    page.get_by_role("button", name="Move to repository").click()
    expect(page.locator("#messages")).to_contain_text("1 retrieval request queued")

    # --- Tab 5: the log reaches completed by itself --------------------------------------------
    page.evaluate("window.__sameDocument = 'yes'")  # gone if the page were reloaded
    page.locator("#tab-requests").click()
    log_row = page.locator("#page-requests tbody tr[data-key]").filter(has_text=study.accession)
    expect(log_row).to_have_count(1)
    expect(page.locator("#page-requests .live")).to_have_text("● live")
    expect(log_row.locator("td[data-col=state]")).to_have_text("completed", timeout=RETRIEVAL_SECONDS * 1000)
    wanted = sum(s.instance_count for s in picked)
    expect(log_row.locator("td[data-col=progress]")).to_contain_text(f"{wanted} / {wanted} images")
    expect(log_row.locator("td[data-col=priority]")).to_have_text("3")
    assert page.evaluate("window.__sameDocument") == "yes"
    screenshot(page, "tab5-request-log")

    # --- Tab 3: the study and the usage bar -----------------------------------------------------
    page.locator("#tab-repository").click()
    cached = page.locator(f'#page-repository tr[data-key="{study.uid}"]')
    expect(cached).to_have_count(1)
    expect(cached.locator("td[data-col=instance_count]")).to_have_text(str(wanted))
    expect(cached.locator("td[data-col=fetched_by]")).to_have_text(RESEARCHER.login)
    size = cached_bytes(mi2b2_server, study.uid)
    assert size > 0
    expect(page.locator(".usage-legend")).to_have_attribute("data-usage", str(size))
    cached.locator("input[type=checkbox]").check()
    expect(page.locator(".usage-legend")).to_contain_text("selection")
    screenshot(page, "tab3-image-repository")

    # --- Tab 4: the study opens in the viewer; dragging changes the window --------------------------
    cached.get_by_role("button", name="view").click()
    expect(page.locator("#tab-view")).to_have_attribute("aria-current", "page")
    frame = viewer_frame(page)
    frame.wait_for_function("() => document.getElementById('image').naturalWidth > 0")
    expect(frame.locator("#tree a.series.active")).to_have_count(1)
    before = frame.locator("#width").input_value()
    box = frame.locator("#stage").bounding_box()
    assert box is not None
    x, y = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    page.mouse.move(x, y)
    page.mouse.down()
    page.mouse.move(x + 120, y + 40, steps=6)
    page.mouse.up()
    expect(frame.locator("#width")).not_to_have_value(before)
    # The drag's last render has landed when the overlay names the window the field shows.
    frame.wait_for_function("() => document.getElementById('overlay-bottom').textContent"
                            ".includes('W ' + document.getElementById('width').value)")
    frame.wait_for_function("() => document.getElementById('image').naturalWidth > 0")
    # slices: a key and the wheel step through the series
    first_series = next(s for s in picked if s.uid == frame.locator("#tree a.series.active").get_attribute("title"))
    expect(frame.locator("#overlay-top")).to_contain_text(f"image 1 / {first_series.instance_count}")
    frame.locator("#stage").press("ArrowDown")
    expect(frame.locator("#overlay-top")).to_contain_text(f"image 2 / {first_series.instance_count}")
    page.mouse.move(x, y)
    page.mouse.wheel(0, -120)
    expect(frame.locator("#overlay-top")).to_contain_text(f"image 1 / {first_series.instance_count}")
    screenshot(page, "tab4-view-images")

    # --- Tab 3 again: download it encrypted to an age key, then open it with `age` -----------------
    key_file = tmp_path / "me.txt"
    keygen = subprocess.run(["age-keygen", "-o", str(key_file)], capture_output=True, text=True, check=True)
    public_key = re.search(r"age1[0-9a-z]+", keygen.stderr + key_file.read_text())
    assert public_key is not None
    page.locator("#tab-repository").click()
    page.get_by_label("download as").select_option("recipients")
    page.get_by_label("public keys, one per line").fill(public_key.group(0))
    with page.expect_download() as download_info:
        page.get_by_role("button", name="Download selected").click()
    archive = tmp_path / "download.zip"
    download_info.value.save_as(archive)
    sop_uids = {sop for series in picked for sop in series.sop_uids}
    with zipfile.ZipFile(archive) as zipped:
        images = [n for n in zipped.namelist() if n.endswith(".dcm.age")]
        assert len(images) == len(sop_uids)
        assert all(study.patient_id not in n and study.uid not in n for n in zipped.namelist())
        decrypted = {dcmread(io.BytesIO(age_decrypt(key_file, zipped.read(n)))).SOPInstanceUID for n in images}
    assert decrypted == sop_uids
    page.locator("#tab-view").click()
    expect(page.locator(".downloads li[data-state=done]")).to_have_count(1)

    # --- and delete it ------------------------------------------------------------------------
    page.locator("#tab-repository").click()
    page.once("dialog", lambda dialog: dialog.accept())
    page.get_by_role("button", name="Delete selected").click()
    expect(page.locator(f'#page-repository tr[data-key="{study.uid}"]')).to_have_count(0)
    expect(page.locator(".usage-legend")).to_have_attribute("data-usage", "0")
    # Nothing is selected any more, so nothing may be deleted, downloaded or forwarded.
    for action in ("Delete selected", "Download selected", "Forward selected"):
        expect(page.get_by_role("button", name=action)).to_be_disabled()
    assert not (mi2b2_server.cache_dir / "alpha" / study.uid).exists()
    assert not [line for line in console if line.startswith("pageerror")], console


def age_decrypt(identity: Path, data: bytes) -> bytes:
    """The Debian age tool, not pyrage: what a researcher would run."""
    result = subprocess.run(["age", "-d", "-i", str(identity)], input=data, capture_output=True, check=True)
    return result.stdout
