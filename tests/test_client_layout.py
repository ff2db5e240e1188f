"""How the client lays out text on a terminal: character widths, wrapping, the cursor's row."""

from __future__ import annotations

import pytest

from chatroom.terminal import as_readline_shows, rows_above_cursor, wrap


@pytest.mark.parametrize(
    ("text", "width", "rows"),
    [
        ("abcdef", 6, ["abcdef"]),  # a row may fill the width exactly
        ("abcdefg", 6, ["abcdef", "  g"]),
        ("abcdefghijklm", 6, ["abcdef", "  ghij", "  klm"]),
        ("ab中文字", 6, ["ab中文", "  字"]),  # wide characters take two columns
        ("abc中文", 6, ["abc中", "  文"]),  # one that does not fit starts the next row
        ("ae\u0301iou\u0301x", 6, ["ae\u0301iou\u0301x"]),  # combining marks take none
        ("中中中", 2, ["中", "  中", "  中"]),  # too narrow for the indent: still one a row
    ],
)
def test_wrap_indents_every_row_after_the_first(text: str, width: int, rows: list[str]) -> None:
    assert wrap(text, width, "  ") == rows


@pytest.mark.parametrize(
    ("text", "width", "rows_above"),
    [("> ab", 6, 0), ("> abcd", 6, 1), ("> abcdefg", 6, 1), ("> 中文字", 6, 1), ("> a中文", 6, 1)],
)
def test_rows_above_cursor_as_readline_wraps(text: str, width: int, rows_above: int) -> None:
    assert rows_above_cursor(text, width) == rows_above


@pytest.mark.parametrize(
    ("text", "rows"),
    [
        # Colours take no column: the row still holds six characters.
        ("\x1b[32mab\x1b[0mcdefg", ["\x1b[32mab\x1b[0mcdef", "  g"]),
        # A colour open at a row's end is closed there and opened again after the indent.
        ("ab\x1b[1;7mcdefgh\x1b[0mi", ["ab\x1b[1;7mcdef\x1b[0m", "  \x1b[1;7mgh\x1b[0mi"]),
        ("abcdef\x1b[32mgh\x1b[0m", ["abcdef\x1b[32m\x1b[0m", "  \x1b[32mgh\x1b[0m"]),
    ],
)
def test_wrap_counts_colours_as_no_columns_and_never_colours_an_indent(
    text: str, rows: list[str]
) -> None:
    assert wrap(text, 6, "  ") == rows


def test_rows_above_cursor_counts_colours_as_no_columns() -> None:
    assert rows_above_cursor("\x1b[1m> \x1b[0mab", 6) == 0


def test_a_typed_control_character_counts_as_readline_draws_it() -> None:
    # readline draws a typed ESC as ^[: "[31m" after it is text, not a colour.
    assert as_readline_shows("\x1b[31ma\x7f") == "^[[31ma^?"
    assert rows_above_cursor("> " + as_readline_shows("\x1b[31mab"), 6) == 1
