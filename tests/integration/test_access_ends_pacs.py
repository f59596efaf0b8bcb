"""An IRB that expires mid-retrieval, against real PACS: the retrieval is canceled (C-CANCEL) and nothing it
brought in stays readable.

Orthanc sends by C-MOVE through a throttling proxy (so local midnight can fall
while images are still coming); pynetdicom's qrscp serves C-GET the same way.
The project's zone is east of UTC (Asia/Tokyo): by the UTC date the approval
would still be running.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from sqlalchemy import func, select

from mi2b2.adapters.db.tables import CachedInstance, CachedStudy
from mi2b2.errors import AccessDenied
from mi2b2.services.export.download import zip_download
from mi2b2.services.purge import purge
from mi2b2.services.requests import StudyPick, add_requests
from mi2b2.services.viewer import CacheViewer
from mi2b2.synthetic import SyntheticStudy, study_instance_uid, write_study
from mi2b2.testing import FakeClock
from support.pacs import free_port, start_orthanc, start_qrscp
from support.pipeline import ADMIN, ALICE, Pipeline, retrieval_site
from support.proxy import Proxy
from support.site import pacs_block

pytestmark = pytest.mark.pacs

ZONE = "Asia/Tokyo"
ENDS = date(2026, 3, 10)
MIDNIGHT = datetime(2026, 3, 11, tzinfo=ZoneInfo(ZONE)).astimezone(UTC)  # the approval ends here
BIG = SyntheticStudy(patient_id="77", patient_name="TEST^BIG", birth_date="19700101", sex="M", accession="ACC-BIG",
                     study_date="20240101", modality="CT", description="big CT", series_count=2,
                     instances_per_series=40, rows=256, cols=256)
BIG_UID = study_instance_uid(BIG)
EXPIRED = "the project's IRB approval has expired"


def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.05)


@pytest.mark.parametrize("server", ["orthanc", "qrscp"])
def test_an_irb_expiring_mid_retrieval_cancels_it_and_closes_what_arrived(tmp_path: Path, server: str,
                                                                          database_url: str) -> None:
    receiver_port, slow_port = free_port(), free_port()
    destinations = {"MI2B2": ("127.0.0.1", receiver_port), "MI2B2SLOW": ("127.0.0.1", slow_port)}
    starter = start_orthanc if server == "orthanc" else start_qrscp
    pacs = starter(tmp_path / server, move_destinations=destinations)
    method = "c-move" if server == "orthanc" else "c-get"
    slow = 2_000_000
    proxy = Proxy(pacs.port, bytes_per_second=slow if method == "c-get" else None).start()
    throttle = Proxy(receiver_port, bytes_per_second=slow, listen_port=slow_port).start()
    try:
        pacs.load(write_study(BIG, tmp_path / "originals"))
        site = retrieval_site(tmp_path / "site", receiver_port,
                              pacs_block("main", pacs.ae_title, proxy.port, f'retrieve = "{method}"\n'),
                              database_url=database_url, projects=f'\n[site]\ntimezone = "{ZONE}"\n')
        text = site.read_text().replace('ae_title = "MI2B2"', 'ae_title = "MI2B2SLOW"')
        site.write_text(text.replace('expires = 2099-12-31\nmrn_file = "alpha.mrns"',
                                     f'expires = {ENDS.isoformat()}\nmrn_file = "alpha.mrns"'))
        clock = FakeClock(MIDNIGHT - timedelta(seconds=30))  # 23:59:30 in Tokyo on the last day
        with Pipeline(site, clock=clock) as pipe:
            report = add_requests(pipe.ctx, ALICE, "alpha", "main", [StudyPick(BIG_UID)])
            assert report.created, report
            ids = report.created
            _wait_for(lambda: pipe.requests(ids)[0].received >= 3, 60)
            clock.set(MIDNIGHT + timedelta(seconds=1))  # 00:00:01 in Tokyo; still the 10th in UTC
            assert clock.now().date() == ENDS
            (row,) = pipe.wait(ids, timeout=60)
            assert row.state == "canceled" and row.last_error == f"canceled: {EXPIRED}"
            assert 3 <= row.received < 80
            assert pipe.worker is not None
            _wait_for(lambda: pipe.worker.busy() == 0, 20)
            time.sleep(1.0)  # anything the PACS still sends is refused: the request is no longer in flight
            with pipe.ctx.sessions() as session:
                cached = session.scalar(select(func.count(CachedInstance.id)).join(
                    CachedStudy, CachedStudy.id == CachedInstance.cached_study_id))
            assert cached is not None and 3 <= cached <= row.received

            # What arrived is closed like the rest of the project's cache...
            with pytest.raises(AccessDenied, match="IRB approval has expired"):
                zip_download(pipe.ctx, ALICE, "alpha", [BIG_UID])
            with pytest.raises(AccessDenied, match="IRB approval has expired"):
                CacheViewer(pipe.ctx).study(ALICE, "alpha", BIG_UID)
            # ...and purge deletes it.
            done = purge(pipe.ctx, ADMIN, apply=True)
            assert [(s.project_id, s.study_uid, s.reason) for s in done.studies] == [("alpha", BIG_UID, EXPIRED)]
            assert not (pipe.ctx.config.cache_dir() / "alpha" / BIG_UID).exists()
    finally:
        proxy.down()
        throttle.down()
        pacs.stop()
