"""Logs an operator can read with 10,000 members: per-member lines only at --log-level debug,
and a status line (members, joins and leaves since the last one, leaves by reason, bytes
queued) every --summary-seconds and on SIGUSR1."""

from __future__ import annotations

import logging
import signal
import time

import pytest

from chatroom import protocol
from chatroom.serve import open_listener
from chatroom.server import ChatServer
from chatroom.stats import Stats

from .conftest import Room

# Fits any descriptor limit, so no warning about it reaches stderr.
SMALL_ROOM = ("--max-members", "16")


def test_the_status_line_counts_joins_and_leaves_by_reason_since_the_last_one() -> None:
    stats = Stats(since=100.0)
    for _ in range(3):
        stats.joined()
    stats.left(protocol.REASON_QUIT)
    stats.left(protocol.REASON_TOO_SLOW)
    stats.left(protocol.REASON_QUIT)
    assert stats.summary_line(160.0, 7, 9, 10_000, 1234) == (
        "status: 7 members, 9 connections (max 10000), 1234 bytes queued; "
        "in the last 60 s: 3 joined, 3 left (quit 2, too slow 1)"
    )
    stats.restart(160.0)
    assert stats.summary_line(160.25, 7, 7, 10_000, 0) == (
        "status: 7 members, 7 connections (max 10000), 0 bytes queued; "
        "in the last 0.2 s: 0 joined, 0 left"
    )


def test_at_warning_a_quiet_join_and_leave_log_nothing(room: Room) -> None:
    server = room.server(*SMALL_ROOM, "--log-level", "warning")
    alice = room.member(server.port)
    alice.join()
    alice.say("!Quit")
    assert alice.read_until_eof() == [f"* Goodbye, {alice.member_id}"]
    alice.close()
    server.proc.send_signal(signal.SIGTERM)
    assert server.wait_exit() == 0
    assert server.stderr.wait_ended() == []


def test_at_info_sigusr1_logs_the_counts_and_no_line_per_member(room: Room) -> None:
    server = room.server(*SMALL_ROOM, "--line-timeout", "0.5")
    alice, bob, carol = room.joined_members(server.port, 3)
    carol.say("!Quit")
    carol.read_until_eof()
    bob.send("half a line")  # never ended: dropped at the line deadline
    alice.expect(f"* {bob.member_id} left (timeout)")
    server.proc.send_signal(signal.SIGUSR1)
    status = server.stderr.expect("status: ")
    assert status.endswith(" s: 3 joined, 2 left (quit 1, timeout 1)")
    assert "status: 1 members, " in status
    server.proc.send_signal(signal.SIGUSR1)  # the counts start again after each line
    assert server.stderr.expect("status: ").endswith(" s: 0 joined, 0 left")
    logged = "\n".join(server.stderr.lines)
    # The rare event names its peer at info; the everyday ones are not there at all.
    assert f"closing {bob.member_id}: a line unfinished for 0.5 s" in logged
    for member in (alice, bob, carol):
        for everyday in ("connected", "joined", "left", "disconnected"):
            assert f"{member.member_id} {everyday}" not in logged


def test_at_debug_every_member_is_logged(room: Room) -> None:
    server = room.server(*SMALL_ROOM, "--log-level", "debug")
    alice = room.member(server.port)
    alice.join()
    alice.say("!Quit")
    alice.read_until_eof()
    alice.close()
    for event in ("connected", "joined (1 members)", "left (quit)", "disconnected"):
        server.stderr.expect(f"{alice.member_id} {event}")


def test_the_status_line_comes_every_summary_seconds_by_itself(room: Room) -> None:
    server = room.server(*SMALL_ROOM, "--summary-seconds", "0.2")
    room.joined_members(server.port, 1)
    server.stderr.expect(" s: 1 joined, 0 left")
    server.stderr.expect(" s: 0 joined, 0 left")


def test_the_loop_sleeps_until_the_status_line_is_due_instead_of_polling(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The status time is one of the loop's deadlines: select() wakes for it, and a turn that
    has nothing to do sleeps (a loop that polled would run thousands of turns here)."""
    server = ChatServer(open_listener("127.0.0.1", 0))
    server.log_status_every(0.2)
    started = time.monotonic()
    turns = 0
    with caplog.at_level(logging.INFO, logger="chatroom.server"):
        while not any("status: " in record.getMessage() for record in caplog.records):
            assert time.monotonic() - started < 5, "no status line within 5 s"
            server.run_once(give_up_at=started + 5)
            turns += 1
    server.shut_down()
    assert 0.2 <= time.monotonic() - started < 2
    assert turns <= 3
