"""One peer's transport: bytes in and out of its socket, its framing, its output queue and
the clocks of every limit on it. It knows nothing of what a line means or of the room.

A codec turns received bytes into lines and lines into bytes: plain text lines (LineCodec), a
WebSocket (chatroom.web.WebCodec), either of them under TLS (chatroom.tls.TlsCodec); nothing
above the codec knows which.
"""

from __future__ import annotations

import enum
import socket
from typing import Callable, Protocol

from chatroom import protocol
from chatroom.limits import Limits, TokenBucket

# One read per ready connection per turn; a connection's input buffer holds at most the line
# limit plus this, and one fast sender cannot hold the loop for long.
RECV_SIZE = 65536

# How long a new connection may stay silent before it is told how to join: past the moment a
# TLS or HTTP client sends its first bytes, and a blink for a person at nc.
HINT_SECONDS = 1.0


class Codec(Protocol):
    """Bytes from the peer in, lines out; lines for the peer in, bytes out."""

    def receive(self, data: bytes) -> None: ...

    def next_line(self) -> bytes | None:
        """The next whole line, without its terminator; None until more bytes arrive.
        Raises protocol.LineTooLong once per over-long line, and stays usable."""

    @property
    def has_partial_line(self) -> bool: ...

    def encode(self, lines: bytes) -> bytes:
        """The bytes that carry these server lines (each ending in b"\\n") to the peer."""

    def take_output(self) -> bytes:
        """Bytes the codec has for the peer of its own accord (a TLS handshake's answer),
        taken after every receive()."""

    def kept_when_discarding(self, queued: bytearray) -> int:
        """How much of the front of a queue about to be thrown away must still go out, so
        that what follows it can be read (the rest of a line half sent)."""

    def closing_bytes(self) -> bytes:
        """What goes out last, before our side of the stream is shut (TLS' close_notify, a
        WebSocket close frame)."""

    @property
    def ended(self) -> bool:
        """It has said all it will (an HTTP answer given, a WebSocket closed): the connection
        closes once its output is out."""

    @property
    def keeps_alive(self) -> bool:
        """It can ping the peer (an open WebSocket): the server times the answers."""

    def ping(self) -> bytes:
        """The bytes of a ping; awaiting_pong is True until the peer answers it."""

    @property
    def awaiting_pong(self) -> bool: ...


class LineCodec(protocol.LineBuffer):
    """Plain text lines, as nc, telnet and the clients send them: the framing buffer itself,
    with nothing to add on the way out."""

    __slots__ = ()

    receive = protocol.LineBuffer.feed
    # Plain lines have no end of their own but the stream's, and no ping: TCP keepalive
    # finds a vanished peer, and a quiet member is not idle-timed out.
    ended = False
    keeps_alive = False
    awaiting_pong = False

    def ping(self) -> bytes:
        return b""

    def encode(self, lines: bytes) -> bytes:
        return lines

    def take_output(self) -> bytes:
        return b""

    def kept_when_discarding(self, queued: bytearray) -> int:
        return queued.find(b"\n") + 1

    def closing_bytes(self) -> bytes:
        return b""


class AnswerOnce:
    """A fixed answer, then the end: what an HTTP request gets when the web extra is missing."""

    __slots__ = ("_answer", "ended")

    def __init__(self, answer: bytes) -> None:
        self._answer = answer  # not yet taken
        self.ended = False  # the answer is taken: close once it is out

    def receive(self, data: bytes) -> None:
        pass  # the request is not read: whatever it asks, the answer is the same

    def next_line(self) -> bytes | None:
        return None

    has_partial_line = False
    keeps_alive = False
    awaiting_pong = False

    def encode(self, lines: bytes) -> bytes:
        return b""  # lines are not HTTP: an error line cannot follow the answer

    def take_output(self) -> bytes:
        answer, self._answer = self._answer, b""
        self.ended = True
        return answer

    def kept_when_discarding(self, queued: bytearray) -> int:
        return 0

    def closing_bytes(self) -> bytes:
        return b""

    def ping(self) -> bytes:
        return b""


