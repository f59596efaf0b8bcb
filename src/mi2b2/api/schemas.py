"""Request bodies of the API (responses are the services' dataclasses)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


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
    ids: list[int] = Field(default_factory=list, max_length=10000)
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
    ids: list[int] = Field(min_length=1, max_length=10000)


class PriorityBody(RequestIdsBody):
    priority: int = Field(ge=-9, le=9)


class AllowListBody(Body):
    mrns: str = Field(max_length=50_000_000,
                      description="the project's whole new MRN allow-list, as pasted text or file contents: "
                                  "one per line, separated by , ; or tabs, or a CSV with an MRN column")
