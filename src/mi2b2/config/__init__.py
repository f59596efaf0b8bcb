"""Site configuration: the ``mi2b2.toml`` file, validated with pydantic.

Loaded once per entry point (``load_config``) and passed down; never read at
import time. Relative paths in the file are resolved against the file's folder,
so a site can keep its configuration, MRN lists and data together.
"""

from __future__ import annotations

import ipaddress
import tomllib
from collections.abc import Iterator
from datetime import date
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import (
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)

from mi2b2.config.atna import AtnaConfig as AtnaConfig
from mi2b2.config.dicom_tls import DicomTls as DicomTls
from mi2b2.config.dicom_tls import ReceiverTls as ReceiverTls
from mi2b2.config.dicom_tls import check_tls_files
from mi2b2.config.export_policy import ExportPolicyFields
from mi2b2.config.fields import (  # re-exported: callers import them from mi2b2.config
    AE_TITLE as AE_TITLE,
)
from mi2b2.config.fields import (
    IDENTIFIER as IDENTIFIER,
)
from mi2b2.config.fields import (
    SIZE as SIZE,
)
from mi2b2.config.fields import (
    SIZE_UNITS as SIZE_UNITS,
)
from mi2b2.config.fields import (
    WILDCARD_CHARS as WILDCARD_CHARS,
)
from mi2b2.config.fields import (
    AeTitle as AeTitle,
)
from mi2b2.config.fields import (
    ByteSize as ByteSize,
)
from mi2b2.config.fields import (
    Identifier as Identifier,
)
from mi2b2.config.fields import (
    MemberRole as MemberRole,
)
from mi2b2.config.fields import (
    Port as Port,
)
from mi2b2.config.fields import (
    RetrieveMethod as RetrieveMethod,
)
from mi2b2.config.fields import (
    Strict as Strict,
)
from mi2b2.config.fields import (
    check_ae_title as check_ae_title,
)
from mi2b2.config.fields import (
    check_identifier as check_identifier,
)
from mi2b2.config.fields import (
    check_zone as check_zone,
)
from mi2b2.config.fields import (
    parse_size as parse_size,
)
from mi2b2.config.ldap import LdapConfig as LdapConfig
from mi2b2.config.oidc import OidcConfig as OidcConfig
from mi2b2.config.pacs import (
    DepartmentConfig as DepartmentConfig,
)
from mi2b2.config.pacs import (
    DestinationConfig as DestinationConfig,
)
from mi2b2.config.pacs import (
    InstitutionConfig as InstitutionConfig,
)
from mi2b2.config.pacs import (
    MrnFormatConfig as MrnFormatConfig,
)
from mi2b2.config.pacs import (
    PacsConfig as PacsConfig,
)
from mi2b2.config.pacs import (
    RetryConfig as RetryConfig,
)
from mi2b2.config.pacs import (
    Timeouts as Timeouts,
)
from mi2b2.config.pacs import (
    WindowConfig as WindowConfig,
)
from mi2b2.config.syslog_url import SyslogTarget as SyslogTarget
from mi2b2.config.syslog_url import parse_syslog_url as parse_syslog_url
from mi2b2.domain.governance import DataPolicy
from mi2b2.domain.mrn import AllowedMrn, parse_allow_list
from mi2b2.domain.principal import login_problem
from mi2b2.errors import ConfigError, InvalidInput


class SiteSettings(Strict):
    """[site]: rules that hold for every project unless the project says otherwise."""

    timezone: str = Field("UTC", description="IANA zone whose local midnight ends an IRB's last day")
    data_policy: DataPolicy = DataPolicy.CLOSED
    irb_warning_days: int = Field(14, ge=0, description="days before the IRB expires that leads are warned; 0 = never")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str) -> str:
        return check_zone(value)


class MemberConfig(Strict):
    login: str = Field(min_length=1, max_length=64)
    role: MemberRole = MemberRole.RESEARCHER

    @field_validator("login")
    @classmethod
    def _user_login(cls, value: str) -> str:
        problem = login_problem(value)
        if problem:
            raise ValueError(problem)
        return value


