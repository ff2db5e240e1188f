"""The chat room server: one process, one thread, one selectors loop, and the glue between
each connection (chatroom.connection) and the room (chatroom.room).

Output discipline after Redis' networking.c: a turn's lines are kept in order (chatroom.fanout)
and delivered, queued and flushed once per loop turn, before the next select(); EVENT_WRITE is
watched only while a queue did not drain; no connection is closed in the middle of a turn, only
at its end. Every buffer a peer can grow has a limit (chatroom.limits.Limits), counted as output
is queued, and crossing one is logged naming the peer.
"""

from __future__ import annotations

import contextlib
import errno
import heapq
import hmac
import itertools
import logging
import resource
import selectors
import signal
import socket
import ssl
import time
from types import FrameType
from typing import TYPE_CHECKING, Callable, ClassVar

from chatroom import bridge, cli, protocol, tls
from chatroom.connection import (
    RECV_SIZE,
    AnswerOnce,
    ChosenByFirstBytes,
    Codec,
    Connection,
    Deadline,
    LineCodec,
)
from chatroom.fanout import Fanout
from chatroom.limits import LOOPBACK, Limits, PasswordFailures, address_key
from chatroom.room import (
    HISTORY_LINES,
    REMOTE_CAPACITY,
    Joined,
    Left,
    Output,
    Room,
    Share,
    ToMembers,
    ToPeer,
)
from chatroom.stats import Stats

if TYPE_CHECKING:  # hiredis is an extra: the link is imported only when --redis is given
    from chatroom.redis_link import RedisLink

log = logging.getLogger("chatroom.server")

DEFAULT_LIMITS = Limits()

# Lines handled per connection per turn, so one busy member cannot hold the loop while the
# others wait (ngircd: 3, Solanum: 5); the rest wait for the next turn, unread.
LINES_PER_TURN = 10

# TLS handshake steps per turn: answering a ClientHello costs a key exchange and a signature
# (0.4 ms measured), so a crowd of them is answered over several turns, between members' lines,
# instead of in one long turn while members wait: 200 at once took members' p99 to 63 ms when
# all were answered in one turn, 20 ms at 16 a turn, 8 ms at 8.
HANDSHAKES_PER_TURN = 8

# Accepts per turn, so a connect storm cannot starve members already chatting.
ACCEPTS_PER_TURN = 64

# Descriptors kept back from connections for the listener, the selector, the wakeup pair, the
# standard streams and a margin, as Redis keeps 32.
FD_RESERVE = 32

# Out of descriptors, accept() fails at once however often it is called: wait this long before
# trying again instead of spinning (asyncio waits 1 s, nginx 500 ms).
ACCEPT_PAUSE_SECONDS = 1.0
ACCEPT_RESOURCE_ERRORS = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}

# TCP keepalive as Redis sets it, so a peer that vanished without a word is found: the first
# probe after 300 s of silence, then every 100 s, and the connection fails after 3 unanswered.
KEEPALIVE_OPTIONS = {"TCP_KEEPIDLE": 300, "TCP_KEEPINTVL": 100, "TCP_KEEPCNT": 3}

# A leaving connection gets this long to take its last line and close its side: after that
# line the server shuts down its own side and reads until the peer's EOF, so that unread input
# does not turn close() into a reset; a peer that never reads or never closes is cut here.
LINGER_SECONDS = 2.0

# Stale timer entries tolerated before the heap is cleaned (asyncio keeps up to 100, and cleans
# when they pass half of the heap).
STALE_TIMERS_KEPT = 100

# How long shutdown lets goodbyes drain before closing the rest: the process must exit within 2 s.
SHUTDOWN_GRACE_SECONDS = 1.0


Clock = Callable[[], float]

# The web codec for a connection, given whether it is under TLS (chatroom.web.WebCodec with the
# server's settings); None when the web extra is not installed.
WebCodecFactory = Callable[[bool], Codec]


