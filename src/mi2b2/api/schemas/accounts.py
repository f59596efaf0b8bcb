"""Answers about users, sessions and API tokens."""

from __future__ import annotations

from mi2b2.api.schemas.common import Reply, Timestamp


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


class TokenRow(Reply):
    id: int
    login: str
    kind: str
    name: str
    created_at: Timestamp
    expires_at: Timestamp | None
    revoked_at: Timestamp | None
    last_used_at: Timestamp | None


class UserRow(Reply):
    login: str
    display_name: str
    role: str
    email: str | None
    disabled: bool
