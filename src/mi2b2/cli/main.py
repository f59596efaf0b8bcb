"""The `mi2b2` command."""

from __future__ import annotations

import errno
import logging
import sys
from pathlib import Path
from typing import Annotated

import typer

from mi2b2.adapters.dicom.errors import ReceiverUnavailable
from mi2b2.adapters.process import accepts_connections, private_files, withhold_exception_messages
from mi2b2.cli import admin, audit, cache, download, forward, reidentify, requests, search, view
from mi2b2.cli.common import (
    DEFAULT_CONFIG,
    DEFAULT_SERVER,
    ConfigOption,
    FormatOption,
    ServerOption,
    TokenOption,
    api_client,
    console,
    emit,
    errors,
    plain,
)
from mi2b2.config import load_config
from mi2b2.errors import Mi2b2Error

app = typer.Typer(help="mi2b2: IRB-governed research access to the hospital PACS.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
config_app = typer.Typer(help="Site configuration.", no_args_is_help=True)
db_app = typer.Typer(help="Database schema.", no_args_is_help=True)
pacs_app = typer.Typer(help="PACS nodes.", no_args_is_help=True)
app.add_typer(config_app, name="config")
app.add_typer(db_app, name="db")
app.add_typer(pacs_app, name="pacs")
app.add_typer(admin.app, name="admin")
app.add_typer(audit.app, name="audit")
app.add_typer(search.app, name="search")
app.add_typer(cache.app, name="cache")
app.add_typer(requests.app, name="request")
app.command("notifications")(cache.notifications)
app.command("forward")(forward.forward)
app.command("destinations")(forward.destinations)
app.command("download")(download.download)
app.command("decrypt")(download.decrypt)
app.command("view")(view.view)
app.command("reidentify")(reidentify.reidentify)
admin.app.command("fsck")(cache.fsck)


@app.command()
def serve(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Run the server: HTTP API, DICOM receiver and a scheduler worker in one process."""
    from mi2b2.server import run_server

    run_server(load_config(config))


@app.command()
def worker(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Run a scheduler worker alone (more of them, on any host, share one PostgreSQL database)."""
    _run_background(config, receiver=False, worker=True, what="worker")


@app.command()
def receiver(
    config: ConfigOption = DEFAULT_CONFIG,
    processes: Annotated[int | None, typer.Option(
        min=1, max=64, help="receiver processes sharing the DICOM port (SO_REUSEPORT, Linux); "
                            "default: [dicom] processes of the site configuration")] = None,
) -> None:
    """Run the DICOM receiver (C-STORE SCP) alone; with --processes N, N of them on one port."""
    count = processes if processes is not None else load_config(config).dicom.processes
    if count > 1:
        from mi2b2.receiver_processes import Port, exec_receiver_processes
        from mi2b2.services.context import build_context

        site = load_config(config)
        if accepts_connections(site.dicom.host, site.dicom.port, timeout=0.5):  # before touching the database
            raise ReceiverUnavailable(site.dicom.ae_title, site.dicom.host, site.dicom.port,
                                      OSError(errno.EADDRINUSE, "something already listens on that port"))
        build_context(site, migrate=True, sync_config=True).engine.dispose()  # once, before the receivers start
        exec_receiver_processes(config.resolve(), Port(site.dicom.ae_title, site.dicom.host, site.dicom.port),
                                site.cache_dir(), count)
    _run_background(config, receiver=True, worker=False, what="receiver")


def _run_background(config: Path, receiver: bool, worker: bool, what: str) -> None:
    from mi2b2.runtime import run_alone

    run_alone(load_config(config), receiver=receiver, worker=worker, what=what)


@app.command()
def demo(
    folder: Annotated[Path, typer.Option(help="where the demo site, studies and database go")] = Path("demo-site"),
    port: Annotated[int, typer.Option(help="HTTP port")] = 8080,
) -> None:
    """Generate studies, start a demo PACS and the server, print how to try it. Ctrl-C stops everything."""
    from mi2b2.demo import run_demo

    run_demo(folder, port)


@config_app.command("check")
def config_check(file: Annotated[Path, typer.Argument(help="mi2b2.toml to validate")]) -> None:
    """Validate a configuration file (and its MRN lists) without starting anything."""
    config = load_config(file)
    pacs = config.all_pacs()
    console.print(f"{file}: OK — {len(config.institutions)} institutions, {len(pacs)} PACS, "
                  f"{len(config.projects)} projects, {len(config.destinations)} destinations", style="green")


@config_app.command("reload")
def config_reload(server: ServerOption = DEFAULT_SERVER, token: TokenOption = None) -> None:
    """Ask the running server to re-read its configuration (admin token)."""
    with api_client(server, token) as client:
        result = client.reload_config()
    console.print("configuration reloaded", style="green")
    for key in ("added", "changed", "deactivated"):
        if result.get(key):
            console.print(f"{key}: {', '.join(result[key])}")


@db_app.command("upgrade")
def db_upgrade(config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Create or migrate the database schema, then load the configuration into it."""
    from mi2b2.services.context import build_context

    ctx = build_context(load_config(config), migrate=True, sync_config=True)
    console.print(f"database at {ctx.engine.url.render_as_string(hide_password=True)} is up to date", style="green")


@pacs_app.command("echo")
def pacs_echo(pacs_id: Annotated[str | None, typer.Argument(help="one PACS id; all when omitted")] = None,
              config: ConfigOption = DEFAULT_CONFIG, fmt: FormatOption = "table") -> None:
    """C-ECHO each configured PACS and say whether it is reachable, or why not."""
    from mi2b2.services.pacs import echo_pacs

    reports = echo_pacs(load_config(config), [pacs_id] if pacs_id else None)
    rows = [plain(r) for r in reports]
    for row in rows:
        row["status"] = f"reachable ({row['milliseconds']} ms)" if row["reachable"] else f"NOT reachable: {row['problem']}"
    emit(rows, ["pacs_id", "institution", "department", "address", "status"], fmt, "PACS")
    if not all(r.reachable for r in reports):
        raise typer.Exit(1)


@pacs_app.command("list")
def pacs_list(server: ServerOption = DEFAULT_SERVER, token: TokenOption = None, fmt: FormatOption = "table") -> None:
    """PACS nodes you may search, through the server."""
    with api_client(server, token) as client:
        rows = client.pacs()
    emit(rows, ["id", "institution", "department", "ae_title", "retrieve"], fmt, "PACS")


@app.command("projects")
def projects(server: ServerOption = DEFAULT_SERVER, token: TokenOption = None, fmt: FormatOption = "table") -> None:
    """Your projects, with IRB and expiry."""
    with api_client(server, token) as client:
        rows = client.projects()
    emit(rows, ["id", "title", "irb", "expires", "expired", "role", "institutions"], fmt, "projects")


def run() -> None:
    """Entry point: user errors print one clear line, never a traceback."""
    private_files()
    withhold_exception_messages()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        app()
    except Mi2b2Error as error:
        errors.print(f"error: {error}", style="bold red", markup=False, highlight=False)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
