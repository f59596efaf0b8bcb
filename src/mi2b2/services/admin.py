"""Site administration over the API: every project at a glance, and replacing a project's MRN allow-list.

The site configuration stays the source of truth for allow-lists: an uploaded
list is the list of one institution (named when the project reaches several),
written to the file the configuration names for it (the institution's entry in
``mrn_files``, or its rows of the project's ``mrn_file`` CSV), then applied by
the same reload as ``POST /admin/config/reload``. So the file, the running
configuration and the database (which every worker and receiver reads) agree
again as soon as the call returns, and a later reload or restart keeps the list.
"""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sqlalchemy import select

from mi2b2.adapters.db.tables import Project, ProjectMember
from mi2b2.adapters.storage.durable import replace_durably
from mi2b2.config import ProjectConfig, SiteConfig, load_config
from mi2b2.domain.governance import irb_active_at
from mi2b2.domain.mrn import AllowedMrn, ParsedAllowList, parse_allow_list
from mi2b2.domain.principal import Principal
from mi2b2.errors import AccessDenied, ConfigError, InvalidInput, Mi2b2Error, NotFound, PermanentError
from mi2b2.services.allow_list import allow_list_sizes
from mi2b2.services.audit import Action, Outcome
from mi2b2.services.cache.reads import usage_in
from mi2b2.services.context import ServiceContext


@dataclass(frozen=True)
class MemberView:
    login: str
    role: str


@dataclass(frozen=True)
class ProjectOverview:
    id: str
    title: str
    irb: str
    expires: str  # ISO date: the last day the approval covers
    expired: bool
    active: bool  # False once the project is gone from the configuration
    institutions: list[str]
    members: list[MemberView]
    quota_bytes: int
    used_bytes: int
    in_flight_bytes: int
    allow_list_size: int
    max_studies_per_patient: int | None
    mrn_file: str | None  # where the allow-list lives; None for a project no longer configured
    mrn_files: dict[str, str] = field(default_factory=dict)  # institution -> the file holding its list


@dataclass(frozen=True)
class AllowListReport:
    project_id: str
    institution: str
    allow_list_size: int
    duplicates: int  # lines repeating an MRN, kept once
    file: str
    reload: dict[str, Any]


def list_projects(ctx: ServiceContext, who: Principal) -> list[ProjectOverview]:
    _require_admin(ctx, who, "list all projects")
    now = ctx.clock.now()
    files = {p.id: _files_by_institution(ctx.config, p) for p in ctx.config.projects}
    with ctx.sessions() as session:
        projects = session.scalars(select(Project).order_by(Project.id)).all()
        members: dict[str, list[MemberView]] = defaultdict(list)
        for member in session.scalars(select(ProjectMember).order_by(ProjectMember.project_id, ProjectMember.login)):
            members[member.project_id].append(MemberView(member.login, member.role))
        sizes = allow_list_sizes(session)
        usage = {p.id: usage_in(session, p.id) for p in projects}
    return [
        ProjectOverview(
            id=p.id, title=p.title, irb=p.irb_number, expires=p.expires_on.isoformat(),
            expired=not irb_active_at(p.expires_on, now, ctx.config.project_zone(p.id)), active=p.active,
            institutions=list(p.institutions),
            members=members[p.id], quota_bytes=p.quota_bytes, used_bytes=usage[p.id].used_bytes,
            in_flight_bytes=usage[p.id].in_flight_bytes, allow_list_size=sizes.get(p.id, 0),
            max_studies_per_patient=p.max_studies_per_patient,
            mrn_file=_single_file(files.get(p.id)), mrn_files=files.get(p.id, {}),
        )
        for p in projects
    ]


def replace_allow_list(
    ctx: ServiceContext, who: Principal, project_id: str, text: str, institution: str | None = None
) -> AllowListReport:
    """Validate the institution's whole list, write its file atomically, reload, audit.

    Nothing is written unless every line is a usable MRN of the institution: a
    silently dropped line would leave a patient off (or a typo on) the IRB list."""
    _require_admin(ctx, who, "replace an allow-list")
    config = _config_on_disk(ctx)
    project = _configured_project(config, project_id)
    institution = _institution_named(project, institution)
    file = project.mrn_files.get(institution, project.mrn_file)
    assert file is not None  # the configuration gives mrn_file or mrn_files (with every institution listed there)
    path = config.resolve(file)
    _check_not_shared(config, project, path)
    parsed = _parse_strictly(config, project, institution, text)
    previous = path.read_bytes() if path.exists() else None
    if project.mrn_file is not None and len(project.institutions) > 1:
        others = [e for e in config.allow_list(project) if e.institution != institution]
        data = _csv_text([*others, *parsed.entries], project_id, who, ctx)
    else:
        data = _file_text([e.mrn for e in parsed.entries], project_id, who, ctx)
    _write_atomically(path, data.encode("utf-8"))

    def record_replacement(session: Any) -> None:
        # Counts only: the MRNs themselves are in the file and the database, not in the trail's detail.
        ctx.audit.record(who, Action.ALLOW_LIST, project_id=project_id, session=session, detail={
            "op": "replace", "institution": institution, "count": allow_list_sizes(session).get(project_id, 0),
            "duplicates": parsed.duplicates})

    try:
        changes = ctx.reload_config(who, also_record=record_replacement)
    except Mi2b2Error as exc:
        # Put the old list back so the file and the database still agree.
        _restore(path, previous)
        raise ConfigError(f"the allow-list of project {project_id!r} was not changed: {exc}") from None
    with ctx.sessions() as session:
        size = allow_list_sizes(session).get(project_id, 0)
    return AllowListReport(project_id, institution, size, parsed.duplicates, str(path), changes.summary())


