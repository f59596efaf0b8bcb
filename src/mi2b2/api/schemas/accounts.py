"""Answers about users, sessions and API tokens."""

from __future__ import annotations

from pydantic.dataclasses import dataclass

from mi2b2.api.schemas.common import Readable, Reply, Timestamp
from mi2b2.services import auth


class Identity(Reply):
    """Who the caller is (login and ``/auth/me``)."""

    login: str
    role: str
    display_name: str


class IssuedToken(Reply):
    id: int
    token: str
    expires_at: Timestamp | None
    note: str


@dataclass(frozen=True)
class TokenRow(auth.TokenView, Readable):
    """An API token or a browser session (never its secret)."""

    created_at: Timestamp
    expires_at: Timestamp | None
    revoked_at: Timestamp | None
    last_used_at: Timestamp | None


@dataclass(frozen=True)
class UserRow(auth.UserView, Readable):
    """A user account (never its password hash)."""


class SignInProvider(Reply):
    name: str  # shown as "Sign in with <name>"
    url: str  # where the browser goes to start


class SignInMethods(Reply):
    """How one signs in here (asked before signing in)."""

    password: str  # "everyone", or "break-glass" when local passwords are off for all others
    provider: SignInProvider | None


class LoggedOut(Reply):
    status: str
    provider_logout: str | None  # where the browser also ends its session at the site's OpenID provider
