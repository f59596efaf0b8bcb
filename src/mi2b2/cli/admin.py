"""`mi2b2 admin ...`: users, tokens and the cache, run on the server host."""

from __future__ import annotations

from typing import Annotated

import typer

from mi2b2.cli.common import DEFAULT_CONFIG, ConfigOption, FormatOption, console, emit, local_context, operator, plain

app = typer.Typer(help="Site administration (runs against the database directly).", no_args_is_help=True)
users = typer.Typer(help="User accounts.", no_args_is_help=True)
tokens = typer.Typer(help="API tokens for the CLI and the Python client.", no_args_is_help=True)
app.add_typer(users, name="user")
app.add_typer(tokens, name="token")


def _password(prompt: bool, given: str | None) -> str | None:
    if given is not None:
        return given
    if prompt:
        password: str = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
        return password
    return None


@users.command("add")
def user_add(
    login: str,
    role: Annotated[str, typer.Option(help="admin, auditor or researcher")] = "researcher",
    name: Annotated[str, typer.Option(help="display name")] = "",
    email: Annotated[str | None, typer.Option(help="for notifications")] = None,
    password: Annotated[str | None, typer.Option(envvar="MI2B2_PASSWORD", help="omit to be prompted")] = None,
    no_password: Annotated[bool, typer.Option(help="API tokens only, no login")] = False,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Add a user."""
    ctx = local_context(config)
    user = ctx.accounts.add_user(operator(), login, role, _password(not no_password, password), name, email)
    console.print(f"added {user.login} ({user.role})")


@users.command("list")
def user_list(config: ConfigOption = DEFAULT_CONFIG, fmt: FormatOption = "table") -> None:
    """List users."""
    rows = [plain(u) for u in local_context(config, read_only=True).accounts.list_users()]
    emit(rows, ["login", "display_name", "role", "email", "disabled"], fmt, "users")


@users.command("disable")
def user_disable(login: str, config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Disable a user and revoke all their tokens and sessions."""
    local_context(config).accounts.disable_user(operator(), login)
    console.print(f"disabled {login}; their tokens and sessions are revoked")


@users.command("reset-password")
def user_reset_password(
    login: str,
    password: Annotated[str | None, typer.Option(envvar="MI2B2_PASSWORD", help="omit to be prompted")] = None,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Set a new password; revokes every token and session of the user and clears their failed logins."""
    new = _password(True, password)
    assert new is not None
    local_context(config).accounts.reset_password(operator(), login, new)
    console.print(f"password of {login} reset")


@tokens.command("create")
def token_create(
    login: str,
    name: Annotated[str, typer.Option(help="what the token is for")] = "cli",
    days: Annotated[float | None, typer.Option(help="lifetime in days; default and most: server.max_token_days")] = None,
    config: ConfigOption = DEFAULT_CONFIG,
) -> None:
    """Create an API token for LOGIN; it is printed once and never stored."""
    issued = local_context(config).accounts.create_token(operator(), login, name, days)
    console.print(f"token {issued.id} for {login}, expires {issued.expires_at}; store it now:", style="bold")
    typer.echo(issued.secret)


@tokens.command("list")
def token_list(login: str | None = None, config: ConfigOption = DEFAULT_CONFIG, fmt: FormatOption = "table") -> None:
    """List API tokens (never their secrets)."""
    rows = [plain(t) for t in local_context(config, read_only=True).accounts.list_tokens(login)]
    emit(rows, ["id", "login", "name", "created_at", "expires_at", "revoked_at", "last_used_at"], fmt, "tokens")


@tokens.command("revoke")
def token_revoke(token_id: int, config: ConfigOption = DEFAULT_CONFIG) -> None:
    """Revoke an API token by id."""
    local_context(config).accounts.revoke_token(operator(), token_id)
    console.print(f"token {token_id} revoked")


@app.command("purge")
def purge(
    yes: Annotated[bool, typer.Option("--yes", help="delete them; without it, only list what would go")] = False,
    config: ConfigOption = DEFAULT_CONFIG,
    fmt: FormatOption = "table",
) -> None:
    """Delete the cached studies the data policy has closed (IRB expired, project removed, patient withdrawn).

    A dry run by default: lists each study and why it is closed. With --yes the
    studies are deleted, each deletion audited with its reason. Studies being
    retrieved right now are left for the next purge."""
    from mi2b2.services.purge import purge as run_purge

    report = run_purge(local_context(config, read_only=not yes), operator(), apply=yes)
    rows = [plain(s) for s in report.studies]
    if fmt != "table" or rows:
        emit(rows, ["project_id", "study_uid", "instances", "bytes", "reason"], fmt, "studies")
    if fmt != "table":
        return
    for study in report.busy:
        console.print(f"left for the next purge (being retrieved now): {study.project_id}/{study.study_uid}",
                      markup=False, highlight=False)
    what = f"{len(report.studies)} closed studies ({report.bytes} bytes)"
    if yes:
        console.print(f"purged {what}", style="green")
    elif report.studies:
        console.print(f"{what} would be deleted; run `mi2b2 admin purge --yes` to delete them", style="bold")
    else:
        console.print("nothing to purge: every cached study may still be read", style="green")