# helpers -------------------------------------------------------------------------------


def _require_admin(ctx: ServiceContext, who: Principal, operation: str) -> None:
    if not who.is_admin:
        ctx.audit.record(who, Action.DENIED, Outcome.DENIED, detail={"reason": "not an admin", "operation": operation})
        raise AccessDenied(f"only a site admin may {operation}")


def _files_by_institution(config: SiteConfig, project: ProjectConfig) -> dict[str, str]:
    if project.mrn_file is not None:
        return {i: str(config.resolve(project.mrn_file)) for i in project.institutions}
    return {i: str(config.resolve(f)) for i, f in project.mrn_files.items()}


def _single_file(files: dict[str, str] | None) -> str | None:
    paths = set((files or {}).values())
    return paths.pop() if len(paths) == 1 else None


def _institution_named(project: ProjectConfig, institution: str | None) -> str:
    """The institution an upload lists: named, or the project's only one."""
    reached = list(project.institutions)
    if institution is None:
        if len(reached) > 1:
            raise InvalidInput(f"project {project.id!r} reaches institutions {', '.join(reached)}: name the "
                               "institution whose allow-list this is (an MRN means nothing without it)")
        return reached[0]
    if institution not in reached:
        raise InvalidInput(f"project {project.id!r} does not reach institution {institution!r}; "
                           f"choose one of {', '.join(reached)}")
    if project.mrn_file is None and institution not in project.mrn_files:
        raise InvalidInput(f"project {project.id!r} names no allow-list file for institution {institution!r}; add "
                           f"mrn_files.{institution} to the project in the site configuration before uploading")
    return institution


def _config_on_disk(ctx: ServiceContext) -> SiteConfig:
    """The configuration as the reload will read it: a broken file fails here, before anything is written,
    and a project's ``mrn_file`` edited since the last reload is the one written."""
    if ctx.config.source is None:
        raise InvalidInput("this server was started without a configuration file, so there is no allow-list file "
                           "to write; start it with --config")
    return load_config(ctx.config.source)


def _configured_project(config: SiteConfig, project_id: str) -> ProjectConfig:
    for project in config.projects:
        if project.id == project_id:
            return project
    known = ", ".join(p.id for p in config.projects) or "none"
    raise NotFound(f"no project {project_id!r} in the site configuration {config.source}; configured projects: "
                   f"{known}. Add the project there (and reload) before uploading its allow-list")


def _check_not_shared(config: SiteConfig, project: ProjectConfig, path: Path) -> None:
    sharing = [p.id for p in config.projects if p.id != project.id
               and path in {config.resolve(f) for f in p.allow_list_files().values()}]
    if sharing:
        raise InvalidInput(f"project {project.id!r} shares its MRN file {path} with {', '.join(sharing)}; "
                           f"give project {project.id!r} its own mrn_file in {config.source} before uploading")


def _parse_strictly(config: SiteConfig, project: ProjectConfig, institution: str, text: str) -> ParsedAllowList:
    """The upload as the institution's entries, in its canonical MRN form."""
    try:
        return parse_allow_list(text, {institution: config.institution(institution).rules()},
                                [i.id for i in config.institutions], institution)
    except InvalidInput as exc:
        raise InvalidInput(f"{exc}; correct or remove it and upload again. Nothing was changed") from None


def _stamp(project_id: str, who: Principal, ctx: ServiceContext) -> str:
    stamp = ctx.clock.now().strftime("%Y-%m-%d %H:%M UTC")
    return f"# IRB allow-list of project {project_id} written by {who.login} through the admin API at {stamp}"


def _file_text(mrns: list[str], project_id: str, who: Principal, ctx: ServiceContext) -> str:
    # One MRN per line reads back to exactly this list; the comment line comes first so that an MRN
    # spelled like a CSV header ("MRN") is never taken for one. No commas: they would make it look like CSV.
    return "\n".join([_stamp(project_id, who, ctx), *mrns]) + "\n"


def _csv_text(entries: list[AllowedMrn], project_id: str, who: Principal, ctx: ServiceContext) -> str:
    # The header must come first for the file to read as a CSV; the stamp follows as a comment row.
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["institution", "mrn"])
    buffer.write(_stamp(project_id, who, ctx) + "\n")
    writer.writerows(entries)
    return buffer.getvalue()


def _write_atomically(path: Path, data: bytes) -> None:
    """A reader (or a crash) sees the old list or the new."""
    try:
        replace_durably(path, data)
    except OSError as exc:
        raise PermanentError(f"cannot write the allow-list {path} ({exc.strerror or type(exc).__name__}); "
                             "check the disk and the folder's permissions") from None


def _restore(path: Path, previous: bytes | None) -> None:
    if previous is None:
        path.unlink(missing_ok=True)
    else:
        _write_atomically(path, previous)
