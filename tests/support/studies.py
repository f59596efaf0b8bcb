"""A small fixed set of generated studies that search tests know by heart."""

from __future__ import annotations

from pathlib import Path

from mi2b2.synthetic import SyntheticStudy, study_instance_uid, write_study


def _study(pid: str, acc: str, date: str, modality: str = "MR", series: int = 1, per_series: int = 2,
           name: str = "") -> SyntheticStudy:
    return SyntheticStudy(patient_id=pid, patient_name=name or f"TEST^{pid.replace('-', '')}", birth_date="19700101",
                          sex="F", accession=acc, study_date=date, modality=modality,
                          description=f"{modality} study {acc}", series_count=series, instances_per_series=per_series,
                          rows=16, cols=16)


BRAIN = _study("000123", "ACC-1001", "20210305", "MR", series=3, per_series=2)
BRAIN_FOLLOW_UP = _study("000123", "ACC-1002", "20220611", "MR")
TRAUMA = _study("77", "ACC-2001", "20230102", "CT")
SAME_DIGITS = _study("123", "ACC-3001", "20230102", "CR")  # not 000123: leading zeros matter
OFF_LIST = _study("OFFLIST-9", "ACC-9001", "20230102", "MR")
MANY = [_study("PAT004", f"ACC-40{n:02d}", f"20{10 + n:02d}0{1 + n % 9}15", "CR", per_series=1) for n in range(7)]

ALL = [BRAIN, BRAIN_FOLLOW_UP, TRAUMA, SAME_DIGITS, OFF_LIST, *MANY]


def write_all(folder: Path) -> list[Path]:
    files: list[Path] = []
    for study in ALL:
        files.extend(write_study(study, folder))
    return files


def uid(study: SyntheticStudy) -> str:
    return study_instance_uid(study)
