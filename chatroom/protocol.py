"""The chat room's wire format, sans-IO: bytes in, commands out; events in, bytes out.

Everything about the wire lives here and nowhere else: framing lines, parsing what a client
sends, building every line the server sends, the member identifier, and making text safe to
show on a terminal. Nothing here touches a socket, a thread or a terminal (see PROTOCOL.md).
"""

from __future__ import annotations

import codecs
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Union

ENCODING = "utf-8"

# Longest line a client may send, counting its "\n". IRC allows 512, ssh-chat 1024, NATS 4096,
# devzat 5120: 4096 holds a long paragraph while keeping per-member buffers small.
MAX_LINE = 4096

# Longest line the client accepts from a server. A server may run with a larger --max-line and
# prefixes a tag of up to ~60 bytes, so this is generous; it still bounds what a hostile server
# can make the client hold.
MAX_SERVER_LINE = 65536

JOIN = "!Join"
QUIT = "!Quit"
PASS = "!Pass"
COMMAND_PREFIX = "/"
_JOIN_WORD, _QUIT_WORD, _PASS_WORD = JOIN.lower(), QUIT.lower(), PASS.lower()
# What separates a command's words, and may stand around a line: spaces and tabs only. Other
# blanks (U+00A0, U+3000) are text, as PROTOCOL.md says.
_BLANKS = " \t"
_BETWEEN_WORDS = re.compile("[ \t]+")

# A name: 1 to 16 ASCII letters, digits, "_" or "-", a letter first. ASCII only, so no name is
# a lookalike of another in some other script; no ".", ":", "[", space or "@", so none looks
# like an address, a notice or a tag.
NAME_PATTERN = re.compile(r"[A-Za-z][A-Za-z0-9_-]{0,15}\Z")

ERROR_PREFIX = "ERROR :"
ERROR_NOT_JOINED = f"Join first: send {JOIN}"
ERROR_ALREADY_JOINED = "Already joined"
ERROR_SHUTTING_DOWN = "Server shutting down"
ERROR_SENDQ_EXCEEDED = "SendQ exceeded"
ERROR_PER_IP = "Too many connections from your address"
ERROR_TOO_MANY_WAITING = f"Too many connections waiting to join: send {JOIN} at once"
ERROR_JOIN_TIMEOUT = "Join timeout"
ERROR_LINE_TIMEOUT = "Timeout: incomplete line"
ERROR_WRONG_PROTOCOL = f"Wrong protocol: this is a chat server, send {JOIN}"
ERROR_PASSWORD_REQUIRED = f"Password required: send {PASS} PASSWORD first"
ERROR_WRONG_PASSWORD = "Wrong password"
ERROR_TOO_MANY_WRONG_PASSWORDS = "Too many wrong passwords, try again later"
ERROR_TLS_REQUIRED = "TLS required: connect with TLS (chatroom-client --tls)"
ERROR_LINE_BREAK = "Line break inside a message: send one line per message"
ERROR_PING_TIMEOUT = "Ping timeout"
ERROR_INVALID_NAME = "Invalid name: 1 to 16 ASCII letters, digits, _ or -, a letter first"
USAGE_NICK = "Usage: /nick NAME"
USAGE_MSG = "Usage: /msg TARGET TEXT (TARGET: a name or IP:PORT)"
USAGE_ME = "Usage: /me TEXT"

# How much of a peer's own word an error quotes back: enough to recognise it, never a flood.
_QUOTED = 32


def _quoted(word: str) -> str:
    return word if len(word) <= _QUOTED else word[: _QUOTED - 1] + "\u2026"


def name_taken_error(name: str) -> str:
    return f"Name taken: {name}"


def rename_too_soon_error(seconds: float) -> str:
    return f"Name changed too recently: wait {max(1, round(seconds))} s"


def no_such_member_error(target: str) -> str:
    return f"No such member: {_quoted(target)} (/who lists them)"


def unknown_command_error(word: str) -> str:
    command = COMMAND_PREFIX + _quoted(word)
    return f"Unknown command {command}: /help lists them; /{command} sends a line starting /"


def server_full_error(max_members: int) -> str:
    return f"Server full (max {max_members} members)"


