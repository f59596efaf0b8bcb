"""Downloads end to end: streamed ZIPs and CLI folder downloads, plain and age-encrypted, with real files,
a real HTTP server, the real `mi2b2` command and the Debian `age` tool decrypting what mi2b2 encrypted."""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pyrage
import pytest
from fastapi.testclient import TestClient
from pydicom import dcmread
from sqlalchemy import select

from mi2b2.adapters.crypto.age_files import DecryptionFailed
from mi2b2.adapters.db.tables import CachedStudy
from mi2b2.adapters.dicom.files import read_instance_header
from mi2b2.api.app import create_app
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied, InvalidInput
from mi2b2.services.audit import AuditFilter
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.export import decrypt_download, download, open_download, sources, tickets
from mi2b2.synthetic import SyntheticStudy, write_study
from mi2b2.testing import FakeClock
from support import studies
from support.site import load_site
from support.viewing import place, serving

ROOT = Principal("root", Role.ADMIN)
BOB = Principal("bob", Role.RESEARCHER)  # member of alpha
CAROL = Principal("carol", Role.RESEARCHER)  # not a member of alpha
PASSWORD = "a long enough password"
PASSPHRASE = "correct horse battery staple"
AGE = shutil.which("age") or "/usr/bin/age"
KEYED = re.compile(r"^[0-9a-f]{16}/[0-9a-f]{16}/\d{4}\.dcm\.age$")
# A series whose InstanceNumbers run against SOP UID order, to prove order comes from InstanceNumber.
BIG = SyntheticStudy(patient_id="PAT004", patient_name="TEST^BIG", birth_date="19700101", sex="F",
                     accession="ACC-5001", study_date="20240202", modality="CT", description="CT big",
                     series_count=2, instances_per_series=12, rows=32, cols=32)


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> ServiceContext:
    return build_context(load_site(tmp_path / "site", database_url=database_url), clock=FakeClock())


@pytest.fixture
def lite(tmp_path: Path) -> ServiceContext:
    """SQLite only: for tests whose subject is the CLI and the files, not the database."""
    return build_context(load_site(tmp_path / "site"))


def receive(ctx: ServiceContext, project: str, study: SyntheticStudy, source: Path) -> dict[str, Path]:
    """Place and index a study as the receiver does; SOP UID -> file in the cache."""
    placed = {}
    for file in write_study(study, source):
        cached = place(ctx, project, file)
        placed[read_instance_header(cached).sop_instance_uid] = cached
    return placed


def fill(ctx: ServiceContext, tmp_path: Path) -> dict[str, Path]:
    cached: dict[str, Path] = {}
    for study in (studies.BRAIN, studies.TRAUMA, BIG):
        cached.update(receive(ctx, "alpha", study, tmp_path / "source"))
    return cached


def users(ctx: ServiceContext) -> dict[str, str]:
    for login, role in (("bob", "researcher"), ("carol", "researcher"), ("root", "admin")):
        ctx.accounts.add_user(ROOT, login, role, PASSWORD)
    return {login: ctx.accounts.create_token(ROOT, login, "test", 1).secret for login in ("bob", "carol", "root")}


def api_as(ctx: ServiceContext, token: str) -> TestClient:
    return TestClient(create_app(ctx), headers={"Authorization": f"Bearer {token}"})


def sop_of(data: bytes) -> str:
    return str(dcmread(io.BytesIO(data), stop_before_pixels=True).SOPInstanceUID)


def instance_number(data: bytes) -> int:
    return int(dcmread(io.BytesIO(data), stop_before_pixels=True).InstanceNumber)


def all_uids(ctx: ServiceContext, cached: dict[str, Path]) -> set[str]:
    uids = set(cached)
    for path in cached.values():
        header = read_instance_header(path)
        uids |= {header.study_uid, header.series_uid}
    return uids


def age_decrypt(identity_file: Path, data: bytes) -> bytes:
    """The Debian age tool, not pyrage: the interoperability promise."""
    result = subprocess.run([AGE, "-d", "-i", str(identity_file)], input=data, capture_output=True, timeout=60,
                            check=False)
    assert result.returncode == 0, result.stderr.decode()
    return result.stdout


