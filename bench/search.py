"""Benchmark: one mi2b2 search for 1,000 MRNs vs. DCMTK findscu run once per MRN;
and a 20,000-MRN search job vs. one pynetdicom association sending the same C-FINDs.

    python bench/search.py [--patients N] [--job-mrns N] [--runs N]

Starts Orthanc (TCP_NODELAY=1) and loads one small study per patient, writes a
site configuration whose project allows every MRN, starts `mi2b2 serve` in a
subprocess and creates a researcher with a token. Then it times

  (a) mi2b2: one ``POST /api/v1/search/patients`` with all MRNs (the PACS is
      configured with the Study Root model, so mi2b2 sends one STUDY-level
      C-FIND per MRN on one kept association), and
  (b) reference: ``findscu -S`` (Study Root, STUDY level, the same return keys)
      run once per MRN, sequentially, with TCP_NODELAY=1,

and, for the second figure, with query governance wide open (no rate cap, 64
associations),

  (c) mi2b2: one ``POST /api/v1/search/patients`` with 20,000 MRNs (the first
      N held by the PACS), which runs as a background search job in the
      server's worker, timed from the POST until its status says completed, and
  (d) reference: one pynetdicom association (opened as mi2b2's DICOM adapter
      opens it: TCP_NODELAY, stock pynetdicom's lost-response race fixed)
      sending the same 20,000 STUDY-level C-FINDs back to back with nothing
      around them, the protocol's own limit on this machine,

checks that each found every patient, keeps the best of ``--runs`` runs of
each, prints the figures, ``job_vs_raw: <c / d>`` (target <= 1.5), and ends
with ``ratio: <a / b>`` (target <= 0.3).
Everything it starts is stopped, and its temp folder removed, on exit.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
from contextlib import ExitStack
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))

from _server import BenchFailure, mi2b2_server, researcher_token  # noqa: E402

from mi2b2.services.search import STUDY_KEYS  # noqa: E402
from mi2b2.synthetic import SyntheticStudy, write_study  # noqa: E402
from support.pacs import RunningPacs, free_port, start_orthanc  # noqa: E402

PROJECT = "bench"
PACS_ID = "orthanc"
# findscu -v logs the request identifier, then each pending answer's identifier
# after a "Find Response" line; the PatientID lines after the first such line are answers.
_PATIENT_ID_LINE = re.compile(r"^I: \(0010,0020\) LO \[(?P<value>[^\]]*)\]", re.MULTILINE)



def mrn(i: int) -> str:
    # Leading zeros, as real MRNs have them: they must survive every hop.
    return f"{i:08d}"


def generate(data: Path, count: int) -> list[Path]:
    files: list[Path] = []
    for i in range(1, count + 1):
        study = SyntheticStudy(
            patient_id=mrn(i), patient_name=f"BENCH^PATIENT{i:04d}", birth_date="19700101", sex="O",
            accession=f"BA{i:08d}", study_date="20240101", modality="CR", description="BENCH CHEST",
            series_count=1, instances_per_series=1, rows=8, cols=8,
        )
        files.extend(write_study(study, data))
    return files


def write_site(folder: Path, pacs: RunningPacs, count: int) -> Path:
    """Governance wide open for searches; the interactive search stays below the job threshold."""
    (folder / "bench.mrns").write_text("\n".join(mrn(i) for i in range(1, count + 1)) + "\n", encoding="utf-8")
    http_port, dicom_port = free_port(), free_port()
    path = folder / "mi2b2.toml"
    path.write_text(textwrap.dedent(f"""\
        [server]
        http_port = {http_port}
        database_url = "sqlite:///mi2b2.db"
        cache_dir = "cache"
        worker_poll_seconds = 0.2

        [dicom]
        ae_title = "MI2B2"
        port = {dicom_port}

        [[institutions]]
        id = "bench"

        [[institutions.departments]]
        id = "radiology"

        [[institutions.departments.pacs]]
        id = "{PACS_ID}"
        ae_title = "{pacs.ae_title}"
        host = "{pacs.host}"
        port = {pacs.port}
        query_model = "study"
        default_max_concurrent_queries = 64
        default_queries_per_second = 0

        [[projects]]
        id = "{PROJECT}"
        title = "Search benchmark"
        irb = "BENCH-0001"
        expires = 2099-12-31
        mrn_file = "bench.mrns"
        quota = "1 GiB"
        institutions = ["bench"]
        members = [{{ login = "bench" }}]

        [search]
        job_threshold = 1000
        """), encoding="utf-8")
    return path


def time_mi2b2(url: str, token: str, mrns: list[str]) -> tuple[float, set[str]]:
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as http:
        def search(values: list[str]) -> dict[str, object]:
            response = http.post("/api/v1/search/patients",
                                 json={"project": PROJECT, "pacs": PACS_ID, "mrns": "\n".join(values)})
            if response.status_code != 200:
                raise BenchFailure(f"mi2b2 search failed: HTTP {response.status_code} {response.text[:500]}")
            return response.json()  # type: ignore[no-any-return]

        search(mrns[:1])  # warm-up: the server loads its DICOM stack on the first search
        started = time.perf_counter()
        report = search(mrns)
        elapsed = time.perf_counter() - started
    patients = report["patients"]
    assert isinstance(patients, list)
    return elapsed, {p["patient_id"] for p in patients}


def time_job(url: str, token: str, mrns: list[str]) -> tuple[float, set[str]]:
    import httpx

    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=600) as http:
        started = time.perf_counter()
        response = http.post("/api/v1/search/patients", json={"project": PROJECT, "pacs": PACS_ID, "mrns": "\n".join(mrns)})
        if response.status_code != 202:
            raise BenchFailure(f"mi2b2 did not start a search job: HTTP {response.status_code} {response.text[:500]}")
        job_id = response.json()["job_id"]
        while (status := http.get(f"/api/v1/search/jobs/{job_id}").json())["state"] in ("queued", "running"):
            time.sleep(0.1)
        elapsed = time.perf_counter() - started
        if status["state"] != "completed":
            raise BenchFailure(f"search job {job_id} {status['state']}: {status.get('error')}")
        report = http.get(f"/api/v1/search/jobs/{job_id}/results").json()
    return elapsed, {p["patient_id"] for p in report["patients"]}


def time_raw_association(pacs: RunningPacs, mrns: list[str]) -> tuple[float, set[str]]:
    """The same STUDY-level C-FINDs on one pynetdicom association, back to back, with
    nothing around them: the association as mi2b2's DICOM adapter opens it (TCP_NODELAY,
    the fixes for pynetdicom's polling and its lost-response race), no search service,
    no governor, no database."""
    from mi2b2.adapters.dicom.scu import DicomPeer, LocalAE, QueryLevel, QueryModel, open_find_session

    found: set[str] = set()
    with open_find_session(LocalAE("MI2B2"), DicomPeer(pacs.ae_title, pacs.host, pacs.port)) as session:
        started = time.perf_counter()
        for value in mrns:
            for answer in session.find(QueryModel.STUDY_ROOT, QueryLevel.STUDY, {**STUDY_KEYS, "PatientID": value}):
                found.add(answer.get("PatientID", ""))
        elapsed = time.perf_counter() - started
    return elapsed, found


def findscu_command(pacs: RunningPacs, value: str) -> list[str]:
    keys = [arg for key in STUDY_KEYS if key != "PatientID" for arg in ("-k", key)]
    return ["findscu", "-v", "-S", "-aet", "MI2B2", "-aec", pacs.ae_title, "--max-pdu", "131072",
            "-k", "QueryRetrieveLevel=STUDY", "-k", f"PatientID={value}", *keys, pacs.host, str(pacs.port)]


def time_findscu(pacs: RunningPacs, mrns: list[str]) -> tuple[float, set[str]]:
    env = {**os.environ, "TCP_NODELAY": "1"}

    def run(value: str) -> set[str]:
        result = subprocess.run(findscu_command(pacs, value), env=env, capture_output=True, text=True,
                                timeout=60, check=False)
        if result.returncode != 0:
            raise BenchFailure(f"findscu failed ({result.returncode}): {result.stderr[-1000:]}")
        log = result.stdout + result.stderr
        answers = log[log.find("Find Response:"):] if "Find Response:" in log else ""
        return {m.group("value").strip() for m in _PATIENT_ID_LINE.finditer(answers)}

    run(mrns[0])  # warm-up, as for mi2b2
    found: set[str] = set()
    started = time.perf_counter()
    for value in mrns:
        found |= run(value)
    return time.perf_counter() - started, found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--patients", type=int, default=1000)
    parser.add_argument("--job-mrns", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=3, help="best of this many runs of each figure")
    args = parser.parse_args()
    count, job_count = args.patients, max(args.job_mrns, args.patients + 1)
    if shutil.which("findscu") is None or shutil.which("Orthanc") is None:
        raise SystemExit("needs DCMTK (findscu) and Orthanc: apt-get install -y dcmtk orthanc")
    root = Path(tempfile.mkdtemp(prefix="mi2b2-bench-search-"))
    mrns = [mrn(i) for i in range(1, count + 1)]
    job_mrns = [mrn(i) for i in range(1, job_count + 1)]  # the first `count` are in the PACS
    runs: dict[str, list[float]] = {"ours": [], "reference": [], "job": [], "raw": []}
    try:
        with ExitStack() as stack:
            t0 = time.perf_counter()
            files = generate(root / "data", count)
            t1 = time.perf_counter()
            pacs = stack.enter_context(start_orthanc(root / "orthanc"))
            pacs.load(files)
            t2 = time.perf_counter()
            print(f"setup: {count} patients generated in {t1 - t0:.1f} s, loaded into Orthanc in {t2 - t1:.1f} s")

            site = root / "site"
            site.mkdir()
            config_path = write_site(site, pacs, job_count)
            token = researcher_token(config_path)
            url = stack.enter_context(mi2b2_server(config_path)).url

            for _ in range(args.runs):
                ours, found_ours = time_mi2b2(url, token, mrns)
                reference, found_reference = time_findscu(pacs, mrns)
                job, found_job = time_job(url, token, job_mrns)
                raw, found_raw = time_raw_association(pacs, job_mrns)
                for key, value in (("ours", ours), ("reference", reference), ("job", job), ("raw", raw)):
                    runs[key].append(value)
                for label, found in (("search job", found_job), ("pynetdicom", found_raw)):
                    if found != set(mrns):
                        raise BenchFailure(f"{label} found {len(found & set(mrns))} of the {count} patients in the PACS")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    ours, reference, job, raw = (min(runs[k]) for k in ("ours", "reference", "job", "raw"))

    print(f"mi2b2 API, one search of {count} MRNs (STUDY-level C-FIND each): {ours:.2f} s "
          f"({ours / count * 1000:.2f} ms per MRN), found {len(found_ours)}")
    print(f"reference, findscu once per MRN (TCP_NODELAY=1): {reference:.2f} s "
          f"({reference / count * 1000:.2f} ms per MRN), found {len(found_reference)}")
    for label, found in (("mi2b2", found_ours), ("findscu", found_reference)):
        if found != set(mrns):
            raise BenchFailure(f"{label} found {len(found & set(mrns))} of {count} patients "
                               f"({len(set(mrns) - found)} missing, {len(found - set(mrns))} unexpected)")
    print(f"mi2b2 search job of {job_count} MRNs, governance wide open (POST to completed): {job:.2f} s "
          f"({job / job_count * 1000:.3f} ms per MRN)")
    print(f"reference, one pynetdicom association, {job_count} C-FINDs back to back: {raw:.2f} s "
          f"({raw / job_count * 1000:.3f} ms per MRN)")
    print(f"best of {args.runs} runs each")
    print(f"job_vs_raw: {job / raw:.3f}")
    print(f"ratio: {ours / reference:.3f}")


if __name__ == "__main__":
    try:
        main()
    except BenchFailure as failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        sys.exit(1)
