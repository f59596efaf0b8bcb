"""What every CLI command shares: options, the local context, the API client, output."""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, is_dataclass
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from mi2b2.api.schemas.common import Readable
from mi2b2.client import Mi2b2Client
from mi2b2.config import load_config
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import InvalidInput
from mi2b2.services.audit import spreadsheet_safe
from mi2b2.services.context import ServiceContext, build_context

console = Console()
errors = Console(stderr=True, soft_wrap=True)

ConfigOption = Annotated[
    Path, typer.Option("--config", "-c", envvar="MI2B2_CONFIG", help="site configuration file")
]
ServerOption = Annotated[
    str, typer.Option("--server", envvar="MI2B2_URL", help="URL of the mi2b2 server")
]
TokenOption = Annotated[
    str | None, typer.Option("--token", envvar="MI2B2_TOKEN", help="API token (create one with `mi2b2 admin token create`)")
]
FormatOption = Annotated[str, typer.Option("--format", "-f", help="table, csv or json")]
ProjectArg = Annotated[str, typer.Argument(help="project id (see `mi2b2 projects`)")]

DEFAULT_CONFIG = Path("mi2b2.toml")
DEFAULT_SERVER = "http://127.0.0.1:8080"


def local_context(config_path: Path, sync_config: bool = False, read_only: bool = False) -> ServiceContext:
    """The services over the site's database. A command that only reads never migrates the database
    (it may be shared with servers of another version); it stops, naming `mi2b2 db upgrade`, when the
    schema is not this version's. A command that writes migrates it first, as `mi2b2 db upgrade` would."""
    if read_only:
        return build_context(load_config(config_path), sync_config=False, migrate=False, require_current=True)
    return build_context(load_config(config_path), sync_config=sync_config)


def operator() -> Principal:
    """Local commands run with database access, i.e. as the site's operator."""
    return Principal(f"cli:{getpass.getuser()}", Role.ADMIN, client="local")


def api_client(server: str, token: str | None) -> Mi2b2Client:
    if not token:
        raise InvalidInput("no API token: pass --token or set MI2B2_TOKEN (an admin creates one with "
                           "`mi2b2 admin token create LOGIN`)")
    return Mi2b2Client(server, token)


def plain(value: Any) -> Any:
    """A dataclass or an API answer as the JSON object it stands for (timestamps as the API writes them)."""
    if isinstance(value, Readable):
        return value.json_object()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    return value


def emit(answers: Sequence[Mapping[str, Any] | Readable], columns: list[str], fmt: str, title: str = "") -> None:
    rows: list[dict[str, Any]] = [plain(answer) for answer in answers]
    if fmt == "json":
        typer.echo(json.dumps(rows, indent=2, default=str))
    elif fmt == "csv":
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        # A cell a spreadsheet would run as a formula (a PatientID from a PACS can start with "=") gets an apostrophe.
        writer.writerows({column: spreadsheet_safe(row.get(column)) for column in columns} for row in rows)
        typer.echo(buffer.getvalue(), nl=False)
    elif fmt == "table":
        cells = [["" if row.get(c) is None else str(row.get(c)) for c in columns] for row in rows]
        shown = fitting_columns(columns, cells, console.width)
        table = Table(title=title or None, show_lines=False)
        for column in columns[:shown]:
            table.add_column(column, overflow="fold")  # a long value (an error naming its fix) wraps, whole
        for line in cells:
            table.add_row(*line[:shown])
        console.print(table)
        if shown < len(columns):
            errors.print(f"{len(columns) - shown} columns not shown in {console.width} characters "
                         f"({', '.join(columns[shown:])}); use a wider terminal or --format csv / json")
    else:
        raise InvalidInput(f"unknown format {fmt!r}; use table, csv or json")


def fitting_columns(columns: list[str], cells: list[list[str]], width: int, widest_cell: int = 40) -> int:
    """How many leading columns fit in `width` characters. Columns come in order of
    importance, so a narrow terminal loses the last ones rather than getting every
    value folded over several lines; at least two are always shown. A value longer
    than `widest_cell` counts as that wide: it wraps within its column, whole."""
    used = 1  # the table's left border
    for index, column in enumerate(columns):
        natural = max([len(column), *(min(len(line[index]), widest_cell) for line in cells)])
        used += natural + 3  # padding either side and a border
        if used > width and index >= 2:
            return index
    return len(columns)


def read_list_argument(values: list[str] | None, file: Path | None, what: str) -> str:
    if file is not None:
        try:
            return file.read_text(encoding="utf-8-sig")
        except FileNotFoundError:
            raise InvalidInput(f"{what} file {file} does not exist") from None
        except UnicodeDecodeError:
            raise InvalidInput(f"{what} file {file} is not text; give a plain-text or CSV file") from None
    if values:
        return "\n".join(values)
    if not os.isatty(0):
        return typer.get_text_stream("stdin").read()
    raise InvalidInput(f"give {what}s as arguments, with --file, or on standard input")


def read_uid_list(values: list[str] | None, file: Path | None) -> list[str]:
    """StudyInstanceUIDs from arguments, a file or standard input, one per line."""
    return [u.strip() for u in read_list_argument(values, file, "StudyInstanceUID").splitlines() if u.strip()]
