"""Pixel data to PNG: decode one frame, apply the Modality LUT, window it, encode it.

Pure functions over a pydicom ``Dataset`` (or the bytes/path of a Part 10
file): no database, no audit, nothing written anywhere. The viewer service and
``mi2b2 view`` call them; unit tests drive them with pydicom's sample files.

Order of operations, as PS3.3 C.11 defines the greyscale pipeline:
stored values -> Modality LUT (RescaleSlope/Intercept, or a Modality LUT
Sequence) -> VOI (window centre/width) -> Presentation (MONOCHROME1 and an
INVERSE presentation LUT shape flip black and white). Colour images (RGB, the
YBR family converted to RGB by pydicom, PALETTE COLOR through its palette) are
shown as they are: windowing is a greyscale operation.

Decoding uses pydicom's pixel handlers with the pylibjpeg plugins, which cover
uncompressed (little and big endian, deflated), RLE, JPEG baseline/extended
(8 and 12 bit), JPEG lossless, JPEG-LS and JPEG 2000. What they cannot decode
raises ``UnrenderableImage`` with the transfer syntax named.
"""

from __future__ import annotations

import io
import math
import struct
import threading
import warnings
from collections import OrderedDict
from collections.abc import Hashable, Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut
from pydicom.pixels.utils import pixel_array
from pydicom.uid import UID

from mi2b2.errors import InvalidInput, NotFound

Source = Dataset | bytes | bytearray | memoryview | str | Path | BinaryIO


class UnrenderableImage(InvalidInput):
    """The instance has pixel data this viewer cannot decode or show."""


class NoImage(InvalidInput):
    """The instance carries no pixel data at all (a report, a presentation state, ...)."""


@dataclass(frozen=True)
class Window:
    center: float
    width: float

    def as_dict(self) -> dict[str, float]:
        return {"center": _tidy(self.center), "width": _tidy(self.width)}


@dataclass(frozen=True)
class Preset:
    key: str
    label: str
    window: Window


# Common CT windows in Hounsfield units (centre, width). They are plain numbers,
# so they apply to any greyscale image, but only mean anything on CT.
PRESETS: dict[str, Preset] = {p.key: p for p in (
    Preset("brain", "Brain", Window(40, 80)),
    Preset("subdural", "Subdural", Window(75, 215)),
    Preset("stroke", "Stroke", Window(32, 8)),
    Preset("soft_tissue", "Soft tissue", Window(50, 400)),
    Preset("abdomen", "Abdomen", Window(60, 400)),
    Preset("liver", "Liver", Window(30, 150)),
    Preset("mediastinum", "Mediastinum", Window(50, 350)),
    Preset("lung", "Lung", Window(-600, 1500)),
    Preset("bone", "Bone", Window(400, 1800)),
    Preset("temporal_bone", "Temporal bone", Window(600, 2800)),
)}

VOI_FUNCTIONS = ("LINEAR", "LINEAR_EXACT", "SIGMOID")


@dataclass(frozen=True)
class Frame:
    """One decoded frame, ready to be windowed again and again without decoding.

    ``pixels`` is float32 after the Modality LUT for greyscale (rows, columns),
    uint8 RGB for colour (rows, columns, 3)."""

    pixels: np.ndarray
    colour: bool
    invert: bool
    file_window: Window | None
    voi_function: str
    frame_count: int

    @property
    def rows(self) -> int:
        return int(self.pixels.shape[0])

    @property
    def columns(self) -> int:
        return int(self.pixels.shape[1])

    @property
    def nbytes(self) -> int:
        return int(self.pixels.nbytes)

    def default_window(self) -> Window | None:
        """The file's own window, else one spanning the frame's values; None for colour."""
        if self.colour:
            return None
        if self.file_window is not None:
            return self.file_window
        low, high = float(np.min(self.pixels)), float(np.max(self.pixels))
        return Window((low + high) / 2, max(high - low, 1.0))


@dataclass(frozen=True)
class Rendered:
    png: bytes
    rows: int
    columns: int
    mode: str  # "L" or "RGB"
    window: Window | None  # what was applied; None for colour images
    frame_count: int


