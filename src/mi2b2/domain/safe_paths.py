"""Names from outside (a manifest, a server's listing, a file) that are about to become paths.

A download's manifest is only as trustworthy as whoever made it: age does not
authenticate the sender, so anyone holding a researcher's public key can build
an encrypted download that decrypts cleanly. Every such name is checked here,
before anything is written, against what mi2b2 itself ever produces: a relative,
'/'-separated path of plain names inside the target folder.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

from mi2b2.errors import InvalidInput

MAX_PATH = 1024
MAX_PARTS = 16
_DRIVE = re.compile(r"^[A-Za-z]:")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def relative_name(name: object, what: str = "a file name") -> PurePosixPath:
    """``name`` as a relative POSIX path with no way out of the folder it is joined to.

    Refused (InvalidInput): not a string, empty, absolute, a drive (``C:``), a
    backslash, a NUL or other control character, a ``.`` or ``..`` part, an
    empty part (``a//b``), or absurdly long."""
    if not isinstance(name, str) or not name:
        raise InvalidInput(f"{what} is empty or not text; the download's listing is damaged or forged, "
                           "so it was refused and nothing was written")
    shown = repr(name[:120])
    problem = None
    if len(name) > MAX_PATH:
        problem = f"is longer than {MAX_PATH} characters"
    elif _CONTROL.search(name):
        problem = "holds a control character (NUL, newline, ...)"
    elif "\\" in name:
        problem = "holds a backslash"
    elif name.startswith("/"):
        problem = "is an absolute path"
    elif _DRIVE.match(name):
        problem = "names a drive"
    else:
        parts = name.split("/")
        if len(parts) > MAX_PARTS:
            problem = f"is more than {MAX_PARTS} folders deep"
        elif any(part in ("", ".", "..") for part in parts):
            problem = "has an empty, '.' or '..' part"
    if problem is not None:
        raise InvalidInput(f"{what} {shown}, which {problem}; mi2b2 writes only inside the folder you chose, "
                           "so this download was refused and nothing was written (it is damaged or forged: "
                           "anyone holding your public key can forge an encrypted download; do not use it)")
    return PurePosixPath(name)


def inside(root: Path, name: object, what: str = "a file name") -> Path:
    """``root / name`` once ``name`` passed ``relative_name`` and, with symbolic links resolved,
    still lies inside ``root`` (a link planted in the folder cannot lead the write elsewhere)."""
    relative = relative_name(name, what)
    base = Path(root).resolve()
    target = (base / relative).resolve()
    if target != base and base not in target.parents:
        raise InvalidInput(f"{what} {str(relative)[:120]!r} leads outside {root} (through a symbolic link); "
                           "nothing was written")
    return Path(root) / relative


def check_all(names: Iterable[object], what: str = "a file name") -> None:
    """Every name checked before the first write: a forged listing writes nothing at all."""
    for name in names:
        relative_name(name, what)
