"""The client's terminal: lines in from the user, lines out to the screen.

A pipe gets lines as they are; a terminal gets readline's line editing, a prompt that names
the user, received lines printed above the half-typed one, wrapped here with every row after
a line's first indented, and members' tags in colour.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import re
import sys
import threading
import unicodedata
import zlib
from collections.abc import Iterator, Mapping
from types import ModuleType
from typing import TextIO

from chatroom import protocol

# The prompt until the server says who the user is; then "LABEL> ".
PROMPT = "> "

# Starts every row of a received line after its first, which the client wraps itself: only a
# line's first row starts at column 0, so a member who pads a line to the reader's width
# cannot make the rest of it pass for a notice or another member's line.
CONTINUATION_INDENT = "  "


def prompt_for(label: str) -> str:
    """The prompt once the server has named the user: who is typing."""
    return f"{label}{PROMPT}"


class PlainTerminal:
    """Lines in from stdin and out to stdout, for pipes and files."""

    def read_line(self) -> str | None:
        """One line the user typed, without its newline; None at the end of input."""
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None

    def show(self, text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def set_prompt(self, prompt: str) -> None:
        """What the prompt says from now on; a pipe has none."""

    def finish(self) -> None:
        """Leaves the terminal ready for the closing line on stderr."""


# A control sequence (CSI: ESC [ parameters, intermediates, a final byte). No sanitised text
# holds an ESC, so every one in a line shown is the client's own: a colour, which takes no
# column on the screen.
_CONTROL_SEQUENCE = re.compile(r"\x1b\[[0-?]*[ -/]*[@-~]")
_PIECES = re.compile(_CONTROL_SEQUENCE.pattern + r"|.", re.DOTALL)
RESET = "\x1b[0m"  # every attribute back to normal: the end of every span coloured here


def char_width(char: str) -> int:
    """The columns a character takes on a terminal: two for East Asian wide and fullwidth ones,
    none for combining marks (they sit on the character before), one for the rest."""
    if unicodedata.category(char) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def piece_width(piece: str) -> int:
    """A character's width, or none for a control sequence."""
    return char_width(piece) if len(piece) == 1 else 0


def display_width(text: str) -> int:
    return sum(piece_width(piece) for piece in _PIECES.findall(text))


def wrap(text: str, width: int, indent: str = "") -> list[str]:
    """text cut into rows of at most width columns, as a terminal wraps it: a character that
    does not fit starts the next row (unless the row holds nothing else), which starts with
    indent. Control sequences take no column. A colour open at the end of a row is closed
    there and opened again after the next row's indent, so an indent is never coloured."""
    rows: list[str] = []
    row, column, start = "", 0, 0  # the row so far, its width, and where its text begins
    colour = ""  # the colour sequence in force, "" once RESET has ended it
    for piece in _PIECES.findall(text):
        width_of_piece = piece_width(piece)
        if column + width_of_piece > width and column > start:
            rows.append(row + RESET if colour else row)
            row, column = indent + colour, display_width(indent)
            start = column
        if len(piece) > 1 and piece.endswith("m"):
            colour = "" if piece == RESET else piece
        row += piece
        column += width_of_piece
    rows.append(row)
    return rows


def rows_above_cursor(text: str, width: int) -> int:
    """How many rows above the cursor text starts, once written from the start of a row of a
    terminal width columns wide: after a row filled exactly, readline puts the cursor on the
    next row."""
    rows = wrap(text, width)
    return len(rows) - 1 + (display_width(rows[-1]) >= width)


def as_readline_shows(typed: str) -> str:
    """The typed text as readline draws it: a control character as ^ and a letter (^[ for
    ESC, ^? for DEL), so a typed escape sequence is counted as the columns it takes."""
    if typed.isprintable():
        return typed
    return "".join(
        f"^{chr(ord(char) ^ 0x40)}" if ord(char) < 0x20 or char == "\x7f" else char
        for char in typed
    )


def terminal_width() -> int:
    """The terminal's width now, read for every line so that a resized terminal is followed:
    the size it reports itself ($COLUMNS can be stale), 80 if it reports none."""
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns or 80
    except OSError:
        return 80