class _QuietThreads:
    """A warnings filter entry's message pattern that matches only in threads inside `quiet()`.

    ``warnings.catch_warnings`` swaps the process-wide filter list, so threads
    using it at once leave one another's filters behind and it needed a global
    lock, which made every viewer decode wait for the one before. This entry
    stays in the list and asks a thread-local depth instead: each thread
    silences only its own warnings, and decodes run side by side."""

    def __init__(self) -> None:
        self._local = threading.local()

    def match(self, _message: str) -> bool:  # what the warnings module calls on a filter's message pattern
        return bool(getattr(self._local, "depth", 0))

    def enter(self) -> None:
        self._local.depth = getattr(self._local, "depth", 0) + 1

    def leave(self) -> None:
        self._local.depth -= 1


_QUIET_THREADS = _QuietThreads()
_QUIET_FILTER = ("ignore", _QUIET_THREADS, Warning, None, 0)
_FILTER_PLACING = threading.Lock()


def _quiet_filter_first() -> None:
    """Keep our entry first: a test runner or a ``catch_warnings`` block elsewhere replaces the
    list (ours goes back in front on the next use) or adds entries in front of it."""
    filters = cast("list[Any]", warnings.filters)
    if filters and filters[0] is _QUIET_FILTER:
        return
    with _FILTER_PLACING:
        filters = cast("list[Any]", warnings.filters)
        if filters and filters[0] is _QUIET_FILTER:
            return
        with suppress(ValueError):
            filters.remove(_QUIET_FILTER)
        filters.insert(0, _QUIET_FILTER)


@contextmanager
def quiet() -> Iterator[None]:
    """Silence pydicom's warnings about odd files while reading and decoding, in this thread only.

    They quote element values (a malformed PatientName included) and would
    carry patient data into ordinary logs."""
    _quiet_filter_first()
    _QUIET_THREADS.enter()
    try:
        yield
    finally:
        _QUIET_THREADS.leave()


# --- reading ----------------------------------------------------------------------------


def read_dataset(source: Source, stop_before_pixels: bool = False, defer_size: str | None = None) -> Dataset:
    """A dataset from a Dataset, Part 10 bytes, a path or an open binary file.

    ``defer_size`` leaves values that large unread (their presence is known)."""
    if isinstance(source, Dataset):
        return source
    try:
        with quiet():
            if isinstance(source, bytes | bytearray | memoryview):
                source = io.BytesIO(bytes(source))
            return dcmread(source, stop_before_pixels=stop_before_pixels, defer_size=defer_size)
    except (InvalidDicomError, OSError, EOFError, ValueError, KeyError, TypeError, struct.error) as exc:
        raise UnrenderableImage(f"not a readable DICOM file ({type(exc).__name__})") from None


def frame_count(ds: Dataset) -> int:
    try:
        return max(int(str(ds.get("NumberOfFrames", 1) or 1)), 1)
    except ValueError:
        return 1


def has_pixels(ds: Dataset) -> bool:
    return any(tag in ds for tag in (0x7FE00010, 0x7FE00008, 0x7FE00009))


# --- decoding ---------------------------------------------------------------------------


def decode_frame(source: Source, index: int = 0) -> Frame:
    """Decode frame ``index`` (0-based) of an image; only that frame is decoded.

    Raises NoImage without pixel data, NotFound for a frame past the end,
    UnrenderableImage when the pixel data cannot be decoded or shown."""
    with quiet():
        return _decode(read_dataset(source), index)


