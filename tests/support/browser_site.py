"""What the browser tests run against: a real Orthanc holding a known catalogue of
studies, and `mi2b2 serve` in a subprocess retrieving from it.

No pytest here (as in `support.pacs`): tests/browser/conftest.py turns these into
fixtures, and a test that needs a site of its own can call `serve()` directly.

The catalogue is read back from the files that were loaded, so `Catalog` says
exactly what the PACS holds: patients, studies, series, modalities and dates.
"""

from __future__ import annotations

import contextlib
import json
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pydicom

from mi2b2.config import load_config
from mi2b2.domain.principal import Principal, Role
from mi2b2.services.context import build_context
from mi2b2.synthetic import SyntheticStudy, write_study
from support.pacs import RunningPacs, free_port
from support.server import Mi2b2Server, start_server
from support.site import ALLOWED_A, pacs_block, write_site

if TYPE_CHECKING:
    from playwright.sync_api import Page

REPO = Path(__file__).resolve().parents[2]
SCREENSHOTS = REPO / "test-artifacts" / "screenshots"
CHROMIUM = Path("/usr/bin/chromium")  # Debian's package, installed by scripts/setup.sh; never a downloaded one
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
PACS_ID = "main"
PACS_NAME = "General Hospital PACS"
RECEIVER_AE = "MI2B2"  # mi2b2's [dicom] ae_title in write_site, and Orthanc's C-MOVE destination name


# --- users ------------------------------------------------------------------------------


@dataclass(frozen=True)
class User:
    login: str
    password: str
    role: str  # "researcher" | "admin" | "auditor"
    projects: tuple[str, ...]  # project ids the user is a member of (write_site's members)


USERS: dict[str, User] = {
    user.login: user
    for user in (
        User("bob", "bob-password-1", "researcher", ("alpha",)),  # member of alpha only
        User("alice", "alice-password-1", "researcher", ("alpha", "beta")),  # alpha's lead; beta (IRB expired)
        User("carol", "carol-password-1", "researcher", ("beta",)),  # beta only, whose IRB has expired
        User("dave", "dave-password-1", "researcher", ()),  # in no project
        User("root", "root-password-1", "admin", ()),
        User("audrey", "audrey-password-1", "auditor", ()),
    )
}
RESEARCHER = USERS["bob"]
LEAD = USERS["alice"]
ADMIN = USERS["root"]
AUDITOR = USERS["audrey"]


# --- the catalogue ------------------------------------------------------------------------


@dataclass(frozen=True)
class SeriesInfo:
    uid: str
    number: int
    description: str
    modality: str
    sop_uids: tuple[str, ...]  # in InstanceNumber order

    @property
    def instance_count(self) -> int:
        return len(self.sop_uids)


@dataclass(frozen=True)
class StudyInfo:
    uid: str
    patient_id: str
    patient_name: str  # DICOM PN, e.g. "DOE^JANE"
    birth_date: str  # YYYYMMDD
    sex: str
    accession: str
    date: str  # StudyDate, YYYYMMDD as DICOM and the search API give it
    modality: str
    description: str
    series: tuple[SeriesInfo, ...]  # in SeriesNumber order

    @property
    def iso_date(self) -> str:
        return f"{self.date[:4]}-{self.date[4:6]}-{self.date[6:]}"

    @property
    def series_uids(self) -> tuple[str, ...]:
        return tuple(s.uid for s in self.series)

    @property
    def instance_count(self) -> int:
        return sum(s.instance_count for s in self.series)


@dataclass(frozen=True)
class Catalog:
    """What the test PACS holds, and alpha's allow-list."""

    pacs_id: str
    allow_list: tuple[str, ...]  # alpha's MRN file, in file order
    studies: tuple[StudyInfo, ...]  # ordered by patient id, then date

    @property
    def patients(self) -> tuple[str, ...]:
        """Every patient id in the PACS, sorted."""
        return tuple(sorted({s.patient_id for s in self.studies}))

    @property
    def on_list(self) -> tuple[str, ...]:
        """Patients in the PACS who are on alpha's allow-list, sorted."""
        return tuple(p for p in self.patients if p in self.allow_list)

    @property
    def off_list(self) -> tuple[str, ...]:
        """Patients in the PACS who are NOT on alpha's allow-list."""
        return tuple(p for p in self.patients if p not in self.allow_list)

    @property
    def not_in_pacs(self) -> tuple[str, ...]:
        """On alpha's allow-list, but the PACS has nothing for them."""
        return tuple(p for p in self.allow_list if p not in self.patients)

    def studies_of(self, *patient_ids: str) -> tuple[StudyInfo, ...]:
        return tuple(s for s in self.studies if s.patient_id in patient_ids)

    def study(self, accession_or_uid: str) -> StudyInfo:
        for s in self.studies:
            if accession_or_uid in (s.accession, s.uid):
                return s
        raise KeyError(f"no study {accession_or_uid!r} in the test PACS")

    def between(self, first: str = "", last: str = "", patients: tuple[str, ...] | None = None) -> tuple[StudyInfo, ...]:
        """Studies dated first..last inclusive (YYYYMMDD; empty = open), of `patients` (default: everyone)."""
        return tuple(s for s in self.studies
                     if (not first or s.date >= first) and (not last or s.date <= last)
                     and (patients is None or s.patient_id in patients))

    def with_modality(self, modality: str) -> tuple[StudyInfo, ...]:
        return tuple(s for s in self.studies if s.modality == modality)


