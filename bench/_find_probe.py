"""Probe (not a benchmark): per-C-FIND latency on one kept association, with and
without TCP_NODELAY on our socket, against each test PACS.

    PYTHONPATH=src .venv/bin/python bench/_find_probe.py [N]
"""

from __future__ import annotations

import statistics
import sys
import tempfile
import time
from pathlib import Path

from mi2b2.adapters.dicom import scu
from mi2b2.synthetic import SyntheticStudy, write_study

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from support.pacs import start_dcmqrscp, start_orthanc, start_qrscp


def per_find_ms(peer: scu.DicomPeer, n: int) -> tuple[float, float]:
    local = scu.LocalAE("MI2B2")
    keys = {"PatientID": "PROBE0001", "StudyInstanceUID": "", "StudyDate": ""}
    with scu.open_find_session(local, peer) as session:
        session.find(scu.QueryModel.STUDY_ROOT, scu.QueryLevel.STUDY, keys)  # warm-up
        times = []
        for _ in range(n):
            started = time.perf_counter()
            session.find(scu.QueryModel.STUDY_ROOT, scu.QueryLevel.STUDY, keys)
            times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), statistics.mean(times)


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 50
    root = Path(tempfile.mkdtemp(prefix="find-probe-"))
    study = SyntheticStudy("PROBE0001", "PROBE^PATIENT", "19800101", "O", "PRB1", "20240101", "CT", "probe", 1, 2)
    files = write_study(study, root / "data")
    nodelay = scu.set_nodelay
    for start in (start_orthanc, start_dcmqrscp, start_qrscp):
        pacs = start(root / start.__name__)
        try:
            pacs.load(files)
            peer = scu.DicomPeer(pacs.ae_title, pacs.host, pacs.port)
            scu.set_nodelay = nodelay
            with_nd = per_find_ms(peer, n)
            scu.set_nodelay = lambda assoc: None
            without = per_find_ms(peer, min(n, 20))
            scu.set_nodelay = nodelay
            print(
                f"{pacs.kind:9s} TCP_NODELAY: median {with_nd[0]:6.2f} ms mean {with_nd[1]:6.2f} ms"
                f" | Nagle: median {without[0]:6.2f} ms mean {without[1]:6.2f} ms"
            )
        finally:
            pacs.stop()


if __name__ == "__main__":
    main()
