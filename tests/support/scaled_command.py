"""The `mi2b2` command with its scheduler clock running faster than the wall, for tests that
run workers, receivers and the server as separate processes and watch per-minute limits.

    python -m support.scaled_command SPEED ORIGIN_MONOTONIC START_ISO -- worker --config site.toml

Every process given the same three values agrees on the time (see ``mi2b2.testing.ScaledClock``).
Only the clock differs from `mi2b2`: the command, its configuration and its code are the real ones.
"""

from __future__ import annotations

import sys
from datetime import datetime
from typing import Any

from mi2b2.services import context
from mi2b2.testing import ScaledClock


def main(argv: list[str]) -> None:
    speed, origin, start, separator, *command = argv
    if separator != "--":
        raise SystemExit("usage: python -m support.scaled_command SPEED ORIGIN_MONOTONIC START_ISO -- COMMAND...")
    scaled = ScaledClock(float(speed), datetime.fromisoformat(start), float(origin))
    real_build = context.build_context

    def build_context(config: Any, clock: Any = None, *args: Any, **kwargs: Any) -> context.ServiceContext:
        return real_build(config, clock or scaled, *args, **kwargs)

    # Before the command imports it: `mi2b2.server` binds build_context when first imported.
    context.build_context = build_context  # type: ignore[assignment]
    from mi2b2.cli.main import run

    sys.argv = ["mi2b2", *command]
    run()


if __name__ == "__main__":
    main(sys.argv[1:])
