"""The server run turn by turn in the test's own thread, members on socketpairs and time on a
fake clock: limits crossed to the byte, deadlines to the tick, the order of a turn's lines, and
a hypothesis state machine of the loop with members that stop reading.

A stalled member is a socketpair whose server end was filled until the kernel refused more
(trio's fill_socket): from then on every byte for it stays in the server's queue, so its queue
length is known exactly.
"""

from __future__ import annotations

import contextlib
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatroom import protocol
from chatroom.connection import LineCodec
from chatroom.limits import Limits
from chatroom.serve import open_listener
from chatroom.server import ChatServer

from .conftest import unsafe_characters


def fill(sock: socket.socket) -> None:
    """Writes until the kernel takes no more: the socket's peer has stopped reading."""
    sock.setblocking(False)
    with contextlib.suppress(BlockingIOError):
        while True:
            sock.send(b"\0" * 65536)


@dataclass
class Peer:
    """The test's end of one member's socketpair."""

    sock: socket.socket
    server_end: socket.socket  # kept so the test can fill it: the member stops reading
    member_id: str
    partial: bytes = b""

    def say(self, text: str) -> None:
        self.sock.sendall(text.encode() + b"\n")

    def lines(self) -> list[str]:
        """Every whole line that has arrived since the last call."""
        with contextlib.suppress(BlockingIOError):
            while data := self.sock.recv(1 << 20):
                self.partial += data
        *whole, self.partial = self.partial.split(b"\n")
        return [line.decode("utf-8") for line in whole]


