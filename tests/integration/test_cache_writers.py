"""The cache on a volume several hosts write: two processes placing and indexing the same
instance at the same moments leave one complete file and one index row, and no temp file.

Each process writes its temp files in its own incoming folder (host and pid in its name, unique
file names), renames them into place atomically and indexes them on PostgreSQL, where the study
row is locked and the instance row inserted once. Nothing here relies on a lock one host holds.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from sqlalchemy import select

from mi2b2.adapters.db.tables import CachedInstance, CachedStudy
from mi2b2.config import load_config
from mi2b2.services.cache.reads import cache_store
from mi2b2.services.context import build_context
from mi2b2.synthetic import SyntheticStudy, write_study
from support.databases import fresh_database
from support.site import write_site

pytestmark = pytest.mark.postgres

ROUNDS = 30
WRITER = """
import shutil, sys, tempfile
from pathlib import Path
from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.dicom.files import read_instance_header
from mi2b2.config import load_config
from mi2b2.services.cache.index import index_instance
from mi2b2.services.cache.reads import cache_store
from mi2b2.services.context import build_context

site, original, rounds, go = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4])
ctx = build_context(load_config(site), migrate=False, sync_config=False)
store = cache_store(ctx)
header = read_instance_header(original)
relative = store.relative_path("alpha", header.study_uid, header.series_uid, header.sop_instance_uid)
while not go.exists():
    pass
for _ in range(rounds):
    fd, name = tempfile.mkstemp(suffix=".dcm", dir=store.incoming_dir())
    with open(fd, "wb") as temp, original.open("rb") as source:
        shutil.copyfileobj(source, temp)
    size = store.place(Path(name), relative)
    with transaction(ctx.sessions) as session:
        index_instance(session, "alpha", header, relative, size, ctx.clock.now(), "writer", "main")
ctx.engine.dispose()
print(relative)
"""


def test_two_processes_writing_the_same_instance_leave_one_file_and_one_row(tmp_path: Path) -> None:
    study = SyntheticStudy(patient_id="000123", patient_name="WRITERS^TWO", birth_date="19800101", sex="F",
                           accession="W-1", study_date="20240101", modality="CT", description="writers",
                           series_count=1, instances_per_series=1, rows=256, cols=256)
    (original,) = write_study(study, tmp_path / "original")
    with fresh_database("postgres", tmp_path) as url:
        site = write_site(tmp_path / "site", database_url=url)
        ctx = build_context(load_config(site))  # the schema, before the writers start
        go = tmp_path / "go"
        root = Path(__file__).resolve().parents[2]
        env = {**os.environ, "PYTHONPATH": f"{root / 'src'}{os.pathsep}{root / 'tests'}"}
        writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(site), str(original), str(ROUNDS), str(go)],
                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
                   for _ in range(2)]
        go.touch()  # both start writing together
        outputs = [w.communicate(timeout=120) for w in writers]
        assert [w.returncode for w in writers] == [0, 0], [err[-2000:] for _out, err in outputs]
        (relative,) = {out.strip() for out, _err in outputs}
        store = cache_store(ctx)
        assert store.absolute(relative).read_bytes() == original.read_bytes()  # complete, whichever rename won
        assert [path for path, _size in store.walk()] == [relative]  # nothing else in the cache
        incoming = store.root / ".incoming"
        assert not [p for p in incoming.rglob("*") if p.is_file()]  # no temp file left behind
        with ctx.sessions() as session:
            rows = session.execute(select(CachedInstance.relative_path)).scalars().all()
            (count,) = session.execute(select(CachedStudy.instance_count)).scalars().all()
        assert rows == [relative] and count == 1
        ctx.engine.dispose()
