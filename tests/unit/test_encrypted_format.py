"""The download format without a server: names, keyed names, the manifest, age streaming, the reader."""

from __future__ import annotations

import hashlib
import threading
import zipfile
from pathlib import Path

import pyrage
import pytest

from mi2b2.adapters.crypto import age_files
from mi2b2.adapters.crypto.age_files import ChunkReader, DecryptionFailed
from mi2b2.errors import InvalidInput
from mi2b2.services.export import open_download
from mi2b2.services.export.layout import (
    InstanceInfo,
    Manifest,
    ManifestEntry,
    SeriesInfo,
    StudyInfo,
    keyed_paths,
    plan_paths,
    readme_text,
    safe_name,
)

STUDY = StudyInfo("1.2.840.99.1", "MRN/007", "20240101", "ACC 1")


def test_names_are_safe_on_every_file_system() -> None:
    assert safe_name("MRN/007", "x") == "MRN_007"
    assert safe_name("..", "fallback") == "fallback"
    assert safe_name("", "fallback") == "fallback"
    assert safe_name("CON", "x") == "_CON" and safe_name("nul.txt", "x") == "_nul.txt"
    assert safe_name("Müller^Ann", "x") == "M_ller_Ann"
    assert len(safe_name("9" * 300, "x")) == 64


def test_readable_paths_follow_instance_number_then_sop_uid() -> None:
    series = {"1.5": SeriesInfo("1.5", 2, "MR")}
    instances = [InstanceInfo(STUDY.study_uid, "1.5", sop, number, 10)
                 for sop, number in (("1.9.3", 2), ("1.9.1", 10), ("1.9.2", None), ("1.9.0", 2), ("1.9.4", 1))]
    planned = plan_paths([STUDY], series, instances)
    assert [p.sop_uid for p in planned] == ["1.9.4", "1.9.0", "1.9.3", "1.9.1", "1.9.2"]
    assert [p.path for p in planned][:2] == ["MRN_007/20240101_ACC_1/002_MR/0001.dcm", "MRN_007/20240101_ACC_1/002_MR/0002.dcm"]
    wide = plan_paths([STUDY], series, [InstanceInfo(STUDY.study_uid, "1.5", f"1.{n}", n, 1) for n in range(10001)])
    assert wide[0].number == "00001" and wide[-1].number == "10001"


def test_colliding_names_get_the_short_uid() -> None:
    twins = [StudyInfo("1.2.3.1111", "P1", "20240101", ""), StudyInfo("1.2.3.2222", "P1", "20240101", "")]
    series = {"1.7.1": SeriesInfo("1.7.1", None, "CT"), "1.7.2": SeriesInfo("1.7.2", None, "CT")}
    instances = [InstanceInfo("1.2.3.1111", "1.7.1", "1.8.1", 1, 1), InstanceInfo("1.2.3.1111", "1.7.2", "1.8.2", 1, 1),
                 InstanceInfo("1.2.3.2222", "1.7.3", "1.8.3", 1, 1)]
    paths = [p.path for p in plan_paths(twins, series, instances)]
    assert len(set(paths)) == 3
    assert "P1/20240101_1231111/000_CT_171/0001.dcm" in paths and "P1/20240101_1232222/000_OT/0001.dcm" in paths


def test_keyed_names_hide_uids_and_depend_on_the_key() -> None:
    planned = plan_paths([STUDY], {}, [InstanceInfo(STUDY.study_uid, "1.5", "1.9.1", 1, 1)])
    key = age_files.new_name_key()
    [name] = keyed_paths(key, planned)
    study, series, file = name.split("/")
    assert len(study) == len(series) == 16 and file == "0001.dcm.age"
    assert study != hashlib.sha256(STUDY.study_uid.encode()).hexdigest()[:16]  # never a bare hash of a UID
    assert keyed_paths(key, planned) == [name]
    assert keyed_paths(age_files.new_name_key(), planned) != [name]


