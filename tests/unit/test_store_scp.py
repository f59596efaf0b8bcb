"""The receiver's hand-made encodings, checked against pydicom/pynetdicom's own."""

from __future__ import annotations

import copy
import io
import struct
import time
import warnings
from pathlib import Path

import pydicom
import pytest
from pydicom import dcmread
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import decode

from mi2b2.adapters.dicom import files
from mi2b2.adapters.dicom.store_scp import scp_contexts
from mi2b2.adapters.dicom.store_wire import (
    IMPLEMENTATION_CLASS_UID,
    StoreRequest,
    file_meta,
    p_data_fragments,
    parse_store_request,
    store_response,
)
from mi2b2.synthetic import SyntheticStudy, write_study


def _command_set(primitive: C_STORE | C_ECHO, message: C_STORE_RQ | C_ECHO_RQ) -> bytes:
    message.primitive_to_message(primitive)
    (pdu,) = list(message.encode_msg(1, 0))[:1]
    _, data = pdu.presentation_data_value_list[0]
    assert data[0] == 0x03  # command, last fragment
    return bytes(data[1:])


def test_store_request_is_parsed_like_pynetdicom_encodes_it() -> None:
    request = C_STORE()
    request.MessageID, request.Priority = 7, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CTImageStorage, "1.2.3.4.5"  # odd length: padded
    request.MoveOriginatorApplicationEntityTitle, request.MoveOriginatorMessageID = "MI2B2", 42
    request.DataSet = io.BytesIO(b"\x00" * 8)
    arrival = parse_store_request(_command_set(request, C_STORE_RQ()), context_id=3)
    assert arrival is not None
    assert (arrival.context_id, arrival.message_id) == (3, 7)
    assert (arrival.sop_class, arrival.sop_instance) == (CTImageStorage, "1.2.3.4.5")
    assert (arrival.originator_ae, arrival.originator_message_id) == ("MI2B2", 42)


def test_other_commands_are_left_to_pynetdicom() -> None:
    echo = C_ECHO()
    echo.MessageID, echo.AffectedSOPClassUID = 1, "1.2.840.10008.1.1"
    assert parse_store_request(_command_set(echo, C_ECHO_RQ()), context_id=1) is None
    assert parse_store_request(b"\x00\x00\x00\x01\xff\xff", context_id=1) is None  # truncated


def test_store_response_decodes_as_a_c_store_rsp() -> None:
    arrival = StoreRequest(context_id=1, message_id=9, sop_class=CTImageStorage, sop_instance="1.2.3.4.5",
                       originator_ae=None, originator_message_id=None)
    command = decode(io.BytesIO(store_response(arrival, 0xA700)), True, True)
    assert command.CommandField == 0x8001
    assert command.MessageIDBeingRespondedTo == 9
    assert command.CommandDataSetType == 0x0101
    assert command.Status == 0xA700
    assert command.AffectedSOPClassUID == CTImageStorage
    assert command.AffectedSOPInstanceUID == "1.2.3.4.5"
    encoded = store_response(arrival, 0)
    assert struct.unpack_from("<I", encoded, 8)[0] == len(encoded) - 12  # CommandGroupLength


def test_file_meta_reads_back_with_pydicom(tmp_path: Path) -> None:
    sop_uid = "1.2.3.4.5"  # odd length: padded with NUL
    path = tmp_path / "x.dcm"
    path.write_bytes(file_meta(CTImageStorage, sop_uid, ExplicitVRLittleEndian, "ORTHANC"))
    meta = dcmread(path).file_meta
    assert meta.MediaStorageSOPClassUID == CTImageStorage
    assert meta.MediaStorageSOPInstanceUID == sop_uid
    assert meta.TransferSyntaxUID == ExplicitVRLittleEndian
    assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID
    assert meta.SourceApplicationEntityTitle == "ORTHANC"
    assert meta.FileMetaInformationVersion == b"\x00\x01"