# The whole answer to an HTTP request when the web extra (websockets) is not installed: fixed
# bytes, so the terminal core needs no HTTP library to tell a browser how to turn the page on.
_WEB_MISSING_TEXT = (
    b"This chat server has no web page yet: its operator can add it with\n"
    b"    python -m pip install 'chatroom[web]'\n"
)
WEB_MISSING_RESPONSE = (
    b"HTTP/1.1 501 Not Implemented\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (len(_WEB_MISSING_TEXT), _WEB_MISSING_TEXT)
)

# The whole answer to a plain HTTP request on a server started with --require-tls: a browser
# shows it, where an error line would be a download or nothing.
_TLS_REQUIRED_TEXT = (
    b"This chat room is served over TLS only: open it with https://, not http://.\n"
)
TLS_REQUIRED_RESPONSE = (
    b"HTTP/1.1 403 Forbidden\r\n"
    b"Content-Type: text/plain; charset=utf-8\r\n"
    b"Content-Length: %d\r\n"
    b"Connection: close\r\n\r\n%s" % (len(_TLS_REQUIRED_TEXT), _TLS_REQUIRED_TEXT)
)

REASON_QUIT = "quit"
REASON_CLOSED = "connection closed"
REASON_LOST = "connection lost"
REASON_TOO_SLOW = "too slow"
REASON_TIMEOUT = "timeout"
REASON_SERVER_ERROR = "server error"


class RemoteProtocolError(Exception):
    """The peer sent bytes that break the protocol: its fault, never a reason to crash."""


class LineRefused(RemoteProtocolError):
    """A line the server will not take: the peer is sent the text as an error line and stays."""


class LineTooLong(LineRefused):
    """A line ran past the limit; the buffer discards the rest of it and goes on."""

    def __init__(self, max_line: int) -> None:
        super().__init__(f"Line too long (max {max_line} bytes)")
        self.max_line = max_line


class LineBreakInMessage(LineRefused):
    """A WebSocket text message held a line break: each message is exactly one line, so a
    second line hidden inside one is refused whole, never split or relayed in part."""

    def __init__(self) -> None:
        super().__init__(ERROR_LINE_BREAK)


class LineBuffer:
    """Splits a byte stream into lines ending in b"\\n" (b"\\r\\n" accepted), at most max_line
    bytes each counting the terminator.

    An over-long line is reported once, while still incomplete (so an endless line never fills
    memory), and the rest of it up to its b"\\n" is dropped: the buffer never holds more than
    max_line bytes plus the last chunk fed.
    """

    __slots__ = ("_data", "_discarding", "_max_line", "_searched")

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self._max_line = max_line
        self._data = bytearray()  # received bytes not yet returned as a line
        self._searched = 0  # bytes at the front of _data already known to hold no b"\n"
        self._discarding = False  # inside an over-long line, dropping bytes until its b"\n"

    def feed(self, data: bytes) -> None:
        self._data += data

    @property
    def has_partial_line(self) -> bool:
        """True while bytes of an unfinished line are held (to tell a drop mid-line at EOF)."""
        return bool(self._data) or self._discarding

    def next_line(self) -> bytes | None:
        """The next complete line without its terminator, or None until more bytes arrive.

        Raises LineTooLong once per over-long line; the buffer stays usable.
        """
        if self._discarding and not self._skip_rest_of_long_line():
            return None
        end = self._data.find(b"\n", self._searched)
        if end == -1:
            self._searched = len(self._data)
            if len(self._data) >= self._max_line:
                self._data.clear()
                self._searched = 0
                self._discarding = True
                raise LineTooLong(self._max_line)
            return None
        line = bytes(self._data[:end])
        del self._data[: end + 1]
        self._searched = 0
        if end + 1 > self._max_line:
            raise LineTooLong(self._max_line)
        return line[:-1] if line.endswith(b"\r") else line

    def _skip_rest_of_long_line(self) -> bool:
        """Drop bytes up to the end of the over-long line; True once its b"\\n" is passed."""
        end = self._data.find(b"\n")
        if end == -1:
            self._data.clear()
            self._searched = 0
            return False
        del self._data[: end + 1]
        self._searched = 0
        self._discarding = False
        return True


