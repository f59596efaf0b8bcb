"""Pure rules of the receiver's doors: who a peer is, which UIDs may become file names,
and audit values that always fit their column."""

from __future__ import annotations

import ipaddress

import pytest

from mi2b2.config import ConfigError, parse_config
from mi2b2.domain.audit_chain import fit_field
from mi2b2.domain.receipt import InFlight, PacsIdentity, identify_peer, judge_receipt

NODES = [
    PacsIdentity("main", "PACS", (ipaddress.ip_network("10.0.0.5/32"),)),
    PacsIdentity("backup", "PACS", (ipaddress.ip_network("10.0.1.0/28"),)),
    PacsIdentity("other", "OTHER", (ipaddress.ip_network("10.0.2.1/32"),)),
]


def test_a_pacs_is_its_ae_title_and_its_addresses() -> None:
    assert identify_peer("PACS", "10.0.0.5", NODES).pacs_ids == ("main",)
    assert identify_peer("PACS ", "10.0.1.7", NODES).pacs_ids == ("backup",)
    assert identify_peer("PACS", "::ffff:10.0.0.5", NODES).pacs_ids == ("main",)  # IPv4-mapped
    spoofed = identify_peer("PACS", "10.9.9.9", NODES)
    assert spoofed.pacs_ids == () and spoofed.refusal is not None and "10.9.9.9" in spoofed.refusal
    assert identify_peer("PACS", "not-an-address", NODES).refusal is not None
    # A workstation that names no PACS is no PACS: accepted (C-ECHO), its instances refused later.
    assert identify_peer("WORKSTATION", "10.9.9.9", NODES) == identify_peer("WORKSTATION", "10.9.9.9", [])
    assert identify_peer("WORKSTATION", "10.9.9.9", NODES).refusal is None


def test_uids_that_are_not_uids_are_refused_as_strays() -> None:
    request = InFlight(1, "alpha", "main", "77", frozenset(), True, 1000, 0)
    assert judge_receipt(request, "77", "1.2.3", 10, None, "MI2B2", other_uids=("1.2", "1.2.4")) is None
    for series, others in [("1.2.3.evil/../x", ("1.2", "1.3")), ("1.2.3", ("1." + "2" * 70, "1.3")),
                           ("1.2.3", ("1.2", "")), ("", ("1.2", "1.3"))]:
        refusal = judge_receipt(request, "77", series, 10, None, "MI2B2", other_uids=others)
        assert refusal is not None and refusal.stray and "not a DICOM UID" in refusal.reason
    # The retrieval's own instances refused (quota) count against it; strays never do.
    quota = judge_receipt(InFlight(1, "alpha", "main", "77", frozenset(), True, 5, 0), "77", "1.2", 10, None, "MI2B2")
    assert quota is not None and not quota.stray
    assert judge_receipt(request, "78", "1.2", 10, None, "MI2B2").stray


@pytest.mark.parametrize("value", ["P" * 65, "9" * 10_000, "A\x00B" * 30, "\udcff" * 70])
def test_audit_values_always_fit_and_stay_distinct(value: str) -> None:
    fitted = fit_field(value, 64)
    assert fitted is not None and len(fitted) <= 64 and "\x00" not in fitted
    fitted.encode("utf-8")  # storable in PostgreSQL
    assert fit_field(value + "x", 64) != fitted


def test_short_values_are_kept_as_they_are() -> None:
    assert fit_field("000123", 64) == "000123"
    assert fit_field("x" * 64, 64) == "x" * 64
    assert fit_field(None, 64) is None
    assert fit_field("A\x00", 64) == "A\ufffd"


def test_receiver_settings_are_validated() -> None:
    base = '[[institutions]]\nid = "i"\n[[institutions.departments]]\nid = "d"\n'
    pacs = '[[institutions.departments.pacs]]\nid = "p"\nae_title = "PACS"\nhost = "pacs.example.org"\nport = 104\n'
    config = parse_config(base + pacs + 'addresses = ["10.0.0.5", "10.0.1.0/28"]\n')
    assert config.all_pacs()[0].addresses == ["10.0.0.5", "10.0.1.0/28"]
    assert config.dicom.max_pdu == 1024 * 1024  # bounded by default: never "unlimited"
    with pytest.raises(ConfigError, match="not an IP address"):
        parse_config(base + pacs + 'addresses = ["pacs.example.org"]\n')
    with pytest.raises(ConfigError, match="max_pdu"):
        parse_config("[dicom]\nmax_pdu = 0\n")
    assert parse_config('[dicom]\nmax_instance_size = "1 GiB"\n').dicom.max_instance_size == 1024**3
