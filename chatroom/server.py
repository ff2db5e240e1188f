"""The chat room server: one process, one thread, one selectors loop.

Output discipline after Redis' networking.c: lines are queued per connection and flushed once
per loop turn, before the next select(); EVENT_WRITE is watched only while a queue did not drain;
no connection is closed in the middle of a broadcast, only at the end of the turn. Every buffer
a peer can grow has a limit (chatroom_limits.Limits), and crossing one is logged naming the peer.
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import heapq
import ipaddress
import itertools
import logging
import resource
import selectors
import signal
import socket
import sys
import time
from dataclasses import fields
from types import FrameType
from typing import Callable

from chatroom import cli, protocol
from chatroom.limits import Limits, TokenBucket

log = logging.getLogger("chatroom.server")

PROG = "chatroom-server"

DEFAULT_LIMITS = Limits()

# One read per ready connection per turn; a connection's input buffer holds at most the line
# limit plus this, and one fast sender cannot hold the loop for long.
RECV_SIZE = 65536

# Lines handled per connection per turn, so one busy member cannot hold the loop while the
# others wait (ngircd: 3, Solanum: 5); the rest wait for the next turn, unread.
LINES_PER_TURN = 10

# Redis' default backlog: a join storm waits in the kernel instead of being refused.
LISTEN_BACKLOG = 511

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

# How long shutdown lets goodbyes drain before closing the rest: the process must exit within 2 s.
SHUTDOWN_GRACE_SECONDS = 1.0


class Connection:
    """One peer's state; lives in its SelectorKey.data."""

    def __init__(
        self, sock: socket.socket, member_id: str, ip: str, limits: Limits, now: float
    ) -> None:
        self.sock = sock  # non-blocking
        self.member_id = member_id  # "IP:PORT" as the server sees it: the name others see
        self.ip = ip  # the address alone, counted against the per-address cap
        self.inbox = protocol.LineBuffer(limits.max_line)  # received bytes not yet handled
        self.outbox = bytearray()  # queued output the kernel has not accepted yet
        # Flood control; None when it is off.
        self.flood = (
            TokenBucket(limits.flood_rate, limits.flood_burst, now) if limits.flood_rate else None
        )
        self.connected_at = now  # the join deadline counts from here, whatever is sent
        self.joined = False  # sent !Join: a member of the room
        self.room_index = 0  # this turn's room lines from this index on are its to receive
        self.heard_from = False  # sent a byte; its first bytes are checked for another protocol
        self.reading = True  # EVENT_READ registered; off while its input waits for a turn
        self.watching_writes = False  # EVENT_WRITE registered: the outbox did not drain
        self.input_paused_until: float | None = None  # over the flood limit: unread until then
        self.partial_line_since: float | None = None  # an unfinished line has waited since then
        self.over_soft_limit_since: float | None = None  # the outbox has been over the soft limit
        self.write_stalled_since: float | None = None  # non-empty outbox, no byte taken since
        self.leave_by: float | None = None  # leaving: flush, linger, and close by this time
        self.lingering = False  # our side is shut down; discarding input until the peer's EOF
        self.closed = False  # closed at the end of this turn; gets no more output
        self.check_at: float | None = None  # when the timer heap next looks at its deadlines

    @property
    def leaving(self) -> bool:
        """Its last line is queued (Redis' CLIENT_CLOSE_AFTER_REPLY); input is discarded."""
        return self.leave_by is not None


Deadline = tuple[float, Callable[["Connection"], None]]


