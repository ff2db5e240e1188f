"""The chat room client: joins on start, then two threads, one owner per resource.

The receiver thread is the only reader of the socket and the only writer to stdout; the input
thread is the only reader of stdin. The main thread waits for either to finish the session,
picks the exit status and prints the one closing line on stderr.
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import socket
import sys
import threading
from collections.abc import Iterator

from chatroom import cli, protocol

PROG = "chatroom-client"

# How long a leaving client waits for the server's goodbye and close: it must exit within 2 s.
LEAVE_TIMEOUT_SECONDS = 1.5

# An unreachable host should fail in seconds, not after the OS's minutes-long SYN retries.
CONNECT_TIMEOUT_SECONDS = 5.0

RECV_SIZE = 65536

PROMPT = "> "

# Ctrl-C, being told to stop, and losing the terminal all leave the room the same way.
LEAVE_SIGNALS = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class PlainTerminal:
    """Lines in from stdin and out to stdout, for pipes and files."""

    def read_line(self) -> str | None:
        """One line the user typed, without its newline; None at the end of input."""
        line = sys.stdin.readline()
        return line.rstrip("\r\n") if line else None

    def show(self, text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def finish(self) -> None:
        """Leaves the terminal ready for the closing line on stderr."""


class InteractiveTerminal(PlainTerminal):
    """A terminal with readline line editing, where a line that arrives while the user types
    is printed above the prompt, and the prompt is drawn again with the half-typed text."""

    def __init__(self) -> None:
        import readline

        self._readline = readline
        self._lock = threading.Lock()  # held while readline draws the prompt or a line is shown
        self._prompt_visible = False  # readline is reading keys behind a drawn prompt
        readline.set_startup_hook(self._before_prompt)
        readline.set_pre_input_hook(self._after_prompt)

    def _before_prompt(self) -> None:
        self._lock.acquire()

    def _after_prompt(self) -> None:
        self._prompt_visible = True
        self._lock.release()

    def read_line(self) -> str | None:
        try:
            text: str | None = input(PROMPT)
        except EOFError:
            text = None
        with self._lock:
            self._prompt_visible = False
            # A line shown between Enter and here drew a stale prompt on this line: erase it.
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
        return text

    def show(self, text: str) -> None:
        with self._lock:
            if self._prompt_visible:
                typed = self._readline.get_line_buffer()
                sys.stdout.write(f"\r\x1b[K{text}\n{PROMPT}{typed}")
            else:
                sys.stdout.write(text + "\n")
            sys.stdout.flush()

    def finish(self) -> None:
        with self._lock:
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()


class Session:
    """One connection to the server, shared by the three threads."""

    def __init__(self, sock: socket.socket, terminal: PlainTerminal) -> None:
        self._sock = sock
        self._terminal = terminal
        self._send_lock = threading.Lock()  # the input thread and, on Ctrl-C, the main thread send
        self.leaving = threading.Event()  # the user asked to leave and !Quit went out
        self.ended = threading.Event()  # the receiver saw the end of the stream
        self.changed = threading.Event()  # either of the above: the main thread looks
        self.failure: str | None = None  # why the session ended if the user did not end it

    def send_line(self, text: str) -> None:
        with self._send_lock:
            self._sock.sendall(protocol.encode_client_line(text))

    def leave(self) -> None:
        if self.leaving.is_set():
            return
        self.leaving.set()
        with contextlib.suppress(OSError):  # a lost connection is the receiver's to report
            self.send_line(protocol.QUIT)
        self.changed.set()

    def stop_receiving(self) -> None:
        """Wakes a receiver blocked in recv(): shutdown() does, close() would not."""
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
                self._terminal.show(f"[a line from the server over {exc.max_line} bytes was cut]")
                continue
            if line is None:
                return
            self._terminal.show(protocol.decode_line(line))

    def _end(self, failure: str) -> None:
        if not self.leaving.is_set():
            self.failure = failure
        self.ended.set()
        self.changed.set()

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


def run_session(sock: socket.socket, terminal: PlainTerminal) -> int:
    session = Session(sock, terminal)
    try:
        session.send_line(protocol.JOIN)
    except OSError as exc:
        return cli.fail(PROG, f"connection lost: {cli.describe(exc)}")
    receiver = threading.Thread(target=session.receive_forever, name="receiver")
    # A blocked read of stdin cannot be interrupted, so this thread is a daemon nobody joins.
    reader = threading.Thread(target=session.read_input_forever, name="input", daemon=True)
    # Threads inherit the signal mask: started with the leave signals blocked, they never take
    # one, and each reaches the main thread as KeyboardInterrupt inside the try below.
    signal.pthread_sigmask(signal.SIG_BLOCK, LEAVE_SIGNALS)
    receiver.start()
    reader.start()
    try:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, LEAVE_SIGNALS)
        session.changed.wait()
        if not session.ended.is_set():
            session.ended.wait(LEAVE_TIMEOUT_SECONDS)
    except KeyboardInterrupt:
        session.leave()
        with contextlib.suppress(KeyboardInterrupt):  # a second Ctrl-C skips the wait
            session.ended.wait(LEAVE_TIMEOUT_SECONDS)
    session.stop_receiving()
    receiver.join()
    sock.close()
    terminal.finish()
    if session.failure is not None:
        return cli.fail(PROG, session.failure)
    return 0


@contextlib.contextmanager
def terminal_settings_restored() -> Iterator[None]:
    """Puts the terminal's settings back however the client ends: a Ctrl-C can come while
    readline, in the input thread, has the terminal in its own mode."""
    import termios

    saved = termios.tcgetattr(sys.stdin)
    try:
        yield
    finally:
        termios.tcsetattr(sys.stdin, termios.TCSADRAIN, saved)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = cli.make_parser(PROG, "Join a chat room. Type to talk; !Quit to leave.")
    cli.add_address_arguments(parser, "server address", 1, "server port")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    for signum in LEAVE_SIGNALS:
        signal.signal(signum, signal.default_int_handler)
    sys.stdin.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        return connect_and_chat(args.host, args.port)
    except KeyboardInterrupt:
        return 130  # stopped before the session began: there is nothing to leave


def connect_and_chat(host: str, port: int) -> int:
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS)
    except OSError as exc:
        where = protocol.format_member_id(host, port)
        return cli.fail(PROG, f"cannot connect to {where}: {cli.describe(exc)}")
    sock.settimeout(None)
    if sys.stdin.isatty() and sys.stdout.isatty():
        with terminal_settings_restored():
            return run_session(sock, InteractiveTerminal())
    return run_session(sock, PlainTerminal())


if __name__ == "__main__":
    sys.exit(main())
