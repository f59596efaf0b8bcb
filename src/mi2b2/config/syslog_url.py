"""Syslog collector addresses: ``tcp://``, ``udp://`` and (for ATNA) ``tls://host:port``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal
from urllib.parse import urlsplit

TLS_SCHEMES = ("tls", "tcp+tls", "ssl", "syslog-tls")


@dataclass(frozen=True)
class SyslogTarget:
    transport: Literal["tcp", "udp", "tls"]
    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.transport}://{host}:{self.port}"


def parse_syslog_url(url: str, *, tls: bool = False) -> SyslogTarget:
    """``tcp://host:port`` or ``udp://host:port`` (and ``tls://host:port`` when ``tls``);
    ValueError naming the fix for anything else."""
    example = ('write e.g. "tls://127.0.0.1:6514", "tcp://127.0.0.1:514" or "udp://syslog.example.org:514"' if tls
               else 'write e.g. "tcp://127.0.0.1:6514" or "udp://syslog.example.org:514"')
    parsed = urlsplit(url.strip())
    if parsed.scheme in TLS_SCHEMES and not tls:
        raise ValueError(f"syslog {url!r}: TLS syslog is not supported yet here; use plain tcp:// or udp:// (to a "
                         f"relay on this host if the link must be encrypted; [audit.atna] syslog does speak TLS); "
                         f"{example}")
    if parsed.scheme not in ("tcp", "udp", *(("tls",) if tls else ())):
        raise ValueError(f"syslog {url!r} must start with {'tls://, ' if tls else ''}tcp:// or udp://; {example}")
    try:
        port = parsed.port
    except ValueError:
        port = None
    if (not parsed.hostname or port is None or port == 0 or parsed.path not in ("", "/")
            or parsed.query or parsed.fragment or "@" in parsed.netloc):
        raise ValueError(f"syslog {url!r} must be exactly a host and a port (1-65535); {example}")
    transport: Literal["tcp", "udp", "tls"] = "tls" if parsed.scheme == "tls" else (
        "tcp" if parsed.scheme == "tcp" else "udp")
    return SyslogTarget(transport, parsed.hostname, port)
