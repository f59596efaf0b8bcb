"""MRNs as an institution writes them, and the allow-list as (institution, MRN) pairs.

An MRN means nothing without the institution that issued it: ``000123`` at
Northside and ``000123`` at Lakeside are different people. Each institution
has a format that turns any spelling a person or a PACS uses (``00-123``,
``123``) into one canonical form. The canonical form is the one mi2b2 sends
in its C-FINDs, so a site chooses it to be the form its PACS stores (for
example "pad to 7 digits"). The same function is applied to the allow-list
file, to what a researcher pastes and to what the PACS answers; nothing else
is "cleaned", because a loosely matched MRN is a different patient.
"""

from __future__ import annotations

import itertools
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple

from mi2b2.domain.identifiers import (
    IdentifierList,
    InvalidEntry,
    institution_rows,
    parse_identifier_text,
    problem_with,
)
from mi2b2.errors import InvalidInput

CASES = ("keep", "upper", "lower")


class MrnFormatError(ValueError):
    """The value cannot be an MRN of this institution (the message says why)."""


@dataclass(frozen=True)
class MrnFormat:
    """How one institution writes its MRNs.

    remove: characters dropped wherever they appear (separators such as "-", " ", ".").
    digits: the MRN is a number written with exactly this many digits (shorter ones are zero-padded).
    strip_leading_zeros: the MRN is written without leading zeros (exclusive with ``digits``).
    case: "upper" or "lower" folds letters; "keep" leaves them.
    """

    remove: str = ""
    digits: int | None = None
    strip_leading_zeros: bool = False
    case: str = "keep"

    def __post_init__(self) -> None:
        if self.digits is not None and self.strip_leading_zeros:
            raise ValueError("choose either digits (pad to a fixed width) or strip_leading_zeros, not both")
        if self.digits is not None and not 1 <= self.digits <= 64:
            raise ValueError("digits must be between 1 and 64")
        if self.case not in CASES:
            raise ValueError(f"case must be one of {', '.join(CASES)}")

    @property
    def is_identity(self) -> bool:
        return not self.remove and self.digits is None and not self.strip_leading_zeros and self.case == "keep"

    def canonical(self, value: str) -> str:
        """The institution's one spelling of ``value``; MrnFormatError if it cannot be one of its MRNs."""
        text = value.strip()
        if self.remove:
            # Removing a separator can leave the spaces around it at an end: trim again.
            text = "".join(ch for ch in text if ch not in self.remove).strip()
        if self.case == "upper":
            text = text.upper()
        elif self.case == "lower":
            text = text.lower()
        if self.digits is not None:
            if not (text.isascii() and text.isdigit()):
                raise MrnFormatError(f"is not a number, and this institution's MRNs are {self.digits} digits")
            significant = text.lstrip("0")
            if len(significant) > self.digits:
                raise MrnFormatError(f"has more than the institution's {self.digits} digits")
            text = significant.rjust(self.digits, "0")
        elif self.strip_leading_zeros:
            # Spaces between leading zeros ("0 012") go with them, or the result would change when canonicalised again.
            text = "".join(itertools.dropwhile(lambda ch: ch == "0" or ch.isspace(), text)) or ("0" if text else "")
        if not text:
            raise MrnFormatError("is empty once the institution's MRN format is applied")
        return text

    def canonical_or_none(self, value: str) -> str | None:
        """For what a PACS or a header says: a value that fits no MRN of the institution matches nobody."""
        try:
            return self.canonical(value)
        except MrnFormatError:
            return None


IDENTITY = MrnFormat()


class AllowedMrn(NamedTuple):
    """One allow-list entry: the patient ``mrn`` (canonical) of institution ``institution``."""

    institution: str
    mrn: str


def normalize_identifiers(parsed: IdentifierList, fmt: MrnFormat) -> IdentifierList:
    """A pasted list in the institution's canonical form: spellings of one MRN collapse into
    one entry (the others count as duplicates); a value the format rejects is invalid."""
    unique: list[str] = []
    seen: set[str] = set()
    duplicates = list(parsed.duplicates)
    invalid = list(parsed.invalid)
    for value in parsed.unique:
        try:
            canonical = fmt.canonical(value)
        except MrnFormatError as exc:
            invalid.append(InvalidEntry(0, value, str(exc)))
            continue
        if canonical in seen:
            duplicates.append(value)
        else:
            seen.add(canonical)
            unique.append(canonical)
    return IdentifierList(unique=unique, duplicates=duplicates, invalid=invalid)