class FakeClock:
    """The server's clock, moved only by the test: deadlines fire exactly when it says."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.step = 0.0  # how far each reading moves it on, for code that waits on the clock

    def __call__(self) -> float:
        self.now += self.step
        return self.now


class InProcessRoom:
    def __init__(self, **limits: float) -> None:
        self.listener = open_listener("127.0.0.1", 0)
        self.clock = FakeClock()
        self.server = ChatServer(self.listener, Limits(**limits), clock=self.clock)  # type: ignore[arg-type]
        self.peers: list[Peer] = []

    def connect(self, stalled: bool = False) -> Peer:
        ours, theirs = socket.socketpair()
        ours.setblocking(False)
        if stalled:
            fill(theirs)
        n = len(self.peers) + 1
        peer = Peer(ours, theirs, f"10.0.0.{n}:{40000 + n}")
        self.server.admit(theirs, f"10.0.0.{n}", 40000 + n)
        self.peers.append(peer)
        return peer

    def join(self, stalled: bool = False) -> Peer:
        peer = self.connect(stalled)
        peer.say("!Join")
        self.settle()
        return peer

    def settle(self) -> None:
        """Runs turns until the server has nothing to do right now."""
        for _ in range(10_000):
            if not self.server.run_once(give_up_at=self.clock.now):
                return
        raise AssertionError("the server never settled")

    def run_for(self, seconds: float) -> None:
        """Moves the clock on and lets the deadlines that passed act."""
        self.clock.now += seconds
        self.settle()

    def close(self) -> None:
        for peer in self.peers:
            peer.sock.close()
            peer.server_end.close()
        self.listener.close()


@pytest.fixture
def make_room() -> Iterator[type[InProcessRoom]]:
    rooms: list[InProcessRoom] = []

    class TrackedRoom(InProcessRoom):
        def __init__(self, **limits: float) -> None:
            super().__init__(**limits)
            rooms.append(self)

    yield TrackedRoom
    for room in rooms:
        room.close()


def chat_line_length(sender: Peer, text: str) -> int:
    return len(protocol.chat_line(sender.member_id, text))


@pytest.mark.parametrize("over", [0, 1], ids=["at the limit", "one byte over"])
def test_the_hard_limit_drops_one_byte_over_and_not_at(
    make_room: type[InProcessRoom], over: int
) -> None:
    room = make_room(sendq_hard=2000, flood_rate=0)
    talker = room.join()
    stalled = room.join(stalled=True)
    queued = len(protocol.welcome_line(stalled.member_id, 1))  # never sent: the kernel is full
    filler = "x" * (2000 - queued - chat_line_length(talker, "") + over)
    talker.say(filler)
    room.settle()
    left = f"* {stalled.member_id} left (too slow)"
    assert (left in talker.lines()) == bool(over)


@pytest.mark.parametrize("over", [0, 1], ids=["at the limit", "one byte over"])
def test_the_soft_limit_drops_one_byte_over_after_its_seconds_and_not_at(
    make_room: type[InProcessRoom], over: int
) -> None:
    room = make_room(sendq_soft=2000, sendq_soft_seconds=0.3, flood_rate=0)
    talker = room.join()
    stalled = room.join(stalled=True)
    queued = len(protocol.welcome_line(stalled.member_id, 1))
    talker.say("x" * (2000 - queued - chat_line_length(talker, "") + over))
    room.settle()
    crossed = room.clock.now
    left = f"* {stalled.member_id} left (too slow)"
    room.run_for(0.2)
    assert left not in talker.lines()
    room.run_for(0.3)
    notices = talker.lines()
    assert (left in notices) == bool(over)
    assert room.clock.now - crossed >= 0.3


def test_dipping_under_the_soft_limit_restarts_its_clock(make_room: type[InProcessRoom]) -> None:
    room = make_room(sendq_soft=2000, sendq_soft_seconds=0.3, flood_rate=0)
    talker = room.join()
    stalled = room.join(stalled=True)
    talker.say("x" * 2000)  # over the soft limit
    room.settle()
    room.run_for(0.2)
    stalled.lines()  # it reads everything: the queue drains, under the limit again
    room.settle()
    fill(stalled.server_end)  # and stops again
    talker.say("y" * 2000)
    room.settle()
    room.run_for(0.2)  # 0.4 s after the first crossing, 0.2 s after the second
    assert not [line for line in talker.lines() if "left" in line]
    room.run_for(0.2)
    assert f"* {stalled.member_id} left (too slow)" in talker.lines()


@pytest.mark.parametrize("over", [0, 1], ids=["at the limit", "one byte over"])
def test_past_the_total_the_largest_queue_is_dropped_first(
    make_room: type[InProcessRoom], over: int
) -> None:
    talker_id, first_id, second_id = (f"10.0.0.{n}:{40000 + n}" for n in (1, 2, 3))
    text = "z" * 500
    total = (
        len(protocol.welcome_line(first_id, 1))
        + len(protocol.joined_line(second_id))  # the first one's queue is the larger
        + len(protocol.welcome_line(second_id, 2))
        + 2 * len(protocol.chat_line(talker_id, text))
    )
    room = make_room(sendq_total=total - over, flood_rate=0)
    talker = room.join()
    first = room.join(stalled=True)
    second = room.join(stalled=True)
    assert (talker.member_id, first.member_id, second.member_id) == (
        talker_id,
        first_id,
        second_id,
    )
    talker.say(text)
    room.settle()
    notices = [notice for notice in talker.lines() if "left" in notice]
    assert notices == ([f"* {first_id} left (too slow)"] if over else [])


def test_lines_over_the_flood_burst_wait_for_their_tokens(make_room: type[InProcessRoom]) -> None:
    room = make_room(flood_rate=10, flood_burst=5)
    listener = room.join()
    talker = room.join()  # its !Join was free: the whole burst is left
    listener.lines()
    for n in range(7):
        talker.say(f"line {n}")
    room.settle()
    assert len(listener.lines()) == 5  # exactly the burst
    room.run_for(0.1 + 0.02)  # one token's time
    assert listener.lines() == [f"[{talker.member_id}] line 5"]


def test_a_paused_flooder_is_not_read_so_its_buffer_stays_bounded(
    make_room: type[InProcessRoom],
) -> None:
    room = make_room(flood_rate=1, flood_burst=1)
    room.join()
    talker = room.join()
    talker.sock.setblocking(True)
    talker.sock.settimeout(0.5)
    sent = 0
    with contextlib.suppress(TimeoutError, socket.timeout):
        while sent < 50_000_000:
            sent += talker.sock.send(b"flood\n" * 10_000)
            room.settle()
    assert sent < 5_000_000  # the kernel pushed back: the server stopped reading it


# The room as a state machine: members join, talk, stop reading and vanish; whatever happens,
# every member that keeps reading gets every message from the others exactly once, in each
# sender's order, never its own, and never a control character.

text_without_newline = st.text(max_size=40).map(lambda text: text.replace("\n", " "))


@dataclass
class Member:
    peer: Peer
    reading: bool = True
    expected: dict[str, list[int]] = field(default_factory=dict)  # sender → seq numbers due
    received: dict[str, list[int]] = field(default_factory=dict)  # sender → seq numbers seen
    left: list[str] = field(default_factory=list)  # ids in the leave notices it got


CHAT = re.compile(r"\[(\S+)\] (\d+) ")
LEFT = re.compile(r"\* (\S+) left \(")


class RoomMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.room = InProcessRoom(flood_rate=0, sendq_hard=4096)
        self.members: list[Member] = []  # present, in the order they joined
        self.seq = 0

    def teardown(self) -> None:
        self.room.close()

    def readers(self) -> list[Member]:
        return [member for member in self.members if member.reading]

    @precondition(lambda self: len(self.members) < 8)
    @rule()
    def join(self) -> None:
        peer = self.room.join()
        welcome = peer.lines()[0]
        assert welcome == f"* Welcome, {peer.member_id}. Others here: {len(self.members)}"
        self.members.append(Member(peer))

    @precondition(lambda self: self.readers())
    @rule(data=st.data(), text=text_without_newline)
    def say(self, data: st.DataObject, text: str) -> None:
        sender = data.draw(st.sampled_from(self.readers()))
        self.seq += 1
        sender.peer.say(f"{self.seq} {text}")
        for member in self.members:
            if member is not sender:
                member.expected.setdefault(sender.peer.member_id, []).append(self.seq)
        self.room.settle()

    @precondition(lambda self: self.readers())
    @rule(data=st.data())
    def stop_reading(self, data: st.DataObject) -> None:
        member = data.draw(st.sampled_from(self.readers()))
        self.collect(member)
        member.reading = False
        fill(member.peer.server_end)

    @precondition(lambda self: self.members)
    @rule(data=st.data())
    def vanish(self, data: st.DataObject) -> None:
        member = data.draw(st.sampled_from(self.members))
        member.peer.sock.close()
        self.members.remove(member)
        self.room.settle()

    def collect(self, member: Member) -> None:
        for line in member.peer.lines():
            assert not unsafe_characters(line), line
            if chat := CHAT.match(line):
                assert chat.group(1) != member.peer.member_id, "its own line came back"
                member.received.setdefault(chat.group(1), []).append(int(chat.group(2)))
            elif left := LEFT.match(line):
                member.left.append(left.group(1))

    @invariant()
    def every_reader_has_every_message_once_in_order(self) -> None:
        self.room.settle()
        for member in self.readers():
            self.collect(member)
            assert member.received == member.expected
            assert len(member.left) == len(set(member.left)), "a leave notice came twice"

    @invariant()
    def a_member_that_stopped_reading_is_dropped_once_its_queue_is_full(self) -> None:
        for member in list(self.members):
            if not member.reading and member.peer.member_id in self.readers_heard_leave():
                self.members.remove(member)

    def readers_heard_leave(self) -> set[str]:
        return {left for reader in self.readers() for left in reader.left}


RoomMachine.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
test_room_state_machine = RoomMachine.TestCase


# The order of a turn's lines: whatever the server handles first reaches each member first.
# Lines sent before a settle() are read in the order they were sent (epoll reports sockets in
# the order they became readable).


def test_a_reply_never_overtakes_a_broadcast_handled_before_it(
    make_room: type[InProcessRoom],
) -> None:
    room = make_room(flood_rate=0)
    alice, bob = room.join(), room.join()
    alice.lines()
    bob.say("first")
    alice.say("!Join")  # already joined: an error for alice alone
    room.settle()
    assert alice.lines() == [f"[{bob.member_id}] first", "ERROR :Already joined"]


def test_a_line_handled_before_a_quit_reaches_the_one_quitting(
    make_room: type[InProcessRoom],
) -> None:
    room = make_room(flood_rate=0)
    alice, bob = room.join(), room.join()
    alice.lines()
    bob.say("wait for me")
    alice.say("!Quit")
    room.settle()
    assert alice.lines() == [f"[{bob.member_id}] wait for me", f"* Goodbye, {alice.member_id}"]


def test_a_line_handled_in_the_turn_of_a_shutdown_reaches_everyone_before_the_goodbye(
    make_room: type[InProcessRoom],
) -> None:
    room = make_room(flood_rate=0)
    alice, bob, carol = room.join(), room.join(), room.join()
    alice.lines()
    bob.lines()
    carol.say("last words")
    room.server.run_once(give_up_at=room.clock.now)  # reads it; the flush comes next turn
    room.clock.step = 0.5  # the second of grace passes within a turn or two
    room.server.shut_down()
    for member in (alice, bob):
        assert member.lines() == [f"[{carol.member_id}] last words", "ERROR :Server shutting down"]


def test_members_dropped_in_one_turn_are_announced_in_the_order_they_joined(
    make_room: type[InProcessRoom],
) -> None:
    room = make_room(sendq_hard=2000, flood_rate=0)
    talker = room.join()
    stalled = [room.join(stalled=True) for _ in range(12)]
    talker.lines()
    talker.say("x" * 2000)  # over every stalled member's hard limit in the same turn
    room.settle()
    notices = [line for line in talker.lines() if " left " in line]
    assert notices == [f"* {member.member_id} left (too slow)" for member in stalled]


class CodecThatFailsOnce(LineCodec):
    """Runs out of memory encoding the first share that says "boom", as a bug would."""

    failed = False

    def encode(self, lines: bytes) -> bytes:
        if b"boom" in lines and not CodecThatFailsOnce.failed:
            CodecThatFailsOnce.failed = True
            raise MemoryError("as if the machine ran out")
        return lines


def test_an_error_while_delivering_to_one_member_drops_that_member_only(
    make_room: type[InProcessRoom], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("chatroom.server.LineCodec", CodecThatFailsOnce)
    monkeypatch.setattr(CodecThatFailsOnce, "failed", False)
    room = make_room(flood_rate=0)
    talker, first, second, third = (room.join() for _ in range(4))
    for member in (talker, first, second, third):
        member.lines()
    talker.say("boom")
    room.settle()
    talker.say("after")
    room.settle()
    heard = {member.member_id: member.lines() for member in (first, second, third)}
    [failed] = [peer for peer, lines in heard.items() if f"[{talker.member_id}] boom" not in lines]
    for peer, lines in heard.items():
        if peer != failed:
            assert lines == [
                f"[{talker.member_id}] boom",
                f"* {failed} left (server error)",
                f"[{talker.member_id}] after",
            ]


# Caps on who may connect (issue 14): addresses counted by machine and by IPv6 network, and
# connections still to join on a budget of their own.


def connect_from(room: InProcessRoom, ip: str, port: int) -> socket.socket:
    """A socketpair admitted as if accepted from ip:port; the test's end, non-blocking."""
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    room.server.admit(theirs, ip, port)
    room.settle()
    return ours