def _study(pid: str, name: str, birth: str, sex: str, acc: str, date: str, modality: str, description: str,
           series: int, per_series: int) -> SyntheticStudy:
    return SyntheticStudy(patient_id=pid, patient_name=name, birth_date=birth, sex=sex, accession=acc,
                          study_date=date, modality=modality, description=description, series_count=series,
                          instances_per_series=per_series)


ALLOW_LIST = tuple(ALLOWED_A)  # 000123, MRN-0002, 77, PAT004, P005
OFF_LIST_PATIENT = "OFFLIST-9"
STUDIES = (
    _study("000123", "DOE^JANE", "19700101", "F", "BR-1001", "20210305", "MR", "MR BRAIN W/O CONTRAST", 3, 2),
    _study("000123", "DOE^JANE", "19700101", "F", "BR-1002", "20220611", "MR", "MR BRAIN FOLLOW-UP", 2, 2),
    _study("MRN-0002", "ROE^RICHARD", "19651224", "M", "BR-2001", "20230102", "CT", "CT CHEST", 2, 3),
    _study("77", "MILLER^ANA", "19881010", "F", "BR-3001", "20190720", "CT", "CT HEAD", 3, 2),
    _study("77", "MILLER^ANA", "19881010", "F", "BR-3002", "20230915", "MR", "MR SPINE", 2, 2),
    _study("77", "MILLER^ANA", "19881010", "F", "BR-3003", "20240228", "CT", "CT ABDOMEN", 2, 2),
    _study("P005", "SMITH^JOHN", "19591231", "M", "BR-5001", "20240610", "MR", "MR KNEE", 2, 2),
    # Not on alpha's allow-list; same date as BR-2001, so a date filter alone would find it.
    _study(OFF_LIST_PATIENT, "OFF^LIST", "19900101", "M", "BR-9001", "20230102", "MR", "MR BRAIN", 2, 2),
)


def write_catalog(folder: Path) -> tuple[Catalog, list[Path]]:
    """Write every study of STUDIES under `folder`; the catalogue is read back from the files."""
    files: list[Path] = []
    infos: list[StudyInfo] = []
    for synthetic in STUDIES:
        written = write_study(synthetic, folder)
        files.extend(written)
        infos.append(_study_info(written))
    infos.sort(key=lambda s: (s.patient_id, s.date, s.accession))
    return Catalog(PACS_ID, ALLOW_LIST, tuple(infos)), files


def _study_info(files: list[Path]) -> StudyInfo:
    headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in files]
    series: dict[str, list[Any]] = {}
    for ds in headers:
        series.setdefault(str(ds.SeriesInstanceUID), []).append(ds)
    infos = []
    for uid, members in series.items():
        members.sort(key=lambda ds: int(ds.InstanceNumber))
        first = members[0]
        infos.append(SeriesInfo(uid, int(first.SeriesNumber), str(first.SeriesDescription), str(first.Modality),
                                tuple(str(ds.SOPInstanceUID) for ds in members)))
    infos.sort(key=lambda s: s.number)
    ds = headers[0]
    return StudyInfo(uid=str(ds.StudyInstanceUID), patient_id=str(ds.PatientID), patient_name=str(ds.PatientName),
                     birth_date=str(ds.PatientBirthDate), sex=str(ds.PatientSex), accession=str(ds.AccessionNumber),
                     date=str(ds.StudyDate), modality=str(ds.Modality), description=str(ds.StudyDescription),
                     series=tuple(infos))


def orthanc_instance_count(pacs: RunningPacs) -> int:
    with urllib.request.urlopen(f"{pacs.http_url}/statistics", timeout=10) as response:
        return int(json.load(response)["CountInstances"])


