"""Anyone can join: the Java client, nc, socat and telnet, next to the Python client, as real
processes against the real server; and IPv6."""

from __future__ import annotations

import fcntl
import os
import pty
import select
import shutil
import signal
import socket
import struct
import subprocess
import termios
import time
import unicodedata

import pytest

from chatroom import __version__

from .conftest import (
    ROOT,
    WAIT_SECONDS,
    Room,
    Server,
    assert_client_prints_nothing_unsafe,
    closed_port,
)

JAVA_SOURCE = ROOT / "java" / "ChatRoomClient.java"


@pytest.fixture(scope="session")
def java_client(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The Java client compiled for Java 11 in a temporary folder: the command that runs it."""
    if shutil.which("javac") is None or shutil.which("java") is None:
        pytest.skip("needs a JDK: javac and java")
    build = tmp_path_factory.mktemp("java")
    subprocess.run(
        ["javac", "--release", "11", "-Xlint:all", "-Werror", "-d", str(build), str(JAVA_SOURCE)],
        check=True,
        timeout=120,
    )
    return ["java", "-cp", str(build), "ChatRoomClient"]


def test_the_java_client_chats_both_ways_with_a_python_client_and_leaves(
    room: Room, server: Server, java_client: list[str]
) -> None:
    python = room.client(server.port)
    java = room.client_from([*java_client, "--port", str(server.port)])
    assert java.stdout.lines[0] == f"* Welcome, {java.member_id}. Others here: 1"
    python.stdout.expect(f"* {java.member_id} joined")
    java.type_line("hello from Java ☕ 👋")
    assert python.stdout.expect("Java") == f"[{java.member_id}] hello from Java ☕ 👋"
    python.type_line("hello from Python 🐍")
    assert java.stdout.expect("Python") == f"[{python.member_id}] hello from Python 🐍"
    java.type_line("!Quit")
    assert java.wait_exit() == 0
    assert java.stdout.wait_ended()[-1] == f"* Goodbye, {java.member_id}"
    assert java.stderr.wait_ended() == []
    python.stdout.expect(f"* {java.member_id} left (quit)")


def test_the_java_client_leaves_at_the_end_of_input(
    room: Room, server: Server, java_client: list[str]
) -> None:
    python = room.client(server.port)
    java = room.client_from([*java_client, "--port", str(server.port)])
    java.close_stdin()
    assert java.wait_exit() == 0
    python.stdout.expect(f"* {java.member_id} left (quit)")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_java_client_told_to_stop_leaves_gracefully(
    room: Room, server: Server, java_client: list[str], signum: int
) -> None:
    python = room.client(server.port)
    java = room.client_from([*java_client, "--port", str(server.port)])
    python.stdout.expect(f"* {java.member_id} joined")
    java.proc.send_signal(signum)
    assert java.wait_exit() == 0
    python.stdout.expect(f"* {java.member_id} left (quit)")


def test_the_java_client_stopped_by_ctrl_c_again_and_again_never_prints_a_stack_trace(
    room: Room, server: Server, java_client: list[str]
) -> None:
    # Ctrl-C runs the shutdown hook while the main thread finishes the session: a race that
    # printed "Shutdown in progress" about twice in five runs. Eight runs, every one clean.
    for _ in range(8):
        java = room.client_from([*java_client, "--port", str(server.port)])
        java.proc.send_signal(signal.SIGINT)
        assert java.wait_exit() == 0
        assert java.stderr.wait_ended() == []
        assert java.stdout.wait_ended()[-1] == f"* Goodbye, {java.member_id}"


def test_the_java_client_says_in_one_line_that_the_server_is_gone(
    room: Room, server: Server, java_client: list[str]
) -> None:
    java = room.client_from([*java_client, "--port", str(server.port)])
    server.proc.kill()
    started = time.monotonic()
    assert java.wait_exit() == 1
    assert time.monotonic() - started < 2
    [line] = java.stderr.wait_ended()
    assert line in (
        "chatroom-client: the server closed the connection",
        "chatroom-client: connection lost: Connection reset",
    )


def test_the_java_client_against_a_closed_port_is_one_line_and_exit_1(
    room: Room, java_client: list[str]
) -> None:
    port = closed_port()
    java = room.run([*java_client, "--port", str(port)])
    assert java.wait_exit() == 1
    assert java.stderr.wait_ended() == [
        f"chatroom-client: cannot connect to 127.0.0.1:{port}: Connection refused"
    ]


@pytest.mark.parametrize(
    ("args", "status", "stream", "expected"),
    [
        (["--version"], 0, "stdout", f"chatroom-client {__version__} (Java)"),
        (["--port", "http"], 2, "stderr", "chatroom-client: error: argument --port: 'http' "),
        (["--colour"], 2, "stderr", "chatroom-client: error: unrecognized arguments: --colour"),
    ],
)
def test_the_java_client_flags(
    room: Room, java_client: list[str], args: list[str], status: int, stream: str, expected: str
) -> None:
    java = room.run([*java_client, *args])
    assert java.wait_exit() == status
    [line] = (java.stdout if stream == "stdout" else java.stderr).wait_ended()
    assert line.startswith(expected)


def test_the_java_client_prints_nothing_unsafe_whatever_the_server_sends(
    room: Room, java_client: list[str]
) -> None:
    assert_client_prints_nothing_unsafe(room, java_client)


# The tools already on everyone's machine

TOOLS = {
    "nc": lambda port: ["nc", "127.0.0.1", str(port)],
    "socat": lambda port: ["socat", "-", f"TCP:127.0.0.1:{port}"],
}


@pytest.mark.parametrize("tool", sorted(TOOLS))
def test_joining_chatting_and_leaving_with_a_plain_tcp_tool(
    room: Room, server: Server, tool: str
) -> None:
    if shutil.which(tool) is None:
        pytest.skip(f"needs {tool}")
    [member] = room.joined_members(server.port, 1)
    client = room.client_from(TOOLS[tool](server.port), send_join=True)
    assert member.read_line() == f"* {client.member_id} joined"
    client.type_line(f"hello from {tool}")
    assert member.read_line() == f"[{client.member_id}] hello from {tool}"
    member.say("hello back")
    client.stdout.expect(f"[{member.member_id}] hello back")
    client.type_line("!Quit")
    client.stdout.expect(f"* Goodbye, {client.member_id}")
    client.close_stdin()  # nc stays until its input ends, as after a Ctrl-D
    assert client.wait_exit() == 0
    assert member.read_line() == f"* {client.member_id} left (quit)"


class PseudoTerminal:
    """A program on a pseudo-terminal, as a person at a keyboard would run it."""

    def __init__(
        self, command: list[str], env: dict[str, str] | None = None, columns: int = 0
    ) -> None:
        self._master, slave = pty.openpty()
        if columns:  # else the terminal tells no size: 0 rows, 0 columns
            fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
        self.proc = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, start_new_session=True, env=env
        )
        os.close(slave)
        self.screen = ""  # everything the program wrote
        self._seen = 0  # how much of it expect() has looked at

    def type(self, keys: str) -> None:
        os.write(self._master, keys.encode())

    def expect(self, text: str) -> str:
        """Waits until text appears after what was expected last; gives what came before it."""
        deadline = time.monotonic() + WAIT_SECONDS
        while (found := self.screen.find(text, self._seen)) < 0:
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not select.select([self._master], [], [], remaining)[0]:
                raise AssertionError(f"never showed {text!r}: {self.screen!r}")
            try:
                self.screen += os.read(self._master, 4096).decode(errors="replace")
            except OSError:  # the program exited and the terminal closed
                raise AssertionError(f"ended before {text!r}: {self.screen!r}") from None
        before, self._seen = self.screen[self._seen : found], found + len(text)
        return before

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT_SECONDS)
        os.close(self._master)


def test_joining_chatting_and_leaving_with_telnet_on_a_terminal(room: Room, server: Server) -> None:
    if shutil.which("telnet") is None:
        pytest.skip("needs telnet")
    [member] = room.joined_members(server.port, 1)
    telnet = PseudoTerminal(["telnet", "127.0.0.1", str(server.port)])
    try:
        telnet.expect("Escape character is")
        telnet.type("!Join\r")  # Enter: telnet sends the line with \r\n
        telnet.expect("* Welcome, ")
        telnet_id = telnet.expect(". Others here")
        assert member.read_line() == f"* {telnet_id} joined"
        telnet.type("hello from telnet\r")
        assert member.read_line() == f"[{telnet_id}] hello from telnet"
        member.say("hello back")
        telnet.expect(f"[{member.member_id}] hello back")
        telnet.type("!Quit\r")
        telnet.expect(f"* Goodbye, {telnet_id}")
        telnet.expect("Connection closed by foreign host.")
        assert telnet.proc.wait(WAIT_SECONDS) == 0
        assert member.read_line() == f"* {telnet_id} left (quit)"
    finally:
        telnet.close()


def test_a_line_arriving_while_you_type_in_the_java_client_starts_a_row_of_its_own(
    room: Room, server: Server, java_client: list[str]
) -> None:
    [member] = room.joined_members(server.port, 1)
    java = PseudoTerminal([*java_client, "--port", str(server.port)])
    try:
        java.expect("* Welcome, ")
        java_id = java.expect(". Others here")
        assert member.read_line() == f"* {java_id} joined"
        java.type("hel")
        java.expect("hel")  # the terminal echoed it: it sits on the cursor's row
        member.say("hi there")
        between = java.expect(f"[{member.member_id}] hi there")
        assert between.replace("\r", "") == "\n", "glued onto the typed text"
        java.type("lo\r")
        assert member.read_line() == f"[{java_id}] hello"
        java.type("!Quit\r")
        java.expect(f"* Goodbye, {java_id}")
        assert java.proc.wait(WAIT_SECONDS) == 0
    finally:
        java.close()


def columns(text: str) -> int:
    """The columns a terminal gives text: two for each East Asian wide character."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


# The width comes from $COLUMNS first (the terminal says 100 here), else from the terminal.
WIDTHS = [({"COLUMNS": "80"}, 100, 80), ({}, 60, 60)]


@pytest.mark.parametrize(("variables", "terminal_width", "width"), WIDTHS, ids=["COLUMNS", "tty"])
@pytest.mark.parametrize("filler", [" ", "漢"])
def test_the_java_client_on_a_terminal_indents_every_row_a_line_wraps_onto(
    room: Room,
    server: Server,
    java_client: list[str],
    filler: str,
    variables: dict[str, str],
    terminal_width: int,
    width: int,
) -> None:
    # A member pads its line to the reader's width so that a fake notice would start a row of
    # its own, as if the server had sent it: on the terminal it must start indented instead.
    [member] = room.joined_members(server.port, 1)
    environment = {name: value for name, value in os.environ.items() if name != "COLUMNS"}
    java = PseudoTerminal(
        [*java_client, "--port", str(server.port)],
        env={**environment, **variables},
        columns=terminal_width,
    )
    try:
        java.expect("* Welcome, ")
        java_id = java.expect(". Others here")
        java.expect(": 1")
        assert member.read_line() == f"* {java_id} joined"
        prefix = f"[{member.member_id}] "
        text = filler * ((width - len(prefix)) // columns(filler)) + "* friend left (quit)"
        text += " and more" * 20  # and a third row
        member.say(text)
        member.say("done")
        rows = java.expect(f"{prefix}done").replace("\r", "").split("\n")
        first, *rest = [row for row in rows if row]
        assert first.startswith(prefix)
        assert len(rest) >= 2
        assert all(row.startswith("  ") for row in rest), rows
        assert all(columns(row) <= width for row in [first, *rest]), rows
        assert first + "".join(row[2:] for row in rest) == prefix + text
    finally:
        java.close()


# IPv6


def has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


needs_ipv6 = pytest.mark.skipif(not has_ipv6_loopback(), reason="no IPv6 loopback here")


@needs_ipv6
def test_members_join_over_ipv6_named_by_their_bracketed_address(room: Room) -> None:
    server = room.server("--host", "::1")
    assert server.stdout.lines[0] == f"listening on [::1]:{server.port}"
    member = room.member(server.port, host="::1")
    assert member.member_id.startswith("[::1]:")
    assert member.join() == f"* Welcome, {member.member_id}. Others here: 0"
    client = room.client(server.port, "--host", "::1")
    assert client.member_id.startswith("[::1]:")
    assert member.read_line() == f"* {client.member_id} joined"
    client.type_line("over IPv6")
    assert member.read_line() == f"[{client.member_id}] over IPv6"


@needs_ipv6
def test_a_dual_stack_server_names_ipv4_members_plainly_and_ipv6_ones_in_brackets(
    room: Room,
) -> None:
    server = room.server("--host", "::")
    v4 = room.member(server.port, host="127.0.0.1")
    v6 = room.member(server.port, host="::1")
    assert v4.join() == f"* Welcome, {v4.member_id}. Others here: 0"
    assert v4.member_id.startswith("127.0.0.1:")
    assert v6.join() == f"* Welcome, {v6.member_id}. Others here: 1"
    assert v4.read_line() == f"* {v6.member_id} joined"
