"""`mi2b2 demo`: a complete site on one machine, with no setup beyond installing mi2b2.

It generates synthetic studies (once), runs one demo PACS per institution
(pynetdicom's qrscp, see `mi2b2.demo_pacs`), writes a site configuration with
projects, IRB allow-lists and governance windows, creates demo users and a
token, starts `mi2b2 serve` and prints what to try. Ctrl-C or SIGTERM stops
every process it started.

Everything lives in one folder, so a second run reuses the studies, the PACS
databases and the users, and only the ports and the token are new.
"""

from __future__ import annotations

import contextlib
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from types import FrameType

from mi2b2.config import load_config
from mi2b2.demo_pacs import DemoPacs, free_port, launch_qrscp, port_is_free, stop_process_group, store_files
from mi2b2.domain.clock import SystemClock
from mi2b2.domain.principal import SYSTEM
from mi2b2.errors import InvalidInput, PermanentError
from mi2b2.services.context import build_context
from mi2b2.synthetic import SyntheticStudy, study_instance_uid, write_study

__all__ = ["run_demo"]

HOST = "127.0.0.1"
SERVER_START_TIMEOUT = 60.0
MI2B2_AE = "MI2B2"


@dataclass(frozen=True)
class Site:
    id: str
    name: str
    department: str
    pacs_id: str
    ae_title: str
    timezone: str
    windows: str  # TOML array-of-tables body for this PACS's governance windows


@dataclass(frozen=True)
class Patient:
    site: str
    mrn: str
    name: str
    birth_date: str
    sex: str
    # accession, date, modality, description, series, instances per series
    studies: tuple[tuple[str, str, str, str, int, int], ...]


@dataclass(frozen=True)
class DemoUser:
    login: str
    role: str
    display_name: str
    password: str


SITES = (
    Site("northside", "Northside General Hospital", "radiology", "northside-pacs", "NORTHSIDE", "America/New_York",
         windows="""
            [[institutions.departments.pacs.windows]]
            name = "clinical hours: go gently"
            days = ["mon-fri"]
            start = 07:00:00
            end = 19:00:00
            max_concurrent = 1
            studies_per_minute = 2
            studies_per_hour = 60

            [[institutions.departments.pacs.windows]]
            name = "weekends"
            days = ["sat-sun"]
            max_concurrent = 4
            studies_per_minute = 20

            [[institutions.departments.pacs.windows]]
            name = "nights"
            days = ["mon-sun"]
            start = 19:00:00
            end = 07:00:00
            max_concurrent = 3
            studies_per_minute = 10
         """),
    Site("lakeside", "Lakeside Children's Hospital", "pediatric-radiology", "lakeside-pacs", "LAKESIDE",
         "America/Chicago",
         windows="""
            [[institutions.departments.pacs.windows]]
            name = "morning reading rush: closed to research"
            days = ["mon-fri"]
            start = 08:00:00
            end = 12:00:00
            closed = true

            [[institutions.departments.pacs.windows]]
            name = "rest of the week"
            max_concurrent = 2
            studies_per_minute = 5
            studies_per_hour = 120
         """),
)

