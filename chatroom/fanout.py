"""One loop turn's lines for the room's peers, kept in the order they were produced and handed
out once, at the end of the turn. Pure bookkeeping: no sockets.

A broadcast is stored once, not copied per member. Every member that gets all of a turn's
broadcasts gets one shared bytes object (Redis' shared objects); only the few peers whose share
differs (they sent a line, joined, left, finished, or were told something of their own this
turn) get a selection of their own, cut from the same ordered list, so no line overtakes another.
"""

from __future__ import annotations

import sys
from collections.abc import Hashable, Iterator
from typing import Generic, TypeVar

Peer = TypeVar("Peer", bound=Hashable)

_NEVER = sys.maxsize  # a window bound past any line of the turn


class Fanout(Generic[Peer]):
    def __init__(self) -> None:
        self._audience: dict[Peer, None] = {}  # who gets broadcasts: the members, in join order
        self._lines: list[bytes] = []  # this turn's lines, in order
        self._only: list[Peer | None] = []  # the one peer each line is for; None: a broadcast
        self._sender: list[Peer | None] = []  # for a broadcast, the member it leaves out
        # Peers whose share is not "every broadcast": [first broadcast, end of broadcasts,
        # end of everything] as indices into _lines.
        self._windows: dict[Peer, list[int]] = {}
        self.pending_bytes = 0  # the bytes of this turn's lines, each counted once
        self._direct_lines = 0  # how many of them are for one peer only

    def __len__(self) -> int:
        """How many peers get broadcasts."""
        return len(self._audience)

    def has_lines(self) -> bool:
        return bool(self._lines)

    def add_member(self, peer: Peer) -> None:
        """From this point on, the peer gets broadcasts."""
        self._window(peer)[0] = len(self._lines)
        self._audience[peer] = None

    def remove_member(self, peer: Peer) -> None:
        """From this point on, the peer gets no broadcasts. A peer that left does not join
        again in the same turn (its connection is on its way out)."""
        self._window(peer)[1] = len(self._lines)
        del self._audience[peer]

    def finish(self, peer: Peer) -> None:
        """The peer's last line has been produced: nothing after this point is for it."""
        window = self._window(peer)
        window[1] = min(window[1], len(self._lines))
        window[2] = len(self._lines)

    def to_members(self, line: bytes, sender: Peer | None = None) -> None:
        """The line for every member but its sender."""
        self._append(line, None, sender)
        if sender is not None:
            self._window(sender)

    def to_peer(self, peer: Peer, line: bytes) -> None:
        """The line for one peer only, member or not."""
        self._append(line, peer, None)
        self._direct_lines += 1
        self._window(peer)

    def take(self) -> Iterator[tuple[Peer, bytes]]:
        """Each peer's share of the turn's lines, in order, and a fresh turn. Shares are cut
        one at a time as they are asked for, so only one is held beside the queues; lines
        produced meanwhile (a peer dropped by a delivery) belong to the next turn."""
        turn = _Turn(self._lines, self._only, self._sender, self._direct_lines)
        windows, audience = self._windows, list(self._audience)
        self._lines, self._only, self._sender, self._windows = [], [], [], {}
        self.pending_bytes = self._direct_lines = 0
        return turn.shares(audience, windows)

    def _append(self, line: bytes, only: Peer | None, sender: Peer | None) -> None:
        self._lines.append(line)
        self._only.append(only)
        self._sender.append(sender)
        self.pending_bytes += len(line)

    def _window(self, peer: Peer) -> list[int]:
        """The peer's own window, opened the first time its share differs this turn."""
        window = self._windows.get(peer)
        if window is None:
            first = 0 if peer in self._audience else _NEVER
            window = self._windows[peer] = [first, _NEVER, _NEVER]
        return window


class _Turn(Generic[Peer]):
    """One turn's lines, taken out of the fan-out to be handed out."""

    def __init__(
        self,
        lines: list[bytes],
        only: list[Peer | None],
        senders: list[Peer | None],
        direct_lines: int,
    ) -> None:
        self._lines, self._only, self._senders = lines, only, senders
        self._direct_lines = direct_lines

    def shares(
        self, audience: list[Peer], windows: dict[Peer, list[int]]
    ) -> Iterator[tuple[Peer, bytes]]:
        if self._direct_lines:
            everything = b"".join(line for line, to in zip(self._lines, self._only) if to is None)
        else:
            everything = b"".join(self._lines)
        if everything:
            for peer in audience:
                if peer not in windows:
                    yield peer, everything
        for peer, window in windows.items():
            share = self._share_of(peer, *window)
            if share:
                yield peer, share

    def _share_of(self, peer: Peer, first: int, end_of_broadcasts: int, end: int) -> bytes:
        lines, senders = self._lines, self._senders
        if not self._direct_lines and (first, end_of_broadcasts, end) == (0, _NEVER, _NEVER):
            # A member all turn that sent some of the lines: the usual case, kept quick.
            return b"".join(line for line, sender in zip(lines, senders) if sender is not peer)
        return b"".join(
            line
            for index, (line, to, sender) in enumerate(zip(lines[:end], self._only, senders))
            if to is peer
            or (to is None and sender is not peer and first <= index < end_of_broadcasts)
        )
