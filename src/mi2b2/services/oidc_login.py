"""Sign-in through the site's OpenID Connect provider: start it, finish it, end it.

A sign-in in progress is one ``oidc_logins`` row keyed by a digest of its
``state``, bound to the browser that started it by a digest of a secret kept
in that browser's cookie, and deleted by the first callback that names it,
whatever that callback's fate: a state works once, in one browser, for
LOGIN_WINDOW. Every refusal is audited and leaves no user row behind.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from sqlalchemy import delete, func, select
from sqlalchemy.orm import Session, sessionmaker

from mi2b2.adapters.db.engine import transaction
from mi2b2.adapters.db.tables import OidcLogin
from mi2b2.adapters.sign_in_errors import OidcRefused
from mi2b2.config.oidc import OidcConfig
from mi2b2.domain.clock import Clock, as_utc
from mi2b2.domain.directory_roles import groups_in_claim, role_for_groups
from mi2b2.domain.principal import LOGIN, Principal, login_problem
from mi2b2.errors import AccessDenied, Mi2b2Error, RetriableError
from mi2b2.services.audit import Action, AuditTrail, Outcome
from mi2b2.services.auth import Accounts, IssuedToken

if TYPE_CHECKING:  # Authlib and httpx load only in processes that sign users in with OpenID Connect
    from mi2b2.adapters.oidc_provider import OpenIdProvider

LOGIN_WINDOW = timedelta(minutes=10)
MAX_PENDING = 10_000  # sign-ins in progress: anyone may start one, so their number is bounded
VIA = "oidc"
DISPLAY_NAME_CHARS = 200  # users.display_name
NO_LOGIN_YET = "(oidc sign-in)"  # the audit actor until the provider has named the user


@dataclass(frozen=True)
class Started:
    authorization_url: str
    browser_secret: str  # goes into the browser's cookie, never into the database


class OidcSignIn:
    def __init__(self, sessions: sessionmaker[Session], clock: Clock, audit: AuditTrail, accounts: Accounts,
                 provider: OpenIdProvider, config: OidcConfig, max_pending: int = MAX_PENDING) -> None:
        self.max_pending = max_pending
        self._sessions = sessions
        self._clock = clock
        self._audit = audit
        self._accounts = accounts
        self._provider = provider
        self._config = config

    @property
    def provider_name(self) -> str:
        return self._config.name

    def start(self, redirect_uri: str, client: str) -> Started:
        state, nonce, verifier, browser = (secrets.token_urlsafe(32) for _ in range(4))
        try:
            url = self._provider.authorization_url(redirect_uri, state, nonce, verifier)  # discovery: before a row
        except Mi2b2Error as error:  # provider down, or not the issuer configured
            self._refuse(None, client, Outcome.FAILED, str(error))
            raise
        now = self._clock.now()
        with transaction(self._sessions) as session:
            session.execute(delete(OidcLogin).where(OidcLogin.started_at < now - LOGIN_WINDOW))
            if (session.scalar(select(func.count()).select_from(OidcLogin)) or 0) >= self.max_pending:
                busy = RetriableError(f"more than {self.max_pending} sign-ins are in progress; try again in a few "
                                      f"minutes")
                busy.retry_after = 60
                raise busy
            session.add(OidcLogin(state_digest=_digest(state), browser_digest=_digest(browser), nonce=nonce,
                                  code_verifier=verifier, started_at=now))
        return Started(url, browser)

    def finish(self, params: Mapping[str, str], browser_secret: str | None, redirect_uri: str, client: str
               ) -> tuple[Principal, IssuedToken]:
        """The provider sent the browser back with ``params`` (code and state, or error): check everything,
        then open a session. AccessDenied (audited) for anything that does not hold."""
        login: str | None = None
        try:
            pending = self._take(params.get("state", ""), browser_secret)
            if "iss" in params and params["iss"] != self._config.issuer:
                # RFC 9207: the answer names the provider that sent it; another one's answer is a mix-up attack.
                raise OidcRefused(f"the answer comes from issuer {params['iss']!r}, not from {self._config.issuer!r}")
            if "error" in params:
                raise OidcRefused(f"the provider ended the sign-in: {params['error']}"
                                  f"{': ' + params['error_description'] if params.get('error_description') else ''}")
            code = params.get("code", "")
            if not code:
                raise OidcRefused("the provider's answer carries no authorization code")
            tokens = self._provider.exchange(code, redirect_uri, pending.code_verifier)
            claims = self._provider.verify_id_token(tokens.id_token, pending.nonce, self._clock.now(),
                                                    tokens.access_token)
            claims = self._with_userinfo(claims, tokens.access_token)
            login = _claimed_login(claims, self._config)
            role = role_for_groups(groups_in_claim(claims, self._config.groups_claim), self._config.roles, normal=str)
            if role is None:
                self._refuse(login, client, Outcome.DENIED, "no group maps to a role")
                raise AccessDenied(f"your {self._config.name} account has no mi2b2 role: none of your groups is "
                                   f"mapped in the site's [oidc] roles; ask the mi2b2 admin to map one of your groups")
        except OidcRefused as refused:
            self._refuse(login, client, Outcome.FAILED, refused.reason)
            raise AccessDenied(f"sign-in with {self._config.name} failed: {refused.reason}; start again from "
                               f"mi2b2's sign-in page") from None
        except AccessDenied:
            raise
        except Mi2b2Error as error:  # provider unreachable or misconfigured: not the user's doing
            self._refuse(login, client, Outcome.FAILED, str(error))
            raise
        name = claims.get(self._config.display_name_claim)
        display_name = name.strip()[:DISPLAY_NAME_CHARS] if isinstance(name, str) and name.strip() else login
        return self._accounts.external_session(login, display_name, role, VIA, client)

    def logout_url(self, post_logout_redirect_uri: str) -> str | None:
        return self._provider.logout_url(post_logout_redirect_uri)

    def _take(self, state: str, browser_secret: str | None) -> OidcLogin:
        """The sign-in ``state`` names, removed: it is never accepted twice."""
        with transaction(self._sessions) as session:
            pending = session.scalar(select(OidcLogin).where(OidcLogin.state_digest == _digest(state)))
            if pending is not None:
                session.delete(pending)
        if pending is None:
            raise OidcRefused("unknown or already used state (a sign-in link works once)")
        if not browser_secret or not hmac.compare_digest(pending.browser_digest, _digest(browser_secret)):
            raise OidcRefused("the sign-in was started in another browser (its state does not belong to this one)")
        if as_utc(pending.started_at) + LOGIN_WINDOW <= self._clock.now():
            raise OidcRefused(f"the sign-in took longer than {int(LOGIN_WINDOW.total_seconds() // 60)} minutes")
        return pending

    def _with_userinfo(self, claims: dict[str, Any], access_token: str | None) -> dict[str, Any]:
        """Some providers put the login or the groups only into userinfo; the ID token's claims win."""
        wanted = (self._config.login_claim, self._config.groups_claim.split(".")[0], self._config.display_name_claim)
        if access_token is None or all(claim in claims for claim in wanted):
            return claims
        return self._provider.userinfo(access_token, str(claims["sub"])) | claims

    def _refuse(self, login: str | None, client: str, outcome: Outcome, reason: str) -> None:
        actor = login if login is not None and LOGIN.match(login) else NO_LOGIN_YET
        self._audit.record(actor, Action.LOGIN, outcome, detail={"client": client, "via": VIA, "reason": reason})


def _claimed_login(claims: Mapping[str, Any], config: OidcConfig) -> str:
    login = claims.get(config.login_claim)
    if not isinstance(login, str) or not login:
        raise OidcRefused(f"the provider sent no {config.login_claim!r} claim (set [oidc] login_claim to the claim "
                          f"holding the login, and its scope in [oidc] scopes)")
    problem = login_problem(login)
    if problem:
        raise OidcRefused(f"the {config.login_claim!r} claim is not a usable login: {problem}")
    if login in config.local_logins:
        raise OidcRefused(f"{login!r} is a break-glass account: it signs in with its local password only")
    return login


def _digest(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()
