"""Search the PACS for what a project's IRB allows (the paper's Tab 1 and Tab 2).

Every search passes three doors: the user must be a member of a project whose
IRB is active and that may reach the institution; identifiers not on the
allow-list are refused before anything is sent to the PACS; the PACS's answers
are filtered again against the allow-list. Each search is stored and audited.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from typing import Any

from sqlalchemy import select

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import Project, ProjectMember, Query
from mi2b2.adapters.dicom.errors import ResultsTruncated
from mi2b2.config import InstitutionConfig, PacsConfig
from mi2b2.config.export_policy import ExportPolicy
from mi2b2.config.fields import MemberRole
from mi2b2.domain.deid.broker import search_denial
from mi2b2.domain.governance import (
    ProjectPolicy,
    cap_per_patient,
    filter_answers,
    irb_active_at,
    local_date,
    project_access,
    split_allowed,
)
from mi2b2.domain.identifiers import parse_identifier_text
from mi2b2.domain.mrn import MrnFormat, issuer_conflicts, normalize_identifiers
from mi2b2.domain.principal import Principal
from mi2b2.errors import AccessDenied, InvalidInput, NotFound
from mi2b2.services.allow_list import allowed_patients
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.context import FindSessionPort, ServiceContext

STUDY_ROOT = "study"
PATIENT_ROOT = "patient"
STUDY_KEYS = {
    "PatientID": "", "IssuerOfPatientID": "", "PatientName": "", "PatientBirthDate": "", "PatientSex": "",
    "StudyInstanceUID": "", "AccessionNumber": "", "StudyDate": "", "StudyTime": "",
    "ModalitiesInStudy": "", "StudyDescription": "",
    "NumberOfStudyRelatedSeries": "", "NumberOfStudyRelatedInstances": "",
}
PATIENT_KEYS = {
    "PatientID": "", "IssuerOfPatientID": "", "PatientName": "", "PatientBirthDate": "", "PatientSex": "",
    "NumberOfPatientRelatedStudies": "",
}
SERIES_KEYS = {
    "StudyInstanceUID": "", "SeriesInstanceUID": "", "SeriesNumber": "", "Modality": "",
    "SeriesDescription": "", "NumberOfSeriesRelatedInstances": "",
}


@dataclass(frozen=True)
class PatientHit:
    patient_id: str
    patient_name: str
    birth_date: str
    sex: str
    study_count: int | None
    issuer: str = ""


@dataclass(frozen=True)
class StudyHit:
    patient_id: str
    patient_name: str
    study_uid: str
    accession: str
    study_date: str
    study_time: str
    modalities: str
    description: str
    series_count: int | None
    instance_count: int | None
    pacs_id: str
    institution_id: str
    department_id: str


@dataclass(frozen=True)
class SeriesHit:
    study_uid: str
    series_uid: str
    series_number: str
    modality: str
    description: str
    instance_count: int | None


@dataclass
class SearchReport:
    query_id: int
    kind: str
    patients: list[PatientHit] = field(default_factory=list)
    studies: list[StudyHit] = field(default_factory=list)
    series: list[SeriesHit] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)  # not on the IRB list: never sent to the PACS
    not_found: list[str] = field(default_factory=list)
    duplicates: list[str] = field(default_factory=list)
    invalid: list[dict[str, Any]] = field(default_factory=list)
    not_permitted: list[str] = field(default_factory=list)  # accessions whose patient is not allowed
    capped: dict[str, int] = field(default_factory=dict)  # patient -> studies left out by the cap
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Door:
    policy: ProjectPolicy
    institution: InstitutionConfig
    department_id: str
    pacs: PacsConfig

    @property
    def mrn_format(self) -> MrnFormat:
        return self.institution.mrn_format.to_domain()

    def asked_for(self, mrn: str) -> Callable[[tuple[str, str]], bool]:
        """Is an answer's patient (PatientID, issuer) the one asked for: the same canonical MRN, and no other issuer."""

        def same_patient(patient: tuple[str, str]) -> bool:
            answered, issuer = patient
            return not issuer_conflicts(issuer, self.institution.issuer) and self.mrn_format.canonical_or_none(answered) == mrn

        return same_patient


