"""Retrieval (C-MOVE, C-GET) and receipt (StoreServer) against three real PACS.

Orthanc, DCMTK dcmqrscp and pynetdicom's qrscp each hold the same generated
studies and know mi2b2's receiver as a C-MOVE destination. Differences
between them, asserted here so that a change shows up:
* A destination that refuses instances: dcmqrscp and qrscp go on and report
  every sub-operation failed (0xA702 with the failed UIDs); Orthanc stops at
  the first refusal and answers 0xC000 with no counts.
* An unknown destination: 0xA801 from dcmqrscp and qrscp, 0xC000 from Orthanc.
* All three honour C-CANCEL.
* The Move Originator AE Title in the C-STOREs is ours for Orthanc and
  dcmqrscp, but qrscp puts its own there.
"""

from __future__ import annotations

import io
import os
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE

from mi2b2.adapters.dicom.errors import DimseFailure, MoveDestinationUnknown, PacsUnreachable
from mi2b2.adapters.dicom.retrieve import RetrieveProgress, RetrieveResult, get_study, move_study
from mi2b2.adapters.dicom.scu import DicomPeer, LocalAE, QueryModel
from mi2b2.adapters.dicom.store_receipt import ReceivedInstance
from mi2b2.adapters.dicom.store_scp import StoreServer
from mi2b2.adapters.dicom.store_wire import IMPLEMENTATION_CLASS_UID
from mi2b2.errors import PermanentError, RetriableError
from mi2b2.synthetic import SyntheticStudy, series_instance_uid, sop_instance_uid, study_instance_uid, write_study
from support.pacs import RunningPacs, free_port, start_dcmqrscp, start_orthanc, start_qrscp

pytestmark = [pytest.mark.pacs, pytest.mark.timeout(120)]

LOCAL = LocalAE("MI2B2")
RECEIVER_AE = "MI2B2RCV"

MR = SyntheticStudy("RET-1001", "RETRIEVE^ALICE", "19800101", "F", "RACC1", "20240105", "MR", "MR BRAIN", 3, 2, rows=16, cols=16)
CT = SyntheticStudy("RET-2002", "RETRIEVE^BOB", "19750505", "M", "RACC2", "20240106", "CT", "CT LONG", 1, 30, rows=16, cols=16)
MOVE_PACS = ["orthanc", "dcmqrscp", "qrscp"]
GET_PACS = ["qrscp", "orthanc"]  # dcmqrscp has no C-GET


# --- the receiver and its sink ------------------------------------------------------------


