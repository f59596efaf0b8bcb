"""The security team's side of ATNA: a real rsyslog collector (TLS with client certificates, UDP)
and the DICOM PS3.15 A.5.1 schema checked with Debian's jing."""

from __future__ import annotations

import base64
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

from support.ldap import make_ca
from support.pacs import free_port

SCHEMA = Path(__file__).with_name("audit-message.rnc")
# What rsyslog parsed out of each RFC 5424 message, one line per message; the XML is one line.
TEMPLATE = "%protocol-version%|%syslogfacility%|%app-name%|%msgid%|%msg%\\n"


def have_tools() -> bool:
    """rsyslog with its GnuTLS driver (rsyslog-gnutls), jing and openssl."""
    return all(shutil.which(tool) for tool in ("rsyslogd", "jing", "openssl")) and any(
        Path("/usr/lib").glob("*/rsyslog/lmnsd_gtls.so"))


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_pki(folder: Path, name: str = "Test CA") -> Pki:
    """A CA, a server certificate for localhost / 127.0.0.1 and a client certificate (CN=client)."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca = make_ca(folder, name)
    certs = {}
    for who, san, usage in (("server", "DNS:localhost,IP:127.0.0.1", "serverAuth"), ("client", "DNS:client", "clientAuth")):
        key, csr, cert, ext = (folder / f"{who}.{suffix}" for suffix in ("key", "csr", "crt", "ext"))
        ext.write_text(f"subjectAltName={san}\nbasicConstraints=CA:FALSE\n"
                       f"keyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage={usage}\n")
        _run("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr),
             "-subj", "/CN=localhost" if who == "server" else "/CN=client")
        _run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial",
             "-out", str(cert), "-days", "1", "-extfile", str(ext))
        certs[who] = (cert, key)
    return Pki(ca, certs["server"][0], certs["server"][1], certs["client"][0], certs["client"][1])


def _run(*command: str) -> None:
    subprocess.run(command, check=True, capture_output=True, timeout=60)


@dataclass
class Message:
    version: str
    facility: str
    app_name: str
    msgid: str
    xml: str

    @property
    def root(self) -> ET.Element:
        return ET.fromstring(self.xml)

    @property
    def event_id(self) -> str:
        found = self.root.find("EventIdentification/EventID")
        assert found is not None
        return found.attrib["csd-code"]

    @property
    def outcome(self) -> str:
        found = self.root.find("EventIdentification")
        assert found is not None
        return found.attrib["EventOutcomeIndicator"]

    @property
    def seq(self) -> int:
        """The trail row the message copies (its last participant object)."""
        rows = [o for o in self.root.iter("ParticipantObjectIdentification")
                if (code := o.find("ParticipantObjectIDTypeCode")) is not None and code.attrib["csd-code"] == "audit-row"]
        assert len(rows) == 1, self.xml
        return int(rows[0].attrib["ParticipantObjectID"].rsplit(":", 1)[1])

    def objects(self, id_type: str) -> list[ET.Element]:
        return [o for o in self.root.iter("ParticipantObjectIdentification")
                if (code := o.find("ParticipantObjectIDTypeCode")) is not None and code.attrib["csd-code"] == id_type]

    def query(self) -> bytes | None:
        found = self.root.find("ParticipantObjectIdentification/ParticipantObjectQuery")
        return None if found is None or found.text is None else base64.b64decode(found.text)


@dataclass
class Collector:
    """One rsyslogd: a TLS input (client certificate CN=client required), UDP, and a plain TCP input for probing."""

    work: Path
    pki: Pki
    tls_port: int = field(default_factory=free_port)
    udp_port: int = field(default_factory=free_port)
    probe_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None

    @property
    def received(self) -> Path:
        return self.work / "received.log"

    def config(self) -> Path:
        conf = self.work / "rsyslog.conf"
        conf.write_text(f"""
global(workDirectory="{self.work}" maxMessageSize="64k"
       defaultNetstreamDriverCAFile="{self.pki.ca}"
       defaultNetstreamDriverCertFile="{self.pki.server_cert}"
       defaultNetstreamDriverKeyFile="{self.pki.server_key}")
module(load="imtcp")
module(load="imudp")
template(name="parsed" type="string" string="{TEMPLATE}")
ruleset(name="received") {{
  action(type="omfile" file="{self.received}" template="parsed")
}}
input(type="imtcp" address="127.0.0.1" port="{self.probe_port}" ruleset="received")
input(type="imtcp" address="127.0.0.1" port="{self.tls_port}" ruleset="received"
      streamDriver.name="gtls" streamDriver.mode="1" streamDriver.authMode="x509/name" permittedPeer=["client"])
input(type="imudp" address="127.0.0.1" port="{self.udp_port}" ruleset="received")
""")
        return conf

    def start(self) -> None:
        self.work.mkdir(parents=True, exist_ok=True)
        conf = self.config()
        self.process = subprocess.Popen(["rsyslogd", "-n", "-f", str(conf), "-i", str(self.work / "pid")],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.probe_port), timeout=1) as probe:
                    probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    stderr = self.process.stderr.read().decode() if self.process.stderr else ""
                    raise RuntimeError(f"rsyslogd did not start: {stderr}") from None
                time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            self.process.wait(timeout=10)
        if self.process is not None and self.process.stderr is not None:
            self.process.stderr.close()
        self.process = None

    def lines(self) -> list[str]:
        return self.received.read_text(encoding="utf-8").splitlines() if self.received.exists() else []

    def messages(self, count: int, timeout: float = 20.0) -> list[Message]:
        """The messages received once there are ``count`` (or the timeout passed)."""
        deadline = time.monotonic() + timeout
        while len(self.lines()) < count and time.monotonic() < deadline:
            time.sleep(0.05)
        parsed = []
        for line in self.lines():
            version, facility, app_name, msgid, msg = line.split("|", 4)
            parsed.append(Message(version, facility, app_name, msgid, msg.lstrip("\ufeff")))
        return parsed


def schema_errors(documents: list[str]) -> str:
    """jing's complaints about the documents (empty: every one is valid against PS3.15 A.5.1)."""
    with tempfile.TemporaryDirectory() as folder:
        paths = []
        for n, text in enumerate(documents):
            path = Path(folder) / f"message-{n}.xml"
            path.write_text(text, encoding="utf-8")
            paths.append(str(path))
        result = subprocess.run(["jing", "-c", str(SCHEMA), *paths], capture_output=True, text=True, timeout=120)
    errors = "\n".join(line for line in (result.stdout + result.stderr).splitlines() if "[warning]" not in line)
    return errors if result.returncode != 0 or errors else ""
