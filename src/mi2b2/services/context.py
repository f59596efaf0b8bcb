"""Everything a service needs, built once per entry point and passed down."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from mi2b2.adapters.db.engine import make_engine, make_sessionmaker, require_current_schema, transaction, upgrade
from mi2b2.adapters.storage.file_digests import FileDigests
from mi2b2.config import PacsConfig, SiteConfig, load_config
from mi2b2.domain.clock import Clock, SystemClock, Timer
from mi2b2.domain.principal import SYSTEM, Principal
from mi2b2.errors import ConfigError, InvalidInput
from mi2b2.services.audit import Action, AuditEntry, AuditTrail, Outcome, load_audit_key
from mi2b2.services.audit_syslog import atna_queue
from mi2b2.services.auth import Accounts, DirectoryLogin
from mi2b2.services.oidc_login import OidcSignIn
from mi2b2.services.site import ConfigChanges, apply_config

if TYPE_CHECKING:  # the identity clients load only where the site configures them (a receiver needs neither)
    from mi2b2.adapters.oidc_provider import OpenIdProvider


class FindSessionPort(Protocol):
    def find(self, model: str, level: str, keys: Mapping[str, str | None]) -> list[dict[str, str]]: ...


FindOpener = Callable[[SiteConfig, PacsConfig], AbstractContextManager[FindSessionPort]]


def open_pacs_find_session(config: SiteConfig, pacs: PacsConfig) -> AbstractContextManager[FindSessionPort]:
    from mi2b2.services.pacs import open_find  # the DICOM stack loads only when a search runs

    return open_find(config, pacs)


@dataclass
class ServiceContext:
    config: SiteConfig
    engine: Engine
    sessions: sessionmaker[Session]
    clock: Clock
    audit: AuditTrail
    accounts: Accounts
    open_find: FindOpener = field(default=open_pacs_find_session)  # governed by build_context
    timer: Timer = field(default_factory=SystemClock)  # polls and waits on the database and the receiver
    file_digests: FileDigests = field(default_factory=FileDigests)  # of cache files, for download manifests
    oidc: OidcSignIn | None = None  # single sign-on, when [oidc] configures it
    # Told after each reload: a receiver judges by the PACS and projects of the file, and one that
    # runs as a child process holds its own copy (`runtime.background` registers it).
    on_reload: list[Callable[[], None]] = field(default_factory=list)

    def reload_config(self, by: Principal, also_record: Callable[[Session], object] | None = None) -> ConfigChanges:
        """Re-read the configuration file, apply it, and audit the reload (and ``also_record``'s
        events, written in the same transaction).

        A file with errors changes nothing: the running configuration stays."""
        if self.config.source is None:
            raise InvalidInput("this server was started without a configuration file, so there is nothing to reload")
        new_config = load_config(self.config.source)
        with transaction(self.sessions) as session:
            changes = apply_config(session, new_config, self.clock.now())
            self.audit.record(by, Action.CONFIG_RELOAD, detail={"file": str(new_config.source), **changes.summary()},
                              session=session)
            audit_canceled(self.audit, changes, session)
            if also_record is not None:
                also_record(session)
        self.config = new_config
        self.audit.atna = atna_queue(new_config)  # names the PACS and destinations as now configured
        for listener in self.on_reload:
            listener()
        return changes


def audit_canceled(audit: AuditTrail, changes: ConfigChanges, session: Session) -> None:
    """One event per queued request a configuration change canceled (its owner left the project),
    in the transaction that canceled them."""
    audit.record_many(session, [
        AuditEntry(SYSTEM.login, Action.FORWARD if c.kind == "forward" else Action.RETRIEVE, Outcome.DENIED,
                   project_id=c.project_id, pacs_id=c.pacs_id, patient_id=c.patient_id, study_uid=c.study_uid,
                   detail={"request": c.request_id, "event": "canceled", "reason": c.reason, "owner": c.login})
        for c in changes.canceled])


def build_context(
    config: SiteConfig,
    clock: Clock | None = None,
    open_find: FindOpener | None = None,
    migrate: bool = True,
    sync_config: bool = True,
    audit_key: bool = True,
    require_current: bool = False,
    timer: Timer | None = None,
) -> ServiceContext:
    """``audit_key=False`` only for `mi2b2 audit init-key`, which creates the key an existing trail lacks.
    ``require_current`` (with ``migrate=False``): refuse a database whose schema is not this code's, naming the fix."""
    clock = clock or SystemClock()
    engine = make_engine(config.database_url())
    if migrate:
        upgrade(engine)
    elif require_current:
        require_current_schema(engine)
    sessions = make_sessionmaker(engine)
    key = load_audit_key(sessions, config.audit_key_file()) if audit_key else None
    audit = AuditTrail(sessions, clock, key, config.audit_checkpoint_file(), config.audit.syslog_target(),
                       atna_queue(config))
    if sync_config:
        with transaction(sessions) as session:
            changes = apply_config(session, config, clock.now())
            audit_canceled(audit, changes, session)
    oidc = config.oidc
    break_glass_only = None if oidc is None or oidc.local_passwords else frozenset(oidc.local_logins)
    accounts = Accounts(sessions, clock, audit, config.server.session_hours,
                        config.server.max_token_days, directory_login(config), break_glass_only)
    from mi2b2.services.dicom_tls import audited_tls_failures
    from mi2b2.services.query_governor import QueryGovernor, governed_opener

    # Every search, request look-up and job reaches the PACS through the query governor.
    governed = governed_opener(QueryGovernor(sessions, clock),
                               audited_tls_failures(audit, open_find or open_pacs_find_session))
    sign_in = None if oidc is None else OidcSignIn(sessions, clock, audit, accounts, openid_provider(config), oidc)
    return ServiceContext(config, engine, sessions, clock, audit, accounts, governed, timer or SystemClock(),
                          oidc=sign_in)


