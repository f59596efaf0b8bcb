"""The institutions tree of ``mi2b2.toml``: departments, PACS, their governance windows, destinations."""

from __future__ import annotations

import ipaddress
from datetime import date, time, timedelta
from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import (
    BeforeValidator,
    Field,
    field_validator,
    model_validator,
)

from mi2b2.config.dicom_tls import DicomTls, tls_off_or_block
from mi2b2.config.fields import (
    WILDCARD_CHARS,
    AeTitle,
    Identifier,
    Port,
    RetrieveMethod,
    Strict,
)
from mi2b2.domain.identifiers import problem_with
from mi2b2.domain.mrn import InstitutionRules, MrnFormat
from mi2b2.domain.query_model import QueryModel
from mi2b2.domain.requests import RetryPolicy
from mi2b2.domain.windows import WEEKDAYS, GovernanceWindow


class Timeouts(Strict):
    connect: float = Field(5.0, gt=0)
    acse: float = Field(10.0, gt=0)
    dimse: float = Field(60.0, gt=0)
    network: float = Field(120.0, gt=0)


class RetryConfig(Strict):
    """Transient failures (PACS unreachable, busy, timed out) are retried with
    exponential backoff: first_delay, then twice that, up to max_delay."""

    max_attempts: int = Field(5, ge=1)
    first_delay: float = Field(30.0, gt=0, description="seconds")
    max_delay: float = Field(1800.0, gt=0, description="seconds")

    def to_domain(self) -> RetryPolicy:
        return RetryPolicy(self.max_attempts, timedelta(seconds=self.first_delay), timedelta(seconds=self.max_delay))


class WindowConfig(Strict):
    """When, and how hard, mi2b2 may use a PACS (times are the PACS's local time)."""

    name: str = ""
    days: list[str] = Field(default_factory=lambda: list(WEEKDAYS))
    start: time = time(0, 0)
    end: time = time(0, 0)
    closed: bool = False
    max_concurrent: int | None = Field(None, ge=1)
    studies_per_minute: int | None = Field(None, ge=1)
    studies_per_hour: int | None = Field(None, ge=1)
    max_concurrent_queries: int | None = Field(None, ge=1, description="query associations open at once")
    queries_per_second: float | None = Field(None, ge=0, description="C-FINDs per second; 0 = no cap")

    @field_validator("days", mode="before")
    @classmethod
    def _days(cls, value: Any) -> list[str]:
        if isinstance(value, str):
            value = [value]
        days: list[str] = []
        for item in value:
            text = str(item).strip().lower()[:3]
            if "-" in str(item):
                first, last = (part.strip().lower()[:3] for part in str(item).split("-", 1))
                if first not in WEEKDAYS or last not in WEEKDAYS:
                    raise ValueError(f"{item!r}: use a day range such as \"mon-fri\"")
                i, j = WEEKDAYS.index(first), WEEKDAYS.index(last)
                span = range(i, j + 1) if i <= j else [*range(i, 7), *range(0, j + 1)]
                days.extend(WEEKDAYS[k] for k in span)
            elif text in WEEKDAYS:
                days.append(text)
            else:
                raise ValueError(f"{item!r} is not a weekday; use mon, tue, wed, thu, fri, sat, sun or a range like \"mon-fri\"")
        return days

    def to_domain(self) -> GovernanceWindow:
        return GovernanceWindow(
            name=self.name,
            days=frozenset(WEEKDAYS.index(d) for d in self.days),
            start=self.start,
            end=self.end,
            closed=self.closed,
            max_concurrent=self.max_concurrent,
            studies_per_minute=self.studies_per_minute,
            studies_per_hour=self.studies_per_hour,
            max_concurrent_queries=self.max_concurrent_queries,
            queries_per_second=self.queries_per_second,
        )


