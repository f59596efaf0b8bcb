"""The DICOM query/retrieve information models mi2b2 speaks: one name for the site
configuration (``query_model = "study"``) and for the association it opens."""

from __future__ import annotations

from enum import StrEnum


class QueryModel(StrEnum):
    PATIENT_ROOT = "patient"
    STUDY_ROOT = "study"