# public use cases ------------------------------------------------------------


def search_patients(ctx: ServiceContext, who: Principal, project_id: str, pacs_id: str, mrn_text: str) -> SearchReport:
    door = open_door(ctx, who, project_id, pacs_id)
    report, mrns = screen_mrns(ctx, who, door, mrn_text, "patients")
    found: dict[str, PatientHit] = {}
    dropped: list[dict[str, str]] = []
    with ctx.open_find(ctx.config, door.pacs) as pacs:
        for mrn in mrns:
            hits = _patients_for(pacs, door.pacs, mrn)
            kept, rejected = filter_answers(hits, lambda h: (h.patient_id, h.issuer), door.asked_for(mrn))
            dropped.extend({"PatientID": h.patient_id, "IssuerOfPatientID": h.issuer} for h in rejected)
            for hit in kept:
                found.setdefault(hit.patient_id, hit)
            if not kept:
                report.not_found.append(mrn)
    report.patients = list(found.values())
    return _finish(ctx, who, door, report, {"mrns": mrns}, len(report.patients), dropped)


def search_studies(ctx: ServiceContext, who: Principal, project_id: str, pacs_id: str, mrn_text: str) -> SearchReport:
    door = open_door(ctx, who, project_id, pacs_id)
    report, mrns = screen_mrns(ctx, who, door, mrn_text, "studies")
    studies: list[StudyHit] = []
    dropped: list[dict[str, str]] = []
    today = ctx.clock.now().date()
    with ctx.open_find(ctx.config, door.pacs) as pacs:
        for mrn in mrns:
            answers = _find_studies(pacs, door.pacs, {**STUDY_KEYS, "PatientID": mrn}, today, report.warnings)
            kept, rejected = filter_answers(answers, _patient_of, door.asked_for(mrn))
            dropped.extend(_trace(rejected))
            studies.extend(_study_hit(a, door) for a in kept)
            if not kept:
                report.not_found.append(mrn)
        report.studies, report.capped = cap_per_patient(
            _unique_studies(studies), lambda s: s.patient_id, lambda s: s.study_date + s.study_time,
            door.policy.max_studies_per_patient,
        )
        report.studies = _fill_from_series(pacs, report.studies)
    return _finish(ctx, who, door, report, {"mrns": mrns}, len(report.studies), dropped)


def search_accessions(
    ctx: ServiceContext, who: Principal, project_id: str, pacs_id: str, accession_text: str
) -> SearchReport:
    door = open_door(ctx, who, project_id, pacs_id)
    parsed = parse_identifier_text(accession_text, kind="accession number")
    report = SearchReport(query_id=0, kind="accessions", duplicates=parsed.duplicates,
                          invalid=[e.__dict__ for e in parsed.invalid])
    answers: list[dict[str, str]] = []
    today = ctx.clock.now().date()
    with ctx.open_find(ctx.config, door.pacs) as pacs:
        for accession in parsed.unique:
            found = _find_studies(pacs, door.pacs, {**STUDY_KEYS, "AccessionNumber": accession}, today, report.warnings)
            # Exact match only: a PACS may treat the value loosely (case, wildcards).
            found = [a for a in found if a.get("AccessionNumber", "") == accession]
            if not found:
                report.not_found.append(accession)
            answers.extend(found)
    allowed = allowed_values(ctx, door.policy.project_id, door.pacs.id, {a.get("PatientID", "") for a in answers})
    kept, rejected = filter_answers(
        answers, _patient_of, lambda pid: pid[0] in allowed and not issuer_conflicts(pid[1], door.institution.issuer))
    report.not_permitted = sorted({a.get("AccessionNumber", "") for a in rejected})
    for answer in rejected:
        ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=door.policy.project_id,
                         pacs_id=door.pacs.id, patient_id=answer.get("PatientID"),
                         study_uid=answer.get("StudyInstanceUID"),
                         detail={"reason": "patient not on the IRB allow-list", "accession": answer.get("AccessionNumber")})
    report.studies, report.capped = cap_per_patient(
        _unique_studies(_study_hit(a, door) for a in kept), lambda s: s.patient_id,
        lambda s: s.study_date + s.study_time, door.policy.max_studies_per_patient,
    )
    if report.studies:
        with ctx.open_find(ctx.config, door.pacs) as pacs:
            report.studies = _fill_from_series(pacs, report.studies)
    return _finish(ctx, who, door, report, {"accessions": parsed.unique}, len(report.studies), [])


