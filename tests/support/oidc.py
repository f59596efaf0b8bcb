"""A real OpenID provider (npm ``oidc-provider``, tests/support/oidc/provider.js) on 127.0.0.1.

Its users (password: USERS[login].password):
  olivia   groups imaging-researchers            -> researcher
  alice    groups imaging-researchers            -> researcher (support.site makes "alice" a project lead)
  adam     groups imaging-researchers, it-admins -> admin (the strongest role wins)
  lars     groups imaging-researchers            -> researcher, with a 5000-character name
  nora     groups kitchen-staff                  -> no mi2b2 role: refused
  root     groups it-admins                      -> the name of mi2b2's break-glass account: refused

`scripts/setup.sh` runs `npm ci` in tests/support/oidc; a missing node_modules fails the test with that fix.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import httpx

from support.pacs import free_port

FOLDER = Path(__file__).parent / "oidc"
CLIENT_ID = "mi2b2-test"
CLIENT_SECRET = "a client secret only the tests know"
ROLES = {"imaging-researchers": "researcher", "it-admins": "admin"}
START_TIMEOUT = 20.0


@dataclass(frozen=True)
class ProviderUser:
    password: str
    name: str
    groups: tuple[str, ...]


USERS = {
    "olivia": ProviderUser("olivia-password-1", "Olivia Imaging", ("imaging-researchers", "staff")),
    "alice": ProviderUser("alice-password-1", "Alice Lead", ("imaging-researchers",)),
    "adam": ProviderUser("adam-password-1", "Adam Admin", ("imaging-researchers", "it-admins")),
    "lars": ProviderUser("lars-password-1", "L" * 5000, ("imaging-researchers",)),
    "nora": ProviderUser("nora-password-1", "Nora Norole", ("kitchen-staff",)),
    "root": ProviderUser("root-password-1", "Not The Break-Glass Root", ("it-admins",)),
}


@dataclass
class RunningProvider:
    port: int
    process: subprocess.Popen[bytes]
    log: Path
    tls: bool = False

    @property
    def issuer(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=5)


def start_provider(folder: Path, redirect_uris: list[str], post_logout_redirect_uris: list[str] | None = None,
                   port: int | None = None, id_token_claims: bool = False,
                   tls: tuple[Path, Path] | None = None) -> RunningProvider:
    """The provider on ``port`` (a free one if None), ready for logins once this returns; https with
    ``tls`` = (key file, certificate file)."""
    node = shutil.which("node")
    if node is None or not (FOLDER / "node_modules" / "oidc-provider").is_dir():
        raise RuntimeError(f"the test OpenID provider is not installed: run scripts/setup.sh (it installs Debian's "
                           f"nodejs and npm and runs `npm ci` in {FOLDER})")
    folder.mkdir(parents=True, exist_ok=True)
    settings = folder / "provider.json"
    settings.write_text(json.dumps({
        "client_id": CLIENT_ID, "client_secret": CLIENT_SECRET, "redirect_uris": redirect_uris,
        "post_logout_redirect_uris": post_logout_redirect_uris or [], "id_token_claims": id_token_claims,
        "tls": None if tls is None else {"key": str(tls[0]), "cert": str(tls[1])},
        "users": {login: {"password": u.password, "name": u.name, "groups": list(u.groups)} for login, u in USERS.items()},
    }))
    port = port or free_port()
    log = folder / "provider.log"
    process = subprocess.Popen([node, str(FOLDER / "provider.js"), str(port), str(settings)], cwd=FOLDER,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env={**os.environ, "NODE_ENV": "test"})
    running = RunningProvider(port, process, log, tls is not None)
    try:
        _wait_until_listening(process, log)
    except BaseException:
        running.stop()
        raise
    return running


def _wait_until_listening(process: subprocess.Popen[bytes], log: Path) -> None:
    """Read its output until the listening line; the rest goes on into the log file."""
    assert process.stdout is not None
    deadline = time.monotonic() + START_TIMEOUT
    seen = b""
    while b"listening on" not in seen:
        if time.monotonic() > deadline or process.poll() is not None:
            raise RuntimeError(f"the OpenID provider did not start: {seen.decode(errors='replace')}")
        ready, _, _ = select.select([process.stdout], [], [], 0.2)
        if ready:
            chunk = os.read(process.stdout.fileno(), 4096)
            seen += chunk
    log.write_bytes(seen)
    _drain(process.stdout, log)


def _drain(stream: IO[bytes], log: Path) -> None:
    """Keep the provider's later output flowing into its log, so that it never blocks on a full pipe."""

    def copy() -> None:
        with stream, log.open("ab") as out:
            for line in stream:
                out.write(line)
                out.flush()

    threading.Thread(target=copy, name="oidc-provider-log", daemon=True).start()


def browser_sign_in(client: httpx.Client, authorization_url: str, login: str, password: str) -> httpx.Response:
    """What a browser does at the provider: its login form, its consent form, until the provider sends it back
    to mi2b2. Returns the provider's last answer: the redirect to mi2b2, or the page it stopped at."""
    provider = authorization_url.split("/auth?")[0]
    answer = client.get(authorization_url)
    for _ in range(10):
        location = answer.headers.get("location", "")
        if answer.is_redirect and (location.startswith("/") or location.startswith(provider + "/")):
            answer = client.get(httpx.URL(str(answer.url)).join(location))
            continue
        if answer.status_code == 200 and 'name="prompt" value="login"' in answer.text:
            answer = client.post(str(answer.url), data={"prompt": "login", "login": login, "password": password})
            continue
        if answer.status_code == 200 and 'name="prompt" value="consent"' in answer.text:
            answer = client.post(str(answer.url), data={"prompt": "consent"})
            continue
        return answer
    raise AssertionError(f"the provider kept the browser going round: {answer.status_code} {answer.headers}")
