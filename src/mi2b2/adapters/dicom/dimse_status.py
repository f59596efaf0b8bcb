"""What a DIMSE status code means, read from the table of the service that answered it.

One code means different things in different services: 0xA801 is "Move
destination unknown" only for C-MOVE, 0xA701/0xA702 exist for C-MOVE and C-GET
but not C-FIND, and 0xA900 is about an identifier for a query or retrieve but
a data set for a store. pynetdicom keeps one table per service class (PS3.4),
each with the general statuses of PS3.7 C merged in.
"""

from __future__ import annotations

from enum import StrEnum

from pynetdicom.status import (
    QR_FIND_SERVICE_CLASS_STATUS,
    QR_GET_SERVICE_CLASS_STATUS,
    QR_MOVE_SERVICE_CLASS_STATUS,
    STORAGE_SERVICE_CLASS_STATUS,
    VERIFICATION_SERVICE_CLASS_STATUS,
    code_to_category,
)

__all__ = ["DimseService", "status_text"]


class DimseService(StrEnum):
    C_ECHO = "C-ECHO"
    C_STORE = "C-STORE"
    C_FIND = "C-FIND"
    C_MOVE = "C-MOVE"
    C_GET = "C-GET"


_TABLES: dict[DimseService, dict[int, tuple[str, str]]] = {
    DimseService.C_ECHO: VERIFICATION_SERVICE_CLASS_STATUS,
    DimseService.C_STORE: STORAGE_SERVICE_CLASS_STATUS,
    DimseService.C_FIND: QR_FIND_SERVICE_CLASS_STATUS,
    DimseService.C_MOVE: QR_MOVE_SERVICE_CLASS_STATUS,
    DimseService.C_GET: QR_GET_SERVICE_CLASS_STATUS,
}

# Ranges PS3.4 gives a meaning as a whole, for the codes a table does not list one by one
# (pynetdicom's storage table lists every code of its ranges).
_QUERY_RETRIEVE_RANGES: tuple[tuple[int, int, str], ...] = ((0xA700, 0xA7FF, "Refused: Out of resources"),)
_RANGES: dict[DimseService, tuple[tuple[int, int, str], ...]] = {
    DimseService.C_ECHO: (),
    DimseService.C_STORE: (),
    DimseService.C_FIND: _QUERY_RETRIEVE_RANGES,
    DimseService.C_MOVE: _QUERY_RETRIEVE_RANGES,
    DimseService.C_GET: _QUERY_RETRIEVE_RANGES,
}


def status_text(service: DimseService, code: int) -> str:
    """The meaning of `code` as `service` defines it; else its range's, else its category."""
    known = _TABLES[service].get(code)
    if known is not None:
        return known[1]
    for low, high, meaning in _RANGES[service]:
        if low <= code <= high:
            return meaning
    return code_to_category(code)
