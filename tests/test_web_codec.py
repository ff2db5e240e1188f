"""The web codec without sockets: bytes from websockets' own client protocol in, bytes back out
to it, as h11 and wsproto test their state machines."""

from __future__ import annotations

import base64
import hashlib
import tracemalloc

import pytest

pytest.importorskip("websockets")

from websockets.client import ClientProtocol
from websockets.frames import Frame, Opcode
from websockets.http11 import Response
from websockets.protocol import State
from websockets.typing import Origin
from websockets.uri import parse_uri

from chatroom import protocol
from chatroom.connection import ChosenByFirstBytes, Codec, LineCodec
from chatroom.web import (
    WebCodec,
    WebSettings,
    content_security_policy,
    load_settings,
    machine_names,
)

MAX_LINE = 64
HOST = "chat.example:7000"


def settings(origins: tuple[str, ...] = ()) -> WebSettings:
    """As on a machine named chat.example."""
    return load_settings(origins, MAX_LINE, ["chat.example"])


def http(codec: Codec, request: bytes, one_byte_at_a_time: bool = False) -> bytes:
    for at in range(len(request)) if one_byte_at_a_time else [0]:
        codec.receive(request[at : at + 1] if one_byte_at_a_time else request)
    return codec.take_output()


def get(path: str, method: str = "GET", host: str = HOST) -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode()


class Browser:
    """websockets' client side, talking to a codec."""

    def __init__(
        self,
        codec: Codec,
        origin: str | None = f"http://{HOST}",
        one_byte: bool = False,
        host: str = HOST,
    ) -> None:
        self.codec = codec
        self.client = ClientProtocol(
            parse_uri(f"ws://{host}/ws"), origin=None if origin is None else Origin(origin)
        )
        self.client.send_request(self.client.connect())
        answer = http(codec, b"".join(self.client.data_to_send()), one_byte)
        self.client.receive_data(answer)
        [response] = self.client.events_received()
        assert isinstance(response, Response)
        self.response = response

    def send(self, frame: bytes) -> None:
        self.codec.receive(frame)
        self.take()

    def say(self, text: str) -> None:
        self.client.send_text(text.encode())
        self.send(b"".join(self.client.data_to_send()))

    def take(self, data: bytes | None = None) -> list[Frame]:
        self.client.receive_data(self.codec.take_output() if data is None else data)
        return [event for event in self.client.events_received() if isinstance(event, Frame)]


def lines(codec: Codec) -> list[bytes | str]:
    """Every line the codec has, a refused one as its error text."""
    out: list[bytes | str] = []
    while True:
        try:
            line = codec.next_line()
        except protocol.LineRefused as exc:
            out.append(str(exc))
            continue
        if line is None:
            return out
        out.append(line)


def test_get_slash_is_the_page_with_its_policy_and_then_the_end() -> None:
    codec = WebCodec(settings(), secure=False)
    answer = http(codec, get("/"))
    head, body = answer.split(b"\r\n\r\n", 1)
    assert head.startswith(b"HTTP/1.1 200 OK\r\n")
    assert b"\r\nContent-Type: text/html\r\n" in head
    assert body[:1024].count(b'<meta charset="utf-8">') == 1  # where a browser looks for it
    assert b"Content-Security-Policy: default-src 'none'; script-src 'sha256-" in head
    assert body == settings().page
    assert codec.ended


def test_the_policy_allows_exactly_the_pages_own_inline_script_and_style() -> None:
    policy = content_security_policy(b"<style>a{}</style><p>x</p><script>go()</script>")

    def source(text: bytes) -> str:  # what a browser computes for an inline element's text
        return "'sha256-" + base64.b64encode(hashlib.sha256(text).digest()).decode() + "'"

    assert f"script-src {source(b'go()')};" in policy
    assert f"style-src {source(b'a{}')};" in policy
    assert "default-src 'none'; " in policy and "connect-src 'self'" in policy


UPGRADE = (
    b"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
    b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://evil.example\r\n"
)


@pytest.mark.parametrize("path", ["/", "/ws"])
def test_a_request_with_two_host_headers_is_a_bad_request(path: str) -> None:
    """RFC 9112 3.2: more than one Host is answered 400; the second must not pick the Origin."""
    codec = WebCodec(settings(), secure=False)
    request = get(path)[:-2] + b"Host: evil.example\r\n" + UPGRADE + b"\r\n"
    assert http(codec, request).startswith(b"HTTP/1.1 400 ")
    assert codec.ended


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (get("/index.html"), b"404"),
        (get("/ws/"), b"404"),
        (get("/", method="POST"), b"405"),
        (get("/", method="HEAD"), b"405"),
        (get("/ws"), b"426"),  # /ws without the upgrade: not a WebSocket handshake
    ],
)
def test_anything_else_is_a_small_error_and_the_end(request_bytes: bytes, status: bytes) -> None:
    codec = WebCodec(settings(), secure=False)
    answer = http(codec, request_bytes)
    assert answer.startswith(b"HTTP/1.1 " + status)
    assert len(answer) < 1024
    assert codec.ended