def openid_provider(config: SiteConfig) -> OpenIdProvider:
    """The relying party of ``[oidc]``; the provider itself is first asked at the first sign-in."""
    oidc = config.oidc
    assert oidc is not None
    path = config.resolve(oidc.client_secret_file)
    try:
        secret = path.read_text().strip()
    except OSError as error:
        raise ConfigError(f"oidc client_secret_file {path}: {error.strerror}; create it with the client secret the "
                          f"provider issued to mi2b2") from None
    if not secret:
        raise ConfigError(f"oidc client_secret_file {path} is empty; put the provider's client secret in it")
    ca_file = config.resolve(oidc.ca_file) if oidc.ca_file else None
    if ca_file is not None and not ca_file.is_file():
        raise ConfigError(f"oidc ca_file {ca_file} does not exist; give the CA certificate(s) of the provider")
    from mi2b2.adapters.oidc_provider import OpenIdProvider

    return OpenIdProvider(oidc, secret, ca_file)


def directory_login(config: SiteConfig) -> DirectoryLogin | None:
    """Sign-in through the site's LDAP directory, if ``[ldap]`` configures one."""
    ldap = config.ldap
    if ldap is None:
        return None
    password = None
    if ldap.bind_password_file is not None:
        path = config.resolve(ldap.bind_password_file)
        try:
            password = path.read_text().strip()
        except OSError as error:
            raise ConfigError(f"ldap bind_password_file {path}: {error.strerror}; create it with the search "
                              f"account's password") from None
    ca_file = config.resolve(ldap.ca_file) if ldap.ca_file else None
    if ca_file is not None and not ca_file.is_file():
        raise ConfigError(f"ldap ca_file {ca_file} does not exist; give the CA certificate(s) of the directory")
    from mi2b2.adapters.ldap_directory import LdapDirectory

    directory = LdapDirectory(ldap, ca_file, password)
    return DirectoryLogin(directory, ldap.roles, frozenset(ldap.local_logins))