class ChosenByFirstBytes:
    """A codec chosen by the first bytes it receives: under TLS, only the first plaintext
    says whether the peer speaks lines or HTTP. Until then it is a codec with nothing to say."""

    __slots__ = ("_choose", "chosen")

    def __init__(self, choose: Callable[[bytes], Codec]) -> None:
        self._choose = choose  # the first bytes → the codec for them
        self.chosen: Codec | None = None  # None until the first bytes arrive

    def receive(self, data: bytes) -> None:
        if self.chosen is None:
            if not data:
                return
            self.chosen = self._choose(data)
        self.chosen.receive(data)

    def next_line(self) -> bytes | None:
        return None if self.chosen is None else self.chosen.next_line()

    @property
    def has_partial_line(self) -> bool:
        return self.chosen is not None and self.chosen.has_partial_line

    def encode(self, lines: bytes) -> bytes:
        # Before the peer has spoken, lines go out as lines (the join deadline's error line).
        return lines if self.chosen is None else self.chosen.encode(lines)

    def take_output(self) -> bytes:
        return b"" if self.chosen is None else self.chosen.take_output()

    def kept_when_discarding(self, queued: bytearray) -> int:
        return 0 if self.chosen is None else self.chosen.kept_when_discarding(queued)

    def closing_bytes(self) -> bytes:
        return b"" if self.chosen is None else self.chosen.closing_bytes()

    @property
    def ended(self) -> bool:
        return self.chosen is not None and self.chosen.ended

    @property
    def keeps_alive(self) -> bool:
        return self.chosen is not None and self.chosen.keeps_alive

    def ping(self) -> bytes:
        return b"" if self.chosen is None else self.chosen.ping()

    @property
    def awaiting_pong(self) -> bool:
        return self.chosen is not None and self.chosen.awaiting_pong


class Deadline(enum.Enum):
    """What is due when one of a connection's clocks runs out."""

    LEAVE = "its last line not taken, or no end of stream, in time"
    HINT = "silent since it connected: tell it how to join"
    RESUME_INPUT = "its flood-control pause is over"
    JOIN = "it did not join in time"
    WRONG_PASSWORD = "its wrong password is answered, slowly"
    LINE = "a line unfinished too long"
    SOFT_LIMIT = "its output queue over the soft limit too long"
    WRITE_STALL = "no byte of its queued output taken too long"
    PING = "time to ping it (a WebSocket)"
    PONG = "its answer to our ping is overdue"


