"""Check a login and password against the site's LDAP / Active Directory (ldap3).

Every connection is encrypted: ldap:// is upgraded with StartTLS before any
bind, ldaps:// is TLS from the start, and the directory's certificate must
chain to the configured CA file.
"""

from __future__ import annotations

import re
import ssl
from dataclasses import dataclass
from pathlib import Path

from ldap3 import NONE, SUBTREE, Connection, Server, Tls
from ldap3.core.exceptions import LDAPException, LDAPSocketOpenError, LDAPSocketReceiveError, LDAPStartTLSError
from ldap3.utils.conv import escape_filter_chars

from mi2b2.adapters.sign_in_errors import DirectoryRefused
from mi2b2.config.ldap import LdapConfig
from mi2b2.errors import PermanentError, RetriableError

INVALID_CREDENTIALS = 49
GROUP_LIMIT = 1000  # a user in more groups than this is misconfigured; the first thousand still map a role


@dataclass(frozen=True)
class DirectoryUser:
    dn: str
    display_name: str
    groups: tuple[str, ...]


class LdapDirectory:
    def __init__(self, config: LdapConfig, ca_file: Path | None, bind_password: str | None) -> None:
        self._config = config
        self._tls = Tls(ca_certs_file=str(ca_file) if ca_file else None, validate=ssl.CERT_REQUIRED,
                        version=ssl.PROTOCOL_TLS_CLIENT)
        self._bind_password = bind_password

    @property
    def names(self) -> str:
        return ", ".join(self._config.servers)

    def authenticate(self, login: str, password: str) -> DirectoryUser:
        """The user ``login`` names, once the directory accepted ``password``; DirectoryRefused if not."""
        if not password:
            # An LDAP bind with a DN and no password is an "unauthenticated bind": it succeeds.
            raise DirectoryRefused("empty password")
        unreachable: list[str] = []
        for url in self._config.servers:
            try:
                return self._authenticate_at(url, login, password)
            except (LDAPSocketOpenError, LDAPSocketReceiveError) as error:
                unreachable.append(f"{url} ({error})")
        raise RetriableError(f"the directory cannot be reached: {'; '.join(unreachable)}; sign-in works again when "
                             f"it answers (or ask the site admin to check [ldap] servers)")

    def _authenticate_at(self, url: str, login: str, password: str) -> DirectoryUser:
        config = self._config
        server = Server(url, use_ssl=url.startswith("ldaps://"), tls=self._tls, get_info=NONE,
                        connect_timeout=config.timeout_seconds)
        search = self._open(server, url, config.bind_dn, self._bind_password)
        try:
            if config.bind_dn is not None and not search.bind():
                raise PermanentError(f"the directory {url} refused mi2b2's search account {config.bind_dn!r} "
                                     f"({search.result.get('description')}); check [ldap] bind_dn and its password file")
            query = config.user_filter.replace("{login}", escape_filter_chars(login))
            attributes = [config.group_attribute, config.display_name_attribute]
            search.search(config.user_base, query, SUBTREE, attributes=attributes, size_limit=2)
            entries = list(search.entries)
            if not entries:
                raise DirectoryRefused("no such user in the directory")
            if len(entries) > 1:
                raise DirectoryRefused("the login matches several directory entries; narrow [ldap] user_filter")
            entry = entries[0]
            values = entry.entry_attributes_as_dict
            groups = (self._groups_of(search, entry.entry_dn, login) if config.group_base is not None
                      else tuple(str(g) for g in values.get(config.group_attribute, [])))
        finally:
            search.unbind()
        user = self._open(server, url, entry.entry_dn, password)
        try:
            if not user.bind():
                if user.result.get("result") == INVALID_CREDENTIALS:
                    # Active Directory tells why in the message: data 52e wrong password, 533 disabled, 775 locked.
                    raise DirectoryRefused(f"bind refused: {user.result.get('message') or 'invalid credentials'}")
                raise DirectoryRefused(f"bind refused: {user.result.get('description')}")
        finally:
            user.unbind()
        names = values.get(config.display_name_attribute) or [login]
        return DirectoryUser(entry.entry_dn, str(names[0]), groups)

    def _groups_of(self, search: Connection, user_dn: str, login: str) -> tuple[str, ...]:
        """The DNs of the groups under ``group_base`` that name the user (directories without memberOf)."""
        config = self._config
        assert config.group_base is not None
        values = {"{dn}": escape_filter_chars(user_dn), "{login}": escape_filter_chars(login)}
        query = re.sub(r"\{dn\}|\{login\}", lambda match: values[match.group()], config.group_filter)
        search.search(config.group_base, query, SUBTREE, attributes=[], size_limit=GROUP_LIMIT)
        return tuple(group.entry_dn for group in search.entries)

    def _open(self, server: Server, url: str, dn: str | None, password: str | None) -> Connection:
        """A connection, encrypted before anything is sent; not yet bound."""
        connection = Connection(server, user=dn, password=password, auto_bind=False, raise_exceptions=False,
                                receive_timeout=self._config.timeout_seconds, read_only=True)
        try:
            connection.open()
            if not url.startswith("ldaps://") and not connection.start_tls():
                raise LDAPStartTLSError(str(connection.result.get("description")))
        except (LDAPSocketOpenError, LDAPSocketReceiveError) as error:
            if _is_tls_failure(error):
                raise PermanentError(f"TLS with the directory {url} failed ({error}); its certificate must chain to "
                                     f"[ldap] ca_file") from None
            raise
        except LDAPException as error:
            raise PermanentError(f"TLS with the directory {url} failed ({error}); its certificate must chain to "
                                 f"[ldap] ca_file") from None
        return connection


def _is_tls_failure(error: LDAPException) -> bool:
    text = str(error).lower()
    return "ssl" in text or "certificate" in text or "tls" in text
