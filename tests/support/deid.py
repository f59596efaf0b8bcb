"""A de-identified project for tests: project gamma's block, sample files with identifiers worth searching for,
and the accounts and API clients its tests log in with.

``gamma_project()`` is the [[projects]] block (alice its lead, bob a member, export = "deidentified");
``sample_study()`` writes pydicom's samples as one study of patient PAT004 (on alpha.mrns, gamma's list);
``SECRETS`` are the identifiers those files carry that no de-identified door may hand out.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

from fastapi.testclient import TestClient
from pydicom import Dataset, dcmread
from pydicom.data import get_testdata_file

from mi2b2.api.app import create_app
from mi2b2.domain.principal import Principal, Role
from mi2b2.services.context import ServiceContext

ROOT = Principal("root", Role.ADMIN)
ALICE = Principal("alice", Role.RESEARCHER)  # gamma's lead: the honest broker
BOB = Principal("bob", Role.RESEARCHER)  # a gamma member
PATIENT, PATIENT_NAME, BIRTH, ACCESSION = "PAT004", "SAMPLE^PATIENT", "19610203", "ACC-SAMPLE"
INSTITUTION, REFERRER, STUDY_DATE = "Sample Memorial Hospital", "REFERRER^SAMPLE", "20240202"
SECRETS = (PATIENT, PATIENT_NAME, BIRTH, ACCESSION, INSTITUTION, REFERRER)
LONGITUDINAL = ("retain_longitudinal_modified_dates",)


def gamma_project(options: Iterable[str] = LONGITUDINAL, members: str = '{ login = "alice", role = "lead" }, '
                  '{ login = "bob" }', project_id: str = "gamma", irb: str = "2026P000777") -> str:
    """The [[projects]] block of a de-identified project on alpha.mrns at institution general."""
    listed = ", ".join(f'"{option}"' for option in options)
    return f"""
    [[projects]]
    id = "{project_id}"
    title = "De-identified cohort"
    irb = "{irb}"
    expires = 2099-12-31
    mrn_file = "alpha.mrns"
    quota = "10 GiB"
    institutions = ["general"]
    members = [{members}]
    export = "deidentified"
    [projects.deidentification]
    options = [{listed}]
"""


def sample_study(folder: Path, study_uid: str, names: dict[str, int], issuer: str = "") -> list[Path]:
    """pydicom's samples (file name -> series number) as one study of patient PAT004, with identifiers;
    with ``issuer``, its files name that Issuer of Patient ID."""
    out = []
    for name, number in names.items():
        path = get_testdata_file(name)
        assert path is not None
        ds: Dataset = dcmread(path)
        ds.PatientID, ds.PatientName, ds.PatientBirthDate = PATIENT, PATIENT_NAME, BIRTH
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, f"{study_uid}.{number}"
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = f"{study_uid}.{number}.1"
        ds.AccessionNumber, ds.StudyDate, ds.SeriesNumber, ds.InstanceNumber = ACCESSION, STUDY_DATE, number, 1
        ds.InstitutionName, ds.ReferringPhysicianName = INSTITUTION, REFERRER
        if issuer:
            ds.IssuerOfPatientID = issuer
        folder.mkdir(parents=True, exist_ok=True)
        ds.save_as(folder / name, enforce_file_format=True)
        out.append(folder / name)
    return out


def tokens_for(ctx: ServiceContext, accounts: Iterable[tuple[str, str]] = (
        ("alice", "researcher"), ("bob", "researcher"), ("carol", "researcher"), ("root", "admin"))) -> dict[str, str]:
    """An API token per (login, site role), the accounts made first."""
    tokens = {}
    for login, role in accounts:
        ctx.accounts.add_user(ROOT, login, role, None)
        tokens[login] = ctx.accounts.create_token(ROOT, login, "test", 30).secret
    return tokens


def api(ctx: ServiceContext, token: str) -> TestClient:
    return TestClient(create_app(ctx), headers={"Authorization": f"Bearer {token}"})


@contextmanager
def brain_in(folder: Path, projects_toml: str, project_ids: Iterable[str]) -> Iterator[tuple[ServiceContext, dict[str, str]]]:
    """A site with ``projects_toml`` added, the BRAIN study placed in the cache of each named project,
    and API tokens for its users (`tokens_for`)."""
    from mi2b2.services.context import build_context
    from mi2b2.synthetic import write_study
    from mi2b2.testing import FakeClock
    from support import studies
    from support.site import load_site
    from support.viewing import place

    ctx = build_context(load_site(folder / "site", extra=projects_toml), clock=FakeClock())
    try:
        for project in project_ids:
            for file in write_study(studies.BRAIN, folder / "synthetic"):
                place(ctx, project, file)
        yield ctx, tokens_for(ctx)
    finally:
        ctx.engine.dispose()
