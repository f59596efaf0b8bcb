"""The OpenID Connect relying party: discovery, the authorization code flow with PKCE, ID token checks.

Authlib supplies the protocol parts (PKCE S256 challenge, ID token claim
rules: iss, aud, exp, iat, nonce, azp, at_hash) and joserfc checks the
signature against the provider's JWKS. Every exchange with the provider goes
over one httpx client whose sockets have TCP_NODELAY.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
from authlib.oauth2.rfc7636 import create_s256_code_challenge
from authlib.oidc.core import CodeIDToken
from joserfc import jwt
from joserfc.errors import InvalidKeyIdError, JoseError
from joserfc.jwk import KeySet
from joserfc.jws import JWSRegistry

from mi2b2.adapters.sign_in_errors import OidcRefused
from mi2b2.config.oidc import OidcConfig
from mi2b2.errors import PermanentError, RetriableError

# Seconds an ID token's exp/iat may be off by clock skew between mi2b2 and the provider.
LEEWAY_SECONDS = 60
SIGNING_ALGORITHMS = ["RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA"]
MAX_ANSWER = 1024 * 1024  # a discovery document, key set or token answer is a few kB


@dataclass(frozen=True)
class ProviderMetadata:
    issuer: str
    authorization_endpoint: str
    token_endpoint: str
    jwks_uri: str
    userinfo_endpoint: str | None
    end_session_endpoint: str | None
    algorithms: list[str]


@dataclass(frozen=True)
class Tokens:
    id_token: str
    access_token: str | None


class OpenIdProvider:
    def __init__(self, config: OidcConfig, client_secret: str, ca_file: Path | None = None) -> None:
        self._config = config
        self._client_secret = client_secret
        # Without ca_file, the system's CAs (as for [ldap]), not a bundle shipped with a Python package.
        verify = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
        transport = httpx.HTTPTransport(verify=verify, socket_options=[(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)])
        self._http = httpx.Client(transport=transport, timeout=config.timeout_seconds, follow_redirects=False)
        self._lock = threading.Lock()
        self._metadata: ProviderMetadata | None = None
        self._keys: KeySet | None = None

    @property
    def name(self) -> str:
        return self._config.name

    def close(self) -> None:
        self._http.close()

    # discovery ---------------------------------------------------------------

    def metadata(self) -> ProviderMetadata:
        """The provider's discovery document, read once; its issuer must be the configured one exactly."""
        with self._lock:
            if self._metadata is None:
                self._metadata = self._discover()
            return self._metadata

    def _discover(self) -> ProviderMetadata:
        issuer = self._config.issuer
        url = issuer.rstrip("/") + "/.well-known/openid-configuration"
        document = self._get_json(url, "its discovery document")
        if document.get("issuer") != issuer:
            raise PermanentError(f"the OpenID provider at {url} names its issuer {document.get('issuer')!r}, not "
                                 f"{issuer!r}; set [oidc] issuer to exactly the provider's issuer")
        missing = [key for key in ("authorization_endpoint", "token_endpoint", "jwks_uri")
                   if not isinstance(document.get(key), str)]
        if missing:
            raise PermanentError(f"the OpenID provider {issuer} lists no {', '.join(missing)} in its discovery "
                                 f"document; it cannot serve the authorization code flow")
        challenge_methods = document.get("code_challenge_methods_supported")
        if isinstance(challenge_methods, list) and "S256" not in challenge_methods:
            raise PermanentError(f"the OpenID provider {issuer} does not offer PKCE with S256; mi2b2 needs it")
        offered = document.get("id_token_signing_alg_values_supported")
        algorithms = [a for a in SIGNING_ALGORITHMS if not isinstance(offered, list) or a in offered]
        if not algorithms:
            raise PermanentError(f"the OpenID provider {issuer} signs ID tokens only with {offered}; mi2b2 accepts "
                                 f"asymmetric signatures ({', '.join(SIGNING_ALGORITHMS)})")
        return ProviderMetadata(issuer, document["authorization_endpoint"], document["token_endpoint"],
                                document["jwks_uri"], _text_or_none(document.get("userinfo_endpoint")),
                                _text_or_none(document.get("end_session_endpoint")), algorithms)

    # the flow ----------------------------------------------------------------

    def authorization_url(self, redirect_uri: str, state: str, nonce: str, code_verifier: str) -> str:
        endpoint = self.metadata().authorization_endpoint
        query = urlencode({
            "response_type": "code", "client_id": self._config.client_id, "redirect_uri": redirect_uri,
            "scope": " ".join(self._config.scopes), "state": state, "nonce": nonce,
            "code_challenge": create_s256_code_challenge(code_verifier), "code_challenge_method": "S256",
        })
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"

    def exchange(self, code: str, redirect_uri: str, code_verifier: str) -> Tokens:
        """The tokens the provider gives for ``code``; OidcRefused if it refuses the code."""
        answer = self._request("POST", self.metadata().token_endpoint, "its token endpoint", data={
            "grant_type": "authorization_code", "code": code, "redirect_uri": redirect_uri,
            "code_verifier": code_verifier,
        }, auth=(self._config.client_id, self._client_secret))
        body = _json_object(answer)
        if answer.status_code in (400, 401) and body is not None and "error" in body:
            if body["error"] == "invalid_client":
                raise PermanentError(f"the OpenID provider refused mi2b2's client credentials "
                                     f"({body.get('error_description') or 'invalid_client'}); check [oidc] client_id "
                                     f"and client_secret_file")
            raise OidcRefused(f"the provider refused the authorization code: {body['error']}"
                              f"{': ' + str(body['error_description']) if body.get('error_description') else ''}")
        if answer.status_code != 200 or body is None:
            raise PermanentError(f"the OpenID provider's token endpoint answered HTTP {answer.status_code}")
        id_token = body.get("id_token")
        if not isinstance(id_token, str):
            raise OidcRefused('the provider sent no ID token (is "openid" among the scopes the client may ask?)')
        access = body.get("access_token")
        return Tokens(id_token, access if isinstance(access, str) else None)

    def verify_id_token(self, id_token: str, nonce: str, now: datetime, access_token: str | None = None
                        ) -> dict[str, Any]:
        """The claims of ``id_token`` once its signature, issuer, audience, times and nonce hold."""
        metadata = self.metadata()
        registry = JWSRegistry(algorithms=metadata.algorithms)
        try:
            try:
                token = jwt.decode(id_token, self._key_set(refresh=False), registry=registry)
            except InvalidKeyIdError:
                token = jwt.decode(id_token, self._key_set(refresh=True), registry=registry)  # the keys rotated
        except (JoseError, ValueError) as error:
            raise OidcRefused(f"the ID token's signature does not verify against the provider's keys "
                              f"({_jose_reason(error)})") from None
        params: dict[str, Any] = {"nonce": nonce, "client_id": self._config.client_id}
        if access_token:
            params["access_token"] = access_token
        options = {"iss": {"essential": True, "value": metadata.issuer},
                   "aud": {"essential": True, "value": self._config.client_id}}
        claims = CodeIDToken(token.claims, token.header, options, params)
        try:
            claims.validate(now=int(now.timestamp()), leeway=LEEWAY_SECONDS)
        except JoseError as error:
            raise OidcRefused(f"the ID token fails a check: {_jose_reason(error)}") from None
        if not nonce:
            raise OidcRefused("no nonce was kept for this sign-in")  # never skip the nonce check
        return dict(claims)

    def userinfo(self, access_token: str, subject: str) -> dict[str, Any]:
        """Claims from the userinfo endpoint (none if the provider has none); its ``sub`` must be the ID token's."""
        endpoint = self.metadata().userinfo_endpoint
        if endpoint is None:
            return {}
        answer = self._request("GET", endpoint, "its userinfo endpoint",
                               headers={"Authorization": f"Bearer {access_token}"})
        body = _json_object(answer)
        if answer.status_code != 200 or body is None:
            raise PermanentError(f"the OpenID provider's userinfo endpoint answered HTTP {answer.status_code}")
        if body.get("sub") != subject:
            raise OidcRefused("the userinfo answer is about another subject than the ID token")
        return body

    def logout_url(self, post_logout_redirect_uri: str) -> str | None:
        """Where the browser ends its session at the provider (RP-initiated logout), if the provider offers it."""
        endpoint = self.metadata().end_session_endpoint
        if endpoint is None:
            return None
        query = urlencode({"client_id": self._config.client_id, "post_logout_redirect_uri": post_logout_redirect_uri})
        return f"{endpoint}{'&' if '?' in endpoint else '?'}{query}"

    # plumbing ----------------------------------------------------------------

    def _key_set(self, refresh: bool) -> KeySet:
        with self._lock:
            if self._keys is None or refresh:
                assert self._metadata is not None
                document = self._get_json(self._metadata.jwks_uri, "its key set (jwks_uri)")
                try:
                    self._keys = KeySet.import_key_set(document)  # type: ignore[arg-type]
                except (JoseError, ValueError, TypeError, KeyError) as error:
                    raise PermanentError(f"the OpenID provider's key set cannot be read: {error}") from None
            return self._keys

    def _get_json(self, url: str, what: str) -> dict[str, Any]:
        answer = self._request("GET", url, what)
        body = _json_object(answer)
        if answer.status_code != 200 or body is None:
            raise PermanentError(f"the OpenID provider answered HTTP {answer.status_code} for {what} at {url}; "
                                 f"check [oidc] issuer")
        return body

    def _request(self, method: str, url: str, what: str, **kwargs: Any) -> httpx.Response:
        try:
            with self._http.stream(method, url, **kwargs) as answer:
                body = b""
                for chunk in answer.iter_bytes():
                    body += chunk
                    if len(body) > MAX_ANSWER:
                        raise PermanentError(f"the OpenID provider sent more than {MAX_ANSWER} bytes for {what}")
                return httpx.Response(answer.status_code, headers=answer.headers, content=body)
        except httpx.ConnectError as error:
            if isinstance(error.__cause__, ssl.SSLError) or "certificate" in str(error).lower():
                raise PermanentError(f"TLS with the OpenID provider failed for {what} ({error}); its certificate must "
                                     f"chain to [oidc] ca_file") from None
            raise RetriableError(f"the OpenID provider cannot be reached for {what} at {url} ({error}); sign-in "
                                 f"works again when it answers") from None
        except httpx.HTTPError as error:
            raise RetriableError(f"the OpenID provider did not answer for {what} at {url} ({error})") from None


def _json_object(answer: httpx.Response) -> dict[str, Any] | None:
    try:
        body = answer.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def _text_or_none(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _jose_reason(error: Exception) -> str:
    return getattr(error, "description", None) or getattr(error, "error", None) or str(error) or type(error).__name__
