"""Facts about processes on this host."""

from __future__ import annotations

import logging
import os
import socket
import traceback
from collections.abc import Callable
from typing import Any


def accepts_connections(host: str, port: int, timeout: float = 2.0) -> bool:
    """Whether something listens on ``host``:``port`` (a wildcard address means this host)."""
    address = "127.0.0.1" if host in ("", "0.0.0.0") else ("::1" if host == "::" else host)
    try:
        with socket.create_connection((address, port), timeout=timeout) as probe:
            probe.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            return True
    except OSError:
        return False


def die_with_parent() -> None:
    """For ``preexec_fn``: the child gets SIGKILL when its parent dies (Linux PR_SET_PDEATHSIG),
    so that a killed server or receiver parent leaves no process behind on its port."""
    import ctypes
    import signal

    libc = ctypes.CDLL("libc.so.6", use_errno=True)
    libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host (any owner)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


PRIVATE_UMASK = 0o077


def private_files() -> None:
    """Everything this process creates is readable by its owner only.

    The database, the cache, downloads and decrypted studies hold patient data;
    set once at every entry point (all of them go through `mi2b2.cli.main.run`)."""
    os.umask(PRIVATE_UMASK)


WITHHELD = "(message withheld from the log: it may carry patient data; the traceback shows where)"


def exception_text(error: BaseException) -> str:
    """A traceback with each exception's type and frames but never its message.

    Messages can carry whatever a PACS, a file or a database statement held
    (PatientID, names); logs are not access-controlled like the audit trail."""
    chain: list[BaseException] = []
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        chain.append(current)
        current = current.__cause__ or (None if current.__suppress_context__ else current.__context__)
    parts = []
    for index, exc in enumerate(reversed(chain)):
        if index:
            parts.append("\nThe above exception was the direct cause of the following exception:\n\n"
                         if exc.__cause__ is not None else
                         "\nDuring handling of the above exception, another exception occurred:\n\n")
        parts.append("Traceback (most recent call last):\n")
        parts.extend(traceback.format_tb(exc.__traceback__))
        parts.append(f"{type(exc).__module__}.{type(exc).__qualname__}: {WITHHELD}\n")
    return "".join(parts).rstrip("\n")


def withhold_exception_messages() -> None:
    """Every log record with an exception carries exception_text() in place of the usual traceback.

    Set on the record itself (its exc_text), so it holds for every handler,
    uvicorn's own included, whichever way the logging is configured."""
    make_record = logging.getLogRecordFactory()
    if isinstance(make_record, _RecordWithoutMessages):
        return
    logging.setLogRecordFactory(_RecordWithoutMessages(make_record))


class _RecordWithoutMessages:
    """A log record factory that wraps another and withholds exception messages (see above)."""

    def __init__(self, make_record: Callable[..., logging.LogRecord]) -> None:
        self._make_record = make_record

    def __call__(self, *args: Any, **kwargs: Any) -> logging.LogRecord:
        record = self._make_record(*args, **kwargs)
        if record.exc_info and record.exc_info[1] is not None:
            record.exc_text = exception_text(record.exc_info[1])
        return record