def search_series(
    ctx: ServiceContext, who: Principal, project_id: str, pacs_id: str, study_uids: list[str]
) -> SearchReport:
    door = open_door(ctx, who, project_id, pacs_id)
    wanted = [uid.strip() for uid in study_uids if uid.strip()]
    if not wanted:
        raise InvalidInput("name at least one StudyInstanceUID to list its series")
    report = SearchReport(query_id=0, kind="series")
    with ctx.open_find(ctx.config, door.pacs) as pacs:
        for study_uid in wanted:
            # Ask which patient the study belongs to before listing anything of it.
            owners = pacs.find(STUDY_ROOT, "STUDY", {"StudyInstanceUID": study_uid, "PatientID": "",
                                                     "IssuerOfPatientID": ""})
            owners = [o for o in owners if o.get("StudyInstanceUID") == study_uid]
            if not owners:
                report.not_found.append(study_uid)
                continue
            patient = owners[0].get("PatientID", "")
            if (issuer_conflicts(owners[0].get("IssuerOfPatientID"), door.institution.issuer)
                    or not allowed_values(ctx, door.policy.project_id, door.pacs.id, {patient})):
                report.not_permitted.append(study_uid)
                ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=door.policy.project_id,
                                 pacs_id=door.pacs.id, patient_id=patient, study_uid=study_uid,
                                 detail={"reason": "patient not on the IRB allow-list", "level": "series"})
                continue
            for answer in pacs.find(STUDY_ROOT, "SERIES", {**SERIES_KEYS, "StudyInstanceUID": study_uid}):
                series_uid = answer.get("SeriesInstanceUID", "")
                count = int_or_none(answer.get("NumberOfSeriesRelatedInstances"))
                if count is None:
                    count = count_instances(pacs, study_uid, series_uid)
                report.series.append(SeriesHit(
                    study_uid=study_uid, series_uid=series_uid,
                    series_number=answer.get("SeriesNumber", ""), modality=answer.get("Modality", ""),
                    description=answer.get("SeriesDescription", ""), instance_count=count,
                ))
    report.series.sort(key=lambda s: (s.study_uid, int_or_none(s.series_number) or 0, s.series_uid))
    return _finish(ctx, who, door, report, {"studies": wanted}, len(report.series), [])


def _export_policy(ctx: ServiceContext, project_id: str) -> ExportPolicy:
    from mi2b2.services.export.deid import policy_of  # the DICOM engine loads only where it is used

    return policy_of(ctx, project_id)


def broker_view(ctx: ServiceContext, project_id: str) -> dict[str, Any]:
    """What a search's audit event adds in a de-identified project: its policy, and that the answer
    showed identifiers (to its lead or an admin, the only ones who may search there)."""
    export = _export_policy(ctx, project_id)
    return {**export.audit_detail(), "view": "identified"} if export.deidentified else {}


def _export_fields(ctx: ServiceContext, project_id: str) -> dict[str, Any]:
    policy = _export_policy(ctx, project_id)
    return {"export": "deidentified" if policy.deidentified else "identified", "encrypted_only": policy.encrypted_only}


def my_projects(ctx: ServiceContext, who: Principal) -> list[dict[str, Any]]:
    now = ctx.clock.now()
    with ctx.sessions() as session:
        rows = session.execute(
            select(Project, ProjectMember.role).join(ProjectMember, ProjectMember.project_id == Project.id)
            .where(ProjectMember.login == who.login).order_by(Project.id)
        ).all()
        return [
            {"id": p.id, "title": p.title, "irb": p.irb_number, "expires": p.expires_on.isoformat(),
             "expired": not irb_active_at(p.expires_on, now, ctx.config.project_zone(p.id)), "active": p.active,
             "role": role, "data_policy": ctx.config.project_data_policy(p.id).value,
             **_export_fields(ctx, p.id),
             "institutions": list(p.institutions), "quota_bytes": p.quota_bytes,
             "max_studies_per_patient": p.max_studies_per_patient}
            for p, role in rows
        ]


