"""DICOMweb out of the cache, driven by the dicomweb-client package against a real server on 127.0.0.1."""

from __future__ import annotations

import io
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import requests
from dicomweb_client.api import DICOMwebClient
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import dcmread
from pydicom.encaps import get_frame
from requests.exceptions import HTTPError

from mi2b2.adapters.db.tables import CachedStudy
from mi2b2.api.app import create_app
from mi2b2.config import ServerConfig
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.synthetic import series_instance_uid, sop_instance_uid
from mi2b2.testing import FakeClock
from support import studies
from support.site import load_site
from support.viewing import AUDITOR, SAMPLE_SERIES, SAMPLE_STUDY, Cached, fill, serving

BRAIN = studies.uid(studies.BRAIN)
TRAUMA = studies.uid(studies.TRAUMA)
BRAIN_2 = series_instance_uid(studies.BRAIN, 2)
MR = sop_instance_uid(studies.BRAIN, 2, 1)


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> ServiceContext:
    return build_context(load_site(tmp_path / "site", database_url=database_url), clock=FakeClock())


@pytest.fixture
def cached(ctx: ServiceContext, tmp_path: Path) -> Cached:
    return fill(ctx, tmp_path / "files")


@pytest.fixture
def server(ctx: ServiceContext, cached: Cached) -> Iterator[str]:
    with serving(create_app(ctx)) as url:
        yield url


def client(server: str, cached: Cached, login: str = "alice", project: str = "alpha") -> DICOMwebClient:
    return DICOMwebClient(url=f"{server}/dicomweb/projects/{project}", headers=cached.headers(login))


def uids(results: list[dict], tag: str) -> list[str]:  # type: ignore[type-arg]
    return [r[tag]["Value"][0] for r in results]


def sample_sop(cached: Cached, name: str) -> str:
    return next(sop for sop, path in cached.files.items() if f"/{SAMPLE_SERIES[name]}/" in path.as_posix())


STUDY_UID, SERIES_UID, SOP_UID = "0020000D", "0020000E", "00080018"


def test_search_studies_matches_like_a_pacs(server: str, cached: Cached) -> None:
    web = client(server, cached)
    assert sorted(uids(web.search_for_studies(), STUDY_UID)) == sorted([BRAIN, TRAUMA, SAMPLE_STUDY])
    assert uids(web.search_for_studies(search_filters={"PatientID": "000123"}), STUDY_UID) == [BRAIN]
    assert uids(web.search_for_studies(search_filters={"AccessionNumber": "ACC-2001"}), STUDY_UID) == [TRAUMA]
    assert uids(web.search_for_studies(search_filters={"StudyDate": "20210101-20221231"}), STUDY_UID) == [BRAIN]
    assert uids(web.search_for_studies(search_filters={"StudyDate": "-20211231"}), STUDY_UID) == [BRAIN]
    assert uids(web.search_for_studies(search_filters={"ModalitiesInStudy": "CT"}), STUDY_UID) == [TRAUMA]
    assert uids(web.search_for_studies(search_filters={"Modality": "CT"}), STUDY_UID) == [TRAUMA]
    assert uids(web.search_for_studies(search_filters={"00100010": "test^0*"}), STUDY_UID) == [BRAIN]  # PN: any case
    listed = web.search_for_studies(search_filters={"StudyInstanceUID": f"{BRAIN},{TRAUMA}"})
    assert sorted(uids(listed, STUDY_UID)) == sorted([BRAIN, TRAUMA])
    assert web.search_for_studies(search_filters={"PatientID": "B-1"}) == []  # beta's patient: not here

    (brain,) = web.search_for_studies(search_filters={"PatientID": "000123"}, fields=["PatientBirthDate", "00080090"])
    assert brain["00100020"]["Value"] == ["000123"]
    assert brain["00080050"]["Value"] == ["ACC-1001"]
    assert brain["00201206"]["Value"] == [3] and brain["00201208"]["Value"] == [6]
    assert brain["00080061"]["Value"] == ["MR"]
    assert brain["00100030"]["Value"] == ["19700101"]  # from the file's header
    assert brain["00080090"]["Value"][0]["Alphabetic"] == "REFERRER^SYNTHETIC"
    # dicomweb-client sends "Host: 127.0.0.1" without the port; the URL follows the Host header it was sent
    assert brain["00081190"]["Value"][0].endswith(f"127.0.0.1/dicomweb/projects/alpha/studies/{BRAIN}")
    direct = requests.get(f"{server}/dicomweb/projects/alpha/studies", params={"PatientID": "000123"},
                          headers=cached.headers("alice"), timeout=30)
    assert direct.headers["content-type"] == "application/dicom+json"
    assert direct.headers["cache-control"] == "no-store"
    assert direct.json()[0]["00081190"]["Value"] == [f"{server}/dicomweb/projects/alpha/studies/{BRAIN}"]

    first = web.search_for_studies(limit=2)
    rest = web.search_for_studies(offset=2, limit=5)
    assert len(first) == 2 and len(rest) == 1
    assert sorted(uids(first + rest, STUDY_UID)) == sorted([BRAIN, TRAUMA, SAMPLE_STUDY])


