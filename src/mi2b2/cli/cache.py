"""`mi2b2 cache ...` and `mi2b2 notifications` (through the server's API), and `mi2b2 admin fsck` (local)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from mi2b2.api.schemas.cache import Usage
from mi2b2.cli.common import (
    DEFAULT_CONFIG,
    DEFAULT_SERVER,
    ConfigOption,
    FormatOption,
    ProjectArg,
    ServerOption,
    TokenOption,
    api_client,
    console,
    emit,
    errors,
    local_context,
    operator,
    plain,
)

app = typer.Typer(help="Your project's cache: how full it is, what is in it, deleting from it.", no_args_is_help=True)

STUDY_COLUMNS = ["patient_id", "accession", "study_date", "modalities", "description", "instance_count", "size",
                 "fetched_by", "fetched_at", "last_downloaded_by", "last_downloaded_at", "study_uid"]


def human_size(count: int) -> str:
    size = float(count)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(size) < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{count} B"  # pragma: no cover


def _count(number: int, one: str, many: str | None = None) -> str:
    return f"{number} {one if number == 1 else many or one + 's'}"


def _usage_rows(answer: Usage) -> list[dict[str, Any]]:
    usage = plain(answer)
    return [{
        "project": usage["project_id"], "quota": human_size(usage["quota_bytes"]),
        "used": human_size(usage["used_bytes"]), "in_flight": human_size(usage["in_flight_bytes"]),
        "free": human_size(usage["free_bytes"]) + (" (OVER QUOTA)" if usage["over_quota"] else ""),
        "studies": usage["study_count"],
        **{k: usage[k] for k in ("quota_bytes", "used_bytes", "in_flight_bytes", "free_bytes", "over_quota")},
    }]


@app.command("usage")
def usage(project: ProjectArg, server: ServerOption = DEFAULT_SERVER, token: TokenOption = None,
          fmt: FormatOption = "table") -> None:
    """Quota, space used, space reserved by running retrievals, and what is free."""
    with api_client(server, token) as client:
        result = client.cache(project).usage
    emit(_usage_rows(result), ["project", "quota", "used", "in_flight", "free", "studies"], fmt, "cache usage")
    if result.over_quota:
        errors.print(f"project {project} is over its quota: delete studies with `mi2b2 cache delete {project} UID...` "
                     "or ask an admin for more space; retrievals wait until there is room", style="yellow")


@app.command("list")
def list_studies(project: ProjectArg, server: ServerOption = DEFAULT_SERVER, token: TokenOption = None,
                 fmt: FormatOption = "table") -> None:
    """The studies in a project's cache, newest first."""
    with api_client(server, token) as client:
        result = client.cache(project)
    rows = [{**plain(study), "size": human_size(study.bytes)} for study in result.studies]
    used = result.usage
    emit(rows, STUDY_COLUMNS, fmt,
         f"cache of {project}: {len(rows)} studies, {human_size(used.used_bytes)} of {human_size(used.quota_bytes)}")


@app.command("delete")
def delete(project: ProjectArg, study_uids: Annotated[list[str], typer.Argument(help="StudyInstanceUIDs")],
           server: ServerOption = DEFAULT_SERVER, token: TokenOption = None) -> None:
    """Delete studies from a project's cache; their space is free at once."""
    with api_client(server, token) as client:
        result = client.cache_delete(project, study_uids)
    console.print(f"deleted {_count(len(result.deleted), 'study', 'studies')} from {project}, "
                  f"{human_size(result.bytes_freed)} freed; {human_size(result.usage.free_bytes)} free now",
                  style="green")
    if result.not_found:
        errors.print(f"not in the cache (nothing to delete): {', '.join(result.not_found)}", style="yellow")


def notifications(
    unread: Annotated[bool, typer.Option("--unread", help="only those not read yet")] = False,
    mark_read: Annotated[bool, typer.Option("--mark-read", help="then mark the ones shown as read")] = False,
    server: ServerOption = DEFAULT_SERVER, token: TokenOption = None, fmt: FormatOption = "table",
) -> None:
    """Your notifications: failed retrievals and finished batches."""
    with api_client(server, token) as client:
        rows = [plain(notification) for notification in client.notifications(unread)]
        if mark_read and (shown := [r["id"] for r in rows if r["read_at"] is None]):
            client.mark_notifications_read(shown)
    if fmt == "table":
        if not rows:
            console.print("no notifications" + (" unread" if unread else ""))
        for row in rows:
            marker = "" if row["read_at"] else "[bold]* [/bold]"
            console.print(f"{marker}#{row['id']} {row['created_at']}  [bold]{row['subject']}[/bold]", highlight=False)
            console.print(row["body"], markup=False, highlight=False)
            console.print()
        return
    emit(rows, ["id", "created_at", "kind", "project_id", "subject", "read_at", "emailed_at", "email_error"], fmt,
         "notifications")


FSCK_LISTS = [
    ("missing_files", "indexed but missing on disk"),
    ("size_mismatches", "size on disk differs from the index"),
    ("orphan_files", "on disk but not indexed"),
    ("wrong_aggregates", "study totals that differ from their instances"),
    ("stale_incoming", "temp files of dead receivers"),
]


def fsck(
    repair: Annotated[bool, typer.Option("--repair", help="fix what differs (see `mi2b2 admin fsck --help`)")] = False,
    config: ConfigOption = DEFAULT_CONFIG,
    fmt: FormatOption = "table",
) -> None:
    """Compare the cache index with the files on disk; exit 1 if they differ and --repair was not given.

    Repair drops index rows of missing files, indexes unindexed files of
    patients on their project's allow-list (and deletes the rest, audited),
    fixes study totals and removes temp files left by dead receivers."""
    from mi2b2.services.cache.fsck import fsck as check_cache  # the DICOM reader loads only for this command

    report = check_cache(local_context(config, read_only=not repair), operator(), repair)
    if fmt != "table":
        emit([{"check": key, "count": value} for key, value in report.counts().items()], ["check", "count"], fmt)
    else:
        for key, label in FSCK_LISTS:
            items = getattr(report, key)
            if not items:
                continue
            console.print(f"{len(items)} {label}:", style="bold")
            for item in items[:50]:
                console.print(f"  {_item(item)}", markup=False, highlight=False, soft_wrap=True)  # whole paths, to copy
            if len(items) > 50:
                console.print(f"  ... and {len(items) - 50} more")
        if report.being_received:
            console.print(f"{len(report.being_received)} files of running retrievals not indexed yet (left alone)")
    if not report.differences:
        console.print("cache index and disk agree", style="green")
        return
    if repair:
        console.print(
            f"repaired: {report.rows_dropped} index rows dropped, {report.sizes_fixed} sizes fixed, "
            f"{len(report.orphans_indexed)} files indexed, {len(report.files_deleted)} files deleted, "
            f"{report.aggregates_fixed} study totals fixed, {report.empty_studies_removed} empty studies removed, "
            f"{report.incoming_removed} temp files removed", style="green")
        return
    errors.print(f"{_count(report.differences, 'difference')}; run `mi2b2 admin fsck --repair` to fix them",
                 style="bold red")
    raise typer.Exit(1)


def _item(item: Any) -> str:
    if isinstance(item, str):
        return item
    if hasattr(item, "disk_bytes"):
        return f"{item.path}: index {item.indexed_bytes} bytes, disk {item.disk_bytes} bytes"
    return (f"{item.project_id}/{item.study_uid}: index {item.indexed_instances} instances / {item.indexed_bytes} bytes, "
            f"actual {item.actual_instances} / {item.actual_bytes}")
