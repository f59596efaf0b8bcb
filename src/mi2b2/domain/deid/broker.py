"""Who may ask the honest broker what a pseudonym stands for.

A site admin always may (the honest broker's office outlasts any one protocol). A
project's lead may while the project is active and its IRB approval runs: after
that, turning research data back into patients needs a renewed approval, which an
admin enters. Members, auditors and other projects' leads never may.
"""

from __future__ import annotations

NOT_LEAD = "not the project's lead or an admin"
CLOSED = "the project is inactive or its IRB approval has ended"


def reidentify_denial(*, admin: bool, lead: bool, project_active: bool, irb_active: bool) -> str | None:
    """Why the caller may not re-identify, or None if they may."""
    if admin:
        return None
    if not lead:
        return NOT_LEAD
    if not (project_active and irb_active):
        return CLOSED
    return None


# Searching and requesting: the honest broker's work ------------------------------------------

SEARCH_REFUSED = "a de-identified project's PACS searches and requests are for its lead or an admin"


def search_denial(*, admin: bool, lead: bool) -> str | None:
    """Why the caller may not search the PACS or request studies for a de-identified project, or None.

    Searching shows names, MRNs and accession numbers: in a de-identified project only
    the honest broker (its lead, or an admin) sees them; members work from the cache's
    pseudonyms."""
    return None if admin or lead else SEARCH_REFUSED


def sees_identifiers(*, admin: bool, lead: bool) -> bool:
    """Whether the request log of a de-identified project shows the caller the identifiers it was made with.

    The lead and admins made (or could make) those requests by searching, so they
    already hold them; members see pseudonyms. The cache's screens are pseudonymous
    for everyone: they name studies as downloads do, and identities come back only
    through the audited re-identification."""
    return admin or lead