def _decode(ds: Dataset, index: int) -> Frame:
    if not has_pixels(ds):
        raise NoImage("this instance has no pixel data (it is not an image); its tags can still be shown")
    frames = frame_count(ds)
    if not 0 <= index < frames:
        raise NotFound(f"frame {index + 1} does not exist: this image has {frames} frame{'s' if frames != 1 else ''}")
    try:
        raw = pixel_array(ds, index=index)
    except (RuntimeError, ValueError, NotImplementedError, AttributeError, KeyError, TypeError, IndexError) as exc:
        raise UnrenderableImage(
            f"this image's pixel data ({_transfer_syntax(ds)}) could not be decoded ({type(exc).__name__}); "
            "download the study and open it in a DICOM workstation"
        ) from None
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).strip().upper()
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    if raw.ndim == 3 and raw.shape[-1] == 1:
        raw = raw[..., 0]
    if photometric == "PALETTE COLOR" and samples == 1:
        return _colour_frame(_palette(raw, ds), ds, frames)
    if samples == 3 or raw.ndim == 3:
        # pydicom already converts YBR_FULL, YBR_FULL_422, YBR_ICT/RCT to RGB while decoding.
        return _colour_frame(raw, ds, frames)
    if raw.ndim != 2:
        raise UnrenderableImage(f"unexpected pixel layout {raw.shape} for a {photometric} image")
    values = _modality(raw, ds, index)
    invert = photometric == "MONOCHROME1"
    if str(ds.get("PresentationLUTShape", "")).strip().upper() == "INVERSE":
        invert = not invert
    function = str(_voi_attribute(ds, index, "VOILUTFunction") or "LINEAR").strip().upper()
    return Frame(values, colour=False, invert=invert, file_window=_file_window(ds, index),
                 voi_function=function if function in VOI_FUNCTIONS else "LINEAR", frame_count=frames)


def _transfer_syntax(ds: Dataset) -> str:
    meta = getattr(ds, "file_meta", None)
    uid = meta.get("TransferSyntaxUID") if meta is not None else None
    if not uid:
        return "unknown transfer syntax"
    return f"{UID(uid).name} {uid}" if UID(uid).is_transfer_syntax else str(uid)


def _palette(raw: np.ndarray, ds: Dataset) -> np.ndarray:
    try:
        return np.asarray(apply_color_lut(raw, ds))
    except (ValueError, AttributeError, KeyError, IndexError) as exc:
        raise UnrenderableImage(f"this PALETTE COLOR image has an unusable palette ({type(exc).__name__})") from None


def _colour_frame(rgb: np.ndarray, ds: Dataset, frames: int) -> Frame:
    if rgb.dtype != np.uint8:
        # Scale to 8 bits from the bits that carry data (palettes are 16-bit entries).
        bits = int(ds.get("BitsStored", 0) or 0) if str(ds.get("PhotometricInterpretation", "")) != "PALETTE COLOR" else 16
        bits = bits or rgb.dtype.itemsize * 8
        shift = max(bits - 8, 0)
        rgb = np.clip(rgb.astype(np.int64) >> shift, 0, 255).astype(np.uint8)
    return Frame(np.ascontiguousarray(rgb), colour=True, invert=False, file_window=None, voi_function="LINEAR",
                 frame_count=frames)


