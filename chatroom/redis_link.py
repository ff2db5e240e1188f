"""The bridge's transport: two non-blocking connections to Redis, in the server's own
selector, speaking RESP through hiredis (Reader parses replies fed as bytes, pack_command
encodes), with no thread and no asyncio. One connection only listens (SUBSCRIBE); the other
sends (PUBLISH, and the history list). What the messages mean is chatroom.bridge's affair.

Output keeps the loop's discipline: commands are queued, the queue is flushed once a turn and
EVENT_WRITE is watched only while bytes remain; the queue is bounded (--redis-queue), and so
is what a reply may make the reader hold. A connection that fails, closes, sends garbage or
goes quiet (no echo of this server's own heartbeat within the timeout) is closed, and both are
made again after a backoff with jitter: the room is split meanwhile, and whole once both are up.

Needs the redis extra (pip install 'chatroom[redis]'): chatroom.serve imports this module
only when --redis is given.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import random
import selectors
import socket
from collections import deque
from dataclasses import dataclass, field
from typing import Callable
from urllib.parse import unquote, urlsplit

import hiredis

from chatroom import bridge, remote

log = logging.getLogger("chatroom.redis")

# Bytes taken from a Redis socket per read.
RECV_SIZE = 64 * 1024

# Reconnecting: the first wait (Centrifuge waits 250 ms), doubled after each failure up to the
# most, each wait drawn between half and all of it (jitter), so servers cut off together do not
# all come back in the same instant. 5 s keeps a healed room well within the 30 s promised.
RECONNECT_FIRST_SECONDS = 0.25
RECONNECT_MOST_SECONDS = 5.0

Command = tuple[object, ...]  # a Redis command's words: str, bytes or int

# The history's last lines (ARGV[1]), skipping, inside Redis, any record over ARGV[2] bytes:
# the reader must hold a whole record before it can drop one, so a huge record put in the list
# by anyone who can write to Redis would otherwise cut the link every time it read the history.
HISTORY_SCRIPT = """
local kept = {}
for _, record in ipairs(redis.call('LRANGE', KEYS[1], -tonumber(ARGV[1]), -1)) do
  if #record <= tonumber(ARGV[2]) then kept[#kept + 1] = record end
end
return kept
"""

Deliver = Callable[[list[bridge.Incoming]], None]
Roster = Callable[[], list[tuple[str, "str | None"]]]


@dataclass(frozen=True)
class RedisAddress:
    host: str
    port: int
    db: int
    username: str | None = None  # AUTH's, when the URL names one (Redis 6 ACL users)
    password: str | None = field(default=None, repr=False)  # never in a log line

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"redis://{host}:{self.port}/{self.db}"

    def auth(self) -> Command | None:
        """The AUTH command each connection sends first, if the URL has a password."""
        if self.password is None:
            return None
        if self.username is None:
            return ("AUTH", self.password)
        return ("AUTH", self.username, self.password)


def parse_redis_url(url: str) -> RedisAddress:
    """redis://[[USER]:PASSWORD@]HOST:PORT[/DB] (the port defaults to 6379, the database to
    0; USER and PASSWORD percent-encoded, as in redis-cli's -u); ValueError for anything
    else, without the password in its message."""
    parts = urlsplit(url)
    shown = url if parts.password is None else url.replace(parts.password, "***", 1)
    if parts.scheme != "redis" or not parts.hostname:
        raise ValueError(f"not redis://HOST:PORT[/DB]: {shown}")
    path = parts.path.strip("/")
    if not (path == "" or path.isdigit()) or parts.query or parts.fragment:
        raise ValueError(f"not redis://HOST:PORT[/DB]: {shown}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"not a port: {shown}") from None
    username = unquote(parts.username) if parts.username else None
    password = None if parts.password is None else unquote(parts.password)
    return RedisAddress(
        parts.hostname, 6379 if port is None else port, int(path or 0), username, password
    )


class _RedisConnection:
    """One connection to Redis, as the selector's key data: its socket, reader and queue."""

    def __init__(self, sock: socket.socket, reply_limit: int) -> None:
        self.sock = sock
        self.reader = hiredis.Reader()  # RESP bytes in, replies out; errors as values
        self.reply_limit = reply_limit  # the most bytes the reader may hold unparsed
        self.connected = False  # the non-blocking connect() has completed
        self.outbox = bytearray()  # commands not yet taken by the kernel
        self.replies: deque[str] = deque()  # what each reply awaited is for, in order
        self.events = selectors.EVENT_WRITE  # what the selector watches: the connect first


