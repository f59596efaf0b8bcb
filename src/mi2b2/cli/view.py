"""`mi2b2 view PATH`: the viewer page on a download, served to this machine only.

The server listens on 127.0.0.1 on a free port, answers only under a random
token that is part of the printed URL (other local users and web pages cannot
guess it), says ``Cache-Control: no-store`` on every answer, and keeps
decrypted images in memory: nothing is written to disk.
"""

from __future__ import annotations

import secrets
import socket
import webbrowser
from pathlib import Path
from typing import Annotated

import typer

from mi2b2.cli.download import PASSPHRASE_ENV, PassphraseFile, ask_passphrase
from mi2b2.errors import InvalidInput

PassphraseFlag = Annotated[bool, typer.Option(
    "--passphrase", help=f"the download's passphrase (asked for, or taken from ${PASSPHRASE_ENV})")]


def view(
    path: Annotated[Path, typer.Argument(help="a download: its folder or ZIP, plain or encrypted by mi2b2")],
    passphrase: PassphraseFlag = False,
    passphrase_file: PassphraseFile = None,
    identities: Annotated[list[Path] | None, typer.Option(
        "--identity", "-i", help="private key file of an encrypted download (age or SSH key); repeatable")] = None,
    open_browser: Annotated[bool, typer.Option("--open", help="open the viewer in the default browser")] = False,
    port: Annotated[int, typer.Option(help="port on 127.0.0.1 (0: any free one)", min=0, max=65535)] = 0,
) -> None:
    """View the images of a download in the browser, served on 127.0.0.1 only; Ctrl-C stops it."""
    import uvicorn

    from mi2b2.api.routers.viewer import create_local_app
    from mi2b2.services.viewer import LocalLibrary, open_local

    secret = ask_passphrase(passphrase, passphrase_file, confirm=False)
    source = open_local(path, secret, [str(i) for i in identities or []])
    try:
        print(f"reading {path} ...", flush=True)
        library = LocalLibrary(source)
        if not library.instances:
            raise InvalidInput(f"no DICOM images found in {path}; give the folder or ZIP `mi2b2 download` made")
        listener = _listen(port)
        bound = listener.getsockname()[1]
        token = secrets.token_urlsafe(24)
        url = f"http://127.0.0.1:{bound}/{token}/"
        app = create_local_app(library, token, allowed_hosts={f"127.0.0.1:{bound}", f"localhost:{bound}"})
        studies = len({i.study_uid for i in library.instances.values()})
        # Printed, never logged: the URL is the key to these images for as long as this runs.
        print(f"{len(library.instances)} images of {studies} studies; viewer at {url}", flush=True)
        print("only this machine can reach it, and only with that URL; press Ctrl-C to stop", flush=True)
        if open_browser:
            webbrowser.open(url)
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off"))
        server.run(sockets=[listener])
    finally:
        close = getattr(source, "close", None)
        if close is not None:
            close()


def _listen(port: int) -> socket.socket:
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(("127.0.0.1", port))
    except OSError as exc:
        listener.close()
        raise InvalidInput(f"cannot listen on 127.0.0.1:{port} ({exc.strerror}); "
                           "leave out --port to take any free one") from None
    listener.listen(64)
    return listener
