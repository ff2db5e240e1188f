"""The client in a real terminal (tmux): typing is never garbled by lines arriving."""

from __future__ import annotations

import itertools
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from typing import Callable

import pytest

from .conftest import ROOT, WAIT_SECONDS, Member, Room, Server

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")

_sessions = itertools.count()


class Tmux:
    """A private tmux server holding one shell, driven by keystrokes and read off the screen."""

    def __init__(self) -> None:
        self.socket_name = f"chatroom-test-{os.getpid()}-{next(_sessions)}"
        shell = "env -i PATH=/usr/bin:/bin TERM=xterm PS1='$ ' bash --norc --noprofile"
        self._tmux("new-session", "-d", "-x", "120", "-y", "30", shell)

    def _tmux(self, *args: str) -> str:
        done = subprocess.run(
            ["tmux", "-L", self.socket_name, *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=WAIT_SECONDS,
        )
        return done.stdout

    def resize(self, columns: int) -> None:
        self._tmux("resize-window", "-x", str(columns))

    def type(self, text: str) -> None:
        self._tmux("send-keys", "-l", text)

    def press(self, key: str) -> None:
        self._tmux("send-keys", key)

    def screen(self) -> list[str]:
        return self._tmux("capture-pane", "-p").rstrip("\n").split("\n")

    def screen_with_colours(self) -> list[str]:
        """The screen with tmux's escape sequences for each cell's colour and attributes."""
        return self._tmux("capture-pane", "-e", "-p").rstrip("\n").split("\n")

    def wait_for_screen(self, shows: Callable[[list[str]], bool], what: str) -> list[str]:
        """A screen has no event to wait on, so this is a bounded retry."""
        deadline = time.monotonic() + WAIT_SECONDS
        while True:
            screen = self.screen()
            if shows(screen):
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"screen never showed {what}:\n" + "\n".join(screen))
            time.sleep(0.05)

    def kill(self) -> None:
        subprocess.run(["tmux", "-L", self.socket_name, "kill-server"], capture_output=True)


@pytest.fixture
def tmux() -> Iterator[Tmux]:
    terminal = Tmux()
    try:
        yield terminal
    finally:
        terminal.kill()


SGR = re.compile(r"\x1b\[([0-9;]*)m")


def without_colours(row: str) -> str:
    return SGR.sub("", row)


def attributes_before(row: str, text: str) -> set[str]:
    """The parameters of the escape sequences right before text's first place in row."""
    before = row[: row.index(text)]
    run = re.search(r"(?:\x1b\[[0-9;]*m)*\Z", before)
    assert run is not None
    return {code for params in SGR.findall(run.group()) for code in params.split(";")}


def last_line(screen: list[str]) -> str:
    rows = [row for row in screen if row.strip()]
    return rows[-1] if rows else ""


def start_client(tmux: Tmux, port: int, *args: str, environment: str = "") -> None:
    """Starts the client in the terminal's shell, with environment variables ("NAME=value")."""
    tmux.wait_for_screen(lambda screen: last_line(screen) == "$", "the shell prompt")
    command = [sys.executable, str(ROOT / "chatroom_client.py"), "--port", str(port), *args]
    tmux.type(f"{environment} {shlex.join(command)}".strip())
    tmux.press("Enter")


class FakeServer:
    """A listening socket the test speaks for, byte by byte, to show the client any line."""

    def __init__(self) -> None:
        self._listener = socket.create_server(("127.0.0.1", 0))
        self._listener.settimeout(WAIT_SECONDS)
        self.port: int = self._listener.getsockname()[1]
        self._conn: socket.socket | None = None
        self._received = b""

    def accept(self) -> None:
        self._conn, _ = self._listener.accept()
        self._conn.settimeout(WAIT_SECONDS)

    def send(self, *lines: str) -> None:
        assert self._conn is not None
        self._conn.sendall("".join(line + "\n" for line in lines).encode())

    def read_line(self) -> str:
        assert self._conn is not None
        while b"\n" not in self._received:
            data = self._conn.recv(4096)
            assert data, f"the client closed the connection after {self._received!r}"
            self._received += data
        line, self._received = self._received.split(b"\n", 1)
        return line.decode()

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
        self._listener.close()


@pytest.fixture
def fake_server() -> Iterator[FakeServer]:
    server = FakeServer()
    try:
        yield server
    finally:
        server.close()


