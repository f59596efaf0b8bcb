"""The audit key file: the HMAC secret of the audit chain, kept outside the database.

A small TOML file, mode 0600, written once and never rewritten::

    key = "<64 hex digits>"
    keyed_from = 1
"""

from __future__ import annotations

import os
import secrets
import stat
import tomllib
from pathlib import Path

from mi2b2.adapters.storage.durable import fsync_dir
from mi2b2.domain.audit_chain import KEY_BYTES, AuditKey
from mi2b2.errors import ConfigError

HEADER = (
    "# mi2b2 audit-trail key. Keep it secret, and out of the database and its backups:\n"
    "# whoever holds it and the database can rewrite the audit trail unnoticed.\n"
    "# Every host that runs mi2b2 against the same database needs this same file.\n"
)


def read_key_file(path: Path) -> AuditKey:
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        secret = bytes.fromhex(data["key"])
        return AuditKey(secret, int(data.get("keyed_from", 1)))
    except FileNotFoundError:
        raise
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"audit key file {path} is not usable ({exc}); restore it from where you keep a copy "
                          "(a new key cannot verify the rows the old one signed)") from None


def create_key_file(path: Path, keyed_from: int) -> AuditKey:
    """A new random key, written with mode 0600; FileExistsError if the file is already there."""
    key = AuditKey(secrets.token_bytes(KEY_BYTES), keyed_from)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    try:
        os.write(fd, (HEADER + f'key = "{key.secret.hex()}"\nkeyed_from = {keyed_from}\n').encode("utf-8"))
        os.fsync(fd)
    except OSError:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
    fsync_dir(path.parent)
    return key
