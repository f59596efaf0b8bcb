"""Users, passwords, browser sessions and API tokens."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import TYPE_CHECKING

from sqlalchemy import delete, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.orm import Session, sessionmaker

from mi2b2.adapters.crypto.secrets import hash_password, new_token, token_digest, verify_password
from mi2b2.adapters.db.engine import rows_changed, transaction
from mi2b2.adapters.db.tables import ApiToken, LoginFailure, User
from mi2b2.adapters.sign_in_errors import DirectoryRefused
from mi2b2.domain.clock import Clock, as_utc
from mi2b2.domain.directory_roles import role_for_groups
from mi2b2.domain.login_throttle import FORGET_AFTER, login_digest, must_wait
from mi2b2.domain.principal import LOGIN, Principal, Role, login_problem
from mi2b2.errors import AccessDenied, InvalidInput, Mi2b2Error, NotFound
from mi2b2.services.audit import Action, AuditTrail, Outcome

if TYPE_CHECKING:  # ldap3 loads only in processes that sign users in against a directory
    from mi2b2.adapters.ldap_directory import LdapDirectory

NOT_A_LOGIN = "(not a login name)"
MIN_PASSWORD = 10
CLIENT_CHARS = 64  # login_failures.client


@dataclass(frozen=True)
class UserView:
    login: str
    display_name: str
    role: str
    email: str | None
    disabled: bool


@dataclass(frozen=True)
class TokenView:
    id: int
    login: str
    kind: str
    name: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None
    last_used_at: datetime | None


@dataclass(frozen=True)
class IssuedToken:
    id: int
    secret: str  # shown once, never stored
    expires_at: datetime | None


@dataclass(frozen=True)
class DirectoryLogin:
    """Sign-in through the site's directory, for every login but the local (break-glass) ones."""

    directory: LdapDirectory
    roles: Mapping[str, Role]  # group DN -> role
    local_logins: frozenset[str] = frozenset()


