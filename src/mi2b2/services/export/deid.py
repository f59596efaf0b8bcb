"""De-identified exports: a project's policy, its pseudonym key and the pseudonymous layout.

The key is made on first use and stays in the database; the same key gives the
same pseudonyms and UIDs in every export of the project. Each export records
which patients and studies it handed out under which pseudonym (``deid_mappings``),
the honest broker's table.

`deidentified_copy` makes one instance's copy in memory (forward sends it at once).
Every door out de-identifies: downloads, forward, DICOMweb and the viewer, and the
screens (`services.export.screens`); search answers reach only the honest broker.
"""

from __future__ import annotations

import json
import os
import secrets
import threading
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import DeidKey, DeidMapping
from mi2b2.adapters.dicom.deidentify import DeidEngine, Deidentified, Withheld, deidentify_file
from mi2b2.adapters.dicom.files import InstanceHeader
from mi2b2.config.export_policy import ExportPolicy, export_policy
from mi2b2.domain.deid.profile import ProfileOption
from mi2b2.domain.deid.pseudonyms import Pseudonymizer, patient_original, shift_date
from mi2b2.domain.principal import Principal
from mi2b2.errors import AccessDenied
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.context import ServiceContext
from mi2b2.services.export.layout import InstanceInfo, PlannedFile, SeriesInfo, StudyInfo, plan_paths

REPORT = "deidentification-report.json"


def policy_of(ctx: ServiceContext, project_id: str) -> ExportPolicy:
    project = next((p for p in ctx.config.projects if p.id == project_id), None)
    return export_policy(project, project_id)


PLAIN_FIX = "download again with a passphrase or public keys (--passphrase or --recipient with the CLI)"


def refuse_plain(ctx: ServiceContext, who: Principal, policy: ExportPolicy, fix: str = PLAIN_FIX) -> None:
    if not policy.encrypted_only:
        return
    ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=policy.project_id,
                     detail={"reason": "encrypted downloads only", "operation": "download"})
    raise AccessDenied(f"project {policy.project_id!r} allows encrypted downloads only; {fix}")


def project_key(ctx: ServiceContext, project_id: str) -> bytes:
    """The project's pseudonym secret, made on first use (two first uses at once agree on one)."""
    with ctx.sessions() as session:
        found = session.get(DeidKey, project_id)
        if found is not None:
            return bytes.fromhex(found.secret)
    try:
        with transaction(ctx.sessions) as session:
            session.add(DeidKey(project_id=project_id, secret=secrets.token_bytes(32).hex(),
                                created_at=ctx.clock.now()))
    except IntegrityError:
        pass  # another process made it first: use theirs
    with ctx.sessions() as session:
        made = session.get(DeidKey, project_id)
        assert made is not None
        return bytes.fromhex(made.secret)


def engine_for(ctx: ServiceContext, policy: ExportPolicy) -> DeidEngine:
    assert policy.profile is not None
    engine = DeidEngine(policy.profile, Pseudonymizer(project_key(ctx, policy.project_id)))
    _ = engine.table  # read the table here, once, not in the threads that stream the download
    return engine


def record_mappings(ctx: ServiceContext, project_id: str, pairs: Iterable[tuple[str, str, str]]) -> None:
    """(kind, original, pseudonym) for the honest broker; each pair once per project."""
    wanted = {(kind, original): pseudonym for kind, original, pseudonym in pairs}
    if not wanted:
        return
    originals = sorted({original for _kind, original in wanted})
    known: set[tuple[str, str]] = set()
    with ctx.sessions() as session:
        for start in range(0, len(originals), 1000):  # a long cache list: bounded IN lists
            known |= {(kind, original) for kind, original in session.execute(
                select(DeidMapping.kind, DeidMapping.original).where(
                    DeidMapping.project_id == project_id,
                    DeidMapping.original.in_(originals[start:start + 1000])))}
    new = [(k, o, p) for (k, o), p in wanted.items() if (k, o) not in known]
    if not new:
        return
    try:
        with transaction(ctx.sessions) as session:
            session.add_all([DeidMapping(project_id=project_id, kind=k, original=o[:200], pseudonym=p,
                                         created_at=ctx.clock.now()) for k, o, p in new])
    except IntegrityError:
        pass  # a concurrent export recorded the same pairs: they are the same pseudonyms


# the pseudonymous layout ----------------------------------------------------------------


