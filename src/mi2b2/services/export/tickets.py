"""A folder download's tickets: the audit event of its manifest lets the CLI fetch that study's files.

The manifest (`download.download_manifest`) records one DOWNLOAD event per
study, via VIA_FILES; its seq is the ``download_id`` every file fetch names,
one by one (`download.download_instance`) or in batches (`batch`). A ticket
covers only its own study, in its own project, for the user who asked, for
TICKET_HOURS: so no file leaves without an audited download behind it, and a
leaked download_id is of no use to anyone else. A fetch a ticket does not
cover is refused, and the attempt is on record.
"""

from __future__ import annotations

import json
from datetime import datetime, timedelta
from typing import NoReturn

from mi2b2.adapters.db.tables import AuditEvent
from mi2b2.domain.principal import Principal
from mi2b2.errors import AccessDenied
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.context import ServiceContext

TICKET_HOURS = 12  # how long a manifest's download_id lets the CLI fetch files
VIA_FILES = "files"  # the "via" of a manifest's DOWNLOAD events: only those are tickets


def covered_study(ctx: ServiceContext, who: Principal, project_id: str, download_id: int) -> str | None:
    """The (original) study a recent folder download of this user covers, if ``download_id`` is one."""
    with ctx.sessions() as session:
        event = session.get(AuditEvent, download_id)
        if (event is not None and event.action == Action.DOWNLOAD.value and event.outcome == Outcome.OK.value
                and event.actor == who.login and event.project_id == project_id
                and json.loads(event.detail).get("via") == VIA_FILES
                and datetime.fromisoformat(event.occurred_at) >= ctx.clock.now() - timedelta(hours=TICKET_HOURS)):
            return event.study_uid
    return None


def refuse(ctx: ServiceContext, who: Principal, project_id: str, study_uid: str | None, download_id: int) -> NoReturn:
    """A member fetching outside an audited download: refused, and the attempt is on record."""
    ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=project_id, study_uid=study_uid,
                     detail={"reason": "no download covers this file", "operation": "download",
                             "download_id": download_id})
    raise AccessDenied("this download_id does not cover that study (or is older than "
                       f"{TICKET_HOURS} hours); ask for a new manifest, then fetch its files")
