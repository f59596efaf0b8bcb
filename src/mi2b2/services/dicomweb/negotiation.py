"""Content negotiation for WADO-RS (PS3.18 8.7): what an Accept header allows, against what is stored.

mi2b2 sends files and frames exactly as stored, never transcoded: a client that
insists on a form the data is not in gets 406 with the reason.
"""

from __future__ import annotations

from collections.abc import Iterable

from mi2b2.errors import InvalidInput

DICOM = "application/dicom"
OCTET_STREAM = "application/octet-stream"

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


def dicom_transfer_syntaxes(accept: str | None) -> frozenset[str] | None:
    """What an Accept header allows for application/dicom parts: None = anything (as stored).

    Raises NotAcceptable if it allows no application/dicom at all."""
    if not accept or not accept.strip():
        return None
    allowed: set[str] = set()
    acceptable = False
    for entry in accept.split(","):
        parts = [p.strip() for p in entry.split(";")]
        main = parts[0].lower()
        params = {k.strip().lower(): v.strip().strip('"') for k, v in (p.split("=", 1) for p in parts[1:] if "=" in p)}
        if main in ("*/*", "multipart/*") or (main == "multipart/related" and params.get("type", DICOM).lower()
                                               in (DICOM, "*/*", "application/*")):
            acceptable = True
            syntax = params.get("transfer-syntax")
            if syntax is None or syntax == "*":
                return None
            allowed.add(syntax)
        elif main == DICOM:
            raise NotAcceptable('WADO-RS answers as multipart/related; ask with Accept: multipart/related; '
                                'type="application/dicom"')
    if not acceptable:
        raise NotAcceptable('nothing acceptable: instances come as multipart/related; type="application/dicom"')
    return frozenset(allowed)


def require_stored_syntaxes_allowed(stored: Iterable[str], allowed: frozenset[str] | None) -> None:
    """NotAcceptable unless every stored transfer syntax is one the client allowed (None allows all)."""
    if allowed is None:
        return
    missing = sorted(s for s in set(stored) if s not in allowed)
    if missing:
        raise NotAcceptable(
            f"these files are stored as {', '.join(missing)} and mi2b2 sends files as stored; "
            'ask with transfer-syntax=* (Accept: multipart/related; type="application/dicom"; '
            "transfer-syntax=*)")


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
