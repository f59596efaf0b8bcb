"""Frames out of a stored instance, exactly as stored: compressed frames from their fragments,
native frames cut from the pixel data. Never decoded (the viewer's renderer does that)."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import get_frame
from pydicom.uid import UID

from mi2b2.adapters.dicom.render import frame_count, quiet
from mi2b2.errors import InvalidInput, NotFound


def transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    return str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""


def is_encapsulated(ds: Dataset) -> bool:
    syntax = transfer_syntax(ds)
    return bool(syntax) and UID(syntax).is_encapsulated


@dataclass(frozen=True)
class StoredFrames:
    """An instance's pixel data, read whole, and what is needed to cut frames out of it."""

    dataset: Dataset
    count: int
    transfer_syntax: str
    encapsulated: bool

    def frame(self, number: int) -> bytes:
        """Frame ``number`` (from 1) as stored; InvalidInput if it cannot be cut out."""
        with quiet():
            return self._frame(number - 1)

    def stream(self, numbers: list[int]) -> Iterator[bytes]:
        """One frame in memory at a time, however many are named."""
        for number in numbers:
            yield self.frame(number)

    def _frame(self, index: int) -> bytes:
        ds = self.dataset
        data = ds.PixelData
        if self.encapsulated:
            try:
                return bytes(get_frame(data, index, number_of_frames=self.count))
            except (ValueError, IndexError, KeyError) as exc:
                raise InvalidInput(f"frame {index + 1} cannot be extracted ({type(exc).__name__})") from None
        bits = int(ds.get("BitsAllocated", 8) or 8)
        length_bits = int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * bits
        if length_bits % 8:
            raise InvalidInput("frames of 1-bit images that do not end on a byte cannot be sent separately; "
                               "retrieve the whole instance")
        length = length_bits // 8
        chunk = data[index * length:(index + 1) * length]
        if len(chunk) != length:
            raise InvalidInput(f"frame {index + 1} is truncated in the stored file")
        return bytes(chunk)


def read_frames(path: Path, sop_uid: str) -> StoredFrames:
    """The stored instance at ``path``; InvalidInput if it cannot be read, NotFound if it has no pixel data."""
    with quiet():
        try:
            ds = dcmread(path)
        except Exception as exc:  # a damaged file: say so rather than fail obscurely
            raise InvalidInput(f"image {sop_uid} cannot be read ({type(exc).__name__})") from None
    if "PixelData" not in ds:
        raise NotFound(f"instance {sop_uid} has no pixel data, so no frames")
    return StoredFrames(ds, frame_count(ds), transfer_syntax(ds), is_encapsulated(ds))
