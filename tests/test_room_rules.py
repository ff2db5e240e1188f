"""The room without sockets: each rule as a unit test, and a hypothesis state machine that
drives chatroom.room.Room directly and checks what every peer would receive."""

from __future__ import annotations

from dataclasses import dataclass, field

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatroom import protocol
from chatroom.room import (
    HISTORY_LINES,
    RENAME_INTERVAL_SECONDS,
    Disconnect,
    Joined,
    Left,
    Output,
    Room,
    ToMembers,
    ToPeer,
)

A, B, C = "10.0.0.1:1", "10.0.0.2:2", "[::1]:3"


def joined_room(*peers: str) -> Room:
    room = Room()
    for peer in peers:
        room.handle(peer, protocol.Join(), now=0.0)
    return room


def test_a_join_welcomes_counts_the_others_and_tells_them() -> None:
    room = joined_room(A)
    assert room.handle(B, protocol.Join(), now=5.0) == [
        ToPeer(B, b"* Welcome, 10.0.0.2:2. Others here: 1\n"),
        ToMembers(b"* 10.0.0.2:2 joined\n", sender=B),
        Joined(B, 2),
    ]
    assert room.members() == [A, B]


def test_a_second_join_is_an_error_to_that_peer_only() -> None:
    room = joined_room(A)
    assert room.handle(A, protocol.Join(), now=1.0) == [ToPeer(A, b"ERROR :Already joined\n")]
    assert room.members() == [A]


def test_a_visitor_that_talks_is_told_to_join_and_nobody_hears_it() -> None:
    room = joined_room(A)
    assert room.handle(B, protocol.Say("hello?"), now=1.0) == [
        ToPeer(B, b"ERROR :Join first: send !Join\n")
    ]


def test_a_member_talks_to_everyone_but_itself() -> None:
    room = joined_room(A, B)
    assert room.handle(A, protocol.Say("hi"), now=1.0) == [
        ToMembers(b"[10.0.0.1:1] hi\n", sender=A)
    ]


def test_a_blank_line_does_nothing() -> None:
    assert joined_room(A).handle(A, protocol.Blank(), now=1.0) == []


def test_quit_says_goodbye_tells_the_others_and_disconnects() -> None:
    room = joined_room(A, B)
    assert room.handle(A, protocol.Quit(), now=1.0) == [
        ToPeer(A, b"* Goodbye, 10.0.0.1:1\n"),
        ToMembers(b"* 10.0.0.1:1 left (quit)\n", sender=A),
        Left(A, "quit", 1),
        Disconnect(A),
    ]
    assert room.members() == [B]


def test_a_visitor_that_quits_is_said_goodbye_to_and_nobody_is_told() -> None:
    room = joined_room(A)
    assert room.handle(B, protocol.Quit(), now=1.0) == [
        ToPeer(B, b"* Goodbye, 10.0.0.2:2\n"),
        Disconnect(B),
    ]


def test_leave_is_the_one_leave_notice_and_a_visitor_leaves_without_one() -> None:
    room = joined_room(A, B)
    assert room.leave(B, protocol.REASON_LOST) == [
        ToMembers(b"* 10.0.0.2:2 left (connection lost)\n", sender=B),
        Left(B, "connection lost", 1),
    ]
    assert room.leave(B, protocol.REASON_LOST) == []
    assert room.leave(C, protocol.REASON_CLOSED) == []


def test_members_are_kept_in_join_order_whatever_their_hashes() -> None:
    peers = [f"10.0.0.{n}:{n}" for n in range(50, 0, -1)]
    room = joined_room(*peers)
    room.leave(peers[10], protocol.REASON_QUIT)
    assert room.members() == peers[:10] + peers[11:]
    assert len(room) == 49 and peers[0] in room and peers[10] not in room


# The state machine: peers come, join, talk, quit and vanish in any order. Outputs are carried
# out as the loop carries them out (a line to one peer, or to every member at that point but
# its sender), and every peer's inbox is checked against what the rules promise.


@dataclass
class Inbox:
    lines: list[bytes] = field(default_factory=list)


