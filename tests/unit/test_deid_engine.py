"""The de-identification engine on pydicom's own sample files (CT, MR, NM, SC, RT, SR, SEG, US; explicit and
implicit little endian, big endian, RLE, JPEG 2000, deflate): nothing the table removes or replaces survives
anywhere in the bytes, pixel data is byte-identical, DCMTK reads the result and dciodvfy finds no new error."""

from __future__ import annotations

import io
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file

from mi2b2.adapters.dicom.deidentify import DeidEngine, Deidentified, Withheld, deidentify_bytes, deidentify_file
from mi2b2.domain.deid.profile import Profile, ProfileOption
from mi2b2.domain.deid.pseudonyms import Pseudonymizer
from mi2b2.domain.deid.table import Action, action_table

SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"
SAMPLES = ["CT_small.dcm", "MR_small.dcm", "MR_small_implicit.dcm", "MR_small_bigendian.dcm", "MR_small_RLE.dcm",
           "JPEG2000.dcm", "reportsi.dcm", "test-SR.dcm", "liver_1frame.dcm", "liver_expb_1frame.dcm", "rtplan.dcm",
           pytest.param("rtdose.dcm", marks=pytest.mark.filterwarnings("ignore:Invalid value for VR UI")),
           "SC_rgb_small_odd.dcm", "image_dfl.dcm"]
KEY = b"k" * 32
# The sample files' secondary captures stand for images the project checked and cleared.
PROFILE = Profile.of([ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES], cleared_sop_classes=[SECONDARY_CAPTURE])
ENGINE = DeidEngine(PROFILE, Pseudonymizer(KEY))
GONE = {Action.REMOVE, Action.EMPTY, Action.DUMMY, Action.UID, Action.SHIFT}


def sample(name: str) -> bytes:
    path = get_testdata_file(name)
    assert path is not None, f"pydicom's sample {name} is missing"
    return Path(path).read_bytes()


def identifying_values(ds: Dataset, profile: Profile) -> tuple[set[str], set[str]]:
    """Every value, anywhere in the dataset, of an attribute the table removes or replaces (but not one that
    a kept attribute happens to share, such as a 0.000000)."""
    table = action_table(profile)
    found: set[str] = set()
    kept: set[str] = set()
    for element in ds.iterall():
        if element.VR == "SQ":
            continue
        action = table.action_for(int(element.tag))
        if int(element.tag) in (0x00100010, 0x00100020):
            action = Action.DUMMY  # the patient's name and ID become the pseudonym
        values = element.value if isinstance(element.value, list | tuple) or element.VM > 1 else [element.value]
        texts = {str(value).strip() for value in values}
        if action in GONE and not element.tag.is_private:
            found |= {t for t in texts if len(t) >= 6 and not t.startswith("1.2.840.10008.")}
        elif action is None or action is Action.KEEP:
            kept |= texts
    kept |= {str(element.value) for element in ds.file_meta}  # e.g. the writing toolkit's implementation UID
    return {value for value in found if not any(value in other for other in kept)}, kept


def pixel_bytes(data: bytes) -> bytes:
    outcome = deidentify_file(io.BytesIO(data), ENGINE)
    assert isinstance(outcome, Deidentified)
    return data[outcome.pixel_start:outcome.pixel_end]


