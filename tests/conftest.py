"""Real processes and real loopback sockets, and waits that end on a condition or a deadline."""

from __future__ import annotations

import os
import re
import resource
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Callable, TypeVar

import pytest

from .payloads import BIDI_CONTROLS, ESCAPE_SEQUENCES, INVALID_UTF8

ROOT = Path(__file__).resolve().parent.parent

# How long any single wait may take before the test fails; generous for a loaded CI machine.
WAIT_SECONDS = 10.0


def wait_for(condition: Callable[[], bool], what: str, timeout: float = WAIT_SECONDS) -> None:
    """Bounded retry (CPython's sleeping_retry), only for a state with no event to wait on,
    such as a process' descriptor count."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout} s")
        time.sleep(0.05)


def rss_bytes(pid: int, field: str = "VmRSS") -> int:
    """A process' resident memory now (VmRSS) or at its peak (VmHWM), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for process {pid}")


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time a process has used, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def unsafe_characters(text: str) -> list[str]:
    """What must never reach a terminal: C0 and C1 controls, DEL, and bidi controls."""
    bidi = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
    return [c for c in text if ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in bidi + "\u2028\u2029"]


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port  # nothing listens once the socket is closed


def assert_client_prints_nothing_unsafe(room: Room, client_command: list[str]) -> None:
    """A fake server sends a client the escape corpus, bidi controls and invalid UTF-8; the
    client must show every line, and none with a control character in it."""
    hostile = [payload.encode() for payload in ESCAPE_SEQUENCES + BIDI_CONTROLS] + INVALID_UTF8
    with socket.create_server(("127.0.0.1", 0)) as fake_server:
        fake_server.settimeout(WAIT_SECONDS)
        client = room.run([*client_command, "--port", str(fake_server.getsockname()[1])])
        conn, _ = fake_server.accept()
        with conn:
            conn.settimeout(WAIT_SECONDS)
            assert conn.recv(100) == b"!Join\n"
            conn.sendall(b"".join(b"[6.6.6.6:6] " + line + b"\n" for line in hostile))
            shown = client.stdout.wait_until(lambda lines: len(lines) >= len(hostile), "lines")
    assert client.wait_exit() == 1
    assert len(shown) == len(hostile)
    for line in shown:
        assert line.startswith("[6.6.6.6:6] ")
        assert not unsafe_characters(line), repr(line)


class LineCollector:
    """Reads a text stream in a background thread and lets a test wait for a line in it."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []  # every line read so far, without its newline
        self._next = 0  # index of the first line expect() has not looked at
        self._ended = False
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._collect, args=(stream,), daemon=True)
        self._thread.start()

    def _collect(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._ended = True
            self._changed.notify_all()

    def expect(self, needle: str, timeout: float = WAIT_SECONDS) -> str:
        """The next line, after the last one expected, that contains needle."""
        return self.expect_match(lambda line: needle in line, repr(needle), timeout)

    def expect_match(
        self, matches: Callable[[str], bool], what: str, timeout: float = WAIT_SECONDS
    ) -> str:
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                while self._next < len(self.lines):
                    line = self.lines[self._next]
                    self._next += 1
                    if matches(line):
                        return line
                remaining = deadline - time.monotonic()
                if self._ended or remaining <= 0:
                    state = "stream ended" if self._ended else f"no line in {timeout} s"
                    raise AssertionError(f"{state} matching {what}; lines: {self.lines}")
                self._changed.wait(remaining)

    def wait_until(
        self, condition: Callable[[list[str]], bool], what: str, timeout: float = WAIT_SECONDS
    ) -> list[str]:
        """Every line so far, once condition holds for them."""
        with self._changed:
            if not self._changed.wait_for(lambda: condition(self.lines), timeout):
                raise AssertionError(f"no {what} in {timeout} s; lines: {self.lines[-20:]}")
            return list(self.lines)

    def wait_ended(self, timeout: float = WAIT_SECONDS) -> list[str]:
        with self._changed:
            if not self._changed.wait_for(lambda: self._ended, timeout):
                raise AssertionError(f"stream still open after {timeout} s: {self.lines}")
            return list(self.lines)


def python_script(script: str, *args: str) -> list[str]:
    """The command that runs one of the project's scripts with this interpreter."""
    return [sys.executable, "-u", str(ROOT / script), *args]