def pseudonymous_files(engine: DeidEngine, studies: list[StudyInfo], series: dict[str, SeriesInfo],
                       instances: list[InstanceInfo], headers: dict[str, InstanceHeader]
                       ) -> tuple[list[PlannedFile], list[tuple[str, str, str]]]:
    """The download's files under pseudonymous UIDs and names (cache_path kept), and the mappings handed out.

    ``headers``: one header per study (its first series'), for the PatientID and issuer the files carry:
    the folder's pseudonym must be the one written inside the files."""
    pseudo = engine.pseudonyms
    shifted = engine.profile.has(ProfileOption.RETAIN_LONGITUDINAL_MODIFIED_DATES)
    new_studies, pairs = [], []
    for study in studies:
        header = headers.get(study.study_uid)
        patient, issuer = (header.patient_id, header.issuer) if header else (study.patient_id, "")
        pseudonym = pseudo.patient_id(patient, issuer)
        date = (shift_date(study.study_date, pseudo.date_shift(patient, issuer)) or "") if shifted else ""
        new_uid = pseudo.uid(study.study_uid)
        new_studies.append(StudyInfo(new_uid, pseudonym, date, ""))
        pairs += [("patient", patient_original(patient, issuer), pseudonym),
                  ("study", study.study_uid, new_uid)]
    new_series = {pseudo.uid(uid): SeriesInfo(pseudo.uid(uid), info.series_number, info.modality)
                  for uid, info in series.items()}
    new_instances = [InstanceInfo(pseudo.uid(i.study_uid), pseudo.uid(i.series_uid), pseudo.uid(i.sop_uid),
                                  i.instance_number, i.size, i.cache_path) for i in instances]
    return plan_paths(new_studies, new_series, new_instances), pairs


# the report of what was withheld ------------------------------------------------------


@dataclass
class WithheldReport:
    """What a de-identified export left out, by series (pseudonymous UIDs only: no identifier in it)."""

    policy: ExportPolicy
    exported: int = 0
    by_series: dict[str, dict[str, object]] = field(default_factory=dict)

    def add(self, withheld: Withheld) -> None:
        entry = self.by_series.setdefault(withheld.series_uid or "(unreadable)", {
            "series_uid": withheld.series_uid, "modality": withheld.modality, "sop_class": withheld.sop_class,
            "reason": withheld.reason, "instances": 0})
        entry["instances"] = int(str(entry["instances"])) + 1

    @property
    def withheld(self) -> int:
        return sum(int(str(e["instances"])) for e in self.by_series.values())

    def to_json(self) -> bytes:
        body = {"project": self.policy.project_id, **self.policy.audit_detail(), "exported_instances": self.exported,
                "withheld_instances": self.withheld, "withheld_series": list(self.by_series.values()),
                "note": "Instances that may show identifiers in their pixels are withheld unless the project "
                        "cleared their series or SOP class; pixel data of exported instances is as stored."}
        return json.dumps(body, indent=1).encode()


# headers already made ------------------------------------------------------------------


FileIdentity = tuple[DeidEngine, int, int, int, int]  # engine (key and profile), device, inode, size, mtime


class HeaderCache:
    """De-identified headers already made, by cached file and key: a repeated download does not parse again.

    Cache files are written once and placed by rename, so (device, inode, size, mtime) names one content.
    Holds only de-identified bytes; bounded in bytes, least recently used out first."""

    def __init__(self, max_bytes: int = 64 << 20) -> None:
        self._entries: OrderedDict[FileIdentity, Deidentified | Withheld] = OrderedDict()
        self._bytes = 0
        self._max = max_bytes
        self._lock = threading.Lock()

    @staticmethod
    def identity(engine: DeidEngine, stat: os.stat_result) -> FileIdentity:
        return engine, stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns

    def get(self, key: FileIdentity) -> Deidentified | Withheld | None:
        with self._lock:
            found = self._entries.get(key)
            if found is not None:
                self._entries.move_to_end(key)
            return found

    def put(self, key: FileIdentity, outcome: Deidentified | Withheld) -> None:
        size = len(outcome.header) + 200 if isinstance(outcome, Deidentified) else 200
        with self._lock:
            if key in self._entries:
                return
            self._entries[key] = outcome
            self._bytes += size
            while self._bytes > self._max and self._entries:
                _old, dropped = self._entries.popitem(last=False)
                self._bytes -= len(dropped.header) + 200 if isinstance(dropped, Deidentified) else 200


HEADERS = HeaderCache()


def cached_outcome(handle: BinaryIO, engine: DeidEngine) -> Deidentified | Withheld:
    """An open cached file's de-identified header, made once and then kept (HEADERS), or why it is withheld."""
    key = HEADERS.identity(engine, os.fstat(handle.fileno()))
    found = HEADERS.get(key)
    if found is None:
        found = deidentify_file(handle, engine)
        HEADERS.put(key, found)
    return found


def deidentified_copy(engine: DeidEngine, path: Path) -> bytes | Withheld:
    """One cached file's de-identified copy, in memory (the rewritten header, then its pixel data as stored),
    or why it is withheld: the same bytes a download of it carries."""
    with open(path, "rb") as handle:
        outcome = cached_outcome(handle, engine)
        if isinstance(outcome, Withheld):
            return outcome
        handle.seek(outcome.pixel_start)
        return outcome.header + handle.read(outcome.pixel_end - outcome.pixel_start)