# MRN formats differ by institution, as they do in real life: leading zeros
# that must survive, letters with digits, dashes, and a bare short number.
PATIENTS = (
    Patient("northside", "000123", "DOE^JANE", "19680412", "F", (
        ("NS23004171", "20230314", "MR", "MRI BRAIN W/WO CONTRAST", 5, 24),
        ("NS24000912", "20240109", "CR", "XR CHEST 2 VIEWS", 2, 1))),
    Patient("northside", "0045678", "SMITH^ROBERT^J", "19550130", "M", (
        ("NS22011020", "20221102", "CT", "CT CHEST W/O CONTRAST", 3, 30),
        ("NS24006201", "20240620", "MR", "MRI BRAIN W/O CONTRAST", 6, 20))),
    Patient("northside", "NS-20417", "GARCIA^MARIA^L", "19790823", "F", (
        ("NS23008815", "20230815", "MR", "MRI BRAIN MS PROTOCOL", 5, 24),
        ("NS24003307", "20240307", "US", "US ABDOMEN COMPLETE", 3, 4))),
    Patient("northside", "000987", "NGUYEN^THANH", "19900105", "M", (
        ("NS24001150", "20240115", "CT", "CT ABDOMEN PELVIS W CONTRAST", 3, 30),
        ("NS24001151", "20240115", "CR", "XR CHEST PA", 1, 1))),
    Patient("northside", "A77031", "O'BRIEN^PATRICK", "19480317", "M", (
        ("NS21009944", "20210928", "CR", "XR CHEST 2 VIEWS", 2, 1),
        ("NS23000458", "20230118", "CT", "CT CHEST LOW DOSE SCREENING", 2, 25))),
    Patient("lakeside", "LC0002201", "PATEL^ANANYA", "20120704", "F", (
        ("LK2300781", "20230502", "MR", "MRI BRAIN PEDS W/O SEDATION", 4, 30),
        ("LK2401266", "20240211", "US", "US RENAL", 3, 4))),
    Patient("lakeside", "LC-0310", "MÜLLER^JONAS", "20150921", "M", (
        ("LK2402020", "20240404", "CR", "XR CHEST 2 VIEWS", 2, 1),
        ("LK2402021", "20240404", "US", "US ABDOMEN LIMITED", 2, 6))),
    Patient("lakeside", "77", "KIM^SOO-AH", "20090218", "F", (
        ("LK2200355", "20220614", "MR", "MRI SPINE CERVICAL", 4, 28),
        ("LK2300902", "20230930", "CT", "CT HEAD W/O CONTRAST", 2, 30))),
)

# Each list leaves out patients that are in the PACS, so that refusals show;
# brain-mri also names a patient the PACS does not have (0099999). An entry is
# (institution, MRN): brain-mri reaches both institutions, so its list is a CSV
# with an institution column; the others reach one and keep a plain list.
ALLOW_LISTS = {
    "brain-mri": (("northside", "000123"), ("northside", "0045678"), ("northside", "NS-20417"),
                  ("lakeside", "LC0002201"), ("lakeside", "77"), ("northside", "0099999")),
    "chest-ct": (("northside", "0045678"), ("northside", "000987"), ("northside", "A77031")),
    "peds-us": (("lakeside", "LC0002201"), ("lakeside", "LC-0310")),
}

USERS = (
    DemoUser("researcher", "researcher", "Rita Researcher", "demo-researcher"),
    DemoUser("admin", "admin", "Adam Admin", "demo-admin-pass"),
    DemoUser("auditor", "auditor", "Audrey Auditor", "demo-auditor"),
)


class _Stop(BaseException):
    """Raised from the SIGINT/SIGTERM handler; BaseException so no `except Exception` swallows it."""


def run_demo(folder: Path, port: int) -> None:
    """Run the demo until SIGINT or SIGTERM; then stop everything it started and return."""
    folder = folder.expanduser().resolve()
    if not 1 <= port <= 65535:
        raise InvalidInput(f"--port {port} is not a TCP port; use 1-65535")
    if not port_is_free(HOST, port):
        raise InvalidInput(f"port {port} on {HOST} is already in use; pick another one with `mi2b2 demo --port {port + 1}`")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InvalidInput(f"cannot create the demo folder {folder}: {exc.strerror}; choose another with --folder") from None

    _SIGNALS.pending = False
    previous = {sig: signal.signal(sig, _SIGNALS) for sig in (signal.SIGINT, signal.SIGTERM)}
    stopped = False
    try:
        with contextlib.ExitStack() as cleanup:
            try:
                _run(folder, port, cleanup)
            except _Stop:
                stopped = True
                print("\nstopping the demo: server and PACS ...", flush=True)
            finally:
                # A second Ctrl-C must not cut the clean-up short and leave a PACS behind.
                for sig in previous:
                    signal.signal(sig, signal.SIG_IGN)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stopped:
        print("demo stopped.", flush=True)