def set_move_destination(pacs: RunningPacs, ae_title: str, port: int) -> None:
    """(Re)point Orthanc's C-MOVE destination `ae_title` at 127.0.0.1:`port`, while it runs."""
    body = json.dumps({"AET": ae_title, "Host": "127.0.0.1", "Port": port}).encode()
    request = urllib.request.Request(f"{pacs.http_url}/modalities/{ae_title}", data=body, method="PUT",
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=10) as response:
        if response.status != 200:
            raise RuntimeError(f"Orthanc refused modality {ae_title}: HTTP {response.status}")


# --- the site and `mi2b2 serve` -------------------------------------------------------------


def write_browser_site(folder: Path, pacs: RunningPacs, http_port: int, dicom_port: int,
                       users: dict[str, User] = USERS, receiver_process: bool = False, server_extra: str = "",
                       pacs_extra: str = "", site_extra: str = "") -> Path:
    """write_site's two institutions and projects (alpha: alice lead, bob; beta: carol, alice, IRB expired),
    one Orthanc PACS, alpha's allow-list ALLOW_LIST; the database initialised and `users` created with passwords.

    The receiver runs inside `mi2b2 serve` unless `receiver_process`: a second Python process
    costs ~2 s of start-up per server on the two-core CI machine, and the browser tests do not
    depend on where it runs. `server_extra` adds lines to [server]; `pacs_extra` adds TOML right
    after the Orthanc PACS (more [[institutions.departments.pacs]] of General Hospital's radiology);
    `site_extra` adds TOML at the end of the file (e.g. [[destinations]])."""
    block = pacs_block(PACS_ID, pacs.ae_title, pacs.port, f'name = "{PACS_NAME}"\n') + pacs_extra
    site = write_site(folder, pacs_blocks=block, allowed_a=list(ALLOW_LIST), dicom_port=dicom_port, extra=site_extra)
    server = (f"[server]\nhttp_port = {http_port}\nworker_poll_seconds = 0.2\n"
              f"receiver_process = {str(receiver_process).lower()}\n{server_extra}")
    site.write_text(site.read_text().replace("[server]\n", server, 1))
    ctx = build_context(load_config(site))  # migrates and loads the configuration, as `mi2b2 db upgrade` does
    try:
        operator = Principal("root", Role.ADMIN)
        for user in users.values():
            ctx.accounts.add_user(operator, user.login, user.role, user.password)
    finally:
        ctx.engine.dispose()
    return site


@contextlib.contextmanager
def serve(folder: Path, pacs: RunningPacs, users: dict[str, User] = USERS, receiver_process: bool = False,
          server_extra: str = "", pacs_extra: str = "", site_extra: str = "") -> Iterator[Mi2b2Server]:
    """A fresh site in `folder` served by `mi2b2 serve`, with `pacs` moving studies to its receiver.
    `server_extra`, `pacs_extra` and `site_extra` go into the site file as write_browser_site says.

    Orthanc's C-MOVE destination RECEIVER_AE is re-pointed at this server's receiver, so one
    PACS serves one server at a time."""
    http_port, dicom_port = free_port(), free_port()
    set_move_destination(pacs, RECEIVER_AE, dicom_port)
    site = write_browser_site(folder, pacs, http_port, dicom_port, users, receiver_process, server_extra,
                              pacs_extra, site_extra)
    server = start_server(site)
    try:
        yield server
    finally:
        server.stop()


# --- browser helpers -----------------------------------------------------------------------


def screenshot(page: Page, name: str) -> Path:
    """Save a full-page PNG as <repo>/test-artifacts/screenshots/<name>.png (gitignored) and return its path."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("._") or "screenshot"
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    path = SCREENSHOTS / f"{safe}.png"
    page.screenshot(path=str(path), full_page=True)
    return path


def login(page: Page, user: str | User, password: str | None = None) -> dict[str, Any]:
    """Log in through POST /api/v1/auth/login with the page's own request context, so the
    `mi2b2_session` cookie lands in the browser context. `password` defaults to USERS' one.

    Returns the login answer ({"login", "role", "display_name"}). Beware: failed logins are
    throttled per user, and a module shares one server."""
    login_name = user.login if isinstance(user, User) else user
    if password is None:
        password = user.password if isinstance(user, User) else USERS[login_name].password
    response = page.request.post("/api/v1/auth/login", data={"login": login_name, "password": password})
    if not response.ok:
        raise AssertionError(f"login as {login_name} failed: HTTP {response.status} {response.text()}")
    return response.json()  # type: ignore[no-any-return]