class ChatServer:
    """The loop: accepts, selects, keeps time and glues each connection to the room."""

    def __init__(
        self,
        listener: socket.socket,
        limits: Limits = DEFAULT_LIMITS,
        clock: Clock = time.monotonic,
        history_lines: int = HISTORY_LINES,
        wall_clock: Clock = time.time,
        tls_context: ssl.SSLContext | None = None,
        require_tls: bool = False,
        password: str | None = None,
        web: WebCodecFactory | None = None,
        server_id: str | None = None,
        remote_members: int = REMOTE_CAPACITY,
    ) -> None:
        self._listener = listener
        self._web = web  # None: an HTTP request is answered with how to add the web extra
        self._tls_context = tls_context  # None: a TLS handshake is another protocol, refused
        self._require_tls = require_tls  # a plain connection is refused once it speaks
        self._password = password  # None: the room asks for none
        self._password_failures = PasswordFailures()  # wrong passwords by address
        self._handshakes_left = HANDSHAKES_PER_TURN  # TLS handshake steps left this turn
        self._limits = limits
        self._clock = clock  # every deadline is read off this; tests pass a fake one
        self._wall_clock = wall_clock  # what the room is told the time is: history shows it
        # Members, and connections still to join, as the descriptor limit allows.
        self.max_connections = connection_cap(limits.max_members + limits.max_unjoined)
        self.max_members = min(limits.max_members, self.max_connections)
        self._selector = selectors.DefaultSelector()
        # server_id: the room is shared with other servers (--redis), this one under that id.
        self._room = Room(self.max_members, history_lines, shared=server_id is not None,
                          server_id=server_id or "", remote_capacity=remote_members)  # fmt: skip
        self._remote_members = remote_members
        self._refused_logged_at = -1.0  # when joins left out over it were last logged
        self._link: RedisLink | None = None  # to the other servers sharing the room
        self._told_split = False  # members were told the room is split, and not yet whole
        self._fanout: Fanout[Connection] = Fanout()  # this turn's lines, in order, for whom
        # Every open peer, joined or not, in the order it came; dicts keep every order here
        # (fan-out, flushes, evictions) the same from run to run.
        self._connections: dict[str, Connection] = {}
        self._per_ip: dict[str, int] = {}  # open connections per peer address
        self._unjoined: dict[Connection, None] = {}  # not joined yet, longest waiting first
        self._pending_input: dict[Connection, None] = {}  # lines left over for the next turn
        self._pending_writes: dict[Connection, None] = {}  # output queued since the last flush
        self._finishing: list[Connection] = []  # last line produced: leave once it is out
        self._to_close: list[Connection] = []  # closed at the end of the turn
        self._queued_bytes = 0  # all outboxes together, held to limits.sendq_total
        self._timers: list[tuple[float, int, Connection]] = []  # heap: when to check whom
        self._stale_timers = 0  # entries in _timers for closed peers or superseded by another
        self._timer_order = itertools.count()  # tie-breaker, so the heap never compares peers
        self._accept_paused_until: float | None = None  # out of descriptors: resume then
        self._stop_signal: int | None = None  # set by the signal handler; the loop stops
        self._status_requested = False  # SIGUSR1: log one status line
        self._stats = Stats(since=clock())  # joins and leaves since the last status line
        self._status_every: float | None = None  # log the status this often; None: only on SIGUSR1
        self._status_at: float | None = None  # when the next unprompted status line is due
        # The signal handler writes to _wakeup_writer (set_wakeup_fd), which wakes select().
        self._wakeup_reader, self._wakeup_writer = socket.socketpair()
        for sock in (listener, self._wakeup_reader, self._wakeup_writer):
            sock.setblocking(False)
        self._selector.register(listener, selectors.EVENT_READ)
        self._selector.register(self._wakeup_reader, selectors.EVENT_READ)

    def install_signal_handlers(self) -> None:
        signal.set_wakeup_fd(self._wakeup_writer.fileno(), warn_on_full_buffer=False)
        for signum in (signal.SIGINT, signal.SIGTERM):
            signal.signal(signum, self._request_stop)
        signal.signal(signal.SIGUSR1, self._request_status)

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    def _request_status(self, signum: int, frame: FrameType | None) -> None:
        self._status_requested = True

    def serve_forever(self) -> None:
        while self._stop_signal is None:
            self.run_once()
        log.info("%s received: shutting down", signal.Signals(self._stop_signal).name)
        self.shut_down()

    def run_once(self, give_up_at: float | None = None) -> bool:
        """One loop turn; says whether there was anything to do. The steps, in the order of
        Redis' beforeSleep and aeMain:

        1. lines left over from earlier turns go to the room;
        2. the room's lines go to each connection's queue, and on to the kernel (the flush);
        3. connections that are done are closed;
        4. sleep until a socket is ready, a deadline passes, or give_up_at;
        5. read each ready socket: bytes, codec, lines, the room; accept newcomers;
        6. act on the deadlines that passed.
        """
        busy = self._has_work_waiting()
        self._handshakes_left = HANDSHAKES_PER_TURN
        self._handle_pending_input()
        self._flush()
        if self._link is not None:
            self._link.flush()
        self._close_scheduled()
        if self._status_requested or self._status_due():
            self._log_status()
        busy = busy or self._has_work_waiting()
        events = self._selector.select(0 if busy else self._seconds_to_wake(give_up_at))
        for key, mask in events:
            if key.fileobj is self._listener:
                self._accept_new_connections()
            elif key.fileobj is self._wakeup_reader:
                self._drain_wakeup()
            elif isinstance(key.data, Connection):
                self._handle_event(key.data, mask)
            elif self._link is not None:
                self._link.handle_ready(key.data, mask)
        return self._fire_timers() or busy or bool(events)

    def _has_work_waiting(self) -> bool:
        """Input, output or closes left for the next turn: then select() must not sleep."""
        waiting = self._pending_input, self._pending_writes, self._finishing, self._to_close
        return self._fanout.has_lines() or any(waiting)

    def log_status_every(self, seconds: float) -> None:
        """Logs the status line every so many seconds, as well as on SIGUSR1; 0: only then."""
        self._status_every = seconds or None
        self._status_at = self._clock() + seconds if seconds else None

    def _status_due(self) -> bool:
        return self._status_at is not None and self._clock() >= self._status_at

    def _log_status(self) -> None:
        """One line: the room now, and the joins and leaves since the last such line."""
        now = self._clock()
        self._status_requested = False
        if self._status_every is not None and self._status_due():
            self._status_at = now + self._status_every
        line = self._stats.summary_line(
            now, len(self._room), len(self._connections), self.max_connections, self._queued_bytes
        )
        log.info("%s", line)
        self._stats.restart(now)

    # Accepting

    def _accept_new_connections(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                if exc.errno in ACCEPT_RESOURCE_ERRORS:
                    self._pause_accepting(exc)
                else:
                    log.warning("accept failed: %s", cli.describe(exc))
                return
            self.admit(sock, protocol.normalize_host(address[0]), address[1])

    def admit(self, sock: socket.socket, ip: str, port: int) -> None:
        """Serves a connected socket from now on, unless a cap refuses it."""
        peer_id = protocol.format_member_id(ip, port)
        address = address_key(ip, self._limits.ipv6_prefix)
        refusal = self._refusal_for(address)
        if refusal is not None:
            log.info("refusing %s: %s", peer_id, refusal)
            refuse(sock, protocol.error_line(refusal))
            return
        if len(self._unjoined) >= self._limits.max_unjoined:
            self._cut_longest_waiting()
        sock.setblocking(False)
        set_socket_options(sock, self._limits.send_buffer)
        codec = LineCodec(self._limits.max_line)
        conn = Connection(sock, peer_id, address, codec, self._limits, self._clock())
        conn.authenticated = self._password is None
        if self._require_tls:
            conn.hint_at = None  # a hint in plain text would break a TLS client that is slow
        self._connections[peer_id] = conn
        self._unjoined[conn] = None
        self._per_ip[address] = self._per_ip.get(address, 0) + 1
        self._selector.register(sock, selectors.EVENT_READ, conn)
        self._arm_next_deadline(conn)
        log.debug("%s connected", peer_id)

    def _refusal_for(self, address: str) -> str | None:
        open_now = len(self._connections) - len(self._to_close)
        if len(self._room) >= self.max_members or open_now >= self.max_connections:
            return protocol.server_full_error(self.max_members)
        if self._password is not None and self._password_failures.is_refused(
            address, self._clock()
        ):
            return protocol.ERROR_TOO_MANY_WRONG_PASSWORDS
        limits = self._limits
        if (
            limits.max_per_ip
            and not (limits.exempt_loopback and address == LOOPBACK)
            and self._per_ip.get(address, 0) >= limits.max_per_ip
        ):
            return protocol.ERROR_PER_IP
        return None

    def _cut_longest_waiting(self) -> None:
        """Room for a newcomer: the connection that has waited longest to join goes, with one
        line tried at once and no lingering, since it holds a place someone wants."""
        conn = next(iter(self._unjoined))
        del self._unjoined[conn]
        log.info(
            "closing %s: %d connections waiting to join", conn.peer_id, len(self._unjoined) + 1
        )
        conn.send_now(conn.codec.encode(protocol.error_line(protocol.ERROR_TOO_MANY_WAITING)))
        with contextlib.suppress(OSError):
            conn.sock.shutdown(socket.SHUT_WR)
            conn.recv()  # input left unread would turn the close into a reset
        self._schedule_close(conn)

    def _pause_accepting(self, exc: OSError) -> None:
        log.warning("not accepting for %g s: %s", ACCEPT_PAUSE_SECONDS, cli.describe(exc))
        self._selector.unregister(self._listener)
        self._accept_paused_until = self._clock() + ACCEPT_PAUSE_SECONDS

    def _resume_accepting(self) -> None:
        self._accept_paused_until = None
        self._selector.register(self._listener, selectors.EVENT_READ)

    def _drain_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wakeup_reader.recv(4096):
                pass

    # Reading: bytes → codec → lines → the room

    def _handle_event(self, conn: Connection, mask: int) -> None:
        try:
            if mask & selectors.EVENT_WRITE:
                self._write_to(conn)
            if mask & selectors.EVENT_READ and not conn.closed:
                self._read_from(conn)
        except Exception:
            self._failed(conn)

    def _failed(self, conn: Connection) -> None:
        """An unexpected error while serving one connection closes that connection only
        (socketserver's handle_error)."""
        log.exception("closing %s: unexpected error", conn.peer_id)
        self._drop(conn, protocol.REASON_SERVER_ERROR)

    def _read_from(self, conn: Connection) -> None:
        if self._tls_context is not None and not conn.done and self._may_handshake(conn):
            if self._handshakes_left <= 0:
                return  # still readable: select() hands it back next turn
            self._handshakes_left -= 1
        try:
            data = conn.recv()
        except BlockingIOError:
            return
        except OSError as exc:
            self._connection_failed(conn, exc)
            return
        if not data:
            self._drop(conn, protocol.REASON_CLOSED)
        elif conn.done:
            return  # a leaving peer's input is read only to be discarded
        elif not conn.heard_from and not self._opening_accepted(conn, data):
            return
        else:
            conn.heard_from = True
            conn.hint_at = None
            try:
                conn.codec.receive(data)
            except tls.TlsError as exc:
                self._tls_failed(conn, exc)
                return
            self._send_bytes(conn, conn.codec.take_output())
            self._handle_lines(conn)
            self._time_pings(conn)
            if conn.codec.ended:
                self._exchange_over(conn)

    @staticmethod
    def _may_handshake(conn: Connection) -> bool:
        """Its next read may be a TLS handshake step: its first, or one before the end of
        its handshake."""
        codec = conn.codec
        return not conn.heard_from or (isinstance(codec, tls.TlsCodec) and not codec.handshake_done)

    def _opening_accepted(self, conn: Connection, first_bytes: bytes) -> bool:
        """Looks at a connection's first bytes: a TLS handshake, when the server has a
        certificate, puts TLS under the codec its first plaintext chooses; an HTTP request goes
        to the web codec (under --require-tls, to an answer saying to use https://); another
        protocol, or plain text under --require-tls, gets one error line and the connection is
        closed."""
        if self._tls_context is not None and protocol.looks_like_tls(first_bytes):
            inner = ChosenByFirstBytes(lambda plaintext: self._codec_for(plaintext, secure=True))
            conn.codec = tls.TlsCodec(self._tls_context, inner)
            return True
        if protocol.looks_like_http(first_bytes):
            if self._require_tls:
                log.info("closing %s: plain HTTP, and TLS is required", conn.peer_id)
                conn.codec = AnswerOnce(protocol.TLS_REQUIRED_RESPONSE)
            else:
                conn.codec = self._codec_for(first_bytes, secure=False)
            return True
        if protocol.looks_like_another_protocol(first_bytes):
            error, why = protocol.ERROR_WRONG_PROTOCOL, "another protocol"
        elif self._require_tls:
            error, why = protocol.ERROR_TLS_REQUIRED, "plain text, and TLS is required"
        else:
            return True
        self._close_with_error(conn, error, protocol.REASON_CLOSED, why)
        return False

    def _codec_for(self, first_bytes: bytes, secure: bool) -> Codec:
        """Lines, or HTTP (the web codec, or the answer that says how to add it)."""
        if not protocol.looks_like_http(first_bytes):
            return LineCodec(self._limits.max_line)
        if self._web is None:
            return AnswerOnce(protocol.WEB_MISSING_RESPONSE)
        return self._web(secure)

    def _time_pings(self, conn: Connection) -> None:
        """A codec that pings (an open WebSocket): the next ping is timed once the last one is
        answered; the first once it opens."""
        codec = conn.codec
        if conn.pong_by is not None and not codec.awaiting_pong:
            conn.pong_by = None
        if conn.ping_at is None and conn.pong_by is None and codec.keeps_alive and not conn.done:
            conn.ping_at = self._clock() + self._limits.web_ping_interval
            self._arm(conn, conn.ping_at)

    def _exchange_over(self, conn: Connection) -> None:
        """Its codec has ended the exchange (an HTTP answer sent, a WebSocket closed): it
        leaves, as after an end of stream, once its last bytes are out."""
        if not conn.done:
            log.debug("%s: exchange over", conn.peer_id)
            self._act_on(self._room.leave(conn.peer_id, protocol.REASON_CLOSED, self._wall_clock()))
            self._finish(conn)

    def _tls_failed(self, conn: Connection, exc: tls.TlsError) -> None:
        """A broken handshake, garbage, a renegotiation: one log line, the alert if TLS has
        one, and that connection closes."""
        log.info("closing %s: TLS failed: %s", conn.peer_id, exc)
        alert = conn.codec.take_output()
        if alert and not conn.outbox:
            conn.send_now(alert)
        self._drop(conn, protocol.REASON_LOST)

    def _handle_pending_input(self) -> None:
        waiting, self._pending_input = self._pending_input, {}
        for conn in waiting:
            if conn.closed:
                continue
            try:
                self._handle_lines(conn)
            except Exception:
                self._failed(conn)

    def _handle_lines(self, conn: Connection) -> None:
        """Hands up to LINES_PER_TURN lines to the room, as flood control and the output
        total allow; what is left waits, unread, for a later turn."""
        now, wall_time = self._clock(), self._wall_clock()
        flood = conn.flood  # None when flood control is off
        for _ in range(LINES_PER_TURN):
            if conn.done or conn.password_refused_at is not None:
                return
            if self._fanout.pending_bytes and self._turn_would_pass_output_total():
                break  # the flush delivers this turn's lines first
            if flood is not None:
                wait = flood.seconds_until_token(now)
                if wait > 0:
                    self._pause_input(conn, now + wait)
                    return
            try:
                line = conn.codec.next_line()
            except protocol.LineRefused as exc:
                log.info("refusing a line from %s: %s", conn.peer_id, exc)
                self._tell(conn, protocol.error_line(str(exc)))
                line = None  # it costs a token all the same
            else:
                if line is None:
                    self._input_drained(conn, now)
                    return
                conn.partial_line_since = None  # a line ended: any unfinished one is new
            if flood is not None:
                flood.take()
            if line is not None:
                parsed = protocol.parse_client_line(line)
                if conn.authenticated and not isinstance(parsed, protocol.Pass):
                    command: protocol.Command | None = parsed
                else:
                    command = self._check_password(conn, parsed, now)
                if command is not None:
                    self._act_on(self._room.handle(conn.peer_id, command, wall_time))
        self._set_interest(conn, reading=False)
        self._pending_input[conn] = None

    def _check_password(
        self, conn: Connection, command: protocol.ClientLine, now: float
    ) -> protocol.Command | None:
        """The connection's gate to the room (IRC's PASS): until it has sent the room's
        password, only !Quit and /help pass. A !Pass is never passed on, right or wrong."""
        if not isinstance(command, protocol.Pass):
            if isinstance(command, (protocol.Quit, protocol.Help, protocol.Blank)):
                return command
            self._tell(conn, protocol.error_line(protocol.ERROR_PASSWORD_REQUIRED))
            return None
        if conn.authenticated or self._password is None:
            return None  # nothing to prove: ignored, and never relayed
        failures = self._password_failures
        if failures.is_refused(conn.address, now):
            why = "too many wrong passwords from its address"
            error = protocol.ERROR_TOO_MANY_WRONG_PASSWORDS
            self._close_with_error(conn, error, protocol.REASON_CLOSED, why)
        elif hmac.compare_digest(command.password.encode(), self._password.encode()):
            conn.authenticated = True
        else:
            delay = failures.record_failure(conn.address, now)
            if delay:
                conn.password_refused_at = now + delay  # slowed: nothing read until then
                self._set_interest(conn, reading=False)
                self._arm(conn, conn.password_refused_at)
            else:
                self._refuse_password(conn)
        return None

    def _refuse_password(self, conn: Connection) -> None:
        conn.password_refused_at = None
        self._close_with_error(
            conn, protocol.ERROR_WRONG_PASSWORD, protocol.REASON_CLOSED, "wrong password"
        )

    def _turn_would_pass_output_total(self) -> bool:
        """This turn's lines, were every member to queue them, would pass the total of all
        queues: so one turn's broadcasts cannot outgrow --sendq-total before the flush."""
        projected = self._fanout.pending_bytes * len(self._fanout)
        return self._queued_bytes + projected > self._limits.sendq_total

    def _pause_input(self, conn: Connection, until: float) -> None:
        """Fakelag: stop reading a flooder; its kernel buffer fills and its sends block."""
        conn.input_paused_until = until
        self._set_interest(conn, reading=False)
        self._arm(conn, until)

    def _resume_input(self, conn: Connection) -> None:
        conn.input_paused_until = None
        self._pending_input[conn] = None

    def _input_drained(self, conn: Connection, now: float) -> None:
        """No whole line is left: read again, and time any unfinished line (slow-loris)."""
        self._set_interest(conn, reading=True)
        if conn.time_partial_line(now):
            self._arm_next_deadline(conn)

    # The room's outputs → this turn's lines

    def _act_on(self, outputs: list[Output]) -> None:
        """Carries out what the room decided, in its order."""
        connections = self._connections
        for output in outputs:
            if isinstance(output, ToMembers):
                sender = None if output.sender is None else connections.get(output.sender)
                self._fanout.to_members(output.line, sender)
            elif isinstance(output, ToPeer):
                self._tell(connections[output.peer], output.line)
            elif isinstance(output, Joined):
                conn = connections[output.member]
                conn.join_by = None
                del self._unjoined[conn]
                self._fanout.add_member(conn)
                log.debug("%s joined (%d members)", output.member, output.members)
                self._stats.joined()
            elif isinstance(output, Left):
                self._fanout.remove_member(connections[output.member])
                log.debug("%s left (%s)", output.member, output.reason)
                self._stats.left(output.reason)
            elif isinstance(output, Share):
                if self._link is not None:
                    self._link.share(output.event)
            else:
                self._finish(connections[output.peer])

    # The other servers sharing the room

    @property
    def selector(self) -> selectors.BaseSelector:
        """The loop's selector, for the Redis link's sockets."""
        return self._selector

    def attach_link(self, link: RedisLink) -> None:
        self._link = link

    def roster(self) -> list[tuple[str, str | None]]:
        return self._room.roster()

    def apply_from_link(self, items: list[bridge.Incoming]) -> None:
        """What the other servers' members did, and the link's state, into the room."""
        room, now = self._room, self._wall_clock()
        for item in items:
            if isinstance(item, bridge.FromServer):
                self._act_on(room.apply_remote(item.server, item.event, now))
            elif isinstance(item, bridge.Roster):
                self._act_on(room.sync_server(item.server, item.members, now))
            elif isinstance(item, bridge.ServerGone):
                log.info("server %s is gone: its members left", item.server)
                self._act_on(room.forget_server(item.server, now))
            elif isinstance(item, bridge.HistoryLoaded):
                room.load_history(item.entries)
            elif isinstance(item, bridge.LinkDown):
                if not self._told_split:
                    self._told_split = True
                    self._act_on(room.tell_all(protocol.ROOM_SPLIT_LINE))
            elif self._told_split:
                self._told_split = False
                self._act_on(room.tell_all(protocol.ROOM_WHOLE_LINE))
        now = self._clock()
        if room.remote_refused and now - self._refused_logged_at >= 1.0:
            log.warning(
                "%d member(s) of other servers left out: the room holds %d of theirs at most",
                room.remote_refused,
                self._remote_members,
            )
            room.remote_refused, self._refused_logged_at = 0, now

    def _tell(self, conn: Connection, line: bytes) -> None:
        """One line for one connection, in its place among this turn's lines."""
        if not conn.done:
            self._fanout.to_peer(conn, line)

    def _finish(self, conn: Connection) -> None:
        """Its last line is produced: it leaves once this turn's lines are out."""
        if not conn.done:
            conn.finishing = True
            self._fanout.finish(conn)
            self._finishing.append(conn)

    # Output: this turn's lines → queues → the kernel

    def _flush(self) -> None:
        """Delivers this turn's lines, then tries every queued output once, before the next
        select() (Redis' handleClientsWithPendingWrites). A delivery or a write may drop a
        peer, whose leave notice is delivered in the same flush."""
        while True:
            if self._fanout.has_lines() or self._finishing:
                self._deliver_turn()
            elif self._pending_writes:
                conn = next(iter(self._pending_writes))
                del self._pending_writes[conn]
                if not conn.closed:
                    try:
                        self._write_to(conn)
                    except Exception:
                        self._failed(conn)
            else:
                return

    def _deliver_turn(self) -> None:
        finishing, self._finishing = self._finishing, []
        for conn, share in self._fanout.take():
            try:
                self._send_or_queue(conn, share)
            except Exception:
                self._failed(conn)
        for conn in finishing:
            self._leave_after_flush(conn)

    def _send_or_queue(self, conn: Connection, share: bytes) -> None:
        """Sends at once when nothing is queued before it, keeping only what the kernel did
        not take: most members of a busy room skip the queue entirely."""
        if conn.closed or conn.leaving:
            return
        self._send_bytes(conn, conn.codec.encode(share))

    def _send_bytes(self, conn: Connection, data: bytes) -> None:
        if data and not conn.outbox:
            data = conn.send_now(data)
        if data:
            self._queue(conn, data)

    def _queue(self, conn: Connection, data: bytes) -> None:
        """Queues output, counted against the limits before it is held: past the hard limit
        the connection is dropped instead, past the total the largest queue first."""
        limits = self._limits
        if len(conn.outbox) + len(data) > limits.sendq_hard:
            self._drop_slow(conn, f"output queue over {limits.sendq_hard} bytes")
            return
        if not self._make_room_for(conn, len(data)):
            return
        conn.outbox += data
        self._queued_bytes += len(data)
        if not conn.watching_writes:
            self._pending_writes[conn] = None
        if conn.time_soft_limit(self._clock()):
            self._arm_next_deadline(conn)

    def _make_room_for(self, conn: Connection, size: int) -> bool:
        """Drops the largest queues until size more bytes fit the total (Redis' client
        eviction); says whether conn is still there to take them."""
        limit = self._limits.sendq_total
        while self._queued_bytes + size > limit:
            largest = max(
                (other for other in self._connections.values() if not other.leaving),
                key=lambda other: len(other.outbox) + (size if other is conn else 0),
            )
            why = f"all output queues over {limit} bytes, this one the largest"
            self._drop_slow(largest, why)
            if largest is conn:
                return False
        return True

    def _write_to(self, conn: Connection) -> None:
        try:
            sent = conn.send_queued()
        except OSError as exc:
            self._connection_failed(conn, exc)
            return
        self._queued_bytes -= sent
        self._set_interest(conn, writing=bool(conn.outbox))
        if not conn.leaving:
            if conn.output_moved(sent, self._clock()):
                self._arm_next_deadline(conn)
        elif not conn.outbox and not conn.lingering:
            self._linger(conn)

    def _set_interest(
        self, conn: Connection, *, reading: bool | None = None, writing: bool | None = None
    ) -> None:
        """Registers exactly the events wanted: EVENT_WRITE only while output waits (asyncio's
        selector_events), EVENT_READ only while input may be read."""
        reading = conn.reading if reading is None else reading
        writing = conn.watching_writes if writing is None else writing
        was_registered = conn.reading or conn.watching_writes
        if (reading, writing) == (conn.reading, conn.watching_writes):
            return
        conn.reading, conn.watching_writes = reading, writing
        events = (selectors.EVENT_READ if reading else 0) | (
            selectors.EVENT_WRITE if writing else 0
        )
        if not events:
            self._selector.unregister(conn.sock)
        elif was_registered:
            self._selector.modify(conn.sock, events, conn)
        else:
            self._selector.register(conn.sock, events, conn)

    # Closing

    def _close_with_error(self, conn: Connection, error: str, reason: str, why: str) -> None:
        """One error line to the peer, a leave notice to the others, then close."""
        log.info("closing %s: %s", conn.peer_id, why)
        self._tell(conn, protocol.error_line(error))
        self._act_on(self._room.leave(conn.peer_id, reason, self._wall_clock()))
        self._finish(conn)

    def _drop_slow(self, conn: Connection, why: str) -> None:
        """Frees a slow reader's queue at once; it may still read the rest of a line it had
        half received, then the error line."""
        self._discard_output(conn, keep=conn.codec.kept_when_discarding(conn.outbox))
        self._close_with_error(conn, protocol.ERROR_SENDQ_EXCEEDED, protocol.REASON_TOO_SLOW, why)

    def _discard_output(self, conn: Connection, keep: int) -> None:
        self._queued_bytes -= len(conn.outbox) - keep
        del conn.outbox[keep:]

    def _leave_after_flush(self, conn: Connection) -> None:
        """Its last line is queued: close once it is out (Redis' CLIENT_CLOSE_AFTER_REPLY)."""
        if conn.leave_by is None and not conn.closed:
            conn.leave_by = self._clock() + LINGER_SECONDS
            self._arm(conn, conn.leave_by)
            self._pending_writes[conn] = None  # so the close starts even if nothing is queued

    def _linger(self, conn: Connection) -> None:
        """Everything is sent: shut down our side and wait for the peer's EOF."""
        conn.send_now(conn.codec.closing_bytes())  # best effort: the TCP end is what counts
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._schedule_close(conn)
            return
        conn.lingering = True
        self._set_interest(conn, reading=True)

    def _connection_failed(self, conn: Connection, exc: OSError) -> None:
        """A reset, a broken pipe, a keepalive that went unanswered: the peer is gone."""
        log.info("closing %s: %s", conn.peer_id, cli.describe(exc))
        self._drop(conn, protocol.REASON_LOST)

    def _drop(self, conn: Connection, reason: str) -> None:
        self._act_on(self._room.leave(conn.peer_id, reason, self._wall_clock()))
        self._schedule_close(conn)

    def _schedule_close(self, conn: Connection) -> None:
        if not conn.closed:
            conn.closed = True
            self._to_close.append(conn)

    def _close_scheduled(self) -> None:
        for conn in self._to_close:
            self._set_interest(conn, reading=False, writing=False)
            conn.sock.close()
            self._discard_output(conn, keep=0)
            del self._connections[conn.peer_id]
            self._unjoined.pop(conn, None)
            self._pending_input.pop(conn, None)
            self._pending_writes.pop(conn, None)
            self._per_ip[conn.address] -= 1
            if not self._per_ip[conn.address]:
                del self._per_ip[conn.address]
            if conn.check_at is not None:
                conn.check_at = None
                self._stale_timers += 1
            log.debug("%s disconnected", conn.peer_id)
        self._to_close.clear()
        self._forget_stale_timers()

    def _forget_stale_timers(self) -> None:
        """Drops the heap's entries for closed or rearmed peers once they are most of it, as
        asyncio does with cancelled timers: a closed connection must not stay in memory until
        its join deadline, a minute away, comes round."""
        timers = self._timers
        if self._stale_timers <= STALE_TIMERS_KEPT or 2 * self._stale_timers <= len(timers):
            return
        self._timers = [entry for entry in timers if entry[2].check_at == entry[0]]
        heapq.heapify(self._timers)
        self._stale_timers = 0

    # Deadlines

    def _arm_next_deadline(self, conn: Connection) -> None:
        deadline = conn.next_deadline()
        if deadline is not None:
            self._arm(conn, deadline[0])

    def _arm(self, conn: Connection, when: float) -> None:
        """Makes sure conn's deadlines are looked at no later than when."""
        if conn.check_at is not None:
            if conn.check_at <= when:
                return
            self._stale_timers += 1  # the later check is superseded
        conn.check_at = when
        heapq.heappush(self._timers, (when, next(self._timer_order), conn))

    def _seconds_to_wake(self, give_up_at: float | None) -> float | None:
        """How long select() may sleep: until the nearest deadline, or forever if none."""
        next_timer = self._timers[0][0] if self._timers else None
        link_at = None if self._link is None else self._link.next_deadline()
        wake_times = (give_up_at, next_timer, self._accept_paused_until, self._status_at, link_at)
        wake_at = [t for t in wake_times if t is not None]
        notice_at = self._room.next_notice_at  # on the wall clock, as the room keeps time
        if notice_at is not None:
            wake_at.append(self._clock() + notice_at - self._wall_clock())
        return max(0.0, min(wake_at) - self._clock()) if wake_at else None

    def _fire_timers(self) -> bool:
        """Acts on every deadline that has passed; says whether there was one."""
        now = self._clock()
        fired = False
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._resume_accepting()
            fired = True
        if self._link is not None:
            link_at = self._link.next_deadline()
            if link_at is not None and now >= link_at:
                self._link.on_timer(now)
                fired = True
        notices = self._room.tell_joins_and_leaves(self._wall_clock())
        if notices:
            self._act_on(notices)
            fired = True
        while self._timers and self._timers[0][0] <= now:
            when, _, conn = heapq.heappop(self._timers)
            if conn.closed or conn.check_at != when:
                self._stale_timers -= 1
                continue  # a check armed earlier has already looked, or the peer is gone
            conn.check_at = None
            try:
                self._check_deadlines(conn, now)
            except Exception:
                self._failed(conn)
            fired = True
        return fired

    def _check_deadlines(self, conn: Connection, now: float) -> None:
        """Acts on the earliest deadline of conn's that has passed, and arms the next one."""
        deadline = conn.next_deadline()
        if deadline is not None and deadline[0] <= now:
            self._deadline_actions[deadline[1]](self, conn)
        if not conn.closed:
            self._arm_next_deadline(conn)

    def _hint(self, conn: Connection) -> None:
        conn.hint_at = None
        hint = protocol.HINT_LINE if conn.authenticated else protocol.PASSWORD_HINT_LINE
        self._tell(conn, hint)

    def _join_late(self, conn: Connection) -> None:
        why = f"no {protocol.JOIN} within {self._limits.join_timeout:g} s"
        self._close_with_error(conn, protocol.ERROR_JOIN_TIMEOUT, protocol.REASON_TIMEOUT, why)

    def _line_unfinished(self, conn: Connection) -> None:
        why = f"a line unfinished for {self._limits.line_timeout:g} s"
        self._close_with_error(conn, protocol.ERROR_LINE_TIMEOUT, protocol.REASON_TIMEOUT, why)

    def _soft_too_long(self, conn: Connection) -> None:
        limits = self._limits
        why = f"output queue over {limits.sendq_soft} bytes for {limits.sendq_soft_seconds:g} s"
        self._drop_slow(conn, why)

    def _write_stalled(self, conn: Connection) -> None:
        self._drop_slow(conn, f"no byte written for {self._limits.write_timeout:g} s")

    def _ping(self, conn: Connection) -> None:
        conn.ping_at = None
        if conn.codec.keeps_alive:
            self._send_bytes(conn, conn.codec.ping())
            conn.pong_by = self._clock() + self._limits.web_ping_timeout

    def _pong_late(self, conn: Connection) -> None:
        if not conn.reading:
            # Its answer may be waiting unread behind lines held back (flood control): the
            # server's pause, not the peer's silence. Wait as long again.
            conn.pong_by = self._clock() + self._limits.web_ping_timeout
            return
        why = f"no answer to a ping within {self._limits.web_ping_timeout:g} s"
        self._close_with_error(conn, protocol.ERROR_PING_TIMEOUT, protocol.REASON_TIMEOUT, why)

    def _give_up_on(self, conn: Connection) -> None:
        log.info("closing %s: its last line not taken or no EOF in time", conn.peer_id)
        self._schedule_close(conn)

    _deadline_actions: ClassVar[dict[Deadline, Callable[[ChatServer, Connection], None]]] = {
        Deadline.LEAVE: _give_up_on,
        Deadline.HINT: _hint,
        Deadline.RESUME_INPUT: _resume_input,
        Deadline.JOIN: _join_late,
        Deadline.WRONG_PASSWORD: _refuse_password,
        Deadline.LINE: _line_unfinished,
        Deadline.SOFT_LIMIT: _soft_too_long,
        Deadline.WRITE_STALL: _write_stalled,
        Deadline.PING: _ping,
        Deadline.PONG: _pong_late,
    }

    def shut_down(self) -> None:
        """Tells everyone, after whatever this turn already produced, lets the goodbyes drain
        for a moment, then closes what is left. Nobody is told of anyone leaving."""
        if self._accept_paused_until is None:
            self._selector.unregister(self._listener)
        self._accept_paused_until = None
        self._listener.close()
        if self._link is not None:
            self._link.close()
            self._link = None
        for conn in self._connections.values():
            self._tell(conn, protocol.error_line(protocol.ERROR_SHUTTING_DOWN))
            self._finish(conn)
        give_up_at = self._clock() + SHUTDOWN_GRACE_SECONDS
        while self._connections and self._clock() < give_up_at:
            self.run_once(give_up_at)
        for conn in self._connections.values():
            self._schedule_close(conn)
        self._close_scheduled()


def connection_cap(max_members: int) -> int:
    """max_members, lowered to what the process' descriptor limit leaves after a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_members
    return max(1, min(max_members, soft - FD_RESERVE))


def set_socket_options(sock: socket.socket, send_buffer: int) -> None:
    """TCP_NODELAY, since every line is a message of its own; keepalive (Redis); and a fixed
    send buffer, so the kernel holds little beside the queue the limits count."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, send_buffer)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for name, value in KEEPALIVE_OPTIONS.items():
        if hasattr(socket, name):  # Linux names; other systems keep their defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


def refuse(sock: socket.socket, line: bytes) -> None:
    """Sends one line and closes at once: a refused peer never holds a descriptor for long."""
    with contextlib.suppress(OSError):
        sock.setblocking(False)
        sock.send(line)
        sock.shutdown(socket.SHUT_WR)
        # Input left unread would make close() send a reset, which can destroy the line.
        sock.recv(RECV_SIZE)
    sock.close()