_HTTP_REQUEST = re.compile(rb"[A-Z]{3,7} \S+ HTTP/\d")
_TELNET_IAC = 0xFF  # a telnet client may open with option negotiation: not a foreign protocol
# How much of a connection's opening is looked at for binary: a protocol's header fits in it.
_OPENING_BYTES = 64
# What is not text, once decoded with "surrogateescape" (which turns each byte of invalid
# UTF-8 into one of U+DC80-U+DCFF): a control byte other than tab, LF and CR, DEL, bad UTF-8.
_NOT_TEXT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\udc80-\udcff]")


def looks_like_tls(first_bytes: bytes) -> bool:
    """True if a connection opens with a TLS handshake record (content type 22, version 3.x):
    a ClientHello, which a server with a certificate answers over TLS on the same port."""
    return first_bytes[:2] == b"\x16\x03"


def looks_like_http(first_bytes: bytes) -> bool:
    """True if a connection opens with an HTTP request line: a browser, served by the web
    codec (chatroom.web) on the same port."""
    return _HTTP_REQUEST.match(first_bytes) is not None


def looks_like_another_protocol(first_bytes: bytes) -> bool:
    """True if a connection's first bytes carry the signature of another protocol, whose client
    will never speak this one: a TLS handshake record (16 03), an HTTP request line, an SSH
    banner, or binary. Binary means, in the first 64 bytes: a NUL before the first b"\\n" (a
    chat client's first line is a command, and NUL-filled headers are what binary protocols
    open with), or more than half the bytes not text (control bytes other than tab, LF and CR,
    DEL, invalid UTF-8). A telnet client's option negotiation (IAC, 0xFF) is not a signature,
    and neither is one bad byte in a line of text: it becomes U+FFFD, wherever it falls."""
    if looks_like_tls(first_bytes) or first_bytes.startswith(b"SSH-"):
        return True
    if _HTTP_REQUEST.match(first_bytes):
        return True
    if first_bytes[:1] == bytes([_TELNET_IAC]):
        return False
    opening = first_bytes[:_OPENING_BYTES]
    if b"\x00" in opening.split(b"\n", 1)[0]:
        return True
    # final=False: a character cut at the end is not bad UTF-8, the rest is on its way.
    text = codecs.getincrementaldecoder(ENCODING)("surrogateescape").decode(opening, final=False)
    return 2 * len(_NOT_TEXT.findall(text)) > len(opening)


@dataclass(frozen=True)
class Join:
    """The sender asks to enter the room, under a name if it gives one."""

    name: str | None = None


@dataclass(frozen=True)
class Quit:
    """The sender leaves the room."""


@dataclass(frozen=True)
class Say:
    """A chat message for every other member; text is already safe to show."""

    text: str


@dataclass(frozen=True)
class Blank:
    """A line with nothing to say: ignored, never broadcast."""


@dataclass(frozen=True)
class Nick:
    """/nick NAME: the sender takes a name, or changes it."""

    name: str


@dataclass(frozen=True)
class Who:
    """/who or /names: who is here, for the sender alone."""


@dataclass(frozen=True)
class Msg:
    """/msg TARGET TEXT: a private message to one member, named or by IP:PORT."""

    target: str
    text: str


@dataclass(frozen=True)
class Me:
    """/me TEXT: an action, for every other member."""

    text: str


@dataclass(frozen=True)
class Help:
    """/help: the commands, one line each, for the sender alone."""


@dataclass(frozen=True)
class BadCommand:
    """A line that starts with / but is no command, or a command used wrongly: it is never
    broadcast, and the sender is told why."""

    error: str


@dataclass(frozen=True)
class Pass:
    """!Pass PASSWORD: the sender proves it knows the room's password, before !Join (IRC's
    PASS). The connection checks it; the room never sees it, and it is never relayed."""

    password: str = field(repr=False)  # never in a log line or a test's failure message


Command = Union[Join, Quit, Say, Blank, Nick, Who, Msg, Me, Help, BadCommand]

# Whatever a client line can be: a command for the room, or a password for the connection.
ClientLine = Union[Command, Pass]


