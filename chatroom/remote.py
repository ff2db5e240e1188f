"""What one server's room tells the rooms of the other servers sharing it: pure data.

The room emits these (as room.Share outputs) when a local member does something the whole room
must hear of, and takes them back in (Room.apply_remote) when another server's member did. How
they travel (chatroom.bridge: JSON on Redis pub/sub) is no concern of the room's.
Members are named by their own IP:PORT as their server sees it.
"""

from __future__ import annotations

from typing import NamedTuple, Union


class MemberJoined(NamedTuple):
    member: str
    name: str | None


class MemberLeft(NamedTuple):
    member: str
    reason: str


class MemberRenamed(NamedTuple):
    """A member took a name, or lost one (None) to another server's member: see Room."""

    member: str
    name: str | None


class MemberSaid(NamedTuple):
    """A chat line, or an action (/me) when action is True. The name is the member's when it
    spoke, for the room's history."""

    member: str
    name: str | None
    text: str
    action: bool


class PrivateMessage(NamedTuple):
    """A /msg from a member to a member on the server named target_server."""

    sender: str
    target: str
    target_server: str
    text: str


Event = Union[MemberJoined, MemberLeft, MemberRenamed, MemberSaid, PrivateMessage]


class HistoryEntry(NamedTuple):
    """A line of the room's history, as the servers keep it together (in Redis)."""

    said_at: float  # the wall clock's time it was said
    member: str
    name: str | None
    text: str
    action: bool
