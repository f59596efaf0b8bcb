"""Rendering pixel data to PNG, on pydicom's bundled sample files (every format the viewer promises)."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from pydicom import dcmread
from pydicom.data import get_testdata_file

from mi2b2.adapters.dicom.render import (
    PRESETS,
    Frame,
    FrameCache,
    NoImage,
    UnrenderableImage,
    Window,
    apply_window,
    decode_frame,
    describe,
    render_frame,
    render_png,
)
from mi2b2.errors import InvalidInput, NotFound


def sample(name: str) -> str:
    path = get_testdata_file(name)  # bundled with pydicom: never downloaded
    assert path is not None, f"pydicom no longer bundles {name}"
    return str(path)


def pixels(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


# (file, columns, rows, PNG mode, frames): each a different pixel format.
FORMATS = [
    ("MR_small.dcm", 64, 64, "L", 1),  # 16-bit signed, uncompressed, window in the file
    ("CT_small.dcm", 128, 128, "L", 1),  # 16-bit signed CT with RescaleIntercept, no window
    ("MR_small_bigendian.dcm", 64, 64, "L", 1),  # explicit VR big endian
    ("MR_small_RLE.dcm", 64, 64, "L", 1),  # RLE lossless, greyscale
    ("MR_small_jp2klossless.dcm", 64, 64, "L", 1),  # JPEG 2000 lossless
    ("JPEG2000.dcm", 256, 1024, "L", 1),  # JPEG 2000
    ("693_J2KI.dcm", 512, 512, "L", 1),  # JPEG 2000 lossy, 14 of 16 bits, CT
    ("MR_small_jpeg_ls_lossless.dcm", 64, 64, "L", 1),  # JPEG-LS lossless
    ("JPGExtended.dcm", 256, 1024, "L", 1),  # JPEG extended, 12-bit
    ("JPEGLSNearLossless_08.dcm", 10, 45, "L", 1),  # 8-bit greyscale
    ("image_dfl.dcm", 512, 512, "L", 1),  # deflated explicit VR, 8-bit
    ("liver_1frame.dcm", 512, 512, "L", 1),  # 1-bit segmentation
    ("rtdose.dcm", 10, 10, "L", 15),  # 32-bit, multi-frame
    ("SC_rgb_jpeg_gdcm.dcm", 100, 100, "RGB", 1),  # JPEG lossless (process 14), RGB
    ("SC_rgb_jpeg_dcmtk.dcm", 100, 100, "RGB", 1),  # JPEG baseline, YBR_FULL
    ("SC_rgb_dcmtk_+eb+cy+np.dcm", 100, 100, "RGB", 1),  # JPEG baseline, YBR_FULL_422
    ("SC_ybr_full_422_uncompressed.dcm", 100, 100, "RGB", 1),  # uncompressed YBR_FULL_422
    ("SC_rgb_rle.dcm", 100, 100, "RGB", 1),  # RLE, RGB
    ("SC_rgb_rle_16bit.dcm", 100, 100, "RGB", 1),  # 16-bit RGB
    ("SC_rgb_rle_2frame.dcm", 100, 100, "RGB", 2),  # multi-frame RGB
    ("SC_rgb_small_odd.dcm", 3, 3, "RGB", 1),  # odd size, uncompressed RGB
    ("examples_ybr_color.dcm", 320, 240, "RGB", 30),  # multi-frame JPEG baseline YBR_FULL_422 (ultrasound)
    ("examples_palette.dcm", 800, 350, "RGB", 1),  # PALETTE COLOR
]


@pytest.mark.parametrize(("name", "columns", "rows", "mode", "frames"), FORMATS, ids=[f[0] for f in FORMATS])
def test_each_pixel_format_renders_as_a_png_of_the_right_size_and_mode(
    name: str, columns: int, rows: int, mode: str, frames: int
) -> None:
    rendered = render_png(sample(name), index=frames - 1)
    image = Image.open(io.BytesIO(rendered.png))
    assert image.format == "PNG"
    assert image.size == (columns, rows)
    assert image.mode == mode
    assert (rendered.columns, rendered.rows, rendered.mode, rendered.frame_count) == (columns, rows, mode, frames)
    assert (rendered.window is None) == (mode == "RGB")
    assert np.ptp(pixels(rendered.png)) > 0, "a blank image means the window or the decoding is wrong"


@pytest.mark.parametrize("name", ["MR_small.dcm", "CT_small.dcm", "JPEG2000.dcm", "JPGExtended.dcm", "rtdose.dcm"])
def test_window_changes_change_the_output(name: str) -> None:
    default = render_png(sample(name))
    assert default.window is not None
    narrow = render_png(sample(name), center=default.window.center, width=default.window.width / 8)
    shifted = render_png(sample(name), center=default.window.center + default.window.width / 4)
    assert narrow.window == Window(default.window.center, default.window.width / 8)
    assert shifted.window is not None and shifted.window.width == default.window.width  # the other half is kept
    base = pixels(default.png).astype(int)
    assert not np.array_equal(base, pixels(narrow.png))
    assert not np.array_equal(base, pixels(shifted.png))
    # A narrower window around the same centre pushes more pixels to black or white.
    saturated = lambda a: int(np.sum((a == 0) | (a == 255)))  # noqa: E731
    assert saturated(pixels(narrow.png)) > saturated(base)
    assert pixels(shifted.png).mean() < base.mean()  # a higher centre darkens


def test_default_window_is_the_files_else_the_pixel_range() -> None:
    assert render_png(sample("MR_small.dcm")).window == Window(600, 1600)
    ct = dcmread(sample("CT_small.dcm"))
    assert "WindowCenter" not in ct
    values = ct.pixel_array.astype(float) * float(ct.RescaleSlope) + float(ct.RescaleIntercept)
    low, high = values.min(), values.max()
    assert render_png(ct).window == Window((low + high) / 2, high - low)
    assert render_png(sample("693_J2KI.dcm")).window == Window(40, 100)


def test_modality_lut_applies_before_the_window() -> None:
    original = dcmread(sample("MR_small.dcm"))
    shifted = dcmread(sample("MR_small.dcm"))
    shifted.RescaleIntercept = 1000
    shifted.RescaleSlope = 2
    plain = render_png(original, center=600, width=1600)
    rescaled = render_png(shifted, center=600 * 2 + 1000, width=1600 * 2)
    assert np.abs(pixels(plain.png).astype(int) - pixels(rescaled.png).astype(int)).max() <= 1
    # and the window in the file is read in rescaled units, as the standard has it
    assert render_png(shifted).window == Window(600, 1600)


def test_ct_presets_are_hounsfield_windows() -> None:
    ct = dcmread(sample("CT_small.dcm"))
    lung = render_png(ct, preset="lung")
    bone = render_png(ct, preset="Bone")
    assert lung.window == PRESETS["lung"].window == Window(-600, 1500)
    assert bone.window == Window(400, 1800)
    assert not np.array_equal(pixels(lung.png), pixels(bone.png))
    assert render_png(ct, preset="soft tissue").window == PRESETS["soft_tissue"].window
    assert render_png(ct, preset="brain", width=200).window == Window(40, 200)  # explicit beats the preset
    with pytest.raises(InvalidInput, match="unknown window preset 'liverish'; use one of brain"):
        render_png(ct, preset="liverish")
    with pytest.raises(InvalidInput, match="greater than 0"):
        render_png(ct, width=0)


def test_monochrome1_is_inverted() -> None:
    mono2 = dcmread(sample("MR_small.dcm"))
    mono1 = dcmread(sample("MR_small.dcm"))
    mono1.PhotometricInterpretation = "MONOCHROME1"
    dark = pixels(render_png(mono2).png).astype(int)
    light = pixels(render_png(mono1).png).astype(int)
    assert np.array_equal(light, 255 - dark)


def test_signed_values_are_read_as_signed() -> None:
    ds = dcmread(sample("CT_small.dcm"))
    stored = ds.pixel_array.copy()
    stored[0, :8] = -2000  # air below the scanner's range, only representable as signed
    ds.PixelData = stored.astype(np.int16).tobytes()
    frame = decode_frame(ds)
    assert frame.pixels[0, 0] == -2000 - 1024
    out = pixels(render_png(ds, center=0, width=2000).png)
    assert (out[0, :8] == 0).all()


def test_ybr_is_converted_to_rgb() -> None:
    rgb = pixels(render_png(sample("SC_rgb_dcmtk_+eb+cr.dcm")).png).astype(int)  # JPEG baseline of RGB
    for name in ("SC_rgb_dcmtk_+eb+cy+n2.dcm", "SC_rgb_dcmtk_+eb+cy+np.dcm", "SC_ybr_full_422_uncompressed.dcm",
                 "SC_rgb_jpeg_dcmtk.dcm"):
        converted = pixels(render_png(sample(name)).png).astype(int)
        assert np.abs(converted - rgb).mean() < 5, name  # the same picture; only lossy noise differs


def test_multi_frame_renders_each_frame_and_refuses_past_the_end() -> None:
    first = pixels(render_png(sample("examples_ybr_color.dcm"), index=0).png)
    last = pixels(render_png(sample("examples_ybr_color.dcm"), index=29).png)
    assert not np.array_equal(first, last)
    with pytest.raises(NotFound, match="frame 31 does not exist: this image has 30 frames"):
        render_png(sample("examples_ybr_color.dcm"), index=30)


def test_bytes_paths_and_datasets_render_alike() -> None:
    path = Path(sample("MR_small_RLE.dcm"))
    from_path = render_png(path)
    assert render_png(path.read_bytes()).png == from_path.png
    assert render_png(dcmread(path)).png == from_path.png


def test_what_cannot_be_shown_says_why() -> None:
    with pytest.raises(UnrenderableImage, match=r"JPEG Extended \(Process 2 and 4\) 1\.2\.840\.10008\.1\.2\.4\.51"):
        render_png(sample("JPEG-lossy.dcm"))  # a non-conformant 12-bit JPEG stream only GDCM decodes
    with pytest.raises(NoImage, match="no pixel data"):
        render_png(sample("test-SR.dcm"))
    with pytest.raises(UnrenderableImage, match="not a readable DICOM file"):
        render_png(b"certainly not DICOM")


def test_linear_window_follows_the_standard_formula() -> None:
    values = np.array([[-1, 0, 49, 50, 51, 100, 101]], dtype=np.float32)
    frame = Frame(values, colour=False, invert=False, file_window=None, voi_function="LINEAR", frame_count=1)
    out = apply_window(frame, Window(50, 101))
    expected = np.clip(np.rint(((values - 49.5) / 100 + 0.5) * 255), 0, 255)
    assert out.tolist() == expected.astype(np.uint8).tolist()
    assert apply_window(frame, Window(50, 1)).tolist() == [[0, 0, 0, 255, 255, 255, 255]]
    sigmoid = Frame(values, False, False, None, "SIGMOID", 1)
    assert apply_window(sigmoid, Window(50, 100))[0, 3] == 128


def test_tags_panel_lists_common_tags_and_image_facts() -> None:
    described = describe(sample("JPEG2000.dcm"))
    image = described["image"]
    assert image["frames"] == 1 and (image["rows"], image["columns"]) == (1024, 256)
    assert image["transfer_syntax_uid"] == "1.2.840.10008.1.2.4.91"
    assert image["transfer_syntax"] == "JPEG 2000 Image Compression"
    assert image["has_pixels"] is True and image["signed"] is True
    keywords = {t["keyword"]: t for t in described["tags"]}
    assert {"PatientName", "Modality", "Rows", "SOPInstanceUID"} <= set(keywords)
    assert keywords["Rows"]["tag"] == "(0028,0010)" and keywords["Rows"]["value"] == "1024"
    mr = describe(sample("MR_small.dcm"))
    assert mr["image"]["file_window"] == {"center": 600, "width": 1600}
    assert describe(sample("test-SR.dcm"))["image"]["has_pixels"] is False


def test_frame_cache_is_bounded_by_bytes() -> None:
    cache = FrameCache(max_bytes=3 * 64 * 64 * 4)
    frames = [decode_frame(sample("MR_small.dcm")) for _ in range(4)]
    for n, frame in enumerate(frames):
        cache.put(n, frame)
    assert cache.get(0) is None and cache.get(3) is frames[3]
    cache.get(1)  # used: kept over 2
    cache.put(4, frames[0])
    assert cache.get(1) is frames[1] and cache.get(2) is None


def test_rendering_a_cached_frame_needs_no_decoding() -> None:
    frame = decode_frame(sample("MR_small.dcm"))
    assert isinstance(frame.pixels, np.ndarray) and frame.pixels.dtype == np.float32
    a = render_frame(frame, center=100, width=50)
    b = render_frame(frame, center=100, width=50)
    assert a.png == b.png and a.window == Window(100, 50)
