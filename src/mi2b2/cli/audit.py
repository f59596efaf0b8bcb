"""`mi2b2 audit ...`: read, export and verify the audit trail."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from mi2b2.cli.common import DEFAULT_CONFIG, ConfigOption, FormatOption, console, emit, errors, local_context, operator
from mi2b2.services.audit import EXPORT_COLUMNS, AuditFilter

app = typer.Typer(help="The audit trail (every read of it is itself audited).", no_args_is_help=True)

UserOpt = Annotated[str | None, typer.Option("--user", help="who acted")]
ProjectOpt = Annotated[str | None, typer.Option("--project")]
ActionOpt = Annotated[str | None, typer.Option("--action", help="login, query, denied, retrieve, download, ...")]
PatientOpt = Annotated[str | None, typer.Option("--patient", help="MRN")]
SinceOpt = Annotated[datetime | None, typer.Option("--since", help="ISO date/time, UTC")]
UntilOpt = Annotated[datetime | None, typer.Option("--until", help="ISO date/time, UTC")]


@app.command("list")
def audit_list(user: UserOpt = None, project: ProjectOpt = None, action: ActionOpt = None, patient: PatientOpt = None,
               since: SinceOpt = None, until: UntilOpt = None,
               limit: Annotated[int, typer.Option(help="rows at most")] = 200,
               config: ConfigOption = DEFAULT_CONFIG, fmt: FormatOption = "table") -> None:
    """List audit events matching the filters."""
    ctx = local_context(config)
    rows = ctx.audit.list(operator(), AuditFilter(user, project, action, patient, since, until, limit))
    data = [{c: getattr(r, c) for c in EXPORT_COLUMNS} for r in rows]
    emit(data, ["seq", "occurred_at", "actor", "action", "outcome", "project_id", "pacs_id", "patient_id", "detail"],
         fmt, "audit trail")


@app.command("export")
def audit_export(user: UserOpt = None, project: ProjectOpt = None, action: ActionOpt = None,
                 patient: PatientOpt = None, since: SinceOpt = None, until: UntilOpt = None,
                 csv_format: Annotated[bool, typer.Option("--csv", help="CSV (the only format)")] = True,
                 config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Write the matching events as CSV, hashes included, to standard output."""
    ctx = local_context(config)
    for chunk in ctx.audit.export_csv(operator(), AuditFilter(user, project, action, patient, since, until)):
        typer.echo(chunk, nl=False)


@app.command("verify")
def audit_verify(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Check the hash chain; exit 1 naming the first bad row if any row was edited, deleted or reordered."""
    verdict = local_context(config).audit.verify(operator())
    if verdict.ok:
        console.print(f"audit trail intact: {verdict.checked} events verified", style="green")
        return
    errors.print(f"audit trail BROKEN at row {verdict.bad_seq}: {verdict.problem} "
                 f"({verdict.checked} events verified before it)", style="bold red")
    raise typer.Exit(1)
