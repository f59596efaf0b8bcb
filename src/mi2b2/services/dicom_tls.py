"""DICOM TLS failures as security events, wherever a search or look-up meets them.

A PACS whose certificate cannot be trusted (another CA, another name) may not
be the PACS at all. Retrievals and forwards audit it when their request ends
(``jobs.end(..., security=True)``); searches, request look-ups and search jobs
reach the PACS through the find opener, which this wraps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from mi2b2.adapters.dicom.errors import TlsHandshakeFailed
from mi2b2.config import PacsConfig, SiteConfig
from mi2b2.services.audit import Action, AuditTrail, Outcome
from mi2b2.services.context import FindOpener, FindSessionPort

__all__ = ["audited_tls_failures"]


def audited_tls_failures(audit: AuditTrail, inner: FindOpener) -> FindOpener:
    """`inner`, with an untrusted PACS certificate recorded in the audit trail before the error goes on."""

    @contextmanager
    def open_audited(config: SiteConfig, pacs: PacsConfig) -> Iterator[FindSessionPort]:
        try:
            with inner(config, pacs) as session:
                yield session
        except TlsHandshakeFailed as exc:
            if exc.security:
                audit.record("mi2b2", Action.QUERY, Outcome.FAILED, pacs_id=pacs.id,
                             detail={"reason": str(exc), "security": True})
            raise

    return open_audited
