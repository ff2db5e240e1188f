"""The room, sans-IO: who is here, and every rule of the room.

A state machine in the manner of h11's Connection: events in (a peer sent a command, a peer
is gone), an ordered list of outputs back (this line to that peer, this line to every member
but one, this member is in, this member is out, close that peer). No sockets, no clock read
(time is an argument), no logging: whoever drives it acts on what it returns, in order.

Peers are named by their identifiers ("IP:PORT", see protocol.format_member_id); a peer that
has not joined is a visitor, who may join, quit or be told to join first.
"""

from __future__ import annotations

from typing import NamedTuple, Union

from chatroom import protocol


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


Output = Union[ToPeer, ToMembers, Joined, Left, Disconnect]


class Room:
    """The members in the order they joined, and the rules that change them."""

    def __init__(self) -> None:
        self._joined_at: dict[str, float] = {}  # member → when it joined; dicts keep join order

    def __len__(self) -> int:
        return len(self._joined_at)

    def __contains__(self, peer: object) -> bool:
        return peer in self._joined_at

    def members(self) -> list[str]:
        """Every member, in the order they joined."""
        return list(self._joined_at)

    def handle(self, peer: str, command: protocol.Command, now: float) -> list[Output]:
        """What the room does when a peer, joined or not, sends a command."""
        if isinstance(command, protocol.Say):
            return self._say(peer, command.text)
        if isinstance(command, protocol.Join):
            return self._join(peer, now)
        if isinstance(command, protocol.Quit):
            return self._quit(peer)
        return []  # a blank line says nothing

    def leave(self, peer: str, reason: str) -> list[Output]:
        """The peer is gone (its connection closed, failed or was cut): the one place a leave
        notice comes from. A visitor leaves without a word."""
        if peer not in self._joined_at:
            return []
        del self._joined_at[peer]
        notice = protocol.left_line(peer, reason)
        return [ToMembers(notice, sender=peer), Left(peer, reason, len(self._joined_at))]

    def _join(self, peer: str, now: float) -> list[Output]:
        if peer in self._joined_at:
            return [ToPeer(peer, protocol.error_line(protocol.ERROR_ALREADY_JOINED))]
        welcome = protocol.welcome_line(peer, len(self._joined_at))
        self._joined_at[peer] = now
        return [
            ToPeer(peer, welcome),
            ToMembers(protocol.joined_line(peer), sender=peer),
            Joined(peer, len(self._joined_at)),
        ]

    def _quit(self, peer: str) -> list[Output]:
        goodbye = ToPeer(peer, protocol.goodbye_line(peer))
        return [goodbye, *self.leave(peer, protocol.REASON_QUIT), Disconnect(peer)]

    def _say(self, peer: str, text: str) -> list[Output]:
        if peer not in self._joined_at:
            return [ToPeer(peer, protocol.error_line(protocol.ERROR_NOT_JOINED))]
        return [ToMembers(protocol.chat_line(peer, text), sender=peer)]
