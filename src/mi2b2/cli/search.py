"""`mi2b2 search ...`: search the PACS through the mi2b2 server's API."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from mi2b2.api.schemas.search import SearchJobResults, SearchJobTicket, SearchReport
from mi2b2.cli.common import (
    DEFAULT_SERVER,
    FormatOption,
    ServerOption,
    TokenOption,
    api_client,
    console,
    emit,
    errors,
    read_list_argument,
)
from mi2b2.client import Mi2b2Client
from mi2b2.errors import Mi2b2Error

app = typer.Typer(help="Search the PACS for what your project's IRB allows.", no_args_is_help=True)

ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="project id (see `mi2b2 projects`)")]
PacsOpt = Annotated[str, typer.Option("--pacs", help="PACS id (see `mi2b2 pacs list`)")]
FileOpt = Annotated[Path | None, typer.Option("--file", help="text or CSV file with one value per line")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="for a search large enough to run as a job: show its "
                                                        "progress and print the results when it is done")]
POLL_SECONDS = 1.0

PATIENT_COLUMNS = ["patient_id", "patient_name", "birth_date", "sex", "study_count"]
STUDY_COLUMNS = ["patient_id", "patient_name", "accession", "study_date", "modalities", "description",
                 "series_count", "instance_count", "institution_id", "study_uid"]
SERIES_COLUMNS = ["study_uid", "series_number", "modality", "description", "instance_count", "series_uid"]


Report = SearchReport | SearchJobResults


def _summary(report: Report) -> None:
    """Refusals and misses go to stderr so that --format csv output stays clean."""
    for listed, label in [(report.refused, "refused (not on the IRB list, never sent to the PACS)"),
                          (report.not_permitted, "not permitted (patient not on the IRB list)"),
                          (report.not_found, "not found"), (report.duplicates, "duplicates (searched once)")]:
        if listed:
            errors.print(f"{label}: {', '.join(listed)}")
    for entry in report.invalid:
        errors.print(f"invalid line {entry.line}: {entry.reason}")
    for patient, count in report.capped.items():
        errors.print(f"{count} older studies of {patient} left out by the project's per-patient cap")
    for warning in report.warnings:
        errors.print(f"warning: {warning}", style="yellow")


def _follow(client: Mi2b2Client, answer: SearchReport | SearchJobTicket, wait: bool, server: str) -> Report | None:
    """A small search's report as it is; a job's results once done (--wait), or how to follow it."""
    if isinstance(answer, SearchReport):
        return answer
    job_id = answer.job_id
    if answer.refused:
        errors.print(f"refused (not on the IRB list, never sent to the PACS): {', '.join(answer.refused)}")
    if not wait:
        console.print(f"search job {job_id} started for {answer.total} identifiers; follow it with "
                      f"`mi2b2 search job {job_id} --wait --server {server}`, stop it with "
                      f"`mi2b2 search cancel {job_id} --server {server}`")
        return None
    return _wait_for(client, job_id)


def _wait_for(client: Mi2b2Client, job_id: int) -> SearchJobResults:
    columns = (TextColumn(f"search job {job_id}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
               TextColumn("{task.description}"))
    with Progress(*columns, console=errors, transient=False) as progress:
        status = client.search_job(job_id)
        task = progress.add_task("", total=status.total, completed=status.done)
        while status.state in ("queued", "running"):
            time.sleep(POLL_SECONDS)
            status = client.search_job(job_id)
            progress.update(task, completed=status.done, description=status.waiting_reason or "")
    if status.state != "completed":
        raise Mi2b2Error(f"search job {job_id} {status.state}: {status.error or 'no reason given'}; "
                         f"what it found before is at `mi2b2 search job {job_id}`")
    return client.search_job_results(job_id)


@app.command("patients")
def patients(mrns: Annotated[list[str] | None, typer.Argument(help="MRNs")] = None, project: ProjectOpt = "",
             pacs: PacsOpt = "", file: FileOpt = None, wait: WaitOpt = False, server: ServerOption = DEFAULT_SERVER,
             token: TokenOption = None, fmt: FormatOption = "table") -> None:
    """Find patients by MRN (Tab 1)."""
    with api_client(server, token) as client:
        report = _follow(client, client.search_patients(project, pacs, read_list_argument(mrns, file, "MRN")),
                         wait, server)
    if report is not None:
        _show_patients(report, fmt)


def _show_patients(report: Report, fmt: str) -> None:
    emit(report.patients, PATIENT_COLUMNS, fmt, _title("patients", report))
    _summary(report)


def _show_studies(report: Report, fmt: str) -> None:
    emit(report.studies, STUDY_COLUMNS, fmt, _title("studies", report))
    _summary(report)


def _title(what: str, report: Report) -> str:
    if isinstance(report, SearchJobResults):
        return f"{what} (search job {report.job_id}, {report.done} of {report.total} searched)"
    return f"{what} (query {report.query_id})"


@app.command("studies")
def studies(mrns: Annotated[list[str] | None, typer.Argument(help="MRNs")] = None, project: ProjectOpt = "",
            pacs: PacsOpt = "", file: FileOpt = None,
            accessions: Annotated[bool, typer.Option("--accessions", help="the values are accession numbers")] = False,
            wait: WaitOpt = False, server: ServerOption = DEFAULT_SERVER, token: TokenOption = None,
            fmt: FormatOption = "table") -> None:
    """Find studies by MRN, or by accession number with --accessions (Tab 2)."""
    what = "accession number" if accessions else "MRN"
    with api_client(server, token) as client:
        text = read_list_argument(mrns, file, what)
        answer = client.search_accessions(project, pacs, text) if accessions else client.search_studies(project, pacs, text)
        report = _follow(client, answer, wait, server)
    if report is not None:
        _show_studies(report, fmt)


@app.command("job")
def job(job_id: Annotated[int, typer.Argument(help="search job id")], wait: WaitOpt = False,
        server: ServerOption = DEFAULT_SERVER, token: TokenOption = None, fmt: FormatOption = "table") -> None:
    """Show a search job's progress, or (with --wait) follow it and print its results."""
    with api_client(server, token) as client:
        report = _wait_for(client, job_id) if wait else client.search_job_results(job_id)
    if report.kind == "patients":
        _show_patients(report, fmt)
    else:
        _show_studies(report, fmt)
    if report.state != "completed":
        errors.print(f"search job {job_id} is {report.state}: {report.done} of {report.total} searched"
                     + (f" ({report.waiting_reason})" if report.waiting_reason else "")
                     + (f"; {report.error}" if report.error else ""))


@app.command("cancel")
def cancel(job_id: Annotated[int, typer.Argument(help="search job id")], server: ServerOption = DEFAULT_SERVER,
           token: TokenOption = None) -> None:
    """Stop a search job; what it found so far stays readable."""
    with api_client(server, token) as client:
        status = client.cancel_search_job(job_id)
    console.print(f"search job {job_id}: {status.state} after {status.done} of {status.total}")


@app.command("series")
def series(study_uids: Annotated[list[str], typer.Argument(help="StudyInstanceUIDs")], project: ProjectOpt = "",
           pacs: PacsOpt = "", server: ServerOption = DEFAULT_SERVER, token: TokenOption = None,
           fmt: FormatOption = "table") -> None:
    """List the series of chosen studies, to request only some of them."""
    with api_client(server, token) as client:
        report = client.search_series(project, pacs, study_uids)
    emit(report.series, SERIES_COLUMNS, fmt, f"series (query {report.query_id})")
    _summary(report)
