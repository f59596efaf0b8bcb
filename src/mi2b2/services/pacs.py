"""PACS nodes as the services see them: connection details and reachability."""

from __future__ import annotations

from dataclasses import dataclass

from mi2b2.adapters.dicom.scu import DicomPeer, FindSession, LocalAE, echo, open_find_session
from mi2b2.config import PacsConfig, SiteConfig
from mi2b2.errors import Mi2b2Error


def local_ae(config: SiteConfig) -> LocalAE:
    return LocalAE(ae_title=config.dicom.ae_title, max_pdu=config.dicom.max_pdu)


def peer_for(pacs: PacsConfig) -> DicomPeer:
    t = pacs.timeouts
    return DicomPeer(pacs.ae_title, pacs.host, pacs.port, t.connect, t.acse, t.dimse, t.network)


def open_find(config: SiteConfig, pacs: PacsConfig) -> FindSession:
    return open_find_session(local_ae(config), peer_for(pacs))


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
        address = f"{pacs.ae_title}@{pacs.host}:{pacs.port}"
        try:
            seconds = echo(local_ae(config), peer_for(pacs))
        except Mi2b2Error as exc:
            reports.append(EchoReport(pacs.id, inst.id, dept.id, address, False, None, str(exc)))
        else:
            reports.append(EchoReport(pacs.id, inst.id, dept.id, address, True, round(seconds * 1000, 1), ""))
    return reports