@dataclass(frozen=True)
class InstitutionRules:
    """What the allow-list parser must know of each institution a project reaches."""

    format: MrnFormat = IDENTITY
    issuer: str | None = None


@dataclass(frozen=True)
class ParsedAllowList:
    entries: list[AllowedMrn]
    duplicates: int = 0
    per_institution: dict[str, int] = field(default_factory=dict)


def parse_allow_list(
    text: str,
    reached: Mapping[str, InstitutionRules],
    known: Iterable[str],
    institution: str | None = None,
) -> ParsedAllowList:
    """An allow-list file as (institution, canonical MRN) pairs.

    ``reached``: the institutions the project may reach, with their rules;
    ``known``: every configured institution. ``institution``: the file is the
    list of that one institution. Otherwise the file is either a CSV with an
    institution column, or a plain list that is only unambiguous when the
    project reaches a single institution. Any line that cannot be placed is an
    InvalidInput naming the line and the fix.
    """
    rows = institution_rows(text)
    duplicates = 0
    if rows is None:
        if institution is None:
            if len(reached) != 1:
                raise InvalidInput(
                    f"a plain list of MRNs is ambiguous for a project that reaches {len(reached)} institutions "
                    f"({', '.join(sorted(reached))}): an MRN means nothing without its institution. Give one file "
                    "per institution (mrn_files = { institution = \"file\", ... }) or a CSV with an institution "
                    "column (institution,mrn)"
                )
            institution = next(iter(reached))
        parsed = parse_identifier_text(text, kind="MRN")
        if parsed.invalid:
            _raise_invalid(parsed.invalid)
        rows = [(parsed.lines.get(mrn, 0), institution, mrn, "") for mrn in parsed.unique]
        duplicates = len(parsed.duplicates)
    known_ids = set(known)
    entries: list[AllowedMrn] = []
    seen: set[AllowedMrn] = set()
    counts: dict[str, int] = {}
    for line, inst, mrn, issuer in rows:
        where = f"line {line}: " if line else ""
        if institution is not None and inst != institution:
            raise InvalidInput(f"{where}names institution {inst!r}, but this is the list of {institution!r}; "
                               "move the row to that institution's list")
        if inst not in reached:
            if inst in known_ids:
                raise InvalidInput(f"{where}institution {inst!r} is not one this project reaches "
                                   f"({', '.join(sorted(reached))}); add it to the project's institutions or "
                                   "remove the row")
            raise InvalidInput(f"{where}unknown institution {inst!r}; configured institutions: "
                               f"{', '.join(sorted(known_ids)) or 'none'}. Use an institution id from the "
                               "configuration")
        rules = reached[inst]
        if issuer and rules.issuer is not None and issuer != rules.issuer:
            raise InvalidInput(f"{where}issuer {issuer!r} differs from institution {inst!r}'s configured issuer "
                               f"{rules.issuer!r}; the MRN belongs to another issuer. Correct the row or the "
                               "institution's issuer")
        if issuer and rules.issuer is None:
            raise InvalidInput(f"{where}names issuer {issuer!r}, but institution {inst!r} has no issuer configured "
                               "to check it against; set the institution's issuer or drop the issuer column")
        problem = problem_with(mrn)
        if problem:
            raise InvalidInput(f"{where}{mrn[:20]!r} {problem}")
        try:
            canonical = rules.format.canonical(mrn)
        except MrnFormatError as exc:
            raise InvalidInput(f"{where}{mrn[:20]!r} {exc}; correct it or the institution's mrn_format") from None
        entry = AllowedMrn(inst, canonical)
        if entry in seen:
            duplicates += 1
            continue
        seen.add(entry)
        entries.append(entry)
        counts[inst] = counts.get(inst, 0) + 1
    if not entries:
        raise InvalidInput("no MRNs found; give one MRN per line, or a CSV with institution and MRN columns")
    return ParsedAllowList(entries, duplicates, counts)


def issuer_conflicts(sent: str | None, configured: str | None) -> bool:
    """True when a PACS or an instance names an Issuer of Patient ID other than the institution's.

    Nothing sent, or nothing configured, is no conflict: there is nothing to compare."""
    sent = (sent or "").strip()
    return bool(sent) and configured is not None and sent != configured.strip()


def _raise_invalid(invalid: Sequence[InvalidEntry]) -> None:
    first = invalid[0]
    more = f" (and {len(invalid) - 1} more invalid)" if len(invalid) > 1 else ""
    raise InvalidInput(f"line {first.line} {first.value[:20]!r} {first.reason}{more}")