def assert_readable_tree(files: dict[str, bytes], cached: dict[str, Path]) -> None:
    """Every cached file exactly once, byte-identical, under <patient>/<study>/<series>/<NNNN>.dcm in order."""
    by_sop = {sop_of(data): (name, data) for name, data in files.items()}
    assert set(by_sop) == set(cached)
    for sop, (_name, data) in by_sop.items():
        assert data == cached[sop].read_bytes()
    brain = [n for n in files if n.startswith("000123/20210305_ACC-1001/")]
    assert sorted(brain) == [f"000123/20210305_ACC-1001/00{s}_MR/000{i}.dcm" for s in (1, 2, 3) for i in (1, 2)]
    series = sorted(n for n in files if n.startswith("PAT004/20240202_ACC-5001/001_CT/"))
    assert [instance_number(files[n]) for n in series] == list(range(1, 13))


# the ZIP through the API -----------------------------------------------------------------


def test_zip_download_is_byte_identical_and_audited(ctx: ServiceContext, tmp_path: Path) -> None:
    cached = fill(ctx, tmp_path)
    tokens = users(ctx)
    uids = [studies.uid(studies.BRAIN), studies.uid(studies.TRAUMA), studies.uid(BIG)]
    response = api_as(ctx, tokens["bob"]).post("/api/v1/projects/alpha/download", json={"study_uids": uids})
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/zip"
    assert "attachment" in response.headers["content-disposition"] and "000123" not in response.headers["content-disposition"]
    with zipfile.ZipFile(io.BytesIO(response.content)) as archive:
        assert archive.testzip() is None
        files = {info.filename: archive.read(info) for info in archive.infolist()}
        assert all(info.compress_type == zipfile.ZIP_STORED for info in archive.infolist())
    assert_readable_tree(files, cached)

    events = ctx.audit.list(ROOT, AuditFilter(action="download"))
    assert len(events) == 3
    assert {(e.actor, e.patient_id, e.study_uid, e.outcome) for e in events} == {
        ("bob", "000123", uids[0], "ok"), ("bob", "77", uids[1], "ok"), ("bob", "PAT004", uids[2], "ok")}
    brain_bytes = sum(p.stat().st_size for s, p in cached.items() if read_instance_header(p).study_uid == uids[0])
    assert f'"bytes":{brain_bytes}' in next(e.detail for e in events if e.study_uid == uids[0])
    with ctx.sessions() as session:
        rows = session.scalars(select(CachedStudy).where(CachedStudy.project_id == "alpha")).all()
        assert {(r.last_downloaded_by, r.last_downloaded_at is not None) for r in rows} == {("bob", True)}

    everything = api_as(ctx, tokens["bob"]).post("/api/v1/projects/alpha/download", json={"all": True})
    assert everything.status_code == 200
    with zipfile.ZipFile(io.BytesIO(everything.content)) as archive:
        assert len(archive.namelist()) == len(cached)


def test_errors_are_clear_and_nothing_streams(ctx: ServiceContext, tmp_path: Path) -> None:
    fill(ctx, tmp_path)
    bob = api_as(ctx, users(ctx)["bob"])
    cases: list[tuple[dict[str, Any], int, str]] = [
        ({"study_uids": []}, 422, "name at least one StudyInstanceUID"),
        ({"study_uids": ["not-a-uid"]}, 422, "not StudyInstanceUIDs"),
        ({"study_uids": ["1.2.3"]}, 404, "not in the cache of project 'alpha'"),
        ({"study_uids": [studies.uid(studies.BRAIN)], "encryption": {"passphrase": "short"}}, 422, "too short"),
        ({"study_uids": [studies.uid(studies.BRAIN)], "encryption": {"recipients": ["age1nope"]}}, 422,
         "not a public key age can encrypt to"),
        ({"study_uids": [studies.uid(studies.BRAIN)], "encryption": {"passphrase": PASSPHRASE,
                                                                      "recipients": ["age1x"]}}, 422, "not both"),
    ]
    for body, status, message in cases:
        answer = bob.post("/api/v1/projects/alpha/download", json=body)
        assert answer.status_code == status and message in answer.json()["error"], (body, answer.text)
    assert ctx.audit.list(ROOT, AuditFilter(action="download")) == []


