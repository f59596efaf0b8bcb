"""One indexing path: the receiver's batched arrivals and the single-instance entry file an instance identically.

Against SQLite and PostgreSQL. Project 'alpha' gets a study one instance at a
time (`index_instance`, what fsck's adoptions, tests and benchmarks use);
project 'beta' gets the same study through the receiver's group-commit
`Indexer`, counted against its request. The rows, the study totals and the
quota figures must come out the same.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import select

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import CachedInstance, CachedStudy, Request
from mi2b2.adapters.dicom.files import InstanceHeader, read_instance_header
from mi2b2.services.cache.index import Arrival, Placement, index_instance, index_instances
from mi2b2.services.cache.reads import cache_store, usage_in
from mi2b2.services.context import ServiceContext, build_context
from mi2b2.services.receiver import Indexer
from mi2b2.synthetic import SyntheticStudy, write_study
from mi2b2.testing import FakeClock
from support import studies
from support.site import load_site

Placed = tuple[InstanceHeader, str, int]  # header, cache-relative path, bytes


@pytest.fixture
def ctx(tmp_path: Path, database_url: str) -> ServiceContext:
    return build_context(load_site(tmp_path / "site", database_url=database_url), clock=FakeClock())


def place(ctx: ServiceContext, project: str, study: SyntheticStudy, source: Path) -> list[Placed]:
    """What the receiver does before indexing: write to incoming, move into the cache."""
    store = cache_store(ctx)
    placed = []
    for file in write_study(study, source / project):
        header = read_instance_header(file)
        relative = store.relative_path(project, header.study_uid, header.series_uid, header.sop_instance_uid)
        temp = store.incoming_dir() / f"{header.sop_instance_uid}.part"
        shutil.copyfile(file, temp)
        placed.append((header, relative, store.place(temp, relative)))
    return placed


def add_request(ctx: ServiceContext, project: str, study_uid: str, instances: int) -> int:
    with transaction(ctx.sessions) as session:
        row = Request(kind="retrieve", project_id=project, user_login="alice", pacs_id="main", patient_id="000123",
                      study_uid=study_uid, state="processing", expected_instances=instances,
                      created_at=ctx.clock.now())
        session.add(row)
        session.flush()
        return row.id


def snapshot(ctx: ServiceContext, project: str) -> dict[str, Any]:
    """Everything indexing decides, with the project's own name taken out of the paths."""
    with ctx.sessions() as session:
        study_rows = session.scalars(select(CachedStudy).where(CachedStudy.project_id == project)
                                     .order_by(CachedStudy.study_uid)).all()
        studies_seen = [
            (s.study_uid, s.patient_id, s.patient_name, s.accession, s.study_date, s.modalities, s.description,
             s.pacs_id, s.instance_count, s.bytes, s.fetched_by, s.fetched_at)
            for s in study_rows
        ]
        instances = sorted(
            (i.series_uid, i.sop_instance_uid, i.sop_class_uid, i.instance_number,
             i.relative_path.removeprefix(f"{project}/"), i.bytes, i.received_at)
            for i in session.scalars(select(CachedInstance).join(CachedStudy).where(CachedStudy.project_id == project))
        )
        usage = usage_in(session, project)
    return {"studies": studies_seen, "instances": instances,
            "usage": (usage.used_bytes, usage.in_flight_bytes, usage.study_count)}


def test_both_entry_points_index_a_study_identically(ctx: ServiceContext, tmp_path: Path) -> None:
    uid = studies.uid(studies.BRAIN)
    for header, relative, size in place(ctx, "alpha", studies.BRAIN, tmp_path / "source"):
        with transaction(ctx.sessions) as session:
            assert index_instance(session, "alpha", header, relative, size, ctx.clock.now(), "alice", "main")

    request_id = add_request(ctx, "beta", uid, instances=6)
    indexer = Indexer(ctx, cache_store(ctx))
    arrivals = [Arrival("beta", header, relative, size, "alice", "main", request_id=request_id)
                for header, relative, size in place(ctx, "beta", studies.BRAIN, tmp_path / "source")]
    for arrival in arrivals:
        indexer.submit(arrival)
    assert indexer.flush()
    indexer.stop()

    alpha, beta = snapshot(ctx, "alpha"), snapshot(ctx, "beta")
    assert len(alpha["instances"]) == 6 and alpha["studies"][0][8] == 6
    assert alpha == beta
    total = sum(a.size for a in arrivals)
    with ctx.sessions() as session:
        request = session.get_one(Request, request_id)
        assert (request.received, request.bytes) == (6, total)
    assert beta["usage"] == (total, 0, 1)  # the request holds no space beyond what it wrote

    # The same instances again, each through the other entry point: nothing changes.
    with transaction(ctx.sessions) as session:
        alpha_again = [Arrival("alpha", a.header, a.relative_path.replace("beta/", "alpha/", 1), 999, "bob", None,
                               request_id=request_id) for a in arrivals]
        assert index_instances(session, alpha_again, ctx.clock.now()) == 0
        assert not index_instance(session, "beta", arrivals[0].header, arrivals[0].relative_path, 999,
                                  ctx.clock.now(), "bob", None)
    assert (snapshot(ctx, "alpha"), snapshot(ctx, "beta")) == (alpha, beta)


def test_a_batch_files_each_instance_once_across_studies(ctx: ServiceContext, tmp_path: Path) -> None:
    brain = place(ctx, "alpha", studies.BRAIN, tmp_path / "source")
    other = place(ctx, "alpha", studies.TRAUMA, tmp_path / "source")
    batch = [Placement("alpha", header, relative, size, "alice", "main") for header, relative, size in brain + other]
    with transaction(ctx.sessions) as session:
        assert index_instances(session, batch + batch[:3], ctx.clock.now()) == len(batch)
    seen = snapshot(ctx, "alpha")
    assert len(seen["instances"]) == len(batch)
    expected = sorted([(studies.uid(studies.BRAIN), len(brain)), (studies.uid(studies.TRAUMA), len(other))])
    assert [(row[0], row[8]) for row in seen["studies"]] == expected
    assert seen["usage"] == (sum(size for _h, _r, size in brain + other), 0, 2)
