"""Big rooms with default settings: the server fits its descriptor limit to --max-members
(Redis' adjustOpenFilesLimit), and 2,000 members join a server held to `ulimit -n 4096`."""

from __future__ import annotations

import contextlib
import errno
import re
import resource
import selectors
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chatroom import serve
from chatroom import server as chat_server
from chatroom.room import BATCH_ABOVE, BATCH_NAMES

from .conftest import Room

MEMBERS = 2000
SERVER_OPEN_FILES = 4096
# Connections waiting for their welcome at once: below the listen backlog (511), so no SYN is
# dropped and retried a second later, as a real client pool paces itself.
JOIN_WINDOW = 256
JOIN_SECONDS = 20.0


@pytest.fixture
def open_files_for_the_test() -> Iterator[None]:
    """Lets this process hold the members' sockets too; restores its limit afterwards."""
    wanted = SERVER_OPEN_FILES + 256
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        new_hard = hard if hard == resource.RLIM_INFINITY or hard >= wanted else wanted
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, new_hard))
        except (ValueError, OSError):
            pytest.skip(f"needs ulimit -n {wanted}: the hard limit is {hard}")
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def first_lines(port: int, count: int, stack: contextlib.ExitStack) -> list[str]:
    """Connects count members through one selector, JOIN_WINDOW at a time, sends each !Join,
    and gives the first line each one received ("" for a close without one). The sockets stay
    open (on stack) and unread after that line, as idle members."""
    got: list[str] = []
    opened = 0
    deadline = time.monotonic() + JOIN_SECONDS
    selector = stack.enter_context(selectors.DefaultSelector())
    while len(got) < count:
        while opened < count and opened - len(got) < JOIN_WINDOW:
            sock = stack.enter_context(socket.socket())
            sock.setblocking(False)
            result = sock.connect_ex(("127.0.0.1", port))
            assert result in (0, errno.EINPROGRESS), errno.errorcode.get(result, result)
            selector.register(sock, selectors.EVENT_WRITE, b"")
            opened += 1
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise AssertionError(f"{len(got)} of {count} answered in {JOIN_SECONDS} s")
        for key, mask in selector.select(remaining):
            member = key.fileobj
            assert isinstance(member, socket.socket)
            if mask & selectors.EVENT_WRITE:
                failure = member.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                assert failure == 0, f"connect failed: {errno.errorcode.get(failure, failure)}"
                member.send(b"!Join\n")  # six bytes into an empty socket buffer: taken whole
                selector.modify(member, selectors.EVENT_READ, b"")
                continue
            try:
                chunk = member.recv(4096)
            except ConnectionResetError:
                chunk = b""
            data, ended = key.data + chunk, not chunk
            if ended or b"\n" in data:
                got.append(data.split(b"\n", 1)[0].decode())
                selector.unregister(member)
            else:
                selector.modify(member, selectors.EVENT_READ, data)
    return got


@pytest.mark.usefixtures("open_files_for_the_test")
def test_2000_members_join_a_server_held_to_4096_descriptors_with_default_settings(
    room: Room,
) -> None:
    server = room.server(open_files=SERVER_OPEN_FILES)
    started = time.monotonic()
    with contextlib.ExitStack() as stack:
        welcomes = first_lines(server.port, MEMBERS, stack)
        took = time.monotonic() - started
        refusals = [line for line in welcomes if not line.startswith("* Welcome, ")]
        assert not refusals, f"{len(refusals)} not welcomed, first: {refusals[0]!r}"
        # Each welcome counts the members already there: every count once, nobody refused.
        others = sorted(int(line.rsplit(": ", 1)[1]) for line in welcomes)
        assert others == list(range(MEMBERS))
        server.proc.send_signal(signal.SIGUSR1)
        status = server.stderr.expect("status: ")
    assert f"status: {MEMBERS} members" in status
    assert f"{MEMBERS} joined, 0 left" in status
    # What the operator read while 2,000 people arrived: one warning line, then the status.
    [warning] = server.stderr.lines[: server.stderr.lines.index(status)]
    assert "at most 4064 members, not 10000: 4096 open files allowed" in warning
    assert took < JOIN_SECONDS


def soft_open_files_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError(f"no open-files limit for process {pid}")


def test_the_server_raises_its_own_soft_descriptor_limit_to_fit_max_members(room: Room) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limits = chat_server.DEFAULT_LIMITS
    wanted = limits.max_members + limits.max_unjoined + chat_server.FD_RESERVE
    if hard != resource.RLIM_INFINITY and hard < wanted:
        pytest.skip(f"needs a hard open-files limit of {wanted}; it is {hard}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, hard))  # the server inherits 1024
    try:
        server = room.server()
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert soft_open_files_limit(server.proc.pid) == wanted
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert not [line for line in server.stderr.wait_ended() if "at most" in line]


def test_raising_the_descriptor_limit_steps_down_until_the_system_allows_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """As Redis does, when setrlimit refuses what the hard limit seems to allow (a kernel's
    nr_open, a container's cap), try a little less, and never lower what is already there."""
    calls: list[tuple[int, int]] = []
    ceiling = 5000  # what the system really allows

    def fake_setrlimit(which: int, limits: tuple[int, int]) -> None:
        calls.append(limits)
        if limits[0] > ceiling:
            raise ValueError("not allowed to raise maximum limit")

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, resource.RLIM_INFINITY))
    monkeypatch.setattr(resource, "setrlimit", fake_setrlimit)
    got = serve.raise_open_files_limit(10_032)
    assert ceiling - serve.OPEN_FILES_STEP < got <= ceiling
    assert calls[0] == (10_032, resource.RLIM_INFINITY)
    assert calls[-1] == (got, resource.RLIM_INFINITY)

    calls.clear()
    monkeypatch.setattr(resource, "getrlimit", lambda which: (20_000, 20_000))
    assert serve.raise_open_files_limit(10_032) == 20_000  # already enough: untouched
    assert calls == []

    monkeypatch.setattr(resource, "getrlimit", lambda which: (1024, 1024))
    assert serve.raise_open_files_limit(10_032) == 1024  # the hard limit: nothing to try
    assert calls == []


def test_a_join_storm_in_a_large_room_is_told_in_few_notices_that_count_everyone(
    room: Room,
) -> None:
    server = room.server()
    [watcher] = room.joined_members(server.port, 1)
    arrivals = 400
    with contextlib.ExitStack() as stack:
        welcomes = first_lines(server.port, arrivals, stack)
        assert all(line.startswith("* Welcome, ") for line in welcomes)
        told, notices = 0, 0
        while told < arrivals:
            line = watcher.read_line()
            batch = re.fullmatch(r"\* (\d+) joined: (.*)", line)
            if batch:
                count, named = int(batch.group(1)), batch.group(2).split(", ")
                assert len(named) <= BATCH_NAMES + 1  # the names, then "and K more"
                told += count
            else:
                assert re.fullmatch(r"\* \S+ joined", line), line
                told += 1
            notices += 1
    assert told == arrivals  # everyone counted, nobody twice
    # One line each until the room reaches BATCH_ABOVE, then about one a second.
    assert notices < BATCH_ABOVE + 2 * JOIN_SECONDS