class ProjectConfig(ExportPolicyFields):  # export, encrypted_only, [projects.deidentification]
    id: Identifier
    title: str = Field(min_length=1)
    irb: str = Field(min_length=1, description="IRB protocol number")
    expires: date
    mrn_file: Path | None = Field(None, description="one MRN per line (a project of one institution), "
                                                    "or a CSV with institution and MRN columns")
    mrn_files: dict[str, Path] = Field(default_factory=dict, description="institution id -> its list of MRNs")
    quota: ByteSize
    institutions: list[str] = Field(min_length=1)
    max_studies_per_patient: int | None = Field(None, ge=1)
    members: list[MemberConfig] = Field(default_factory=list)
    timezone: str | None = Field(None, description="overrides [site] timezone for this project's IRB dates")
    data_policy: DataPolicy | None = Field(None, description="overrides [site] data_policy")

    @field_validator("timezone")
    @classmethod
    def _zone(cls, value: str | None) -> str | None:
        return None if value is None else check_zone(value)

    @model_validator(mode="after")
    def _one_list_form(self) -> ProjectConfig:
        if (self.mrn_file is None) == (not self.mrn_files):
            raise ValueError("give the allow-list either as mrn_file (one file) or as mrn_files "
                             "(one file per institution: mrn_files = { institution = \"file\" }), not both or neither")
        return self

    def allow_list_files(self) -> dict[str | None, Path]:
        """Each file of the allow-list, by the institution it lists (None: the file names its institutions)."""
        if self.mrn_file is not None:
            return {None: self.mrn_file}
        return {institution: path for institution, path in self.mrn_files.items()}


class ServerConfig(Strict):
    http_host: str = "127.0.0.1"
    http_port: Port = 8080
    database_url: str = "sqlite:///mi2b2.db"
    cache_dir: Path = Path("cache")
    tls_cert: Path | None = None
    tls_key: Path | None = None
    session_hours: float = Field(12, gt=0)
    max_token_days: float = Field(90, gt=0, le=3650, description="the longest lifetime an API token may be given")
    run_worker: bool = True
    run_receiver: bool = True
    receiver_process: bool = Field(True, description="run the DICOM receiver in its own process (uses a second core)")
    worker_poll_seconds: float = Field(2.0, gt=0, description="how often the scheduler looks for work")
    public_url: str | None = Field(None, description="the address users reach mi2b2 at, e.g. https://mi2b2.example.org; "
                                                     "DICOMweb RetrieveURLs are built from it, not from the Host header")
    max_body: ByteSize = Field(64 * 1024 * 1024, ge=1024, description="largest request body any caller may send "
                                                                  "(an allow-list upload is the largest); over it: 413")
    max_anonymous_body: ByteSize = Field(64 * 1024, ge=1024, description="largest body read before the caller is "
                                                                       "authenticated (a login is tiny); over it: 413")

    @field_validator("public_url")
    @classmethod
    def _public_url(cls, value: str | None) -> str | None:
        if value is None:
            return None
        parsed = urlsplit(value)
        if parsed.scheme not in ("http", "https") or not parsed.netloc or parsed.query or parsed.fragment:
            raise ValueError(f"public_url {value!r} must be an http(s) address such as https://mi2b2.example.org")
        return value.rstrip("/")

    @model_validator(mode="after")
    def _tls_pair(self) -> ServerConfig:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("set both tls_cert and tls_key, or neither")
        if self.tls_cert is None and self.http_host not in ("127.0.0.1", "localhost", "::1"):
            raise ValueError(
                f"http_host {self.http_host!r} is not loopback: plain HTTP is only allowed on 127.0.0.1; "
                "set tls_cert and tls_key to serve other hosts"
            )
        return self


