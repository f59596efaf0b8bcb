"""`mi2b2 forward` and `mi2b2 destinations`: send cached studies to other DICOM nodes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

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
    read_uid_list,
)
from mi2b2.errors import InvalidInput


def forward(
    project: ProjectArg,
    study_uids: Annotated[list[str] | None, typer.Argument(help="StudyInstanceUIDs in the project's cache")] = None,
    to: Annotated[str, typer.Option("--to", help="destination id (see `mi2b2 destinations PROJECT`)")] = "",
    series: Annotated[list[str] | None, typer.Option("--series", help="only these SeriesInstanceUIDs")] = None,
    priority: Annotated[int, typer.Option(help="-9..9; higher starts first within the project")] = 0,
    file: Annotated[Path | None, typer.Option("--file", help="file with one StudyInstanceUID per line")] = None,
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
) -> None:
    """Forward cached studies to a DICOM destination (XNAT, OsiriX, a research PACS).

    Follow them with `mi2b2 request list PROJECT`; cancel or retry them with `mi2b2 request`."""
    if not to:
        raise InvalidInput(f"name the destination with --to (see `mi2b2 destinations {project}`)")
    uids = read_uid_list(study_uids, file)
    with api_client(server, token) as client:
        report = client.forward(project, to, uids, list(series or []), priority)
    console.print(f"{len(report['created'])} forwards to {to} queued (batch {report['batch_id']})", style="green")
    for key, label in [("already_queued", "already being forwarded there"),
                       ("not_cached", "not in the project's cache"),
                       ("not_permitted", "refused: patient not on the IRB list")]:
        if report.get(key):
            errors.print(f"{label}: {', '.join(report[key])}")


def destinations(project: ProjectArg, server: ServerOption = DEFAULT_SERVER, token: TokenOption = None,
                 fmt: FormatOption = "table") -> None:
    """The DICOM destinations a project may forward to."""
    with api_client(server, token) as client:
        rows = client.destinations(project)
    emit(rows, ["id", "name", "ae_title", "host", "port", "max_concurrent"], fmt, f"destinations of {project}")