class _StopSignals:
    """SIGINT/SIGTERM handler: raises `_Stop`, or defers it while a child is being spawned.

    Deferring (rather than blocking the signals with sigmask) matters: children
    inherit a blocked mask across exec and would then ignore our SIGTERM."""

    def __init__(self) -> None:
        self.holding = False
        self.pending = False

    def __call__(self, _signum: int, _frame: FrameType | None) -> None:
        if self.holding:
            self.pending = True
            return
        raise _Stop

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Spawn a child and register its clean-up in here, so that no signal can land in between."""
        self.holding = True
        try:
            yield
        finally:
            self.holding = False
        if self.pending:
            raise _Stop


_SIGNALS = _StopSignals()


def _run(folder: Path, port: int, cleanup: contextlib.ExitStack) -> None:
    started = time.monotonic()
    studies_dir, generated = _ensure_studies(folder)
    dicom_port = free_port()  # where the PACS would C-MOVE to; the receiver will listen here
    pacs: dict[str, DemoPacs] = {}
    for site in SITES:
        workdir = folder / "pacs" / site.id
        if generated and workdir.exists():
            shutil.rmtree(workdir)  # new studies: an old PACS database would not match them
        with _SIGNALS.held():
            running = launch_qrscp(site.pacs_id, workdir, site.ae_title, {MI2B2_AE: (HOST, dicom_port)})
            cleanup.callback(running.stop)
        pacs[site.id] = running
    for running in pacs.values():
        running.wait_ready()
    _load_all([(pacs[site.id], sorted((studies_dir / site.id).rglob("*.dcm"))) for site in SITES])

    config_path = _write_site(folder, port, dicom_port, pacs)
    token = _prepare_accounts(config_path)
    server = _start_server(folder, config_path, port, cleanup)
    url = f"http://{HOST}:{port}"
    _wait_healthy(server, url, folder / "server.log")
    _print_banner(folder, config_path, url, token, pacs, time.monotonic() - started)

    while True:
        code = server.poll()
        if code is not None:
            raise PermanentError(f"the mi2b2 server stopped unexpectedly (exit code {code}); see {folder / 'server.log'}")
        for running in pacs.values():
            if running.process.poll() is not None:
                raise PermanentError(f"demo PACS {running.name} stopped unexpectedly; see {running.log_path}")
        time.sleep(0.5)


# studies ----------------------------------------------------------------------


def _studies() -> list[tuple[str, SyntheticStudy]]:
    out = []
    for patient in PATIENTS:
        for accession, day, modality, description, series, per_series in patient.studies:
            out.append((patient.site, SyntheticStudy(
                patient_id=patient.mrn, patient_name=patient.name, birth_date=patient.birth_date, sex=patient.sex,
                accession=accession, study_date=day, modality=modality, description=description,
                series_count=series, instances_per_series=per_series,
            )))
    return out


def _ensure_studies(folder: Path) -> tuple[Path, bool]:
    """Generate the studies unless a previous run did; return (folder, generated now)."""
    target = folder / "studies"
    if target.is_dir():
        return target, False
    print("generating synthetic studies (first run only) ...", flush=True)
    # Write aside and rename at the end, so an interrupted run never leaves a
    # half-filled `studies` folder that later runs would take as complete.
    partial = folder / "studies.partial"
    if partial.exists():
        shutil.rmtree(partial)
    try:
        for site_id, study in _studies():
            write_study(study, partial / site_id)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target, True


def _load_all(work: list[tuple[DemoPacs, list[Path]]]) -> None:
    """Load each PACS that does not hold its studies yet, all PACS at once (qrscp is CPU-bound)."""
    todo = [(pacs, files) for pacs, files in work if not _is_loaded(pacs, files)]
    if not todo:
        return
    for pacs, files in todo:
        print(f"loading {len(files)} instances into demo PACS {pacs.name} ...", flush=True)
    cancel = threading.Event()
    pool = ThreadPoolExecutor(max_workers=len(todo), thread_name_prefix="demo-load")
    try:
        futures = [(pacs, pool.submit(store_files, pacs.ae_title, pacs.host, pacs.port, files, cancel))
                   for pacs, files in todo]
        for pacs, future in futures:
            stored = future.result()
            pacs.loaded_marker.write_text(f"{stored}\n", encoding="utf-8")
    finally:
        # On Ctrl-C or a failed load, the other loaders abort after their file
        # in flight; only then may the clean-up stop the PACS under them.
        cancel.set()
        pool.shutdown(wait=True, cancel_futures=True)


def _is_loaded(pacs: DemoPacs, files: list[Path]) -> bool:
    marker = pacs.loaded_marker
    return marker.exists() and marker.read_text(encoding="utf-8").strip() == str(len(files))


# configuration and accounts ---------------------------------------------------------


def _write_site(folder: Path, port: int, dicom_port: int, pacs: dict[str, DemoPacs]) -> Path:
    """Rewritten on every run: the PACS ports are new each time."""
    today = SystemClock().now().date()
    for project, entries in ALLOW_LISTS.items():
        if len({institution for institution, _ in entries}) > 1:
            lines = ["institution,mrn", *(f"{institution},{mrn}" for institution, mrn in entries)]
            (folder / f"{project}.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
        else:
            (folder / f"{project}.mrns").write_text("\n".join(mrn for _, mrn in entries) + "\n", encoding="utf-8")
    institutions = "".join(_institution_toml(site, pacs[site.id]) for site in SITES)
    members = '[{ login = "researcher", role = "lead" }]'
    text = textwrap.dedent(f"""\
        # Written by `mi2b2 demo` on every run (the demo PACS ports change); edit a copy, not this file.

        [server]
        http_host = "{HOST}"
        http_port = {port}
        database_url = "sqlite:///mi2b2.db"
        cache_dir = "cache"

        [dicom]
        ae_title = "{MI2B2_AE}"
        host = "{HOST}"
        port = {dicom_port}
        """) + institutions + textwrap.dedent(f"""
        [[projects]]
        id = "brain-mri"
        title = "Brain MRI outcomes cohort"
        irb = "2025P000417"
        expires = {_iso(today + timedelta(days=730))}
        mrn_file = "brain-mri.csv"  # one CSV for both institutions: institution,mrn
        quota = "20 GiB"
        institutions = ["northside", "lakeside"]
        max_studies_per_patient = 10
        members = {members}

        [[projects]]
        id = "chest-ct"
        title = "Low-dose chest CT screening"
        irb = "2024P002213"
        expires = {_iso(today + timedelta(days=365))}
        mrn_file = "chest-ct.mrns"
        quota = "5 GiB"
        institutions = ["northside"]
        members = [{{ login = "researcher" }}]

        [[projects]]
        id = "peds-us"
        title = "Pediatric abdominal ultrasound registry"
        irb = "2019P000311"
        expires = 2021-06-30
        mrn_file = "peds-us.mrns"
        quota = "1 GiB"
        institutions = ["lakeside"]
        members = [{{ login = "researcher" }}]
        """)
    path = folder / "mi2b2.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _institution_toml(site: Site, pacs: DemoPacs) -> str:
    return textwrap.dedent(f"""
        [[institutions]]
        id = "{site.id}"
        name = "{site.name}"

        [[institutions.departments]]
        id = "{site.department}"
        name = "Radiology"

        [[institutions.departments.pacs]]
        id = "{site.pacs_id}"
        name = "{site.name} PACS (demo: pynetdicom qrscp)"
        ae_title = "{pacs.ae_title}"
        host = "{pacs.host}"
        port = {pacs.port}
        retrieve = "c-move"
        timezone = "{site.timezone}"
        """) + textwrap.dedent(site.windows)


def _iso(day: date) -> str:
    return day.isoformat()


def _prepare_accounts(config_path: Path) -> str:
    """Create the demo users if missing and a fresh API token for the researcher; return the token."""
    config = load_config(config_path)
    ctx = build_context(config, migrate=True, sync_config=True, audit_key=config.audit_key_file().exists())
    try:
        if not ctx.audit.keyed:
            # As `mi2b2 audit init-key` does: a new demo site gets a fresh key, and a demo folder
            # from a version without keyed audit has its trail verified and sealed under one.
            ctx.audit.init_key(SYSTEM, config.audit_key_file())
        existing = {user.login for user in ctx.accounts.list_users()}
        for user in USERS:
            if user.login not in existing:
                ctx.accounts.add_user(SYSTEM, user.login, user.role, user.password, display_name=user.display_name)
        issued = ctx.accounts.create_token(SYSTEM, "researcher", "mi2b2 demo", days=7)
    finally:
        ctx.engine.dispose()
    return issued.secret


# the server -----------------------------------------------------------------------------


def _start_server(folder: Path, config_path: Path, port: int, cleanup: contextlib.ExitStack) -> subprocess.Popen[bytes]:
    log_path = folder / "server.log"
    with _SIGNALS.held(), log_path.open("ab") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "mi2b2", "serve", "--config", str(config_path)],
            cwd=folder,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # stopped by us, in order, not by the terminal's Ctrl-C
        )
        cleanup.callback(stop_process_group, server)
    return server


def _wait_healthy(server: subprocess.Popen[bytes], url: str, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        code = server.poll()
        if code is not None:
            tail = _last_line(log_path)
            if "address already in use" in tail.lower():
                port = url.rsplit(":", 1)[1]
                raise InvalidInput(f"port {port} on {HOST} was taken while the demo started; "
                                   "pick another one with `mi2b2 demo --port`")
            raise PermanentError(f"the mi2b2 server did not start (exit code {code}): {tail or 'no output'} "
                                 f"(log: {log_path})")
        try:
            with urllib.request.urlopen(f"{url}/api/v1/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.2)
    raise PermanentError(f"the mi2b2 server did not answer {url}/api/v1/health within {SERVER_START_TIMEOUT:g} s "
                         f"(log: {log_path})")


def _last_line(path: Path) -> str:
    try:
        lines = [line for line in path.read_text(encoding="utf-8", errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1].strip() if lines else ""


# what to try ---------------------------------------------------------------------------


def _cli() -> list[str]:
    """How to call this same mi2b2 from a shell: plain `mi2b2` only if that is what PATH finds."""
    argv0 = Path(sys.argv[0])
    if argv0.name == "mi2b2":
        found = shutil.which("mi2b2")
        if found and Path(found).resolve() == argv0.resolve():
            return ["mi2b2"]
        return [str(argv0.resolve())]
    return [sys.executable, "-m", "mi2b2"]


def _command(*args: str) -> str:
    return shlex.join([*_cli(), *args])


def _print_banner(folder: Path, config_path: Path, url: str, token: str, pacs: dict[str, DemoPacs],
                  seconds: float) -> None:
    common = ["--server", url, "--token", token]
    search_patients = _command("search", "patients", "--project", "brain-mri", "--pacs", "northside-pacs", *common,
                               "000123", "0045678", "000987")
    search_accessions = _command("search", "studies", "--accessions", "--project", "brain-mri", "--pacs",
                                 "lakeside-pacs", *common, "LK2300781", "LK2402020")
    audit = _command("audit", "list", "--config", str(config_path), "--action", "denied")
    first_study = next(study for site_id, study in _studies() if study.patient_id == "000123")
    request = _command("request", "add", "brain-mri", "--pacs", "northside-pacs", *common, study_instance_uid(first_study))
    watch = _command("request", "list", "brain-mri", "--watch", *common)
    cache = _command("cache", "list", "brain-mri", *common)
    instances = sum(series * per for p in PATIENTS for *_, series, per in p.studies)
    pacs_lines = "\n".join(
        f"  {site.pacs_id:15s} {pacs[site.id].ae_title}@{HOST}:{pacs[site.id].port}  ({site.name})" for site in SITES
    )
    users = "\n".join(f"  {u.login:11s} password {u.password:16s} ({u.role})" for u in USERS)
    print(f"""
mi2b2 demo is running at {url}   (ready in {seconds:.1f} s)
  client:    {url}/app/   (open it in a browser; log in as researcher, admin or auditor below)
  API docs:  {url}/api/v1/docs
  folder:    {folder}   (config {config_path.name}, server log server.log)

Demo PACS (pynetdicom qrscp), {len(PATIENTS)} patients, {instances} instances:
{pacs_lines}

Projects: brain-mri (both institutions), chest-ct (Northside), peds-us (IRB expired: every search refused).

Logins:
{users}

API token for researcher (new on every run, valid 7 days):
  {token}

Try:
  # 000987 is in the PACS but not on brain-mri's IRB list: refused, never sent to the PACS
  $ {search_patients}
  # LK2402020 belongs to a patient brain-mri may not see: found, then withheld
  $ {search_accessions}
  # the refusals, in the audit trail
  $ {audit}
  # move a study into brain-mri's cache, watch the governed queue deliver it, then list the cache
  $ {request}
  $ {watch}
  $ {cache}

Press Ctrl-C to stop the server and the demo PACS.
""", flush=True)

