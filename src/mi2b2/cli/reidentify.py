"""`mi2b2 reidentify`: the honest broker's look-up of a pseudonym, for a project's lead or an admin."""

from __future__ import annotations

from dataclasses import asdict
from typing import Annotated

import typer

from mi2b2.cli.common import DEFAULT_SERVER, FormatOption, ProjectArg, ServerOption, TokenOption, api_client, emit, errors


def reidentify(
    project: ProjectArg,
    pseudonym: Annotated[str, typer.Argument(help="pseudonymous PatientID, or a Study, Series or SOP Instance UID")],
    reason: Annotated[str, typer.Option("--reason", help="why (10 to 1000 characters); it goes to the audit trail")],
    server: ServerOption = DEFAULT_SERVER,
    token: TokenOption = None,
    fmt: FormatOption = "table",
) -> None:
    """The original(s) behind a pseudonym of a de-identified export (the project's lead or an admin; audited)."""
    with api_client(server, token) as client:
        answer = client.reidentify(project, pseudonym, reason)
    emit([asdict(o) for o in answer.originals], ["kind", "original", "study_uid", "patient_id"],
         fmt, f"{pseudonym} in {project}")
    errors.print(f"recorded in the audit trail as event {answer.audit_seq}")