@pytest.mark.parametrize("one_byte", [False, True], ids=["whole", "byte by byte"])
def test_a_same_origin_handshake_opens_and_messages_are_lines(one_byte: bool) -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec, one_byte=one_byte)
    assert browser.response.status_code == 101
    assert codec.keeps_alive and not codec.ended
    browser.say("!Join alice")
    browser.say("hello, world é")
    assert lines(codec) == [b"!Join alice", "hello, world é".encode()]


def test_each_server_line_is_one_text_message() -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec)
    frames = browser.take(codec.encode(b"* Welcome, 1.2.3.4:5. Others here: 0\n[x] hi\n"))
    assert [(f.opcode, f.data) for f in frames] == [
        (Opcode.TEXT, b"* Welcome, 1.2.3.4:5. Others here: 0"),
        (Opcode.TEXT, b"[x] hi"),
    ]


def test_a_share_is_framed_once_and_each_member_reads_it_whole() -> None:
    shared = settings()
    browsers = [Browser(WebCodec(shared, secure=False)) for _ in range(3)]
    share = b"[x] hi\nERROR :SendQ exceeded\n"
    sent = [browser.codec.encode(share) for browser in browsers]
    frames, error = shared.frames.frames_for(share)
    assert sent == [frames] * 3 and error == "SendQ exceeded"
    for browser, data in zip(browsers, sent):
        assert [f.data for f in browser.take(data)] == [b"[x] hi", b"ERROR :SendQ exceeded"]


@pytest.mark.parametrize(
    "origin",
    ["http://evil.example", "https://chat.example:7000", "http://chat.example:7001", "null"],
)
def test_another_origin_is_refused_with_403(origin: str) -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec, origin=origin)
    assert browser.response.status_code == 403
    assert codec.ended and lines(codec) == []


def test_under_tls_the_pages_own_origin_is_https() -> None:
    assert Browser(WebCodec(settings(), secure=True), f"https://{HOST}").response.status_code == 101
    refused = Browser(WebCodec(settings(), secure=True), f"http://{HOST}")
    assert refused.response.status_code == 403


def test_an_allowlisted_origin_and_no_origin_at_all_are_accepted() -> None:
    allowed = settings(("https://chat.school.example",))
    assert (
        Browser(WebCodec(allowed, False), "https://chat.school.example").response.status_code == 101
    )
    # No Origin header: no browser omits it, so this is a program, not another site's page.
    assert Browser(WebCodec(settings(), False), origin=None).response.status_code == 101


@pytest.mark.parametrize("path", ["/", "/ws"])
@pytest.mark.parametrize(
    "host", ["evil.example:7000", "evil.example", "chat.example.evil:7000", ":7000", "[::1"]
)
def test_a_host_not_this_servers_is_refused_with_403_page_and_websocket(
    path: str, host: str
) -> None:
    """DNS rebinding: evil.example pointed at this server sends its own name as Host and as
    Origin, which would pass for the page's own origin."""
    codec = WebCodec(settings(), secure=False)
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\n".encode() + UPGRADE + b"\r\n"
    request = request.replace(b"Origin: http://evil.example", f"Origin: http://{host}".encode())
    answer = http(codec, request)
    assert answer.startswith(b"HTTP/1.1 403 ") and b"--web-origin" in answer
    assert codec.ended and lines(codec) == []


def test_the_rebinding_handshake_is_refused_by_websockets_own_client() -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec, "http://evil.example:7000", host="evil.example:7000")
    assert browser.response.status_code == 403
    assert codec.ended and lines(codec) == []


@pytest.mark.parametrize(
    "host",
    [
        "127.0.0.1:7000",
        "192.168.1.20:7000",
        "[::1]:7000",
        "[fe80::1]:7000",
        "localhost:7000",
        "LocalHost",
        "chat.example:7000",  # the machine's own name
        "chat.example.:7000",
        "10.0.0.1",
    ],
)
def test_an_ip_literal_localhost_or_the_machines_name_is_served(host: str) -> None:
    assert http(WebCodec(settings(), False), get("/", host=host)).startswith(b"HTTP/1.1 200 OK")
    browser = Browser(WebCodec(settings(), False), f"http://{host.lower()}", host=host)
    assert browser.response.status_code == 101


