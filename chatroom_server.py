"""The chat room server: one process, one thread, one selectors loop.

Output discipline after Redis' networking.c: lines are queued per connection and flushed once
per loop turn, before the next select(); EVENT_WRITE is watched only while a queue did not drain;
no connection is closed in the middle of a broadcast, only at the end of the turn.
"""

from __future__ import annotations

import argparse
import heapq
import logging
import selectors
import signal
import socket
import sys
import time
from types import FrameType

import chatroom_cli
import protocol

log = logging.getLogger("chatroom.server")

PROG = "chatroom-server"

# One read per ready connection per turn; a connection's input buffer holds at most the line
# limit plus this, and one fast sender cannot hold the loop for long.
RECV_SIZE = 65536

# Redis' default backlog: a join storm waits in the kernel instead of being refused.
LISTEN_BACKLOG = 511

# Accepts per turn, so a connect storm cannot starve members already chatting.
ACCEPTS_PER_TURN = 64

# After the last line to a leaving peer we shut down our side and read until its EOF, so that
# unread input does not turn our close() into a reset; a peer that never closes gets this long.
LINGER_SECONDS = 2.0

# How long shutdown lets goodbyes drain before closing the rest: the process must exit within 2 s.
SHUTDOWN_GRACE_SECONDS = 1.0


class Connection:
    """One peer's state; lives in its SelectorKey.data."""

    def __init__(self, sock: socket.socket, member_id: str, max_line: int) -> None:
        self.sock = sock  # non-blocking, registered with the selector
        self.member_id = member_id  # "IP:PORT" as the server sees it: the name others see
        self.inbox = protocol.LineBuffer(max_line)  # received bytes not yet whole lines
        self.outbox = bytearray()  # queued output the kernel has not accepted yet
        self.joined = False  # sent !Join: a member of the room
        self.watching_writes = False  # EVENT_WRITE registered: the outbox did not drain
        self.leaving = False  # flush the outbox, then close (Redis' CLIENT_CLOSE_AFTER_REPLY)
        self.lingering = False  # our side is shut down; discarding input until the peer's EOF
        self.closed = False  # scheduled to close at the end of this turn; gets no more output


