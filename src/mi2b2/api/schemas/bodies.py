"""Request bodies and parameters of the API (answers are in the sibling modules of this package)."""

from __future__ import annotations

from typing import Annotated

from fastapi import Path, Query
from pydantic import BaseModel, ConfigDict, Field

# Every id and number from a path, query or body is checked against its column's range here, so that
# none reaches the database out of range (SQLite raises OverflowError from 2**63, PostgreSQL a DataError
# from 2**31 on an INTEGER column): ids are INTEGER columns, so the portable range is PostgreSQL's.
MAX_ROW_ID = 2**31 - 1
MAX_PAGE = 100_000
_ID_RANGE = f"a row id, 1 to {MAX_ROW_ID}"
RowId = Annotated[int, Field(ge=1, le=MAX_ROW_ID, description=_ID_RANGE)]
RowIdPath = Annotated[int, Path(ge=1, le=MAX_ROW_ID, description=_ID_RANGE)]
FrameNumber = Annotated[int, Path(ge=1, le=2**31 - 1, description="a frame number, from 1")]
PageLimit = Annotated[int, Query(ge=1, le=MAX_PAGE, description=f"at most this many rows, 1 to {MAX_PAGE}")]
PageOffset = Annotated[int, Query(ge=0, le=MAX_ROW_ID, description="rows to skip")]


class Body(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoginBody(Body):
    login: str = Field(min_length=1, max_length=64)
    password: str = Field(min_length=1, max_length=1024)


class TokenBody(Body):
    name: str = Field("api token", max_length=200)
    days: float | None = Field(None, gt=0, description="lifetime; at most, and by default, server.max_token_days")


class MrnSearchBody(Body):
    project: str
    pacs: str
    mrns: str = Field(description="MRNs as pasted text or CSV file contents; one per line, or separated by , ; or tabs")


class AccessionSearchBody(Body):
    project: str
    pacs: str
    accessions: str


class SeriesSearchBody(Body):
    project: str
    pacs: str
    studies: list[str] = Field(min_length=1, max_length=10000)


class UserBody(Body):
    login: str
    role: str
    password: str | None = None
    display_name: str = ""
    email: str | None = None


class CacheDeleteBody(Body):
    study_uids: list[str] = Field(min_length=1, max_length=10000, description="StudyInstanceUIDs to delete")


class MarkReadBody(Body):
    ids: list[RowId] = Field(default_factory=list, max_length=10000)
    all: bool = Field(False, description="mark every unread notification read")


class StudyPickBody(Body):
    study_uid: str
    series_uids: list[str] = Field(default_factory=list, max_length=10000, description="only these series; empty = all")


class RequestAddBody(Body):
    project: str
    pacs: str
    studies: list[StudyPickBody] = Field(min_length=1, max_length=5000)
    priority: int = Field(0, ge=-9, le=9, description="higher starts first within the project")


class RequestIdsBody(Body):
    ids: list[RowId] = Field(min_length=1, max_length=10000)


class PriorityBody(RequestIdsBody):
    priority: int = Field(ge=-9, le=9)


class AllowListBody(Body):
    mrns: str = Field(max_length=50_000_000,
                      description="the project's whole new MRN allow-list, as pasted text or file contents: "
                                  "one per line, separated by , ; or tabs, or a CSV with an MRN column")
    institution: str | None = Field(None, max_length=64,
                                    description="the institution whose list this is; required when the project "
                                                "reaches several")
