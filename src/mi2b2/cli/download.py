"""`mi2b2 download` (cached studies into a folder, optionally age-encrypted) and `mi2b2 decrypt`."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import (
    BarColumn,
    DownloadColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
    TransferSpeedColumn,
)

from mi2b2.cli.common import DEFAULT_SERVER, ProjectArg, ServerOption, TokenOption, api_client, console, errors
from mi2b2.errors import InvalidInput

PASSPHRASE_ENV = "MI2B2_PASSPHRASE"

PassphraseFlag = Annotated[bool, typer.Option(
    "--passphrase", help=f"encrypt with a passphrase (asked for, or taken from ${PASSPHRASE_ENV})")]
PassphraseFile = Annotated[Path | None, typer.Option(
    "--passphrase-file", help="read the passphrase from the first line of this file", dir_okay=False)]


def download(
    project: ProjectArg,
    to: Annotated[Path, typer.Option("--to", help="folder to download into (resumes what is already there)")],
    study_uids: Annotated[list[str] | None, typer.Argument(help="StudyInstanceUIDs (see `mi2b2 cache list`)")] = None,
    all_studies: Annotated[bool, typer.Option("--all", help="every study in the project's cache")] = False,
    passphrase: PassphraseFlag = False,
    passphrase_file: PassphraseFile = None,
    recipients: Annotated[list[str] | None, typer.Option(
        "--recipient", "-r",
        help="encrypt to this public key (age1... or 'ssh-ed25519 ...') or to the keys in this file; repeatable")] = None,
    identities: Annotated[list[Path] | None, typer.Option(
        "--identity", "-i", help="private key, to resume an encrypted download made with --recipient")] = None,
    workers: Annotated[int, typer.Option(help="requests in flight, each a batch of files", min=1, max=16)] = 4,
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
) -> None:
    """Download cached studies into a folder: <patient>/<study>/<series>/<NNNN>.dcm, or encrypted with age.

    Rerun the same command to resume: complete files (size and SHA-256 checked)
    are skipped. Encrypted downloads never put a decrypted byte on disk; read
    the folder's README.txt, or restore it with `mi2b2 decrypt`."""
    from mi2b2.services.export.fetch import fetch_download

    if not study_uids and not all_studies:
        raise InvalidInput("name StudyInstanceUIDs to download, or --all for the whole cache")
    secret = ask_passphrase(passphrase, passphrase_file, confirm=not (to / "manifest.age").exists())
    keys = _recipients(recipients or [])
    if secret is not None and keys:
        raise InvalidInput("choose --passphrase or --recipient, not both")
    with api_client(server, token) as client, _Bar() as bar:
        report = fetch_download(client, project, study_uids or [], to, all_studies, secret, keys,
                                [str(i) for i in identities or []], bar, workers)
    done = f"{report.downloaded} downloaded, {report.skipped} already complete"
    kind = "encrypted " if report.encrypted else ""
    console.print(f"{report.files} {kind}files of {report.studies} studies in {to}: {done}", style="green")
    if report.encrypted:
        console.print(f"decrypt with `mi2b2 decrypt {to} --to FOLDER` or the age tool (see {to / 'README.txt'})")
    if report.failed:
        errors.print(f"{len(report.failed)} files failed:", style="bold red")
        for name, why in report.failed[:20]:
            errors.print(f"  {name}: {why}", markup=False, highlight=False)
        errors.print("run the same command again to retry them", style="yellow")
        raise typer.Exit(1)


def decrypt(
    source: Annotated[Path, typer.Argument(help="an encrypted download: its folder or ZIP")],
    to: Annotated[Path, typer.Option("--to", help="folder for the readable tree")],
    passphrase: PassphraseFlag = False,
    passphrase_file: PassphraseFile = None,
    identities: Annotated[list[Path] | None, typer.Option(
        "--identity", "-i", help="private key file (age key or unencrypted SSH key); repeatable")] = None,
) -> None:
    """Restore <patient>/<study>/<series>/<NNNN>.dcm from an encrypted download.

    Every file is decrypted and checked against the manifest before anything
    is written; a wrong key or a damaged file leaves --to untouched."""
    from mi2b2.services.export.reader import decrypt_download

    secret = ask_passphrase(passphrase, passphrase_file, confirm=False)
    with console.status("decrypting and checking every file before writing any"):
        report = decrypt_download(source, to, secret, [str(i) for i in identities or []])
    console.print(f"{report.files} files decrypted into {to}"
                  + (f", {report.already_there} were already there" if report.already_there else ""), style="green")


def ask_passphrase(flag: bool, file: Path | None, confirm: bool) -> str | None:
    """The passphrase from --passphrase-file, else $MI2B2_PASSPHRASE or the terminal when asked for; None if not."""
    if file is not None:
        try:
            lines = file.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            raise InvalidInput(f"passphrase file {file} does not exist") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInput(f"cannot read passphrase file {file} ({type(exc).__name__})") from None
        if not lines or not lines[0]:
            raise InvalidInput(f"passphrase file {file} is empty; put the passphrase on its first line")
        return lines[0]
    if not flag:
        return None
    if os.environ.get(PASSPHRASE_ENV):
        return os.environ[PASSPHRASE_ENV]
    if not os.isatty(0):
        raise InvalidInput(f"no terminal to ask for the passphrase: use --passphrase-file or set ${PASSPHRASE_ENV}")
    return str(typer.prompt("passphrase", hide_input=True, confirmation_prompt=confirm))


def _recipients(values: list[str]) -> list[str]:
    """Each value is a public key, or a file of them (one per line, as `age -R` reads)."""
    keys: list[str] = []
    for value in values:
        path = Path(value)
        if not value.startswith(("age1", "ssh-")) and path.is_file():
            keys.extend(line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                        if line.strip() and not line.startswith("#"))
        else:
            keys.append(value)
    return keys


class _Bar:
    """Bytes, files, studies, rate and ETA, redrawn as chunks arrive (the fetcher calls it from its threads)."""

    def __init__(self) -> None:
        self._progress = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
            TimeRemainingColumn(), TextColumn("files {task.fields[files]}  studies {task.fields[studies]}"),
            console=console, transient=False,
        )
        self._task: TaskID | None = None
        self._studies = 0
        self._total_studies = 0
        self._files = 0
        self._total_files = 0

    def __enter__(self) -> _Bar:
        self._progress.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._progress.stop()

    def start(self, files: int, studies: int, total_bytes: int) -> None:
        self._total_studies, self._total_files = studies, files
        self._task = self._progress.add_task("downloading", total=total_bytes, studies=f"0/{studies}",
                                             files=f"0/{files}")

    def advance(self, size: int) -> None:
        if self._task is not None:
            self._progress.advance(self._task, size)

    def file_done(self) -> None:
        self._files += 1
        if self._task is not None:
            self._progress.update(self._task, files=f"{self._files}/{self._total_files}")

    def study_done(self) -> None:
        self._studies += 1
        if self._task is not None:
            self._progress.update(self._task, studies=f"{self._studies}/{self._total_studies}")
