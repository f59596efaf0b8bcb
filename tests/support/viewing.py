"""A project cache holding real DICOM files, and users with tokens: what viewer and DICOMweb tests read.

Project alpha (alice lead, bob) gets the synthetic MR study BRAIN (3 series x 2)
and the CT study TRAUMA, plus two of pydicom's sample files re-identified as
one more study: a JPEG 2000 image and a 30-frame ultrasound clip. Project beta
(carol, alice) gets a study of its own patient. Files are placed and indexed
the way the receiver does it.
"""

from __future__ import annotations

import shutil
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import uvicorn
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.dicom.files import read_instance_header
from mi2b2.domain.principal import Principal, Role
from mi2b2.services import cache
from mi2b2.services.context import ServiceContext
from mi2b2.synthetic import SyntheticStudy, write_study
from support import studies

ROOT = Principal("root", Role.ADMIN)
AUDITOR = Principal("audrey", Role.AUDITOR)
USERS = {"alice": "researcher", "bob": "researcher", "carol": "researcher", "root": "admin", "audrey": "auditor",
         "dave": "researcher"}  # dave: in no project

SAMPLE_STUDY = "1.2.826.0.1.3680043.8.498.4242"
SAMPLE_SERIES = {"JPEG2000.dcm": SAMPLE_STUDY + ".1", "examples_ybr_color.dcm": SAMPLE_STUDY + ".2"}
BETA_STUDY = SyntheticStudy(patient_id="B-1", patient_name="BETA^ONE", birth_date="19800101", sex="M",
                            accession="ACC-B1", study_date="20190505", modality="CT", description="beta CT",
                            series_count=1, instances_per_series=2, rows=16, cols=16)


@dataclass
class Cached:
    tokens: dict[str, str] = field(default_factory=dict)
    files: dict[str, Path] = field(default_factory=dict)  # SOP UID -> file in the cache

    def headers(self, login: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[login]}"}


def place(ctx: ServiceContext, project: str, file: Path, fetched_by: str = "alice") -> Path:
    """What the receiver does with one file: incoming, placed, indexed in one transaction."""
    store = cache.cache_store(ctx)
    header = read_instance_header(file)
    relative = store.relative_path(project, header.study_uid, header.series_uid, header.sop_instance_uid)
    temp = store.incoming_dir() / f"{header.sop_instance_uid}.part"
    shutil.copyfile(file, temp)
    size = store.place(temp, relative)
    with transaction(ctx.sessions) as session:
        cache.index_instance(session, project, header, relative, size, ctx.clock.now(), fetched_by, "main")
    return store.absolute(relative)


def reidentified_sample(name: str, folder: Path) -> Path:
    """A pydicom sample file as an image of patient PAT004 (on alpha's list), in the sample study."""
    path = get_testdata_file(name)
    assert path is not None
    ds: Dataset = dcmread(path)
    ds.PatientID = "PAT004"
    ds.PatientName = "SAMPLE^PATIENT"
    ds.StudyInstanceUID = SAMPLE_STUDY
    ds.SeriesInstanceUID = SAMPLE_SERIES[name]
    ds.SOPInstanceUID = generate_uid(entropy_srcs=["viewer sample", name])
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.AccessionNumber = "ACC-SAMPLE"
    ds.StudyDate = "20240202"
    ds.StudyDescription = "pydicom samples"
    ds.SeriesNumber = 10 + len(name) % 7
    ds.InstanceNumber = 1
    out = folder / name
    folder.mkdir(parents=True, exist_ok=True)
    ds.save_as(out, enforce_file_format=True)
    return out


def fill(ctx: ServiceContext, folder: Path) -> Cached:
    """Users with API tokens, and the caches of alpha and beta (see the module docstring)."""
    seeded = Cached()
    for login, role in USERS.items():
        ctx.accounts.add_user(ROOT, login, role, None)  # tokens only: no slow password hashing
        seeded.tokens[login] = ctx.accounts.create_token(ROOT, login, "tests").secret
    for study in (studies.BRAIN, studies.TRAUMA):
        for file in write_study(study, folder / "synthetic"):
            cached = place(ctx, "alpha", file)
            seeded.files[read_instance_header(cached).sop_instance_uid] = cached
    for name in SAMPLE_SERIES:
        cached = place(ctx, "alpha", reidentified_sample(name, folder / "samples"))
        seeded.files[read_instance_header(cached).sop_instance_uid] = cached
    for file in write_study(BETA_STUDY, folder / "beta"):
        cached = place(ctx, "beta", file, fetched_by="carol")
        seeded.files[read_instance_header(cached).sop_instance_uid] = cached
    return seeded


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@contextmanager
def serving(app: object, log_level: str = "warning") -> Iterator[str]:
    """Run an ASGI app with uvicorn in a thread on 127.0.0.1; yield its base URL."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level=log_level,  # type: ignore[arg-type]
                                           access_log=False, lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=20)