class DicomConfig(Strict):
    ae_title: AeTitle = "MI2B2"
    host: str = "127.0.0.1"
    port: Port = 11112
    max_pdu: int = Field(1024 * 1024, ge=16384, le=64 * 1024 * 1024,
                         description="largest PDU mi2b2 accepts (and advertises), in bytes; a longer one is aborted")
    max_instance_size: ByteSize = Field(2 * 1024**3, ge=1024, description="largest instance the receiver takes; "
                                                                          "a larger one is refused, nothing kept")
    max_associations_per_peer: int = Field(8, ge=1, le=64, description="associations one address may hold open at once")
    network_timeout: float = Field(60.0, gt=0, description="seconds a peer may stay silent, or take over one PDU, "
                                                           "before the receiver aborts its association")
    tls: ReceiverTls | None = Field(None, description="DICOM TLS on the receiver's port (see README, DICOM TLS)")
    processes: int = Field(1, ge=1, le=64, description="receiver processes sharing the port (SO_REUSEPORT, Linux): "
                                                       "the kernel spreads the PACS's associations over them")
    proxy_protocol_from: list[str] = Field(
        default_factory=list, description='the L4 balancers in front of the receiver (IPs or CIDR), e.g. '
                                          '["10.0.0.10"]: their connections must begin with a PROXY header '
                                          '(HAProxy send-proxy-v2) naming the real sender; from anywhere else '
                                          'one is refused as forged')

    @field_validator("proxy_protocol_from")
    @classmethod
    def _balancers(cls, value: list[str]) -> list[str]:
        networks = []
        for network in value:
            try:
                networks.append(str(ipaddress.ip_network(network.strip(), strict=False)))
            except ValueError:
                raise ValueError(f"{network!r} is not an IP address or network; write the balancers' addresses, "
                                 'e.g. proxy_protocol_from = ["10.0.0.10", "10.1.0.0/24"]') from None
        return networks

    @model_validator(mode="before")
    @classmethod
    def _old_tls_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and ("tls_cert" in data or "tls_key" in data):
            raise ValueError("dicom.tls_cert and dicom.tls_key are now a [dicom.tls] table: "
                             'tls = { cert_file = "receiver.pem", key_file = "receiver.key", ca_file = "pacs-ca.pem" }')
        return data


class SearchConfig(Strict):
    """Large searches run as background jobs; every search shares the PACS's query limits."""

    job_threshold: int = Field(200, ge=1, description="more identifiers than this run as a search job")
    job_batch: int = Field(100, ge=1, description="identifiers a job searches between two IRB checks")
    max_identifiers: int = Field(100_000, ge=1, description="identifiers one search may name at most")
    lease_seconds: float = Field(60, gt=0, description="a query slot of a killed process frees after this")
    wait_seconds: float = Field(30, ge=0, description="how long an interactive search waits for a query slot")


class SmtpConfig(Strict):
    host: str
    port: Port = 25
    sender: str = "mi2b2@localhost"
    starttls: bool = False


class AuditConfig(Strict):
    """Where the audit trail's key and checkpoints live: outside the database, on purpose."""

    key_file: Path = Field(Path("audit.key"), description="HMAC key of the audit chain; `mi2b2 audit init-key` makes it")
    checkpoint_file: Path | None = Field(None, description="signed chain heads, appended; default: "
                                                           "audit-checkpoints.jsonl beside the key file")
    checkpoint_seconds: float = Field(300.0, gt=0, description="how often a worker appends a checkpoint")
    syslog: str | None = Field(None, description='also send each checkpoint to this syslog server, '
                                                 '"tcp://host:port" or "udp://host:port" (RFC 5424)')

    @field_validator("syslog")
    @classmethod
    def _syslog(cls, value: str | None) -> str | None:
        return None if value is None else str(parse_syslog_url(value))

    atna: AtnaConfig | None = Field(None, description="[audit.atna]: every audit event also goes to the security "
                                                     "team's syslog as an IHE ATNA message")

    def syslog_target(self) -> SyslogTarget | None:
        return None if self.syslog is None else parse_syslog_url(self.syslog)


class MetricsConfig(Strict):
    """[metrics]: Prometheus at /metrics, for the monitoring's token or its addresses only."""

    enabled: bool = False
    token_file: Path | None = Field(None, description="file holding the bearer token a scraper sends")
    allow_from: list[str] = Field(default_factory=list, description='client networks that need no token, '
                                                                    'e.g. ["127.0.0.1/32", "10.1.0.0/16"]')

    @field_validator("allow_from")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        return [str(ipaddress.ip_network(network, strict=False)) for network in value]

    @model_validator(mode="after")
    def _someone_may_read(self) -> MetricsConfig:
        if self.enabled and self.token_file is None and not self.allow_from:
            raise ValueError("[metrics] is enabled but nobody may read it: set token_file, allow_from or both")
        return self