def test_a_web_origins_host_is_allowed_as_host() -> None:
    allowed = settings(("https://chat.school.example", "http://[::1]:8080"))
    host = "chat.school.example:5050"
    assert http(WebCodec(allowed, False), get("/", host=host)).startswith(b"HTTP/1.1 200 OK")
    assert (
        Browser(WebCodec(allowed, True), f"https://{host}", host=host).response.status_code == 101
    )
    refused = http(WebCodec(settings(), False), get("/", host=host))
    assert refused.startswith(b"HTTP/1.1 403 ")


def test_the_machines_names_are_its_host_name_its_mdns_name_and_its_fqdn(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("socket.gethostname", lambda: "Lab-PC7")
    monkeypatch.setattr("socket.getfqdn", lambda: "lab-pc7.school.example")
    names = load_settings((), MAX_LINE, machine_names()).host_names
    assert names == {"lab-pc7", "lab-pc7.local", "lab-pc7.school.example"}


def test_a_message_at_the_line_limit_passes_one_over_is_refused_and_the_member_stays() -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec)
    longest = "x" * (MAX_LINE - 1)  # a line of MAX_LINE bytes counting its newline
    browser.say(longest)
    browser.say(longest + "y")
    browser.say("still here")
    assert lines(codec) == [
        longest.encode(),
        f"Line too long (max {MAX_LINE} bytes)",
        b"still here",
    ]
    assert codec.keeps_alive


def test_a_message_over_the_hard_cap_closes_with_1009() -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec)
    browser.client.send_text(b"x" * (settings().max_message + 1))
    codec.receive(b"".join(browser.client.data_to_send()))
    [close] = browser.take()
    assert close.opcode is Opcode.CLOSE and close.data[:2] == (1009).to_bytes(2, "big")
    assert codec.ended and lines(codec) == []


def test_a_fragmented_message_is_one_line_and_counts_whole_against_the_limit() -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec)
    browser.client.send_text(b"hel", fin=False)
    browser.client.send_continuation(b"lo", fin=False)
    assert codec.has_partial_line is False  # nothing received yet
    browser.send(b"".join(browser.client.data_to_send()))
    assert codec.has_partial_line and lines(codec) == []
    browser.client.send_continuation(b"!", fin=True)
    browser.client.send_text(b"a" * 40, fin=False)  # 80 bytes in all: over MAX_LINE
    browser.client.send_continuation(b"b" * 40, fin=True)
    browser.send(b"".join(browser.client.data_to_send()))
    assert lines(codec) == [b"hello!", f"Line too long (max {MAX_LINE} bytes)"]
    assert not codec.has_partial_line


@pytest.mark.parametrize("text", ["two\nlines", "a\r\nb", "trailing\n", "cr\r"])
def test_a_line_break_inside_a_message_is_refused_whole(text: str) -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec)
    browser.say(text)
    browser.say("next")
    assert lines(codec) == [protocol.ERROR_LINE_BREAK, b"next"]


def test_a_binary_message_closes_with_1003() -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec)
    browser.client.send_binary(b"\x00\x01")
    codec.receive(b"".join(browser.client.data_to_send()))
    [close] = browser.take()
    assert close.data[:2] == (1003).to_bytes(2, "big")
    assert codec.ended


@pytest.mark.parametrize(
    "fragments",
    [[b"\xff"], [b"ok \xed\xa0\x80"], [b"split \xf0\x9f", b"\x98"]],
    ids=["FF", "surrogate", "truncated across fragments"],
)
def test_a_text_message_that_is_not_utf8_closes_with_1007(fragments: list[bytes]) -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec)
    browser.say("!Join")
    *first, last = fragments
    if first:
        browser.client.send_text(first[0], fin=False)
    (browser.client.send_continuation if first else browser.client.send_text)(last, fin=True)
    codec.receive(b"".join(browser.client.data_to_send()))
    [close] = browser.take()
    assert close.opcode is Opcode.CLOSE and close.data[:2] == (1007).to_bytes(2, "big")
    assert codec.ended and lines(codec) == [b"!Join"]


def test_a_character_split_across_fragments_is_whole() -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec)
    browser.client.send_text("é".encode()[:1], fin=False)
    browser.client.send_continuation("é".encode()[1:], fin=True)
    browser.send(b"".join(browser.client.data_to_send()))
    assert lines(codec) == ["é".encode()] and codec.keeps_alive


