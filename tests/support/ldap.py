"""A real OpenLDAP ``slapd`` on 127.0.0.1 with a generated directory and a test PKI for StartTLS and ldaps.

The directory (dc=example,dc=org):
  ann      in cn=researchers          password ANN_PASSWORD
  audrey   in cn=auditors             password AUDREY_PASSWORD
  norole   in cn=staff (not mapped)   password NOROLE_PASSWORD
  dora     disabled: her entry has no userPassword, so no password binds as her
  cn=reader                           the search account, password READER_PASSWORD
"""

from __future__ import annotations

import socket
import subprocess
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path

from support.pacs import free_port

SUFFIX = "dc=example,dc=org"
ADMIN_DN = f"cn=admin,{SUFFIX}"
ADMIN_PASSWORD = "admin secret 42"
READER_DN = f"cn=reader,{SUFFIX}"
READER_PASSWORD = "reader secret 42"
ANN_PASSWORD = "ann's directory password"
AUDREY_PASSWORD = "audrey's directory password"
NOROLE_PASSWORD = "norole's directory password"
RESEARCHERS = f"cn=researchers,ou=groups,{SUFFIX}"
AUDITORS = f"cn=auditors,ou=groups,{SUFFIX}"
STAFF = f"cn=staff,ou=groups,{SUFFIX}"
PEOPLE = f"ou=people,{SUFFIX}"


@dataclass
class RunningSlapd:
    folder: Path
    port: int
    tls_port: int
    ca_file: Path
    other_ca_file: Path  # a CA that did not sign the server's certificate
    process: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"ldap://127.0.0.1:{self.port}"

    @property
    def ldaps_url(self) -> str:
        return f"ldaps://127.0.0.1:{self.tls_port}"

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)


def make_ca(folder: Path, name: str) -> tuple[Path, Path]:
    key, cert = folder / f"{name}.key", folder / f"{name}.crt"
    _run("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "1",
         "-subj", f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
         "-addext", "keyUsage=critical,keyCertSign,cRLSign")
    return key, cert


def server_certificate(folder: Path, ca_key: Path, ca_cert: Path) -> tuple[Path, Path]:
    key, csr, cert, ext = (folder / f"server.{s}" for s in ("key", "csr", "crt", "ext"))
    _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=localhost")
    ext.write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\n"
                   "keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n")
    _run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca_cert), "-CAkey", str(ca_key), "-CAcreateserial",
         "-out", str(cert), "-days", "1", "-extfile", str(ext))
    return key, cert


def start_slapd(folder: Path) -> RunningSlapd:
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca_cert = make_ca(folder, "test-ca")
    _, other_ca = make_ca(folder, "other-ca")
    server_key, server_cert = server_certificate(folder, ca_key, ca_cert)
    (folder / "data").mkdir()
    (folder / "slapd.d").mkdir()
    config = folder / "config.ldif"
    config.write_text(_config_ldif(folder, ca_cert, server_cert, server_key))
    _run("slapadd", "-n0", "-F", str(folder / "slapd.d"), "-l", str(config))
    port, tls_port = free_port(), free_port()
    process = subprocess.Popen(
        ["slapd", "-h", f"ldap://127.0.0.1:{port}/ ldaps://127.0.0.1:{tls_port}/", "-F", str(folder / "slapd.d"), "-d", "0"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    running = RunningSlapd(folder, port, tls_port, ca_cert, other_ca, process)
    try:
        _wait_for_port(port, process)
        (folder / "directory.ldif").write_text(_directory_ldif())
        _run("ldapadd", "-x", "-H", running.url, "-D", ADMIN_DN, "-w", ADMIN_PASSWORD, "-f", str(folder / "directory.ldif"))
    except BaseException:
        running.stop()
        raise
    return running


def _wait_for_port(port: int, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"slapd exited: {process.stderr.read().decode() if process.stderr else ''}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"slapd did not listen on 127.0.0.1:{port} within 10 s")


def _run(*command: str) -> str:
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:2])} failed: {done.stderr.strip()}")
    return done.stdout


