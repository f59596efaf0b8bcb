"""`mi2b2 request ...`: ask for studies, watch them arrive, and manage the queue."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated

import typer
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table

from mi2b2.api.schemas.requests import RequestPage
from mi2b2.cli.common import (
    DEFAULT_SERVER,
    FormatOption,
    ProjectArg,
    ServerOption,
    TokenOption,
    api_client,
    console,
    emit,
    errors,
    plain,
    read_uid_list,
)
from mi2b2.errors import InvalidInput

app = typer.Typer(help="Request studies into the project cache and manage the request queue.", no_args_is_help=True)

IdsArg = Annotated[list[int], typer.Argument(help="request ids")]
# Most telling first: a narrow terminal shows only the leading columns.
COLUMNS = ["id", "state", "accession", "received", "expected_instances", "waiting_reason", "last_error", "priority",
           "patient_id", "user", "pacs_id", "bytes", "attempts", "study_uid"]
ACTIVE = ("scheduled", "processing")


@app.command("add")
def add(
    project: ProjectArg,
    study_uids: Annotated[list[str] | None, typer.Argument(help="StudyInstanceUIDs")] = None,
    pacs: Annotated[str, typer.Option("--pacs", help="PACS id (see `mi2b2 pacs list`)")] = "",
    series: Annotated[list[str] | None, typer.Option("--series", help="only these SeriesInstanceUIDs (one study)")] = None,
    priority: Annotated[int, typer.Option(help="-9..9; higher starts first within the project")] = 0,
    file: Annotated[Path | None, typer.Option("--file", help="file with one StudyInstanceUID per line")] = None,
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
) -> None:
    """Request studies into the project cache (the paper's "Move to Repository")."""
    if not pacs:
        raise InvalidInput("name the PACS with --pacs (see `mi2b2 pacs list`)")
    uids = read_uid_list(study_uids, file)
    if series and len(uids) != 1:
        raise InvalidInput("--series picks series of one study; give exactly one StudyInstanceUID with it")
    studies = [{"study_uid": uid, "series_uids": list(series or [])} for uid in uids]
    with api_client(server, token) as client:
        report = client.request_studies(project, pacs, studies, priority)
    console.print(f"{len(report['created'])} requests queued (batch {report['batch_id']})", style="green")
    for key, label in [("already_cached", "already complete in the cache"), ("already_queued", "already queued"),
                       ("not_found", "not found on the PACS"), ("not_permitted", "refused: patient not on the IRB list")]:
        if report.get(key):
            errors.print(f"{label}: {', '.join(report[key])}")


@app.command("list")
def list_(
    project: ProjectArg,
    state: Annotated[list[str] | None, typer.Option("--state", help="only this state (repeatable)")] = None,
    kind: Annotated[list[str] | None, typer.Option("--kind", help="only this kind: retrieve or forward (repeatable)")] = None,
    by: Annotated[list[str] | None, typer.Option("--by", help="only requests of this user (repeatable)")] = None,
    patient: Annotated[str, typer.Option("--patient", help="only this patient (MRN)")] = "",
    limit: Annotated[int, typer.Option(help="requests per page (at most 1000)")] = 100,
    before: Annotated[int | None, typer.Option(help="only requests older than this id (the next page)")] = None,
    watch: Annotated[bool, typer.Option("--watch", help="live view until every request has ended (Ctrl-C stops)")] = False,
    interval: Annotated[float, typer.Option(help="seconds between refreshes with --watch")] = 2.0,
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
    fmt: FormatOption = "table",
) -> None:
    """List the project's requests, newest first, a page at a time, with the count per state."""
    with api_client(server, token) as client:
        def page() -> RequestPage:
            return client.request_page(project, state, before, limit, kind, by, patient)

        if not watch:
            answer = page()
            emit(answer.rows, COLUMNS, fmt, f"requests of {project}")
            errors.print(_summary(answer), highlight=False)  # on stderr: JSON and CSV stay clean on stdout
            return
        with Live(console=console, auto_refresh=False) as live:
            while True:
                answer = page()
                live.update(_progress_table(project, answer), refresh=True)
                if not any(answer.state_counts.get(s) for s in ACTIVE):
                    break
                time.sleep(interval)


def _summary(answer: RequestPage) -> str:
    counts = ", ".join(f"{n} {s}" for s, n in sorted(answer.state_counts.items()))
    line = f"{len(answer.rows)} of {answer.total} shown ({counts or 'no requests'})"
    if answer.next_before is not None:
        line += f"; next page: --before {answer.next_before}"
    return line


@app.command("show")
def show(request_id: Annotated[int, typer.Argument()], server: ServerOption = DEFAULT_SERVER, token: TokenOption = None,
         fmt: FormatOption = "table") -> None:
    """Everything about one request."""
    with api_client(server, token) as client:
        row = plain(client.request(request_id))
    if fmt == "table":
        table = Table(show_header=False)
        for key, value in row.items():
            table.add_row(key, "" if value is None else str(value))
        console.print(table)
    else:
        emit([row], list(row), fmt)


@app.command("cancel")
def cancel(ids: IdsArg, server: ServerOption = DEFAULT_SERVER, token: TokenOption = None) -> None:
    """Cancel scheduled or processing requests (a running retrieval is stopped with C-CANCEL)."""
    with api_client(server, token) as client:
        result = client.cancel_requests(ids)
    console.print(f"canceled: {', '.join(map(str, result.canceled))}", style="green")


@app.command("retry")
def retry(ids: IdsArg, server: ServerOption = DEFAULT_SERVER, token: TokenOption = None) -> None:
    """Queue failed, incomplete or canceled requests again."""
    with api_client(server, token) as client:
        result = client.retry_requests(ids)
    console.print(f"queued again: {', '.join(map(str, result.retried))}", style="green")


@app.command("priority")
def priority(value: Annotated[int, typer.Argument(help="-9..9")], ids: IdsArg, server: ServerOption = DEFAULT_SERVER,
             token: TokenOption = None) -> None:
    """Change the priority of scheduled requests."""
    with api_client(server, token) as client:
        result = client.set_priority(ids, value)
    console.print(f"priority {value}: {', '.join(map(str, result.changed))}", style="green")


def _progress_table(project: str, answer: RequestPage) -> Table:
    table = Table(title=f"requests of {project}: {_summary(answer)}")
    for column in ("id", "state", "progress", "received", "MB", "waiting / error", "accession"):
        table.add_column(column)
    for row in answer.rows:
        expected = max(row["expected_instances"] or 0, row["received"] or 0)
        bar = ProgressBar(total=expected or 1, completed=row["received"] or 0, width=20)
        note = row["waiting_reason"] if row["state"] == "scheduled" else (row["last_error"] or "")
        table.add_row(str(row["id"]), row["state"], bar, f"{row['received']}/{expected}",
                      f"{(row['bytes'] or 0) / 1e6:.1f}", note or "", row["accession"] or "")
    return table