@pytest.mark.parametrize(
    ("last_line", "code"),
    [
        (b"* Goodbye, 1.2.3.4:5\n", 1000),
        (b"ERROR :Server shutting down\n", 1001),
        (b"ERROR :Ping timeout\n", 1011),
        (b"ERROR :SendQ exceeded\n", 1008),
    ],
)
def test_the_close_code_says_why(last_line: bytes, code: int) -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec)
    browser.take(codec.encode(last_line))
    [close] = browser.take(codec.closing_bytes())
    assert close.opcode is Opcode.CLOSE
    assert int.from_bytes(close.data[:2], "big") == code
    if code == 1008:
        assert close.data[2:] == b"SendQ exceeded"


def test_a_peers_close_is_answered_and_ends_the_exchange() -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec)
    browser.client.send_close(1000)
    browser.send(b"".join(browser.client.data_to_send()))
    assert codec.ended
    assert browser.client.state is State.CLOSED or browser.client.close_expected()


def test_a_ping_waits_for_its_own_pong() -> None:
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec)
    [ping] = browser.take(codec.ping())
    assert ping.opcode is Opcode.PING and codec.awaiting_pong
    codec.receive(b"".join(browser.client.data_to_send()))  # the client's automatic pong
    assert not codec.awaiting_pong


def test_a_stalled_request_is_a_partial_line_so_the_line_deadline_cuts_it() -> None:
    codec = WebCodec(settings(), secure=False)
    codec.receive(b"GET / HTTP/1.1\r\nHost: x\r\n")
    assert codec.has_partial_line and not codec.ended and codec.take_output() == b""
    assert codec.encode(b"ERROR :Timeout: incomplete line\n") == b""  # no WebSocket yet


def test_a_request_over_16_kib_is_answered_431_before_it_ends() -> None:
    codec = WebCodec(settings(), secure=False)
    header = b"X-Padding: " + b"p" * 1000 + b"\r\n"
    answer = http(codec, b"GET / HTTP/1.1\r\n" + header * 17)  # 17 KiB, no blank line yet
    assert answer.startswith(b"HTTP/1.1 431 ") and codec.ended
    codec.receive(header * 100)  # whatever follows is not held
    assert codec.take_output() == b""


def test_bytes_after_a_broken_request_are_not_read() -> None:
    """Under TLS, each record's plaintext is received on its own, all in one read: what follows
    a request the library has already given up on must not be answered (a 431 after its end)."""
    codec = WebCodec(settings(), secure=False)
    codec.receive(b"GET / HTTP/1.1\r\nnot a header\r\n\r\n")
    codec.receive(b"p" * (17 * 1024))
    assert codec.take_output() == b"" and codec.ended and codec.status is None


def test_a_request_of_almost_16_kib_is_served() -> None:
    codec = WebCodec(settings(), secure=False)
    padding = b"".join(b"X-Padding-%d: " % n + b"p" * 5300 + b"\r\n" for n in range(3))
    request = get("/")[:-2] + padding + b"\r\n"  # header lines under the library's 8 KiB
    assert 15 * 1024 < len(request) <= 16 * 1024
    assert http(codec, request).startswith(b"HTTP/1.1 200 OK")


def test_the_first_bytes_choose_lines_or_http() -> None:
    def choose(first: bytes) -> Codec:
        if protocol.looks_like_http(first):
            return WebCodec(settings(), secure=True)
        return LineCodec(MAX_LINE)

    lines_codec = ChosenByFirstBytes(choose)
    lines_codec.receive(b"!Join\nhi")
    assert lines(lines_codec) == [b"!Join"] and lines_codec.has_partial_line
    web_codec = ChosenByFirstBytes(choose)
    assert http(web_codec, get("/")).startswith(b"HTTP/1.1 200 OK")
    assert web_codec.ended


@pytest.mark.parametrize("after", [get("/"), b"!Join\n"], ids=["a second request", "a line"])
def test_bytes_after_a_request_before_its_answer_end_the_exchange_unanswered(after: bytes) -> None:
    codec = WebCodec(settings(), secure=False)
    assert http(codec, get("/") + after) == b""
    assert codec.ended


def test_a_read_of_tiny_messages_is_held_in_less_than_its_own_size() -> None:
    """A line member's held input is at most what it sent; a WebSocket member's must not be
    several times that because each tiny message is an object of its own."""
    codec = WebCodec(settings(), secure=False)
    browser = Browser(codec)
    for _ in range(4096):
        browser.client.send_text(b"ab")
        browser.client.send_text(b"a\n")  # refused: a refusal is held as small
    data = b"".join(browser.client.data_to_send())
    assert len(data) == 64 * 1024  # 8 bytes a frame
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        codec.receive(data)
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert held < len(data)
    assert lines(codec) == [b"ab", protocol.ERROR_LINE_BREAK] * 4096