class Accounts:
    def __init__(self, sessions: sessionmaker[Session], clock: Clock, audit: AuditTrail, session_hours: float = 12,
                 max_token_days: float = 90, directory: DirectoryLogin | None = None,
                 break_glass_only: frozenset[str] | None = None) -> None:
        """``break_glass_only``: when local passwords are switched off, the logins that keep theirs."""
        self._sessions = sessions
        self._clock = clock
        self._audit = audit
        self._session_lifetime = timedelta(hours=session_hours)
        self._max_token_days = max_token_days
        self._directory = directory
        self._break_glass_only = break_glass_only

    # users -----------------------------------------------------------------

    def add_user(self, by: Principal, login: str, role: str, password: str | None,
                 display_name: str = "", email: str | None = None) -> UserView:
        problem = login_problem(login)
        if problem:
            raise InvalidInput(problem)
        role_value = _role(role)
        if password is not None:
            _check_password(password)
        password_hash = hash_password(password) if password else None  # argon2 outside the write lock
        with transaction(self._sessions) as session:
            if session.scalar(select(User).where(User.login == login)):
                raise InvalidInput(f"user {login!r} already exists; use reset-password or pick another login")
            user = User(login=login, role=role_value, display_name=display_name or login, email=email,
                        password_hash=password_hash, created_at=self._clock.now(), disabled=False)
            session.add(user)
            self._audit.record(by, Action.USER_ADMIN, detail={"op": "add", "login": login, "role": role_value},
                               session=session)
        return _user_view(user)

    def list_users(self) -> list[UserView]:
        with self._sessions() as session:
            return [_user_view(u) for u in session.scalars(select(User).order_by(User.login))]

    def disable_user(self, by: Principal, login: str) -> None:
        with transaction(self._sessions) as session:
            user = _find_user(session, login)
            user.disabled = True
            revoked = _revoke_all(session, user.id, self._clock.now())
            self._audit.record(by, Action.USER_ADMIN, detail={"op": "disable", "login": login, "revoked": revoked},
                               session=session)

    def reset_password(self, by: Principal, login: str, password: str) -> None:
        """A new password, and every token and session of the user revoked: whoever knew the old one is out."""
        _check_password(password)
        password_hash = hash_password(password)  # argon2 outside the write lock
        with transaction(self._sessions) as session:
            user = _find_user(session, login)
            user.password_hash = password_hash
            revoked = _revoke_all(session, user.id, self._clock.now())
            session.execute(delete(LoginFailure).where(LoginFailure.login_digest == login_digest(login)))
            self._audit.record(by, Action.USER_ADMIN, detail={"op": "reset-password", "login": login,
                                                              "revoked": revoked}, session=session)

    # login -----------------------------------------------------------------

    def login(self, login: str, password: str, client: str = "") -> tuple[Principal, IssuedToken]:
        """Check a password and open a browser session. Failures are audited and throttled.

        A login that does not exist (or is disabled, or reserved) costs the same
        work and gets the same answers as a wrong password, throttling included,
        so neither the answer nor its time tells which logins exist."""
        now = self._clock.now()
        digest, client_key = login_digest(login), client[:CLIENT_CHARS]
        with self._sessions() as session:
            user = session.scalar(select(User).where(User.login == login)) if login_problem(login) is None else None
            failures = session.get(LoginFailure, (digest, client_key))
        wait = must_wait(failures.failures, as_utc(failures.last_failure), now) if failures else None
        # Whatever anyone types reaches the trail only if it could be a login name.
        actor = login if LOGIN.match(login) else NOT_A_LOGIN
        if wait is not None:
            self._audit.record(actor, Action.LOGIN, Outcome.DENIED, detail={"client": client, "reason": "throttled"})
            raise AccessDenied(f"too many failed logins; try again in {int(wait.total_seconds()) + 1} s")
        if self._directory is not None and login not in self._directory.local_logins:
            user = self._directory_user(self._directory, login, password, client, actor, (digest, client_key), now)
            return self._open_session(user, client, failures is not None, (digest, client_key), now, via="ldap")
        # Past the break-glass list the password is still checked (against a dummy hash), so that the
        # answer and its time tell nothing about which logins are break-glass ones.
        switched_off = self._break_glass_only is not None and login not in self._break_glass_only
        # argon2 runs outside any transaction (on SQLite a write transaction holds
        # the one write lock), and against a dummy hash when there is no user.
        ok = verify_password(user.password_hash if user and not switched_off else None, password)
        if not ok or user is None or user.disabled or switched_off:
            self._count_failure(digest, client_key, now)
            detail = {"client": client} | ({"reason": "local passwords are off for this login"} if switched_off else {})
            self._audit.record(actor, Action.LOGIN, Outcome.FAILED, detail=detail)
            if self._break_glass_only is not None:
                raise AccessDenied("wrong login or password (passwords work here only for break-glass accounts; "
                                   "everyone else signs in through the site's single sign-on)")
            raise AccessDenied("wrong login or password")
        return self._open_session(user, client, failures is not None, (digest, client_key), now)

    def _open_session(self, user: User, client: str, had_failures: bool, failure_key: tuple[str, str], now: datetime,
                      via: str | None = None) -> tuple[Principal, IssuedToken]:
        if had_failures:
            with transaction(self._sessions) as session:
                session.execute(delete(LoginFailure).where(LoginFailure.login_digest == failure_key[0],
                                                           LoginFailure.client == failure_key[1]))
        principal = Principal(user.login, Role(user.role), user.display_name, client)
        how: dict[str, object] = {"via": via} if via else {}
        issued = self._issue(user.id, "session", "browser session", now + self._session_lifetime,
                             lambda session, token_id: self._audit.record(
                                 principal, Action.LOGIN, detail={"session": token_id} | how, session=session),
                             via=via)
        return principal, issued

    def external_session(self, login: str, display_name: str, role: Role, via: str, client: str
                         ) -> tuple[Principal, IssuedToken]:
        """A browser session for a user the site's identity provider vouched for, with the role its groups give:
        the user row is created on first sign-in, its role and name follow the provider afterwards."""
        now = self._clock.now()
        user = self._external_user(login, display_name, role, via, client)
        return self._open_session(user, client, False, ("", ""), now, via=via)

    def _external_user(self, login: str, display_name: str, role: Role, via: str, client: str) -> User:
        with transaction(self._sessions) as session:
            user = session.scalar(select(User).where(User.login == login))
            if user is None:
                user = User(login=login, role=role.value, display_name=display_name, email=None,
                            password_hash=None, created_at=self._clock.now(), disabled=False)
                session.add(user)
            elif not user.disabled:
                user.role, user.display_name = role.value, display_name
            session.flush()
        if user.disabled:
            self._audit.record(login, Action.LOGIN, Outcome.DENIED,
                               detail={"client": client, "via": via, "reason": "disabled in mi2b2"})
            raise AccessDenied("this account is disabled in mi2b2; ask the mi2b2 admin")
        return user

    def _directory_user(self, sign_in: DirectoryLogin, login: str, password: str, client: str, actor: str,
                        failure_key: tuple[str, str], now: datetime) -> User:
        """The user row of a login the directory accepted, created or given its current role; refusals audited."""
        try:
            if login_problem(login) is not None:
                raise DirectoryRefused("not a valid login name")  # never sent to the directory
            found = sign_in.directory.authenticate(login, password)
        except DirectoryRefused as refused:
            self._count_failure(*failure_key, now)
            self._audit.record(actor, Action.LOGIN, Outcome.FAILED,
                               detail={"client": client, "via": "ldap", "reason": refused.reason})
            raise AccessDenied("wrong login or password") from None
        except Mi2b2Error as error:  # unreachable directory, TLS or search account trouble: not the user's fault
            self._audit.record(actor, Action.LOGIN, Outcome.FAILED,
                               detail={"client": client, "via": "ldap", "reason": str(error)})
            raise
        role = role_for_groups(found.groups, sign_in.roles)
        if role is None:
            self._audit.record(actor, Action.LOGIN, Outcome.DENIED,
                               detail={"client": client, "via": "ldap", "reason": "no directory group maps to a role"})
            raise AccessDenied("your directory account has no mi2b2 role: none of your groups is mapped in the site's "
                               "[ldap] roles; ask the mi2b2 admin to map one of your groups")
        return self._external_user(login, found.display_name, role, "ldap", client)

    def _count_failure(self, digest: str, client: str, now: datetime) -> None:
        """One more failure, counted in one statement so that parallel guesses lose no update."""
        with transaction(self._sessions) as session:
            session.execute(delete(LoginFailure).where(LoginFailure.last_failure < now - FORGET_AFTER))
            dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
            insert = dialect.insert(LoginFailure).values(login_digest=digest, client=client, failures=1, last_failure=now)
            session.execute(insert.on_conflict_do_update(
                index_elements=[LoginFailure.login_digest, LoginFailure.client],
                set_={"failures": LoginFailure.failures + 1, "last_failure": now},
            ))

    def logout(self, secret: str) -> str | None:
        """End the session (or revoke the token) ``secret`` names; how that session was signed in ("oidc", ...)."""
        with transaction(self._sessions) as session:
            token = session.scalar(select(ApiToken).where(ApiToken.token_hash == token_digest(secret)))
            if token is None or token.revoked_at is not None:
                return None
            token.revoked_at = self._clock.now()
            return token.via

    # tokens ----------------------------------------------------------------

    def create_token(self, by: Principal, login: str, name: str, days: float | None = None) -> IssuedToken:
        """A new API token for `login`, valid for `days` (the site's longest, server.max_token_days, if None)."""
        if by.login != login and not by.is_admin:
            raise AccessDenied("only an admin may create tokens for another user")
        longest = self._max_token_days
        if days is None:
            days = longest
        if not 0 < days <= longest:
            raise InvalidInput(f"a token may live more than 0 and at most {longest:g} days (server.max_token_days); "
                               f"{days:g} is outside that: create a new token when this one expires")
        with self._sessions() as session:
            user = _find_user(session, login)
        if user.disabled:
            raise InvalidInput(f"user {login!r} is disabled; enable the account before issuing tokens")
        issued = self._issue(user.id, "api", name, self._clock.now() + timedelta(days=days),
                             lambda session, token_id: self._audit.record(
                                 by, Action.TOKEN_ADMIN, detail={"op": "create", "login": login, "token": token_id},
                                 session=session))
        return issued

    def list_tokens(self, login: str | None = None) -> list[TokenView]:
        with self._sessions() as session:
            statement = select(ApiToken, User.login).join(User).where(ApiToken.kind == "api").order_by(ApiToken.id)
            if login:
                statement = statement.where(User.login == login)
            return [
                TokenView(t.id, who, t.kind, t.name, t.created_at, t.expires_at, t.revoked_at, t.last_used_at)
                for t, who in session.execute(statement)
            ]

    def revoke_token(self, by: Principal, token_id: int) -> None:
        with transaction(self._sessions) as session:
            token = session.get(ApiToken, token_id)
            if token is None:
                raise NotFound(f"no token with id {token_id}; list them with `mi2b2 admin token list`")
            owner = session.get(User, token.user_id)
            allowed = by.is_admin or (owner is not None and owner.login == by.login)
            if allowed:
                token.revoked_at = token.revoked_at or self._clock.now()
                self._audit.record(by, Action.TOKEN_ADMIN, detail={"op": "revoke", "token": token_id}, session=session)
        if not allowed:
            self._audit.record(by, Action.DENIED, Outcome.DENIED,
                               detail={"reason": "not an admin", "operation": "revoke another user's token",
                                       "token": token_id})
            raise AccessDenied("you may revoke only your own tokens")

    def authenticate(self, secret: str, client: str = "") -> Principal | None:
        """The principal a bearer token or session cookie stands for, if it is valid now."""
        now = self._clock.now()
        with self._sessions() as session:
            found = session.execute(
                select(ApiToken, User).join(User).where(ApiToken.token_hash == token_digest(secret))
            ).first()
        if found is None:
            return None
        token, user = found
        if token.revoked_at or user.disabled or (token.expires_at and as_utc(token.expires_at) <= now):
            return None
        if token.kind == "api" and as_utc(token.created_at) + timedelta(days=self._max_token_days) <= now:
            return None  # made before the site's limit, or the limit was lowered since
        if token.last_used_at is None or now - as_utc(token.last_used_at) > timedelta(minutes=1):
            # Coarse, and only then a write: on SQLite every write transaction takes
            # the database's one write lock, which no request should need to read.
            with transaction(self._sessions) as session:
                session.execute(update(ApiToken).where(ApiToken.id == token.id).values(last_used_at=now))
        return Principal(user.login, Role(user.role), user.display_name, client)

    def _issue(self, user_id: int, kind: str, name: str, expires: datetime | None,
               audit: Callable[[Session, int], object], via: str | None = None) -> IssuedToken:
        """A new token; ``audit`` records it in the same transaction (session, token id)."""
        secret = new_token()
        with transaction(self._sessions) as session:
            token = ApiToken(user_id=user_id, kind=kind, name=name, token_hash=token_digest(secret),
                             created_at=self._clock.now(), expires_at=expires, via=via)
            session.add(token)
            session.flush()
            token_id = token.id
            audit(session, token_id)
        return IssuedToken(token_id, secret, expires)


def _revoke_all(session: Session, user_id: int, now: datetime) -> int:
    """Revoke every API token and browser session of a user; how many there were."""
    return rows_changed(
        session, update(ApiToken).where(ApiToken.user_id == user_id, ApiToken.revoked_at.is_(None)).values(revoked_at=now)
    )


def _role(role: str) -> str:
    try:
        return Role(role).value
    except ValueError:
        raise InvalidInput(f"{role!r} is not a role; use one of: {', '.join(r.value for r in Role)}") from None


def _check_password(password: str) -> None:
    if len(password) < MIN_PASSWORD:
        raise InvalidInput(f"passwords need at least {MIN_PASSWORD} characters")


def _find_user(session: Session, login: str) -> User:
    user = session.scalar(select(User).where(User.login == login))
    if user is None:
        raise NotFound(f"no user {login!r}; list users with `mi2b2 admin user list`")
    return user


def _user_view(user: User) -> UserView:
    return UserView(user.login, user.display_name, user.role, user.email, user.disabled)