def start_client_beside(
    room: Room, server: Server, tmux: Tmux, environment: str = ""
) -> tuple[Member, str]:
    """Joins a raw member, then starts the client in the terminal; gives the member and the
    client's identifier, read from the join notice the member received, once the client's
    prompt shows it."""
    other = room.member(server.port)
    other.join()
    start_client(tmux, server.port, environment=environment)
    joined = re.fullmatch(r"\* (\S+) joined", other.read_line())
    assert joined
    client_id = joined.group(1)
    tmux.wait_for_screen(lambda screen: last_line(screen) == f"{client_id}>", "the prompt")
    return other, client_id


def test_lines_arriving_while_typing_leave_the_half_typed_text_intact(
    room: Room, server: Server, tmux: Tmux
) -> None:
    other, client_id = start_client_beside(room, server, tmux)
    tmux.type("half typed")
    tmux.wait_for_screen(
        lambda screen: last_line(screen) == f"{client_id}> half typed", "the typing"
    )
    for word in ("first", "second", "third"):
        other.say(f"{word} message")
    screen = tmux.wait_for_screen(
        lambda screen: f"[{other.member_id}] third message" in screen, "three messages"
    )
    rows = [row for row in screen if row.strip()]
    assert rows[-4:] == [
        f"[{other.member_id}] first message",
        f"[{other.member_id}] second message",
        f"[{other.member_id}] third message",
        f"{client_id}> half typed",
    ]

    tmux.type(" and finished")
    tmux.press("Enter")
    assert other.read_line() == f"[{client_id}] half typed and finished"


def test_ctrl_c_leaves_quickly_and_the_terminal_stays_sane(
    room: Room, server: Server, tmux: Tmux
) -> None:
    other, client_id = start_client_beside(room, server, tmux)
    tmux.type("abandoned")
    started = time.monotonic()
    tmux.press("C-c")
    assert other.read_line() == f"* {client_id} left (quit)"
    tmux.wait_for_screen(lambda screen: last_line(screen) == "$", "the shell prompt again")
    assert time.monotonic() - started < 2
    tmux.type("stty -a | tr ' ;' '\\n\\n' | grep -x -e echo -e icanon -e -echo -e -icanon")
    tmux.press("Enter")
    screen = tmux.wait_for_screen(lambda screen: last_line(screen) == "$", "stty's answer")
    assert [row for row in screen if row.strip()][-3:] == ["icanon", "echo", "$"]


def test_a_line_arriving_keeps_the_cursor_where_the_user_left_it(
    room: Room, server: Server, tmux: Tmux
) -> None:
    other, client_id = start_client_beside(room, server, tmux)
    tmux.type("hello world")
    tmux.wait_for_screen(
        lambda screen: last_line(screen) == f"{client_id}> hello world", "the typing"
    )
    for _ in range(5):
        tmux.press("Left")
    other.say("news")
    tmux.wait_for_screen(lambda screen: f"[{other.member_id}] news" in screen, "the news")
    tmux.type("XY")
    # What the screen shows is what will be sent: the cursor stayed before "world".
    screen = tmux.wait_for_screen(
        lambda screen: last_line(screen) == f"{client_id}> hello XYworld", "XY before world"
    )
    assert [row for row in screen if row.strip()][-2:] == [
        f"[{other.member_id}] news",
        f"{client_id}> hello XYworld",
    ]
    tmux.press("Enter")
    assert other.read_line() == f"[{client_id}] hello XYworld"


def test_a_typed_line_wider_than_the_terminal_is_redrawn_whole_and_once(
    room: Room, server: Server, tmux: Tmux
) -> None:
    other, client_id = start_client_beside(room, server, tmux)
    typed = " ".join(f"{n:03d}-word" for n in range(20))  # 179 columns: two rows of 120
    tmux.type(typed)
    prompt = f"{client_id}> "
    prompt_rows = [prompt + typed[: 120 - len(prompt)], typed[120 - len(prompt) :]]
    tmux.wait_for_screen(lambda screen: screen[-2:] == prompt_rows, "the typing on two rows")
    for word in ("first", "second"):
        other.say(f"{word} message")
    screen = tmux.wait_for_screen(
        lambda screen: f"[{other.member_id}] second message" in screen, "both messages"
    )
    rows = [row for row in screen if row.strip()]
    assert rows[-4:] == [
        f"[{other.member_id}] first message",
        f"[{other.member_id}] second message",
        *prompt_rows,
    ]
    assert sum(row.startswith(prompt + "000-word") for row in screen) == 1  # no stale first row
    tmux.press("Enter")
    assert other.read_line() == f"[{client_id}] {typed}"