def test_search_series_and_instances(server: str, cached: Cached) -> None:
    web = client(server, cached)
    series = web.search_for_series(BRAIN)
    assert sorted(uids(series, SERIES_UID)) == sorted(series_instance_uid(studies.BRAIN, n) for n in (1, 2, 3))
    assert {s["00080060"]["Value"][0] for s in series} == {"MR"}
    assert {s["00201209"]["Value"][0] for s in series} == {2}
    (second,) = web.search_for_series(BRAIN, search_filters={"SeriesNumber": "2"})
    assert second[SERIES_UID]["Value"] == [BRAIN_2] and second["0008103E"]["Value"] == ["AX T2"]
    anywhere = web.search_for_series(search_filters={"Modality": "US"})  # across studies
    assert uids(anywhere, SERIES_UID) == [SAMPLE_SERIES["examples_ybr_color.dcm"]]

    instances = web.search_for_instances(BRAIN, BRAIN_2)
    assert uids(instances, SOP_UID) == [MR, sop_instance_uid(studies.BRAIN, 2, 2)]
    assert instances[0]["00280010"]["Value"] == [16] and instances[0]["00200013"]["Value"] == [1]
    clip = web.search_for_instances(SAMPLE_STUDY, search_filters={"SOPInstanceUID": sample_sop(cached,
                                                                                             "examples_ybr_color.dcm")})
    assert clip[0]["00280008"]["Value"] == [30]
    everything = web.search_for_instances(SAMPLE_STUDY, fields=["all"])
    assert len(everything) == 2 and all("00100020" in i for i in everything)
    with pytest.raises(HTTPError) as missing:
        web.search_for_series("1.2.3.4")
    assert missing.value.response.status_code == 404


def test_retrieve_gives_the_cached_files_as_stored(server: str, cached: Cached) -> None:
    web = client(server, cached)
    study = web.retrieve_study(BRAIN)
    assert len(study) == 6
    for ds in study:
        stored = dcmread(cached.files[ds.SOPInstanceUID])
        assert ds == stored and ds.file_meta.TransferSyntaxUID == stored.file_meta.TransferSyntaxUID
    assert {ds.SOPInstanceUID for ds in web.retrieve_series(BRAIN, BRAIN_2)} == {
        MR, sop_instance_uid(studies.BRAIN, 2, 2)}

    j2k = sample_sop(cached, "JPEG2000.dcm")
    instance = web.retrieve_instance(SAMPLE_STUDY, SAMPLE_SERIES["JPEG2000.dcm"], j2k)
    assert instance == dcmread(cached.files[j2k]) and instance.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2.4.91"

    # byte for byte, read straight off the wire (transfer-syntax=*: as stored; without it PS3.18's default)
    url = f"{server}/dicomweb/projects/alpha/studies/{SAMPLE_STUDY}/series/{SAMPLE_SERIES['JPEG2000.dcm']}/instances/{j2k}"
    response = requests.get(url, headers={**cached.headers("alice"),
                                          "Accept": 'multipart/related; type="application/dicom"; transfer-syntax=*'},
                            timeout=30)
    assert response.headers["cache-control"] == "no-store"
    boundary = response.headers["content-type"].split("boundary=")[1].strip('"').encode()
    (part,) = [p for p in response.content.split(b"--" + boundary) if p.strip(b"-\r\n")]
    head, body = part.split(b"\r\n\r\n", 1)
    assert b"transfer-syntax=1.2.840.10008.1.2.4.91" in head
    assert body[:-2] == cached.files[j2k].read_bytes()


def test_a_transfer_syntax_mi2b2_does_not_have_is_not_acceptable(server: str, cached: Cached) -> None:
    web = client(server, cached)
    j2k = sample_sop(cached, "JPEG2000.dcm")
    with pytest.raises(HTTPError) as refused:
        web.retrieve_instance(SAMPLE_STUDY, SAMPLE_SERIES["JPEG2000.dcm"], j2k,
                              media_types=(("application/dicom", "1.2.840.10008.1.2.4.80"),))  # JPEG-LS
    assert refused.value.response.status_code == 406
    assert "available: as stored" in refused.value.response.json()["error"]
    assert web.retrieve_instance(SAMPLE_STUDY, SAMPLE_SERIES["JPEG2000.dcm"], j2k,
                                 media_types=(("application/dicom", "*"),)).SOPInstanceUID == j2k