class Program:
    """A real process (one of ours, or nc, socat, java), its stdout and stderr collected."""

    def __init__(
        self,
        command: list[str],
        stdin: int | None = subprocess.PIPE,
        open_files: int | None = None,
    ) -> None:
        def limit_open_files() -> None:
            if open_files is not None:
                resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

        self.proc = subprocess.Popen(
            command,
            preexec_fn=limit_open_files,
            stdin=stdin,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            encoding="utf-8",
            errors="replace",
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stdout = LineCollector(self.proc.stdout)
        self.stderr = LineCollector(self.proc.stderr)

    def type_line(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text + "\n")
        self.proc.stdin.flush()

    def close_stdin(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()

    def wait_exit(self, timeout: float = WAIT_SECONDS) -> int:
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(WAIT_SECONDS)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


class Server(Program):
    def __init__(self, *args: str, open_files: int | None = None) -> None:
        super().__init__(
            python_script("chatroom_server.py", "--port", "0", *args),
            stdin=subprocess.DEVNULL,
            open_files=open_files,
        )
        listening = self.stdout.expect("listening on")
        found = re.search(r":(\d+)$", listening)
        assert found, listening
        self.port = int(found.group(1))


class Client(Program):
    """A client that has joined: it printed its welcome, which names it."""

    def __init__(self, command: list[str], send_join: bool = False) -> None:
        super().__init__(command)
        if send_join:  # nc, socat: the user types !Join
            self.type_line("!Join")
        welcome = self.stdout.expect("Welcome")
        found = re.search(r"Welcome, (\S+)\.", welcome)
        assert found, welcome
        self.member_id = found.group(1)  # as the server named us


class Member:
    """A member speaking the wire protocol over a raw socket, as nc would."""

    def __init__(
        self,
        port: int,
        host: str = "127.0.0.1",
        receive_buffer: int = 0,
        source: str = "",
        tls: ssl.SSLContext | None = None,
    ) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        if receive_buffer:  # before connect(), so the TCP window is small from the start
            self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
        if source:
            self.sock.bind((source, 0))
        # Nagle would hold a small line back for an ACK: latencies would measure the test.
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.sock.settimeout(WAIT_SECONDS)
        self.sock.connect((host, port))
        if tls is not None:  # a TLS member: the handshake, then the same lines
            self.sock = tls.wrap_socket(self.sock, server_hostname=host)
        address, member_port = self.sock.getsockname()[:2]
        shown = f"[{address}]" if ":" in address else address
        self.member_id = f"{shown}:{member_port}"
        self.label = self.member_id  # how the server's lines name it: NAME@IP:PORT once named
        self.lines: list[str] = []  # every line received, in order
        self._unread: deque[str] = deque()  # whole lines received, not yet read
        self._partial = b""  # bytes after the last newline received

    def send(self, data: bytes | str) -> None:
        self.sock.sendall(data.encode() if isinstance(data, str) else data)

    def say(self, text: str) -> None:
        self.send(text + "\n")

    def join(self) -> str:
        self.say("!Join")
        return self.expect("Welcome")

    def read_line(self, timeout: float = WAIT_SECONDS) -> str:
        """The next whole line; EOFError at a clean end of stream. A line that is not UTF-8
        fails the test: the server must never send one."""
        deadline = time.monotonic() + timeout
        while not self._unread:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no line in {timeout} s; last lines: {self.lines[-5:]}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(1 << 20)
            except socket.timeout:
                continue
            if not data:
                raise EOFError(f"end of stream; partial line {self._partial!r}")
            *whole, self._partial = (self._partial + data).split(b"\n")
            self._unread.extend(line.decode("utf-8") for line in whole)
        line = self._unread.popleft()
        self.lines.append(line)
        return line

    def expect(self, needle: str, timeout: float = WAIT_SECONDS) -> str:
        """Reads up to the next line that contains needle."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.read_line(max(0.0, deadline - time.monotonic()))
            if needle in line:
                return line

    def read_until_eof(self, timeout: float = WAIT_SECONDS) -> list[str]:
        """Every remaining line until the server closes; fails on a reset or the deadline."""
        deadline = time.monotonic() + timeout
        rest: list[str] = []
        try:
            while True:
                rest.append(self.read_line(max(0.0, deadline - time.monotonic())))
        except EOFError:
            return rest

    def close(self) -> None:
        self.sock.close()


_P = TypeVar("_P", bound=Program)


class Room:
    """Starts programs and members for one test and cleans every one of them up."""

    def __init__(self) -> None:
        self._programs: list[Program] = []
        self._members: list[Member] = []

    def server(self, *args: str, open_files: int | None = None) -> Server:
        return self._track(Server(*args, open_files=open_files))

    def client(self, port: int, *args: str) -> Client:
        return self._track(Client(python_script("chatroom_client.py", "--port", str(port), *args)))

    def client_from(self, command: list[str], send_join: bool = False) -> Client:
        """Any client program that prints what it receives: Java, nc, socat."""
        return self._track(Client(command, send_join))

    def program(self, script: str, *args: str) -> Program:
        return self.run(python_script(script, *args))

    def run(self, command: list[str]) -> Program:
        return self._track(Program(command))

    def member(
        self,
        port: int,
        host: str = "127.0.0.1",
        receive_buffer: int = 0,
        source: str = "",
        tls: ssl.SSLContext | None = None,
    ) -> Member:
        member = Member(port, host, receive_buffer, source, tls)
        self._members.append(member)
        return member

    def joined_members(
        self, port: int, count: int, tls: ssl.SSLContext | None = None
    ) -> list[Member]:
        """count members, joined in order, each having seen every later one join."""
        members: list[Member] = []
        for _ in range(count):
            newcomer = self.member(port, tls=tls)
            newcomer.join()
            for member in members:
                member.expect(f"* {newcomer.member_id} joined")
            members.append(newcomer)
        return members

    def joined_clients(self, port: int, count: int) -> list[Client]:
        """count client processes, started in order, each having seen every later one join."""
        clients: list[Client] = []
        for _ in range(count):
            newcomer = self.client(port)
            for client in clients:
                client.stdout.expect(f"* {newcomer.member_id} joined")
            clients.append(newcomer)
        return clients

    def _track(self, program: _P) -> _P:
        self._programs.append(program)
        return program

    def clean_up(self) -> None:
        for member in self._members:
            member.close()
        for program in self._programs:
            program.stop()


@pytest.fixture
def room() -> Iterator[Room]:
    room = Room()
    try:
        yield room
    finally:
        room.clean_up()


@pytest.fixture
def server(room: Room) -> Server:
    return room.server()


@pytest.fixture
def server_no_flood(room: Room) -> int:
    """The port of a server with flood control off, for tests that send many lines at once."""
    return room.server("--flood-rate", "0").port