class RoomRules(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.room = Room()
        self.members: list[str] = []  # our own model: who is in, in join order
        self.inboxes: dict[str, Inbox] = {}
        self.expected: dict[str, list[bytes]] = {}  # what each peer must have received
        self.peer_numbers = iter(range(1, 10_000))
        self.labels: dict[str, str] = {}  # member → how lines name it
        self.history: list[bytes] = []  # what a newcomer is shown, in order
        self.now = 0.0

    def carry_out(self, outputs: list[Output]) -> None:
        for output in outputs:
            if isinstance(output, ToPeer):
                self.inboxes[output.peer].lines.append(output.line)
            elif isinstance(output, ToMembers):
                for member in self.room.members():
                    if member != output.sender:
                        self.inboxes[member].lines.append(output.line)
            elif isinstance(output, (Joined, Left)):
                assert output.members == len(self.room)

    def act(self, peer: str, command: protocol.Command) -> list[Output]:
        self.now += 1.0
        outputs = self.room.handle(peer, command, self.now)
        self.carry_out(outputs)
        return outputs

    def expect(self, line: bytes, to: list[str]) -> None:
        for peer in to:
            self.expected[peer].append(line)

    @rule()
    def arrive(self) -> None:
        peer = f"10.0.0.{next(self.peer_numbers)}:4000"
        self.inboxes[peer] = Inbox()
        self.expected[peer] = []

    @precondition(lambda self: len(self.inboxes) > len(self.members))
    @rule(data=st.data())
    def join(self, data: st.DataObject) -> None:
        visitors = sorted(set(self.inboxes) - set(self.members))
        peer = data.draw(st.sampled_from(visitors))
        self.labels[peer] = peer
        self.expect(protocol.welcome_line(peer, len(self.members)), [peer])
        if self.history:
            replay = self.history[-HISTORY_LINES:]
            self.expect(protocol.history_start_line(len(replay)), [peer])
            for line in replay:
                self.expect(line, [peer])
            self.expect(protocol.HISTORY_END_LINE, [peer])
        self.expect(protocol.joined_line(peer), self.members)
        self.act(peer, protocol.Join())
        self.members.append(peer)

    @precondition(lambda self: self.members)
    @rule(data=st.data(), name=st.sampled_from(["ann", "Ann", "bob", "9lives", "x" * 17]))
    def rename(self, data: st.DataObject, name: str) -> None:
        peer = data.draw(st.sampled_from(self.members))
        taken = {
            label.split("@")[0].lower()
            for member, label in self.labels.items()
            if member != peer and "@" in label
        }
        if not protocol.NAME_PATTERN.match(name):
            self.expect(protocol.error_line(protocol.ERROR_INVALID_NAME), [peer])
        elif name.lower() in taken:
            self.expect(protocol.error_line(protocol.name_taken_error(name)), [peer])
        else:
            self.now += RENAME_INTERVAL_SECONDS  # never too soon: that rule has its own test
            old, new = self.labels[peer], protocol.member_label(peer, name)
            self.labels[peer] = new
            self.expect(protocol.named_line(new), [peer])
            others = [member for member in self.members if member != peer]
            self.expect(protocol.renamed_line(old, new), others)
        self.act(peer, protocol.Nick(name))

    @precondition(lambda self: self.inboxes)
    @rule(data=st.data(), text=st.text(min_size=1, max_size=20))
    def say(self, data: st.DataObject, text: str) -> None:
        peer = data.draw(st.sampled_from(sorted(self.inboxes)))
        text = protocol.sanitize(text)
        if peer in self.members:
            others = [member for member in self.members if member != peer]
            line = protocol.chat_line(self.labels[peer], text)
            self.expect(line, others)
            self.history.append(protocol.history_line(self.now + 1.0, line))
        else:
            self.expect(protocol.error_line(protocol.ERROR_NOT_JOINED), [peer])
        self.act(peer, protocol.Say(text))

    @precondition(lambda self: self.inboxes)
    @rule(data=st.data(), quits=st.booleans())
    def go(self, data: st.DataObject, quits: bool) -> None:
        peer = data.draw(st.sampled_from(sorted(self.inboxes)))
        reason = protocol.REASON_QUIT if quits else protocol.REASON_LOST
        label = self.labels.pop(peer, peer)
        if quits:
            self.expect(protocol.goodbye_line(label), [peer])
        if peer in self.members:
            self.members.remove(peer)
            self.expect(protocol.left_line(label, reason), self.members)
        if quits:
            assert self.act(peer, protocol.Quit())[-1] == Disconnect(peer)
        else:
            self.carry_out(self.room.leave(peer, reason))
        self.check_inbox(peer)
        del self.inboxes[peer]

    def check_inbox(self, peer: str) -> None:
        assert self.inboxes[peer].lines == self.expected[peer]

    @invariant()
    def every_peer_got_exactly_what_the_rules_promise_in_order(self) -> None:
        for peer in self.inboxes:
            self.check_inbox(peer)

    @invariant()
    def members_are_in_join_order(self) -> None:
        assert self.room.members() == self.members


RoomRules.TestCase.settings = settings(max_examples=200, stateful_step_count=50, deadline=None)
test_room_rules = RoomRules.TestCase
