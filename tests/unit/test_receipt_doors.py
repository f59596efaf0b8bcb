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


def test_an_instance_belongs_to_the_retrieval_whose_c_move_it_names() -> None:
    from mi2b2.domain.receipt import Candidate, MoveOrigin, match_retrieval, move_message_id

    study, other = "1.2.840.1", "1.2.840.2"
    # Two projects retrieving one study from one PACS, and a third retrieval of another study.
    alpha = Candidate(7, study, move_message_id(7), "MI2B2")
    gamma = Candidate(9, study, move_message_id(9), "MI2B2")
    elsewhere = Candidate(8, other, move_message_id(8), "MI2B2")
    both = [gamma, elsewhere, alpha]
    assert match_retrieval(both, study, MoveOrigin("MI2B2", move_message_id(9)), "MI2B2") == 9
    assert match_retrieval(both, study, MoveOrigin("MI2B2 ", move_message_id(7)), "MI2B2") == 7
    # A message id is only ours when our AE title asked: pynetdicom's qrscp names itself.
    assert match_retrieval(both, study, MoveOrigin("PACS", move_message_id(9)), "MI2B2") == 7
    # The PACS does not say (C-GET, or a PACS that omits it), or names an id no retrieval of the study sent:
    # the oldest retrieval of the study, as before message ids were recorded.
    assert match_retrieval(both, study, MoveOrigin(), "MI2B2") == 7
    assert match_retrieval(both, study, MoveOrigin("MI2B2", None), "MI2B2") == 7
    assert match_retrieval(both, study, MoveOrigin("MI2B2", move_message_id(8)), "MI2B2") == 7
    # A message id never takes an instance into another study's retrieval.
    assert match_retrieval(both, "1.2.840.3", MoveOrigin("MI2B2", move_message_id(9)), "MI2B2") is None
    assert match_retrieval([], study, MoveOrigin("MI2B2", 1), "MI2B2") is None
    # A C-MOVE to another AE title is not one the instances arriving here were sent for.
    assert match_retrieval([alpha, Candidate(9, study, move_message_id(9), "ELSEWHERE")], study,
                           MoveOrigin("MI2B2", move_message_id(9)), "MI2B2") == 7


def test_move_message_ids_are_valid_and_differ_between_retrievals_in_flight() -> None:
    from mi2b2.domain.receipt import MESSAGE_IDS, move_message_id

    ids = [move_message_id(n) for n in range(1, 3 * MESSAGE_IDS)]
    assert min(ids) == 1 and max(ids) == 0xFFFF
    window = [move_message_id(n) for n in range(40_000, 40_000 + MESSAGE_IDS)]
    assert len(set(window)) == MESSAGE_IDS  # any 65,535 consecutive requests get distinct ids
    assert move_message_id(12) == move_message_id(12)  # every attempt of a request names the same C-MOVE


def test_a_receipt_accounts_for_the_acknowledged_instances_or_a_write_failure() -> None:
    from mi2b2.services.receipts import Receipt

    assert Receipt(received=6, write_failure=None).accounts_for(6)
    assert not Receipt(received=5, write_failure=None).accounts_for(6)
    assert Receipt(received=0, write_failure="cannot write to the cache: No space left on device").accounts_for(6)