def test_a_non_member_is_refused_on_every_endpoint(ctx: ServiceContext, tmp_path: Path) -> None:
    fill(ctx, tmp_path)
    tokens = users(ctx)
    uid = studies.uid(studies.BRAIN)
    manifest = api_as(ctx, tokens["bob"]).post("/api/v1/projects/alpha/download/manifest",
                                               json={"study_uids": [uid]}).json()
    first = manifest["files"][0]
    instance = {"download_id": manifest["studies"][0]["download_id"], "study_uid": uid, "sop_uid": first["sop_uid"]}
    carol = api_as(ctx, tokens["carol"])
    for path, body in (("", {"study_uids": [uid]}), ("/manifest", {"study_uids": [uid]}), ("/instance", instance),
                       ("", {"study_uids": [uid], "encryption": {"passphrase": PASSPHRASE}})):
        answer = carol.post(f"/api/v1/projects/alpha/download{path}", json=body)
        assert answer.status_code == 403 and "not a member" in answer.json()["error"], (path, answer.text)
    anonymous = TestClient(create_app(ctx)).post("/api/v1/projects/alpha/download", json={"study_uids": [uid]})
    assert anonymous.status_code == 401
    denials = ctx.audit.list(ROOT, AuditFilter(action="denied", actor="carol"))
    assert len(denials) == 4 and all(d.project_id == "alpha" for d in denials)
    assert [e.actor for e in ctx.audit.list(ROOT, AuditFilter(action="download"))] == ["bob"]


def test_single_files_need_an_audited_download_of_their_study(ctx: ServiceContext, tmp_path: Path) -> None:
    cached = fill(ctx, tmp_path)
    tokens = users(ctx)
    bob, root = api_as(ctx, tokens["bob"]), api_as(ctx, tokens["root"])
    brain, trauma = studies.uid(studies.BRAIN), studies.uid(studies.TRAUMA)
    manifest = bob.post("/api/v1/projects/alpha/download/manifest",
                        json={"study_uids": [brain], "encryption": "passphrase"}).json()
    ticket = manifest["studies"][0]["download_id"]
    entry = manifest["files"][0]
    assert entry["sha256"] == hashlib.sha256(cached[entry["sop_uid"]].read_bytes()).hexdigest()
    fetched = bob.post("/api/v1/projects/alpha/download/instance",
                       json={"download_id": ticket, "study_uid": brain, "sop_uid": entry["sop_uid"]})
    assert fetched.status_code == 200 and fetched.content == cached[entry["sop_uid"]].read_bytes()
    assert fetched.headers["content-length"] == str(entry["size"])

    trauma_sop = next(s for s, p in cached.items() if read_instance_header(p).study_uid == trauma)
    for who, body in ((bob, {"download_id": ticket, "study_uid": trauma, "sop_uid": trauma_sop}),  # other study
                      (bob, {"download_id": 1, "study_uid": brain, "sop_uid": entry["sop_uid"]})):  # not a download
        answer = who.post("/api/v1/projects/alpha/download/instance", json=body)
        assert answer.status_code == 403 and "ask for a new manifest" in answer.json()["error"]
    # A site admin who is not a member reads no images, not even with a member's download ticket.
    answer = root.post("/api/v1/projects/alpha/download/instance",
                       json={"download_id": ticket, "study_uid": brain, "sop_uid": entry["sop_uid"]})
    assert answer.status_code == 403 and "site admins read images only in projects they are members of" in answer.text
    ctx.clock.advance(hours=tickets.TICKET_HOURS + 1)  # type: ignore[attr-defined]
    late = bob.post("/api/v1/projects/alpha/download/instance",
                    json={"download_id": ticket, "study_uid": brain, "sop_uid": entry["sop_uid"]})
    assert late.status_code == 403
    refusals = ctx.audit.list(ROOT, AuditFilter(action="denied"))
    assert len(refusals) == 4
    assert sum("no download covers this file" in r.detail for r in refusals) == 3
    assert sum("site admins read images only" in r.detail for r in refusals) == 1
    assert '"encryption":"passphrase"' in ctx.audit.list(ROOT, AuditFilter(action="download"))[0].detail


def untar(data: bytes) -> list[tuple[str, bytes]]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r|") as tar:
        return [(m.name, tar.extractfile(m).read()) for m in tar]  # type: ignore[union-attr]