def _hash(password: str) -> str:
    return _run("slappasswd", "-h", "{SSHA}", "-s", password).strip()


def _config_ldif(folder: Path, ca: Path, cert: Path, key: Path) -> str:
    schemas = "\n".join(f"include: file:///etc/ldap/schema/{name}.ldif" for name in ("core", "cosine", "nis", "inetorgperson"))
    return textwrap.dedent(f"""\
        dn: cn=config
        objectClass: olcGlobal
        cn: config
        olcTLSCACertificateFile: {ca}
        olcTLSCertificateFile: {cert}
        olcTLSCertificateKeyFile: {key}
        olcPidFile: {folder}/slapd.pid

        dn: cn=module{{0}},cn=config
        objectClass: olcModuleList
        cn: module{{0}}
        olcModulePath: /usr/lib/ldap
        olcModuleLoad: back_mdb
        olcModuleLoad: memberof

        dn: cn=schema,cn=config
        objectClass: olcSchemaConfig
        cn: schema

        """) + schemas + textwrap.dedent(f"""

        dn: olcDatabase={{-1}}frontend,cn=config
        objectClass: olcDatabaseConfig
        objectClass: olcFrontendConfig
        olcDatabase: {{-1}}frontend

        dn: olcDatabase={{0}}config,cn=config
        objectClass: olcDatabaseConfig
        olcDatabase: {{0}}config
        olcAccess: {{0}}to * by * none

        dn: olcDatabase={{1}}mdb,cn=config
        objectClass: olcDatabaseConfig
        objectClass: olcMdbConfig
        olcDatabase: {{1}}mdb
        olcSuffix: {SUFFIX}
        olcDbDirectory: {folder}/data
        olcRootDN: {ADMIN_DN}
        olcRootPW: {ADMIN_PASSWORD}
        olcAccess: {{0}}to attrs=userPassword by anonymous auth by * none
        olcAccess: {{1}}to * by users read by * none

        dn: olcOverlay={{0}}memberof,olcDatabase={{1}}mdb,cn=config
        objectClass: olcOverlayConfig
        objectClass: olcMemberOf
        olcOverlay: {{0}}memberof
        """)


def _person(uid: str, name: str, password: str | None) -> str:
    password_line = f"userPassword: {_hash(password)}\n" if password else ""
    return (f"dn: uid={uid},{PEOPLE}\nobjectClass: inetOrgPerson\nuid: {uid}\ncn: {name}\nsn: {name.split()[-1]}\n"
            f"{password_line}\n")


def _group(dn: str, *members: str) -> str:
    lines = "".join(f"member: uid={m},{PEOPLE}\n" for m in members)
    return f"dn: {dn}\nobjectClass: groupOfNames\ncn: {dn.split(',')[0][3:]}\n{lines}\n"


def _directory_ldif() -> str:
    return (
        f"dn: {SUFFIX}\nobjectClass: dcObject\nobjectClass: organization\ndc: example\no: Example Hospital\n\n"
        f"dn: {READER_DN}\nobjectClass: organizationalRole\nobjectClass: simpleSecurityObject\ncn: reader\n"
        f"userPassword: {_hash(READER_PASSWORD)}\n\n"
        f"dn: {PEOPLE}\nobjectClass: organizationalUnit\nou: people\n\n"
        f"dn: ou=groups,{SUFFIX}\nobjectClass: organizationalUnit\nou: groups\n\n"
        + _person("ann", "Ann Researcher", ANN_PASSWORD)
        + _person("audrey", "Audrey Auditor", AUDREY_PASSWORD)
        + _person("norole", "No Role", NOROLE_PASSWORD)
        + _person("dora", "Dora Disabled", None)
        + _group(RESEARCHERS, "ann", "dora")
        + _group(AUDITORS, "audrey")
        + _group(STAFF, "norole", "ann")
    )
