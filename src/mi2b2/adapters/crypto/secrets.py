"""Password hashes (argon2) and bearer secrets (random, stored only as SHA-256)."""

from __future__ import annotations

import functools
import hashlib
import hmac
import secrets

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

_hasher = PasswordHasher()

TOKEN_PREFIX = "mi2b2_"


def hash_password(password: str) -> str:
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    try:
        return _hasher.verify(password_hash or _dummy_hash(), password) and password_hash is not None
    except (VerifyMismatchError, VerificationError, InvalidHashError):
        return False


@functools.cache
def _dummy_hash() -> str:
    """Verifying against this when the login is unknown keeps the response time flat. Made at the
    first sign-in, not at import: an argon2 hash costs a third of a second and 64 MiB, which every
    command and receiver would otherwise pay."""
    return _hasher.hash("not a real password")


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def token_digest(token: str) -> str:
    # Tokens carry 256 random bits, so a plain SHA-256 is safe at rest and
    # lets us look a token up by its digest.
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def same_digest(a: str, b: str) -> bool:
    return hmac.compare_digest(a, b)