def test_fragments_of_a_p_data_pdu() -> None:
    def pdv(context_id: int, header: int, data: bytes) -> bytes:
        return struct.pack(">IBB", len(data) + 2, context_id, header) + data

    body = pdv(1, 0x03, b"cmd") + pdv(3, 0x00, b"data")
    pdu = memoryview(bytearray(struct.pack(">BBI", 4, 0, len(body)) + body))
    assert [(cx, bytes(data)) for cx, data in p_data_fragments(pdu) or []] == [(1, b"\x03cmd"), (3, b"\x00data")]
    assert p_data_fragments(pdu[:-2]) is None  # an item longer than the PDU
    assert p_data_fragments(memoryview(bytearray(struct.pack(">BBI", 4, 0, 0)))) is None


def test_scp_contexts_copy_cheaply_but_separately() -> None:
    contexts = scp_contexts()
    clone = copy.deepcopy(contexts)
    assert [c.abstract_syntax for c in clone] == [c.abstract_syntax for c in contexts]
    clone[1].transfer_syntax = [ExplicitVRLittleEndian]
    assert len(contexts[1].transfer_syntax) > 1


def _pydicom_test_files() -> list[Path]:
    # Only the files shipped inside the package: never the downloadable ones.
    base = Path(pydicom.__file__).parent / "data" / "test_files"
    return sorted(p for p in base.rglob("*") if p.is_file())


def test_fast_header_agrees_with_pydicom(tmp_path: Path) -> None:
    paths = write_study(SyntheticStudy("P-1", "ÖLÇER^ZOË", "19700101", "F", "A1", "20240101", "MR", "ÄÖ", 1, 2, 16, 16), tmp_path)
    paths += write_study(SyntheticStudy("P-2", "DOE^JO", "19700101", "F", "A2", "20240101", "US", "US", 1, 1, 16, 16), tmp_path)
    paths += _pydicom_test_files()
    compared = 0
    for path in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                expected = files._pydicom_header(path)
            except Exception:
                continue  # pydicom itself cannot file it
        fast = files.parse_instance_header(path.read_bytes()[: 64 * 1024])
        if fast is not None:
            assert fast == expected, path.name
            compared += 1
    assert compared >= 50


@pytest.mark.parametrize("head", [b"", b"\x00" * 200, b"\x00" * 128 + b"DICM" + b"\xff" * 64])
def test_fast_header_declines_what_it_does_not_understand(head: bytes) -> None:
    assert files.parse_instance_header(head) is None


# --- retrieve against a fake PACS that ignores C-CANCEL ------------------------------------
# No real PACS does (the integration tests show all three honour it), so this
# one is a pynetdicom C-MOVE SCP that keeps going.


def test_a_pacs_ignoring_cancel_is_aborted_after_the_grace_period(tmp_path: Path) -> None:
    from pynetdicom import AE, evt
    from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelMove

    from mi2b2.adapters.dicom.retrieve import RetrieveProgress, move_study
    from mi2b2.adapters.dicom.scu import DicomPeer, LocalAE, QueryModel
    from mi2b2.adapters.dicom.store_scp import StoreServer

    class Keep:
        def accept(self, instance: object) -> int:
            return 0

    receiver = StoreServer(LocalAE("DEST"), "127.0.0.1", 0, Keep(), tmp_path / "incoming")
    receiver.start()
    instance = dcmread(write_study(SyntheticStudy("P-9", "X^Y", "19700101", "F", "A9", "20240101", "CT", "CT", 1, 1, 8, 8),
                                   tmp_path)[0])

    def handle_move(event: evt.Event) -> object:
        yield "127.0.0.1", receiver.port
        yield 40
        for _ in range(40):  # never looks at event.is_cancelled
            time.sleep(0.1)
            yield 0xFF00, instance

    pacs = AE("FAKEPACS")
    pacs.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    pacs.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    server = pacs.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_MOVE, handle_move)])
    try:
        progress: list[RetrieveProgress] = []
        started = time.monotonic()
        result = move_study(LocalAE("MI2B2"), DicomPeer("FAKEPACS", "127.0.0.1", server.server_address[1]), "DEST",
                            QueryModel.STUDY_ROOT, "1.2.3", "", on_progress=progress.append,
                            should_cancel=lambda: len(progress) >= 2, cancel_grace=0.5)
        assert result.canceled and result.status == 0xFE00
        assert 2 <= result.completed < 40
        assert time.monotonic() - started < 3
    finally:
        server.shutdown()
        receiver.stop()
    assert list((tmp_path / "incoming").iterdir()) == []
