"""mi2b2's own receiver down is a transient failure, never the PACS's fault.

Against real PACS sending by C-MOVE (Orthanc, pynetdicom's qrscp): with the
receiver stopped, the PACS cannot deliver; the request goes back to the queue
with an error naming mi2b2's receiver, uses up none of its attempts, and
completes once a receiver is back. When receivers keep heartbeats and none is
alive, no C-MOVE starts at all and the waiting reason names the missing receiver.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from sqlalchemy import select

from mi2b2.adapters.db.tables import Worker as WorkerRow
from mi2b2.adapters.db.tables import WorkerKind
from mi2b2.adapters.dicom.store_scp import StoreServer
from mi2b2.config import load_config
from mi2b2.runtime import background
from mi2b2.services.context import build_context
from mi2b2.services.pacs import local_ae
from mi2b2.services.receiver import receive_limits
from mi2b2.services.requests import StudyPick, add_requests, list_requests
from mi2b2.services.scheduler import heartbeat, receiver_missing, receivers_changing
from mi2b2.synthetic import write_study
from mi2b2.testing import FakeClock
from mi2b2.worker.loop import Worker
from mi2b2.worker.receiver_heartbeat import ReceiverHeartbeat
from support import studies
from support.pacs import RunningPacs, free_port, start_orthanc, start_qrscp
from support.pipeline import ALICE, Pipeline, retrieval_site
from support.site import pacs_block

pytestmark = pytest.mark.pacs

RETRIES = """
    [institutions.departments.pacs.retries]
    max_attempts = 2
    first_delay = 0.5
    max_delay = 1.0
