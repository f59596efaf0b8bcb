"""pynetdicom behind one seam: the version guard, the start-up refusal, status text per service."""

from __future__ import annotations

import re
import threading
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pynetdicom
import pytest
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE, evt
from pynetdicom.sop_class import (
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)
from pynetdicom.status import GENERAL_STATUS
from typer.testing import CliRunner

from mi2b2.adapters.dicom import netdicom_internals
from mi2b2.adapters.dicom.dimse_status import DimseService, status_text
from mi2b2.adapters.dicom.errors import DimseFailure, MoveDestinationUnknown, UntestedPynetdicom
from mi2b2.adapters.dicom.netdicom_internals import pinned_range, require_tested_pynetdicom
from mi2b2.adapters.dicom.retrieve import get_study, move_study
from mi2b2.adapters.dicom.scu import DicomPeer, LocalAE, QueryModel
from mi2b2.cli.main import app
from support.site import write_site

REPOSITORY = Path(__file__).resolve().parents[2]

# --- the version guard ------------------------------------------------------------------------


def test_the_installed_pynetdicom_is_accepted() -> None:
    require_tested_pynetdicom()


@pytest.mark.parametrize("version", ["3.0.4", "3.0.9", "3.0.4.post1"])
def test_releases_inside_the_tested_range_are_accepted(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", version)
    require_tested_pynetdicom()


@pytest.mark.parametrize("version", ["3.0.3", "3.0.4rc1", "3.1.0", "3.1.0.dev0", "4.0.0", "2.1.1", "unknown"])
def test_other_releases_are_refused_with_the_fix(monkeypatch: pytest.MonkeyPatch, version: str) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", version)
    with pytest.raises(UntestedPynetdicom) as refused:
        require_tested_pynetdicom()
    message = str(refused.value)
    assert f"pynetdicom {version} is installed" in message
    assert "pynetdicom>=3.0.4,<3.1" in message  # the tested range, as the fix to install
    assert "pip install" in message


def test_the_pin_in_pyproject_is_the_tested_range() -> None:
    project = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())["project"]
    pins = [d.split("#")[0].strip() for d in project["dependencies"] if re.match(r"pynetdicom\b", d)]
    assert pins == [f"pynetdicom{pinned_range()}"]
    constraints = (REPOSITORY / "constraints.txt").read_text().splitlines()
    pinned = next(line.split("==")[1] for line in constraints if line.startswith("pynetdicom=="))
    assert pinned == pynetdicom.__version__  # what the tests here ran with


@pytest.mark.parametrize("command", ["serve", "worker", "receiver"])
def test_serve_worker_and_receiver_refuse_to_start(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                   command: str) -> None:
    site = write_site(tmp_path / "site")
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    result = CliRunner().invoke(app, [command, "--config", str(site)])
    assert isinstance(result.exception, UntestedPynetdicom), result.output
    assert not (tmp_path / "site" / "mi2b2.db").exists()  # refused before the database was touched


def test_only_the_seam_imports_pynetdicom_private_names() -> None:
    private = re.compile(r"^\s*(from pynetdicom(\.\w+)* import .*\b_\w+|import pynetdicom\.\w*\._\w+|"
                         r"from pynetdicom\._\w+)", re.MULTILINE)
    seam = Path(netdicom_internals.__file__).resolve()
    offenders = [str(path.relative_to(REPOSITORY)) for path in (REPOSITORY / "src").rglob("*.py")
                 if path.resolve() != seam and private.search(path.read_text())]
    assert offenders == []


# --- status text from each service's own table ---------------------------------------------------


@pytest.mark.parametrize(("service", "code", "text"), [
    (DimseService.C_MOVE, 0xA701, "Refused: Out of resources, unable to calculate number of matches"),
    (DimseService.C_GET, 0xA701, "Refused: Out of resources, unable to calculate number of matches"),
    (DimseService.C_FIND, 0xA701, "Refused: Out of resources"),  # no A701 in C-FIND: its range's meaning
    (DimseService.C_MOVE, 0xA702, "Refused: Out of resources, unable to perform sub-operations"),
    (DimseService.C_GET, 0xA702, "Refused: Out of resources, unable to perform sub-operations"),
    (DimseService.C_MOVE, 0xA801, "Move destination unknown"),
    (DimseService.C_GET, 0xA801, "Failure"),  # C-GET has no destination
    (DimseService.C_FIND, 0xA801, "Failure"),
    (DimseService.C_MOVE, 0xB000, "Sub-operations completed, one or more failures"),
    (DimseService.C_GET, 0xB000, "Sub-operations complete, one or more failures or warnings"),
    (DimseService.C_STORE, 0xB000, "Coercion of Data Elements"),
    (DimseService.C_FIND, 0xA900, "Identifier Does Not Match SOP Class"),
    (DimseService.C_STORE, 0xA900, "Data Set Does Not Match SOP Class"),
    (DimseService.C_STORE, 0xC123, "Cannot Understand"),
    (DimseService.C_FIND, 0xC123, "Unable to Process"),
    (DimseService.C_MOVE, 0xA7FE, "Refused: Out of resources"),  # by its range
    (DimseService.C_ECHO, 0x0122, GENERAL_STATUS[0x0122][1]),
])
def test_status_text_comes_from_the_service_that_answered(service: DimseService, code: int, text: str) -> None:
    assert status_text(service, code) == text