def recent_queries(ctx: ServiceContext, who: Principal, project_id: str, limit: int = 200) -> list[dict[str, Any]]:
    """The searches run in a project: a lead sees everyone's, a researcher their own."""
    policy = load_policy(ctx, project_id)
    role = policy.members.get(who.login)
    if role is None:
        ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=project_id,
                         detail={"reason": "not a member of the project", "operation": "list queries"})
        raise AccessDenied(f"project {project_id!r}: not a member of the project")
    statement = select(Query).where(Query.project_id == project_id).order_by(Query.id.desc()).limit(limit)
    if role != "lead":
        statement = statement.where(Query.user_login == who.login)
    with ctx.sessions() as session:
        return [
            {"id": q.id, "user": q.user_login, "pacs": q.pacs_id, "kind": q.kind, "keys": q.keys,
             "result_count": q.result_count, "refused_count": q.refused_count, "created_at": q.created_at}
            for q in session.scalars(statement)
        ]


# the doors -------------------------------------------------------------------


def load_policy(ctx: ServiceContext, project_id: str) -> ProjectPolicy:
    with ctx.sessions() as session:
        project = session.get(Project, project_id)
        if project is None:
            raise NotFound(f"no project {project_id!r}; list yours with `mi2b2 projects`")
        members = dict(session.execute(
            select(ProjectMember.login, ProjectMember.role).where(ProjectMember.project_id == project_id)
        ).all())
        return ProjectPolicy(project.id, project.irb_number, project.expires_on, project.active,
                             frozenset(project.institutions), members, project.max_studies_per_patient,
                             ctx.config.project_zone(project.id), ctx.config.project_data_policy(project.id))


def open_door(ctx: ServiceContext, who: Principal, project_id: str, pacs_id: str, operation: str = "search") -> Door:
    institution, department, pacs = ctx.config.pacs_location(pacs_id)
    policy = load_policy(ctx, project_id)
    denial = project_access(policy, who.login, local_date(ctx.clock.now(), policy.timezone), institution.id)
    if denial is not None:
        ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=project_id, pacs_id=pacs_id,
                         detail={"reason": denial.value, "operation": operation})
        raise AccessDenied(f"project {project_id!r}: {denial.value}")
    _refuse_deidentified_member(ctx, who, policy, pacs_id, operation)
    return Door(policy, institution, department.id, pacs)


def _refuse_deidentified_member(ctx: ServiceContext, who: Principal, policy: ProjectPolicy, pacs_id: str,
                                operation: str) -> None:
    """In a de-identified project, searching and requesting (which show identifiers) are the honest broker's."""
    if not _export_policy(ctx, policy.project_id).deidentified:
        return
    leads = sorted(login for login, role in policy.members.items() if role == MemberRole.LEAD)
    denial = search_denial(admin=who.is_admin, lead=who.login in leads)
    if denial is None:
        return
    ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=policy.project_id, pacs_id=pacs_id,
                     detail={"reason": denial, "operation": operation})
    asked = f"its lead ({', '.join(leads)})" if leads else "a site admin"
    raise AccessDenied(f"project {policy.project_id!r} is de-identified: only its lead or a site admin may search "
                       f"the PACS and request studies; ask {asked} to request what you need, then download it "
                       "de-identified from the project's cache (`mi2b2 cache list`, the Image Repository tab)")


def screen_mrns(
    ctx: ServiceContext, who: Principal, door: Door, mrn_text: str, kind: str
) -> tuple[SearchReport, list[str]]:
    """Parse the list and hold back every MRN the IRB did not allow; only the rest reach the PACS.

    Each MRN is first put in the door's institution's canonical form, the form sent to its PACS."""
    parsed = normalize_identifiers(parse_identifier_text(mrn_text, kind="MRN"), door.mrn_format)
    allowed = allowed_values(ctx, door.policy.project_id, door.pacs.id, parsed.unique)
    mrns, refused = split_allowed(parsed.unique, allowed.__contains__)
    for mrn in refused:
        ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=door.policy.project_id,
                         pacs_id=door.pacs.id, patient_id=mrn,
                         detail={"reason": "MRN not on the project's IRB allow-list", "operation": f"search {kind}"})
    report = SearchReport(query_id=0, kind=kind, refused=refused, duplicates=parsed.duplicates,
                          invalid=[e.__dict__ for e in parsed.invalid])
    return report, mrns


