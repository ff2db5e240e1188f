"""The chat room client: joins on start, then two threads.

The receiver thread is the only reader of the socket, and shows each line it receives; the
input thread is the only reader of stdin, and the only sender of chat lines. The main thread
sends !Join, waits for either thread to finish the session, picks the exit status and prints
the one closing line on stderr.

Two resources have more than one user, and a lock makes each safe. The socket: the input
thread sends lines and !Quit, and the main thread, on a leave signal, sends !Quit only if that
cannot block, then shuts the socket down to wake both threads; the send lock keeps every line
whole. stdout, on a terminal: the receiver shows
lines and changes the prompt when the server names the user, readline in the input thread
draws the prompt and echoes keys, and the main thread clears the prompt at the end; the
terminal's lock keeps a line being shown or a prompt being changed apart from a prompt being
drawn (readline's echo of a key does not take it). On a pipe only the receiver
writes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import select
import signal
import socket
import ssl
import sys
import threading
import time
from dataclasses import dataclass
from types import FrameType

from chatroom import cli, protocol, tls
from chatroom.terminal import (
    InteractiveTerminal,
    Painter,
    PlainTerminal,
    prompt_for,
    terminal_settings_restored,
    wants_colour,
)

PROG = "chatroom-client"

# Leaving ends within 1.5 s whatever the server or stdout is doing, so the process is gone within
# the 2 s the README promises: up to 1.2 s for the server's goodbye and close, then up to 0.3 s
# for the receiver to finish showing what it has.
GOODBYE_TIMEOUT_SECONDS = 1.2
RECEIVER_EXIT_TIMEOUT_SECONDS = 0.3

# An unreachable host should fail in seconds, not after the OS's minutes-long SYN retries.
CONNECT_TIMEOUT_SECONDS = 5.0

RECV_SIZE = 65536


@dataclass(frozen=True)
class Options:
    """How the user asked the session to go, beyond where to connect."""

    name: str | None = None  # taken with /nick right after !Join
    timestamps: bool = False  # every line shown starts with the local time, "HH:MM "


# Ctrl-C, being told to stop, and losing the terminal all leave the room the same way.
LEAVE_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class LeaveSignal:
    """The handler of the leave signals. The first one raises KeyboardInterrupt in the main
    thread; from then on they are blocked, so another can neither break off the leave (which is
    bounded anyway) nor arrive while the interpreter exits, which restores their default
    action first: the process would die of the signal instead of exiting with its status."""

    def __init__(self) -> None:
        self._armed = True  # false once blocked; a signal that came just before does nothing

    def __call__(self, signum: int, frame: FrameType | None) -> None:
        if self._armed:
            self.block()
            raise KeyboardInterrupt

    def block(self) -> None:
        """The session is ending: a leave signal from now on changes nothing."""
        self._armed = False
        signal.pthread_sigmask(signal.SIG_BLOCK, LEAVE_SIGNALS)


class OutputBlocked(Exception):
    """The receiver is still blocked writing to stdout (a pipe nobody reads, a paused pager) when
    the session is over: nothing may wait for it or write to stdout again."""

    def __init__(self, status: int) -> None:
        super().__init__(status)
        self.status = status  # the exit status the session ended with


class Session:
    """One connection to the server, shared by the three threads."""

    def __init__(
        self,
        sock: socket.socket,
        terminal: PlainTerminal,
        options: Options,
        painter: Painter | None,
    ) -> None:
        self._sock = sock
        self._terminal = terminal
        self._options = options
        self._painter = painter  # None: lines are shown without colour
        # Held for a whole line, so lines never interleave: the input thread takes it for each
        # line; the main thread only tries it on a leave signal, and never waits for it.
        self._send_lock = threading.Lock()
        self.leaving = threading.Event()  # the user asked to leave
        self.ended = threading.Event()  # the receiver saw the end of the stream
        self.changed = threading.Event()  # either of the above: the main thread looks
        self.failure: str | None = None  # why the session ended if the user did not end it

    def send_line(self, text: str) -> None:
        with self._send_lock:
            self._sock.sendall(protocol.encode_client_line(text))

    def leave(self) -> None:
        """The user typed !Quit or ended the input: !Quit goes out after every line typed before."""
        self.leaving.set()
        with contextlib.suppress(OSError):  # a lost connection is the receiver's to report
            self.send_line(protocol.QUIT)
        self.changed.set()

    def leave_now(self) -> bool:
        """A leave signal: sends !Quit only if that cannot block, since a send the server is not
        reading (flood control) would hold the leave for minutes. True if the whole !Quit went
        out, so the server's goodbye is worth waiting for; False too if the user had already
        left, since a signal while waiting for that goodbye means "stop waiting"."""
        already_leaving = self.leaving.is_set()
        self.leaving.set()
        # Held means the input thread is inside a send that has not finished: a !Quit now
        # would land in the middle of its line.
        if already_leaving or not self._send_lock.acquire(blocking=False):
            return False
        try:
            quit_line = protocol.encode_client_line(protocol.QUIT)
            if isinstance(self._sock, ssl.SSLSocket):  # it takes no flags: look first
                if not select.select([], [self._sock], [], 0)[1]:
                    return False
                self._sock.sendall(quit_line)  # one small record: the buffer has room for it
                return True
            return self._sock.send(quit_line, socket.MSG_DONTWAIT) == len(quit_line)
        except OSError:  # the send buffer is full, or the connection is gone
            return False
        finally:
            self._send_lock.release()

    def stop_receiving(self) -> None:
        """Wakes a receiver blocked in recv() and an input thread blocked in sendall():
        shutdown() does, close() would not."""
        with contextlib.suppress(OSError):
            self._sock.shutdown(socket.SHUT_RDWR)

    def receive_forever(self) -> None:
        lines = protocol.LineBuffer(protocol.MAX_SERVER_LINE)
        try:
            while data := self._sock.recv(RECV_SIZE):
                lines.feed(data)
                self._show_lines(lines)
        except OSError as exc:
            self._end(f"connection lost: {cli.describe(exc)}")
            return
        if lines.has_partial_line:
            self._end("connection lost in the middle of a line")
        else:
            self._end("the server closed the connection")

    def _show_lines(self, lines: protocol.LineBuffer) -> None:
        while True:
            try:
                line = lines.next_line()
            except protocol.LineTooLong as exc:
                self._show(f"[a line from the server over {exc.max_line} bytes was cut]")
                continue
            if line is None:
                return
            text = protocol.decode_line(line)
            label = protocol.own_label(text)
            if self._painter is not None:
                if label is not None:
                    self._painter.set_own_label(label)
                text = self._painter.paint(text)
            self._show(text)
            if label is not None:
                self._terminal.set_prompt(prompt_for(label))

    def _show(self, text: str) -> None:
        if self._options.timestamps:
            text = time.strftime("%H:%M ") + text
        self._terminal.show(text)

    def _end(self, failure: str) -> None:
        if not self.leaving.is_set():
            self.failure = failure
        self.ended.set()
        self.changed.set()

    def exit_status(self) -> int:
        """0 if the user left; else 1, with the reason on stderr."""
        return 0 if self.failure is None else cli.fail(PROG, self.failure)

    def read_input_forever(self) -> None:
        while not self.leaving.is_set():
            text = self._terminal.read_line()
            if text is None or text.strip().lower() == protocol.QUIT.lower():
                self.leave()
                return
            try:
                self.send_line(text)
            except OSError:
                return  # the receiver sees the loss and reports it


def run_session(
    sock: socket.socket,
    terminal: PlainTerminal,
    leave_signal: LeaveSignal,
    options: Options,
    painter: Painter | None,
) -> int:
    session = Session(sock, terminal, options, painter)
    try:
        session.send_line(protocol.JOIN)
        if options.name is not None:
            # Not "!Join NAME": a name taken already would keep the user out of the room.
            session.send_line(f"{protocol.COMMAND_PREFIX}nick {options.name}")
    except OSError as exc:
        return cli.fail(PROG, f"connection lost: {cli.describe(exc)}")
    receiver = threading.Thread(target=session.receive_forever, name="receiver")
    # A blocked read of stdin cannot be interrupted, so this thread is a daemon nobody joins.
    reader = threading.Thread(target=session.read_input_forever, name="input", daemon=True)
    # Threads inherit the signal mask: started with the leave signals blocked, they never take
    # one, and the first reaches the main thread as KeyboardInterrupt inside the try below.
    signal.pthread_sigmask(signal.SIG_BLOCK, LEAVE_SIGNALS)
    receiver.start()
    reader.start()
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, LEAVE_SIGNALS)
        session.changed.wait()
        if not session.ended.is_set():  # the user left: the server answers !Quit and closes
            session.ended.wait(GOODBYE_TIMEOUT_SECONDS)
        leave_signal.block()
    except KeyboardInterrupt:
        if session.leave_now():
            session.ended.wait(GOODBYE_TIMEOUT_SECONDS)
    session.stop_receiving()
    receiver.join(RECEIVER_EXIT_TIMEOUT_SECONDS)
    if receiver.is_alive():
        raise OutputBlocked(session.exit_status())
    sock.close()
    terminal.finish()
    return session.exit_status()


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.make_parser(PROG, "Join a chat room. Type to talk; !Quit to leave.")
    cli.add_address_arguments(parser, "server address", 1, "server port")
    parser.add_argument(
        "--name",
        type=member_name,
        help="take this name once in the room (/nick changes it); others see NAME@IP:PORT",
    )
    parser.add_argument(
        "--timestamps",
        action="store_true",
        help="start every line shown with the local time (HH:MM)",
    )
    private = parser.add_argument_group("a private room")
    private.add_argument(
        "--tls", action="store_true", help="connect with TLS, verified against the system's CAs"
    )
    private.add_argument(
        "--tls-ca", metavar="FILE", help="connect with TLS, verified against this CA (PEM)"
    )
    private.add_argument(
        "--tls-fingerprint",
        type=_fingerprint,
        metavar="SHA256",
        help="connect with TLS to the server whose certificate has this SHA-256 fingerprint "
        "(as the server logs it; colons and case optional), whoever signed it",
    )
    cli.add_password_file_argument(private, "the room's password, on the file's first line")
    return parser.parse_args(argv)


def member_name(text: str) -> str:
    """An argparse type: a name the room accepts (protocol.NAME_PATTERN)."""
    if not protocol.NAME_PATTERN.match(text):
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a name: 1 to 16 ASCII letters, digits, _ or -, a letter first"
        )
    return text


def _fingerprint(text: str) -> str:
    try:
        return tls.parse_fingerprint(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    leave_signal = LeaveSignal()
    for signum in LEAVE_SIGNALS:
        signal.signal(signum, leave_signal)
    # Bytes typed in another encoding, and characters the terminal's encoding cannot show
    # (an emoji in ISO-8859-1), are replaced: an encoding error would kill the receiver thread.
    sys.stdin.reconfigure(errors="replace")  # type: ignore[union-attr]
    sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        return connect_and_chat(
            args.host,
            args.port,
            leave_signal,
            Options(args.name, args.timestamps),
            use_tls=args.tls or args.tls_ca is not None or args.tls_fingerprint is not None,
            ca_file=args.tls_ca,
            fingerprint=args.tls_fingerprint,
            password=args.password,
        )
    except KeyboardInterrupt:
        return 130  # stopped before the session began: there is nothing to leave
    except OutputBlocked as blocked:
        # A normal exit would wait for the receiver, then flush stdout under a lock it holds.
        sys.stderr.flush()
        os._exit(blocked.status)
    finally:
        leave_signal.block()


def connect_and_chat(
    host: str,
    port: int,
    leave_signal: LeaveSignal,
    options: Options,
    use_tls: bool = False,
    ca_file: str | None = None,
    fingerprint: str | None = None,
    password: str | None = None,
) -> int:
    where = protocol.format_member_id(host, port)
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS)
    except OSError as exc:
        return cli.fail(PROG, f"cannot connect to {where}: {cli.describe(exc)}")
    if use_tls:  # the handshake and the certificate's check, within the connect timeout
        try:
            sock = tls.connect(sock, host, ca_file, fingerprint)
        except tls.FingerprintMismatch as exc:
            sock.close()
            return cli.fail(PROG, f"refusing {where}: its certificate is not the pinned one: {exc}")
        except ssl.SSLError as exc:
            sock.close()
            return cli.fail(PROG, f"TLS with {where} failed: {tls.describe_failure(exc)}")
        except OSError as exc:
            sock.close()
            return cli.fail(PROG, f"TLS with {where} failed: {cli.describe(exc)}")
    sock.settimeout(None)
    if password is not None:  # before run_session's !Join, as IRC's PASS comes before NICK
        try:
            sock.sendall(protocol.encode_client_line(protocol.pass_line(password)))
        except OSError as exc:
            sock.close()
            return cli.fail(PROG, f"connection lost: {cli.describe(exc)}")
    painter = Painter() if wants_colour(os.environ, sys.stdout) else None
    if sys.stdin.isatty() and sys.stdout.isatty():
        with terminal_settings_restored():
            return run_session(sock, InteractiveTerminal(), leave_signal, options, painter)
    return run_session(sock, PlainTerminal(), leave_signal, options, painter)


if __name__ == "__main__":
    sys.exit(main())