@pytest.fixture
def failing_pacs() -> Iterator[int]:
    """A fake PACS failing every C-MOVE with 0xAA01 and every C-GET with 0xAA04: codes C-FIND does not define."""
    destination = AE("DEST")
    destination.add_supported_context(CTImageStorage, ExplicitVRLittleEndian)
    receiver = destination.start_server(("127.0.0.1", 0), block=False)

    def handle_move(event: evt.Event) -> Iterator[object]:
        yield "127.0.0.1", receiver.server_address[1]
        yield 1
        yield 0xAA01, None

    def handle_get(event: evt.Event) -> Iterator[object]:
        yield 1
        yield 0xAA04, None

    pacs = AE("FAKEPACS")
    pacs.add_supported_context(StudyRootQueryRetrieveInformationModelMove)
    pacs.add_supported_context(StudyRootQueryRetrieveInformationModelGet)
    pacs.add_supported_context(CTImageStorage, ExplicitVRLittleEndian, scp_role=True, scu_role=True)
    pacs.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    server = pacs.start_server(("127.0.0.1", 0), block=False,
                               evt_handlers=[(evt.EVT_C_MOVE, handle_move), (evt.EVT_C_GET, handle_get)])
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()
        receiver.shutdown()


def test_c_move_and_c_get_failures_are_described_with_their_own_tables(failing_pacs: int, tmp_path: Path) -> None:
    peer = DicomPeer("FAKEPACS", "127.0.0.1", failing_pacs)
    with pytest.raises(DimseFailure, match=r"C-MOVE with status 0xAA01 \(Unable to create new object for this SOP class"):
        move_study(LocalAE("MI2B2"), peer, "DEST", QueryModel.STUDY_ROOT, "1.2.3", "")

    class Refuse:
        def accept(self, instance: object) -> int:
            return 0xC000

    with pytest.raises(DimseFailure, match=r"C-GET with status 0xAA04 \(Invalid request"):
        get_study(LocalAE("MI2B2"), peer, QueryModel.STUDY_ROOT, "1.2.3", "", sink=Refuse(),
                  incoming_dir=tmp_path / "incoming")


def test_a_move_destination_the_pacs_does_not_know_is_named(tmp_path: Path) -> None:
    pacs = AE("FAKEPACS")
    pacs.add_supported_context(StudyRootQueryRetrieveInformationModelMove)

    def unknown(event: evt.Event) -> Iterator[object]:
        yield None, None  # pynetdicom answers 0xA801 itself

    server = pacs.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_MOVE, unknown)])
    try:
        peer = DicomPeer("FAKEPACS", "127.0.0.1", int(server.server_address[1]))
        with pytest.raises(MoveDestinationUnknown):
            move_study(LocalAE("MI2B2"), peer, "DEST", QueryModel.STUDY_ROOT, "1.2.3", "")
    finally:
        server.shutdown()


# --- sending files as stored, per thread --------------------------------------------------------


def test_sending_files_as_stored_is_seen_only_by_the_thread_that_asked() -> None:
    from pynetdicom import association

    seen: dict[str, bool] = {}
    inside = threading.Event()
    leave = threading.Event()

    def forward() -> None:
        with netdicom_internals.files_sent_as_stored():
            seen["forward"] = bool(association._config.STORE_SEND_CHUNKED_DATASET)
            inside.set()
            leave.wait(5)
        seen["forward after"] = bool(association._config.STORE_SEND_CHUNKED_DATASET)

    sender = threading.Thread(target=forward)
    sender.start()
    assert inside.wait(5)
    seen["other thread"] = bool(association._config.STORE_SEND_CHUNKED_DATASET)  # while the forward sends
    leave.set()
    sender.join(5)
    assert seen == {"forward": True, "other thread": False, "forward after": False}
    assert pynetdicom._config.STORE_SEND_CHUNKED_DATASET is False  # the process-wide setting never changed
