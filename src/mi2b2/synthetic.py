"""Synthetic but realistic DICOM studies for the demo and the tests.

Files are valid Part 10 (file meta, Explicit VR Little Endian) with the SOP
class, attributes and pixel layout a PACS expects for the modality, so the
three test PACS index them like clinical images. Everything is deterministic:
the same `SyntheticStudy` always yields the same UIDs and bytes, so tests can
compute the UIDs they expect with `study_instance_uid`, `series_instance_uid`
and `sop_instance_uid` without reading the files back.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    UID,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)

__all__ = [
    "SyntheticStudy",
    "series_instance_uid",
    "sop_instance_uid",
    "study_instance_uid",
    "write_study",
]

_SOP_CLASS = {
    "MR": MRImageStorage,
    "CT": CTImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "US": UltrasoundImageStorage,
}

_SERIES_NAMES = {
    "MR": ["AX T1", "AX T2", "AX FLAIR", "AX DWI", "SAG T1", "COR T2 STIR", "AX T1 POST"],
    "CT": ["SCOUT", "AX 5.0 SOFT", "AX 1.25 BONE", "COR MPR", "SAG MPR"],
    "CR": ["PA", "LAT", "AP", "OBLIQUE"],
    "US": ["B-MODE", "DOPPLER", "CINE"],
}

_IMPLEMENTATION_UID: UID = generate_uid(entropy_srcs=["mi2b2 synthetic implementation"])


@dataclass(frozen=True)
class SyntheticStudy:
    patient_id: str
    patient_name: str  # DICOM PN, e.g. "DOE^JANE"
    birth_date: str  # YYYYMMDD
    sex: str  # "F", "M", "O"
    accession: str
    study_date: str  # YYYYMMDD
    modality: str  # "MR", "CT", "CR", "US"
    description: str
    series_count: int
    instances_per_series: int
    rows: int = 64
    cols: int = 64
    study_uid: str = ""  # derived from the other identifiers when empty

    def __post_init__(self) -> None:
        if self.modality not in _SOP_CLASS:
            raise ValueError(f"modality must be one of {sorted(_SOP_CLASS)}, not {self.modality!r}")
        if self.series_count < 1 or self.instances_per_series < 1:
            raise ValueError("series_count and instances_per_series must be at least 1")


def _uid(*parts: str) -> str:
    # One joined source: pydicom concatenates entropy sources without a
    # separator, so ["1", "11"] and ["11", "1"] would give the same UID.
    return str(generate_uid(entropy_srcs=["\x1f".join(parts)]))


def study_instance_uid(study: SyntheticStudy) -> str:
    if study.study_uid:
        return study.study_uid
    return _uid("study", study.patient_id, study.accession, study.study_date, study.modality, study.description)


def series_instance_uid(study: SyntheticStudy, series_number: int) -> str:
    """UID of series `series_number` (1-based, as in SeriesNumber)."""
    return _uid("series", study_instance_uid(study), str(series_number))


def sop_instance_uid(study: SyntheticStudy, series_number: int, instance_number: int) -> str:
    return _uid("instance", study_instance_uid(study), str(series_number), str(instance_number))


def write_study(study: SyntheticStudy, out_dir: Path) -> list[Path]:
    """Write one file per instance under ``out_dir/<StudyInstanceUID>/``."""
    study_dir = Path(out_dir) / study_instance_uid(study)
    study_dir.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for series_number in range(1, study.series_count + 1):
        for instance_number in range(1, study.instances_per_series + 1):
            ds = _instance(study, series_number, instance_number)
            path = study_dir / f"{series_number:03d}-{instance_number:05d}.dcm"
            ds.save_as(path, enforce_file_format=True)
            paths.append(path)
    return paths


def _instance(study: SyntheticStudy, series_number: int, instance_number: int) -> Dataset:
    sop_class = _SOP_CLASS[study.modality]
    sop_uid = sop_instance_uid(study, series_number, instance_number)

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = UID(sop_uid)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = _IMPLEMENTATION_UID
    meta.ImplementationVersionName = "MI2B2_SYNTH"

    ds = Dataset()
    ds.file_meta = meta
    texts = (study.patient_name, study.description)
    if not all(t.isascii() for t in texts):
        ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if study.modality in ("MR", "CT") else "OTHER"]

    ds.PatientName = study.patient_name
    ds.PatientID = study.patient_id
    ds.PatientBirthDate = study.birth_date
    ds.PatientSex = study.sex

    ds.StudyInstanceUID = study_instance_uid(study)
    ds.StudyDate = study.study_date
    ds.StudyTime = "093000"
    ds.AccessionNumber = study.accession
    ds.StudyID = study.accession[-16:] or "1"
    ds.StudyDescription = study.description
    ds.ReferringPhysicianName = "REFERRER^SYNTHETIC"
    ds.InstitutionName = "mi2b2 synthetic hospital"
    ds.Manufacturer = "mi2b2"
    ds.ManufacturerModelName = "synthetic"

    ds.SeriesInstanceUID = series_instance_uid(study, series_number)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = _series_description(study.modality, series_number)
    ds.SeriesDate = study.study_date
    ds.SeriesTime = f"09{30 + series_number % 30:02d}00"
    ds.Modality = study.modality
    ds.BodyPartExamined = {"MR": "BRAIN", "CT": "CHEST", "CR": "CHEST", "US": "ABDOMEN"}[study.modality]

    ds.InstanceNumber = instance_number
    ds.ContentDate = study.study_date
    ds.ContentTime = ds.SeriesTime
    ds.FrameOfReferenceUID = generate_uid(entropy_srcs=["frame", ds.SeriesInstanceUID])
    if study.modality in ("MR", "CT"):
        thickness = 5.0
        ds.PatientPosition = "HFS"
        ds.ImagePositionPatient = [-120.0, -120.0, round(instance_number * thickness, 2)]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing = [round(240.0 / study.rows, 4), round(240.0 / study.cols, 4)]
        ds.SliceThickness = thickness
        ds.SliceLocation = round(instance_number * thickness, 2)
    if study.modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = 500.0
        ds.EchoTime = 15.0
        ds.MagneticFieldStrength = 3.0
    if study.modality == "CT":
        ds.KVP = 120.0
        ds.RescaleIntercept = -1024.0
        ds.RescaleSlope = 1.0
        ds.RescaleType = "HU"
        ds.WindowCenter = 40.0
        ds.WindowWidth = 400.0
    _pixels(ds, study, series_number, instance_number)
    return ds


def _series_description(modality: str, series_number: int) -> str:
    names = _SERIES_NAMES[modality]
    name = names[(series_number - 1) % len(names)]
    if series_number > len(names):
        name = f"{name} {series_number}"
    return name


def _pixels(ds: Dataset, study: SyntheticStudy, series_number: int, instance_number: int) -> None:
    """A smooth phantom-like pattern that changes across series and slices."""
    rows, cols = study.rows, study.cols
    y, x = np.mgrid[0:rows, 0:cols].astype(np.float32)
    cy = rows / 2 + rows * 0.1 * np.sin(instance_number / 3)
    cx = cols / 2 + cols * 0.1 * np.cos(series_number)
    radius = min(rows, cols) * (0.3 + 0.1 * np.sin(instance_number / 5))
    distance = np.hypot(y - cy, x - cx)
    body = np.clip(1.0 - distance / max(radius, 1.0), 0.0, 1.0)
    texture = 0.5 + 0.5 * np.sin(x / 4 + series_number) * np.cos(y / 5 + instance_number)
    image = body * (0.7 + 0.3 * texture)

    ds.Rows = rows
    ds.Columns = cols
    if study.modality == "US":
        grey = (image * 255).astype(np.uint8)
        rgb = np.stack([grey, (grey * 0.8).astype(np.uint8), (grey * 0.6).astype(np.uint8)], -1)
        ds.SamplesPerPixel = 3
        ds.PhotometricInterpretation = "RGB"
        ds.PlanarConfiguration = 0
        ds.BitsAllocated = 8
        ds.BitsStored = 8
        ds.HighBit = 7
        ds.PixelRepresentation = 0
        ds.PixelData = rgb.tobytes()
        return
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = (image * 4095).astype("<u2").tobytes()