def test_manifest_round_trip_and_wrong_format() -> None:
    entry = ManifestEntry("a/b/0001.dcm.age", "P/S/R/0001.dcm", "0" * 64, 12, "1.1", "1.2", "1.3")
    manifest = Manifest("alpha", "recipients", b"k" * 32, ["age1xyz"], "2026-01-05T12:00:00+00:00", [entry])
    assert Manifest.from_json(manifest.to_json()) == manifest
    with pytest.raises(InvalidInput, match="does not hold an mi2b2 manifest"):
        Manifest.from_json(b'{"format": "mi2b2-download/1"}')
    with pytest.raises(InvalidInput, match="this mi2b2 reads"):
        Manifest.from_json(b'{"format": "other/9"}')
    readme = readme_text("passphrase", 3, "2026-01-05")
    assert "age -d -o key.txt identity.age" in readme and "mi2b2 decrypt" in readme


def test_recipients_and_identities_give_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="not a public key age can encrypt to"):
        age_files.parse_recipient("age1notakey")
    with pytest.raises(InvalidInput, match="at least one recipient"):
        age_files.parse_recipients(["# only a comment"])
    with pytest.raises(InvalidInput, match="too short"):
        age_files.check_passphrase("short")
    with pytest.raises(InvalidInput, match="does not exist"):
        age_files.load_identities([tmp_path / "absent.txt"])
    (tmp_path / "bad.txt").write_text("AGE-SECRET-KEY-1NOPE\n")
    with pytest.raises(InvalidInput, match="not an age secret key"):
        age_files.load_identities([tmp_path / "bad.txt"])
    identity = age_files.new_identity()
    (tmp_path / "key.txt").write_text(age_files.identity_file_text(identity))
    [loaded] = age_files.load_identities([tmp_path / "key.txt"])
    data = age_files.encrypt(b"hello", [identity.to_public()])
    assert age_files.decrypt(data, [loaded], "x") == b"hello"
    with pytest.raises(DecryptionFailed, match="none of the given keys can open it"):
        age_files.decrypt(data, [age_files.new_identity()], "x")
    with pytest.raises(DecryptionFailed, match="damaged, truncated"):
        age_files.decrypt(data[:-3], [identity], "x")
    with pytest.raises(DecryptionFailed, match="wrong passphrase"):
        age_files.decrypt_with_passphrase(pyrage.passphrase.encrypt(b"k", "right one"), "wrong one", "identity.age")


def test_chunk_reader_and_streaming_encryption() -> None:
    chunks = [b"abc", b"", b"defgh", b"ij"]
    seen: list[bytes] = []
    reader = ChunkReader(chunks, seen.append)
    assert reader.read(2) == b"ab" and reader.read(5) == b"c" and reader.read(-1) == b"defghij" and reader.read(1) == b""
    assert b"".join(seen) == b"abcdefghij"

    identity = age_files.new_identity()
    plain = [bytes([n]) * 300_000 for n in range(7)]
    ciphertext = b"".join(age_files.encrypt_chunks(iter(plain), [identity.to_public()]))
    assert pyrage.decrypt(ciphertext, [identity]) == b"".join(plain)

    before = threading.active_count()
    stream = age_files.encrypt_chunks(iter(plain * 20), [identity.to_public()])
    next(stream)
    stream.close()  # type: ignore[attr-defined]
    assert threading.active_count() == before


def test_reader_on_plain_folders_and_zips(tmp_path: Path) -> None:
    folder = tmp_path / "plain"
    (folder / "P" / "S" / "R").mkdir(parents=True)
    (folder / "P" / "S" / "R" / "0001.dcm").write_bytes(b"one")
    (folder / "P" / "S" / "R" / ".0002.dcm.1234.mi2b2-part").write_bytes(b"partial")
    with open_download(folder) as reader:
        assert not reader.encrypted
        [entry] = reader.entries()
        assert (entry.path, entry.stored_path, entry.size) == ("P/S/R/0001.dcm", "P/S/R/0001.dcm", 3)
        assert reader.read(entry) == b"one" and reader.read("P/S/R/0001.dcm") == b"one"
    bundle = tmp_path / "plain.zip"
    with zipfile.ZipFile(bundle, "w") as archive:
        archive.writestr("P/S/R/0001.dcm", b"one")
    with open_download(bundle) as reader:
        assert [reader.read(e) for e in reader.entries()] == [b"one"]
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    with pytest.raises(InvalidInput, match="not a readable ZIP"):
        open_download(tmp_path / "junk.zip")
    with pytest.raises(InvalidInput, match="does not exist"):
        open_download(tmp_path / "nowhere")
