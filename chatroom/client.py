"""The chat room client: joins on start, then two threads.

The receiver thread is the only reader of the socket, and shows each line it receives; the
input thread is the only reader of stdin, and the only sender of chat lines. The main thread
sends !Join, waits for either thread to finish the session, picks the exit status and prints
the one closing line on stderr.

Two resources have more than one user, and a lock makes each safe. The socket: the input
thread sends lines and !Quit, and the main thread, on a leave signal, sends !Quit only if that
cannot block, then shuts the socket down to wake both threads; the send lock keeps every line
whole. stdout, on a terminal: the receiver shows
lines, readline in the input thread draws the prompt and echoes keys, and the main thread
clears the prompt at the end; the terminal's lock keeps a line being shown apart from a
prompt being drawn (readline's echo of a key does not take it). On a pipe only the receiver
writes to stdout.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import sys
import threading
import unicodedata
from collections.abc import Iterator
from types import FrameType, ModuleType

from chatroom import cli, protocol

PROG = "chatroom-client"

# Leaving ends within 1.5 s whatever the server or stdout is doing, so the process is gone within
# the 2 s the README promises: up to 1.2 s for the server's goodbye and close, then up to 0.3 s
# for the receiver to finish showing what it has.
GOODBYE_TIMEOUT_SECONDS = 1.2
RECEIVER_EXIT_TIMEOUT_SECONDS = 0.3

# An unreachable host should fail in seconds, not after the OS's minutes-long SYN retries.
CONNECT_TIMEOUT_SECONDS = 5.0

RECV_SIZE = 65536

PROMPT = "> "

# Starts every row of a received line after its first, which the client wraps itself: only a
# line's first row starts at column 0, so a member who pads a line to the reader's width
# cannot make the rest of it pass for a notice or another member's line.
CONTINUATION_INDENT = "  "

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


def char_width(char: str) -> int:
    """The columns a character takes on a terminal: two for East Asian wide and fullwidth ones,
    none for combining marks (they sit on the character before), one for the rest."""
    if unicodedata.category(char) in ("Mn", "Me"):
        return 0
    return 2 if unicodedata.east_asian_width(char) in ("W", "F") else 1


def display_width(text: str) -> int:
    return sum(char_width(char) for char in text)


def wrap(text: str, width: int, indent: str = "") -> list[str]:
    """text cut into rows of at most width columns, as a terminal wraps it: a character that
    does not fit starts the next row (unless the row holds nothing else), which starts with
    indent."""
    rows: list[str] = []
    row, column, start = "", 0, 0  # the row so far, its width, and where its text begins
    for char in text:
        if column + char_width(char) > width and column > start:
            rows.append(row)
            row, column = indent, display_width(indent)
            start = column
        row += char
        column += char_width(char)
    rows.append(row)
    return rows


def rows_above_cursor(text: str, width: int) -> int:
    """How many rows above the cursor text starts, once written from the start of a row of a
    terminal width columns wide: after a row filled exactly, readline puts the cursor on the
    next row."""
    rows = wrap(text, width)
    return len(rows) - 1 + (display_width(rows[-1]) >= width)


def terminal_width() -> int:
    """The terminal's width now, read for every line so that a resized terminal is followed:
    the size it reports itself ($COLUMNS can be stale), 80 if it reports none."""
    try:
        return os.get_terminal_size(sys.stdout.fileno()).columns or 80
    except OSError:
        return 80


class GnuReadline:
    """What Python's readline module leaves out, read through ctypes from the GNU readline it
    loaded: where the cursor is (rl_point), whether Enter was just pressed (rl_done), and a
    redraw of the prompt and line from scratch (rl_forced_update_display)."""

    def __init__(self, library: ctypes.CDLL) -> None:
        self._point = ctypes.c_int.in_dll(library, "rl_point")  # a byte offset into the line
        self._done = ctypes.c_int.in_dll(library, "rl_done")
        self._line = ctypes.c_char_p.in_dll(library, "rl_line_buffer")
        self._forced_update_display = library.rl_forced_update_display

    @classmethod
    def load(cls, module: ModuleType) -> GnuReadline | None:
        """None where the module is built on libedit, whose look-alikes behave differently, or
        the symbols cannot be found."""
        if "libedit" in (module.__doc__ or ""):
            return None
        try:
            return cls(ctypes.CDLL(module.__file__))
        except (OSError, ValueError, AttributeError):
            return None

    def typed_before_cursor(self) -> str:
        typed = (self._line.value or b"")[: self._point.value]
        return typed.decode(sys.stdin.encoding, errors="replace")  # as readline read the keys

    def line_accepted(self) -> bool:
        """Enter was pressed and readline moved to the next row: no prompt is on screen."""
        return bool(self._done.value)

    def redraw(self) -> None:
        """Draws the prompt and the line at the cursor, leaving the cursor at the user's place."""
        self._forced_update_display()