class SiteConfig(Strict):
    server: ServerConfig = ServerConfig()
    audit: AuditConfig = AuditConfig()
    dicom: DicomConfig = DicomConfig()
    search: SearchConfig = SearchConfig()
    smtp: SmtpConfig | None = None
    metrics: MetricsConfig = MetricsConfig()
    ldap: LdapConfig | None = None
    oidc: OidcConfig | None = None
    site: SiteSettings = SiteSettings()
    institutions: list[InstitutionConfig] = Field(default_factory=list)
    destinations: list[DestinationConfig] = Field(default_factory=list)
    projects: list[ProjectConfig] = Field(default_factory=list)
    source: Path | None = Field(None, exclude=True, description="file this was read from")
    # Allow-lists as read when the file was loaded, so what is applied is exactly what was validated.
    _allow_lists: dict[str, list[AllowedMrn]] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _cross_references(self) -> SiteConfig:
        _unique("institutions", [i.id for i in self.institutions])
        _unique("pacs", [p.id for p in self.all_pacs()])
        _unique("destinations", [d.id for d in self.destinations])
        _unique("projects", [p.id for p in self.projects])
        institution_ids = {i.id for i in self.institutions}
        project_ids = {p.id for p in self.projects}
        for inst in self.institutions:
            _unique(f"departments of institution {inst.id!r}", [d.id for d in inst.departments])
        for project in self.projects:
            for inst_id in project.institutions:
                if inst_id not in institution_ids:
                    raise ValueError(
                        f"project {project.id!r} names institution {inst_id!r}, which is not configured; "
                        f"configured institutions: {sorted(institution_ids) or 'none'}"
                    )
            _unique(f"members of project {project.id!r}", [m.login for m in project.members])
            for inst_id in project.mrn_files:
                if inst_id not in project.institutions:
                    where = "is not configured" if inst_id not in institution_ids else "is not one the project reaches"
                    raise ValueError(
                        f"project {project.id!r}: mrn_files names institution {inst_id!r}, which {where}; "
                        f"use one of the project's institutions ({', '.join(project.institutions)})"
                    )
        issuers: dict[str, str] = {}
        for inst in self.institutions:
            if inst.issuer is not None and inst.issuer in issuers:
                raise ValueError(f"institutions {issuers[inst.issuer]!r} and {inst.id!r} both name issuer "
                                 f"{inst.issuer!r}; an Issuer of Patient ID belongs to one institution")
            if inst.issuer is not None:
                issuers[inst.issuer] = inst.id
        for dest in self.destinations:
            for project_id in dest.projects:
                if project_id not in project_ids:
                    raise ValueError(f"destination {dest.id!r} names unknown project {project_id!r}")
        return self

    def all_pacs(self) -> list[PacsConfig]:
        return [p for i in self.institutions for d in i.departments for p in d.pacs]

    def pacs_location(self, pacs_id: str) -> tuple[InstitutionConfig, DepartmentConfig, PacsConfig]:
        for inst in self.institutions:
            for dept in inst.departments:
                for pacs in dept.pacs:
                    if pacs.id == pacs_id:
                        return inst, dept, pacs
        known = ", ".join(p.id for p in self.all_pacs()) or "none"
        raise InvalidInput(f"unknown PACS {pacs_id!r}; configured PACS: {known}")

    def project_zone(self, project_id: str) -> str:
        """The time zone of a project's IRB dates: its own, else the site's (also for a removed project)."""
        project = next((p for p in self.projects if p.id == project_id), None)
        return (project.timezone if project else None) or self.site.timezone

    def project_data_policy(self, project_id: str) -> DataPolicy:
        project = next((p for p in self.projects if p.id == project_id), None)
        return (project.data_policy if project else None) or self.site.data_policy

    def institution(self, institution_id: str) -> InstitutionConfig:
        for inst in self.institutions:
            if inst.id == institution_id:
                return inst
        raise InvalidInput(f"unknown institution {institution_id!r}; configured: "
                           f"{', '.join(i.id for i in self.institutions) or 'none'}")

    def allow_list(self, project: ProjectConfig) -> list[AllowedMrn]:
        """The project's allow-list as (institution, canonical MRN) pairs."""
        if project.id not in self._allow_lists:
            self._allow_lists[project.id] = load_allow_list(self, project)
        return self._allow_lists[project.id]

    def tls_blocks(self) -> Iterator[tuple[str, DicomTls | ReceiverTls]]:
        """Every DICOM TLS block, with where it is in the file."""
        if self.dicom.tls is not None:
            yield "dicom.tls", self.dicom.tls
        for pacs in self.all_pacs():
            if pacs.tls is not None:
                yield f"pacs[{pacs.id!r}].tls", pacs.tls
        for dest in self.destinations:
            if dest.tls is not None:
                yield f"destinations[{dest.id!r}].tls", dest.tls

    def base_dir(self) -> Path:
        return self.source.parent if self.source else Path.cwd()

    def resolve(self, path: Path) -> Path:
        return path if path.is_absolute() else self.base_dir() / path

    def database_url(self) -> str:
        url = self.server.database_url
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != "sqlite:///:memory:":
            return prefix + str(self.resolve(Path(url[len(prefix):])))
        return url

    def cache_dir(self) -> Path:
        return self.resolve(self.server.cache_dir)

    def audit_key_file(self) -> Path:
        return self.resolve(self.audit.key_file)

    def metrics_token_file(self) -> Path | None:
        return None if self.metrics.token_file is None else self.resolve(self.metrics.token_file)

    def audit_checkpoint_file(self) -> Path:
        if self.audit.checkpoint_file is not None:
            return self.resolve(self.audit.checkpoint_file)
        return self.audit_key_file().parent / "audit-checkpoints.jsonl"


