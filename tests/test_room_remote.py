"""The room's rules for members of other servers, without sockets: each rule as a unit test,
and a hypothesis state machine of three rooms sharing their events in one order (as Redis'
one channel does), checking that they agree on who is in the room under which name."""

from __future__ import annotations

import re
import time
from collections import deque

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from chatroom import protocol, remote
from chatroom.room import Joined, Left, Output, Room, Share, ToMembers, ToPeer, remote_key

A, B = "10.0.0.1:1", "10.0.0.2:2"
R = "10.9.9.9:9"  # a member of server "s2"


def shared_room(server_id: str = "s1", capacity: int = 100) -> Room:
    return Room(capacity, shared=True, server_id=server_id)


def test_a_local_join_is_shared_and_a_plain_room_shares_nothing() -> None:
    room = shared_room()
    outputs = room.handle(A, protocol.Join("ann"), now=0.0)
    assert Share(remote.MemberJoined(A, "ann")) in outputs
    plain = Room(100)
    assert not any(isinstance(o, Share) for o in plain.handle(A, protocol.Join(), now=0.0))


def test_other_servers_members_are_bounded_and_the_ones_left_out_counted() -> None:
    """A forged server (anyone who can publish) announcing a million members must not grow
    memory without end: past the bound, joins from other servers are left out and counted."""
    room = Room(100, shared=True, server_id="s1", remote_capacity=3)
    room.handle(A, protocol.Join(), now=0.0)
    forged: list[tuple[str, str | None]] = [
        (f"10.6.{i // 256}.{i % 256}:6", None) for i in range(1000)
    ]
    room.sync_server("evil", forged, now=1.0)
    room.apply_remote("s2", remote.MemberJoined(R, "rob"), now=2.0)
    assert room.remote_refused == 998
    assert who_count(room) == 4
    assert room.handle(B, protocol.Join(), now=4.0)[-1] == Joined(B, 2)  # locals unaffected
    room.forget_server("evil", now=5.0)
    assert room.apply_remote("s2", remote.MemberJoined(R, "rob"), now=6.0)
    assert who_count(room) == 3


def test_a_roster_costs_its_own_servers_members_not_the_whole_room() -> None:
    """A hello from one server once looked over every member of the room: with 50,000 of
    other servers' members, 22 ms for a forged one-member roster, so a few hundred tiny
    messages a second from anyone stalled the server."""
    room = shared_room()
    for k in range(5):
        roster: list[tuple[str, str | None]] = [
            (f"10.{k}.{i // 256}.{i % 256}:1", None) for i in range(10_000)
        ]
        room.sync_server(f"big{k}", roster, now=0.0)
    started = time.perf_counter()
    for n in range(200):
        room.sync_server("evil", [(f"6.6.6.{n % 256}:6", None)], now=1.0)
    assert time.perf_counter() - started < 1.0  # 4.4 s when each looked over all 50,000


def who_count(room: Room) -> int:
    """How many members A's /who lists."""
    [who] = room.handle(A, protocol.Who(), now=9.0)
    assert isinstance(who, ToPeer)
    return int(who.line.split()[1])


def test_a_remote_member_joins_speaks_and_counts_in_the_room_not_the_server() -> None:
    room = shared_room()
    room.handle(A, protocol.Join(), now=0.0)
    assert room.apply_remote("s2", remote.MemberJoined(R, "rob"), now=1.0) == [
        ToMembers(b"* rob@10.9.9.9:9 joined\n", sender=remote_key("s2", R))
    ]
    assert len(room) == 1  # this server's members: its capacity counts them
    welcome = room.handle(B, protocol.Join(), now=2.0)[0]
    assert welcome == ToPeer(B, b"* Welcome, 10.0.0.2:2. Others here: 2\n")
    said = room.apply_remote("s2", remote.MemberSaid(R, "rob", "hi", False), now=3.0)
    assert said == [ToMembers(b"[rob@10.9.9.9:9] hi\n", sender=remote_key("s2", R))]
    assert room.handle(A, protocol.Who(), now=4.0) == [
        ToPeer(A, b"* 3 here: 10.0.0.1:1, rob@10.9.9.9:9 (on s2), 10.0.0.2:2\n")
    ]


def test_remote_lines_go_into_the_history() -> None:
    room = shared_room()
    room.apply_remote("s2", remote.MemberJoined(R, None), now=0.0)
    room.apply_remote("s2", remote.MemberSaid(R, None, "waves", True), now=0.0)
    replay = room.handle(A, protocol.Join(), now=1.0)
    assert ToPeer(A, protocol.history_line(0.0, b"[10.9.9.9:9] * waves\n")) in replay


