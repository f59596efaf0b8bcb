"""A reload of `mi2b2 serve` reaches its DICOM receiver, wherever the receiver runs.

The receiver admits a sender that calls itself a PACS only from the addresses
the configuration gives that PACS. A site whose PACS moves reloads (`kill -HUP`
or `mi2b2 admin config reload`), and the receiver must judge by the new file at
once: inside `serve` it forgets what it resolved (else it trusts the old
address for minutes), and as its own process (`receiver_process = true`, the
default) it is sent SIGHUP to re-read the file itself.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from support.pacs import free_port
from support.server import start_server
from support.site import pacs_block, write_site


def _admitted(source: str, port: int) -> bool:
    """Whether mi2b2's receiver accepts an association from the PACS's AE title, sent from ``source``."""
    ae = AE(ae_title="MOVER")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", port, ae_title="MI2B2", bind_address=(source, 0))
    established = bool(assoc.is_established)
    if established:
        assoc.release()
    return established


OLD, NEW = "127.0.0.1", "127.0.0.2"  # the PACS's address before and after it moved (both loopback)


@pytest.mark.parametrize("receiver_process", [True, False], ids=["receiver-process", "in-process"])
def test_a_reload_of_serve_reaches_its_receiver(tmp_path: Path, receiver_process: bool) -> None:
    dicom_port = free_port()
    site = write_site(tmp_path / "site", pacs_blocks=pacs_block("main", "MOVER", free_port()), dicom_port=dicom_port)
    site.write_text(site.read_text().replace("[server]\n", (
        f"[server]\nhttp_port = {free_port()}\nrun_worker = false\n"
        f"receiver_process = {str(receiver_process).lower()}\n"), 1))
    server = start_server(site)
    try:
        assert _admitted(OLD, dicom_port), server.log_tail()
        assert not _admitted(NEW, dicom_port), "the PACS's AE title was admitted from an address not configured"

        site.write_text(site.read_text().replace(f'host = "{OLD}"', f'host = "{NEW}"'))
        os.kill(server.process.pid, signal.SIGHUP)
        deadline = time.monotonic() + 20
        while not _admitted(NEW, dicom_port):
            assert server.alive(), server.log_tail()
            assert time.monotonic() < deadline, f"the receiver still refuses the PACS's new address:\n{server.log_tail()}"
            time.sleep(0.3)
        assert not _admitted(OLD, dicom_port), "the PACS's old address is still trusted after the reload"
        assert server.alive(), server.log_tail()
    finally:
        server.stop()
