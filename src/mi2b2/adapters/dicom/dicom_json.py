"""DICOM JSON (PS3.18 F.2) for DICOMweb answers: search results built from what the index knows
plus a file's header for the rest, and instance metadata with a pointer to the pixel data."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from pydicom import dcmread
from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset

from mi2b2.adapters.dicom.files import parse_instance_header
from mi2b2.adapters.dicom.frames import is_encapsulated, transfer_syntax
from mi2b2.adapters.dicom.render import frame_count, quiet

LOG = logging.getLogger(__name__)

MAX_INLINE_BINARY = 1024  # bytes of a binary value a search answer carries (metadata carries all)


class Described(Protocol):
    """Something a search answers with: attributes known from the index, its header for the rest."""

    @property
    def known(self) -> Mapping[str, Any]: ...
    @property
    def url(self) -> str: ...
    def header(self) -> Dataset | None: ...


def read_header(path: Path) -> Dataset | None:
    """A stored file's attributes short of its pixel data; None (logged, without values) if unreadable."""
    try:
        with quiet():
            return dcmread(path, stop_before_pixels=True)
    except Exception as exc:  # pydicom on a damaged file can raise nearly anything; answer without it
        LOG.warning("cannot read the header of a cached file (%s); answering from the index", type(exc).__name__)
        return None


def stored_transfer_syntax(path: Path) -> str:
    """The transfer syntax a cached file is stored in ("" if it cannot be told)."""
    try:
        with open(path, "rb") as file:
            header = parse_instance_header(file.read(64 * 1024))
    except OSError:
        return ""
    if header is not None:
        return header.transfer_syntax
    found = read_header(path)
    return transfer_syntax(found) if found is not None else ""


def search_json(item: Described, keywords: Sequence[str], include_all: bool,
                extra: Sequence[str] = ()) -> dict[str, Any]:
    """The named attributes (empty where unknown), and with ``include_all`` every other header attribute."""
    with quiet():
        return _dataset(item, keywords, include_all, extra).to_json_dict(suppress_invalid_tags=True)


def metadata_json(header: Dataset, instance_url: str) -> dict[str, Any]:
    """An instance's whole header; its pixel data, left out, is pointed at as its frames."""
    with quiet():
        item: dict[str, Any] = header.to_json_dict(suppress_invalid_tags=True)
        frames = frame_count(header)
    if "Rows" in header:
        item["7FE00010"] = {"vr": "OB" if is_encapsulated(header) else "OW",
                            "BulkDataURI": f"{instance_url}/frames/{','.join(str(n) for n in range(1, frames + 1))}"}
    return item


def _dataset(item: Described, keywords: Sequence[str], include_all: bool, extra: Sequence[str]) -> Dataset:
    ds = Dataset()
    wanted = list(dict.fromkeys([*keywords, *extra]))
    for keyword in wanted:
        if keyword == "RetrieveURL":
            ds.RetrieveURL = item.url
        elif keyword in item.known:
            value = item.known[keyword]
            if keyword == "ModalitiesInStudy":
                value = [v for v in str(value).split("\\") if v] if value else []
            setattr(ds, keyword, value)
        else:
            element = _element(item, keyword)
            if element is not None and not _bulky(element):
                ds.add(element)
            else:
                ds.add_new(keyword, dictionary_VR(keyword), None)  # an empty attribute: asked for, not known
    if include_all and (header := item.header()) is not None:
        for element in header:
            if element.tag not in ds and element.tag.group != 0x0002 and not _bulky(element):
                ds.add(element)
    return ds


def _element(item: Described, keyword: str) -> DataElement | None:
    header = item.header()
    if header is None or keyword not in header:
        return None
    return header[keyword]


def _bulky(element: DataElement) -> bool:
    """Binary values over MAX_INLINE_BINARY stay out of search answers (metadata has them)."""
    return element.VR in ("OB", "OD", "OF", "OL", "OV", "OW", "UN") and len(element.value or b"") > MAX_INLINE_BINARY
