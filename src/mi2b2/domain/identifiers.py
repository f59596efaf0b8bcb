"""Lists of MRNs or accession numbers, as researchers paste or upload them.

Identifiers stay strings: formats vary between institutions and leading zeros
matter. We trim whitespace and nothing else. A value that could act as a
C-FIND wildcard or break a DICOM element is refused rather than cleaned,
because a silently "fixed" MRN could match a different patient.
"""

from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass, field

from mi2b2.errors import InvalidInput

MAX_LENGTH = 64  # VR LO / SH upper bound we accept for both MRN and accession
WILDCARDS = set("*?\\")
HEADER_NAMES = {
    "MRN": {"mrn", "mrns", "patientid", "patient_id", "patient id", "medical record number"},
    "accession number": {"accession", "accessionnumber", "accession_number", "accession number", "an"},
}
INSTITUTION_NAMES = {"institution", "institution_id", "institution id"}
ISSUER_NAMES = {"issuer", "issuerofpatientid", "issuer_of_patient_id", "issuer of patient id"}
SEPARATORS = re.compile(r"[\r\n,;\t]+")


@dataclass(frozen=True)
class InvalidEntry:
    line: int
    value: str
    reason: str


@dataclass(frozen=True)
class IdentifierList:
    unique: list[str]
    duplicates: list[str] = field(default_factory=list)
    invalid: list[InvalidEntry] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)  # where each unique value was first given


def problem_with(value: str) -> str | None:
    """Why ``value`` cannot be an identifier in a C-FIND, or None."""
    if len(value) > MAX_LENGTH:
        return f"longer than {MAX_LENGTH} characters"
    if WILDCARDS & set(value):
        return "contains a wildcard or backslash (* ? \\), which would match other patients"
    if any(ord(ch) < 32 or ord(ch) == 127 for ch in value):
        return "contains control characters"
    return None


def _csv_column(text: str, kind: str) -> list[tuple[int, str]] | None:
    """If the text is a CSV with a recognisable header, return that column."""
    first_line = text.lstrip().splitlines()[0] if text.strip() else ""
    if "," not in first_line and "\t" not in first_line and ";" not in first_line:
        header_only = first_line.strip().strip('"').lower()
        if header_only in HEADER_NAMES.get(kind, set()):
            return [(n, line) for n, line in enumerate(text.splitlines(), 1) if n > 1]
        return None
    dialect = csv.Sniffer().sniff(first_line, delimiters=",;\t") if first_line else csv.excel
    rows = list(csv.reader(io.StringIO(text), dialect))
    header = [cell.strip().lower() for cell in rows[0]]
    names = HEADER_NAMES.get(kind, set())
    for index, cell in enumerate(header):
        if cell in names:
            return [(n, row[index] if index < len(row) else "") for n, row in enumerate(rows[1:], 2)]
    return None


def parse_identifier_text(text: str, kind: str = "MRN") -> IdentifierList:
    """Split pasted text or a CSV file into identifiers.

    Accepts one per line, or separated by commas, semicolons or tabs; a CSV
    with a header row uses the column named like the identifier (e.g. "MRN").
    """
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\x00" in text:
        raise InvalidInput(f"the {kind} list looks like a binary file; upload plain text or CSV")
    column = _csv_column(text, kind)
    if column is None:
        column = [
            (n, piece) for n, line in enumerate(text.splitlines(), 1) for piece in SEPARATORS.split(line)
        ]
    unique: list[str] = []
    seen: set[str] = set()
    duplicates: list[str] = []
    invalid: list[InvalidEntry] = []
    lines: dict[str, int] = {}
    for line, raw in column:
        value = raw.strip().strip('"').strip()
        if not value or value.startswith("#"):
            continue
        reason = problem_with(value)
        if reason:
            invalid.append(InvalidEntry(line, value, reason))
        elif value in seen:
            duplicates.append(value)
        else:
            seen.add(value)
            unique.append(value)
            lines[value] = line
    if not unique and not invalid:
        raise InvalidInput(f"no {kind}s found; give one {kind} per line (or a CSV with a {kind} column)")
    if not unique:
        first = invalid[0]
        raise InvalidInput(
            f"no usable {kind}s: line {first.line} {first.value[:20]!r} {first.reason}"
            + (f" (and {len(invalid) - 1} more invalid)" if len(invalid) > 1 else "")
        )
    return IdentifierList(unique=unique, duplicates=duplicates, invalid=invalid, lines=lines)


def institution_rows(text: str) -> list[tuple[int, str, str, str]] | None:
    """A CSV with an institution column as (line, institution, MRN, issuer) rows; None if it has no such column.

    The issuer column (Issuer of Patient ID) is optional and "" where absent."""
    if text.startswith("\ufeff"):
        text = text[1:]
    if "\x00" in text:
        raise InvalidInput("the MRN list looks like a binary file; upload plain text or CSV")
    first_line = text.lstrip().splitlines()[0] if text.strip() else ""
    if not any(sep in first_line for sep in ",;\t"):
        return None
    dialect = csv.Sniffer().sniff(first_line, delimiters=",;\t")
    rows = list(csv.reader(io.StringIO(text.lstrip()), dialect))
    header = [cell.strip().strip('"').lower() for cell in rows[0]]
    institution = next((i for i, cell in enumerate(header) if cell in INSTITUTION_NAMES), None)
    if institution is None:
        return None
    mrn = next((i for i, cell in enumerate(header) if cell in HEADER_NAMES["MRN"]), None)
    if mrn is None:
        raise InvalidInput("the CSV has an institution column but no MRN column; name one column \"mrn\"")
    issuer = next((i for i, cell in enumerate(header) if cell in ISSUER_NAMES), None)
    found: list[tuple[int, str, str, str]] = []
    for line, row in enumerate(rows[1:], 2):
        cells = [cell.strip() for cell in row]
        if not any(cells) or cells[0].startswith("#"):
            continue
        value = cells[mrn] if mrn < len(cells) else ""
        inst = cells[institution] if institution < len(cells) else ""
        if not value:
            raise InvalidInput(f"line {line}: no MRN; fill in the mrn column or remove the row")
        if not inst:
            raise InvalidInput(f"line {line}: no institution; an MRN means nothing without the institution that "
                               "issued it, so fill in the institution column")
        found.append((line, inst, value, cells[issuer] if issuer is not None and issuer < len(cells) else ""))
    return found


_UID = re.compile(r"[0-9]+(\.[0-9]+)*\Z")


def looks_like_uid(value: str) -> bool:
    """A DICOM UID: digits and dots, at most 64 characters (PS3.5 9.1)."""
    return len(value) <= 64 and bool(_UID.match(value))
