"""The room, sans-IO: who is here, and every rule of the room.

A state machine in the manner of h11's Connection: events in (a peer sent a command, a peer
is gone), an ordered list of outputs back (this line to that peer, this line to every member
but one, this member is in, this member is out, close that peer). No sockets, no clock read
(time is an argument), no logging: whoever drives it acts on what it returns, in order.

Peers are named by their identifiers ("IP:PORT", see protocol.format_member_id); a peer that
has not joined is a visitor, who may join, quit or be told to join first.
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple, Union

from chatroom import protocol, remote
from chatroom.limits import TokenBucket


class ToPeer(NamedTuple):
    """This line to one peer only, joined or not."""

    peer: str
    line: bytes


class ToMembers(NamedTuple):
    """This line to every member at this point in the outputs but `sender` (None: to all)."""

    line: bytes
    sender: str | None


class Joined(NamedTuple):
    """The peer is a member from this point on; `members` counts the room now."""

    member: str
    members: int


class Left(NamedTuple):
    """The member is gone from this point on; `members` counts the room now."""

    member: str
    reason: str
    members: int


class Disconnect(NamedTuple):
    """The peer has had its last line: close its connection once that line is out."""

    peer: str


class Share(NamedTuple):
    """What the rooms of the other servers sharing this one must hear of (a room made with
    shared=True only)."""

    event: remote.Event


Output = Union[ToPeer, ToMembers, Joined, Left, Disconnect, Share]


# How many lines of history a newcomer gets by default, and the most bytes they may take, so
# the replay never comes near a member's output limits (--sendq-soft is 256 KiB).
HISTORY_LINES = 20
HISTORY_BYTES = 64 * 1024

# In a room of BATCH_ABOVE members or more, joins and leaves are told once every
# BATCH_SECONDS in one line naming up to BATCH_NAMES of them, not in a line each: a storm of
# 10,000 arrivals would otherwise cost 50 million deliveries, every member told of every
# newcomer. Large IRC channels stop announcing at all; here everyone is still told, and /who
# gives the whole picture. A classroom (under BATCH_ABOVE) hears of each at once, as before.
BATCH_ABOVE = 100
BATCH_SECONDS = 1.0
BATCH_NAMES = 10

# The most members of other servers the room holds at once (--redis-max-members): five
# servers of 10,000, at a few hundred bytes each. Anyone who can publish on Redis can invent
# members; past the bound their joins are left out (and counted), not kept without end.
REMOTE_CAPACITY = 50_000

# Renames a member may make at once, then one every RENAME_INTERVAL_SECONDS, so a typo is
# fixed at once but nobody floods the room with rename notices.
RENAME_BURST = 3
RENAME_INTERVAL_SECONDS = 10.0


class Member:
    """One member's standing in the room."""

    __slots__ = ("label", "member_id", "name", "renames", "server")

    def __init__(self, member_id: str, server: str | None = None) -> None:
        self.member_id = member_id  # its own IP:PORT, as its server sees it
        self.server = server  # the server it is on; None: this one
        self.name: str | None = None  # None until it takes one
        self.label = member_id  # how every line names it: protocol.member_label
        # Made at the first /nick: most members never rename, and a room may hold 10,000.
        self.renames: TokenBucket | None = None


def remote_key(server: str, member_id: str) -> str:
    """How the room keys another server's member: its IP:PORT and its server, with a space
    between, which no local peer's identifier holds. Two servers' members may share an
    IP:PORT (each as its own server sees it); they never share a key."""
    return f"{member_id} {server}"