class InteractiveTerminal(PlainTerminal):
    """A terminal with readline line editing, where a line that arrives while the user types
    is printed above the prompt, and the prompt is drawn again with the half-typed text and
    the cursor where it was. A line wider than the terminal is wrapped here, with every row
    after its first indented.

    With GNU readline, readline redraws its own line, so the screen and readline agree on the
    text and the cursor. Elsewhere (libedit) the prompt is redrawn here and the cursor is
    assumed at the end of the line."""

    def __init__(self) -> None:
        import readline

        self._readline = readline
        self._gnu = GnuReadline.load(readline)
        # Held while readline draws the prompt, a line is shown, or the prompt is erased; not
        # while readline echoes a key, which happens inside readline with no hook to take it.
        self._lock = threading.Lock()
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
            # A line shown between Enter and here may have drawn a stale prompt: erase it.
            sys.stdout.write("\r\x1b[K")
            sys.stdout.flush()
        return text

    def show(self, text: str) -> None:
        rows = wrap(text, terminal_width(), CONTINUATION_INDENT)
        with self._lock:
            prompt_drawn = self._prompt_visible and not (
                self._gnu is not None and self._gnu.line_accepted()
            )
            if prompt_drawn:
                self._erase_prompt()
            # Autowrap off meanwhile (DECAWM): a character the terminal draws wider than
            # char_width() counts it is cut at the right edge instead of starting a row.
            sys.stdout.write("\x1b[?7l" + "\n".join(rows) + "\n\x1b[?7h")
            sys.stdout.flush()
            if prompt_drawn:
                self._redraw_prompt()

    def _erase_prompt(self) -> None:
        """Clears every row the prompt and the typed line take, from the first one down."""
        if self._gnu is not None:
            before_cursor = self._gnu.typed_before_cursor()
        else:
            before_cursor = self._readline.get_line_buffer()
        up = rows_above_cursor(PROMPT + before_cursor, terminal_width())
        sys.stdout.write("\r" + (f"\x1b[{up}A" if up else "") + "\x1b[J")

    def _redraw_prompt(self) -> None:
        if self._gnu is not None:
            self._gnu.redraw()
        else:
            sys.stdout.write(PROMPT + self._readline.get_line_buffer())
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


def run_session(sock: socket.socket, terminal: PlainTerminal, leave_signal: LeaveSignal) -> int:
    session = Session(sock, terminal)
    try:
        session.send_line(protocol.JOIN)
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
    leave_signal = LeaveSignal()
    for signum in LEAVE_SIGNALS:
        signal.signal(signum, leave_signal)
    # Bytes typed in another encoding, and characters the terminal's encoding cannot show
    # (an emoji in ISO-8859-1), are replaced: an encoding error would kill the receiver thread.
    sys.stdin.reconfigure(errors="replace")  # type: ignore[union-attr]
    sys.stdout.reconfigure(errors="replace")  # type: ignore[union-attr]
    try:
        return connect_and_chat(args.host, args.port, leave_signal)
    except KeyboardInterrupt:
        return 130  # stopped before the session began: there is nothing to leave
    except OutputBlocked as blocked:
        # A normal exit would wait for the receiver, then flush stdout under a lock it holds.
        sys.stderr.flush()
        os._exit(blocked.status)
    finally:
        leave_signal.block()


def connect_and_chat(host: str, port: int, leave_signal: LeaveSignal) -> int:
    try:
        sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_SECONDS)
    except OSError as exc:
        where = protocol.format_member_id(host, port)
        return cli.fail(PROG, f"cannot connect to {where}: {cli.describe(exc)}")
    sock.settimeout(None)
    if sys.stdin.isatty() and sys.stdout.isatty():
        with terminal_settings_restored():
            return run_session(sock, InteractiveTerminal(), leave_signal)
    return run_session(sock, PlainTerminal(), leave_signal)


if __name__ == "__main__":
    sys.exit(main())
