from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # tests/support helpers

from collections.abc import Iterator

import pytest

from support.databases import fresh_database, postgres_available


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def database_url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """Each database test runs against both SQLite and a real PostgreSQL server."""
    if request.param == "postgres" and not postgres_available():
        pytest.fail("PostgreSQL is not reachable on 127.0.0.1:5432; start it (scripts/test.sh does)")
    with fresh_database(request.param, tmp_path) as url:
        yield url


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    from support.summary import SECTIONS

    for title, lines in SECTIONS.items():
        terminalreporter.section(title)
        for line in lines:
            terminalreporter.write_line(line)
