"""The real server and real clients as processes, talking over loopback."""

from __future__ import annotations

import signal
import socket
import struct
import time

import pytest

from .conftest import Room, Server


def test_three_clients_join_with_welcomes_and_join_notices(room: Room, server: Server) -> None:
    alice = room.client(server.port)
    assert alice.stdout.lines[0] == f"* Welcome, {alice.member_id}. Others here: 0"
    bob = room.client(server.port)
    assert "Others here: 1" in bob.stdout.lines[0]
    alice.stdout.expect(f"* {bob.member_id} joined")
    carol = room.client(server.port)
    assert "Others here: 2" in carol.stdout.lines[0]
    alice.stdout.expect(f"* {carol.member_id} joined")
    bob.stdout.expect(f"* {carol.member_id} joined")
    assert len({alice.member_id, bob.member_id, carol.member_id}) == 3
    assert alice.member_id.startswith("127.0.0.1:")


def test_a_message_reaches_every_other_member_once_and_never_its_sender(
    room: Room, server: Server
) -> None:
    alice, bob, carol = room.joined_clients(server.port, 3)
    alice.type_line("hello, room")
    said = f"[{alice.member_id}] hello, room"
    bob.stdout.expect(said)
    carol.stdout.expect(said)
    # Everything the server sent alice after her message comes after it on her stream too:
    # once she sees bob's marker, an echo of her own line would already be there.
    bob.type_line("marker from bob")
    alice.stdout.expect("marker from bob")
    carol.stdout.expect("marker from bob")
    for client in (alice, bob, carol):
        assert client.stdout.lines.count(said) == (0 if client is alice else 1)


def test_quit_says_goodbye_exits_zero_the_others_see_the_leave_and_rejoining_works(
    room: Room, server: Server
) -> None:
    alice, bob = room.joined_clients(server.port, 2)
    bob.type_line("!Quit")
    assert bob.wait_exit() == 0
    assert bob.stdout.wait_ended()[-1] == f"* Goodbye, {bob.member_id}"
    assert bob.stderr.wait_ended() == []
    alice.stdout.expect(f"* {bob.member_id} left (quit)")
    again = room.client(server.port)
    assert again.stdout.lines[0].endswith("Others here: 1")
    alice.stdout.expect(f"* {again.member_id} joined")
    again.type_line("back again")
    alice.stdout.expect(f"[{again.member_id}] back again")


def test_end_of_input_leaves_the_same_way(room: Room, server: Server) -> None:
    alice, bob = room.joined_clients(server.port, 2)
    bob.close_stdin()
    assert bob.wait_exit() == 0
    alice.stdout.expect(f"* {bob.member_id} left (quit)")


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGHUP, signal.SIGINT])
def test_a_client_told_to_stop_leaves_gracefully(room: Room, server: Server, signum: int) -> None:
    alice, bob = room.joined_clients(server.port, 2)
    bob.proc.send_signal(signum)
    assert bob.wait_exit() == 0
    alice.stdout.expect(f"* {bob.member_id} left (quit)")


def test_a_killed_client_produces_a_leave_notice(room: Room, server: Server) -> None:
    alice, bob = room.joined_clients(server.port, 2)
    bob.proc.kill()
    alice.stdout.expect(f"* {bob.member_id} left (connection closed)")


def test_a_reset_connection_produces_a_leave_notice(room: Room, server: Server) -> None:
    alice, bob = room.joined_members(server.port, 2)
    bob.sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    bob.close()  # linger 0: the kernel sends a reset instead of a FIN
    assert alice.expect(f"* {bob.member_id} left") == f"* {bob.member_id} left (connection lost)"


def test_a_chat_line_before_join_is_refused_and_not_broadcast(room: Room, server: Server) -> None:
    member, stranger = room.member(server.port), room.member(server.port)
    member.join()
    stranger.say("let me in")
    assert stranger.read_line() == "ERROR :Join first: send !Join"
    stranger.join()
    member.expect(f"{stranger.member_id} joined")
    assert not [line for line in member.lines if "let me in" in line]


def test_join_twice_is_an_error_and_changes_nothing(room: Room, server: Server) -> None:
    member = room.member(server.port)
    member.join()
    member.say("!Join")
    assert member.read_line() == "ERROR :Already joined"


def test_quit_before_join_says_goodbye_and_closes(room: Room, server: Server) -> None:
    member = room.member(server.port)
    member.say("!Quit")
    assert member.read_until_eof() == [f"* Goodbye, {member.member_id}"]


def test_after_quit_the_peer_reads_the_goodbye_then_a_clean_end_of_stream(
    room: Room, server: Server
) -> None:
    member = room.member(server.port)
    member.join()
    # Input still unread by the server when it closes would make the kernel send a reset;
    # the server's linger (shutdown, then read until our EOF) must prevent that.
    member.send(b"!Quit\nstill talking\n" + b"x" * 5000 + b"\n")
    assert member.read_until_eof() == [f"* Goodbye, {member.member_id}"]


def test_crlf_line_endings_work(room: Room, server: Server) -> None:
    alice, bob = room.member(server.port), room.member(server.port)
    alice.send(b"!Join\r\n")
    alice.expect("Welcome")
    bob.join()
    bob.send(b"over telnet\r\n")
    assert alice.expect("over telnet") == f"[{bob.member_id}] over telnet"


