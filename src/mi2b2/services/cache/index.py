"""Indexing files placed in the cache: the one path every writer of the index takes.

The receiver indexes its accepted instances in batches; fsck indexes the
orphan files it adopts, and tests and benchmarks index files they placed, one
at a time. All of them go through `index_instances`, so an instance is filed
the same way whoever brought it.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session

from mi2b2.adapters.db.tables import Base, CachedInstance, CachedStudy
from mi2b2.adapters.dicom.files import InstanceHeader
from mi2b2.errors import InvalidInput


@dataclass(frozen=True)
class Placement:
    """A file already in its place in the cache, with what the index records about it."""

    project_id: str
    header: InstanceHeader
    relative_path: str
    size: int
    fetched_by: str
    pacs_id: str | None


@dataclass(frozen=True)
class Arrival(Placement):
    """An instance the receiver accepted and placed, to be indexed and counted for its request."""

    request_id: int = field(kw_only=True)


StudyKey = tuple[str, str]  # (project, StudyInstanceUID)


def index_instance(
    session: Session,
    project_id: str,
    header: InstanceHeader,
    relative_path: str,
    size: int,
    now: datetime,
    fetched_by: str,
    pacs_id: str | None,
) -> bool:
    """Index one placed file in the caller's transaction; False (and no change) if it is already indexed."""
    placed = Placement(project_id, header, relative_path, size, fetched_by, pacs_id)
    return index_instances(session, [placed], now) == 1


def index_instances(session: Session, placed: Sequence[Placement], now: datetime) -> int:
    """Index placed files in the caller's transaction; return how many instances were new.

    A few statements per batch, whatever its size: make sure each study row
    exists, lock the study rows (in one order, so concurrent receivers of one
    study neither deadlock nor lose each other's counts on PostgreSQL), insert
    the instances not yet indexed, and recount each study's totals from its
    instance rows. An instance already indexed is left alone: a retry resends
    what an earlier attempt stored.
    """
    if not placed:
        return 0
    by_study: dict[StudyKey, list[Placement]] = {}
    for item in placed:
        by_study.setdefault((item.project_id, item.header.study_uid), []).append(item)
    keys = sorted(by_study)
    insert = insert_for(session)
    session.execute(
        insert(CachedStudy).on_conflict_do_nothing(index_elements=["project_id", "study_uid"]),
        [_new_study(by_study[key][0], now) for key in keys],
    )
    studies = {key: _locked_study(session, key) for key in keys}
    new = _not_yet_indexed(session, {key: (studies[key].id, by_study[key]) for key in keys})
    if new:
        session.execute(
            insert(CachedInstance).on_conflict_do_nothing(index_elements=["cached_study_id", "sop_instance_uid"]),
            [_new_instance(studies[(item.project_id, item.header.study_uid)].id, item, now) for item in new],
        )
    _recount(session, list(studies.values()))
    for key, study in studies.items():
        added = [item for item in new if (item.project_id, item.header.study_uid) == key]
        if added:
            _note_added(study, added, now)
    return len(new)


def _locked_study(session: Session, key: StudyKey) -> CachedStudy:
    project_id, study_uid = key
    return session.execute(
        select(CachedStudy).where(CachedStudy.project_id == project_id, CachedStudy.study_uid == study_uid)
        .with_for_update().execution_options(populate_existing=True)
    ).scalar_one()


def _not_yet_indexed(
    session: Session, batches: dict[StudyKey, tuple[int, list[Placement]]]
) -> list[Placement]:
    """The placed files whose instance the index lacks, each instance once, in the order given."""
    study_ids = [study_id for study_id, _items in batches.values()]
    sop_uids = {item.header.sop_instance_uid for _id, items in batches.values() for item in items}
    seen: set[tuple[int, str]] = {
        (study_id, sop_uid) for study_id, sop_uid in session.execute(
            select(CachedInstance.cached_study_id, CachedInstance.sop_instance_uid).where(
                CachedInstance.cached_study_id.in_(study_ids), CachedInstance.sop_instance_uid.in_(sop_uids))
        )
    }
    new = []
    for study_id, items in batches.values():
        for item in items:
            if (study_id, item.header.sop_instance_uid) not in seen:
                seen.add((study_id, item.header.sop_instance_uid))
                new.append(item)
    return new


def _recount(session: Session, studies: list[CachedStudy]) -> None:
    """Set each study's totals from its instance rows: the figures quotas and listings trust."""
    totals = {
        study_id: (int(count), int(size)) for study_id, count, size in session.execute(
            select(CachedInstance.cached_study_id, func.count(), func.coalesce(func.sum(CachedInstance.bytes), 0))
            .where(CachedInstance.cached_study_id.in_([s.id for s in studies]))
            .group_by(CachedInstance.cached_study_id)
        )
    }
    for study in studies:
        study.instance_count, study.bytes = totals.get(study.id, (0, 0))


def _note_added(study: CachedStudy, added: list[Placement], now: datetime) -> None:
    for item in added:
        header = item.header
        study.modalities = _merge_modalities(study.modalities, header.modality)
        # The study row was made from one instance; fill what it lacked.
        study.patient_name = study.patient_name or header.patient_name[:200]
        study.accession = study.accession or header.accession[:64]
        study.study_date = study.study_date or header.study_date[:8]
        study.description = study.description or header.study_description[:200]
        if study.patient_id_issuer is None:  # a study cached before the issuer was kept: its files say it now
            study.patient_id_issuer = header.issuer[:64]
    latest = added[-1]
    study.pacs_id = latest.pacs_id or study.pacs_id
    # fetched_by/at name the latest retrieval that added instances.
    study.fetched_by = latest.fetched_by[:64]
    study.fetched_at = now


def _new_study(item: Placement, now: datetime) -> dict[str, Any]:
    header = item.header
    return dict(project_id=item.project_id, study_uid=header.study_uid, patient_id=header.patient_id[:64],
                patient_id_issuer=header.issuer[:64], patient_name=header.patient_name[:200], accession=header.accession[:64],
                study_date=header.study_date[:8], modalities="", description=header.study_description[:200],
                pacs_id=item.pacs_id, instance_count=0, bytes=0, fetched_by=item.fetched_by[:64], fetched_at=now)


def _new_instance(study_id: int, item: Placement, now: datetime) -> dict[str, Any]:
    header = item.header
    return dict(cached_study_id=study_id, series_uid=header.series_uid, sop_instance_uid=header.sop_instance_uid,
                sop_class_uid=header.sop_class_uid[:64], instance_number=header.instance_number,
                relative_path=item.relative_path, bytes=item.size, received_at=now)


def insert_for(session: Session) -> Callable[[type[Base]], postgresql.Insert | sqlite.Insert]:
    """The dialect's INSERT, which knows ON CONFLICT DO NOTHING."""
    dialect = session.get_bind().dialect.name
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    # Unreachable: make_engine accepts only these two.
    raise InvalidInput(f"database {dialect!r} is not supported; use SQLite or PostgreSQL")


def _merge_modalities(current: str, modality: str) -> str:
    values = [m for m in current.split("\\") if m]
    if modality and modality not in values:
        values.append(modality)
    merged = "\\".join(values)
    return merged if len(merged) <= 64 else current