def test_metadata_frames_and_rendered(server: str, cached: Cached) -> None:
    web = client(server, cached)
    metadata = web.retrieve_study_metadata(BRAIN)
    assert len(metadata) == 6 and {m[STUDY_UID]["Value"][0] for m in metadata} == {BRAIN}
    assert all(m["7FE00010"]["BulkDataURI"].endswith("/frames/1") for m in metadata)
    assert len(web.retrieve_series_metadata(BRAIN, BRAIN_2)) == 2
    one = web.retrieve_instance_metadata(BRAIN, BRAIN_2, MR)  # the client unwraps the one-item list
    assert one["00100010"]["Value"][0]["Alphabetic"] == studies.BRAIN.patient_name

    raw = web.retrieve_instance_frames(BRAIN, BRAIN_2, MR, frame_numbers=[1])
    assert raw == [dcmread(cached.files[MR]).PixelData]
    clip = sample_sop(cached, "examples_ybr_color.dcm")
    stored = dcmread(cached.files[clip])
    frames = web.retrieve_instance_frames(SAMPLE_STUDY, SAMPLE_SERIES["examples_ybr_color.dcm"], clip,
                                          frame_numbers=[1, 30])
    assert frames == [get_frame(stored.PixelData, 0, number_of_frames=30),
                      get_frame(stored.PixelData, 29, number_of_frames=30)]

    image = web.retrieve_instance_rendered(BRAIN, BRAIN_2, MR, media_types=("image/png",))
    assert np.asarray(Image.open(io.BytesIO(image))).shape == (16, 16)
    frame = web.retrieve_instance_frames_rendered(SAMPLE_STUDY, SAMPLE_SERIES["examples_ybr_color.dcm"], clip,
                                                  frame_numbers=[12], media_types=("image/png",))
    assert Image.open(io.BytesIO(frame)).size == (320, 240)


def test_reads_are_audited_without_flooding(server: str, cached: Cached, ctx: ServiceContext) -> None:
    web = client(server, cached)
    web.search_for_studies(search_filters={"PatientID": "000123"})
    web.retrieve_study(BRAIN)
    for _ in range(3):
        web.retrieve_instance(BRAIN, BRAIN_2, MR)
        web.retrieve_instance_metadata(BRAIN, BRAIN_2, MR)
    events = ctx.audit.list(AUDITOR, AuditFilter(actor="alice"))
    searches = [e for e in events if e.action == "view" and '"kind":"search"' in e.detail]
    assert len(searches) == 1 and searches[0].patient_id == "000123" and '"via":"dicomweb"' in searches[0].detail
    downloads = [e for e in events if e.action == "download"]
    assert [('"level":"study"' in e.detail, '"level":"instance"' in e.detail) for e in downloads] == [
        (True, False), (False, True)]
    assert '"instances":6' in downloads[0].detail and downloads[0].study_uid == BRAIN
    assert len([e for e in events if e.action == "view" and '"kind":"metadata"' in e.detail]) == 1
    with ctx.sessions() as session:
        study = session.query(CachedStudy).filter_by(project_id="alpha", study_uid=BRAIN).one()
        assert study.last_downloaded_by == "alice" and study.last_downloaded_at is not None


def test_only_members_read_a_project_and_admins_only_where_members(server: str, cached: Cached) -> None:
    for login in ("carol", "dave", "audrey", "root"):
        web = client(server, cached, login)
        for attempt in (web.search_for_studies, lambda w=web: w.retrieve_study(BRAIN),
                        lambda w=web: w.retrieve_study_metadata(BRAIN)):
            with pytest.raises(HTTPError) as refused:
                attempt()
            assert refused.value.response.status_code == 403
    anonymous = requests.get(f"{server}/dicomweb/projects/alpha/studies", timeout=30)
    assert anonymous.status_code == 401
    assert len(client(server, cached, "bob").search_for_studies()) == 3
    # alice is in beta too, but beta's studies are not alpha's
    with pytest.raises(HTTPError) as hidden:
        client(server, cached, "alice").retrieve_study(studies.uid(studies.BRAIN_FOLLOW_UP))
    assert hidden.value.response.status_code == 404
    with pytest.raises(HTTPError) as expired:  # alice is in beta, but beta's IRB has expired: list and delete only
        client(server, cached, "alice", "beta").search_for_studies()
    assert expired.value.response.status_code == 403 and "IRB approval has expired" in expired.value.response.text


def test_retrieve_urls_follow_the_configured_public_url_not_the_host_header(tmp_path: Path) -> None:
    config = load_site(tmp_path / "site")
    config = config.model_copy(update={"server": ServerConfig(public_url="https://mi2b2.example.org/")})
    ctx = build_context(config, clock=FakeClock())
    cached = fill(ctx, tmp_path / "files")
    api = TestClient(create_app(ctx))
    answer = api.get("/dicomweb/projects/alpha/studies", params={"PatientID": "000123"},
                     headers={**cached.headers("alice"), "Host": "attacker.example"})
    assert answer.status_code == 200
    assert answer.json()[0]["00081190"]["Value"] == [f"https://mi2b2.example.org/dicomweb/projects/alpha/studies/{BRAIN}"]


@pytest.mark.parametrize("wrong", ["mi2b2.example.org", "ftp://mi2b2.example.org", "https://x.org/?a=1"])
def test_a_public_url_that_is_not_an_http_address_is_refused(wrong: str) -> None:
    with pytest.raises(ValueError, match="must be an http\\(s\\) address"):
        ServerConfig(public_url=wrong)