def test_batches_of_files_are_checked_file_by_file(ctx: ServiceContext, tmp_path: Path) -> None:
    cached = fill(ctx, tmp_path)
    elsewhere = receive(ctx, "beta", studies.MANY[0], tmp_path / "beta")  # another project's cache
    tokens = users(ctx)
    bob, carol = api_as(ctx, tokens["bob"]), api_as(ctx, tokens["carol"])
    brain, trauma = studies.uid(studies.BRAIN), studies.uid(studies.TRAUMA)
    manifest = bob.post("/api/v1/projects/alpha/download/manifest", json={"study_uids": [brain]}).json()
    ticket = manifest["studies"][0]["download_id"]
    sops = [f["sop_uid"] for f in manifest["files"]]
    url = "/api/v1/projects/alpha/download/files"

    def asked(*pairs: tuple[str, str], download_id: int = ticket) -> dict[str, Any]:
        return {"files": [{"download_id": download_id, "study_uid": s, "sop_uid": sop} for s, sop in pairs]}

    answer = bob.post(url, json=asked(*((brain, sop) for sop in reversed(sops))))
    assert answer.status_code == 200 and answer.headers["content-type"] == "application/x-tar"
    assert untar(answer.content) == [(sop, cached[sop].read_bytes()) for sop in reversed(sops)]

    # A file of another study or another project, under this study's ticket: named as missing, never sent.
    trauma_sop = next(s for s, p in cached.items() if read_instance_header(p).study_uid == trauma)
    other = next(iter(elsewhere))
    members = dict(untar(bob.post(url, json=asked((brain, sops[0]), (brain, trauma_sop), (brain, other))).content))
    assert members[sops[0]] == cached[sops[0]].read_bytes()
    assert b"no longer in the project's cache" in members[trauma_sop + ".error"]
    assert b"no longer in the project's cache" in members[other + ".error"]
    assert set(members) == {sops[0], trauma_sop + ".error", other + ".error"}

    # Refused whole, nothing sent: another study's files under this ticket, a made-up ticket, the ticket
    # in another project, an expired ticket, a non-member holding the ticket.
    for who, where, body in ((bob, url, asked((trauma, trauma_sop))), (bob, url, asked((brain, sops[0]), download_id=1)),
                             (bob, "/api/v1/projects/beta/download/files", asked((brain, sops[0]))),
                             (carol, url, asked((brain, sops[0])))):
        refused = who.post(where, json=body)
        assert refused.status_code == 403 and refused.json()["error"], refused.text
    denied = ctx.audit.list(ROOT, AuditFilter(action="denied"))
    assert len(denied) == 4 and sum("no download covers this file" in d.detail for d in denied) == 2

    # Forged lists: paths for UIDs, a file twice, a huge list; clear 422s.
    for body, says in ((asked((brain, "../../etc/passwd")), "not SOPInstanceUIDs"),
                       (asked((brain, sops[0]), (brain, sops[0])), "more than once"),
                       (asked(*[(brain, f"1.2.{n}") for n in range(1001)]), "files"),
                       ({"files": []}, "files")):
        forged = bob.post(url, json=body)
        assert forged.status_code == 422 and says in forged.json()["error"], forged.text

    ctx.clock.advance(hours=tickets.TICKET_HOURS + 1)  # type: ignore[attr-defined]
    late = bob.post(url, json=asked((brain, sops[0])))
    assert late.status_code == 403 and "ask for a new manifest" in late.json()["error"]


def test_an_interrupted_zip_is_audited_as_such(ctx: ServiceContext, tmp_path: Path) -> None:
    fill(ctx, tmp_path)
    result = download.zip_download(ctx, BOB, "alpha", [studies.uid(BIG)])
    next(result.chunks)
    result.chunks.close()  # type: ignore[attr-defined]
    events = ctx.audit.list(ROOT, AuditFilter(action="download"))
    assert [(e.outcome, e.study_uid) for e in events] == [("ok", studies.uid(BIG)), ("failed", studies.uid(BIG))]
    assert "transfer interrupted" in events[1].detail


