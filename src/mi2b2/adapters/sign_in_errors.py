"""Refusals from the identity adapters, apart from them so that the services catching them do not
load the LDAP and OpenID client libraries in every process (a receiver signs nobody in)."""

from __future__ import annotations


class DirectoryRefused(Exception):
    """The directory said no (no such user, wrong password, disabled); ``reason`` is for the audit trail only."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class OidcRefused(Exception):
    """The sign-in cannot be accepted (the provider said no, or what it sent fails a check); ``reason`` is
    for the audit trail and the error page."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
