"""Content negotiation for WADO-RS (PS3.18 8.7): what an Accept header allows, against what is stored.

Instances: ``transfer-syntax=*`` (OHIF), no Accept or ``*/*`` get the files as stored;
``type="application/dicom"`` with no transfer-syntax gets PS3.18's default, Explicit VR
Little Endian (Table 8.7.3-5), so a compressed instance is decoded (`adapters.dicom.transcode`);
a named syntax is answered if it is the stored one or Explicit VR LE. Anything else is
406 naming what is available. Frames go out as stored, never transcoded.
"""

from __future__ import annotations

from dataclasses import dataclass

from mi2b2.errors import InvalidInput

DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
NATIVE_LITTLE_ENDIAN = frozenset({"1.2.840.10008.1.2", EXPLICIT_VR_LITTLE_ENDIAN})

# Transfer syntax -> media type of a frame in it (PS3.18 Table 8.7.3-2).
FRAME_MEDIA = {
    "1.2.840.10008.1.2.5": "image/dicom-rle",
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.92": "image/jpx", "1.2.840.10008.1.2.4.93": "image/jpx",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc",
}


class NotAcceptable(InvalidInput):
    """The client accepts none of the forms the data exists in (HTTP 406)."""


@dataclass(frozen=True)
class WantedSyntaxes:
    """What an Accept header allows for application/dicom parts."""

    named: frozenset[str] = frozenset()  # transfer-syntax=<uid>
    as_stored: bool = False  # transfer-syntax=*, or any media type at all (no Accept, */*)
    default: bool = False  # application/dicom without transfer-syntax: PS3.18's default, Explicit VR LE


AS_STORED = WantedSyntaxes(as_stored=True)


def dicom_transfer_syntaxes(accept: str | None) -> WantedSyntaxes:
    """What an Accept header allows for application/dicom parts.

    Raises NotAcceptable if it allows no application/dicom at all."""
    if not accept or not accept.strip():
        return AS_STORED
    named: set[str] = set()
    acceptable = default = False
    for entry in accept.split(","):
        parts = [p.strip() for p in entry.split(";")]
        main = parts[0].lower()
        params = {k.strip().lower(): v.strip().strip('"') for k, v in (p.split("=", 1) for p in parts[1:] if "=" in p)}
        if main in ("*/*", "multipart/*"):
            return AS_STORED
        if main == "multipart/related" and params.get("type", DICOM).lower() in (DICOM, "*/*", "application/*"):
            acceptable = True
            syntax = params.get("transfer-syntax")
            if syntax == "*":
                return AS_STORED
            if syntax is None:
                default = True
            else:
                named.add(syntax)
        elif main == DICOM:
            raise NotAcceptable('WADO-RS answers as multipart/related; ask with Accept: multipart/related; '
                                'type="application/dicom"')
    if not acceptable:
        raise NotAcceptable('nothing acceptable: instances come as multipart/related; type="application/dicom"')
    return WantedSyntaxes(frozenset(named), default=default)


def answer_syntax(stored: str, wanted: WantedSyntaxes, unconvertible: str | None) -> str:
    """The transfer syntax an instance stored in ``stored`` goes out in; NotAcceptable naming what is available.

    ``unconvertible`` is why the instance cannot be made Explicit VR Little Endian (None if it can).
    Uncompressed little endian goes out as stored where the default was asked: decoding it changes nothing."""
    if wanted.as_stored or stored in wanted.named or (wanted.default and stored in NATIVE_LITTLE_ENDIAN):
        return stored
    if (wanted.default or EXPLICIT_VR_LITTLE_ENDIAN in wanted.named) and unconvertible is None:
        return EXPLICIT_VR_LITTLE_ENDIAN
    asked = ", ".join(sorted(wanted.named | ({EXPLICIT_VR_LITTLE_ENDIAN} if wanted.default else set())))
    available = f"as stored (transfer-syntax={stored} or transfer-syntax=*)" if stored else "as stored (transfer-syntax=*)"
    if unconvertible is None:
        available += f" or as Explicit VR Little Endian (transfer-syntax={EXPLICIT_VR_LITTLE_ENDIAN})"
        raise NotAcceptable(f"an instance stored as {stored} cannot be sent in {asked}; available: {available}")
    raise NotAcceptable(f"an instance stored as {stored or 'an unknown transfer syntax'} cannot be sent in {asked} "
                        f"(it cannot be converted: {unconvertible}); available: {available}")


def frame_media_type(syntax: str, encapsulated: bool, accept: str) -> str:
    """The media type frames in this transfer syntax go out as; NotAcceptable if the client takes none of it.

    Native frames are raw bytes (application/octet-stream), whatever was asked."""
    if not encapsulated:
        return OCTET_STREAM
    media = FRAME_MEDIA.get(syntax, OCTET_STREAM)
    wanted = _accepted_types(accept)
    if wanted and media not in wanted and "*/*" not in wanted:
        raise NotAcceptable(f"the frames are stored as {media} ({syntax}) and mi2b2 does not transcode; "
                            f'ask with Accept: multipart/related; type="{media}"')
    return media


def _accepted_types(accept: str) -> set[str]:
    """The ``type`` parameters of multipart/related media ranges in an Accept header (``*/*`` for anything)."""
    types: set[str] = set()
    for entry in accept.split(","):
        parts = [p.strip() for p in entry.split(";")]
        main = parts[0].lower()
        if main in ("*/*", "multipart/*"):
            types.add("*/*")
            continue
        if main != "multipart/related":
            continue
        params = dict(p.split("=", 1) for p in parts[1:] if "=" in p)
        types.add(params.get("type", "*/*").strip('"').lower())
    return types
