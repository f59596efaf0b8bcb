"""What every answer shares: the base model, timestamps as the API writes them, the error body."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, PlainSerializer, WithJsonSchema

from mi2b2.domain.clock import as_utc


class Reply(BaseModel):
    model_config = ConfigDict(extra="forbid")  # DEV-ONLY
    """An answer of the API.

    Also readable by key (``answer["state"]``, ``answer.get("error")``, ``"job_id" in answer``), as the
    JSON object it is: the Python client returned plain dicts before its answers were typed, and
    callers written then keep working."""

    def __getitem__(self, key: str) -> Any:
        if key not in type(self).model_fields:
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in type(self).model_fields else default

    def __contains__(self, key: object) -> bool:
        return key in type(self).model_fields


def _isoformat(value: datetime) -> str:
    return as_utc(value).isoformat()


# RFC 3339 in UTC, as Python writes it ("+00:00", not pydantic's "Z": the form the API has always sent). Always with
# the offset: SQLite hands back naive datetimes, which a browser would read as its own local time.
Timestamp = Annotated[
    datetime,
    PlainSerializer(_isoformat, return_type=str, when_used="json"),
    WithJsonSchema({"type": "string", "format": "date-time"}),
]


class ErrorBody(BaseModel):
    """Every error answer: what went wrong and how to fix it, and the kind of error."""

    error: str
    kind: str


class StatusReply(Reply):
    status: str


class Health(Reply):
    status: str
    version: str