class FolderSink:
    """Keeps accepted instances in a folder named by SOP Instance UID; or refuses them."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.lock = threading.Lock()
        self._round = 0
        self.reset()

    def reset(self, status: int = 0x0000, delay: float = 0.0, fail: bool = False) -> None:
        self._round += 1
        self.folder = self.root / f"kept-{self._round}"
        self.folder.mkdir(parents=True)
        self.status, self.delay, self.fail = status, delay, fail
        self.received: list[ReceivedInstance] = []

    def accept(self, instance: ReceivedInstance) -> int:
        with self.lock:
            self.received.append(instance)
        if self.delay:
            time.sleep(self.delay)
        if self.fail:
            raise RuntimeError("sink broke")
        if self.status == 0x0000:
            os.replace(instance.path, self.folder / f"{instance.header.sop_instance_uid}.dcm")
        return self.status

    def kept(self) -> dict[str, Path]:
        return {path.stem: path for path in self.folder.iterdir()}


@pytest.fixture(scope="module")
def receiver(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreServer]:
    root = tmp_path_factory.mktemp("receiver")
    server = StoreServer(LocalAE(RECEIVER_AE), "127.0.0.1", 0, FolderSink(root), root / "incoming")
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def sink(receiver: StoreServer) -> Iterator[FolderSink]:
    folder_sink = receiver.sink
    assert isinstance(folder_sink, FolderSink)
    folder_sink.reset()
    yield folder_sink
    # Whatever happened, nothing is left half-received.
    assert list(receiver.incoming_dir.iterdir()) == []


# --- the PACS ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def originals(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """SOP Instance UID -> the file loaded into every PACS."""
    out = tmp_path_factory.mktemp("originals")
    return {dcmread(path, stop_before_pixels=True).SOPInstanceUID: path for study in (MR, CT) for path in write_study(study, out)}


@pytest.fixture(scope="module")
def pacs(
    tmp_path_factory: pytest.TempPathFactory, receiver: StoreServer, originals: dict[str, Path]
) -> Iterator[dict[str, RunningPacs]]:
    destinations = {RECEIVER_AE: ("127.0.0.1", receiver.port)}
    running: dict[str, RunningPacs] = {}
    try:
        for kind, start in (("orthanc", start_orthanc), ("dcmqrscp", start_dcmqrscp), ("qrscp", start_qrscp)):
            running[kind] = start(tmp_path_factory.mktemp(kind), move_destinations=destinations)
            running[kind].load(sorted(originals.values()))
        yield running
    finally:
        for server in running.values():
            server.stop()


def peer_of(server: RunningPacs) -> DicomPeer:
    return DicomPeer(server.ae_title, server.host, server.port, connect_timeout=2, acse_timeout=5, dimse_timeout=10)


def uids_of(study: SyntheticStudy, series: tuple[int, ...] | None = None) -> set[str]:
    numbers = series or tuple(range(1, study.series_count + 1))
    return {sop_instance_uid(study, s, i) for s in numbers for i in range(1, study.instances_per_series + 1)}


def dataset_bytes(path: Path) -> bytes:
    """The bytes after the File Meta group: what travelled in the C-STORE."""
    data = path.read_bytes()
    assert data[128:132] == b"DICM"
    (group_length,) = struct.unpack_from("<I", data, 132 + 8)  # (0002,0000) UL, explicit VR
    return data[132 + 12 + group_length :]


def assert_received_as_sent(
    kept: dict[str, Path], originals: dict[str, Path], expected: set[str], same_encoding: bool = True
) -> None:
    """What arrived is what the PACS holds; with `same_encoding`, byte for byte."""
    assert set(kept) == expected
    for uid in expected:
        received, original = kept[uid], originals[uid]
        if same_encoding:
            assert dataset_bytes(received) == dataset_bytes(original)
        ours, theirs = dcmread(received), dcmread(original)
        assert ours == theirs  # every data element, PixelData included
        assert ours.PixelData == theirs.PixelData
        meta = ours.file_meta
        assert meta.MediaStorageSOPClassUID == theirs.SOPClassUID
        assert meta.MediaStorageSOPInstanceUID == uid
        if same_encoding:
            assert meta.TransferSyntaxUID == theirs.file_meta.TransferSyntaxUID
        assert meta.ImplementationClassUID == IMPLEMENTATION_CLASS_UID


# --- C-MOVE --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", MOVE_PACS)
def test_move_whole_study_arrives_as_sent(
    kind: str, pacs: dict[str, RunningPacs], sink: FolderSink, originals: dict[str, Path]
) -> None:
    progress: list[RetrieveProgress] = []
    result = move_study(LOCAL, peer_of(pacs[kind]), RECEIVER_AE, QueryModel.STUDY_ROOT, study_instance_uid(MR), "",
                        on_progress=progress.append)
    assert result == RetrieveResult(status=0x0000, completed=6, failed=0, warning=0, failed_sop_uids=[], canceled=False)
    assert_received_as_sent(sink.kept(), originals, uids_of(MR))
    assert progress and progress[-1].completed <= 6
    assert [p.completed for p in progress] == sorted(p.completed for p in progress)
    for instance in sink.received:
        assert instance.peer_ae == pacs[kind].ae_title
        # qrscp names itself as the move originator: a sink cannot rely on this field.
        assert instance.move_originator_ae == (pacs[kind].ae_title if kind == "qrscp" else LOCAL.ae_title)
        assert instance.move_originator_message_id == 1
        assert instance.header.study_uid == study_instance_uid(MR)
        assert instance.header.patient_id == MR.patient_id
        assert instance.size == (sink.folder / f"{instance.header.sop_instance_uid}.dcm").stat().st_size


@pytest.mark.parametrize("kind", MOVE_PACS)
def test_move_a_series_subset(kind: str, pacs: dict[str, RunningPacs], sink: FolderSink, originals: dict[str, Path]) -> None:
    wanted = [series_instance_uid(MR, 1), series_instance_uid(MR, 3)]
    progress: list[RetrieveProgress] = []
    result = move_study(LOCAL, peer_of(pacs[kind]), RECEIVER_AE, QueryModel.STUDY_ROOT, study_instance_uid(MR), "", wanted,
                        on_progress=progress.append)
    assert (result.status, result.completed, result.failed, result.canceled) == (0x0000, 4, 0, False)
    assert_received_as_sent(sink.kept(), originals, uids_of(MR, (1, 3)))
    # One request per series: progress counts on across them.
    assert progress[-1].completed >= 3


@pytest.mark.parametrize("kind", MOVE_PACS)
def test_move_with_the_patient_root_model(kind: str, pacs: dict[str, RunningPacs], sink: FolderSink) -> None:
    result = move_study(LOCAL, peer_of(pacs[kind]), RECEIVER_AE, QueryModel.PATIENT_ROOT, study_instance_uid(MR), MR.patient_id,
                        [series_instance_uid(MR, 2)])
    assert (result.status, result.completed) == (0x0000, 2)
    assert set(sink.kept()) == uids_of(MR, (2,))


# --- C-GET ---------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", GET_PACS)
def test_get_whole_study_and_a_series(
    kind: str, pacs: dict[str, RunningPacs], sink: FolderSink, originals: dict[str, Path], tmp_path: Path
) -> None:
    # In a C-GET the PACS picks one transfer syntax per storage class from our
    # proposal: qrscp takes its own favourite, Implicit VR, and converts to it.
    same_encoding = kind != "qrscp"
    incoming = tmp_path / "incoming"
    result = get_study(LOCAL, peer_of(pacs[kind]), QueryModel.STUDY_ROOT, study_instance_uid(MR), "", sink=sink,
                       incoming_dir=incoming)
    assert result == RetrieveResult(status=0x0000, completed=6, failed=0, warning=0, failed_sop_uids=[], canceled=False)
    assert_received_as_sent(sink.kept(), originals, uids_of(MR), same_encoding)
    assert {i.peer_ae for i in sink.received} == {pacs[kind].ae_title}

    sink.reset()
    result = get_study(LOCAL, peer_of(pacs[kind]), QueryModel.PATIENT_ROOT, study_instance_uid(MR), MR.patient_id,
                       [series_instance_uid(MR, 2), series_instance_uid(MR, 3)], sink=sink, incoming_dir=incoming)
    assert (result.status, result.completed, result.failed) == (0x0000, 4, 0)
    assert_received_as_sent(sink.kept(), originals, uids_of(MR, (2, 3)), same_encoding)
    assert list(incoming.iterdir()) == []


# --- errors --------------------------------------------------------------------------------


def test_pacs_down_is_unreachable(sink: FolderSink, tmp_path: Path) -> None:
    peer = DicomPeer("NOBODY", "127.0.0.1", free_port(), connect_timeout=2)
    with pytest.raises(PacsUnreachable) as caught:
        move_study(LOCAL, peer, RECEIVER_AE, QueryModel.STUDY_ROOT, study_instance_uid(MR), "")
    assert isinstance(caught.value, RetriableError)
    with pytest.raises(PacsUnreachable):
        get_study(LOCAL, peer, QueryModel.STUDY_ROOT, study_instance_uid(MR), "", sink=sink, incoming_dir=tmp_path)


@pytest.mark.parametrize("kind", MOVE_PACS)
def test_unknown_move_destination_tells_the_admin_what_to_register(
    kind: str, pacs: dict[str, RunningPacs], sink: FolderSink
) -> None:
    expected = DimseFailure if kind == "orthanc" else MoveDestinationUnknown  # Orthanc: 0xC000, the others 0xA801
    with pytest.raises(expected) as caught:
        move_study(LOCAL, peer_of(pacs[kind]), "NOSUCHDEST", QueryModel.STUDY_ROOT, study_instance_uid(MR), "")
    message = str(caught.value)
    assert isinstance(caught.value, PermanentError)
    assert "'NOSUCHDEST'" in message and "register mi2b2's receiver" in message
    assert MR.patient_name not in message and study_instance_uid(MR) not in message
    assert sink.received == []


@pytest.mark.parametrize(("kind", "operation"), [(k, "move") for k in MOVE_PACS] + [(k, "get") for k in GET_PACS])
def test_cancel_after_the_second_progress(
    kind: str, operation: str, pacs: dict[str, RunningPacs], sink: FolderSink, tmp_path: Path
) -> None:
    sink.reset(delay=0.02)  # 30 instances would otherwise be done before the cancel arrives
    progress: list[RetrieveProgress] = []

    def cancel() -> bool:
        return len(progress) >= 2

    if operation == "move":
        result = move_study(LOCAL, peer_of(pacs[kind]), RECEIVER_AE, QueryModel.STUDY_ROOT, study_instance_uid(CT), "",
                            on_progress=progress.append, should_cancel=cancel)
    else:
        result = get_study(LOCAL, peer_of(pacs[kind]), QueryModel.STUDY_ROOT, study_instance_uid(CT), "", sink=sink,
                           incoming_dir=tmp_path, on_progress=progress.append, should_cancel=cancel)
        assert list(tmp_path.iterdir()) == []
    assert result.canceled
    assert result.status == 0xFE00
    assert 2 <= len(sink.received) < 30
    assert result.completed <= len(sink.kept())


@pytest.mark.parametrize("kind", MOVE_PACS)
def test_refusing_sink_fails_the_sub_operations_and_keeps_nothing(
    kind: str, pacs: dict[str, RunningPacs], sink: FolderSink
) -> None:
    sink.reset(status=0x0124)  # Refused: not authorized
    if kind == "orthanc":
        with pytest.raises(DimseFailure) as caught:  # Orthanc stops at the first refusal
            move_study(LOCAL, peer_of(pacs[kind]), RECEIVER_AE, QueryModel.STUDY_ROOT, study_instance_uid(MR), "")
        assert caught.value.status == 0xC000
        assert len(sink.received) == 1
    else:
        result = move_study(LOCAL, peer_of(pacs[kind]), RECEIVER_AE, QueryModel.STUDY_ROOT, study_instance_uid(MR), "")
        assert (result.status, result.completed, result.failed, result.canceled) == (0xA702, 0, 6, False)
        assert set(result.failed_sop_uids) == uids_of(MR)
        assert len(sink.received) == 6
    assert sink.kept() == {}


def test_failing_sink_is_answered_out_of_resources(pacs: dict[str, RunningPacs], sink: FolderSink,
                                                   caplog: pytest.LogCaptureFixture) -> None:
    sink.reset(fail=True)
    result = move_study(LOCAL, peer_of(pacs["dcmqrscp"]), RECEIVER_AE, QueryModel.STUDY_ROOT, study_instance_uid(MR), "")
    assert (result.completed, result.failed) == (0, 6)
    assert "RuntimeError" in caplog.text and "0xA700" in caplog.text
    assert MR.patient_id not in caplog.text and MR.patient_name not in caplog.text


# --- C-STORE straight to the receiver --------------------------------------------------------


def _store_file(path: Path, meta_uid: str, dataset: bytes) -> Path:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = meta_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)
    with path.open("ab") as file:
        file.write(dataset)
    return path


def _encoded(ds: Dataset) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, False
    write_dataset(buffer, ds)
    return buffer.getvalue()


def test_garbage_c_stores_are_refused_and_leave_nothing(
    receiver: StoreServer, sink: FolderSink, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send the files' bytes as they are
    uid = str(generate_uid())
    no_series = Dataset()
    no_series.SOPClassUID, no_series.SOPInstanceUID, no_series.StudyInstanceUID = CTImageStorage, uid, str(generate_uid())
    other = Dataset()
    other.SOPClassUID, other.SOPInstanceUID = CTImageStorage, str(generate_uid())
    other.StudyInstanceUID, other.SeriesInstanceUID = str(generate_uid()), str(generate_uid())
    cases = {
        "not DICOM": _store_file(tmp_path / "garbage.dcm", uid, os.urandom(4096)),
        "no SeriesInstanceUID": _store_file(tmp_path / "noseries.dcm", uid, _encoded(no_series)),
        "another instance's data set": _store_file(tmp_path / "other.dcm", uid, _encoded(other)),
    }
    ae = AE("SENDER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title=RECEIVER_AE)
    assert assoc.is_established
    try:
        for case, path in cases.items():
            status = assoc.send_c_store(path)
            assert 0xC000 <= int(status.Status) <= 0xCFFF, case
    finally:
        assoc.release()
    assert sink.received == []


def test_instance_cut_off_mid_transfer_leaves_nothing(receiver: StoreServer, sink: FolderSink) -> None:
    ae = AE("SENDER")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    assoc = ae.associate("127.0.0.1", receiver.port, ae_title=RECEIVER_AE, max_pdu=16384)
    assert assoc.is_established
    request = C_STORE()
    request.MessageID, request.Priority = 1, 2
    request.AffectedSOPClassUID, request.AffectedSOPInstanceUID = CTImageStorage, str(generate_uid())
    request.DataSet = io.BytesIO(os.urandom(200_000))
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    context_id = assoc.accepted_contexts[0].context_id
    pdus = list(message.encode_msg(context_id, 16384))
    assert len(pdus) > 6
    # The command and part of the data set: more than the 64 KiB the receiver holds in
    # memory to judge a header by, so this one (unreadable from its start) goes to a file.
    for pdu in pdus[:6]:
        assoc.dul.send_pdu(pdu)
    deadline = time.monotonic() + 5
    while not list(receiver.incoming_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(list(receiver.incoming_dir.iterdir())) == 1  # being received
    assoc.abort()
    while list(receiver.incoming_dir.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.received == []
