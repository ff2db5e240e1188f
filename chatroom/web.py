"""The room from a browser: HTTP and WebSocket on the chat port, as a codec (chatroom.connection)
over the sans-IO layer of the websockets library. Needs the web extra (pip install
'chatroom[web]'); nothing in the terminal core imports this module.

The library parses the HTTP request, checks the handshake and Origin, frames, unmasks, checks
UTF-8, answers pings and closes; this module only decides what each request gets and maps
messages to lines, one to one (IRCv3's WebSocket convention): each text message in is one client
line, each server line out is one text message. A request whose Host is not one of this
server's names gets 403 (DNS rebinding); GET / is the page (chatroom/page.html); a WebSocket
upgrade on /ws from an allowed Origin joins the room; anything else is a small
answer (400, 403, 404, 405, 426, 431), then the end. PROTOCOL.md has the whole mapping.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import ipaddress
import re
import socket
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from websockets.datastructures import Headers, MultipleValuesError
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.typing import Origin

from chatroom import protocol
from chatroom.connection import RECV_SIZE

PAGE_FILE = Path(__file__).with_name("page.html")
WEBSOCKET_PATH = "/ws"

# A close frame's reason is at most 123 bytes (RFC 6455 5.5: a control frame's payload is 125,
# less the 2-byte code).
_MAX_CLOSE_REASON = 123

# The close code that says why the server closed, by the error line it sent last; any other
# error line closes with 1008 (policy violation) and repeats its text as the reason.
_CLOSE_CODES = {
    protocol.ERROR_SHUTTING_DOWN: CloseCode.GOING_AWAY,
    protocol.ERROR_PING_TIMEOUT: CloseCode.INTERNAL_ERROR,  # what websockets itself sends
}

_GET = b"GET "
_ERROR_PREFIX = protocol.ERROR_PREFIX.encode()

# The most an HTTP request may send before it is answered: Node's default header limit. A
# browser's WebSocket handshake is about 1 KiB with cookies; the library alone would take up to
# 128 header lines of 8 KiB each, a megabyte per connection before anything is answered.
MAX_REQUEST_BYTES = 16 * 1024

# A refused message is held among the lines as one of these, which no line can be since a
# line holds no b"\r": a read of tiny messages then costs no more than its own bytes, where an
# object per message cost twelve times that.
_HELD_TOO_LONG = b"\r1\n"
_HELD_LINE_BREAK = b"\r2\n"

_INLINE = re.compile(rb"<(script|style)>(.*?)</\1>", re.DOTALL)

# The host part of a Host header or an Origin: a bracketed IPv6 literal, or up to the port.
_HOST_PART = re.compile(r"(\[[^\]]*\]|[^:]*)(?::\d*)?")

# The 403 for a Host that is not this server's: how the operator allows a name.
HOST_REFUSED = "Unknown host name: the server allows one with --web-origin http://NAME:PORT\n"


class SharedFrames:
    """The text frames of the last share encoded. The fan-out hands every member of a turn the
    same bytes object, and a server's frames are the same for every member (unmasked, with no
    extension), so a share is framed once, not once per WebSocket member."""

    __slots__ = ("_error", "_frames", "_lines")

    def __init__(self) -> None:
        self._lines: bytes | None = None  # the share last framed, held so its id stays its own
        self._frames = b""  # its frames, one text message per line
        self._error: str | None = None  # its last line's text, if that is an ERROR line

    def frames_for(self, lines: bytes) -> tuple[bytes, str | None]:
        """The frames for these lines (each ending in b"\n"), and the last one's error text."""
        if lines is not self._lines:
            split = lines.split(b"\n")[:-1]
            frames = [Frame(Opcode.TEXT, line).serialize(mask=False) for line in split]
            last = split[-1] if split else b""
            error = last.startswith(_ERROR_PREFIX)
            self._error = last[len(_ERROR_PREFIX) :].decode() if error else None
            self._lines, self._frames = lines, b"".join(frames)
        return self._frames, self._error


