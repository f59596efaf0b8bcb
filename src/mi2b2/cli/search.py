"""`mi2b2 search ...`: search the PACS through the mi2b2 server's API."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from mi2b2.cli.common import (
    DEFAULT_SERVER,
    FormatOption,
    ServerOption,
    TokenOption,
    api_client,
    emit,
    errors,
    read_list_argument,
)

app = typer.Typer(help="Search the PACS for what your project's IRB allows.", no_args_is_help=True)

ProjectOpt = Annotated[str, typer.Option("--project", "-p", help="project id (see `mi2b2 projects`)")]
PacsOpt = Annotated[str, typer.Option("--pacs", help="PACS id (see `mi2b2 pacs list`)")]
FileOpt = Annotated[Path | None, typer.Option("--file", help="text or CSV file with one value per line")]

PATIENT_COLUMNS = ["patient_id", "patient_name", "birth_date", "sex", "study_count"]
STUDY_COLUMNS = ["patient_id", "patient_name", "accession", "study_date", "modalities", "description",
                 "series_count", "instance_count", "institution_id", "study_uid"]
SERIES_COLUMNS = ["study_uid", "series_number", "modality", "description", "instance_count", "series_uid"]


def _summary(report: dict[str, Any]) -> None:
    """Refusals and misses go to stderr so that --format csv output stays clean."""
    for key, label in [("refused", "refused (not on the IRB list, never sent to the PACS)"),
                       ("not_permitted", "not permitted (patient not on the IRB list)"),
                       ("not_found", "not found"), ("duplicates", "duplicates (searched once)")]:
        if report.get(key):
            errors.print(f"{label}: {', '.join(report[key])}")
    for entry in report.get("invalid", []):
        errors.print(f"invalid line {entry['line']}: {entry['reason']}")
    for patient, count in report.get("capped", {}).items():
        errors.print(f"{count} older studies of {patient} left out by the project's per-patient cap")
    for warning in report.get("warnings", []):
        errors.print(f"warning: {warning}", style="yellow")


@app.command("patients")
def patients(mrns: Annotated[list[str] | None, typer.Argument(help="MRNs")] = None, project: ProjectOpt = "",
             pacs: PacsOpt = "", file: FileOpt = None, server: ServerOption = DEFAULT_SERVER,
             token: TokenOption = None, fmt: FormatOption = "table") -> None:
    """Find patients by MRN (Tab 1)."""
    with api_client(server, token) as client:
        report = client.search_patients(project, pacs, read_list_argument(mrns, file, "MRN"))
    emit(report["patients"], PATIENT_COLUMNS, fmt, f"patients (query {report['query_id']})")
    _summary(report)


@app.command("studies")
def studies(mrns: Annotated[list[str] | None, typer.Argument(help="MRNs")] = None, project: ProjectOpt = "",
            pacs: PacsOpt = "", file: FileOpt = None,
            accessions: Annotated[bool, typer.Option("--accessions", help="the values are accession numbers")] = False,
            server: ServerOption = DEFAULT_SERVER, token: TokenOption = None, fmt: FormatOption = "table") -> None:
    """Find studies by MRN, or by accession number with --accessions (Tab 2)."""
    what = "accession number" if accessions else "MRN"
    with api_client(server, token) as client:
        text = read_list_argument(mrns, file, what)
        report = client.search_accessions(project, pacs, text) if accessions else client.search_studies(project, pacs, text)
    emit(report["studies"], STUDY_COLUMNS, fmt, f"studies (query {report['query_id']})")
    _summary(report)


@app.command("series")
def series(study_uids: Annotated[list[str], typer.Argument(help="StudyInstanceUIDs")], project: ProjectOpt = "",
           pacs: PacsOpt = "", server: ServerOption = DEFAULT_SERVER, token: TokenOption = None,
           fmt: FormatOption = "table") -> None:
    """List the series of chosen studies, to request only some of them."""
    with api_client(server, token) as client:
        report = client.search_series(project, pacs, study_uids)
    emit(report["series"], SERIES_COLUMNS, fmt, f"series (query {report['query_id']})")
    _summary(report)