def _unique(what: str, ids: list[str]) -> None:
    seen: set[str] = set()
    for item in ids:
        if item in seen:
            raise ValueError(f"{what}: id {item!r} is used twice; ids must be unique")
        seen.add(item)


def _location(loc: tuple[int | str, ...], data: Any) -> str:
    """('institutions', 0, 'departments', 1, 'port') -> institutions[mgh].departments[1].port"""
    parts: list[str] = []
    node = data
    for item in loc:
        if isinstance(item, int):
            label = str(item)
            if isinstance(node, list) and item < len(node) and isinstance(node[item], dict) and "id" in node[item]:
                label = repr(node[item]["id"])
            parts[-1] += f"[{label}]"
            node = node[item] if isinstance(node, list) and item < len(node) else None
        else:
            parts.append(str(item))
            node = node.get(item) if isinstance(node, dict) else None
    return ".".join(parts) or "(top level)"


def describe_validation_error(error: ValidationError, data: Any) -> str:
    lines = []
    for issue in error.errors():
        where = _location(tuple(issue["loc"]), data)
        message = issue["msg"].removeprefix("Value error, ")
        if issue["type"] == "extra_forbidden":
            message = "unknown setting (check its spelling and section)"
        elif issue["type"] == "missing":
            message = "required setting is missing"
        lines.append(f"  {where}: {message}")
    return "\n".join(lines)


def parse_config(text: str, source: Path | None = None) -> SiteConfig:
    name = str(source) if source else "configuration"
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{name} is not valid TOML: {exc}") from None
    try:
        config = SiteConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(f"{name} has errors:\n{describe_validation_error(exc, data)}") from None
    return config.model_copy(update={"source": source})


def load_config(path: Path | str) -> SiteConfig:
    path = Path(path).resolve()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"configuration file {path} does not exist; create it or pass --config") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read configuration file {path}: {exc}") from None
    config = parse_config(text, source=path)
    try:
        check_tls_files(config.tls_blocks(), config.resolve)
    except ValueError as exc:
        raise ConfigError(f"{path}: {exc}") from None
    for project in config.projects:
        config.allow_list(project)  # fail now, not at the first search
    return config


def load_allow_list(config: SiteConfig, project: ProjectConfig) -> list[AllowedMrn]:
    reached = {i: config.institution(i).rules() for i in project.institutions}
    known = [i.id for i in config.institutions]
    entries: list[AllowedMrn] = []
    for institution, file in project.allow_list_files().items():
        path = config.resolve(file)
        setting = "projects.mrn_file" if institution is None else f"projects.mrn_files.{institution}"
        try:
            text = path.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise ConfigError(
                f"project {project.id!r}: MRN allow-list file {path} does not exist; "
                f"create it with one MRN per line or fix {setting}"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"project {project.id!r}: cannot read MRN allow-list {path}: {exc}") from None
        try:
            entries.extend(parse_allow_list(text, reached, known, institution).entries)
        except InvalidInput as exc:
            raise ConfigError(f"project {project.id!r}: MRN allow-list {path}: {exc}") from None
    return list(dict.fromkeys(entries))
