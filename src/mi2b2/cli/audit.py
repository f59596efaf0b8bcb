"""`mi2b2 audit ...`: read, export and verify the audit trail."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer

from mi2b2.cli.common import DEFAULT_CONFIG, ConfigOption, FormatOption, console, emit, errors, local_context, operator
from mi2b2.config import load_config
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
    ctx = local_context(config, read_only=True)
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
    ctx = local_context(config, read_only=True)
    for chunk in ctx.audit.export_csv(operator(), AuditFilter(user, project, action, patient, since, until)):
        typer.echo(chunk, nl=False)


@app.command("verify")
def audit_verify(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Check the chain (keyed part with the key) and the signed checkpoints; exit 1 naming the first bad row."""
    verdict = local_context(config, read_only=True).audit.verify(operator())
    if verdict.ok:
        console.print(f"audit trail intact: {verdict.summary}", style="green")
        return
    where = f"at row {verdict.bad_seq}" if verdict.bad_seq is not None else "(checkpoint file)"
    errors.print(f"audit trail BROKEN {where}: {verdict.problem}\nchecked before it: {verdict.summary}",
                 style="bold red")
    raise typer.Exit(1)


@app.command("init-key")
def audit_init_key(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Create the audit key file ([audit] key_file, mode 0600). An existing trail is verified first and
    sealed: its rows stay plain SHA-256, every row from the new one on is keyed. Never overwrites a key."""
    from mi2b2.services.context import build_context

    site = load_config(config)
    ctx = build_context(site, sync_config=False, audit_key=False)
    key, verdict = ctx.audit.init_key(operator(), site.audit_key_file())
    console.print(f"audit key written to {site.audit_key_file()} (mode 0600); {verdict.checked} earlier events "
                  f"verified and sealed, keyed from row {key.keyed_from} on. Keep a copy somewhere safe, outside "
                  "the database's backups, and give every host that runs mi2b2 the same file.", style="green")


@app.command("checkpoint")
def audit_checkpoint(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Sign the chain head now and append it to the checkpoint file (workers do it every few minutes)."""
    site = load_config(config)
    checkpoint = local_context(config).audit.checkpoint()
    if checkpoint is None:
        console.print("nothing new to sign: the trail is empty", style="yellow")
        return
    console.print(f"checkpoint of row {checkpoint.seq} appended to {site.audit_checkpoint_file()}", style="green")