def refused_with(sock: socket.socket) -> list[str]:
    """What a refused or cut connection got before its end of stream: nothing else is open."""
    sock.setblocking(True)
    sock.settimeout(5)
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    return data.decode().splitlines()


def test_the_per_address_cap_counts_an_ipv6_network_as_one_and_spares_other_addresses(
    make_room: type[InProcessRoom],
) -> None:
    room = make_room(max_per_ip=2, exempt_loopback=False)
    held = [connect_from(room, "2001:db8:0:1::1", 1), connect_from(room, "2001:db8:0:1::2", 2)]
    over = connect_from(room, "2001:db8:0:1:ffff::9", 3)
    assert refused_with(over) == ["ERROR :Too many connections from your address"]
    elsewhere = connect_from(room, "2001:db8:0:2::1", 4)
    other_ipv4 = connect_from(room, "10.1.2.3", 5)
    for sock in (*held, elsewhere, other_ipv4):
        sock.sendall(b"!Join\n")
    room.settle()
    for sock in (elsewhere, other_ipv4):
        assert sock.recv(4096).startswith(b"* Welcome")


def test_connections_that_never_join_cannot_keep_anyone_out(
    make_room: type[InProcessRoom],
) -> None:
    room = make_room(max_members=3, max_unjoined=2)
    idle = [connect_from(room, f"10.9.0.{n}", 1000 + n) for n in range(6)]
    for sock in idle[:4]:  # each newcomer past the budget cut the one that waited longest
        assert refused_with(sock) == [
            "ERROR :Too many connections waiting to join: send !Join at once"
        ]
    members = [room.join() for _ in range(3)]  # the room was never full: they all get in
    assert all(member.lines()[0].startswith("* Welcome") for member in members)
    late = connect_from(room, "10.9.1.1", 2000)  # now it is: refused at once, saying so
    assert refused_with(late) == ["ERROR :Server full (max 3 members)"]
