"""How the command line fits a table into a terminal: leading columns whole, the rest named."""

from __future__ import annotations

from mi2b2.cli.common import fitting_columns

COLUMNS = ["id", "state", "accession", "study_uid"]
CELLS = [["1", "completed", "ACC-1001", "1.2.826.0.1.3680043.8.498." + "1" * 38]]


def test_every_column_fits_a_wide_terminal() -> None:
    assert fitting_columns(COLUMNS, CELLS, 200) == 4


def test_a_narrow_terminal_drops_trailing_columns_not_leading_ones() -> None:
    # id (2) + state (9) + accession (9), each with 3 of padding and border, plus 1: 30 characters.
    assert fitting_columns(COLUMNS, CELLS, 30) == 3
    assert fitting_columns(COLUMNS, CELLS, 29) == 2


def test_two_columns_are_shown_however_narrow() -> None:
    assert fitting_columns(COLUMNS, CELLS, 5) == 2


def test_a_long_value_counts_only_up_to_the_widest_cell() -> None:
    # The UID may wrap after 40 characters, so 30 + 43 = 73 characters show all four.
    assert fitting_columns(COLUMNS, CELLS, 73) == 4
    assert fitting_columns(COLUMNS, CELLS, 72) == 3


def test_no_rows_measures_the_headers() -> None:
    assert fitting_columns(COLUMNS, [], 200) == 4
    assert fitting_columns(["a-long-header", "b", "c"], [], 10) == 2