def strip_telnet_commands(line: bytes) -> bytes:
    """The line without its telnet commands (RFC 854), found in one pass over it.

    A command is IAC (0xFF), then an option negotiation (WILL, WONT, DO or DONT, 0xFB-0xFE, and
    the option byte), a subnegotiation (SB, 0xFA) up to the next IAC SE (0xFF 0xF0), or a
    one-byte command (0xF0-0xF9, or IAC again). Anything else after an IAC, an SB that no IAC SE
    closes, and a negotiation cut short by the end of the line are kept, and decode to U+FFFD.
    0xFF never occurs in UTF-8, so removing commands cannot touch text.
    """
    kept = bytearray()
    copied = 0  # line[:copied] is in kept already, or was a command
    # False once a search for IAC SE reached the end of the line: no later SB can close either,
    # so none is searched again. Searching from every SB made a line of them cost O(n²).
    se_ahead = True
    iac = line.find(b"\xff")
    while iac != -1:
        command = line[iac + 1] if iac + 1 < len(line) else -1
        end = -1  # where the command that starts at iac ends; -1 while it is none
        if command == 0xFA and se_ahead:
            se = line.find(b"\xff\xf0", iac + 2)
            se_ahead = se != -1
            end = se + 2 if se_ahead else -1
        elif 0xFB <= command <= 0xFE and iac + 2 < len(line):
            end = iac + 3
        elif 0xF0 <= command <= 0xF9 or command == 0xFF:
            end = iac + 2
        if end == -1:
            iac = line.find(b"\xff", iac + 1)
        else:
            kept += line[copied:iac]
            copied = end
            iac = line.find(b"\xff", end)
    return bytes(kept) + line[copied:]


def parse_client_line(line: bytes) -> ClientLine:
    """Turns one line from a client (without its terminator) into a command; telnet's
    negotiation bytes, if a telnet client sent any, are dropped first."""
    if b"\xff" in line:
        line = strip_telnet_commands(line)
    text = decode_line(line)
    start = text.lstrip()
    if start[:1] == COMMAND_PREFIX:  # a command, even after blanks: never said by mistake
        return _parse_slash_command(start)
    stripped = text.strip(_BLANKS)
    if not stripped:
        return Blank()
    if stripped[0] != "!":  # most lines: chat, with no word to look up
        return Say(text)
    words = _BETWEEN_WORDS.split(stripped, maxsplit=1)
    first = words[0].lower()
    if first == _JOIN_WORD:
        return Join(words[1] if len(words) == 2 else None)
    if first == _QUIT_WORD and len(words) == 1:
        return Quit()
    if first == _PASS_WORD:
        return Pass(words[1] if len(words) == 2 else "")
    return Say(text)


def _parse_slash_command(text: str) -> Command:
    if text.startswith(COMMAND_PREFIX * 2):
        return Say(text[1:])  # "//text" says "/text"
    parts = _BETWEEN_WORDS.split(text[1:], maxsplit=2)  # the last part keeps its own blanks
    word = parts[0].lower()
    arguments = [part for part in parts[1:] if part]
    if word in ("who", "names"):
        return Who()
    if word == "help":
        return Help()
    if word == "quit":
        return Quit()
    if word == "nick":
        return Nick(arguments[0]) if len(arguments) == 1 else BadCommand(USAGE_NICK)
    if word == "msg":
        return Msg(*arguments) if len(arguments) == 2 else BadCommand(USAGE_MSG)
    if word == "me":
        action = _BETWEEN_WORDS.split(text[1:], maxsplit=1)
        return Me(action[1]) if len(action) == 2 and action[1] else BadCommand(USAGE_ME)
    return BadCommand(unknown_command_error(parts[0]))


def pass_line(password: str) -> str:
    """What a client sends to prove the room's password (surrounding spaces are no part of a
    password: the server strips them, as it does the password file's)."""
    return f"{PASS} {password.strip()}"


def encode_client_line(text: str) -> bytes:
    """The bytes a client sends for one line the user typed."""
    return text.encode(ENCODING, "replace") + b"\n"