def test_big_members_stream_without_being_held(ctx: ServiceContext, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Files above LARGE_MEMBER go out as they are read (plain: CRC first; encrypted: age stream + deflate-0)."""
    cached = fill(ctx, tmp_path)
    for module in (sources, download):  # sources decides what is big; download's spool bound follows
        monkeypatch.setattr(module, "LARGE_MEMBER", 1000)
    plain = b"".join(download.zip_download(ctx, BOB, "alpha", [], all_studies=True).chunks)
    with zipfile.ZipFile(io.BytesIO(plain)) as archive:
        assert_readable_tree({i.filename: archive.read(i) for i in archive.infolist()}, cached)
    identity = pyrage.x25519.Identity.generate()
    encrypted = download.zip_download(ctx, BOB, "alpha", [], True, download.Encryption(
        recipients=(str(identity.to_public()),)))
    target = tmp_path / "big.zip"
    target.write_bytes(b"".join(encrypted.chunks))
    with open_download(target, identities=[identity]) as reader:
        assert_readable_tree({e.path: reader.read(e) for e in reader.entries()}, cached)


# encrypted ZIPs, decrypted by the Debian age tool ------------------------------------------


def ssh_key(folder: Path) -> Path:
    key = folder / "id_ed25519"
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "researcher@example", "-f", str(key)],
                   check=True, timeout=30)
    return key


def test_encrypted_zip_to_recipients_opens_with_age(ctx: ServiceContext, tmp_path: Path) -> None:
    cached = fill(ctx, tmp_path)
    identity = pyrage.x25519.Identity.generate()
    key_file = tmp_path / "age-key.txt"
    key_file.write_text(f"{identity}\n")
    ssh = ssh_key(tmp_path)
    body = {"all": True, "encryption": {"recipients": [str(identity.to_public()), (tmp_path / "id_ed25519.pub").read_text()]}}
    response = api_as(ctx, users(ctx)["bob"]).post("/api/v1/projects/alpha/download", json=body)
    assert response.status_code == 200, response.text
    archive = zipfile.ZipFile(io.BytesIO(response.content))
    names = archive.namelist()
    assert names[0] == "README.txt" and names[-1] == "manifest.age" and "identity.age" not in names
    images = [n for n in names if n.endswith(".age") and n != "manifest.age"]
    assert len(images) == len(cached) and all(KEYED.match(n) for n in images)
    secret_uids = all_uids(ctx, cached)
    readme = archive.read("README.txt").decode()
    for text in [*names, readme]:
        assert not any(uid in text for uid in secret_uids)
        assert "000123" not in text and "TEST^" not in text and "ACC-" not in text
    assert "age -d -i" in readme

    manifest = json.loads(age_decrypt(ssh, archive.read("manifest.age")))
    by_name = {f["path"]: f for f in manifest["files"]}
    plain: dict[str, bytes] = {}
    for name in images:
        data = age_decrypt(key_file, archive.read(name))
        assert hashlib.sha256(data).hexdigest() == by_name[name]["sha256"]
        assert name.rsplit("/", 1)[1].split(".")[0] == by_name[name]["readable"].rsplit("/", 1)[1].split(".")[0]
        plain[by_name[name]["readable"]] = data
    assert_readable_tree(plain, cached)
    assert age_decrypt(ssh, archive.read(images[0])) == plain[by_name[images[0]]["readable"]]


def test_encrypted_zip_digests_are_hashed_once_follow_a_replaced_file_and_catch_a_swapped_member(
        lite: ServiceContext, tmp_path: Path) -> None:
    cached = fill(lite, tmp_path)
    identity = pyrage.x25519.Identity.generate()
    encryption = download.Encryption(recipients=(str(identity.to_public()),))

    def encrypted_zip(name: str) -> Path:
        path = tmp_path / name
        path.write_bytes(b"".join(download.zip_download(lite, BOB, "alpha", [], True, encryption).chunks))
        return path

    with open_download(encrypted_zip("first.zip"), identities=[identity]) as reader:
        assert {sop_of(reader.read(e)) for e in reader.entries()} == set(cached)  # every SHA-256 checked
    assert len(lite.file_digests) == len(cached)  # remembered for the next download (or CLI manifest)

    # The same instance received again with other bytes: the remembered digest must not answer for it.
    sop, path = next(iter(cached.items()))
    changed = bytearray(path.read_bytes())
    changed[-1] ^= 0xFF
    (tmp_path / "again.dcm").write_bytes(changed)
    place(lite, "alpha", tmp_path / "again.dcm")
    second = encrypted_zip("second.zip")
    with open_download(second, identities=[identity]) as reader:
        assert {sop_of(data): data for data in map(reader.read, reader.entries())}[sop] == bytes(changed)

    # A member swapped for another one, a valid age file to the same key: age accepts it, the manifest does not.
    with zipfile.ZipFile(second) as archive:
        members = {info.filename: archive.read(info) for info in archive.infolist()}
    victim, other = [name for name in members if KEYED.match(name)][:2]
    forged = tmp_path / "forged.zip"
    with zipfile.ZipFile(forged, "w") as out:
        for name, data in members.items():
            out.writestr(name, members[other] if name == victim else data)
    with open_download(forged, identities=[identity]) as reader:
        entry = next(e for e in reader.entries() if e.stored_path == victim)
        with pytest.raises(DecryptionFailed, match="does not match the manifest"):
            reader.read(entry)


def test_encrypted_zip_with_passphrase(ctx: ServiceContext, tmp_path: Path) -> None:
    cached = fill(ctx, tmp_path)
    response = api_as(ctx, users(ctx)["bob"]).post(
        "/api/v1/projects/alpha/download", json={"all": True, "encryption": {"passphrase": PASSPHRASE}})
    assert response.status_code == 200, response.text
    bundle = tmp_path / "download.zip"
    bundle.write_bytes(response.content)
    archive = zipfile.ZipFile(bundle)
    # `age -d identity.age` reads the passphrase from a terminal only; pyrage stands in for the person typing.
    key_file = tmp_path / "key.txt"
    key_file.write_bytes(pyrage.passphrase.decrypt(archive.read("identity.age"), PASSPHRASE))
    images = [n for n in archive.namelist() if KEYED.match(n)]
    plain = {n: age_decrypt(key_file, archive.read(n)) for n in images}
    assert {sop_of(d) for d in plain.values()} == set(cached)

    with open_download(bundle, passphrase=PASSPHRASE) as reader:
        assert reader.encrypted
        assert_readable_tree({e.path: reader.read(e) for e in reader.entries()}, cached)
    out = tmp_path / "out"
    report = decrypt_download(bundle, out, passphrase=PASSPHRASE)
    assert report.files == len(cached)
    assert_readable_tree({p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*.dcm")}, cached)

    with pytest.raises(DecryptionFailed, match="wrong passphrase"):
        decrypt_download(bundle, tmp_path / "wrong", passphrase="not the passphrase at all")
    with pytest.raises(InvalidInput, match="give --passphrase"):
        open_download(bundle)
    assert not (tmp_path / "wrong").exists()


# the command line against a live server -------------------------------------------------------


class Gate:
    """ASGI wrapper over the CLI's batches of files: slows each file, or stalls the answer half-way through
    file ``stall_after + 1``, as a slow or broken network would (a small file is one body message)."""

    def __init__(self, app: Any, stall_after: int | None = None, delay: float = 0.0) -> None:
        self.app, self.stall_after, self.delay = app, stall_after, delay
        self.count = 0
        self.stalled = threading.Event()
        self.release = threading.Event()

    async def __call__(self, scope: dict[str, Any], receive: Callable[..., Any], send: Callable[..., Any]) -> None:
        if scope["type"] != "http" or not scope["path"].endswith("/download/files"):
            await self.app(scope, receive, send)
            return

        async def gated(message: dict[str, Any]) -> None:
            if message["type"] != "http.response.body" or not message.get("body"):
                await send(message)
                return
            self.count += 1
            if self.delay:
                await asyncio.sleep(self.delay)
            if self.stall_after is None or self.count != self.stall_after + 1:
                await send(message)
                return
            body = message["body"]
            await send({**message, "body": body[: len(body) // 2], "more_body": True})
            self.stalled.set()
            while not self.release.is_set():
                await asyncio.sleep(0.02)
            raise OSError("connection dropped")

        await self.app(scope, receive, gated)


def cli_env(tmp_path: Path) -> dict[str, str]:
    temp = tmp_path / "cli-tmp"
    temp.mkdir(exist_ok=True)
    # PYTHONPATH passes on where this checkout's sources are, when the environment is another checkout's.
    inherited = {k: os.environ[k] for k in ("PYTHONPATH",) if k in os.environ}
    return {"PATH": "/usr/bin:/bin", "COLUMNS": "200", "TMPDIR": str(temp), **inherited}


def mi2b2(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run([sys.executable, "-m", "mi2b2", *args], capture_output=True, text=True, timeout=120,
                            check=False, env=env)
    assert "Traceback" not in result.stdout + result.stderr, result.stderr
    return result


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_cli_folder_download_and_resume_after_a_kill(lite: ServiceContext, tmp_path: Path) -> None:
    cached = fill(lite, tmp_path)
    tokens = users(lite)
    gate = Gate(create_app(lite), stall_after=5)
    env = cli_env(tmp_path)
    target = tmp_path / "downloads"
    with serving(gate, log_level="critical") as url:
        argv = [sys.executable, "-m", "mi2b2", "download", "alpha", "--all", "--to", str(target),
                "--workers", "1", "--server", url, "--token", tokens["bob"]]
        process = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            assert gate.stalled.wait(60), "the download never reached the stalled file"
            time.sleep(0.3)  # the half-sent file reaches the CLI's temp file
            process.send_signal(signal.SIGKILL)
            process.wait(timeout=30)
        finally:
            gate.release.set()
            process.kill()
        left = tree(target)
        finals = {n: d for n, d in left.items() if n.endswith(".dcm")}
        assert len(finals) == 5 and all(d == cached[sop_of(d)].read_bytes() for d in finals.values())
        # What a kill in the middle of writing leaves (httpx may still hold the half-sent bytes, so make
        # sure there is one), and a complete-looking file whose bytes went bad: neither may count as done.
        stale = target / next(iter(finals))
        stale.with_name(f".{stale.name}.0badc0de.mi2b2-part").write_bytes(b"half a file")
        damaged = target / sorted(finals)[-1]
        damaged.write_bytes(damaged.read_bytes()[:-1] + bytes([damaged.read_bytes()[-1] ^ 0xFF]))

        again = mi2b2("download", "alpha", "--all", "--to", str(target), "--server", url, "--token", tokens["bob"],
                      env=env)
        assert again.returncode == 0, again.stderr
        assert f"{len(cached)} files of 3 studies" in again.stdout and "4 already complete" in again.stdout
        assert_readable_tree(tree(target), cached)  # also: no temp file left behind

        once_more = mi2b2("download", "alpha", "--all", "--to", str(target), "--server", url,
                          "--token", tokens["bob"], env=env)
        assert f"0 downloaded, {len(cached)} already complete" in once_more.stdout

        refused = mi2b2("download", "alpha", studies.uid(studies.BRAIN), "--to", str(tmp_path / "carol"),
                        "--server", url, "--token", tokens["carol"], env=env)
        assert refused.returncode == 2 and "not a member" in refused.stderr
        missing = mi2b2("download", "alpha", "--to", str(tmp_path / "x"), "--server", url, "--token", tokens["bob"],
                        env=env)
        assert missing.returncode == 2 and "--all" in missing.stderr


class PlaintextWatch:
    """Polls folders while a download runs; remembers any file that holds plaintext DICOM."""

    def __init__(self, folders: list[Path], top_level: list[Path]) -> None:
        self.folders, self.top_level = folders, top_level
        self.before = {p for folder in top_level for p in folder.iterdir()}
        self.found: list[str] = []
        self.polls = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> PlaintextWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            candidates = [p for folder in self.folders if folder.exists() for p in folder.rglob("*")]
            candidates += [p for folder in self.top_level for p in folder.iterdir() if p not in self.before]
            for path in candidates:
                self._check(path)
            self.polls += 1
            time.sleep(0.005)

    def _check(self, path: Path) -> None:
        try:
            with open(path, "rb") as file:
                head = file.read(132)
        except (IsADirectoryError, FileNotFoundError, PermissionError):
            return
        if head[128:132] == b"DICM" or (path.name.endswith(".dcm") and head):
            self.found.append(str(path))


def test_cli_encrypted_download_with_passphrase(lite: ServiceContext, tmp_path: Path) -> None:
    cached = fill(lite, tmp_path)
    tokens = users(lite)
    env = cli_env(tmp_path)
    secret = tmp_path / "passphrase.txt"
    secret.write_text(PASSPHRASE + "\n")
    target = tmp_path / "encrypted"
    incoming = lite.config.cache_dir() / ".incoming"
    with serving(Gate(create_app(lite), delay=0.02), log_level="critical") as url:
        with PlaintextWatch([target, Path(env["TMPDIR"]), incoming], [Path(tempfile.gettempdir())]) as watch:
            done = mi2b2("download", "alpha", "--all", "--to", str(target), "--passphrase-file", str(secret),
                         "--server", url, "--token", tokens["bob"], env=env)
        assert done.returncode == 0, done.stderr
        assert watch.polls > 20 and watch.found == []
        resumed = mi2b2("download", "alpha", "--all", "--to", str(target), "--passphrase-file", str(secret),
                        "--server", url, "--token", tokens["bob"], env=env)
        assert f"0 downloaded, {len(cached)} already complete" in resumed.stdout
        no_key = mi2b2("download", "alpha", "--all", "--to", str(target), "--server", url, "--token", tokens["bob"],
                       env=env)
        assert no_key.returncode == 2 and "holds an encrypted download" in no_key.stderr

    files = tree(target)
    images = sorted(n for n in files if n.endswith(".dcm.age"))
    assert len(images) == len(cached) and all(KEYED.match(n) for n in images)
    assert {"README.txt", "identity.age", "manifest.age"} <= set(files)
    secret_uids = all_uids(lite, cached)
    assert not any(uid in name for uid in secret_uids for name in files)
    assert not any(uid.encode() in files["README.txt"] for uid in secret_uids)
    key_file = tmp_path / "key.txt"  # as `age -d identity.age > key.txt` would, with the passphrase typed
    key_file.write_bytes(pyrage.passphrase.decrypt(files["identity.age"], PASSPHRASE))
    assert {sop_of(age_decrypt(key_file, files[n])) for n in images} == set(cached)

    out = tmp_path / "readable"
    restored = mi2b2("decrypt", str(target), "--to", str(out), "--passphrase-file", str(secret), env=env)
    assert restored.returncode == 0, restored.stderr
    assert_readable_tree(tree(out), cached)

    wrong = tmp_path / "wrong.txt"
    wrong.write_text("not the passphrase at all\n")
    refused = mi2b2("decrypt", str(target), "--to", str(tmp_path / "nothing"), "--passphrase-file", str(wrong), env=env)
    assert refused.returncode == 2 and "wrong passphrase" in refused.stderr
    assert not (tmp_path / "nothing").exists()

    victim = target / images[len(images) // 2]
    damaged = bytearray(victim.read_bytes())
    damaged[-40] ^= 0x01
    victim.write_bytes(bytes(damaged))
    tampered = mi2b2("decrypt", str(target), "--to", str(tmp_path / "nothing"), "--passphrase-file", str(secret),
                     env=env)
    assert tampered.returncode == 2 and "damaged, truncated or was altered" in tampered.stderr
    assert not (tmp_path / "nothing").exists()
    victim.write_bytes(victim.read_bytes()[:-100])  # truncated
    with pytest.raises(DecryptionFailed, match="damaged, truncated"):
        decrypt_download(target, tmp_path / "nothing", passphrase=PASSPHRASE)
    victim.unlink()  # an unfinished download
    with pytest.raises(InvalidInput, match="incomplete"):
        decrypt_download(target, tmp_path / "nothing", passphrase=PASSPHRASE)
    assert not (tmp_path / "nothing").exists()


def test_cli_encrypted_download_to_recipients(lite: ServiceContext, tmp_path: Path) -> None:
    cached = fill(lite, tmp_path)
    tokens = users(lite)
    env = cli_env(tmp_path)
    keygen = subprocess.run(["age-keygen", "-o", str(tmp_path / "me.txt")], capture_output=True, text=True, check=True)
    public = keygen.stderr.split("Public key: ")[1].strip()
    ssh = ssh_key(tmp_path)
    target = tmp_path / "encrypted"
    incoming = lite.config.cache_dir() / ".incoming"
    with serving(Gate(create_app(lite), delay=0.02), log_level="critical") as url:
        common = ["--server", url, "--token", tokens["bob"]]
        with PlaintextWatch([target, Path(env["TMPDIR"]), incoming], [Path(tempfile.gettempdir())]) as watch:
            done = mi2b2("download", "alpha", studies.uid(studies.BRAIN), studies.uid(BIG), "--to", str(target),
                         "-r", public, "-r", str(tmp_path / "id_ed25519.pub"), *common, env=env)
        assert done.returncode == 0, done.stderr
        assert watch.polls > 20 and watch.found == []
        assert "identity.age" not in tree(target)
        # Resuming means checking files, which takes the private key.
        blind = mi2b2("download", "alpha", studies.uid(studies.BRAIN), "--to", str(target), "-r", public, *common,
                      env=env)
        assert blind.returncode == 2 and "--identity" in blind.stderr
        (target / next(n for n in tree(target) if n.endswith(".dcm.age"))).unlink()
        resumed = mi2b2("download", "alpha", studies.uid(studies.BRAIN), studies.uid(BIG), "--to", str(target),
                        "-r", public, "-r", str(tmp_path / "id_ed25519.pub"), "-i", str(ssh), *common, env=env)
        assert resumed.returncode == 0, resumed.stderr
        assert "1 downloaded" in resumed.stdout

    files = tree(target)
    images = [n for n in files if n.endswith(".dcm.age")]
    expected = {s for s, p in cached.items() if read_instance_header(p).study_uid != studies.uid(studies.TRAUMA)}
    assert {sop_of(age_decrypt(tmp_path / "me.txt", files[n])) for n in images} == expected
    assert sop_of(age_decrypt(ssh, files[images[0]])) in expected

    with open_download(target, identities=[tmp_path / "me.txt"]) as reader:
        entries = reader.entries()
        assert {e.sop_uid for e in entries} == expected
        big = [e for e in entries if e.path.startswith("PAT004/20240202_ACC-5001/002_CT/")]
        assert [instance_number(reader.read(e)) for e in big] == list(range(1, 13))
        assert [e.stored_path.rsplit("/", 1)[1] for e in big] == [f"{i:04d}.dcm.age" for i in range(1, 13)]
    stranger = tmp_path / "stranger.txt"
    subprocess.run(["age-keygen", "-o", str(stranger)], capture_output=True, check=True)
    refused = mi2b2("decrypt", str(target), "--to", str(tmp_path / "nothing"), "-i", str(stranger), env=env)
    assert refused.returncode == 2 and "none of the given keys can open it" in refused.stderr
    assert not (tmp_path / "nothing").exists()
    with pytest.raises(AccessDenied):
        download.plan_download(lite, CAROL, "alpha", [studies.uid(BIG)])