# Members' colours: the terminal's standard foregrounds, bright and normal, red left out (it
# reads as an error) and so is plain white (it reads as no colour at all).
PALETTE = (32, 33, 34, 35, 36, 92, 93, 94, 95, 96)
# The user's own name or IP:PORT where someone else's line mentions it: bold, reversed.
MENTION = "\x1b[1;7m"


def wants_colour(environ: Mapping[str, str], stdout: TextIO) -> bool:
    """Colour only on a terminal, and never while NO_COLOR is set and not empty
    (https://no-color.org): a pipe gets the server's lines byte for byte."""
    return not environ.get("NO_COLOR") and stdout.isatty()


def colour_of(member_id: str) -> str:
    """A member's colour: the same for the same IP:PORT in every run and after every rename."""
    return f"\x1b[{PALETTE[zlib.crc32(member_id.encode()) % len(PALETTE)]}m"


class Painter:
    """Colours a member line's tag by its sender, and the user's own name and IP:PORT where
    another member's text mentions them. Called from the receiver thread alone."""

    def __init__(self) -> None:
        self._own_id: str | None = None  # the user's IP:PORT, once the server said it
        self._mention: re.Pattern[str] | None = None  # the user's name or IP:PORT in text

    def set_own_label(self, label: str) -> None:
        split = protocol.split_label(label)
        if split is None:
            return
        name, self._own_id = split
        # Whole words only: "ann" is not mentioned in "anna" or "ann-x", nor 1.2.3.4:5 in
        # 1.2.3.4:56. A name in any case: the room tells names apart without it.
        words = [rf"(?<![\w.:\[]){re.escape(self._own_id)}(?!\d)"]
        if name is not None:
            words.append(rf"(?<![\w-]){re.escape(name)}(?![\w-])")
        self._mention = re.compile("|".join(words), re.IGNORECASE)

    def paint(self, line: str) -> str:
        tag = protocol.sender_tag(line)
        if tag is None:
            return line
        text = line[tag.text_start :]
        if self._mention is not None and tag.member_id != self._own_id:
            text = self._mention.sub(lambda found: MENTION + found[0] + RESET, text)
        return "".join(
            (
                line[: tag.label_start],
                colour_of(tag.member_id),
                line[tag.label_start : tag.label_end],
                RESET,
                line[tag.label_end : tag.text_start],
                text,
            )
        )


class GnuReadline:
    """What Python's readline module leaves out, read through ctypes from the GNU readline it
    loaded: where the cursor is (rl_point), whether Enter was just pressed (rl_done), a new
    prompt for the line being read (rl_set_prompt), and a redraw of the prompt and line from
    scratch (rl_forced_update_display)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._point = ctypes.c_int.in_dll(library, "rl_point")  # a byte offset into the line
        self._done = ctypes.c_int.in_dll(library, "rl_done")
        self._line = ctypes.c_char_p.in_dll(library, "rl_line_buffer")
        self._set_prompt = library.rl_set_prompt
        self._set_prompt.argtypes = [ctypes.c_char_p]
        self._forced_update_display = library.rl_forced_update_display

    @classmethod
    def load(cls, module: ModuleType) -> GnuReadline | None:
        """None where the module is built on libedit, whose look-alikes behave differently, or
        the symbols cannot be found."""
        if "libedit" in (module.__doc__ or ""):
            return None
        try:
            return cls(ctypes.CDLL(module.__file__))
        except (OSError, ValueError, AttributeError):
            return None

    def typed_before_cursor(self) -> str:
        typed = (self._line.value or b"")[: self._point.value]
        return typed.decode(sys.stdin.encoding, errors="replace")  # as readline read the keys

    def line_accepted(self) -> bool:
        """Enter was pressed and readline moved to the next row: no prompt is on screen."""
        return bool(self._done.value)

    def set_prompt(self, prompt: str) -> None:
        """The prompt of the line being read, from its next redraw on (readline keeps a copy)."""
        self._set_prompt(prompt.encode(sys.stdout.encoding, errors="replace"))

    def redraw(self) -> None:
        """Draws the prompt and the line at the cursor, leaving the cursor at the user's place."""
        self._forced_update_display()


