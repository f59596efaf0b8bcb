"""Users, passwords, browser sessions and API tokens."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import select, update
from sqlalchemy.orm import Session, sessionmaker

from mi2b2.adapters.crypto.secrets import hash_password, new_token, token_digest, verify_password
from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import ApiToken, User
from mi2b2.domain.clock import Clock, as_utc
from mi2b2.domain.login_throttle import must_wait
from mi2b2.domain.principal import Principal, Role
from mi2b2.errors import AccessDenied, InvalidInput, NotFound
from mi2b2.services.audit import Action, AuditTrail, Outcome

LOGIN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,63}$")
NOT_A_LOGIN = "(not a login name)"
MIN_PASSWORD = 10


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


class Accounts:
    def __init__(self, sessions: sessionmaker[Session], clock: Clock, audit: AuditTrail, session_hours: float = 12) -> None:
        self._sessions = sessions
        self._clock = clock
        self._audit = audit
        self._session_lifetime = timedelta(hours=session_hours)

    # users -----------------------------------------------------------------

    def add_user(self, by: Principal, login: str, role: str, password: str | None,
                 display_name: str = "", email: str | None = None) -> UserView:
        if not LOGIN.match(login):
            raise InvalidInput(f"{login!r} is not a valid login; use letters, digits, '.', '_', '-' or '@'")
        role_value = _role(role)
        if password is not None:
            _check_password(password)
        with transaction(self._sessions) as session:
            if session.scalar(select(User).where(User.login == login)):
                raise InvalidInput(f"user {login!r} already exists; use reset-password or pick another login")
            user = User(login=login, role=role_value, display_name=display_name or login, email=email,
                        password_hash=hash_password(password) if password else None,
                        created_at=self._clock.now(), disabled=False, failed_logins=0)
            session.add(user)
            self._audit.record(by, Action.USER_ADMIN, detail={"op": "add", "login": login, "role": role_value},
                               session=session)
        return _user_view(user)

    def list_users(self) -> list[UserView]:
        with self._sessions() as session:
            return [_user_view(u) for u in session.scalars(select(User).order_by(User.login))]

    def disable_user(self, by: Principal, login: str) -> None:
        now = self._clock.now()
        with transaction(self._sessions) as session:
            user = _find_user(session, login)
            user.disabled = True
            session.execute(
                update(ApiToken).where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None)).values(revoked_at=now)
            )
            self._audit.record(by, Action.USER_ADMIN, detail={"op": "disable", "login": login}, session=session)

    def reset_password(self, by: Principal, login: str, password: str) -> None:
        _check_password(password)
        with transaction(self._sessions) as session:
            user = _find_user(session, login)
            user.password_hash = hash_password(password)
            user.failed_logins = 0
            user.last_failed_login = None
            self._audit.record(by, Action.USER_ADMIN, detail={"op": "reset-password", "login": login}, session=session)

    # login -----------------------------------------------------------------

    def login(self, login: str, password: str, client: str = "") -> tuple[Principal, IssuedToken]:
        """Check a password and open a browser session. Failures are audited and throttled."""
        now = self._clock.now()
        with transaction(self._sessions) as session:
            user = session.scalar(select(User).where(User.login == login))
            wait = must_wait(user.failed_logins, _aware(user.last_failed_login), now) if user else None
            ok = wait is None and user is not None and not user.disabled and verify_password(user.password_hash, password)
            if user is not None and wait is None:
                user.failed_logins = 0 if ok else user.failed_logins + 1
                user.last_failed_login = None if ok else now
        # Whatever anyone types reaches the trail only if it could be a login name.
        actor = login if LOGIN.match(login) else NOT_A_LOGIN
        if wait is not None:
            self._audit.record(actor, Action.LOGIN, Outcome.DENIED, detail={"client": client, "reason": "throttled"})
            raise AccessDenied(f"too many failed logins; try again in {int(wait.total_seconds()) + 1} s")
        if not ok or user is None:
            self._audit.record(actor, Action.LOGIN, Outcome.FAILED, detail={"client": client})
            raise AccessDenied("wrong login or password")
        principal = Principal(user.login, Role(user.role), user.display_name, client)
        issued = self._issue(user.id, "session", "browser session", now + self._session_lifetime,
                             lambda session, token_id: self._audit.record(
                                 principal, Action.LOGIN, detail={"session": token_id}, session=session))
        return principal, issued

    def logout(self, secret: str) -> None:
        with transaction(self._sessions) as session:
            session.execute(
                update(ApiToken).where(ApiToken.token_hash == token_digest(secret)).values(revoked_at=self._clock.now())
            )

    # tokens ----------------------------------------------------------------

    def create_token(self, by: Principal, login: str, name: str, days: float | None = 90) -> IssuedToken:
        if by.login != login and not by.is_admin:
            raise AccessDenied("only an admin may create tokens for another user")
        with self._sessions() as session:
            user = _find_user(session, login)
        if user.disabled:
            raise InvalidInput(f"user {login!r} is disabled; enable the account before issuing tokens")
        expires = self._clock.now() + timedelta(days=days) if days else None
        issued = self._issue(user.id, "api", name, expires, lambda session, token_id: self._audit.record(
            by, Action.TOKEN_ADMIN, detail={"op": "create", "login": login, "token": token_id}, session=session))
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
            if not by.is_admin and (owner is None or owner.login != by.login):
                raise AccessDenied("you may revoke only your own tokens")
            token.revoked_at = token.revoked_at or self._clock.now()
            self._audit.record(by, Action.TOKEN_ADMIN, detail={"op": "revoke", "token": token_id}, session=session)

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
        if token.last_used_at is None or now - as_utc(token.last_used_at) > timedelta(minutes=1):
            # Coarse, and only then a write: on SQLite every write transaction takes
            # the database's one write lock, which no request should need to read.
            with transaction(self._sessions) as session:
                session.execute(update(ApiToken).where(ApiToken.id == token.id).values(last_used_at=now))
        return Principal(user.login, Role(user.role), user.display_name, client)

    def _issue(self, user_id: int, kind: str, name: str, expires: datetime | None,
               audit: Callable[[Session, int], object]) -> IssuedToken:
        """A new token; ``audit`` records it in the same transaction (session, token id)."""
        secret = new_token()
        with transaction(self._sessions) as session:
            token = ApiToken(user_id=user_id, kind=kind, name=name, token_hash=token_digest(secret),
                             created_at=self._clock.now(), expires_at=expires)
            session.add(token)
            session.flush()
            token_id = token.id
            audit(session, token_id)
        return IssuedToken(token_id, secret, expires)


def _aware(value: datetime | None) -> datetime | None:
    return as_utc(value) if value else None


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
