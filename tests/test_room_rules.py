"""The room without sockets: each rule as a unit test, and a hypothesis state machine that
drives chatroom.room.Room directly and checks what every peer would receive."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatroom import protocol
from chatroom.room import (
    BATCH_ABOVE,
    BATCH_NAMES,
    BATCH_SECONDS,
    HISTORY_LINES,
    RENAME_BURST,
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
    room = Room(capacity=100_000)
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
    assert room.leave(B, protocol.REASON_LOST, now=1.0) == [
        ToMembers(b"* 10.0.0.2:2 left (connection lost)\n", sender=B),
        Left(B, "connection lost", 1),
    ]
    assert room.leave(B, protocol.REASON_LOST, now=1.0) == []
    assert room.leave(C, protocol.REASON_CLOSED, now=1.0) == []


def test_members_are_kept_in_join_order_whatever_their_hashes() -> None:
    peers = [f"10.0.0.{n}:{n}" for n in range(50, 0, -1)]
    room = joined_room(*peers)
    room.leave(peers[10], protocol.REASON_QUIT, now=1.0)
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
        self.room = Room(capacity=100_000)
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
        if self.labels[peer] == protocol.member_label(peer, name):
            self.expect(protocol.named_line(self.labels[peer]), [peer])  # the same: no notice
        elif not protocol.NAME_PATTERN.match(name):
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
            self.carry_out(self.room.leave(peer, reason, self.now))
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


# Names, commands and history (issue 13).

ALICE = "alice@10.0.0.1:1"


def named_room() -> Room:
    room = joined_room(B)
    room.handle(A, protocol.Join("alice"), now=0.0)
    return room


def lines_to(outputs: list[Output], peer: str) -> list[bytes]:
    return [output.line for output in outputs if isinstance(output, ToPeer) and output.peer == peer]


def broadcasts(outputs: list[Output]) -> list[bytes]:
    return [output.line for output in outputs if isinstance(output, ToMembers)]


def test_join_with_a_name_names_the_member_on_every_line_with_its_address() -> None:
    room = joined_room(B)
    outputs = room.handle(A, protocol.Join("alice"), now=0.0)
    assert lines_to(outputs, A) == [f"* Welcome, {ALICE}. Others here: 1\n".encode()]
    assert broadcasts(outputs) == [f"* {ALICE} joined\n".encode()]
    assert broadcasts(room.handle(A, protocol.Say("hi"), now=1.0)) == [f"[{ALICE}] hi\n".encode()]
    assert broadcasts(room.leave(A, "quit", now=1.0)) == [f"* {ALICE} left (quit)\n".encode()]


def test_nick_tells_the_member_and_the_others_with_both_name_and_address() -> None:
    room = joined_room(A, B)
    outputs = room.handle(A, protocol.Nick("alice"), now=1.0)
    assert lines_to(outputs, A) == [f"* You are now {ALICE}\n".encode()]
    assert broadcasts(outputs) == [f"* {A} is now {ALICE}\n".encode()]
    assert next(o for o in outputs if isinstance(o, ToMembers)).sender == A


@pytest.mark.parametrize(
    "name",
    [
        "",
        "1abc",
        "a" * 17,
        "al ice",
        "al.ice",
        "al:ice",
        "[x]",
        "ali@ce",
        "\uff41lice",
        "\u0430lice",
    ],
)
def test_an_invalid_name_is_refused_to_the_requester_alone_and_nothing_changes(name: str) -> None:
    room = joined_room(A, B)
    assert room.handle(A, protocol.Nick(name), now=1.0) == [
        ToPeer(A, protocol.error_line(protocol.ERROR_INVALID_NAME))
    ]
    assert broadcasts(room.handle(A, protocol.Say("x"), now=2.0)) == [b"[10.0.0.1:1] x\n"]


@pytest.mark.parametrize("name", ["a", "A" * 16, "a-b_c9", "Z0"])
def test_names_of_one_to_sixteen_letters_digits_and_dashes_are_valid(name: str) -> None:
    room = joined_room(A)
    assert lines_to(room.handle(A, protocol.Nick(name), now=1.0), A) == [
        f"* You are now {name}@{A}\n".encode()
    ]


def test_a_name_is_unique_ignoring_ascii_case_and_freed_when_its_member_leaves() -> None:
    room = named_room()
    assert room.handle(C, protocol.Join("ALICE"), now=1.0) == [
        ToPeer(C, b"ERROR :Name taken: ALICE\n")
    ]
    assert C not in room
    assert room.handle(B, protocol.Nick("Alice"), now=1.0) == [
        ToPeer(B, b"ERROR :Name taken: Alice\n")
    ]
    room.leave(A, "quit", now=1.0)
    assert lines_to(room.handle(B, protocol.Nick("Alice"), now=2.0), B) == [
        f"* You are now Alice@{B}\n".encode()
    ]


def test_a_member_may_change_the_case_of_its_own_name() -> None:
    room = named_room()
    outputs = room.handle(A, protocol.Nick("Alice"), now=100.0)
    assert broadcasts(outputs) == [f"* {ALICE} is now Alice@{A}\n".encode()]


def test_renames_are_rate_limited_after_a_burst() -> None:
    room = named_room()
    for n in range(RENAME_BURST):
        assert lines_to(room.handle(A, protocol.Nick(f"a{n}"), now=1.0), A) == [
            f"* You are now a{n}@{A}\n".encode()
        ]
    wait = RENAME_INTERVAL_SECONDS - 3
    assert room.handle(A, protocol.Nick("bob"), now=1.0 + wait) == [
        ToPeer(A, b"ERROR :Name changed too recently: wait 3 s\n")
    ]
    assert lines_to(room.handle(A, protocol.Nick("bob"), now=1.0 + RENAME_INTERVAL_SECONDS), A) == [
        f"* You are now bob@{A}\n".encode()
    ]


def test_who_lists_every_member_with_its_address_to_the_requester_alone() -> None:
    room = named_room()
    assert room.handle(B, protocol.Who(), now=1.0) == [
        ToPeer(B, f"* 2 here: {B}, {ALICE}\n".encode())
    ]


def test_who_in_a_huge_room_is_one_bounded_line_that_says_how_many_it_left_out() -> None:
    room = joined_room(*(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}:1" for n in range(10_000)))
    [reply] = room.handle("10.0.0.0:1", protocol.Who(), now=1.0)
    assert isinstance(reply, ToPeer)
    assert len(reply.line) <= protocol.WHO_MAX_BYTES + 1
    text = reply.line.decode()
    assert text.startswith("* 10000 here: 10.0.0.0:1, 10.0.0.1:1, ")
    shown = text.split(": ", 1)[1].split(", and ")[0].count(", ") + 1
    assert text.endswith(f", and {10_000 - shown} more\n")


def test_msg_reaches_its_target_only_by_name_or_address_and_confirms_to_the_sender() -> None:
    room = named_room()
    by_name = room.handle(B, protocol.Msg("ALICE", "psst"), now=1.0)
    assert by_name == [
        ToPeer(A, f"[{B} (private)] psst\n".encode()),
        ToPeer(B, f"* Private to {ALICE}: psst\n".encode()),
    ]
    by_address = room.handle(A, protocol.Msg(B, "hi"), now=1.0)
    assert by_address == [
        ToPeer(B, f"[{ALICE} (private)] hi\n".encode()),
        ToPeer(A, f"* Private to {B}: hi\n".encode()),
    ]


def test_msg_to_nobody_is_an_error_to_the_sender_alone() -> None:
    room = named_room()
    assert room.handle(B, protocol.Msg("carol", "hi"), now=1.0) == [
        ToPeer(B, b"ERROR :No such member: carol (/who lists them)\n")
    ]


def test_me_is_an_action_that_never_reads_as_a_notice() -> None:
    room = named_room()
    [action] = broadcasts(room.handle(A, protocol.Me("left (quit)"), now=1.0))
    assert action == f"[{ALICE}] * left (quit)\n".encode()
    assert not action.startswith(b"* ")


def test_a_visitor_may_ask_for_help_and_quit_but_not_use_the_room() -> None:
    room = joined_room(A)
    assert lines_to(room.handle(C, protocol.Help(), now=1.0), C) == protocol.HELP_LINES
    for command in (protocol.Nick("x"), protocol.Who(), protocol.Msg(A, "hi"), protocol.Me("x")):
        assert room.handle(C, command, now=1.0) == [
            ToPeer(C, protocol.error_line(protocol.ERROR_NOT_JOINED))
        ]


def test_a_bad_command_is_an_error_to_its_sender_alone() -> None:
    room = joined_room(A, B)
    assert room.handle(A, protocol.BadCommand("Usage: /me TEXT"), now=1.0) == [
        ToPeer(A, b"ERROR :Usage: /me TEXT\n")
    ]


def test_a_newcomer_gets_the_last_lines_with_their_times_between_two_notices() -> None:
    room = Room(capacity=100_000, history_lines=2)
    room.handle(A, protocol.Join("alice"), now=0.0)
    for n, said_at in enumerate((60.0, 120.0, 180.0)):
        room.handle(A, protocol.Say(f"line {n}"), now=said_at)
    room.handle(A, protocol.Msg(A, "private: never replayed"), now=200.0)
    room.handle(A, protocol.Me("waves"), now=240.0)
    outputs = room.handle(B, protocol.Join(), now=300.0)
    assert lines_to(outputs, B) == [
        b"* Welcome, 10.0.0.2:2. Others here: 1\n",
        b"* History: 2 lines said before you came\n",
        protocol.history_line(180.0, f"[{ALICE}] line 2\n".encode()),
        protocol.history_line(240.0, f"[{ALICE}] * waves\n".encode()),
        protocol.HISTORY_END_LINE,
    ]
    assert (
        protocol.history_line(180.0, b"x\n")
        .decode()
        .startswith(time.strftime("[%H:%M] ", time.localtime(180.0)))
    )


def test_history_is_bounded_in_bytes_too_and_can_be_turned_off() -> None:
    room = Room(capacity=100_000, history_lines=100, history_bytes=3000)
    room.handle(A, protocol.Join(), now=0.0)
    for n in range(10):
        room.handle(A, protocol.Say(f"{n}" * 1000), now=1.0)
    replay = lines_to(room.handle(B, protocol.Join(), now=2.0), B)[2:-1]
    assert len(replay) == 2 and sum(len(line) for line in replay) <= 3000 + 2 * 20
    silent = Room(capacity=100_000, history_lines=0)
    silent.handle(A, protocol.Join(), now=0.0)
    silent.handle(A, protocol.Say("hello"), now=1.0)
    assert lines_to(silent.handle(B, protocol.Join(), now=2.0), B) == [
        b"* Welcome, 10.0.0.2:2. Others here: 1\n"
    ]


def test_a_full_room_refuses_a_join_and_disconnects_the_peer() -> None:
    room = Room(capacity=2)
    for peer in (A, B):
        room.handle(peer, protocol.Join(), now=0.0)
    assert room.handle(C, protocol.Join(), now=1.0) == [
        ToPeer(C, b"ERROR :Server full (max 2 members)\n"),
        Disconnect(C),
    ]
    assert room.members() == [A, B]


def big_room() -> Room:
    return joined_room(*(f"10.1.{n >> 8}.{n & 255}:1" for n in range(BATCH_ABOVE)))


def test_in_a_large_room_joins_and_leaves_wait_for_one_notice_that_counts_them_all() -> None:
    room = big_room()
    newcomers = [f"10.2.0.{n}:2" for n in range(25)]
    for peer in newcomers:
        outputs = room.handle(peer, protocol.Join(), now=10.0)
        assert broadcasts(outputs) == [] and isinstance(outputs[-1], Joined)
    outputs = room.leave("10.1.0.0:1", protocol.REASON_QUIT, now=10.5)
    assert outputs == [Left("10.1.0.0:1", "quit", BATCH_ABOVE + 24)]
    assert room.next_notice_at == 10.0 + BATCH_SECONDS
    assert room.tell_joins_and_leaves(now=10.9) == []
    named = ", ".join(newcomers[:BATCH_NAMES])
    assert room.tell_joins_and_leaves(now=11.0) == [
        ToMembers(f"* 25 joined: {named}, and 15 more\n".encode(), sender=None),
        ToMembers(b"* 1 left: 10.1.0.0:1 (quit)\n", sender=None),
    ]
    assert room.next_notice_at is None and room.tell_joins_and_leaves(now=20.0) == []


def test_a_small_room_hears_of_each_join_at_once() -> None:
    room = joined_room(*(f"10.1.0.{n}:1" for n in range(BATCH_ABOVE - 1)))
    outputs = room.handle(C, protocol.Join(), now=1.0)
    assert broadcasts(outputs) == [f"* {C} joined\n".encode()]
    assert room.next_notice_at is None


def test_renaming_to_the_same_name_tells_nobody_and_costs_nothing() -> None:
    room = named_room()
    assert room.handle(A, protocol.Nick("alice"), now=1.0) == [
        ToPeer(A, f"* You are now {ALICE}\n".encode())
    ]


def test_in_a_large_room_no_line_overtakes_the_notice_that_its_sender_came() -> None:
    room = big_room()
    newcomer = "10.2.0.1:2"
    room.handle(newcomer, protocol.Join(), now=10.0)
    said = room.handle(newcomer, protocol.Say("hello, I am new"), now=10.1)
    assert broadcasts(said) == [
        f"* 1 joined: {newcomer}\n".encode(),
        f"[{newcomer}] hello, I am new\n".encode(),
    ]
    assert room.next_notice_at is None  # told early: nothing left waiting
    room.leave("10.1.0.5:1", protocol.REASON_QUIT, now=10.2)
    renamed = room.handle(newcomer, protocol.Nick("newbie"), now=10.3)
    assert broadcasts(renamed) == [
        b"* 1 left: 10.1.0.5:1 (quit)\n",
        f"* {newcomer} is now newbie@{newcomer}\n".encode(),
    ]