class RedisLink:
    """Both connections, their state (down, connecting, up), the heartbeat and the reconnect."""

    def __init__(
        self,
        address: RedisAddress,
        room: str,
        the_bridge: bridge.Bridge,
        selector: selectors.BaseSelector,
        clock: Callable[[], float],
        wall_clock: Callable[[], float],
        deliver: Deliver,
        roster: Roster,
        timeout: float = bridge.TIMEOUT_SECONDS,
        queue_limit: int = bridge.QUEUE_BYTES,
        history_lines: int = 0,
        reply_limit: int = bridge.MAX_MESSAGE,
        record_limit: int = bridge.MAX_MESSAGE,
    ) -> None:
        self._address = address
        # Pub/sub channels are not per database in Redis: the database is in the channel's name,
        # so /1 and /2 on one Redis are separate rooms, as their history lists are.
        self._channel = f"chatroom:{address.db}:{room}".encode()
        self._history_key = f"chatroom:{room}:history".encode()
        self._bridge = the_bridge
        self._selector = selector
        self._clock = clock
        self._wall_clock = wall_clock  # dates the chat lines, as the room's history shows them
        self._deliver = deliver  # hands the server what the others said, and the link's state
        self._roster = roster  # this server's members, for the others
        self._timeout = timeout  # for a connect, as for Redis' silence once up
        self._queue_limit = queue_limit
        self._history_lines = history_lines  # 0: the room keeps no history
        self._reply_limit = reply_limit
        self._record_limit = record_limit  # the longest history record read (the bridge's)
        self._random = random.Random()
        self._connections: list[_RedisConnection] = []  # [subscriber, commands] while open
        self._up = False  # subscribed, the history read: the room is whole
        self._reconnect_at: float | None = None  # down: try again then
        self._connect_by: float | None = None  # connecting: give up then
        self._failures = 0  # attempts failed in a row, for the backoff
        self._dropped = 0  # lines not shared since the queue last had room, or since the split
        self._bad = 0  # bad messages not logged yet (one log line a second at most)
        self._bad_why = ""  # what was wrong with the last of them
        self._bad_logged_at = -1.0

    @property
    def is_up(self) -> bool:
        return self._up

    # Connecting

    def start(self) -> None:
        self._connect()

    def _connect(self) -> None:
        self._reconnect_at = None
        try:
            family, kind, proto, _, where = socket.getaddrinfo(
                self._address.host, self._address.port, type=socket.SOCK_STREAM
            )[0]
            for _ in range(2):
                sock = socket.socket(family, kind, proto)
                connection = _RedisConnection(sock, self._reply_limit)
                # Registered and kept at once, so that whichever step fails, closing finds
                # every socket made, and each known to the selector.
                self._selector.register(sock, connection.events, connection)
                self._connections.append(connection)
                sock.setblocking(False)
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
                code = sock.connect_ex(where)
                if code not in (0, errno.EINPROGRESS):
                    raise OSError(code, errno.errorcode.get(code, str(code)))
        except OSError as exc:
            self._fail(f"cannot connect to {self._address}: {exc.strerror or exc}")
            return
        self._connect_by = self._clock() + self._timeout

    def _connected(self, connection: _RedisConnection) -> None:
        error = connection.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if error:
            self._fail(f"cannot connect to {self._address}: {errno.errorcode.get(error, error)}")
            return
        connection.connected = True
        self._watch(connection, selectors.EVENT_READ)
        if all(c.connected for c in self._connections):
            subscriber, commands = self._connections
            auth = self._address.auth()
            if auth is not None:
                for each in self._connections:
                    self._send(each, [auth], "auth")
            self._send(subscriber, [("SUBSCRIBE", self._channel)], "subscribed")
            if self._address.db:
                self._send(commands, [("SELECT", self._address.db)], "")

    def _subscribed(self) -> None:
        """Subscribed: the room's history is read again (the room is whole once it is in, so
        that a newcomer is never shown less than the room has said), or, without history,
        the room is whole now."""
        if self._history_lines:
            _, commands = self._connections
            lines, most = self._history_lines, self._record_limit
            read = ("EVAL", HISTORY_SCRIPT, 1, self._history_key, lines, most)
            self._send(commands, [read], "history")
        else:
            self._whole()

    def _whole(self) -> None:
        """The link works: every server is asked for its roster, with this one's."""
        now = self._clock()
        self._connect_by = None
        self._failures = 0
        self._up = True
        self._bridge.link_up(now)
        self._ask_for_rosters(now)
        log.info("joined the room on %s as server %s", self._address, self._bridge.server_id)
        if self._dropped:
            log.info("%d lines said while split were not shared", self._dropped)
            self._dropped = 0
        self._deliver([bridge.LinkUp()])

    # Sending

    def share(self, event: remote.Event) -> None:
        """Publishes a local member's event; a chat line also goes into the history list."""
        if not self.is_up:
            self._dropped += 1  # split: pub/sub would not keep it for later either
            return
        payload = self._bridge.encode(event, self._wall_clock())
        commands: list[Command] = [("PUBLISH", self._channel, payload)]
        if isinstance(event, remote.MemberSaid) and self._history_lines:
            commands += [
                ("RPUSH", self._history_key, payload),
                ("LTRIM", self._history_key, -self._history_lines, -1),
            ]
        self._publish(commands)

    def _publish(self, commands: list[Command]) -> None:
        _, connection = self._connections
        data = b"".join(_pack(command) for command in commands)
        if len(connection.outbox) + len(data) > self._queue_limit:
            if not self._dropped:
                log.warning(
                    "queue to Redis over %d bytes: lines for other servers dropped until it drains",
                    self._queue_limit,
                )
            self._dropped += 1
            return
        if self._dropped:
            log.warning("%d lines for other servers were dropped", self._dropped)
            self._dropped = 0
        connection.outbox += data
        connection.replies.extend("" for _ in commands)

    def _send(self, connection: _RedisConnection, commands: list[Command], reply: str) -> None:
        """A command of the link's own (not bounded: there are a few per connection)."""
        for command in commands:
            connection.outbox += _pack(command)
            connection.replies.append(reply)

    def _ask_for_rosters(self, now: float) -> None:
        """Publishes this server's roster, asking every other for theirs, when the bridge
        says it may (else it goes with the next heartbeat)."""
        if self._bridge.may_ask(now):
            hello = self._bridge.hello(self._roster(), ask=True)
            self._publish([("PUBLISH", self._channel, hello)])

    def _answer(self, now: float) -> None:
        """Publishes this server's roster for the servers that asked, when the bridge says
        it may (else it goes with the next heartbeat)."""
        if self._bridge.may_answer(now):
            hello = self._bridge.hello(self._roster(), ask=False)
            self._publish([("PUBLISH", self._channel, hello)])

    def flush(self) -> None:
        """Hands each connection's queue to the kernel (once a turn, before select())."""
        for connection in list(self._connections):
            if connection.outbox and connection.connected:
                self._write(connection)

    def _write(self, connection: _RedisConnection) -> None:
        try:
            sent = connection.sock.send(connection.outbox)
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            self._fail(f"writing to {self._address}: {exc.strerror or exc}")
            return
        del connection.outbox[:sent]
        writing = selectors.EVENT_WRITE if connection.outbox else 0
        self._watch(connection, selectors.EVENT_READ | writing)

    def _watch(self, connection: _RedisConnection, events: int) -> None:
        if events != connection.events:
            connection.events = events
            self._selector.modify(connection.sock, events, connection)

    # Reading

    def handle_ready(self, connection: _RedisConnection, mask: int) -> None:
        """A Redis socket is ready; an unexpected error fails the link, never the loop."""
        if connection not in self._connections:
            return  # closed earlier in this turn, with its sibling: select() saw it before
        try:
            if not connection.connected:
                self._connected(connection)
                return
            if mask & selectors.EVENT_WRITE:
                self._write(connection)
            if mask & selectors.EVENT_READ and connection in self._connections:
                self._read(connection)
        except Exception:
            log.exception("Redis link failed unexpectedly")
            self._fail("unexpected error")

    def _read(self, connection: _RedisConnection) -> None:
        try:
            data = connection.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._fail(f"reading from {self._address}: {exc.strerror or exc}")
            return
        if not data:
            self._fail(f"{self._address} closed the connection")
            return
        connection.reader.feed(data)
        try:
            while connection in self._connections:
                reply = connection.reader.gets()
                if reply is False:
                    break
                self._handle_reply(connection, reply)
        except hiredis.ProtocolError as exc:
            self._fail(f"{self._address} broke the protocol: {exc}")
            return
        if connection in self._connections and connection.reader.len() > connection.reply_limit:
            self._fail(f"a reply from {self._address} over {connection.reply_limit} bytes")

    def _handle_reply(self, connection: _RedisConnection, reply: object) -> None:
        subscriber = connection is self._connections[0]
        if subscriber and isinstance(reply, list) and reply[:1] == [b"message"]:
            if len(reply) == 3 and isinstance(reply[2], bytes):
                self._receive(reply[2])
            return
        awaited = connection.replies.popleft() if connection.replies else ""
        if isinstance(reply, hiredis.ReplyError) and awaited == "history":
            log.warning("the room's history not read: Redis refused it: %s", reply)
            self._whole()  # the room works without it
        elif isinstance(reply, hiredis.ReplyError):
            if awaited:  # the link cannot work without this one
                self._fail(f"Redis refused a command: {reply}")
            else:
                log.warning("Redis refused a command: %s", reply)
        elif awaited == "subscribed":
            self._subscribed()
        elif awaited == "history" and isinstance(reply, list):
            records = [record for record in reply if isinstance(record, bytes)]
            self._deliver([bridge.HistoryLoaded(self._bridge.history(records))])
            self._whole()

    def _receive(self, payload: bytes) -> None:
        now = self._clock()
        try:
            items = self._bridge.receive(payload, now)
        except bridge.BadMessage as exc:
            self._bad, self._bad_why = self._bad + 1, str(exc)
            self._log_bad(now)
            return
        for item in items:
            if isinstance(item, bridge.Gap):
                if item.missed:
                    log.warning("missed %d message(s) from server %s", item.missed, item.server)
                self._ask_for_rosters(now)
            elif isinstance(item, bridge.Roster) and item.ask:
                self._answer(now)
            elif isinstance(item, bridge.ServerGone):
                self._ask_for_rosters(now)  # see _act_on_time
        self._deliver([item for item in items if not isinstance(item, bridge.Gap)])

    def _log_bad(self, now: float) -> None:
        """The bad messages not logged yet, if the last such line is a second old (those
        left over are logged on a later timer: a heartbeat's, at the latest)."""
        if self._bad and now - self._bad_logged_at >= 1.0:
            log.warning(
                "dropped %d bad message(s) from Redis, the last: %s", self._bad, self._bad_why
            )
            self._bad, self._bad_logged_at = 0, now

    # Time

    def next_deadline(self) -> float | None:
        """When the link next needs the loop: a reconnect, a connect's deadline, a heartbeat,
        or another server's silence running out."""
        times = [self._reconnect_at, self._connect_by, self._bridge.next_deadline()]
        due = [t for t in times if t is not None]
        return min(due) if due else None

    def on_timer(self, now: float) -> None:
        """Acts on whatever next_deadline said was due; an unexpected error fails the link,
        never the loop."""
        try:
            self._act_on_time(now)
        except Exception:
            log.exception("Redis link failed unexpectedly")
            self._fail("unexpected error")

    def _act_on_time(self, now: float) -> None:
        if self._reconnect_at is not None and now >= self._reconnect_at:
            self._connect()
        elif self._connect_by is not None and now >= self._connect_by:
            self._fail(f"no answer from {self._address} in {self._timeout:g} s")
        elif self._bridge.echo_overdue(now):
            self._fail(f"no word from {self._address} in {self._timeout:g} s")
        elif self._bridge.beat_due(now):
            if self._bridge.ask_pending:
                self._ask_for_rosters(now)
            elif self._bridge.answer_pending:
                self._answer(now)
            else:
                self._publish([("PUBLISH", self._channel, self._bridge.heartbeat())])
        self._log_bad(now)
        gone = self._bridge.gone(now)
        if gone:
            self._deliver(list(gone))
            # Names its members held here may have been refused to others' members, by their
            # servers' rule, where the gone server was never heard of (a server restarted):
            # the rosters asked for again settle those claims anew, the same on every server.
            self._ask_for_rosters(now)

    # Failing and closing

    def _fail(self, why: str) -> None:
        """Closes both connections and tries again after a backoff; tells the server the
        room is split if it was whole."""
        was_up = self._up
        self._close_connections()
        self._up, self._connect_by = False, None
        self._bridge.link_down()
        most = min(RECONNECT_MOST_SECONDS, RECONNECT_FIRST_SECONDS * 2**self._failures)
        wait = self._random.uniform(most / 2, most)
        # One line for an outage, however long: the tries after the first are debug lines.
        level = logging.DEBUG if self._failures else logging.WARNING
        self._failures = min(self._failures + 1, 16)
        self._reconnect_at = self._clock() + wait
        log.log(level, "Redis link down: %s; trying again in %.2f s, and on", why, wait)
        if was_up:
            self._deliver([bridge.LinkDown()])

    def _close_connections(self) -> None:
        for connection in self._connections:
            self._selector.unregister(connection.sock)
            connection.sock.close()
        self._connections = []

    def close(self) -> None:
        """At shutdown: a best-effort goodbye, so the others need not wait out the timeout."""
        if self.is_up:
            _, commands = self._connections
            goodbye = _pack(("PUBLISH", self._channel, self._bridge.goodbye()))
            if not commands.outbox:
                with contextlib.suppress(OSError):
                    commands.sock.send(goodbye)
        self._close_connections()
        self._up, self._reconnect_at, self._connect_by = False, None, None
        self._bridge.link_down()


def _pack(command: Command) -> bytes:
    """A command in RESP. hiredis' stub types its argument as a tuple of one element."""
    return bytes(hiredis.pack_command(command))  # type: ignore[arg-type]
