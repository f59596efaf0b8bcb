"""``[audit.atna]``: every audit event also goes to the security team's syslog collector (SIEM) as an
IHE ATNA audit message (DICOM PS3.15 A.5), over TLS (RFC 5425), UDP (RFC 5426) or plain TCP."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, field_validator, model_validator

from mi2b2.config.fields import Strict
from mi2b2.config.syslog_url import SyslogTarget, parse_syslog_url

UDP_LIMIT = 65000  # what one IPv4 datagram carries, minus headers, rounded down


class AtnaConfig(Strict):
    syslog: str = Field(description='the collector: "tls://siem.example.org:6514" (RFC 5425), '
                                    '"udp://host:514" (RFC 5426) or "tcp://host:514"')
    ca_file: Path | None = Field(None, description="tls: CA certificates the collector's certificate must chain to "
                                                   "(default: the system's)")
    cert_file: Path | None = Field(None, description="tls: mi2b2's client certificate, if the collector asks for one")
    key_file: Path | None = Field(None, description="tls: the client certificate's private key")
    server_name: str | None = Field(None, description="tls: the name the collector's certificate must carry "
                                                      "(default: the host in syslog)")
    audit_source_id: str | None = Field(None, description="AuditSourceID in every message (default: this host's "
                                                          "name); the SIEM tells sources apart by it")
    enterprise_site_id: str | None = Field(None, description="AuditEnterpriseSiteID, e.g. the hospital's name")
    max_message_bytes: int = Field(8192, ge=4096, le=1048576,
                                   description="a message longer than this is shortened (instance lists, then the "
                                               "query text give way to counts and a digest); the collector must "
                                               "accept it (rsyslog: global(maxMessageSize=...))")
    retry_max_seconds: float = Field(60.0, gt=0, le=3600, description="longest pause between delivery attempts "
                                                                      "while the collector is unreachable")

    @field_validator("syslog")
    @classmethod
    def _syslog(cls, value: str) -> str:
        return str(parse_syslog_url(value, tls=True))

    @model_validator(mode="after")
    def _tls_files(self) -> AtnaConfig:
        target = self.target()
        tls_only = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file,
                    "server_name": self.server_name}
        given = [name for name, value in tls_only.items() if value is not None]
        if target.transport != "tls" and given:
            raise ValueError(f"[audit.atna] {', '.join(given)} only apply to a tls:// collector; "
                             f"remove them or write syslog = \"tls://{target.host}:6514\"")
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("[audit.atna] cert_file and key_file go together: set both (client certificate) or "
                             "neither")
        if target.transport == "udp" and self.max_message_bytes > UDP_LIMIT:
            raise ValueError(f"[audit.atna] max_message_bytes = {self.max_message_bytes} does not fit one UDP "
                             f"datagram; at most {UDP_LIMIT} over udp://")
        return self

    def target(self) -> SyslogTarget:
        return parse_syslog_url(self.syslog, tls=True)
