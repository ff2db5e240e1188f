"""How the client lays out text on a terminal: character widths, wrapping, the cursor's row."""

from __future__ import annotations

import pytest

from chatroom.terminal import rows_above_cursor, wrap


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