class Connection:
    """One peer's state; lives in its SelectorKey.data."""

    # Slots: a room holds thousands of these, and a dict per connection is most of its size.
    __slots__ = (
        "_limits",
        "address",
        "authenticated",
        "check_at",
        "closed",
        "codec",
        "finishing",
        "flood",
        "heard_from",
        "hint_at",
        "input_paused_until",
        "join_by",
        "leave_by",
        "lingering",
        "outbox",
        "over_soft_limit_since",
        "partial_line_since",
        "password_refused_at",
        "peer_id",
        "ping_at",
        "pong_by",
        "reading",
        "sock",
        "watching_writes",
        "write_stalled_since",
    )

    def __init__(
        self,
        sock: socket.socket,
        peer_id: str,
        address: str,
        codec: Codec,
        limits: Limits,
        now: float,
    ) -> None:
        self.sock = sock  # non-blocking
        self.peer_id = peer_id  # "IP:PORT" as the server sees it: the name others see
        self.address = address  # whose connections are counted together against the cap
        self.codec = codec  # received bytes not yet handled, and the framing of output
        self._limits = limits
        self.outbox = bytearray()  # queued output the kernel has not accepted yet
        # Flood control; None when it is off.
        self.flood = (
            TokenBucket(limits.flood_rate, limits.flood_burst, now) if limits.flood_rate else None
        )
        self.join_by: float | None = now + limits.join_timeout  # None once it has joined
        self.authenticated = True  # sent the room's password, or the room has none
        self.password_refused_at: float | None = None  # a wrong password is answered then
        # A newcomer that says nothing is probably a person at nc: tell it how to join. Not at
        # once, since other protocols that share the port speak first (sslh waits the same way).
        self.hint_at: float | None = now + HINT_SECONDS
        self.heard_from = False  # sent a byte; its first bytes are checked for another protocol
        self.reading = True  # EVENT_READ registered; off while its input waits for a turn
        self.watching_writes = False  # EVENT_WRITE registered: the outbox did not drain
        self.input_paused_until: float | None = None  # over the flood limit: unread until then
        self.partial_line_since: float | None = None  # an unfinished line has waited since then
        self.over_soft_limit_since: float | None = None  # the outbox has been over the soft limit
        self.write_stalled_since: float | None = None  # non-empty outbox, no byte taken since
        self.finishing = False  # its last line is produced; it goes out with this turn's lines
        self.leave_by: float | None = None  # leaving: flush, linger, and close by this time
        self.lingering = False  # our side is shut down; discarding input until the peer's EOF
        self.closed = False  # closed at the end of this turn; gets no more output
        self.check_at: float | None = None  # when the timer heap next looks at its deadlines
        self.ping_at: float | None = None  # its codec pings: the next ping is due then
        self.pong_by: float | None = None  # a ping is out: the peer must answer by then

    @property
    def leaving(self) -> bool:
        """Its last line is queued (Redis' CLIENT_CLOSE_AFTER_REPLY); input is discarded."""
        return self.leave_by is not None

    @property
    def done(self) -> bool:
        """It gets no more lines: its last one is produced, or it is gone."""
        return self.finishing or self.leave_by is not None or self.closed

    def recv(self) -> bytes:
        """What the peer sent, b"" at its end of stream. Raises BlockingIOError if nothing
        is there, OSError if the connection failed."""
        return self.sock.recv(RECV_SIZE)

    def send_now(self, data: bytes) -> bytes:
        """Sends what the kernel takes at once; returns the rest. A failure is left for the
        next flush to find, since the caller may be in the middle of a delivery."""
        try:
            sent = self.sock.send(data)
        except OSError:
            sent = 0
        return data[sent:]

    def send_queued(self) -> int:
        """Sends what the kernel takes of the outbox; returns how much. Raises OSError if
        the connection failed."""
        if not self.outbox:
            return 0
        try:
            sent = self.sock.send(self.outbox)
        except BlockingIOError:
            return 0
        del self.outbox[:sent]
        return sent

    # The clocks below say whether they started (or restarted): then a deadline is nearer.

    def time_partial_line(self, now: float) -> bool:
        """No whole line is left: an unfinished one is timed from its first byte."""
        if not self.codec.has_partial_line:
            self.partial_line_since = None
        elif self.partial_line_since is None:
            self.partial_line_since = now
            return True
        return False

    def output_moved(self, sent: int, now: float) -> bool:
        """After a write: restarts or stops the clocks of the soft limit and of progress."""
        started = self.time_soft_limit(now)
        if not self.outbox:
            self.write_stalled_since = None
        elif sent or self.write_stalled_since is None:
            self.write_stalled_since = now
            started = True
        return started

    def time_soft_limit(self, now: float) -> bool:
        if len(self.outbox) <= self._limits.sendq_soft:
            self.over_soft_limit_since = None
        elif self.over_soft_limit_since is None:
            self.over_soft_limit_since = now
            return True
        return False

    def next_deadline(self) -> tuple[float, Deadline] | None:
        """The earliest of the deadlines it is under now, and what it is."""
        if self.leave_by is not None:
            return self.leave_by, Deadline.LEAVE
        if self.finishing:
            return None  # its end is decided: the LEAVE deadline starts once its lines are out
        limits = self._limits
        candidates = [
            (self.hint_at, Deadline.HINT),
            (self.input_paused_until, Deadline.RESUME_INPUT),
            (self.join_by, Deadline.JOIN),
            (self.password_refused_at, Deadline.WRONG_PASSWORD),
            (_after(self.partial_line_since, limits.line_timeout), Deadline.LINE),
            (_after(self.over_soft_limit_since, limits.sendq_soft_seconds), Deadline.SOFT_LIMIT),
            (_after(self.write_stalled_since, limits.write_timeout), Deadline.WRITE_STALL),
            (self.ping_at, Deadline.PING),
            (self.pong_by, Deadline.PONG),
        ]
        due = [(when, what) for when, what in candidates if when is not None]
        return min(due, key=lambda deadline: deadline[0]) if due else None


def _after(start: float | None, seconds: float) -> float | None:
    return None if start is None else start + seconds