class Room:
    """The members in the order they joined, their names, the room's recent history, and
    the rules that change them. Times are the wall clock's (they are shown in history)."""

    def __init__(
        self,
        capacity: int,
        history_lines: int = HISTORY_LINES,
        history_bytes: int = HISTORY_BYTES,
        shared: bool = False,
        server_id: str = "",
        remote_capacity: int = REMOTE_CAPACITY,
    ) -> None:
        self._capacity = capacity  # the most members of this server's at once
        self._remote_capacity = remote_capacity  # the most of other servers' at once
        self.remote_refused = 0  # other servers' joins left out over it; the server resets it
        # Local members by IP:PORT, other servers' by remote_key; dicts keep join order.
        self._members: dict[str, Member] = {}
        self._local = 0  # how many of _members are this server's
        self._shared = shared  # other servers share the room: emit Share outputs
        self._server_id = server_id  # this server's, for the name tie-break
        self._remote_ids: dict[str, str] = {}  # another server's member's IP:PORT → its key
        # Each other server's members' keys (a dict as an ordered set), so that its roster
        # costs its own members, not the whole room's.
        self._by_server: dict[str, dict[str, None]] = {}
        self._names: dict[str, str] = {}  # lower-cased name → its member's IP:PORT
        self._history: deque[tuple[float, bytes]] = deque(maxlen=history_lines or 1)
        self._history_on = history_lines > 0
        self._history_bytes = 0  # the bytes of the lines in _history
        self._history_limit = history_bytes
        self._joins = _Batch("joined")  # since the last batched notice
        self._leaves = _Batch("left")
        self.next_notice_at: float | None = None  # when the batched notices are due

    def __len__(self) -> int:
        """This server's members: the capacity, and the status line, count them."""
        return self._local

    def __contains__(self, peer: object) -> bool:
        return peer in self._members

    def members(self) -> list[str]:
        """Every member, in the order they joined."""
        return list(self._members)

    def handle(self, peer: str, command: protocol.Command, now: float) -> list[Output]:
        """What the room does when a peer, joined or not, sends a command."""
        if isinstance(command, protocol.Say):
            return self._say(peer, command.text, now)
        if isinstance(command, protocol.Join):
            return self._join(peer, command.name, now)
        if isinstance(command, protocol.Quit):
            return self._quit(peer, now)
        if isinstance(command, protocol.Help):
            return [ToPeer(peer, line) for line in protocol.HELP_LINES]
        if isinstance(command, protocol.BadCommand):
            return _error(peer, command.error)
        if isinstance(command, protocol.Blank):
            return []
        member = self._members.get(peer)
        if member is None:
            return _error(peer, protocol.ERROR_NOT_JOINED)
        if isinstance(command, protocol.Nick):
            return self._rename(peer, member, command.name, now)
        if isinstance(command, protocol.Who):
            return self._who(peer)
        if isinstance(command, protocol.Msg):
            return self._message(peer, member, command.target, command.text)
        return self._act(peer, member, command.text, now)

    def leave(self, peer: str, reason: str, now: float) -> list[Output]:
        """The peer is gone (its connection closed, failed or was cut): the one place a leave
        notice comes from. A visitor leaves without a word, and its name is free again."""
        member = self._members.get(peer)
        if member is None or member.server is not None:
            return []
        self._local -= 1
        shared = [Share(remote.MemberLeft(peer, reason))] if self._shared else []
        return [*self._remove(peer, member, reason, now), *shared, Left(peer, reason, len(self))]

    def _remove(self, key: str, member: Member, reason: str, now: float) -> list[Output]:
        """A member is gone, from this server or another: its name is free, and the room told."""
        del self._members[key]
        if member.server is not None:
            if self._remote_ids.get(member.member_id) == key:
                del self._remote_ids[member.member_id]
            keys = self._by_server[member.server]
            del keys[key]
            if not keys:
                del self._by_server[member.server]
        if member.name is not None:
            del self._names[member.name.lower()]
        if self._batching(self._leaves, f"{member.label} ({reason})", now):
            return []
        return [ToMembers(protocol.left_line(member.label, reason), sender=key)]

    def tell_joins_and_leaves(self, now: float) -> list[Output]:
        """The batched notices, once next_notice_at has come: one line for the joins and one
        for the leaves since the last ones, to every member."""
        if self.next_notice_at is None or now < self.next_notice_at:
            return []
        return self._notices_waiting()

    def tell_all(self, line: bytes) -> list[Output]:
        """A notice of the server's own to every member, after any batched one waiting."""
        return [*self._notices_waiting(), ToMembers(line, sender=None)]

    def _notices_waiting(self) -> list[Output]:
        """The batched notices now, early if need be: any other line to the room goes after
        them, so nobody is heard from, or renamed, before the notice that they came."""
        if self.next_notice_at is None:
            return []
        self.next_notice_at = None
        return [
            ToMembers(line, sender=None)
            for line in (self._joins.told(), self._leaves.told())
            if line is not None
        ]

    def _batching(self, batch: _Batch, name: str, now: float) -> bool:
        """Whether a join or leave waits for the next batched notice (a large room, or one
        is already waiting, so that no notice overtakes another); if so, it is counted in."""
        if len(self._members) < BATCH_ABOVE and self.next_notice_at is None:
            return False
        batch.add(name)
        if self.next_notice_at is None:
            self.next_notice_at = now + BATCH_SECONDS
        return True

    def _join(self, peer: str, name: str | None, now: float) -> list[Output]:
        if peer in self._members:
            return _error(peer, protocol.ERROR_ALREADY_JOINED)
        if self._local >= self._capacity:
            full = protocol.error_line(protocol.server_full_error(self._capacity))
            return [ToPeer(peer, full), Disconnect(peer)]
        refusal = None if name is None else self._refusal_of_name(name)
        if refusal is not None:
            return _error(peer, refusal)
        member = Member(peer)
        if name is not None:
            self._take_name(peer, member, name)
        welcome = protocol.welcome_line(member.label, len(self._members))
        self._local += 1
        shared = [Share(remote.MemberJoined(peer, name))] if self._shared else []
        return [
            ToPeer(peer, welcome),
            *self._replay_history(peer),
            *self._add(peer, member, now),
            *shared,
            Joined(peer, len(self)),
        ]

    def _add(self, key: str, member: Member, now: float) -> list[Output]:
        """A member is in, from this server or another: the room is told."""
        batched = self._batching(self._joins, member.label, now)
        self._members[key] = member
        if member.server is not None:
            self._remote_ids[member.member_id] = key
            self._by_server.setdefault(member.server, {})[key] = None
        if batched:
            return []
        return [ToMembers(protocol.joined_line(member.label), sender=key)]

    def _replay_history(self, peer: str) -> list[Output]:
        if not self._history_on or not self._history:
            return []
        return [
            ToPeer(peer, protocol.history_start_line(len(self._history))),
            *(
                ToPeer(peer, protocol.history_line(said_at, line))
                for said_at, line in self._history
            ),
            ToPeer(peer, protocol.HISTORY_END_LINE),
        ]

    def _quit(self, peer: str, now: float) -> list[Output]:
        member = self._members.get(peer)
        goodbye = ToPeer(peer, protocol.goodbye_line(peer if member is None else member.label))
        return [goodbye, *self.leave(peer, protocol.REASON_QUIT, now), Disconnect(peer)]

    def _say(self, peer: str, text: str, now: float) -> list[Output]:
        member = self._members.get(peer)
        if member is None:
            return _error(peer, protocol.ERROR_NOT_JOINED)
        return self._to_room(peer, member, text, False, now)

    def _act(self, peer: str, member: Member, text: str, now: float) -> list[Output]:
        return self._to_room(peer, member, text, True, now)

    def _to_room(
        self, key: str, member: Member, text: str, action: bool, now: float
    ) -> list[Output]:
        """A line said to the room: to every other member, into the history, and to the
        other servers if it was said here."""
        line = (protocol.action_line if action else protocol.chat_line)(member.label, text)
        if self._history_on:
            self._remember(line, now)
        outputs: list[Output] = [*self._notices_waiting(), ToMembers(line, key)]
        if self._shared and member.server is None:
            outputs.append(Share(remote.MemberSaid(key, member.name, text, action)))
        return outputs

    def _remember(self, line: bytes, now: float) -> None:
        history = self._history
        if len(history) == history.maxlen:
            self._history_bytes -= len(history[0][1])
        history.append((now, line))
        self._history_bytes += len(line)
        while self._history_bytes > self._history_limit:
            self._history_bytes -= len(history.popleft()[1])

    def _rename(self, peer: str, member: Member, name: str, now: float) -> list[Output]:
        if name == member.name:
            return [ToPeer(peer, protocol.named_line(member.label))]  # nothing changes
        refusal = self._refusal_of_name(name, member)
        if member.renames is None:
            member.renames = TokenBucket(1 / RENAME_INTERVAL_SECONDS, RENAME_BURST, now)
            member.renames.take()  # a new bucket holds one more, for a !Join: none to pay here
        if refusal is None:
            wait = member.renames.seconds_until_token(now)
            if wait > 0:
                refusal = protocol.rename_too_soon_error(wait)
        if refusal is not None:
            return _error(peer, refusal)
        member.renames.take()
        old_label = member.label
        self._take_name(peer, member, name)
        shared = [Share(remote.MemberRenamed(peer, name))] if self._shared else []
        return [
            ToPeer(peer, protocol.named_line(member.label)),
            *self._notices_waiting(),
            ToMembers(protocol.renamed_line(old_label, member.label), sender=peer),
            *shared,
        ]

    def _refusal_of_name(self, name: str, member: Member | None = None) -> str | None:
        if not protocol.NAME_PATTERN.match(name):
            return protocol.ERROR_INVALID_NAME
        holder = self._names.get(name.lower())
        if holder is not None and self._members.get(holder) is not member:
            return protocol.name_taken_error(name)
        return None

    def _take_name(self, key: str, member: Member, name: str | None) -> None:
        if member.name is not None:
            del self._names[member.name.lower()]
        if name is not None:
            self._names[name.lower()] = key
        member.name = name
        member.label = protocol.member_label(member.member_id, name)

    def _who(self, peer: str) -> list[Output]:
        labels = (
            member.label if member.server is None else f"{member.label} (on {member.server})"
            for member in self._members.values()
        )
        return [ToPeer(peer, protocol.who_line(labels, len(self._members)))]

    def _message(self, peer: str, member: Member, target: str, text: str) -> list[Output]:
        to = self._find(target)
        if to is None:
            return _error(peer, protocol.no_such_member_error(target))
        recipient = self._members[to]
        sent = ToPeer(peer, protocol.private_sent_line(recipient.label, text))
        if recipient.server is None:
            return [ToPeer(to, protocol.private_line(member.label, text)), sent]
        message = remote.PrivateMessage(peer, recipient.member_id, recipient.server, text)
        return [Share(message), sent]

    def _find(self, target: str) -> str | None:
        """The member a /msg means: by name, whatever its case, or by IP:PORT (this
        server's member first, should another server's have the same one)."""
        if target in self._members:
            return target
        return self._names.get(target.lower()) or self._remote_ids.get(target)

    # Other servers' members, as their servers tell of them (chatroom.bridge). Their lines
    # go to every member here (sender=their key, which no connection holds).

    def apply_remote(self, server: str, event: remote.Event, now: float) -> list[Output]:
        """What the room does when another server's member did something."""
        if isinstance(event, remote.PrivateMessage):
            return self._private_from(server, event)
        key = remote_key(server, event.member)
        member = self._members.get(key)
        if isinstance(event, remote.MemberJoined):
            if member is not None:
                return self._claim(key, member, event.name)
            if len(self._members) - self._local >= self._remote_capacity:
                self.remote_refused += 1
                return []
            member = Member(event.member, server)
            return [*self._claim(key, member, event.name, tell=False), *self._add(key, member, now)]
        if isinstance(event, remote.MemberSaid):
            speaker = member or Member(event.member, server)  # its join was missed: its IP:PORT
            return self._to_room(key, speaker, event.text, event.action, now)
        if member is None:
            return []
        if isinstance(event, remote.MemberRenamed):
            return [*self._notices_waiting(), *self._claim(key, member, event.name)]
        return self._remove(key, member, event.reason, now)

    def sync_server(
        self, server: str, roster: list[tuple[str, str | None]], now: float
    ) -> list[Output]:
        """Another server's whole membership (IP:PORT, name), as it announced it: members it
        no longer has left (connection lost: their leaves were missed), new ones joined."""
        keys = {remote_key(server, member_id) for member_id, _ in roster}
        outputs = [
            output
            for key in list(self._by_server.get(server, ()))
            if key not in keys
            for output in self._remove(key, self._members[key], protocol.REASON_LOST, now)
        ]
        for member_id, name in roster:
            outputs += self.apply_remote(server, remote.MemberJoined(member_id, name), now)
        return outputs

    def forget_server(self, server: str, now: float) -> list[Output]:
        """Another server is gone (no word from it in time): its members left."""
        return self.sync_server(server, [], now)

    def roster(self) -> list[tuple[str, str | None]]:
        """This server's members (IP:PORT, name), in join order, for the other servers."""
        return [(key, m.name) for key, m in self._members.items() if m.server is None]

    def load_history(self, entries: list[remote.HistoryEntry]) -> None:
        """The room's history as the other servers kept it: it replaces this server's own."""
        self._history.clear()
        self._history_bytes = 0
        for entry in entries:
            label = protocol.member_label(entry.member, entry.name)
            line = (protocol.action_line if entry.action else protocol.chat_line)(label, entry.text)
            self._remember(line, entry.said_at)

    def _private_from(self, server: str, message: remote.PrivateMessage) -> list[Output]:
        recipient = self._members.get(message.target)
        if recipient is None or recipient.server is not None:
            return []  # gone since: private messages are at most once, as every remote line
        sender = self._members.get(remote_key(server, message.sender))
        label = message.sender if sender is None else sender.label
        return [ToPeer(message.target, protocol.private_line(label, message.text))]

    def _claim(self, key: str, member: Member, name: str | None, tell: bool = True) -> list[Output]:
        """Another server's member takes a name (or none). Two servers may grant one name at
        the same moment (or during a split): the claim of the member whose (server, IP:PORT)
        sorts first keeps it, and the other member loses its name, on every server alike, so
        names stay unique without a round trip. A local loser is told, and its loss shared."""
        if name == member.name:
            return []
        outputs: list[Output] = []
        holder_key = None if name is None else self._names.get(name.lower())
        if holder_key is not None and holder_key != key:
            holder = self._members[holder_key]
            if self._rank(holder) < self._rank(member):
                name = None  # the holder keeps it, and this member has none
            else:
                outputs += self._unname(holder_key, holder)
        if name == member.name:
            return outputs
        old_label = member.label
        self._take_name(key, member, name)
        if tell:
            renamed = protocol.renamed_line(old_label, member.label)
            outputs.append(ToMembers(renamed, sender=key))
        return outputs

    def _unname(self, key: str, member: Member) -> list[Output]:
        """A member loses its name to another server's member's claim."""
        old_label = member.label
        self._take_name(key, member, None)
        outputs: list[Output] = [ToMembers(protocol.renamed_line(old_label, member.label), key)]
        if member.server is None:
            outputs.insert(0, ToPeer(key, protocol.named_line(member.label)))
            if self._shared:
                outputs.append(Share(remote.MemberRenamed(key, None)))
        return outputs

    def _rank(self, member: Member) -> tuple[str, str]:
        server = self._server_id if member.server is None else member.server
        return server, member.member_id


class _Batch:
    """Joins or leaves waiting for the next batched notice: the first few named, all counted."""

    def __init__(self, verb: str) -> None:
        self._verb = verb  # "joined" or "left"
        self._names: list[str] = []  # the first BATCH_NAMES
        self._count = 0

    def add(self, name: str) -> None:
        if len(self._names) < BATCH_NAMES:
            self._names.append(name)
        self._count += 1

    def told(self) -> bytes | None:
        """The notice for what is waiting, if anything; the batch starts over."""
        if not self._count:
            return None
        line = protocol.batch_notice_line(self._count, self._verb, self._names)
        self._names, self._count = [], 0
        return line


def _error(peer: str, text: str) -> list[Output]:
    return [ToPeer(peer, protocol.error_line(text))]