"""


@pytest.fixture(scope="module", params=["orthanc", "qrscp"])
def pacs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RunningPacs, int]]:
    receiver_port = free_port()
    starter = {"orthanc": start_orthanc, "qrscp": start_qrscp}[request.param]
    running = starter(tmp_path_factory.mktemp(request.param), move_destinations={"MI2B2": ("127.0.0.1", receiver_port)})
    try:
        folder = tmp_path_factory.mktemp("originals")
        running.load([*write_study(studies.BRAIN, folder), *write_study(studies.TRAUMA, folder)])
        yield running, receiver_port
    finally:
        running.stop()


def _receiver(pipe: Pipeline) -> StoreServer:
    config = pipe.ctx.config
    return StoreServer(local_ae(config), "127.0.0.1", config.dicom.port, pipe.sink, pipe.sink.store.incoming_dir(),
                       receive_limits(config))


def _wait_for(condition: Callable[[], bool], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(0.1)


def test_a_c_move_to_a_stopped_receiver_is_retried_and_completes(tmp_path: Path, pacs: tuple[RunningPacs, int]) -> None:
    running, receiver_port = pacs
    site = retrieval_site(tmp_path, receiver_port, pacs_block("main", running.ae_title, running.port,
                                                              'retrieve = "c-move"\n' + RETRIES))
    with Pipeline(site) as pipe:
        assert pipe.server is not None
        pipe.server.stop()  # the receiver goes away; the PACS still knows its address
        ids = add_requests(pipe.ctx, ALICE, "alpha", "main", [StudyPick(studies.uid(studies.BRAIN)),
                                                              StudyPick(studies.uid(studies.TRAUMA))]).created
        # Tries keep failing on the stopped receiver, more than max_attempts (2): none may count.
        _wait_for(lambda: sum("mi2b2's receiver" in (r.last_error or "") for r in pipe.requests(ids)) == 2
                  and all(r.not_before is not None for r in pipe.requests(ids)), 60)
        time.sleep(2)  # several more ticks, each failing on the stopped receiver
        # The worker stops and its last C-MOVE ends before the receiver is back: a C-MOVE the PACS
        # fails while the receiver is down must not meet a receiver that is up again when judged.
        assert pipe.worker is not None
        pipe.worker.stop()
        _wait_for(lambda: all(r.state != "processing" for r in pipe.requests(ids)), 60)
        rows = pipe.requests(ids)
        assert {r.state for r in rows} == {"scheduled"}, [(r.state, r.last_error) for r in rows]
        assert all("the PACS is not at fault" in (r.last_error or "") for r in rows)
        assert all("tried to send the study (status 0x" in (r.last_error or "") for r in rows)
        restarted = _receiver(pipe)
        restarted.start()
        pipe.worker = Worker(pipe.ctx, pipe.sink, poll_seconds=0.2)
        pipe.worker.start()
        try:
            done = pipe.wait(ids, timeout=60)
        finally:
            restarted.stop()
    assert [r.state for r in done] == ["completed", "completed"], [(r.state, r.last_error) for r in done]


def test_with_every_receiver_gone_no_c_move_starts_and_the_log_says_why(
    tmp_path: Path, pacs: tuple[RunningPacs, int]
) -> None:
    running, receiver_port = pacs
    site = retrieval_site(tmp_path, receiver_port, pacs_block("main", running.ae_title, running.port,
                                                              'retrieve = "c-move"\n' + RETRIES))
    with Pipeline(site, receiver=False) as pipe:
        beat = ReceiverHeartbeat(pipe.ctx, interval=0.2)
        beat.start()
        beat.stop()  # a receiver was here and stopped: none is alive
        ids = add_requests(pipe.ctx, ALICE, "alpha", "main", [StudyPick(studies.uid(studies.BRAIN))]).created
        _wait_for(lambda: "no mi2b2 receiver is running" in (list_requests(pipe.ctx, ALICE, "alpha")[0]["waiting_reason"]
                                                             or ""), 30)
        (row,) = pipe.requests(ids)
        assert row.state == "scheduled" and row.attempts == 0  # the PACS was never asked
        server = _receiver(pipe)
        server.start()
        back = ReceiverHeartbeat(pipe.ctx, interval=0.2)
        back.start()
        try:
            (done,) = pipe.wait(ids, timeout=60)
        finally:
            back.stop()
            server.stop()
    assert done.state == "completed" and done.attempts == 1


def test_a_running_receiver_keeps_a_heartbeat_and_marks_it_stopped_when_it_stops(tmp_path: Path) -> None:
    site = retrieval_site(tmp_path, free_port(), pacs_block("main", "PACS", free_port()))
    ctx = build_context(load_config(site))
    try:
        with background(ctx, receiver=True, worker=False) as (server, _):
            assert server is not None
            with ctx.sessions() as session:
                assert receiver_missing(ctx, session, ctx.clock.now()) is None
                kinds = session.execute(select(WorkerRow.kind)).scalars().all()
            assert kinds == ["receiver"]
        with ctx.sessions() as session:
            missing = receiver_missing(ctx, session, ctx.clock.now())
        assert missing is not None and missing.startswith("no mi2b2 receiver is running")
    finally:
        ctx.engine.dispose()


def test_with_several_receivers_a_c_move_that_sent_nothing_is_retried_and_the_attempt_counts(
    tmp_path: Path, pacs: tuple[RunningPacs, int]
) -> None:
    """Behind a balancer, the receiver a PACS reached may die mid-association while another is
    fine: "nothing was sent" is then worth another try. A PACS that refuses for good (here: it
    does not know the AE title) still fails, once the attempts are used up."""
    running, receiver_port = pacs
    site = retrieval_site(tmp_path, receiver_port, pacs_block("main", running.ae_title, running.port,
                                                              'retrieve = "c-move"\n' + RETRIES))
    site.write_text(site.read_text().replace('ae_title = "MI2B2"', 'ae_title = "STRANGER"'))
    with Pipeline(site) as pipe:
        beats = [ReceiverHeartbeat(pipe.ctx, interval=0.2) for _host in ("b", "c")]  # two receivers keep heartbeats
        for beat in beats:
            beat.start()
        try:
            ids = add_requests(pipe.ctx, ALICE, "alpha", "main", [StudyPick(studies.uid(studies.BRAIN))]).created
            (row,) = pipe.wait(ids, timeout=60)
        finally:
            for beat in beats:
                beat.stop()
    assert row.state == "failed" and row.attempts == 2, (row.state, row.attempts, row.last_error)
    assert (row.last_error or "").startswith("gave up after 2 attempts"), row.last_error
    assert "sent nothing while mi2b2's receivers were changing (2 known" in (row.last_error or "")


def test_receivers_are_changing_while_several_keep_heartbeats_or_the_only_one_just_started(tmp_path: Path) -> None:
    clock = FakeClock()
    site = retrieval_site(tmp_path, free_port(), pacs_block("main", "PACS", free_port()))
    ctx = build_context(load_config(site), clock=clock)
    settle = timedelta(seconds=30)

    def changing() -> int:
        with ctx.sessions() as session:
            return receivers_changing(session, clock.now(), settle)

    try:
        assert changing() == 0  # no receiver keeps a heartbeat: nothing is known
        heartbeat(ctx, "receiver:b:1:aa", WorkerKind.RECEIVER)
        assert changing() == 1  # just started: a balancer may not route to it yet
        clock.advance(minutes=1)
        heartbeat(ctx, "receiver:b:1:aa", WorkerKind.RECEIVER)
        assert changing() == 0  # the one receiver has settled
        heartbeat(ctx, "receiver:c:2:bb", WorkerKind.RECEIVER)
        clock.advance(minutes=1)
        assert changing() == 2  # several behind a balancer: one may be going
    finally:
        ctx.engine.dispose()