def test_utf8_text_with_emoji_arrives_intact(room: Room, server: Server) -> None:
    alice, bob = room.joined_clients(server.port, 2)
    text = "héllo 👋 世界 👨‍👩‍👧 e\u0301"
    alice.type_line(text)
    assert bob.stdout.expect("héllo") == f"[{alice.member_id}] {text}"


def test_blank_lines_are_not_broadcast(room: Room, server: Server) -> None:
    alice, bob = room.joined_members(server.port, 2)
    bob.send(b"\n  \n\r\nafter blanks\n")
    assert alice.read_line() == f"[{bob.member_id}] after blanks"


def test_a_line_at_the_limit_is_relayed_and_one_byte_over_is_refused(room: Room) -> None:
    server = room.server("--max-line", "100")
    alice, bob = room.joined_members(server.port, 2)
    at_limit = "a" * 95 + "😀"  # 99 bytes, 100 with the newline
    bob.say(at_limit)
    assert alice.read_line() == f"[{bob.member_id}] {at_limit}"
    bob.say("b" + at_limit)
    assert bob.read_line() == "ERROR :Line too long (max 100 bytes)"
    bob.say("still here")
    assert alice.read_line() == f"[{bob.member_id}] still here"


def test_an_endless_line_is_refused_once_and_the_member_stays(room: Room, server: Server) -> None:
    alice, bob = room.joined_members(server.port, 2)
    bob.send(b"z" * 100_000)
    assert bob.read_line() == "ERROR :Line too long (max 4096 bytes)"
    bob.send(b"z" * 100_000 + b"\nafterwards\n")
    assert alice.read_line() == f"[{bob.member_id}] afterwards"
    assert bob.lines == [bob.lines[0], "ERROR :Line too long (max 4096 bytes)"]


def test_a_last_line_before_half_close_is_still_delivered(room: Room, server: Server) -> None:
    alice, bob = room.joined_members(server.port, 2)
    bob.send(b"last words\n")
    bob.sock.shutdown(socket.SHUT_WR)
    assert alice.read_line() == f"[{bob.member_id}] last words"
    assert alice.read_line() == f"* {bob.member_id} left (connection closed)"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_shuts_the_server_down_within_2_s_and_every_client_exits(
    room: Room, server: Server, signum: int
) -> None:
    clients = room.joined_clients(server.port, 3)
    member = room.member(server.port)
    member.join()
    started = time.monotonic()
    server.proc.send_signal(signum)
    assert server.wait_exit(timeout=2) == 0
    assert time.monotonic() - started < 2
    assert member.read_until_eof()[-1] == "ERROR :Server shutting down"
    for client in clients:
        assert client.wait_exit() == 1
        assert "ERROR :Server shutting down" in client.stdout.wait_ended()
        assert client.stderr.wait_ended() == ["chatroom-client: the server closed the connection"]
    assert "Traceback" not in "\n".join(server.stderr.wait_ended())


def test_200_members_joined_at_once_all_receive_one_message(room: Room, server: Server) -> None:
    members = [room.member(server.port) for _ in range(200)]
    for member in members:
        member.say("!Join")
    for member in members:
        member.expect("Welcome")
    sender = room.member(server.port)
    sender.join()
    sender.say("one for all")
    for member in members:
        assert member.expect("one for all") == f"[{sender.member_id}] one for all"


def test_20_members_sending_100_messages_each_get_all_others_in_order(room: Room) -> None:
    server = room.server("--flood-rate", "0")
    clients = room.joined_clients(server.port, 20)
    for client in clients:
        client.type_line("\n".join(f"n={n}" for n in range(100)))
    for client in clients:
        said = client.stdout.wait_until(
            lambda lines: len([line for line in lines if line.startswith("[")]) >= 19 * 100,
            "1,900 messages",
        )
        said = [line for line in said if line.startswith("[")]
        assert len(said) == 19 * 100
        for other in clients:
            from_other = [line for line in said if line.startswith(f"[{other.member_id}] ")]
            expected = [] if other is client else [f"[{other.member_id}] n={n}" for n in range(100)]
            assert from_other == expected


def test_a_member_that_stops_reading_delays_no_one_and_later_gets_everything_in_order(
    room: Room,
) -> None:
    # Queue limits far above the traffic: this is about partial sends, not about the limits.
    server = room.server(
        "--flood-rate", "0", "--sendq-soft", "64000000", "--sendq-hard", "64000000"
    )
    sender, reader = room.member(server.port), room.member(server.port)
    stalled = room.member(server.port, receive_buffer=16384)
    for member in (sender, reader, stalled):
        member.join()
    reader.expect(stalled.member_id)
    sender.expect(stalled.member_id)
    # 8 MB is more than the server's send buffer (at most 4 MiB) and the stalled member's
    # receive buffer hold, so sends to it come back partial and the server must wait for
    # EVENT_WRITE, while the reader keeps up.
    lines = [f"{n:06d} " + "x" * 192 for n in range(40_000)]
    for start in range(0, len(lines), 1000):
        sender.send("".join(line + "\n" for line in lines[start : start + 1000]))
        for line in lines[start : start + 1000]:
            assert reader.read_line() == f"[{sender.member_id}] {line}"
    for line in lines:
        assert stalled.read_line() == f"[{sender.member_id}] {line}"
