"""A stored instance re-encoded as Explicit VR Little Endian, for WADO-RS clients that ask for the default.

Compressed pixel data is decoded with pydicom's installed decoders (pylibjpeg, pillow);
native data in another little-endian form is only re-encoded. One instance is held
in memory at a time: the caller sends it before asking for the next.
"""

from __future__ import annotations

import io
from pathlib import Path

from pydicom import dcmread
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import UID, ExplicitVRLittleEndian

from mi2b2.adapters.dicom.render import quiet

EXPLICIT_VR_LITTLE_ENDIAN = str(ExplicitVRLittleEndian)
# Native syntaxes pydicom re-encodes as Explicit VR LE without decoding anything (not big endian: it refuses).
REENCODED = frozenset({"1.2.840.10008.1.2", EXPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.2.1.99"})


class ConversionFailed(Exception):
    """This instance could not be turned into Explicit VR Little Endian (the message says why)."""


def why_not_convertible(syntax: str) -> str | None:
    """None if an instance stored in ``syntax`` can be sent as Explicit VR Little Endian, else the reason."""
    if not syntax:
        return "its transfer syntax cannot be read"
    if syntax in REENCODED:
        return None
    uid = UID(syntax)
    if not uid.is_encapsulated:
        return f"{uid.name} cannot be re-encoded as little endian here"
    try:
        decoder = get_decoder(uid)
    except NotImplementedError:
        return f"no decoder for {uid.name} exists"
    if not decoder.is_available:
        return f"no decoder for {uid.name} is installed"
    return None


def as_explicit_little_endian(source: Path | bytes) -> bytes:
    """The file at ``source`` (or these Part 10 bytes) as Explicit VR Little Endian; ConversionFailed if it
    cannot be."""
    try:
        with quiet():
            ds = dcmread(io.BytesIO(source) if isinstance(source, bytes) else source)
            if ds.file_meta.TransferSyntaxUID.is_encapsulated and "PixelData" in ds:
                # The instance stays the same instance: its UID names it in the study the client asked for.
                ds.decompress(generate_instance_uid=False)
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
            out = io.BytesIO()
            ds.save_as(out, enforce_file_format=True)
    except Exception as exc:  # a decoder's failure, whatever its kind, is this instance's, not the server's
        raise ConversionFailed(f"its pixel data could not be decoded ({type(exc).__name__})") from None
    return out.getvalue()
