"""What every answer shares: the base model, timestamps as the API writes them, the error body."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection
from datetime import datetime
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, PlainSerializer, TypeAdapter, WithJsonSchema

from mi2b2.domain.clock import as_utc

T = TypeVar("T")
_ADAPTERS: dict[type[Any], TypeAdapter[Any]] = {}


def adapter(kind: type[T]) -> TypeAdapter[T]:
    """The pydantic validator and serializer of an answer type, made once per type."""
    found = _ADAPTERS.get(kind)
    if found is None:
        found = _ADAPTERS[kind] = TypeAdapter(kind)
    return found


class Readable:
    """An answer of the API: a model, or a pydantic dataclass extending the service's view it carries.

    Also readable by key (``answer["state"]``, ``answer.get("error")``, ``"job_id" in answer``), as the
    JSON object it is: the Python client returned plain dicts before its answers were typed, and
    callers written then keep working."""

    def _field_names(self) -> Collection[str]:
        if isinstance(self, BaseModel):
            return type(self).model_fields
        if dataclasses.is_dataclass(self):
            return {field.name for field in dataclasses.fields(self)}
        return ()

    def __getitem__(self, key: str) -> Any:
        if key not in self._field_names():
            raise KeyError(key)
        return getattr(self, key)

    def get(self, key: str, default: Any = None) -> Any:
        return getattr(self, key) if key in self._field_names() else default

    def __contains__(self, key: object) -> bool:
        return key in self._field_names()

    def json_object(self) -> dict[str, Any]:
        """The JSON object this answer is, as the API sends it."""
        data: dict[str, Any] = adapter(type(self)).dump_python(self, mode="json")
        return data


class Reply(Readable, BaseModel):
    """An answer the API composes itself (the other answers extend a service's view).

    Keys it does not know are left out, not refused: a client keeps reading a newer server's answers."""


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