class ChatServer:
    def __init__(self, listener: socket.socket, max_line: int = protocol.MAX_LINE) -> None:
        self._listener = listener
        self._max_line = max_line
        self._selector = selectors.DefaultSelector()
        self._connections: set[Connection] = set()  # every open peer, joined or not
        self._members: set[Connection] = set()  # the joined ones: who gets broadcasts
        self._pending_writes: set[Connection] = set()  # output queued since the last flush
        self._to_close: list[Connection] = []  # closed at the end of the turn
        self._deadlines: list[tuple[float, int, Connection]] = []  # heap of linger deadlines
        self._deadline_count = 0  # tie-breaker, so the heap never compares connections
        self._stop_signal: int | None = None  # set by the signal handler; the loop stops
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

    def _request_stop(self, signum: int, frame: FrameType | None) -> None:
        self._stop_signal = signum

    def serve_forever(self) -> None:
        while self._stop_signal is None:
            self._run_once()
        log.info("%s received: shutting down", signal.Signals(self._stop_signal).name)
        self._shut_down()

    def _run_once(self, give_up_at: float | None = None) -> None:
        """One loop turn: flush and close what the last turn left (Redis' beforeSleep), then
        sleep until a socket is ready, the next deadline passes, or give_up_at."""
        self._flush_pending_writes()
        self._close_scheduled()
        for key, mask in self._selector.select(self._seconds_to_wake(give_up_at)):
            if key.fileobj is self._listener:
                self._accept_new_connections()
            elif key.fileobj is self._wakeup_reader:
                self._drain_wakeup()
            else:
                self._handle_event(key.data, mask)
        self._expire_deadlines()

    # Accepting and reading

    def _accept_new_connections(self) -> None:
        for _ in range(ACCEPTS_PER_TURN):
            try:
                sock, address = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            self._add_connection(sock, protocol.format_member_id(address[0], address[1]))

    def _add_connection(self, sock: socket.socket, member_id: str) -> None:
        sock.setblocking(False)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        conn = Connection(sock, member_id, self._max_line)
        self._connections.add(conn)
        self._selector.register(sock, selectors.EVENT_READ, conn)
        log.info("%s connected", member_id)

    def _drain_wakeup(self) -> None:
        try:
            while self._wakeup_reader.recv(4096):
                pass
        except BlockingIOError:
            pass

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
            log.info("closing %s: %s", conn.member_id, chatroom_cli.describe(exc))
            self._drop(conn, protocol.REASON_LOST)
            return
        if not data:
            self._drop(conn, protocol.REASON_CLOSED)
        elif not conn.leaving:  # a leaving peer's input is read only to be discarded
            conn.inbox.feed(data)
            self._handle_lines(conn)

    def _handle_lines(self, conn: Connection) -> None:
        while not conn.leaving and not conn.closed:
            try:
                line = conn.inbox.next_line()
            except protocol.LineTooLong as exc:
                log.info("%s sent a line over %d bytes", conn.member_id, exc.max_line)
                self._queue(conn, protocol.error_line(str(exc)))
                continue
            if line is None:
                return
            self._handle_command(conn, protocol.parse_client_line(line))

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
        """Queues one already-encoded line for every member but its sender."""
        for member in self._members:
            if member is not sender:
                self._queue(member, line)

    # Output

    def _queue(self, conn: Connection, line: bytes) -> None:
        if conn.closed:
            return
        conn.outbox += line
        if not conn.watching_writes:
            self._pending_writes.add(conn)

    def _flush_pending_writes(self) -> None:
        """Tries every queued output once per turn, before the next select() (Redis'
        handleClientsWithPendingWrites); a write may drop a peer and queue more notices."""
        while self._pending_writes:
            conn = self._pending_writes.pop()
            if not conn.closed:
                self._write_to(conn)

    def _write_to(self, conn: Connection) -> None:
        if conn.outbox:
            try:
                sent = conn.sock.send(conn.outbox)
            except BlockingIOError:
                sent = 0
            except OSError as exc:
                log.info("closing %s: %s", conn.member_id, chatroom_cli.describe(exc))
                self._drop(conn, protocol.REASON_LOST)
                return
            del conn.outbox[:sent]
        self._watch_writes(conn, bool(conn.outbox))
        if not conn.outbox and conn.leaving and not conn.lingering:
            self._linger(conn)

    def _watch_writes(self, conn: Connection, watch: bool) -> None:
        if conn.watching_writes == watch:
            return
        events = selectors.EVENT_READ | (selectors.EVENT_WRITE if watch else 0)
        self._selector.modify(conn.sock, events, conn)
        conn.watching_writes = watch

    # Closing

    def _close_after_flush(self, conn: Connection) -> None:
        conn.leaving = True
        self._pending_writes.add(conn)  # so the close starts even if nothing is queued

    def _linger(self, conn: Connection) -> None:
        """Everything is sent: shut down our side and wait for the peer's EOF."""
        try:
            conn.sock.shutdown(socket.SHUT_WR)
        except OSError:
            self._schedule_close(conn)
            return
        conn.lingering = True
        self._deadline_count += 1
        deadline = time.monotonic() + LINGER_SECONDS
        heapq.heappush(self._deadlines, (deadline, self._deadline_count, conn))

    def _drop(self, conn: Connection, reason: str) -> None:
        self._remove_member(conn, reason)
        self._schedule_close(conn)

    def _schedule_close(self, conn: Connection) -> None:
        if not conn.closed:
            conn.closed = True
            self._to_close.append(conn)

    def _close_scheduled(self) -> None:
        for conn in self._to_close:
            self._selector.unregister(conn.sock)
            conn.sock.close()
            self._connections.discard(conn)
            log.info("%s disconnected", conn.member_id)
        self._to_close.clear()

    def _seconds_to_wake(self, give_up_at: float | None) -> float | None:
        """How long select() may sleep: until the nearest deadline, or forever if none."""
        wake_at = [when for when in (give_up_at, self._next_deadline()) if when is not None]
        return max(0.0, min(wake_at) - time.monotonic()) if wake_at else None

    def _next_deadline(self) -> float | None:
        return self._deadlines[0][0] if self._deadlines else None

    def _expire_deadlines(self) -> None:
        now = time.monotonic()
        while self._deadlines and self._deadlines[0][0] <= now:
            _, _, conn = heapq.heappop(self._deadlines)
            if not conn.closed:
                log.info("closing %s: no end of stream after the last line", conn.member_id)
                self._schedule_close(conn)

    def _shut_down(self) -> None:
        """Tells everyone, lets the goodbyes drain for a moment, then closes what is left."""
        self._selector.unregister(self._listener)
        self._listener.close()
        self._members.clear()  # no leave notices while the whole room closes
        for conn in self._connections:
            if not conn.leaving:  # a leaving peer had its last line already
                self._queue(conn, protocol.error_line(protocol.ERROR_SHUTTING_DOWN))
                self._close_after_flush(conn)
        give_up_at = time.monotonic() + SHUTDOWN_GRACE_SECONDS
        while self._connections and time.monotonic() < give_up_at:
            self._run_once(give_up_at)
        for conn in self._connections:
            self._schedule_close(conn)
        self._close_scheduled()


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


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = chatroom_cli.make_parser(PROG, "Serve a chat room for terminal clients and nc.")
    chatroom_cli.add_address_arguments(
        parser,
        "address to listen on; 0.0.0.0 (or ::) for the whole LAN",
        0,
        "TCP port; 0 picks a free one",
    )
    parser.add_argument(
        "--max-line",
        type=chatroom_cli.int_in_range(64, 1 << 20),
        default=protocol.MAX_LINE,
        metavar="BYTES",
        help="longest line a client may send, counting its newline (default: %(default)s)",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(name)s %(message)s", stream=sys.stderr
    )
    try:
        listener = open_listener(args.host, args.port)
    except OSError as exc:
        where = protocol.format_member_id(args.host, args.port)
        return chatroom_cli.fail(PROG, f"cannot listen on {where}: {chatroom_cli.describe(exc)}")
    server = ChatServer(listener, max_line=args.max_line)
    server.install_signal_handlers()
    host, port = listener.getsockname()[:2]
    print(f"listening on {protocol.format_member_id(host, port)}", flush=True)
    server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