def test_padding_to_the_width_cannot_make_part_of_a_line_pass_for_a_line(
    room: Room, server: Server, tmux: Tmux
) -> None:
    tmux.resize(80)
    other, _ = start_client_beside(room, server, tmux)
    padding = " " * (80 - len(f"[{other.member_id}] "))  # the rest of the first row
    fakes = ["* friend left (quit)", "[friend] admin here: run: curl x | sh"]
    for fake in fakes:
        other.say(padding + fake)
    screen = tmux.wait_for_screen(
        lambda screen: any(fakes[-1] in row for row in screen), "the padded lines"
    )
    # Each shows on a row of its own, but indented: never at column 0, where lines start.
    assert [row for row in screen if "friend" in row] == ["  " + fake for fake in fakes]


def test_characters_the_terminal_draws_wider_than_counted_cannot_start_a_row_either(
    room: Room, server: Server, tmux: Tmux
) -> None:
    tmux.resize(80)
    other, _ = start_client_beside(room, server, tmux)
    # U+4DC0 is one column to Python's width table and two to glibc's wcwidth, which tmux
    # uses: counted, the line fits in one row; drawn, the hexagrams fill the row exactly.
    columns_left = 80 - len(f"[{other.member_id}] ")
    padding = " " * (columns_left % 2) + "\u4dc0" * (columns_left // 2)
    other.say(padding + "* friend left (quit)")
    other.say("after")
    screen = tmux.wait_for_screen(
        lambda screen: f"[{other.member_id}] after" in screen, "the line after"
    )
    assert not [row for row in screen if row.startswith("* friend")]


def test_the_prompt_names_the_user_and_changes_in_place_keeping_the_typed_line(
    fake_server: FakeServer, tmux: Tmux
) -> None:
    start_client(tmux, fake_server.port)
    fake_server.accept()
    assert fake_server.read_line() == "!Join"
    tmux.wait_for_screen(lambda screen: last_line(screen) == ">", "the prompt before the welcome")
    tmux.type("hello world")
    tmux.wait_for_screen(lambda screen: last_line(screen) == "> hello world", "the typing")
    for _ in range(5):
        tmux.press("Left")
    fake_server.send("* Welcome, 127.0.0.1:5000. Others here: 0")
    tmux.wait_for_screen(
        lambda screen: last_line(screen) == "127.0.0.1:5000> hello world", "the address"
    )
    fake_server.send("* You are now ann@127.0.0.1:5000")
    tmux.wait_for_screen(
        lambda screen: last_line(screen) == "ann@127.0.0.1:5000> hello world", "the name"
    )
    tmux.type("XY")  # the cursor stayed before "world"
    screen = tmux.wait_for_screen(
        lambda screen: last_line(screen).endswith("XYworld"), "XY typed before world"
    )
    assert [row for row in screen if row.strip()][-3:] == [
        "* Welcome, 127.0.0.1:5000. Others here: 0",
        "* You are now ann@127.0.0.1:5000",
        "ann@127.0.0.1:5000> hello XYworld",
    ]
    tmux.press("Enter")
    assert fake_server.read_line() == "hello XYworld"


def test_a_member_line_cannot_change_the_prompt(fake_server: FakeServer, tmux: Tmux) -> None:
    start_client(tmux, fake_server.port)
    fake_server.accept()
    fake_server.send("* Welcome, 127.0.0.1:5000. Others here: 1")
    tmux.wait_for_screen(lambda screen: last_line(screen) == "127.0.0.1:5000>", "the address")
    fake_server.send("[127.0.0.1:6000] * You are now admin@127.0.0.1:5000", "[127.0.0.1:6000] ok")
    screen = tmux.wait_for_screen(
        lambda screen: "[127.0.0.1:6000] ok" in screen, "the member's lines"
    )
    assert last_line(screen) == "127.0.0.1:5000>"


def test_names_are_in_colour_and_the_user_s_own_is_picked_out_with_the_typed_line_intact(
    room: Room, server: Server, tmux: Tmux
) -> None:
    other, client_id = start_client_beside(room, server, tmux)
    tmux.type("half typed")
    tmux.wait_for_screen(lambda screen: last_line(screen) == f"{client_id}> half typed", "typing")
    other.say(f"hi {client_id}!")
    said = f"[{other.member_id}] hi {client_id}!"
    tmux.wait_for_screen(lambda screen: said in screen, "the line")
    [row] = [row for row in tmux.screen_with_colours() if without_colours(row) == said]
    colour = attributes_before(row, other.member_id)
    assert colour & {"32", "33", "34", "35", "36", "92", "93", "94", "95", "96"}, repr(row)
    assert "7" in attributes_before(row, client_id), repr(row)  # reversed
    screen = tmux.screen()
    assert [row for row in screen if row.strip()][-2:] == [said, f"{client_id}> half typed"]
    tmux.press("Enter")
    assert other.read_line() == f"[{client_id}] half typed"


def test_no_color_set_turns_every_colour_off(room: Room, server: Server, tmux: Tmux) -> None:
    other, client_id = start_client_beside(room, server, tmux, environment="NO_COLOR=1")
    other.say(f"hi {client_id}!")
    said = f"[{other.member_id}] hi {client_id}!"
    tmux.wait_for_screen(lambda screen: said in screen, "the line")
    assert said in tmux.screen_with_colours()  # not one escape sequence in the row


def test_a_coloured_line_wraps_at_the_width_and_no_indent_is_coloured(
    room: Room, server: Server, tmux: Tmux
) -> None:
    tmux.resize(80)
    other, client_id = start_client_beside(room, server, tmux)
    padding = "x" * (80 - len(f"[{other.member_id}] ") - 6) + " "  # the name crosses the edge
    other.say(padding + client_id)
    rows = [f"[{other.member_id}] {padding}{client_id[:5]}", "  " + client_id[5:]]
    tmux.wait_for_screen(lambda screen: rows[-1] in screen, "the wrapped line")
    coloured = tmux.screen_with_colours()
    first = [n for n, row in enumerate(coloured) if without_colours(row) == rows[0]]
    assert first, coloured
    assert without_colours(coloured[first[0] + 1]) == rows[1]
    assert "7" in attributes_before(coloured[first[0] + 1], client_id[5:])
    # The indent is plain: tmux may put resets before it, nothing else.
    assert attributes_before(coloured[first[0] + 1], "  ") <= {"", "0", "39", "49"}


def test_with_a_name_the_prompt_ends_up_naming_the_user(
    room: Room, server: Server, tmux: Tmux
) -> None:
    other = room.member(server.port)
    other.join()
    start_client(tmux, server.port, "--name", "alice")
    joined = re.fullmatch(r"\* (\S+) joined", other.read_line())
    assert joined
    client_id = joined.group(1)
    assert other.read_line() == f"* {client_id} is now alice@{client_id}"
    tmux.wait_for_screen(lambda screen: last_line(screen) == f"alice@{client_id}>", "the name")
    tmux.type("hello")
    tmux.press("Enter")
    assert other.read_line() == f"[alice@{client_id}] hello"


def test_a_longer_prompt_that_wraps_the_typed_line_leaves_no_stale_row(
    fake_server: FakeServer, tmux: Tmux
) -> None:
    start_client(tmux, fake_server.port)
    fake_server.accept()
    tmux.wait_for_screen(lambda screen: last_line(screen) == ">", "the prompt before the welcome")
    typed = " ".join(f"{n:03d}-word" for n in range(13))  # 116 columns: one row of 120 with "> "
    tmux.type(typed)
    tmux.wait_for_screen(lambda screen: last_line(screen) == "> " + typed, "the typing")
    prompt = "alice@127.0.0.1:5000> "
    prompt_rows = [prompt + typed[: 120 - len(prompt)], typed[120 - len(prompt) :]]
    fake_server.send("* Welcome, alice@127.0.0.1:5000. Others here: 1")
    tmux.wait_for_screen(lambda screen: screen[-2:] == prompt_rows, "the prompt over two rows")
    fake_server.send("[1.2.3.4:5] hi")
    screen = tmux.wait_for_screen(lambda screen: "[1.2.3.4:5] hi" in screen, "the line")
    assert [row for row in screen if row.strip()][-4:] == [
        "* Welcome, alice@127.0.0.1:5000. Others here: 1",
        "[1.2.3.4:5] hi",
        *prompt_rows,
    ]
    tmux.press("Enter")
    fake_server.read_line()  # !Join
    assert fake_server.read_line() == typed
