"""PACS nodes as the services see them: connection details and reachability."""

from __future__ import annotations

from dataclasses import dataclass

from mi2b2.adapters.dicom.scu import DicomPeer, FindSession, LocalAE, echo, open_find_session
from mi2b2.adapters.dicom.tls import TlsClient, TlsServer
from mi2b2.config import DicomTls, PacsConfig, SiteConfig
from mi2b2.errors import Mi2b2Error


def local_ae(config: SiteConfig) -> LocalAE:
    return LocalAE(ae_title=config.dicom.ae_title, max_pdu=config.dicom.max_pdu)


def receiver_tls(config: SiteConfig) -> TlsServer | None:
    """DICOM TLS on the receiver's port, as ``[dicom.tls]`` sets it."""
    tls = config.dicom.tls
    if tls is None:
        return None
    return TlsServer(config.resolve(tls.cert_file), config.resolve(tls.key_file),
                     None if tls.ca_file is None else config.resolve(tls.ca_file), tls.require_client_cert)


def client_tls(config: SiteConfig, tls: DicomTls | None, setting: str, peer_kind: str = "PACS") -> TlsClient | None:
    """DICOM TLS for associations mi2b2 opens, its files resolved against the configuration's folder."""
    if tls is None:
        return None
    return TlsClient(
        config.resolve(tls.ca_file),
        None if tls.cert_file is None else config.resolve(tls.cert_file),
        None if tls.key_file is None else config.resolve(tls.key_file),
        tls.server_name, setting, peer_kind,
    )


def peer_for(pacs: PacsConfig, config: SiteConfig) -> DicomPeer:
    t = pacs.timeouts
    tls = client_tls(config, pacs.tls, f"pacs[{pacs.id!r}].tls")
    return DicomPeer(pacs.ae_title, pacs.host, pacs.port, t.connect, t.acse, t.dimse, t.network, tls)


def open_find(config: SiteConfig, pacs: PacsConfig) -> FindSession:
    return open_find_session(local_ae(config), peer_for(pacs, config))


@dataclass(frozen=True)
class EchoReport:
    pacs_id: str
    institution: str
    department: str
    address: str
    reachable: bool
    milliseconds: float | None
    problem: str


def echo_pacs(config: SiteConfig, pacs_ids: list[str] | None = None) -> list[EchoReport]:
    reports = []
    wanted = pacs_ids or [p.id for p in config.all_pacs()]
    for pacs_id in wanted:
        inst, dept, pacs = config.pacs_location(pacs_id)
        address = f"{pacs.ae_title}@{pacs.host}:{pacs.port}" + (" (DICOM TLS)" if pacs.tls is not None else "")
        try:
            seconds = echo(local_ae(config), peer_for(pacs, config))
        except Mi2b2Error as exc:
            reports.append(EchoReport(pacs.id, inst.id, dept.id, address, False, None, str(exc)))
        else:
            reports.append(EchoReport(pacs.id, inst.id, dept.id, address, True, round(seconds * 1000, 1), ""))
    return reports