# Every code point that could move the cursor, change colours, retitle a window, end a line
# early or reorder text on a reader's terminal: C0 and C1 controls, DEL, the Unicode line and
# paragraph separators and the twelve bidirectional controls (Trojan Source, CVE-2021-42574).
_BIDI_CONTROLS = "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
_UNSAFE = [*range(0x20), 0x7F, *range(0x80, 0xA0), 0x2028, 0x2029, *map(ord, _BIDI_CONTROLS)]
_SAFE_REPLACEMENTS = {**dict.fromkeys(_UNSAFE, "\ufffd"), ord("\t"): " "}


def sanitize(text: str) -> str:
    """Replaces every unsafe code point with U+FFFD (a tab with a space); keeps all else."""
    # isprintable() is False for every code point in the table, so most lines skip translate().
    if text.isprintable():
        return text
    return text.translate(_SAFE_REPLACEMENTS)


def decode_line(line: bytes) -> str:
    """Text of one whole line, invalid UTF-8 replaced by U+FFFD and made safe to show."""
    return sanitize(line.decode(ENCODING, "replace"))


def normalize_host(host: str) -> str:
    """An IPv4-mapped IPv6 address (what a dual-stack listener reports for an IPv4 peer) as
    plain IPv4; any other address as it is."""
    if host.startswith("::ffff:") and "." in host:
        return host[len("::ffff:") :]
    return host


def format_member_id(host: str, port: int) -> str:
    """A member's identifier: "IP:PORT", or "[IPv6]:PORT"."""
    host = normalize_host(host)
    if ":" in host:
        return f"[{host}]:{port}"
    return f"{host}:{port}"


def member_label(member_id: str, name: str | None) -> str:
    """How every line names a member: "NAME@IP:PORT" once it has a name, else its "IP:PORT".
    The address is always there, so a name can never pass for someone else."""
    return member_id if name is None else f"{name}@{member_id}"


def _server_line(text: str) -> bytes:
    return text.encode(ENCODING) + b"\n"


def welcome_line(member_id: str, others: int) -> bytes:
    return _server_line(f"* Welcome, {member_id}. Others here: {others}")


def joined_line(member_id: str) -> bytes:
    return _server_line(f"* {member_id} joined")


def left_line(member_id: str, reason: str) -> bytes:
    return _server_line(f"* {member_id} left ({reason})")


def goodbye_line(member_id: str) -> bytes:
    return _server_line(f"* Goodbye, {member_id}")


def chat_line(member_id: str, text: str) -> bytes:
    return _server_line(f"[{member_id}] {text}")


def error_line(text: str) -> bytes:
    return _server_line(ERROR_PREFIX + text)


def batch_notice_line(count: int, verb: str, labels: list[str]) -> bytes:
    """Many joins or leaves in one line, for a large room: "* 57 joined: A, B, and 55 more"."""
    more = f", and {count - len(labels)} more" if count > len(labels) else ""
    return _server_line(f"* {count} {verb}: {', '.join(labels)}{more}")


def renamed_line(old_label: str, new_label: str) -> bytes:
    return _server_line(f"* {old_label} is now {new_label}")


def named_line(label: str) -> bytes:
    """To the member that took a name."""
    return _server_line(f"* You are now {label}")


# The most a /who reply holds, so that a room of 10,000 costs one bounded line.
WHO_MAX_BYTES = 2048


def who_line(labels: Iterable[str], count: int) -> bytes:
    """Who is here: "* N here: A, B, C", with as many labels (ASCII, like the rest of the
    line) as fit WHO_MAX_BYTES and ", and K more" for the rest."""
    head = f"* {count} here: "
    shown: list[str] = []
    size = len(head)
    for label in labels:
        rest = f", and {count - len(shown)} more"
        if size + len(label) + len(rest) + 2 > WHO_MAX_BYTES:
            return _server_line(head + ", ".join(shown) + rest)
        shown.append(label)
        size += len(label) + 2
    return _server_line(head + ", ".join(shown))


def private_line(sender_label: str, text: str) -> bytes:
    """A private message, as its target sees it: the mark is inside the tag the server
    writes, where no member's text can reach."""
    return _server_line(f"[{sender_label} (private)] {text}")


