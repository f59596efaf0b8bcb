"""DICOM TLS settings (PS3.15 Annex B.1, the TLS secure transport connection profile).

One block for associations mi2b2 opens (``[institutions.departments.pacs.tls]``,
``[destinations.tls]``) and one for the receiver (``[dicom.tls]``). Both always
verify the other side against a CA file the site names: a DICOM peer's
certificate is almost never issued by a public CA, so the system's store would
be the wrong default. TLS 1.2 is the least either side accepts (see
``adapters/dicom/tls.py``, which builds the SSL contexts).

Paths are checked for existence and readability when the configuration is
loaded (`check_tls_files`), relative ones against the configuration file's folder.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator

from mi2b2.config.fields import Strict


class DicomTls(Strict):
    """TLS for an association mi2b2 opens: to a PACS, or to a forward destination."""

    ca_file: Path = Field(description="PEM file of the CA certificate(s) the peer's certificate must chain to")
    cert_file: Path | None = Field(None, description="our client certificate (PEM), for a peer that requires "
                                                     "mutual TLS; with key_file")
    key_file: Path | None = Field(None, description="the private key of cert_file (PEM, unencrypted)")
    server_name: str | None = Field(None, min_length=1, max_length=253,
                                    description="the name the peer's certificate must carry; default: its host")

    @model_validator(mode="after")
    def _pair(self) -> DicomTls:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("set both cert_file and key_file (mutual TLS), or neither")
        return self

    def files(self) -> dict[str, Path]:
        named = {"ca_file": self.ca_file, "cert_file": self.cert_file, "key_file": self.key_file}
        return {name: path for name, path in named.items() if path is not None}


class ReceiverTls(Strict):
    """TLS on mi2b2's own DICOM port: every association to the receiver must be TLS."""

    cert_file: Path = Field(description="the receiver's certificate (PEM), with the names PACS connect to")
    key_file: Path = Field(description="its private key (PEM, unencrypted)")
    ca_file: Path | None = Field(None, description="PEM file of the CA(s) a sender's client certificate must "
                                                   "chain to")
    require_client_cert: bool = Field(True, description="refuse a sender without a certificate from ca_file "
                                                        "(mutual TLS); false: encryption only, any sender may "
                                                        "connect and the AE title/address checks still apply")

    @model_validator(mode="after")
    def _ca_for_clients(self) -> ReceiverTls:
        if self.require_client_cert and self.ca_file is None:
            raise ValueError("require_client_cert = true needs ca_file, the CA that issued the PACS's "
                             "certificates (or set require_client_cert = false)")
        return self

    def files(self) -> dict[str, Path]:
        named = {"cert_file": self.cert_file, "key_file": self.key_file, "ca_file": self.ca_file}
        return {name: path for name, path in named.items() if path is not None}


def tls_off_or_block(value: Any) -> Any:
    """``tls = false`` (the old switch) means no TLS; ``tls = true`` must become a table."""
    if value is False:
        return None
    if value is True:
        raise ValueError('DICOM TLS needs its settings: replace tls = true with a table, e.g. '
                         'tls = { ca_file = "pacs-ca.pem" } (see README, "DICOM TLS")')
    return value


_PEM_MARKERS = {"ca_file": b"-----BEGIN CERTIFICATE-----", "cert_file": b"-----BEGIN CERTIFICATE-----",
                "key_file": b"PRIVATE KEY-----"}


def check_tls_files(blocks: Iterator[tuple[str, DicomTls | ReceiverTls]], resolve: Callable[[Path], Path]) -> None:
    """Each named file exists, is readable and holds what its setting says; ValueError naming the setting."""
    for where, block in blocks:
        for name, path in block.files().items():
            full = resolve(path)
            try:
                with full.open("rb") as handle:
                    head = handle.read(1 << 20)
            except FileNotFoundError:
                raise ValueError(f"{where}.{name}: {full} does not exist; fix the path or create the file") from None
            except IsADirectoryError:
                raise ValueError(f"{where}.{name}: {full} is a folder; name the PEM file in it") from None
            except OSError as exc:
                raise ValueError(f"{where}.{name}: cannot read {full} ({exc.strerror or exc}); make it readable by "
                                 "the user mi2b2 runs as") from None
            if name == "key_file" and (b"ENCRYPTED" in head):
                raise ValueError(f"{where}.{name}: {full} is encrypted with a passphrase, which mi2b2 cannot type; "
                                 "store it unencrypted (openssl pkey -in KEY -out KEY.plain) readable only by mi2b2")
            if _PEM_MARKERS[name] not in head:
                what = "a PEM private key" if name == "key_file" else "PEM certificate(s)"
                raise ValueError(f"{where}.{name}: {full} does not hold {what}; convert it to PEM "
                                 "(openssl x509 -inform der -in FILE -out FILE.pem)")