@dataclass(frozen=True)
class WebSettings:
    """What every web connection of one server shares."""

    page: bytes  # the page's HTML, served as is
    csp: str  # its Content-Security-Policy: the hashes of its own inline script and style
    origins: tuple[str, ...]  # Origins allowed besides the page's own (--web-origin)
    # Host names a request may name besides IP literals and localhost: the machine's own, and
    # those of --web-origin. Any other is DNS rebinding's way past the Origin rule.
    host_names: frozenset[str]
    max_line: int  # a message over this, counting a newline as a line would, is refused
    frames: SharedFrames = field(default_factory=SharedFrames, compare=False)

    @property
    def max_message(self) -> int:
        """The hard cap on one message, past which the library closes with 1009: as the line
        codec holds at most a line plus one read, so a refused message still costs little."""
        return self.max_line + RECV_SIZE


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode()
    except UnicodeDecodeError:
        return False
    return True


def content_security_policy(page: bytes) -> str:
    """Nothing but the page's own inline script and style (by their SHA-256), and its own
    WebSocket: no other script, style, frame, form target or connection is allowed."""
    hashes: dict[bytes, list[str]] = {b"script": [], b"style": []}
    for found in _INLINE.finditer(page):
        digest = base64.b64encode(hashlib.sha256(found.group(2)).digest()).decode()
        hashes[found.group(1)].append(f"'sha256-{digest}'")
    return (
        "default-src 'none'; "
        f"script-src {' '.join(hashes[b'script'])}; "
        f"style-src {' '.join(hashes[b'style'])}; "
        "connect-src 'self'; img-src data:; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    )


def host_part(host: str) -> str:
    """The name or address of a Host header (or an Origin's authority) without its port,
    lowercase and without the trailing dot of a fully qualified name; "" if none."""
    found = _HOST_PART.fullmatch(host.strip().lower())
    return found.group(1).rstrip(".") if found else ""


def machine_names() -> list[str]:
    """The machine's own names as it sees them: its host name, that name's mDNS form
    (NAME.local) and its fully qualified name. Called once at start-up (getfqdn may ask DNS)."""
    name = socket.gethostname()
    short = name.split(".")[0]
    return [name, short, f"{short}.local", socket.getfqdn()]


def is_allowed_host(host: str, names: frozenset[str]) -> bool:
    """An IP literal (IPv4, or IPv6 in brackets), localhost, or one of these names. A browser
    puts the name it looked up in Host, so a hostile name pointed at this server (DNS
    rebinding) is refused here, before its page can pass as the room's own origin."""
    name = host_part(host)
    if name == "localhost" or name in names:
        return True
    try:
        if name.startswith("[") and name.endswith("]"):
            ipaddress.IPv6Address(name[1:-1])
        else:
            ipaddress.IPv4Address(name)
    except ValueError:
        return False
    return True


def load_settings(
    origins: tuple[str, ...], max_line: int, own_names: Iterable[str] = ()
) -> WebSettings:
    """The page read once, at start-up, and the host names allowed: own_names (the machine's,
    from machine_names) and those of the origins. Raises OSError if the page cannot be read."""
    page = PAGE_FILE.read_bytes()
    authorities = (origin.partition("://")[2] for origin in origins)
    names = frozenset(host_part(name) for name in [*own_names, *authorities]) - {""}
    return WebSettings(page, content_security_policy(page), origins, names, max_line)


class WebCodec:
    """HTTP, then a WebSocket, for one connection; the server's side."""

    def __init__(self, settings: WebSettings, secure: bool) -> None:
        self._settings = settings
        self._scheme = "https" if secure else "http"  # of the page's own Origin
        # No extensions: permessage-deflate would let a small frame inflate to a big message.
        self._ws = ServerProtocol(max_size=settings.max_message)
        self._heard_from = False  # a byte arrived: the request is under way
        self._opening = bytearray()  # the request's first bytes, until they say GET or not
        self._request_bytes = 0  # received before the request was answered
        self._message: bytearray | None = None  # a fragmented text message, still arriving
        self._message_too_long = False  # the one arriving is over max_line: dropped as it comes
        # Whole messages not yet taken as lines, each ending in b"\n", or in its place the
        # marker of the refusal a bad one gets: one buffer, not an object per message.
        self._held = bytearray()
        self._last_error: str | None = None  # the last line sent, if an ERROR line: why we close
        self._pings_sent = 0  # numbers each ping, so a stale pong is not taken for its answer
        self._ping_payload: bytes | None = None  # the ping still unanswered
        self._output_cut = False  # queued frames were thrown away: nothing more can follow
        self.ended = False  # the library has ended the exchange (an HTTP answer, a close)
        self.status: int | None = None  # the HTTP status answered, for the log

    def receive(self, data: bytes) -> None:
        if self._ws.eof_sent:
            return  # the exchange is over: what follows is not read (nor answered)
        self._heard_from = True
        if self.status is None and self._refused_before_parsing(data):
            return
        self._ws.receive_data(data)
        for event in self._ws.events_received():
            if isinstance(event, Request):
                # Bytes after the request, before its answer (another request pipelined),
                # are read as frames: the library has failed the exchange, and no answer
                # can follow its end of stream.
                if not self._ws.eof_sent:
                    self._answer(self._response_to(event))
            elif isinstance(event, Frame):
                self._take_frame(event)

    def _refused_before_parsing(self, data: bytes) -> bool:
        """Answers, and says so, a request that is not a GET or has grown too large to be
        worth parsing: both are known before the library has a whole request."""
        self._request_bytes += len(data)
        self._opening += data[: len(_GET) - len(self._opening)]
        if not _GET.startswith(bytes(self._opening)):
            # The library parses GET only (older versions just close on another method).
            response = self._ws.reject(405, "Only GET is served here.\n")
            response.headers["Allow"] = "GET"
        elif self._request_bytes > MAX_REQUEST_BYTES:
            response = self._ws.reject(431, "Request too large.\n")
        else:
            return False
        self._answer(response)
        return True

    def _response_to(self, request: Request) -> Response:
        try:
            host = request.headers.get("Host", "").lower()
        except MultipleValuesError:  # RFC 9112 3.2: a 400, whatever the request
            return self._ws.reject(400, "More than one Host header.\n")
        # Host first, for the page too: under a name that is not this server's, the page
        # could only fail to join, and the WebSocket must not take that name's Origin as its own.
        # No Host at all: no browser omits it, so no rebinding either.
        if host and not is_allowed_host(host, self._settings.host_names):
            return self._ws.reject(403, HOST_REFUSED)
        if request.path == "/":
            return self._page()
        if request.path != WEBSOCKET_PATH:
            return self._ws.reject(404, "Not found: the chat room is at /\n")
        # Same origin only, or one the operator allowed: another site's page must not make
        # its visitors' browsers join (cross-site WebSocket hijacking). None: no Origin at
        # all, which no browser omits: a program, not a page.
        own = [Origin(f"{self._scheme}://{host}")] if host else []
        self._ws.origins = [*own, *map(Origin, self._settings.origins), None]
        return self._ws.accept(request)

    def _page(self) -> Response:
        body = self._settings.page
        headers = Headers(
            [
                ("Date", email.utils.formatdate(usegmt=True)),
                ("Connection", "close"),
                # Exactly the interface's type; the page declares UTF-8 in its first bytes.
                ("Content-Type", "text/html"),
                ("Content-Length", str(len(body))),
                ("Content-Security-Policy", self._settings.csp),
                ("X-Content-Type-Options", "nosniff"),
                ("Referrer-Policy", "no-referrer"),
                ("Cache-Control", "no-cache"),
            ]
        )
        return Response(200, "OK", headers, body)

    def _answer(self, response: Response) -> None:
        self.status = response.status_code
        self._ws.send_response(response)

    def _take_frame(self, frame: Frame) -> None:
        """Data frames make messages; pings are answered by the library itself."""
        if frame.opcode is Opcode.TEXT:
            self._message, self._message_too_long = bytearray(), False
            self._add_fragment(frame)
        elif frame.opcode is Opcode.CONT and self._message is not None:
            self._add_fragment(frame)
        elif frame.opcode is Opcode.BINARY:
            self._ws.fail(CloseCode.UNSUPPORTED_DATA, "text messages only")
        elif frame.opcode is Opcode.PONG and frame.data == self._ping_payload:
            self._ping_payload = None

    def _add_fragment(self, frame: Frame) -> None:
        assert self._message is not None
        # A line counts its newline: a message of max_line - 1 bytes is the longest line.
        if len(self._message) + len(frame.data) + 1 > self._settings.max_line:
            self._message_too_long = True
            self._message.clear()  # dropped as it comes: only the library's cap is held
        elif not self._message_too_long:
            self._message += frame.data
        if not frame.fin:
            return
        message, self._message = bytes(self._message), None
        if self._message_too_long:
            self._held += _HELD_TOO_LONG
        elif not _is_utf8(message):
            # RFC 6455 8.1: a text message that is not UTF-8 fails the connection. The
            # library leaves that check to whoever decodes; a line would get U+FFFD instead.
            self._ws.fail(CloseCode.INVALID_DATA, "invalid UTF-8")
        elif b"\n" in message or b"\r" in message:
            self._held += _HELD_LINE_BREAK
        else:
            self._held += message + b"\n"

    def next_line(self) -> bytes | None:
        end = self._held.find(b"\n")
        if end < 0:
            return None
        line = bytes(self._held[: end + 1])
        del self._held[: end + 1]
        if line == _HELD_TOO_LONG:
            raise protocol.LineTooLong(self._settings.max_line)
        if line == _HELD_LINE_BREAK:
            raise protocol.LineBreakInMessage()
        return line[:-1]

    @property
    def has_partial_line(self) -> bool:
        """A request not yet whole (slow-loris on HTTP), or a message still in fragments."""
        handshaking = self._heard_from and self._ws.state is State.CONNECTING and not self.ended
        return handshaking or self._message is not None

    def encode(self, lines: bytes) -> bytes:
        """One text message per line; nothing unless the WebSocket is open. The library frames
        them (Frame.serialize), once per share for every member (SharedFrames): a text frame
        from the server changes no state of the protocol's."""
        if self._ws.state is not State.OPEN or self._output_cut or not lines:
            return b""
        frames, self._last_error = self._settings.frames.frames_for(lines)
        return self.take_output() + frames

    def take_output(self) -> bytes:
        chunks = self._ws.data_to_send()
        if b"" in chunks:  # the library's end of stream: the exchange is over
            self.ended = True
        return b"".join(chunks)

    def kept_when_discarding(self, queued: bytearray) -> int:
        """Nothing: a frame may be half sent, so nothing after it could be read."""
        self._output_cut = True
        return 0

    def closing_bytes(self) -> bytes:
        """A close frame whose code says why: 1000 after !Quit, 1001 at shutdown, 1011 for a
        ping not answered, 1008 with the error line's text for any other error."""
        if self._ws.state is not State.OPEN or self._output_cut:
            return b""
        if self._last_error is None:
            code, reason = int(CloseCode.NORMAL_CLOSURE), ""
        else:
            code = int(_CLOSE_CODES.get(self._last_error, CloseCode.POLICY_VIOLATION))
            reason = self._last_error.encode()[:_MAX_CLOSE_REASON].decode("utf-8", "ignore")
        self._ws.send_close(code, reason)
        return self.take_output()

    @property
    def keeps_alive(self) -> bool:
        return self._ws.state is State.OPEN and not self._output_cut

    def ping(self) -> bytes:
        if not self.keeps_alive:
            return b""
        self._pings_sent += 1
        self._ping_payload = str(self._pings_sent).encode()
        self._ws.send_ping(self._ping_payload)
        return self.take_output()

    @property
    def awaiting_pong(self) -> bool:
        return self._ping_payload is not None