def private_sent_line(target_label: str, text: str) -> bytes:
    """What the sender of a private message is told."""
    return _server_line(f"* Private to {target_label}: {text}")


def action_line(label: str, text: str) -> bytes:
    """/me: a line that starts with its sender's tag, so it never reads as a notice."""
    return _server_line(f"[{label}] * {text}")


def history_start_line(count: int) -> bytes:
    return _server_line(f"* History: {count} line{'s' if count != 1 else ''} said before you came")


def history_line(said_at: float, line: bytes) -> bytes:
    """A line said before the newcomer came, with the time it was said (the server's local
    time, HH:MM) in front."""
    return f"[{time.strftime('%H:%M', time.localtime(said_at))}] ".encode() + line


HISTORY_END_LINE = _server_line("* End of history")

# Told once when this server loses touch with the others sharing the room (--redis), and
# once when it is back: members here hear each other all along.
ROOM_SPLIT_LINE = _server_line(
    "* The room is split: members on other servers cannot hear you, nor you them, until it heals"
)
ROOM_WHOLE_LINE = _server_line("* The room is whole again")

HINT_LINE = _server_line(
    f"* This is a chat room: send {JOIN} (or {JOIN} NAME) to enter,"
    f" /help for the commands, {QUIT} to leave"
)

PASSWORD_HINT_LINE = _server_line(
    f"* This is a private chat room: send {PASS} PASSWORD, then {JOIN} (or {JOIN} NAME) to"
    f" enter, {QUIT} to leave"
)

HELP_LINES = [
    _server_line(f"* {usage}")
    for usage in (
        "/nick NAME: take a name, or change it (1-16 letters, digits, _ or -)",
        "/who (or /names): who is here",
        "/msg TARGET TEXT: a private message to one member (a name or IP:PORT)",
        "/me TEXT: an action, shown as [you] * TEXT",
        "//TEXT: say a line that starts with /",
        f"/quit (or {QUIT}): leave",
    )
]


# Reading the server's lines back, for a client: who the server says the reader is (for its
# prompt), and whose tag starts a member's line (for its colours). Only lines a member cannot
# write match: a member's text always comes after a tag the server wrote.
_LABEL = (
    r"(?:(?P<name>[A-Za-z][A-Za-z0-9_-]{0,15})@)?"
    r"(?P<id>\d{1,3}(?:\.\d{1,3}){3}:\d{1,5}|\[[0-9A-Za-z:.%_-]{1,64}\]:\d{1,5})"
)
_LABEL_ALONE = re.compile(_LABEL + r"\Z")
_OWN_LABEL = re.compile(r"\* (?:Welcome, (\S+)\. Others here: \d+|You are now (\S+))\Z")
# A chat, action or private line ("[LABEL] ", "[LABEL (private)] "), or one from the history,
# which puts "[HH:MM] " in front.
_SENDER_TAG = re.compile(r"(?:\[\d\d:\d\d\] )?\[" + _LABEL + r"(?: \(private\))?\] ")


def split_label(label: str) -> tuple[str | None, str] | None:
    """A label's name (None for a member without one) and IP:PORT; None if it is no label."""
    match = _LABEL_ALONE.match(label)
    return None if match is None else (match["name"], match["id"])


def own_label(line: str) -> str | None:
    """The label a welcome ("* Welcome, LABEL. Others here: N") or a rename ("* You are now
    LABEL") gives the member that receives it; None for any other line."""
    match = _OWN_LABEL.match(line)
    if match is None:
        return None
    label = match[1] or match[2]
    return label if _LABEL_ALONE.match(label) else None


@dataclass(frozen=True)
class SenderTag:
    """Where a member's line names its sender: line[label_start:label_end] is its label, its
    text starts at text_start."""

    label_start: int
    label_end: int
    name: str | None
    member_id: str
    text_start: int


def sender_tag(line: str) -> SenderTag | None:
    """The tag of a chat, action or private line, or of one replayed from the history; None
    for a notice, an error or anything else."""
    match = _SENDER_TAG.match(line)
    if match is None:
        return None
    start = match.start("name") if match["name"] is not None else match.start("id")
    return SenderTag(start, match.end("id"), match["name"], match["id"], match.end())
