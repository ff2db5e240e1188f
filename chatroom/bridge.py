"""The bridge between servers sharing one room, sans-IO: what a server publishes, what a
message from another server means, and who is still there. Bytes in, items out; events in,
bytes out; time is an argument. How the bytes travel (Redis pub/sub, chatroom.redis_link) is
no concern of this module's.

Every message is one JSON object (ARCHITECTURE.md, "The bridge's messages"): its server's id
"s", that server's sequence number "n" (1, 2, 3, ... from its start: a gap is a message
missed), its type "t" and the type's fields. Messages come from other processes through a
shared Redis, so they are a peer's bytes like any client's: checked field by field, text
re-sanitised and capped, and a bad one refused with BadMessage, which the transport logs.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple, TypeVar, Union

from chatroom import protocol, remote

# A server says it is alive this often: a PUBLISH of a few dozen bytes, to every server.
HEARTBEAT_SECONDS = 2.0
# A server not heard from for this long is gone, and its members are reported left: four
# heartbeats missed, so a busy or briefly stalled server is not taken for dead, and well inside
# the 15 s the interface promises (the loop notices within one timer's wake-up).
TIMEOUT_SECONDS = 8.0
# The queue of commands to Redis: a few thousand chat lines' worth. It only fills while Redis
# is slow to read (a hung Redis is cut after the timeout); past it, lines for the other servers
# are dropped and counted, as pub/sub would lose them anyway.
QUEUE_BYTES = 1024 * 1024

# Redis delivers one server's messages in the order it sent them, so a number at or just
# below the last one taken is a message replayed, and dropped. One further below means the
# numbering was broken (a number far ahead, forged by anyone who can publish, was taken first):
# the server's count starts over from it and its roster is asked for, rather than all it says
# being dropped as old until the forged number is passed.
REPLAY_WINDOW = 1024

# The most other servers known at once: far more than one room needs, and few enough that
# anyone publishing under new ids costs little (each is kept, and looked over each turn, until
# it has been silent for the timeout). A message from a new server past it is refused.
MAX_SERVERS = 1024

# A history record's date, which every newcomer is shown (time.localtime): from the epoch to
# the end of year 9999, so a forged NaN, infinity or 1e300 cannot fail each join.
LATEST_DATE = 253402300799.0

# The longest message taken from Redis: a roster of 10,000 members (~45 bytes each in JSON)
# fits, and one hostile publisher cannot make a server parse or hold more.
MAX_MESSAGE = 1024 * 1024


def most_text_bytes(max_line: int) -> int:
    """The most bytes of a chat line's text once sanitised: each byte of a client's line (at
    most max_line) may become U+FFFD, three bytes in UTF-8."""
    return 3 * max_line


def most_say_bytes(max_line: int) -> int:
    """The longest chat line's message: JSON writes such text in no more bytes than it has
    (a quote or a backslash takes two, U+FFFD its own three), plus the fields around it."""
    return most_text_bytes(max_line) + 1024


_SERVER_ID = re.compile(r"[0-9A-Za-z_.:-]{1,64}\Z")
_MEMBER_ID = re.compile(r"(?:\d{1,3}(?:\.\d{1,3}){3}|\[[0-9A-Fa-f:.%]{2,64}\]):\d{1,5}\Z")
_REASONS = frozenset(
    {
        protocol.REASON_QUIT,
        protocol.REASON_CLOSED,
        protocol.REASON_LOST,
        protocol.REASON_TOO_SLOW,
        protocol.REASON_TIMEOUT,
        protocol.REASON_SERVER_ERROR,
    }
)


class BadMessage(Exception):
    """A message from another server (or from anyone who can publish on the room's channel)
    that breaks the format: logged and dropped, never acted on."""


class FromServer(NamedTuple):
    """Another server's member did something."""

    server: str
    event: remote.Event


class Roster(NamedTuple):
    """Another server's whole membership; if ask, it wants every server's in return."""

    server: str
    members: list[tuple[str, str | None]]
    ask: bool


class Gap(NamedTuple):
    """Messages from a server were missed (Redis is at most once): its roster must be asked
    for again. missed is how many, or 0 for a server not heard from before."""

    server: str
    missed: int


class ServerGone(NamedTuple):
    """A server was not heard from within the timeout: its members are gone with it."""

    server: str


class HistoryLoaded(NamedTuple):
    """The room's history, as read from Redis on (re)connecting."""

    entries: list[remote.HistoryEntry]


class LinkDown(NamedTuple):
    """This server is cut off from the others: the room is split."""


class LinkUp(NamedTuple):
    """This server hears and is heard by the others again: the room is whole."""


Received = Union[FromServer, Roster, Gap, ServerGone]
# What the transport hands the server: what the others said, and its own state.
Incoming = Union[FromServer, Roster, ServerGone, HistoryLoaded, LinkDown, LinkUp]


class _Peer:
    """What this server knows of another."""

    __slots__ = ("heard_at", "seq")

    def __init__(self, seq: int, heard_at: float) -> None:
        self.seq = seq  # the last sequence number taken from it
        self.heard_at = heard_at  # when it was last heard from


class Bridge:
    """One server's side of the shared room: numbering what it sends, checking what it is
    sent, the presence of the other servers (who is there, who has gone silent), and the
    clock of its own link (when to beat, when to ask for rosters, when Redis is too quiet)."""

    def __init__(
        self,
        server_id: str,
        max_line: int = protocol.MAX_LINE,
        timeout: float = TIMEOUT_SECONDS,
        max_message: int = MAX_MESSAGE,
        heartbeat: float = HEARTBEAT_SECONDS,
        max_servers: int = MAX_SERVERS,
    ) -> None:
        self.server_id = server_id
        self._max_text = most_text_bytes(max_line)  # a remote text's most, as a local one's
        self._timeout = timeout
        self._max_message = max_message
        self._heartbeat = heartbeat
        self._max_servers = max_servers
        self._seq = 0  # the last sequence number this server used
        self._peers: dict[str, _Peer] = {}  # the other servers heard from, by id
        self._up_since: float | None = None  # the link works since then; None: it does not
        # When this server last heard its own message come back: the proof that the whole
        # path (publish, Redis, subscription) works, which a hung Redis cannot fake.
        self._echoed_at: float | None = None
        self._next_beat = 0.0  # when the next heartbeat is due, while the link is up
        self._asked_at: float | None = None  # when rosters were last asked for, since up
        self._ask_pending = False  # rosters were wanted too soon after asking: with the next beat
        self._answered_at: float | None = None  # when another's ask was last answered, since up
        self._answer_pending = False  # an ask came too soon after answering: with the next beat

    # Outgoing

    def encode(self, event: remote.Event, now: float) -> bytes:
        """The message for an event; now (the wall clock) dates a chat line, which is also
        what the room's history in Redis holds."""
        if isinstance(event, remote.MemberJoined):
            return self._message("join", m=event.member, name=event.name)
        if isinstance(event, remote.MemberLeft):
            return self._message("leave", m=event.member, reason=event.reason)
        if isinstance(event, remote.MemberRenamed):
            return self._message("nick", m=event.member, name=event.name)
        if isinstance(event, remote.MemberSaid):
            return self._message(
                "say", m=event.member, name=event.name, text=event.text, act=event.action, at=now
            )
        return self._message(
            "msg", m=event.sender, to=event.target, on=event.target_server, text=event.text
        )

    def hello(self, roster: list[tuple[str, str | None]], ask: bool) -> bytes:
        """This server and all its members; ask: every other server answers with its own."""
        return self._message("hello", members=[list(entry) for entry in roster], ask=ask)

    def heartbeat(self) -> bytes:
        return self._message("beat")

    def goodbye(self) -> bytes:
        """This server is stopping: its members are gone at once, not after the timeout."""
        return self._message("bye")

    def _message(self, kind: str, **fields: object) -> bytes:
        self._seq += 1
        message = {"s": self.server_id, "n": self._seq, "t": kind, **fields}
        return json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode()

    # Incoming

    def receive(self, payload: bytes, now: float) -> list[Received]:
        """What a message on the room's channel means. Its own echo means nothing (but shows
        the channel works: see echo); a message from a server not heard from before, or after
        a gap, asks for that server's roster. Raises BadMessage."""
        message = self._parse(payload)
        server = _field(message, "s", str)
        if not _SERVER_ID.match(server):
            raise BadMessage(f"bad server id {server[:64]!r}")
        seq = _field(message, "n", int)
        if server == self.server_id:
            self._echoed_at = now
            return []
        peer = self._peers.get(server)
        if peer is None and len(self._peers) >= self._max_servers:
            raise BadMessage(f"from a new server {server!r}, over {self._max_servers} servers")
        item = self._item(server, message)
        items: list[Received] = [] if item is None else [item]
        if peer is None:
            self._peers[server] = _Peer(seq, now)
            return items if isinstance(item, Roster) else [Gap(server, 0), *items]
        peer.heard_at = now
        if peer.seq - REPLAY_WINDOW < seq <= peer.seq:
            return []  # a message already taken: each is acted on once
        restarted = seq <= peer.seq  # its numbering starts over (see REPLAY_WINDOW)
        missed, peer.seq = 0 if restarted else seq - peer.seq - 1, seq
        if isinstance(item, ServerGone):
            del self._peers[server]
        return [Gap(server, missed), *items] if missed or restarted else items

    def history(self, records: list[bytes]) -> list[remote.HistoryEntry]:
        """The room's history from its list in Redis, which holds the "say" messages as they
        were published; bad records are skipped."""
        entries = []
        for record in records:
            try:
                fields = self._parse(record)
                said_at = _field(fields, "at", float)
                if not 0.0 <= said_at <= LATEST_DATE:  # False for NaN too
                    raise BadMessage(f"bad date {said_at!r}")
                entries.append(
                    remote.HistoryEntry(
                        said_at,
                        self._member(fields),
                        self._name(fields),
                        self._text(fields),
                        _field(fields, "act", bool),
                    )
                )
            except BadMessage:
                continue
        return entries

    def _parse(self, payload: bytes) -> dict[str, object]:
        if len(payload) > self._max_message:
            raise BadMessage(f"{len(payload)} bytes, over {self._max_message}")
        try:
            message = json.loads(payload)
        except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
            raise BadMessage(f"not JSON: {exc}") from None
        if not isinstance(message, dict):
            raise BadMessage("not a JSON object")
        return message

    def _item(self, server: str, message: dict[str, object]) -> Received | None:
        kind = _field(message, "t", str)
        if kind == "beat":
            return None
        if kind == "bye":
            return ServerGone(server)
        if kind == "hello":
            members = _field(message, "members", list)
            roster = [self._roster_entry(entry) for entry in members]
            return Roster(server, roster, _field(message, "ask", bool))
        event: remote.Event
        if kind == "msg":
            target, on = _field(message, "to", str), _field(message, "on", str)
            if not _MEMBER_ID.match(target):
                raise BadMessage("bad target")
            member, text = self._member(message), self._text(message)
            event = remote.PrivateMessage(member, target, on, text)
            return FromServer(server, event) if on == self.server_id else None
        member = self._member(message)
        if kind == "join":
            event = remote.MemberJoined(member, self._name(message))
        elif kind == "leave":
            reason = _field(message, "reason", str)
            event = remote.MemberLeft(
                member, reason if reason in _REASONS else protocol.REASON_LOST
            )
        elif kind == "nick":
            event = remote.MemberRenamed(member, self._name(message))
        elif kind == "say":
            text, action = self._text(message), _field(message, "act", bool)
            event = remote.MemberSaid(member, self._name(message), text, action)
        else:
            raise BadMessage(f"unknown type {kind[:32]!r}")
        return FromServer(server, event)

    def _roster_entry(self, entry: object) -> tuple[str, str | None]:
        if not isinstance(entry, list) or len(entry) != 2:
            raise BadMessage("bad roster entry")
        return self._member({"m": entry[0]}), self._name({"name": entry[1]})

    @staticmethod
    def _member(message: dict[str, object]) -> str:
        member = _field(message, "m", str)
        if not _MEMBER_ID.match(member):
            raise BadMessage(f"bad member {member[:64]!r}")
        return member

    @staticmethod
    def _name(message: dict[str, object]) -> str | None:
        name = message.get("name")
        if name is None:
            return None
        if not isinstance(name, str) or not protocol.NAME_PATTERN.match(name):
            raise BadMessage("bad name")
        return name

    def _text(self, message: dict[str, object]) -> str:
        """The text re-sanitised and cut (on a character's boundary) to the most a local
        member's sanitised line can hold: another server's bytes are trusted no more."""
        text = protocol.sanitize(_field(message, "text", str))
        encoded = text.encode(protocol.ENCODING, "replace")
        if len(encoded) > self._max_text:
            text = encoded[: self._max_text].decode(protocol.ENCODING, "ignore")
        return text or "\ufffd"

    # Presence

    def gone(self, now: float) -> list[ServerGone]:
        """The servers not heard from within the timeout, forgotten now."""
        silent = [s for s, peer in self._peers.items() if now - peer.heard_at >= self._timeout]
        for server in silent:
            del self._peers[server]
        return [ServerGone(server) for server in silent]

    def next_expiry(self) -> float | None:
        """When the next server will have been silent too long, if any is known."""
        if not self._peers:
            return None
        return min(peer.heard_at for peer in self._peers.values()) + self._timeout

    # The link's clock

    def link_up(self, now: float) -> None:
        """The link works from now: heartbeats start, and so does the wait for their echo."""
        self._up_since = now
        self._echoed_at = None
        self._next_beat = now + self._heartbeat
        self._asked_at = None
        self._ask_pending = False
        self._answered_at = None
        self._answer_pending = False

    def link_down(self) -> None:
        self._up_since = None

    def may_ask(self, now: float) -> bool:
        """Whether to ask every server for its roster now: at most once a heartbeat, since
        gaps come in bursts; one wanted sooner is asked with the next beat (beat_due)."""
        if self._asked_at is not None and now - self._asked_at < self._heartbeat:
            self._ask_pending = True
            return False
        self._asked_at, self._ask_pending = now, False
        return True

    def may_answer(self, now: float) -> bool:
        """Whether to answer another server's ask for rosters now: at most once a heartbeat,
        since an answer is this server's whole roster and anyone who can publish can ask as
        often as they like; one asked sooner is answered with the next beat (answer_pending).
        Every server hears each answer, so one serves every asker."""
        if self._answered_at is not None and now - self._answered_at < self._heartbeat:
            self._answer_pending = True
            return False
        self._answered_at, self._answer_pending = now, False
        return True

    @property
    def answer_pending(self) -> bool:
        return self._answer_pending

    def beat_due(self, now: float) -> bool:
        """Whether a heartbeat is due now (the next is then counted from now). If rosters
        were wanted meanwhile, the beat is a hello that asks for them: see ask_pending."""
        if self._up_since is None or now < self._next_beat:
            return False
        self._next_beat = now + self._heartbeat
        return True

    @property
    def ask_pending(self) -> bool:
        return self._ask_pending

    def echo_overdue(self, now: float) -> bool:
        """Whether this server's own messages have not come back for the timeout: Redis is
        hung, or the subscription is gone, whatever the sockets say."""
        deadline = self._echo_deadline()
        return deadline is not None and now >= deadline

    def _echo_deadline(self) -> float | None:
        if self._up_since is None:
            return None
        return max(self._echoed_at or self._up_since, self._up_since) + self._timeout

    def next_deadline(self) -> float | None:
        """When the bridge next needs the clock looked at: a server's silence running out,
        a heartbeat, or the echo's deadline."""
        due = [self.next_expiry(), self._echo_deadline()]
        if self._up_since is not None:
            due.append(self._next_beat)
        times = [t for t in due if t is not None]
        return min(times) if times else None


_T = TypeVar("_T")


def _field(message: dict[str, object], key: str, kind: type[_T]) -> _T:
    value = message.get(key)
    # bool is an int in Python, and not a sequence number.
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise BadMessage(f"field {key!r} missing or not {kind.__name__}")
    return value
