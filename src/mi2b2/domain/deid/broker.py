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
