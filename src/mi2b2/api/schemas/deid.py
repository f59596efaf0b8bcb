"""The honest broker's re-identification: its request body and its answer."""

from __future__ import annotations

from pydantic import Field
from pydantic.dataclasses import dataclass

from mi2b2.api.schemas.bodies import Body
from mi2b2.api.schemas.common import Readable
from mi2b2.services import reidentify


class ReidentifyBody(Body):
    """In the body, never the URL: pseudonyms and reasons stay out of access logs. The server checks the
    exact bounds (and audits a refusal); these only keep a request small."""

    pseudonym: str = Field(min_length=1, max_length=200,
                           description="a pseudonymous PatientID, or a Study, Series or SOP Instance UID "
                                       "from one of the project's de-identified exports")
    justification: str = Field(min_length=1, max_length=4 * reidentify.MAX_JUSTIFICATION,
                               description=f"why, for the audit trail: {reidentify.MIN_JUSTIFICATION} to "
                                           f"{reidentify.MAX_JUSTIFICATION} characters")


@dataclass(frozen=True)
class Reidentified(reidentify.Reidentified, Readable):
    """The original(s) behind the pseudonym, and the audit event that records the disclosure."""