class InteractiveTerminal(PlainTerminal):
    """A terminal with readline line editing, where a line that arrives while the user types
    is printed above the prompt, and the prompt is drawn again with the half-typed text and
    the cursor where it was. A line wider than the terminal is wrapped here, with every row
    after its first indented.

    With GNU readline, readline redraws its own line, so the screen and readline agree on the
    text and the cursor, and a new prompt replaces the old one in place. Elsewhere (libedit)
    the prompt is redrawn here, the cursor is assumed at the end of the line, and a new prompt
    shows from the next line typed."""

    def __init__(self) -> None:
        import readline

        self._readline = readline
        self._gnu = GnuReadline.load(readline)
        # Held while readline draws the prompt, a line is shown, the prompt changes or is
        # erased; not while readline echoes a key, which happens inside readline with no hook
        # to take it.
        self._lock = threading.Lock()
        self._prompt_visible = False  # readline is reading keys behind a drawn prompt
        self._prompt = PROMPT  # the prompt wanted
        self._shown_prompt = PROMPT  # the prompt readline has, drawn while _prompt_visible
        readline.set_startup_hook(self._before_prompt)
        readline.set_pre_input_hook(self._after_prompt)

    def _before_prompt(self) -> None:
        self._lock.acquire()
        # The prompt may have changed since read_line() passed it to readline.
        if self._gnu is not None and self._shown_prompt != self._prompt:
            self._gnu.set_prompt(self._prompt)
            self._shown_prompt = self._prompt

    def _after_prompt(self) -> None:
        self._prompt_visible = True
        self._lock.release()

    def read_line(self) -> str | None:
        with self._lock:
            self._shown_prompt = prompt = self._prompt
        try:
            text: str | None = input(prompt)
        except EOFError:
            text = None
        with self._lock:
            self._prompt_visible = False
            # A line shown between Enter and here may have drawn a stale prompt: erase it.
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
        return text

    def show(self, text: str) -> None:
        rows = wrap(text, terminal_width(), CONTINUATION_INDENT)
        with self._lock:
            prompt_drawn = self._prompt_drawn()
            if prompt_drawn:
                self._erase_prompt()
            # Autowrap off meanwhile (DECAWM): a character the terminal draws wider than
            # char_width() counts it is cut at the right edge instead of starting a row.
            sys.stdout.write("\x1b[?7l" + "\n".join(rows) + "\n\x1b[?7h")
            sys.stdout.flush()
            if prompt_drawn:
                self._redraw_prompt()

    def set_prompt(self, prompt: str) -> None:
        with self._lock:
            self._prompt = prompt
            if self._gnu is None or not self._prompt_drawn():
                return  # the next prompt drawn is the new one
            self._erase_prompt()
            self._gnu.set_prompt(prompt)
            self._shown_prompt = prompt
            self._gnu.redraw()

    def _prompt_drawn(self) -> bool:
        return self._prompt_visible and not (self._gnu is not None and self._gnu.line_accepted())

    def _erase_prompt(self) -> None:
        """Clears every row the prompt and the typed line take, from the first one down."""
        if self._gnu is not None:
            before_cursor = self._gnu.typed_before_cursor()
        else:
            before_cursor = self._readline.get_line_buffer()
        shown = self._shown_prompt + as_readline_shows(before_cursor)
        up = rows_above_cursor(shown, terminal_width())
        sys.stdout.write("\r" + (f"\x1b[{up}A" if up else "") + "\x1b[J")

    def _redraw_prompt(self) -> None:
        if self._gnu is not None:
            self._gnu.redraw()
        else:
            sys.stdout.write(self._shown_prompt + self._readline.get_line_buffer())
            sys.stdout.flush()

    def finish(self) -> None:
        with self._lock:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()


@contextlib.contextmanager
def terminal_settings_restored() -> Iterator[None]:
    """Puts the terminal's settings back however the client ends: a Ctrl-C can come while
    readline, in the input thread, has the terminal in its own mode."""
    import termios

    saved = termios.tcgetattr(sys.stdin)
    try:
        yield
    finally:
        termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)