def allowed_values(ctx: ServiceContext, project_id: str, pacs_id: str | None, values: Iterable[str]) -> set[str]:
    with ctx.sessions() as session:
        return allowed_patients(session, project_id, pacs_id, values)


def _finish(
    ctx: ServiceContext, who: Principal, door: Door, report: SearchReport, keys: dict[str, Any],
    result_count: int, dropped: list[dict[str, str]],
) -> SearchReport:
    now = ctx.clock.now()
    with transaction(ctx.sessions) as session:
        query = Query(user_login=who.login, project_id=door.policy.project_id, pacs_id=door.pacs.id,
                      kind=report.kind, keys=keys, result_count=result_count,
                      refused_count=len(report.refused) + len(report.not_permitted), created_at=now)
        session.add(query)
        session.flush()
        report.query_id = query.id
        if dropped:
            ctx.audit.record(who, Action.DENIED, Outcome.DENIED, project_id=door.policy.project_id,
                             pacs_id=door.pacs.id, detail={"reason": "PACS answered for patients not asked for; dropped",
                                                           "answers": dropped}, session=session)
        ctx.audit.record(who, Action.QUERY, project_id=door.policy.project_id, pacs_id=door.pacs.id, detail={
            "query": report.query_id, "kind": report.kind, **keys, "results": result_count,
            "refused": report.refused, "not_found": len(report.not_found), "not_permitted": report.not_permitted,
            **broker_view(ctx, door.policy.project_id)}, session=session)
    return report


# talking to the PACS ---------------------------------------------------------


def _patients_for(pacs: FindSessionPort, config: PacsConfig, mrn: str) -> list[PatientHit]:
    if config.query_model.value == PATIENT_ROOT:
        answers = pacs.find(PATIENT_ROOT, "PATIENT", {**PATIENT_KEYS, "PatientID": mrn})
        return [PatientHit(a.get("PatientID", ""), a.get("PatientName", ""), a.get("PatientBirthDate", ""),
                           a.get("PatientSex", ""), int_or_none(a.get("NumberOfPatientRelatedStudies")),
                           a.get("IssuerOfPatientID", "")) for a in answers]
    # Study root has no patient level: one study query tells us the patient and how many studies.
    answers = pacs.find(STUDY_ROOT, "STUDY", {**STUDY_KEYS, "PatientID": mrn})
    by_patient: dict[tuple[str, str], list[dict[str, str]]] = {}
    for answer in answers:
        by_patient.setdefault(_patient_of(answer), []).append(answer)
    return [PatientHit(pid, group[0].get("PatientName", ""), group[0].get("PatientBirthDate", ""),
                       group[0].get("PatientSex", ""), len({a.get("StudyInstanceUID") for a in group}), issuer)
            for (pid, issuer), group in by_patient.items()]


def _find_studies(
    pacs: FindSessionPort, config: PacsConfig, keys: dict[str, str], today: date, warnings: list[str]
) -> list[dict[str, str]]:
    """A study C-FIND that does not lose answers to a PACS's result cap.

    A PACS may say it stopped early (Orthanc's LimitFindResults ends with a
    cancel status), or a site may know its PACS silently stops at N answers
    (``find_result_limit``). Either way we ask again for each half of the date
    range until every part comes back complete."""
    answers, complete = _find_complete(pacs, keys, config.find_result_limit)
    if complete:
        return answers
    return _unique_answers(_find_split(pacs, keys, config, config.earliest_study_date, today, warnings))


def _find_complete(pacs: FindSessionPort, keys: dict[str, str], limit: int) -> tuple[list[dict[str, str]], bool]:
    try:
        answers = pacs.find(STUDY_ROOT, "STUDY", keys)
    except ResultsTruncated as cut:
        return cut.answers, False
    return answers, not (limit and len(answers) >= limit)