def test_a_name_held_on_another_server_is_taken() -> None:
    room = shared_room()
    room.apply_remote("s2", remote.MemberJoined(R, "rob"), now=0.0)
    assert room.handle(A, protocol.Join("ROB"), now=1.0) == [ToPeer(A, b"ERROR :Name taken: ROB\n")]


def test_msg_to_a_remote_member_is_shared_and_one_from_it_delivered() -> None:
    room = shared_room()
    room.handle(A, protocol.Join("ann"), now=0.0)
    room.apply_remote("s2", remote.MemberJoined(R, "rob"), now=0.0)
    assert room.handle(A, protocol.Msg("Rob", "psst"), now=1.0) == [
        Share(remote.PrivateMessage(A, R, "s2", "psst")),
        ToPeer(A, b"* Private to rob@10.9.9.9:9: psst\n"),
    ]
    assert room.handle(A, protocol.Msg(R, "by address"), now=1.0)[0] == Share(
        remote.PrivateMessage(A, R, "s2", "by address")
    )
    back = room.apply_remote("s2", remote.PrivateMessage(R, A, "s1", "hey"), now=2.0)
    assert back == [ToPeer(A, b"[rob@10.9.9.9:9 (private)] hey\n")]
    gone = room.apply_remote("s2", remote.PrivateMessage(R, B, "s1", "nobody"), now=2.0)
    assert gone == []


def test_a_gone_server_s_members_leave_and_free_their_names() -> None:
    room = shared_room()
    room.handle(A, protocol.Join(), now=0.0)
    room.apply_remote("s2", remote.MemberJoined(R, "rob"), now=0.0)
    assert room.forget_server("s2", now=1.0) == [
        ToMembers(b"* rob@10.9.9.9:9 left (connection lost)\n", sender=remote_key("s2", R))
    ]
    assert room.handle(B, protocol.Join("rob"), now=2.0)[0] == ToPeer(
        B, b"* Welcome, rob@10.0.0.2:2. Others here: 1\n"
    )


def test_a_roster_brings_the_room_up_to_date() -> None:
    room = shared_room()
    room.apply_remote("s2", remote.MemberJoined(R, "rob"), now=0.0)
    room.apply_remote("s2", remote.MemberJoined("10.9.9.9:10", None), now=0.0)
    outputs = room.sync_server("s2", [(R, "robert"), ("10.9.9.9:11", None)], now=1.0)
    assert [o.line for o in outputs if isinstance(o, ToMembers)] == [
        b"* 10.9.9.9:10 left (connection lost)\n",
        b"* rob@10.9.9.9:9 is now robert@10.9.9.9:9\n",
        b"* 10.9.9.9:11 joined\n",
    ]
    assert room.sync_server("s2", [(R, "robert"), ("10.9.9.9:11", None)], now=2.0) == []


def test_two_servers_granting_one_name_at_once_agree_on_its_holder() -> None:
    one, two = shared_room("s1"), shared_room("s2")
    one_out = one.handle(A, protocol.Join("sam"), now=0.0)
    two_out = two.handle(R, protocol.Join("SAM"), now=0.0)
    # Each hears of the other's claim: the (server, IP:PORT) that sorts first keeps it.
    on_two = two.apply_remote("s1", _shared(one_out)[0], now=1.0)
    on_one = one.apply_remote("s2", _shared(two_out)[0], now=1.0)
    assert on_one == [ToMembers(b"* 10.9.9.9:9 joined\n", sender=remote_key("s2", R))]
    assert on_two[:2] == [
        ToPeer(R, b"* You are now 10.9.9.9:9\n"),
        ToMembers(b"* SAM@10.9.9.9:9 is now 10.9.9.9:9\n", sender=R),
    ]
    assert Share(remote.MemberRenamed(R, None)) in on_two
    assert one.apply_remote("s2", remote.MemberRenamed(R, None), now=2.0) == []


def test_a_line_from_a_member_whose_join_was_missed_is_still_heard() -> None:
    room = shared_room()
    assert room.apply_remote("s2", remote.MemberSaid(R, None, "hi", False), now=0.0) == [
        ToMembers(b"[10.9.9.9:9] hi\n", sender=remote_key("s2", R))
    ]


def test_the_capacity_counts_this_servers_members_only() -> None:
    room = shared_room(capacity=1)
    room.apply_remote("s2", remote.MemberJoined(R, None), now=0.0)
    assert room.handle(A, protocol.Join(), now=0.0)[-1] == Joined(A, 1)