class ChatServer:
    def __init__(self, listener: socket.socket, limits: Limits = DEFAULT_LIMITS) -> None:
        self._listener = listener
        self._limits = limits
        self.max_connections = connection_cap(limits.max_members)
        self._selector = selectors.DefaultSelector()
        self._connections: set[Connection] = set()  # every open peer, joined or not
        self._members: set[Connection] = set()  # the joined ones: who gets broadcasts
        self._per_ip: dict[str, int] = {}  # open connections per peer address
        self._pending_input: set[Connection] = set()  # lines left over for the next turn
        self._pending_writes: set[Connection] = set()  # output queued since the last flush
        # Lines broadcast this turn, each once, with who sent it: copied into the members'
        # queues at the flush, one copy a member a turn, not one a member a line.
        self._room_lines: list[bytes] = []
        self._room_senders: list[Connection | None] = []
        self._to_close: list[Connection] = []  # closed at the end of the turn
        self._queued_bytes = 0  # all outboxes together, held to limits.sendq_total
        self._timers: list[tuple[float, int, Connection]] = []  # heap: when to check whom
        self._timer_order = itertools.count()  # tie-breaker, so the heap never compares peers
        self._accept_paused_until: float | None = None  # out of descriptors: resume then
        self._stop_signal: int | None = None  # set by the signal handler; the loop stops
        self._status_requested = False  # SIGUSR1: log one status line
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
        self._shut_down()

    def run_once(self, give_up_at: float | None = None) -> bool:
        """One loop turn: handle input left over, flush output and close what the last turn
        left (Redis' beforeSleep), then sleep until a socket is ready, a deadline passes, or
        give_up_at. Says whether there was anything to do."""
        busy = self._has_work_waiting()
        self._handle_pending_input()
        self._flush_pending_writes()
        self._enforce_total_output_limit()
        self._close_scheduled()
        if self._status_requested:
            self._log_status()
        busy = busy or self._has_work_waiting()
        events = self._selector.select(0 if busy else self._seconds_to_wake(give_up_at))
        for key, mask in events:
            if key.fileobj is self._listener:
                self._accept_new_connections()
            elif key.fileobj is self._wakeup_reader:
                self._drain_wakeup()
            else:
                self._handle_event(key.data, mask)
        return self._fire_timers() or busy or bool(events)

    def _has_work_waiting(self) -> bool:
        """Input, output or closes left for the next turn: then select() must not sleep."""
        waiting = self._pending_input, self._pending_writes, self._room_lines, self._to_close
        return any(waiting)

    def _log_status(self) -> None:
        self._status_requested = False
        log.info(
            "status: %d members, %d connections (max %d), %d bytes queued",
            len(self._members),
            len(self._connections),
            self.max_connections,
            self._queued_bytes,
        )

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
            ip = protocol.normalize_host(address[0])
            member_id = protocol.format_member_id(ip, address[1])
            refusal = self._refusal_for(ip)
            if refusal is None:
                self.add_connection(sock, member_id, ip)
            else:
                log.info("refusing %s: %s", member_id, refusal)
                refuse(sock, protocol.error_line(refusal))

    def _refusal_for(self, ip: str) -> str | None:
        if len(self._connections) >= self.max_connections:
            return protocol.server_full_error(self.max_connections)
        limits = self._limits
        if (
            limits.max_per_ip
            and not (limits.exempt_loopback and is_loopback(ip))
            and self._per_ip.get(ip, 0) >= limits.max_per_ip
        ):
            return protocol.ERROR_PER_IP
        return None

    def add_connection(self, sock: socket.socket, member_id: str, ip: str) -> None:
        """Serves a connected socket from now on."""
        sock.setblocking(False)
        set_socket_options(sock)
        conn = Connection(sock, member_id, ip, self._limits, time.monotonic())
        self._connections.add(conn)
        self._per_ip[ip] = self._per_ip.get(ip, 0) + 1
        self._selector.register(sock, selectors.EVENT_READ, conn)
        self._arm(conn, conn.connected_at + self._limits.join_timeout)
        log.info("%s connected", member_id)

    def _pause_accepting(self, exc: OSError) -> None:
        log.warning("not accepting for %g s: %s", ACCEPT_PAUSE_SECONDS, cli.describe(exc))
        self._selector.unregister(self._listener)
        self._accept_paused_until = time.monotonic() + ACCEPT_PAUSE_SECONDS

    def _resume_accepting(self) -> None:
        self._accept_paused_until = None
        self._selector.register(self._listener, selectors.EVENT_READ)

    def _drain_wakeup(self) -> None:
        with contextlib.suppress(BlockingIOError):
            while self._wakeup_reader.recv(4096):
                pass

    # Reading

    def _handle_event(self, conn: Connection, mask: int) -> None:
        """Serves one ready connection; an unexpected error closes that connection only."""
        try:
            if mask & selectors.EVENT_WRITE:
                self._write_to(conn)
            if mask & selectors.EVENT_READ and not conn.closed:
                self._read_from(conn)
        except Exception:
            log.exception("closing %s: unexpected error", conn.member_id)
            self._drop(conn, protocol.REASON_SERVER_ERROR)

    def _read_from(self, conn: Connection) -> None:
        try:
            data = conn.sock.recv(RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            self._connection_failed(conn, exc)
            return
        if not data:
            self._drop(conn, protocol.REASON_CLOSED)
        elif conn.leaving:
            return  # a leaving peer's input is read only to be discarded
        elif not conn.heard_from and protocol.looks_like_another_protocol(data):
            self._close_with_error(
                conn, protocol.ERROR_WRONG_PROTOCOL, protocol.REASON_CLOSED, "another protocol"
            )
        else:
            conn.heard_from = True
            conn.inbox.feed(data)
            self._handle_lines(conn)

    def _handle_pending_input(self) -> None:
        waiting, self._pending_input = self._pending_input, set()
        for conn in waiting:
            if not conn.closed:
                self._handle_lines(conn)

    def _handle_lines(self, conn: Connection) -> None:
        """Handles up to LINES_PER_TURN lines, as flood control and the output total allow;
        what is left waits, unread, for a later turn."""
        for _ in range(LINES_PER_TURN):
            if conn.leaving or conn.closed:
                return
            if self._queued_bytes > self._limits.sendq_total:
                break  # the next flush drains or evicts first: then this waits no longer
            if conn.flood is not None:
                wait = conn.flood.seconds_until_token(time.monotonic())
                if wait > 0:
                    self._pause_input(conn, wait)
                    return
            try:
                line = conn.inbox.next_line()
            except protocol.LineTooLong as exc:
                log.info("%s sent a line over %d bytes", conn.member_id, exc.max_line)
                self._take_token(conn)
                self._queue(conn, protocol.error_line(str(exc)))
                continue
            if line is None:
                self._input_drained(conn)
                return
            conn.partial_line_since = None  # a line ended: any unfinished one is new
            self._take_token(conn)
            self._handle_command(conn, protocol.parse_client_line(line))
        self._set_interest(conn, reading=False)
        self._pending_input.add(conn)

    def _take_token(self, conn: Connection) -> None:
        if conn.flood is not None:
            conn.flood.take()

    def _pause_input(self, conn: Connection, seconds: float) -> None:
        """Fakelag: stop reading a flooder; its kernel buffer fills and its sends block."""
        conn.input_paused_until = time.monotonic() + seconds
        self._set_interest(conn, reading=False)
        self._arm(conn, conn.input_paused_until)

    def _resume_input(self, conn: Connection) -> None:
        conn.input_paused_until = None
        self._pending_input.add(conn)

    def _input_drained(self, conn: Connection) -> None:
        """No whole line is left: read again, and time any unfinished line (slow-loris)."""
        self._set_interest(conn, reading=True)
        if not conn.inbox.has_partial_line:
            conn.partial_line_since = None
        elif conn.partial_line_since is None:
            conn.partial_line_since = time.monotonic()
            self._arm(conn, conn.partial_line_since + self._limits.line_timeout)

    def _handle_command(self, conn: Connection, command: protocol.Command) -> None:
        if isinstance(command, protocol.Join):
            self._join(conn)
        elif isinstance(command, protocol.Quit):
            self._quit(conn)
        elif isinstance(command, protocol.Say):
            self._say(conn, command.text)

    # The room

    def _join(self, conn: Connection) -> None:
        if conn.joined:
            self._queue(conn, protocol.error_line(protocol.ERROR_ALREADY_JOINED))
            return
        self._queue(conn, protocol.welcome_line(conn.member_id, len(self._members)))
        self._broadcast(protocol.joined_line(conn.member_id))
        conn.joined = True
        conn.room_index = len(self._room_lines)  # what was said before it came is not its
        self._members.add(conn)
        log.info("%s joined (%d members)", conn.member_id, len(self._members))

    def _quit(self, conn: Connection) -> None:
        self._queue(conn, protocol.goodbye_line(conn.member_id))
        self._remove_member(conn, protocol.REASON_QUIT)
        self._close_after_flush(conn)

    def _say(self, conn: Connection, text: str) -> None:
        if conn.joined:
            self._broadcast(protocol.chat_line(conn.member_id, text), sender=conn)
        else:
            self._queue(conn, protocol.error_line(protocol.ERROR_NOT_JOINED))

    def _remove_member(self, conn: Connection, reason: str) -> None:
        """The one place a leave notice is sent from."""
        if conn not in self._members:
            return
        self._members.remove(conn)
        self._broadcast(protocol.left_line(conn.member_id, reason))
        log.info("%s left (%s)", conn.member_id, reason)

    def _broadcast(self, line: bytes, sender: Connection | None = None) -> None:
        """One already-encoded line for every member but its sender, delivered at the flush."""
        self._room_lines.append(line)
        self._room_senders.append(sender)

    def _deliver_room_lines(self) -> None:
        """Queues this turn's room lines: the same bytes object for every member that was here
        all turn and sent none of them (Redis' shared objects), its own selection otherwise."""
        lines, senders = self._room_lines, self._room_senders
        if not lines:
            return
        everything = b"".join(lines)
        sent_some = set(senders)
        for member in self._members:
            if member.room_index or member in sent_some:
                start = member.room_index
                chunk = b"".join(
                    line
                    for line, sender in zip(lines[start:], senders[start:])
                    if sender is not member
                )
                member.room_index = 0
            else:
                chunk = everything
            if chunk:
                self._send_or_queue(member, chunk)
        self._room_lines, self._room_senders = [], []

    def _send_or_queue(self, conn: Connection, data: bytes) -> None:
        """Sends at once when nothing is queued before it, keeping only what the kernel did
        not take: most members of a busy room skip the queue entirely. A failed send is left
        for the flush to handle, since no one may be dropped in the middle of a delivery."""
        if conn.outbox or conn.closed or conn.leaving:
            self._queue(conn, data)
            return
        try:
            sent = conn.sock.send(data)
        except OSError:
            sent = 0
        if sent < len(data):
            self._queue(conn, data[sent:])

    # Output

    def _queue(self, conn: Connection, line: bytes) -> None:
        if conn.leaving or conn.closed:
            return
        conn.outbox += line
        self._queued_bytes += len(line)
        if not conn.watching_writes:
            self._pending_writes.add(conn)
        elif len(conn.outbox) > self._limits.sendq_hard:
            self._pending_writes.add(conn)  # dropped at the flush, never inside a broadcast
        else:
            self._track_soft_limit(conn)  # the kernel is full: what is queued stays queued

    def _flush_pending_writes(self) -> None:
        """Tries every queued output once per turn, before the next select() (Redis'
        handleClientsWithPendingWrites); a write may drop a peer and queue more notices."""
        while True:
            self._deliver_room_lines()  # and the leave notices of peers a failed write dropped
            if not self._pending_writes:
                return
            conn = self._pending_writes.pop()
            if not conn.closed:
                self._write_to(conn)

    def _write_to(self, conn: Connection) -> None:
        sent = 0
        if conn.outbox:
            try:
                sent = conn.sock.send(conn.outbox)
            except BlockingIOError:
                pass
            except OSError as exc:
                self._connection_failed(conn, exc)
                return
            del conn.outbox[:sent]
            self._queued_bytes -= sent
        self._set_interest(conn, writing=bool(conn.outbox))
        if not conn.leaving:
            self._check_output_limits(conn, sent)
        elif not conn.outbox and not conn.lingering:
            self._linger(conn)

    def _check_output_limits(self, conn: Connection, sent: int) -> None:
        """After a write: the hard limit, the soft limit's clock, the write-progress clock."""
        limits = self._limits
        if len(conn.outbox) > limits.sendq_hard:
            self._drop_slow(conn, f"output queue over {limits.sendq_hard} bytes")
            return
        self._track_soft_limit(conn)
        if not conn.outbox:
            conn.write_stalled_since = None
        elif sent or conn.write_stalled_since is None:
            conn.write_stalled_since = time.monotonic()
            self._arm(conn, conn.write_stalled_since + limits.write_timeout)

    def _track_soft_limit(self, conn: Connection) -> None:
        if len(conn.outbox) <= self._limits.sendq_soft:
            conn.over_soft_limit_since = None
        elif conn.over_soft_limit_since is None:
            conn.over_soft_limit_since = time.monotonic()
            self._arm(conn, conn.over_soft_limit_since + self._limits.sendq_soft_seconds)

    def _enforce_total_output_limit(self) -> None:
        """Past the total of all queues, drops the largest first (Redis' client eviction)."""
        limit = self._limits.sendq_total
        while self._queued_bytes > limit:
            largest = max(self._connections, key=lambda conn: len(conn.outbox))
            if largest.leaving:
                return  # its queue is already cut to one line: nothing more to win
            self._drop_slow(largest, f"all output queues over {limit} bytes, this one the largest")

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
        log.info("closing %s: %s", conn.member_id, why)
        self._queue(conn, protocol.error_line(error))
        self._remove_member(conn, reason)
        self._close_after_flush(conn)

    def _drop_slow(self, conn: Connection, why: str) -> None:
        """Frees a slow reader's queue at once; it may still read the rest of a line it had
        half received, then the error line."""
        self._discard_output(conn, keep=conn.outbox.find(b"\n") + 1)
        self._close_with_error(conn, protocol.ERROR_SENDQ_EXCEEDED, protocol.REASON_TOO_SLOW, why)

    def _discard_output(self, conn: Connection, keep: int) -> None:
        self._queued_bytes -= len(conn.outbox) - keep
        del conn.outbox[keep:]

    def _close_after_flush(self, conn: Connection) -> None:
        if conn.leave_by is None:
            conn.leave_by = time.monotonic() + LINGER_SECONDS
            self._arm(conn, conn.leave_by)
        self._pending_writes.add(conn)  # so the close starts even if nothing is queued

    def _linger(self, conn: Connection) -> None:
        """Everything is sent: shut down our side and wait for the peer's EOF."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._schedule_close(conn)
            return
        conn.lingering = True
        self._set_interest(conn, reading=True)

    def _connection_failed(self, conn: Connection, exc: OSError) -> None:
        """A reset, a broken pipe, a keepalive that went unanswered: the peer is gone."""
        log.info("closing %s: %s", conn.member_id, cli.describe(exc))
        self._drop(conn, protocol.REASON_LOST)

    def _drop(self, conn: Connection, reason: str) -> None:
        self._remove_member(conn, reason)
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
            self._connections.discard(conn)
            self._per_ip[conn.ip] -= 1
            if not self._per_ip[conn.ip]:
                del self._per_ip[conn.ip]
            log.info("%s disconnected", conn.member_id)
        self._to_close.clear()

    # Deadlines

    def _arm(self, conn: Connection, when: float) -> None:
        """Makes sure conn's deadlines are looked at no later than when."""
        if conn.check_at is not None and conn.check_at <= when:
            return
        conn.check_at = when
        heapq.heappush(self._timers, (when, next(self._timer_order), conn))

    def _seconds_to_wake(self, give_up_at: float | None) -> float | None:
        """How long select() may sleep: until the nearest deadline, or forever if none."""
        next_timer = self._timers[0][0] if self._timers else None
        wake_at = [t for t in (give_up_at, next_timer, self._accept_paused_until) if t is not None]
        return max(0.0, min(wake_at) - time.monotonic()) if wake_at else None

    def _fire_timers(self) -> bool:
        """Acts on every deadline that has passed; says whether there was one."""
        now = time.monotonic()
        fired = False
        if self._accept_paused_until is not None and now >= self._accept_paused_until:
            self._resume_accepting()
            fired = True
        while self._timers and self._timers[0][0] <= now:
            when, _, conn = heapq.heappop(self._timers)
            if conn.closed or conn.check_at != when:
                continue  # a check armed earlier has already looked
            conn.check_at = None
            self._check_deadlines(conn, now)
            fired = True
        return fired

    def _check_deadlines(self, conn: Connection, now: float) -> None:
        """Acts on the earliest deadline of conn's that has passed, and arms the next one."""
        deadlines = self._deadlines_of(conn)
        if deadlines and deadlines[0][0] <= now:
            deadlines[0][1](conn)
            deadlines = self._deadlines_of(conn)
        if deadlines and not conn.closed:
            self._arm(conn, deadlines[0][0])

    def _deadlines_of(self, conn: Connection) -> list[Deadline]:
        """Every deadline conn is under now, earliest first, each with what to do when due."""
        if conn.leave_by is not None:
            return [(conn.leave_by, self._give_up_on)]
        limits = self._limits
        candidates: list[tuple[float | None, Callable[[Connection], None]]] = [
            (conn.input_paused_until, self._resume_input),
            (None if conn.joined else conn.connected_at + limits.join_timeout, self._join_late),
            (after(conn.partial_line_since, limits.line_timeout), self._line_unfinished),
            (after(conn.over_soft_limit_since, limits.sendq_soft_seconds), self._soft_too_long),
            (after(conn.write_stalled_since, limits.write_timeout), self._write_stalled),
        ]
        deadlines = [(when, act) for when, act in candidates if when is not None]
        return sorted(deadlines, key=lambda deadline: deadline[0])

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

    def _give_up_on(self, conn: Connection) -> None:
        log.info("closing %s: its last line not taken or no EOF in time", conn.member_id)
        self._schedule_close(conn)

    def _shut_down(self) -> None:
        """Tells everyone, lets the goodbyes drain for a moment, then closes what is left."""
        if self._accept_paused_until is None:
            self._selector.unregister(self._listener)
        self._accept_paused_until = None
        self._listener.close()
        self._members.clear()  # no leave notices while the whole room closes
        for conn in self._connections:
            if not conn.leaving:  # a leaving peer had its last line already
                self._queue(conn, protocol.error_line(protocol.ERROR_SHUTTING_DOWN))
                self._close_after_flush(conn)
        give_up_at = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        while self._connections and time.monotonic() < give_up_at:
            self.run_once(give_up_at)
        for conn in self._connections:
            self._schedule_close(conn)
        self._close_scheduled()


def after(start: float | None, seconds: float) -> float | None:
    return None if start is None else start + seconds


def connection_cap(max_members: int) -> int:
    """max_members, lowered to what the process' descriptor limit leaves after a reserve."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return max_members
    return max(1, min(max_members, soft - FD_RESERVE))


def is_loopback(ip: str) -> bool:
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:  # a scoped IPv6 address on Python 3.8, say: not loopback
        return False


def set_socket_options(sock: socket.socket) -> None:
    """TCP_NODELAY, since every line is a message of its own, and keepalive (Redis)."""
    if sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
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


def open_listener(host: str, port: int) -> socket.socket:
    """A listening socket; IPv6 when the host is an IPv6 address ("::" also takes IPv4)."""
    if ":" in host:
        return socket.create_server(
            (host, port),
            family=socket.AF_INET6,
            backlog=LISTEN_BACKLOG,
            dualstack_ipv6=host == "::",
        )
    return socket.create_server((host, port), backlog=LISTEN_BACKLOG)


_BYTES = cli.int_in_range(1, 1 << 40)
_SECONDS = cli.float_in_range(0.01, 1e9)
_COUNT = cli.int_in_range(1, 1 << 30)

# Each limit's flag: its type, metavar and help; the flag's name is the Limits field's.
LIMIT_FLAGS: list[tuple[str, Callable[[str], object], str, str]] = [
    ("--max-line", cli.int_in_range(64, 1 << 20), "BYTES",
     "longest line a client may send, counting its newline"),
    ("--sendq-soft", _BYTES, "BYTES",
     "a member whose output queue stays over this for --sendq-soft-seconds is dropped"),
    ("--sendq-soft-seconds", _SECONDS, "SECONDS", "how long a queue may stay over --sendq-soft"),
    ("--sendq-hard", _BYTES, "BYTES", "a member whose output queue passes this is dropped"),
    ("--sendq-total", _BYTES, "BYTES",
     "all output queues together; past it the largest is dropped first"),
    ("--write-timeout", _SECONDS, "SECONDS",
     "a member whose queued output has not moved for this long is dropped"),
    ("--flood-rate", cli.float_in_range(0, 1e9), "LINES_PER_S",
     "lines a second each connection may send after its burst; 0 turns flood control off"),
    ("--flood-burst", _COUNT, "LINES", "lines a connection may send at once"),
    ("--max-members", _COUNT, "N",
     "most connections at once, lowered to fit the file-descriptor limit"),
    ("--max-per-ip", cli.int_in_range(0, 1 << 30), "N",
     "most connections from one address; 0 for no cap"),
    ("--join-timeout", _SECONDS, "SECONDS", "a connection must send !Join within this"),
    ("--line-timeout", _SECONDS, "SECONDS", "a line must end within this of its first byte"),
]  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.make_parser(PROG, "Serve a chat room for terminal clients and nc.")
    cli.add_address_arguments(
        parser,
        "address to listen on; 0.0.0.0 (or ::) for the whole LAN",
        0,
        "TCP port; 0 picks a free one",
    )
    limits = parser.add_argument_group("limits (see README.md for the reasons)")
    for flag, kind, metavar, text in LIMIT_FLAGS:
        default = getattr(DEFAULT_LIMITS, flag[2:].replace("-", "_"))
        limits.add_argument(
            flag, type=kind, default=default, metavar=metavar, help=f"{text} (default: {default})"
        )
    limits.add_argument(
        "--exempt-loopback",
        action=argparse.BooleanOptionalAction,
        default=DEFAULT_LIMITS.exempt_loopback,
        help="leave connections from this machine out of --max-per-ip (default: exempt)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    limits = Limits(**{field.name: getattr(args, field.name) for field in fields(Limits)})
    try:
        listener = open_listener(args.host, args.port)
    except OSError as exc:
        where = protocol.format_member_id(args.host, args.port)
        return cli.fail(PROG, f"cannot listen on {where}: {cli.describe(exc)}")
    server = ChatServer(listener, limits)
    if server.max_connections < limits.max_members:
        log.warning(
            "at most %d members: the file-descriptor limit (ulimit -n) leaves no more",
            server.max_connections,
        )
    server.install_signal_handlers()
    host, port = listener.getsockname()[:2]
    print(f"listening on {protocol.format_member_id(host, port)}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