def _find_split(
    pacs: FindSessionPort, keys: dict[str, str], config: PacsConfig, first: date, last: date, warnings: list[str]
) -> list[dict[str, str]]:
    answers, complete = _find_complete(pacs, {**keys, "StudyDate": f"{first:%Y%m%d}-{last:%Y%m%d}"},
                                       config.find_result_limit)
    if complete:
        return answers
    if first == last:
        warnings.append(f"the PACS returned its maximum number of studies for a single day ({first}); "
                        "some studies of that day may be missing")
        return answers
    middle = first + timedelta(days=(last - first).days // 2)
    return (_find_split(pacs, keys, config, first, middle, warnings)
            + _find_split(pacs, keys, config, middle + timedelta(days=1), last, warnings))


def _fill_from_series(pacs: FindSessionPort, studies: list[StudyHit]) -> list[StudyHit]:
    """Modalities and series count from a series-level query, for studies whose PACS
    left them out (pynetdicom's qrscp and others do not support ModalitiesInStudy):
    without them the Modality facet has nothing to filter on. Only the permitted
    studies the report keeps get here, one small C-FIND each, and only when
    something is missing."""
    filled = []
    for study in studies:
        if study.modalities and study.series_count is not None:
            filled.append(study)
            continue
        keys = {"StudyInstanceUID": study.study_uid, "SeriesInstanceUID": "", "Modality": ""}
        series = {a.get("SeriesInstanceUID", ""): a.get("Modality", "") for a in pacs.find(STUDY_ROOT, "SERIES", keys)
                  if a.get("StudyInstanceUID", study.study_uid) == study.study_uid}
        filled.append(replace(
            study,
            modalities=study.modalities or "\\".join(sorted({m for m in series.values() if m})),
            series_count=study.series_count if study.series_count is not None else (len(series) or None),
        ))
    return filled


def count_instances(pacs: FindSessionPort, study_uid: str, series_uid: str) -> int:
    """Some PACS (DCMTK's dcmqrscp among them) leave out the optional count keys;
    an image-level query still tells the researcher how big a series is."""
    keys = {"StudyInstanceUID": study_uid, "SeriesInstanceUID": series_uid, "SOPInstanceUID": ""}
    return len({a.get("SOPInstanceUID") for a in pacs.find(STUDY_ROOT, "IMAGE", keys)})


def _study_hit(answer: dict[str, str], door: Door) -> StudyHit:
    return StudyHit(
        patient_id=answer.get("PatientID", ""), patient_name=answer.get("PatientName", ""),
        study_uid=answer.get("StudyInstanceUID", ""), accession=answer.get("AccessionNumber", ""),
        study_date=answer.get("StudyDate", ""), study_time=answer.get("StudyTime", ""),
        modalities=answer.get("ModalitiesInStudy", ""), description=answer.get("StudyDescription", ""),
        series_count=int_or_none(answer.get("NumberOfStudyRelatedSeries")),
        instance_count=int_or_none(answer.get("NumberOfStudyRelatedInstances")),
        pacs_id=door.pacs.id, institution_id=door.institution.id, department_id=door.department_id,
    )


def _unique_answers(answers: list[dict[str, str]]) -> list[dict[str, str]]:
    seen: dict[str, dict[str, str]] = {}
    for answer in answers:
        seen.setdefault(answer.get("StudyInstanceUID", ""), answer)
    return list(seen.values())


def _unique_studies(studies: Iterable[StudyHit]) -> list[StudyHit]:
    seen: dict[str, StudyHit] = {}
    for study in studies:
        seen.setdefault(study.study_uid, study)
    return list(seen.values())


def _trace(answers: list[dict[str, str]]) -> list[dict[str, str]]:
    return [{"PatientID": a.get("PatientID", ""), "IssuerOfPatientID": a.get("IssuerOfPatientID", ""),
             "StudyInstanceUID": a.get("StudyInstanceUID", "")} for a in answers]


def _patient_of(answer: dict[str, str]) -> tuple[str, str]:
    """Who an answer is about: PatientID and the Issuer of Patient ID the PACS sent (often none)."""
    return answer.get("PatientID", ""), answer.get("IssuerOfPatientID", "")


def int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value not in (None, "") else None
    except ValueError:
        return None
