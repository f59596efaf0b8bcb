"""WADO-RS transfer syntax negotiation (PS3.18 8.7.3.5.2): the default is Explicit VR Little Endian."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate

from mi2b2.adapters.dicom.transcode import ConversionFailed, as_explicit_little_endian, why_not_convertible
from mi2b2.services.dicomweb.negotiation import (
    AS_STORED,
    EXPLICIT_VR_LITTLE_ENDIAN,
    NotAcceptable,
    WantedSyntaxes,
    answer_syntax,
    dicom_transfer_syntaxes,
)

JPEG = "1.2.840.10008.1.2.4.50"
JPEG_LS = "1.2.840.10008.1.2.4.80"
IMPLICIT = "1.2.840.10008.1.2"
DICOM = 'multipart/related; type="application/dicom"'


@pytest.mark.parametrize(("accept", "wanted"), [
    (None, AS_STORED),
    ("*/*", AS_STORED),
    (f"{DICOM}; transfer-syntax=*", AS_STORED),
    (DICOM, WantedSyntaxes(default=True)),
    ("multipart/related", WantedSyntaxes(default=True)),
    (f"{DICOM}; transfer-syntax={JPEG}", WantedSyntaxes(frozenset({JPEG}))),
    (f"{DICOM}; transfer-syntax={JPEG}, {DICOM}", WantedSyntaxes(frozenset({JPEG}), default=True)),
])
def test_what_an_accept_header_asks_for(accept: str | None, wanted: WantedSyntaxes) -> None:
    assert dicom_transfer_syntaxes(accept) == wanted


def test_no_transfer_syntax_parameter_means_explicit_vr_little_endian() -> None:
    default = dicom_transfer_syntaxes(DICOM)
    assert answer_syntax(JPEG, default, None) == EXPLICIT_VR_LITTLE_ENDIAN
    assert answer_syntax(EXPLICIT_VR_LITTLE_ENDIAN, default, None) == EXPLICIT_VR_LITTLE_ENDIAN
    assert answer_syntax(IMPLICIT, default, None) == IMPLICIT  # uncompressed little endian: as stored


def test_star_sends_as_stored_even_what_cannot_be_decoded() -> None:
    assert answer_syntax(JPEG, dicom_transfer_syntaxes(f"{DICOM}; transfer-syntax=*"), "no decoder") == JPEG


def test_an_explicit_syntax_is_answered_if_stored_or_explicit_vr_little_endian() -> None:
    assert answer_syntax(JPEG, dicom_transfer_syntaxes(f"{DICOM}; transfer-syntax={JPEG}"), "no decoder") == JPEG
    ele = dicom_transfer_syntaxes(f"{DICOM}; transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN}")
    assert answer_syntax(JPEG, ele, None) == EXPLICIT_VR_LITTLE_ENDIAN
    assert answer_syntax(IMPLICIT, ele, None) == EXPLICIT_VR_LITTLE_ENDIAN  # re-encoded, as named


def test_an_unsupported_syntax_is_not_acceptable_and_names_what_is() -> None:
    with pytest.raises(NotAcceptable) as refused:
        answer_syntax(JPEG, dicom_transfer_syntaxes(f"{DICOM}; transfer-syntax={JPEG_LS}"), None)
    assert JPEG_LS in str(refused.value)
    assert f"transfer-syntax={JPEG}" in str(refused.value) and EXPLICIT_VR_LITTLE_ENDIAN in str(refused.value)


def test_an_instance_without_a_decoder_is_not_acceptable_by_default() -> None:
    with pytest.raises(NotAcceptable) as refused:
        answer_syntax(JPEG, dicom_transfer_syntaxes(DICOM), "no decoder for JPEG Baseline is installed")
    message = str(refused.value)
    assert "no decoder for JPEG Baseline is installed" in message and "transfer-syntax=*" in message


def test_what_can_be_converted_here() -> None:
    assert why_not_convertible(JPEG) is None  # pylibjpeg / pillow are installed
    assert why_not_convertible(IMPLICIT) is None
    assert why_not_convertible("1.2.840.10008.1.2.2") is not None  # big endian: pydicom will not re-encode it
    assert "no decoder" in (why_not_convertible("1.2.840.10008.1.2.4.100") or "")  # MPEG-2
    assert why_not_convertible("") is not None


def test_a_jpeg_instance_is_decoded_into_explicit_vr_little_endian() -> None:
    path = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    assert path is not None
    converted = dcmread(io.BytesIO(as_explicit_little_endian(Path(path))))
    original = dcmread(path)
    assert converted.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
    assert converted.SOPInstanceUID == original.SOPInstanceUID
    assert np.array_equal(converted.pixel_array, original.pixel_array)


def test_a_damaged_instance_fails_to_convert_clearly(tmp_path: Path) -> None:
    path = get_testdata_file("SC_rgb_jpeg_dcmtk.dcm")
    assert path is not None
    ds = dcmread(path)
    ds.PixelData = encapsulate([b"\xff\xd8 not a JPEG stream at all \xff\xd9"])
    broken = tmp_path / "broken.dcm"
    ds.save_as(broken)
    with pytest.raises(ConversionFailed, match="could not be decoded"):
        as_explicit_little_endian(broken)