class PacsConfig(Strict):
    id: Identifier
    name: str = ""
    ae_title: AeTitle
    host: str
    port: Port
    retrieve: RetrieveMethod = RetrieveMethod.C_MOVE
    query_model: QueryModel = QueryModel.STUDY_ROOT
    timezone: str = "UTC"
    timeouts: Timeouts = Timeouts()
    retries: RetryConfig = RetryConfig()
    find_result_limit: int = Field(0, ge=0, description="answers the PACS returns at most per C-FIND; 0 = no cap")
    earliest_study_date: date = date(1980, 1, 1)
    default_max_concurrent: int = Field(2, ge=1, description="cap used when no window says otherwise")
    # Searches, where no window says otherwise: gentle enough for a clinical PACS in clinical hours.
    default_max_concurrent_queries: int = Field(2, ge=1, description="query associations open at once")
    default_queries_per_second: float = Field(20, ge=0, description="C-FINDs per second; 0 = no cap")
    windows: list[WindowConfig] = Field(default_factory=list)
    tls: DicomTls | None = Field(None, description="DICOM TLS for the associations mi2b2 opens to this PACS")
    addresses: list[str] = Field(default_factory=list, description="IP addresses or networks (CIDR) the PACS calls "
                                                                   "mi2b2's receiver from; empty: the addresses host "
                                                                   "resolves to")

    @field_validator("addresses")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item.strip(), strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or network; write e.g. \"10.0.0.5\" or "
                                 "\"10.0.0.0/28\" (host names are not accepted here)") from None
        return value

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"{value!r} is not a time zone; use an IANA name such as \"America/New_York\"") from None
        return value


class DepartmentConfig(Strict):
    id: Identifier
    name: str = ""
    pacs: list[PacsConfig] = Field(default_factory=list)


class MrnFormatConfig(Strict):
    """How the institution writes its MRNs; the result must be the form its PACS stores,
    since it is what mi2b2 sends in its C-FINDs (see domain/mrn.py)."""

    remove: str = Field("", description='characters dropped wherever they appear, e.g. "- ."')
    digits: int | None = Field(None, ge=1, le=64, description="numeric MRNs written with this many digits (zero-padded)")
    strip_leading_zeros: bool = False
    case: Literal["keep", "upper", "lower"] = "keep"

    @model_validator(mode="after")
    def _one_zero_rule(self) -> MrnFormatConfig:
        if self.digits is not None and self.strip_leading_zeros:
            raise ValueError("set either digits (pad to a fixed width) or strip_leading_zeros, not both")
        if any(ch in WILDCARD_CHARS for ch in self.remove):
            raise ValueError("remove may not hold the wildcards * ? or a backslash")
        return self

    def to_domain(self) -> MrnFormat:
        return MrnFormat(self.remove, self.digits, self.strip_leading_zeros, self.case)


def _issuer(value: Any) -> Any:
    if isinstance(value, str):
        problem = problem_with(value) if value.strip() else "is empty"
        if problem:
            raise ValueError(f"issuer {value[:20]!r} {problem}; write the Issuer of Patient ID (0010,0021) exactly "
                             "as the PACS sends it")
        return value.strip()
    return value


class InstitutionConfig(Strict):
    id: Identifier
    name: str = ""
    mrn_format: MrnFormatConfig = MrnFormatConfig()
    issuer: Annotated[str | None, BeforeValidator(_issuer)] = Field(
        None, description="Issuer of Patient ID (0010,0021) its PACS sends; answers and instances naming another are refused")
    departments: list[DepartmentConfig] = Field(default_factory=list)

    def rules(self) -> InstitutionRules:
        return InstitutionRules(self.mrn_format.to_domain(), self.issuer)


class DestinationConfig(Strict):
    id: Identifier
    name: str = ""
    ae_title: AeTitle
    host: str
    port: Port
    tls: Annotated[DicomTls | None, BeforeValidator(tls_off_or_block)] = Field(
        None, description="DICOM TLS for the associations mi2b2 opens to this destination")
    projects: list[str] = Field(default_factory=list, description="projects that may forward here; empty = all")
    max_concurrent: int = Field(2, ge=1)
    timeouts: Timeouts = Timeouts()
    retries: RetryConfig = RetryConfig()  # forwards that meet a busy or unreachable destination