def _functional(ds: Dataset, index: int, sequence: str) -> Dataset | None:
    """An item of a functional group macro for this frame (enhanced multi-frame objects), per-frame first."""
    for groups, position in (("PerFrameFunctionalGroupsSequence", index), ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items is None or len(items) <= position:
            continue
        inner = items[position].get(sequence)
        if inner:
            item: Dataset = inner[0]
            return item
    return None


def _voi_attribute(ds: Dataset, index: int, keyword: str) -> Any:
    if keyword in ds:
        return ds.get(keyword)
    item = _functional(ds, index, "FrameVOILUTSequence")
    return item.get(keyword) if item is not None else None


def _modality(raw: np.ndarray, ds: Dataset, index: int) -> np.ndarray:
    if "ModalityLUTSequence" in ds:
        try:
            return np.asarray(apply_modality_lut(raw, ds), dtype=np.float32)
        except (ValueError, AttributeError, KeyError, IndexError):
            pass  # a broken Modality LUT: show the stored values rather than nothing
    source: Dataset = ds
    if "RescaleSlope" not in ds and "RescaleIntercept" not in ds:
        source = _functional(ds, index, "PixelValueTransformationSequence") or ds
    slope = _number(source.get("RescaleSlope"), 1.0) or 1.0
    intercept = _number(source.get("RescaleIntercept"), 0.0)
    values = raw.astype(np.float32)
    if slope != 1.0:
        values *= np.float32(slope)
    if intercept != 0.0:
        values += np.float32(intercept)
    return values


def _file_window(ds: Dataset, index: int) -> Window | None:
    center = _number(_voi_attribute(ds, index, "WindowCenter"), None)
    width = _number(_voi_attribute(ds, index, "WindowWidth"), None)
    if center is None or width is None or width <= 0:
        return None
    return Window(center, width)


def _number(value: Any, default: float | None) -> Any:
    """First value of a DS/IS element (multi-valued windows list alternatives; the first is the default)."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None or value == "":
        return default
    try:
        number = float(value)
    except (TypeError, ValueError):
        return default
    return number if math.isfinite(number) else default


# --- windowing and encoding -----------------------------------------------------------------


def choose_window(frame: Frame, center: float | None = None, width: float | None = None,
                  preset: str | None = None) -> Window | None:
    """Explicit centre/width win over a preset, a preset over the default; a missing half comes from below."""
    if frame.colour:
        return None
    base = frame.default_window()
    assert base is not None
    if preset:
        key = preset.strip().lower().replace(" ", "_").replace("-", "_")
        if key not in PRESETS:
            raise InvalidInput(f"unknown window preset {preset!r}; use one of {', '.join(PRESETS)}")
        base = PRESETS[key].window
    for name, value in (("center", center), ("width", width)):
        if value is not None and not math.isfinite(value):
            raise InvalidInput(f"window {name} must be a finite number")
    if width is not None and width <= 0:
        raise InvalidInput("window width must be greater than 0")
    return Window(base.center if center is None else center, base.width if width is None else width)


def apply_window(frame: Frame, window: Window | None) -> np.ndarray:
    """8-bit display values (PS3.3 C.11.2.1.2: LINEAR, LINEAR_EXACT, SIGMOID), inverted for MONOCHROME1."""
    if frame.colour or window is None:
        return frame.pixels
    x = frame.pixels
    c, w = np.float32(window.center), np.float32(window.width)
    if frame.voi_function == "SIGMOID":
        y = 255.0 / (1.0 + np.exp(np.clip(-4.0 * (x - c) / w, -80, 80)))
    elif frame.voi_function == "LINEAR_EXACT":
        y = ((x - c) / w + 0.5) * 255.0
    elif w <= 1:
        y = np.where(x > c - 0.5, np.float32(255), np.float32(0))
    else:
        y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255.0
    out: np.ndarray = np.clip(np.rint(y), 0, 255).astype(np.uint8)
    return 255 - out if frame.invert else out


def encode_png(pixels: np.ndarray) -> bytes:
    """PNG with light compression: these go to a browser on the next request, so speed beats size."""
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(pixels)).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def render_frame(frame: Frame, center: float | None = None, width: float | None = None,
                 preset: str | None = None) -> Rendered:
    window = choose_window(frame, center, width, preset)
    pixels = apply_window(frame, window)
    return Rendered(encode_png(pixels), frame.rows, frame.columns, "RGB" if frame.colour else "L", window,
                    frame.frame_count)


def render_png(source: Source, index: int = 0, center: float | None = None, width: float | None = None,
               preset: str | None = None) -> Rendered:
    """Decode frame ``index`` (0-based) of ``source`` and render it as PNG in one call."""
    return render_frame(decode_frame(source, index), center, width, preset)


# --- the tags panel -----------------------------------------------------------------------

# What a radiologist looks for first, in reading order; everything else is a
# download away. Patient identifiers are included: the viewer shows them to
# members of the project, in a response body, never in a URL or a log.
TAG_PANEL = (
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "PatientAge",
    "StudyDate", "StudyTime", "AccessionNumber", "StudyDescription", "StudyID", "InstitutionName",
    "Modality", "Manufacturer", "ManufacturerModelName", "BodyPartExamined", "ProtocolName",
    "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
    "InstanceNumber", "AcquisitionNumber", "AcquisitionDate", "AcquisitionTime", "ContentDate", "ContentTime",
    "ImageType", "PatientPosition", "ImagePositionPatient", "ImageOrientationPatient", "SliceLocation",
    "SliceThickness", "SpacingBetweenSlices", "PixelSpacing", "ImagerPixelSpacing",
    "KVP", "XRayTubeCurrent", "Exposure", "ConvolutionKernel", "ContrastBolusAgent",
    "ScanningSequence", "SequenceName", "RepetitionTime", "EchoTime", "InversionTime", "FlipAngle",
    "MagneticFieldStrength",
    "Rows", "Columns", "NumberOfFrames", "SamplesPerPixel", "PhotometricInterpretation",
    "BitsAllocated", "BitsStored", "HighBit", "PixelRepresentation",
    "WindowCenter", "WindowWidth", "WindowCenterWidthExplanation", "VOILUTFunction",
    "RescaleIntercept", "RescaleSlope", "RescaleType",
    "LossyImageCompression", "LossyImageCompressionRatio", "LossyImageCompressionMethod",
    "SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID", "FrameOfReferenceUID",
)
MAX_VALUE = 200


def describe(source: Source) -> dict[str, Any]:
    """The tags panel: curated tags with values, and what a viewer needs to know about the image."""
    with quiet():
        ds = read_dataset(source, defer_size="64 KB")  # the pixel data is seen, not read
        tags = []
        for keyword in TAG_PANEL:
            element = ds.data_element(keyword) if keyword in ds else None
            if element is None or element.VR == "SQ" or element.value in (None, ""):
                continue
            tags.append({"tag": f"({element.tag.group:04X},{element.tag.element:04X})", "keyword": keyword,
                         "name": element.name, "value": _text(element.value)})
        meta = getattr(ds, "file_meta", None)
        syntax = str(meta.get("TransferSyntaxUID", "")) if meta is not None else ""
        sop_class = str(ds.get("SOPClassUID", "") or (meta.get("MediaStorageSOPClassUID", "") if meta else ""))
        window = _file_window(ds, 0)
    return {
        "tags": tags,
        "image": {
            "frames": frame_count(ds),
            "rows": _int_or_none(ds.get("Rows")),
            "columns": _int_or_none(ds.get("Columns")),
            "samples_per_pixel": _int_or_none(ds.get("SamplesPerPixel")),
            "photometric": str(ds.get("PhotometricInterpretation", "") or ""),
            "bits_allocated": _int_or_none(ds.get("BitsAllocated")),
            "bits_stored": _int_or_none(ds.get("BitsStored")),
            "signed": ds.get("PixelRepresentation") == 1,
            "transfer_syntax_uid": syntax,
            "transfer_syntax": UID(syntax).name if syntax else "",
            "sop_class_uid": sop_class,
            "sop_class": UID(sop_class).name if sop_class else "",
            "has_pixels": has_pixels(ds),
            "file_window": window.as_dict() if window else None,
        },
    }


def _text(value: Any) -> str:
    if isinstance(value, MultiValue | list | tuple):
        text = "\\".join(str(v) for v in value)
    elif isinstance(value, bytes):
        text = f"<{len(value)} bytes>"
    else:
        text = str(value)
    return text if len(text) <= MAX_VALUE else text[: MAX_VALUE - 1] + "…"


def _int_or_none(value: Any) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


# --- a small memory of decoded frames ---------------------------------------------------------


class FrameCache:
    """Recently decoded frames, bounded by bytes, shared by the threads of one process.

    Dragging the window re-renders one frame many times a second; decoding a
    JPEG 2000 frame each time would make that crawl. Only memory: nothing here
    ever reaches the disk."""

    def __init__(self, max_bytes: int = 256 * 1024 * 1024) -> None:
        self.max_bytes = max_bytes
        self._frames: OrderedDict[Hashable, Frame] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()

    def get(self, key: Hashable) -> Frame | None:
        with self._lock:
            frame = self._frames.get(key)
            if frame is not None:
                self._frames.move_to_end(key)
            return frame

    def put(self, key: Hashable, frame: Frame) -> None:
        if frame.nbytes > self.max_bytes:
            return
        with self._lock:
            old = self._frames.pop(key, None)
            if old is not None:
                self._bytes -= old.nbytes
            self._frames[key] = frame
            self._bytes += frame.nbytes
            while self._bytes > self.max_bytes and self._frames:
                _, dropped = self._frames.popitem(last=False)
                self._bytes -= dropped.nbytes

    def clear(self) -> None:
        with self._lock:
            self._frames.clear()
            self._bytes = 0


def _tidy(value: float) -> float | int:
    return int(value) if float(value).is_integer() else round(float(value), 4)