def _shared(outputs: list[Output]) -> list[remote.Event]:
    return [output.event for output in outputs if isinstance(output, Share)]


# Three rooms, each a server, sharing one bus in one order; members come, rename (often to
# the same few names, so claims collide), talk and go; the bus is delivered at any moment.

SERVERS = ("s1", "s2", "s3")


class SharedRooms(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.rooms = {server: shared_room(server) for server in SERVERS}
        self.bus: deque[tuple[str, remote.Event]] = deque()  # published, not yet delivered
        self.inboxes: dict[str, list[bytes]] = {}  # by member (IP:PORT, unique in this test)
        self.server_of: dict[str, str] = {}
        self.ports = iter(range(1, 100_000))
        self.said = 0
        self.now = 0.0

    def carry_out(self, server: str, outputs: list[Output]) -> None:
        room = self.rooms[server]
        for output in outputs:
            if isinstance(output, Share):
                self.bus.append((server, output.event))
            elif isinstance(output, ToPeer):
                self.inboxes[output.peer].append(output.line)
            elif isinstance(output, ToMembers):
                for member in room.roster():
                    if member[0] != output.sender:
                        self.inboxes[member[0]].append(output.line)
            elif isinstance(output, Left):
                del self.inboxes[output.member]

    def local(self, server: str) -> list[str]:
        return [member for member, _ in self.rooms[server].roster()]

    @rule(server=st.sampled_from(SERVERS), name=st.sampled_from([None, "ann", "ANN", "bob"]))
    def join(self, server: str, name: str | None) -> None:
        member = f"10.0.0.{SERVERS.index(server) + 1}:{next(self.ports)}"
        self.inboxes[member] = []
        self.server_of[member] = server
        self.now += 1
        self.carry_out(server, self.rooms[server].handle(member, protocol.Join(name), self.now))
        if member not in self.rooms[server]:
            del self.inboxes[member]  # name taken: not joined

    @precondition(lambda self: self.inboxes)
    @rule(data=st.data(), name=st.sampled_from(["ann", "bob", "cat"]))
    def rename(self, data: st.DataObject, name: str) -> None:
        member = data.draw(st.sampled_from(sorted(self.inboxes)))
        server = self.server_of[member]
        self.now += 100  # never too soon: that rule has its own test
        self.carry_out(server, self.rooms[server].handle(member, protocol.Nick(name), self.now))

    @precondition(lambda self: self.inboxes)
    @rule(data=st.data())
    def say(self, data: st.DataObject) -> None:
        member = data.draw(st.sampled_from(sorted(self.inboxes)))
        server = self.server_of[member]
        self.said += 1
        text = f"line{self.said}"
        self.carry_out(server, self.rooms[server].handle(member, protocol.Say(text), self.now))

    @precondition(lambda self: self.inboxes)
    @rule(data=st.data())
    def leave(self, data: st.DataObject) -> None:
        member = data.draw(st.sampled_from(sorted(self.inboxes)))
        server = self.server_of[member]
        self.carry_out(server, self.rooms[server].leave(member, protocol.REASON_QUIT, self.now))

    @precondition(lambda self: self.bus)
    @rule(count=st.integers(1, 10))
    def deliver(self, count: int) -> None:
        for _ in range(min(count, len(self.bus))):
            self.deliver_one()

    def deliver_one(self) -> None:
        origin, event = self.bus.popleft()
        for server in SERVERS:
            if server != origin:
                outputs = self.rooms[server].apply_remote(origin, event, self.now)
                self.carry_out(server, outputs)

    @invariant()
    def names_are_unique_and_every_room_agrees_once_the_bus_is_empty(self) -> None:
        views = []
        for server, room in self.rooms.items():
            view = {
                (member.member_id, member.server or server, member.name)
                for member in room._members.values()
            }
            names = [name.lower() for _, _, name in view if name is not None]
            assert len(names) == len(set(names))
            views.append(view)
        if not self.bus:
            assert views[0] == views[1] == views[2]

    @invariant()
    def every_line_arrives_once_and_in_its_senders_order(self) -> None:
        for lines in self.inboxes.values():
            by_sender: dict[bytes, list[int]] = {}
            for line in lines:
                match = _CHAT.match(line)
                if match is not None:
                    by_sender.setdefault(match[1], []).append(int(match[2]))
            for said in by_sender.values():
                assert said == sorted(set(said))


# A chat line: its sender's IP:PORT (whatever its name) and its number.
_CHAT = re.compile(rb"\[(?:[A-Za-z][\w-]*@)?(\S+)\] line(\d+)\n")

SharedRooms.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_shared_rooms = SharedRooms.TestCase
