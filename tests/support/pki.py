"""A throwaway PKI for DICOM TLS tests, made with the openssl command line.

Two CAs: the site's ("Test CA"), which issues the server certificate
(CN=localhost, SAN localhost and 127.0.0.1, serverAuth and clientAuth so a
PACS can use it as a TLS client too) and a client certificate; and an
unrelated "Other CA" with a certificate of its own, the impostor's. Keys are
RSA 2048, valid one day.
"""

from __future__ import annotations

import subprocess
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Pki", "make_pki"]


@dataclass(frozen=True)
class Pki:
    folder: Path
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path
    other_cert: Path  # from other_ca, same names as server_cert: only its issuer is wrong
    other_key: Path


def _openssl(folder: Path, *args: str) -> None:
    result = subprocess.run(["openssl", *args], cwd=folder, capture_output=True, text=True, check=False,
                            stdin=subprocess.DEVNULL, timeout=60)
    if result.returncode != 0:
        raise RuntimeError(f"openssl {' '.join(args)} failed:\n{result.stderr}")


def _ca(folder: Path, name: str, subject: str) -> None:
    _openssl(folder, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out",
             f"{name}.crt", "-days", "1", "-subj", subject, "-addext", "basicConstraints=critical,CA:TRUE",
             "-addext", "keyUsage=critical,keyCertSign,cRLSign")


def _leaf(folder: Path, ca: str, name: str, subject: str, san: str, usage: str) -> None:
    _openssl(folder, "req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
             "-subj", subject)
    (folder / f"{name}.ext").write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                                        f"keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n")
    _openssl(folder, "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key",
             "-CAcreateserial", "-out", f"{name}.crt", "-days", "1", "-extfile", f"{name}.ext")


def make_pki(folder: Path, addresses: tuple[str, ...] = ()) -> Pki:
    """``addresses``: more IP addresses the server certificate names, besides 127.0.0.1."""
    folder.mkdir(parents=True, exist_ok=True)
    _ca(folder, "ca", "/CN=Test CA")
    san = ",".join(["DNS:localhost", "IP:127.0.0.1", *(f"IP:{a}" for a in addresses if a != "127.0.0.1")])
    _leaf(folder, "ca", "server", "/CN=localhost", san, "serverAuth,clientAuth")
    _leaf(folder, "ca", "client", "/CN=client", "DNS:client", "clientAuth")
    _ca(folder, "other-ca", "/CN=Other CA")
    _leaf(folder, "other-ca", "other", "/CN=localhost", "DNS:localhost,IP:127.0.0.1", "serverAuth,clientAuth")
    return Pki(folder, folder / "ca.crt", folder / "server.crt", folder / "server.key", folder / "client.crt",
               folder / "client.key", folder / "other-ca.crt", folder / "other.crt", folder / "other.key")
