"""The supervisor of `mi2b2 receiver --processes N`: when it gives up restarting, how it names an exit."""

from __future__ import annotations

import signal
from pathlib import Path

from mi2b2.receiver_processes import RESTARTS_ALLOWED, Port, ReceiverProcesses, _how


def test_a_child_dying_over_and_over_stops_the_restarts() -> None:
    parent = ReceiverProcesses(Path("mi2b2.toml"), Port("MI2B2", "127.0.0.1", 11112), Path("cache"), 2)
    allowed = [parent._may_restart() for _ in range(RESTARTS_ALLOWED + 1)]
    assert allowed == [True] * RESTARTS_ALLOWED + [False]


def test_exits_are_named_by_code_or_signal() -> None:
    assert _how(-signal.SIGKILL) == "signal SIGKILL"
    assert _how(1) == "code 1"