@pytest.mark.parametrize("name", SAMPLES)
def test_nothing_the_table_replaces_survives_and_pixel_data_is_as_stored(name: str, tmp_path: Path) -> None:
    data = sample(name)
    original = dcmread(io.BytesIO(data))
    out, outcome = deidentify_bytes(data, ENGINE)
    assert out is not None and isinstance(outcome, Deidentified), outcome

    gone, kept = identifying_values(original, PROFILE)
    leaked = sorted(v for v in gone if v.encode("latin-1", "replace") in out)
    assert leaked == []
    for keyword in ("PatientName", "PatientID", "AccessionNumber", "InstitutionName", "ReferringPhysicianName",
                    "StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "PatientBirthDate"):
        value = str(original.get(keyword, "") or "").strip()
        if len(value) >= 3 and not any(value in other for other in kept):  # TOSHIBA in TOSHIBA_MEC
            assert value.encode() not in out, keyword
    result = dcmread(io.BytesIO(out))
    assert result.PatientIdentityRemoved == "YES"
    assert result.PatientName == result.PatientID == ENGINE.pseudonyms.patient_id(str(original.PatientID))
    assert result.file_meta.MediaStorageSOPInstanceUID == result.SOPInstanceUID
    assert result.SOPInstanceUID == ENGINE.pseudonyms.uid(str(original.SOPInstanceUID))
    assert result.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    if "PixelData" in original:
        assert result.PixelData == original.PixelData  # the value, as stored: never decoded
        if outcome.pixel_end:  # and the very bytes, element header included, copied from the original
            assert out.endswith(data[outcome.pixel_start:outcome.pixel_end])
    assert not any(element.tag.is_private for element in result.iterall())

    (tmp_path / "in.dcm").write_bytes(data)
    (tmp_path / "out.dcm").write_bytes(out)
    dumped = subprocess.run([shutil.which("dcmdump") or "dcmdump", "-q", str(tmp_path / "out.dcm")],
                            capture_output=True, text=True, errors="replace", timeout=60)
    assert dumped.returncode == 0 and "E:" not in dumped.stderr, dumped.stderr
    assert "PatientIdentityRemoved" in dumped.stdout
    assert dciodvfy_errors(tmp_path / "out.dcm") <= dciodvfy_errors(tmp_path / "in.dcm")


def dciodvfy_errors(path: Path) -> set[str]:
    run = subprocess.run([shutil.which("dciodvfy") or "dciodvfy", "-new", str(path)], capture_output=True,
                         text=True, errors="replace", timeout=60)
    lines = (run.stdout + run.stderr).splitlines()
    # Values differ (a date, a length): what matters is which rule is broken for which attribute.
    return {re.sub(r"</\([0-9a-fA-F,]+\)>|<[0-9.]+>|\d+", "#", line) for line in lines if line.startswith("Error")}


def test_the_same_key_gives_the_same_bytes_and_another_key_other_pseudonyms() -> None:
    data = sample("CT_small.dcm")
    first, _ = deidentify_bytes(data, ENGINE)
    again, _ = deidentify_bytes(data, DeidEngine(PROFILE, Pseudonymizer(KEY)))
    other, _ = deidentify_bytes(data, DeidEngine(PROFILE, Pseudonymizer(b"o" * 32)))
    assert first == again
    assert first is not None and other is not None
    assert dcmread(io.BytesIO(first)).StudyInstanceUID != dcmread(io.BytesIO(other)).StudyInstanceUID


def test_references_between_objects_are_remapped_like_the_objects_they_name() -> None:
    seg = dcmread(io.BytesIO(sample("liver_1frame.dcm")))
    out, _ = deidentify_bytes(sample("liver_1frame.dcm"), ENGINE)
    assert out is not None
    result = dcmread(io.BytesIO(out))

    def references(ds: Dataset) -> list[str]:
        return [str(e.value) for e in ds.iterall()
                if e.keyword in ("ReferencedSOPInstanceUID", "FrameOfReferenceUID", "SeriesInstanceUID")]

    before, after = references(seg), references(result)
    assert before and len(before) == len(after)
    assert after == [ENGINE.pseudonyms.uid(uid) for uid in before]
    # Standard UIDs (SOP classes) are kept: they name a kind of object, not a patient.
    assert [str(e.value) for e in result.iterall() if e.keyword == "ReferencedSOPClassUID"] == \
        [str(e.value) for e in seg.iterall() if e.keyword == "ReferencedSOPClassUID"]


def test_dates_of_one_patient_move_together_and_keep_their_intervals() -> None:
    ds = dcmread(io.BytesIO(sample("CT_small.dcm")))
    later = ds.copy()
    later.StudyDate, later.SOPInstanceUID = "20050301", "1.2.3.4.99"
    later.file_meta = ds.file_meta.copy()
    outputs = []
    for dataset in (ds, later):
        buffer = io.BytesIO()
        dataset.save_as(buffer, enforce_file_format=True)
        out, _ = deidentify_bytes(buffer.getvalue(), ENGINE)
        assert out is not None
        outputs.append(dcmread(io.BytesIO(out)).StudyDate)
    assert outputs[0] != ds.StudyDate
    assert _days(outputs[1]) - _days(outputs[0]) == _days("20050301") - _days(str(ds.StudyDate))
    basic = DeidEngine(Profile.of(), Pseudonymizer(KEY))
    out, _ = deidentify_bytes(sample("CT_small.dcm"), basic)
    assert out is not None
    result = dcmread(io.BytesIO(out))
    assert result.get("StudyDate", "") == "" and result.LongitudinalTemporalInformationModified == "REMOVED"


def _days(text: str) -> int:
    from datetime import date

    return date(int(text[:4]), int(text[4:6]), int(text[6:])).toordinal()


def test_ultrasound_is_withheld_unless_it_says_no_burned_in_text_or_is_cleared() -> None:
    data = sample("examples_jpeg2k.dcm")  # a US image that says nothing about burned-in text
    out, outcome = deidentify_bytes(data, ENGINE)
    assert out is None and isinstance(outcome, Withheld) and outcome.modality == "US"
    assert outcome.series_uid == ENGINE.pseudonyms.uid(str(dcmread(io.BytesIO(data)).SeriesInstanceUID))

    ds = dcmread(io.BytesIO(data))
    ds.BurnedInAnnotation = "NO"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    out, _ = deidentify_bytes(buffer.getvalue(), ENGINE)
    assert out is not None
    ds.BurnedInAnnotation = "YES"
    ds.Modality = "CT"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    assert deidentify_bytes(buffer.getvalue(), ENGINE)[0] is None
    cleared = DeidEngine(Profile.of(cleared_series=[str(ds.SeriesInstanceUID)]), Pseudonymizer(KEY))
    assert deidentify_bytes(buffer.getvalue(), cleared)[0] is not None


def test_for_attribute_values_alone_a_burned_in_risk_is_de_identified_and_named_not_withheld() -> None:
    """What a search answer or a viewer's label reads: the same header, the risk said, no pixels sent."""
    data = sample("examples_jpeg2k.dcm")
    values = DeidEngine(ENGINE.profile, ENGINE.pseudonyms, withhold_burned_in=False)
    out, outcome = deidentify_bytes(data, values)
    assert out is not None and isinstance(outcome, Deidentified) and "burned-in" in outcome.risk
    assert outcome.patient_id == ENGINE.pseudonyms.patient_id(str(dcmread(io.BytesIO(data)).PatientID))
    _, ct = deidentify_bytes(sample("CT_small.dcm"), values)
    assert isinstance(ct, Deidentified) and ct.risk == ""


def test_options_keep_what_they_name_and_safe_private_elements() -> None:
    ds = dcmread(io.BytesIO(sample("CT_small.dcm")))
    ds.PatientSex, ds.PatientAge = "F", "042Y"
    ds.StationName, ds.InstitutionName = "CT-STATION-7", "General Hospital"
    ds.StudyDescription = f"CT chest {ds.PatientName} follow-up"
    block = ds.private_block(0x0099, "MI2B2 TEST", create=True)
    block.add_new(0x10, "LO", "safe value")
    block.add_new(0x11, "LO", "unsafe value")
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    options = [ProfileOption.RETAIN_PATIENT_CHARACTERISTICS, ProfileOption.RETAIN_DEVICE_IDENTITY,
               ProfileOption.RETAIN_INSTITUTION_IDENTITY, ProfileOption.CLEAN_DESCRIPTORS,
               ProfileOption.RETAIN_SAFE_PRIVATE]
    engine = DeidEngine(Profile.of(options, safe_private=["MI2B2 TEST:10"]), Pseudonymizer(KEY))
    out, _ = deidentify_bytes(buffer.getvalue(), engine)
    assert out is not None
    result = dcmread(io.BytesIO(out))
    assert (result.PatientSex, result.PatientAge, result.StationName, result.InstitutionName) == (
        "F", "042Y", "CT-STATION-7", "General Hospital")
    assert result.StudyDescription == "CT chest follow-up"
    assert b"safe value" in out and b"unsafe value" not in out
    assert [code.CodeValue for code in result.DeidentificationMethodCodeSequence] == [
        "113100", "113108", "113109", "113112", "113105", "113111"]

    basic, _ = deidentify_bytes(buffer.getvalue(), ENGINE)
    assert basic is not None
    for value in (b"CT-STATION-7", b"General Hospital", b"safe value", b"follow-up"):
        assert value not in basic


@pytest.mark.parametrize("damage", ["truncated", "not dicom", "cut pixel data"])
def test_a_damaged_file_is_withheld_never_sent_as_it_is(damage: str) -> None:
    data = sample("MR_small.dcm")
    broken: dict[str, Any] = {"truncated": data[:200], "not dicom": b"\0" * 128 + b"NOPE" + data[132:],
                              "cut pixel data": data[:-300]}
    out, outcome = deidentify_bytes(broken[damage], ENGINE)
    assert out is None and isinstance(outcome, Withheld) and "not readable" in outcome.reason


def test_a_deeply_nested_name_is_replaced_too() -> None:
    ds = dcmread(io.BytesIO(sample("CT_small.dcm")))
    item = Dataset()
    ds.ReferencedStudySequence = [item]
    for _ in range(60):  # sequences in sequences: the walk goes all the way down
        inner = Dataset()
        item.ReferencedStudySequence = [inner]
        item = inner
    item.PatientName = "HIDDEN^DEEP"
    item.ReferencedSOPInstanceUID = "1.2.3.4.5.6.7"
    buffer = io.BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    out, _ = deidentify_bytes(buffer.getvalue(), ENGINE)
    assert out is not None and b"HIDDEN" not in out and b"1.2.3.4.5.6.7" not in out
