"""The value types every part of ``mi2b2.toml`` shares: ids, AE titles, sizes, time zones."""

from __future__ import annotations

import re
from enum import StrEnum
from typing import Annotated, Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
)

AE_TITLE = re.compile(r"[ -\[\]-~]{1,16}\Z")  # printable ASCII but backslash
IDENTIFIER = re.compile(r"[a-z0-9][a-z0-9_.-]{0,62}\Z")
WILDCARD_CHARS = set("*?\\")
SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([KMGTP]i?B|B)?\s*\Z", re.IGNORECASE)
SIZE_UNITS = {
    "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "PB": 10**15,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "PIB": 2**50,
}


def parse_size(value: Any) -> int:
    """'500 GiB' -> bytes. Plain integers are bytes."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ValueError("a size cannot be negative")
        return value
    if not isinstance(value, str):
        raise ValueError('write a size such as "500 GiB" or "2 TB"')
    match = SIZE.match(value)
    if not match:
        raise ValueError(f'{value!r} is not a size; write e.g. "500 GiB", "750 MB" or "2 TiB"')
    number, unit = match.groups()
    return int(float(number) * SIZE_UNITS[(unit or "B").upper()])


def check_identifier(value: str) -> str:
    if not isinstance(value, str) or not IDENTIFIER.match(value):
        raise ValueError(
            f"{value!r} is not a valid id; use lower-case letters, digits, '-', '_' or '.', "
            "starting with a letter or digit (e.g. \"mgh-radiology\")"
        )
    return value


def check_ae_title(value: str) -> str:
    if not isinstance(value, str) or not AE_TITLE.match(value) or not value.strip():
        raise ValueError(f"{value!r} is not an AE title; use 1-16 printable ASCII characters, no backslash")
    return value


Identifier = Annotated[str, BeforeValidator(check_identifier)]
AeTitle = Annotated[str, BeforeValidator(check_ae_title)]
ByteSize = Annotated[int, BeforeValidator(parse_size)]
Port = Annotated[int, Field(ge=1, le=65535)]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrieveMethod(StrEnum):
    C_MOVE = "c-move"
    C_GET = "c-get"


class MemberRole(StrEnum):
    LEAD = "lead"
    RESEARCHER = "researcher"


def check_zone(value: str) -> str:
    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        raise ValueError(f"{value!r} is not a time zone; use an IANA name such as \"America/New_York\"") from None
    return value
