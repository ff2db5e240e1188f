"""The browser's way in, through the real server and real sockets but no browser: HTTP on the
chat port, WebSocket members in the same room as line members, the Origin rule, the limits, and
the server without the web extra. The browser itself: tests/test_browser.py."""

from __future__ import annotations

import http.client
import socket
import time
from pathlib import Path

import pytest

pytest.importorskip("websockets")

from websockets.client import ClientProtocol
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.frames import Frame, Opcode
from websockets.sync.client import ClientConnection, connect
from websockets.typing import Origin
from websockets.uri import parse_uri

from .conftest import WAIT_SECONDS, Room, python_script
from .test_tls import Certificates, certs

__all__ = ["certs"]  # the fixture, shared with the TLS tests


def get(
    port: int, path: str, method: str = "GET", host: str | None = None
) -> tuple[int, str, bytes]:
    """A request to 127.0.0.1, under another Host if told (as a browser would send a name)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_SECONDS)
    try:
        conn.request(method, path, headers={} if host is None else {"Host": host})
        response = conn.getresponse()
        return response.status, response.getheader("Content-Type", ""), response.read()
    finally:
        conn.close()


def web_member(
    port: int,
    origin: str | None = "same",
    headers: dict[str, str] | None = None,
    max_size: int | None = 1 << 20,
) -> ClientConnection:
    """A WebSocket member, from the page's own origin unless told otherwise."""
    if origin == "same":
        origin = f"http://127.0.0.1:{port}"
    return connect(
        f"ws://127.0.0.1:{port}/ws",
        origin=None if origin is None else Origin(origin),
        additional_headers=headers,
        max_size=max_size,
        open_timeout=WAIT_SECONDS,
    )


def own_id(ws: ClientConnection) -> str:
    host, port = ws.local_address[:2]
    return f"{host}:{port}"


def join(ws: ClientConnection, name: str = "") -> str:
    ws.send(f"!Join {name}".strip())
    welcome = str(ws.recv(WAIT_SECONDS))
    assert welcome.startswith("* Welcome, "), welcome
    return welcome


def test_get_slash_is_the_page_and_other_paths_are_404_or_405(room: Room) -> None:
    port = room.server().port
    status, content_type, body = get(port, "/")
    assert (status, content_type) == (200, "text/html")
    assert b"<!doctype html>" in body and b"new WebSocket(" in body
    assert get(port, "/favicon.ico")[0] == 404
    assert get(port, "/", method="POST")[0] == 405
    assert get(port, "/ws")[0] == 426  # no upgrade: a WebSocket endpoint, not a page


def test_a_web_member_and_a_line_member_chat_and_its_id_is_its_own_address(room: Room) -> None:
    port = room.server().port
    [line_member] = room.joined_members(port, 1)
    # A proxy header from a peer nobody named as a proxy is ignored, whatever it says.
    with web_member(port, headers={"X-Forwarded-For": "203.0.113.9"}) as ws:
        me = own_id(ws)
        assert join(ws) == f"* Welcome, {me}. Others here: 1"
        line_member.expect(f"* {me} joined")
        ws.send("hello from a browser")
        assert line_member.read_line() == f"[{me}] hello from a browser"
        line_member.say("hello from nc")
        assert ws.recv(WAIT_SECONDS) == f"[{line_member.member_id}] hello from nc"
        ws.send("!Quit")
        assert ws.recv(WAIT_SECONDS) == f"* Goodbye, {me}"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(WAIT_SECONDS)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    line_member.expect(f"* {me} left (quit)")
    assert "203.0.113.9" not in "\n".join(line_member.lines)


def test_another_origin_gets_403_and_nobody_joins(room: Room) -> None:
    port = room.server().port
    [line_member] = room.joined_members(port, 1)
    with pytest.raises(InvalidStatus) as refused:
        web_member(port, origin="http://evil.example")
    assert refused.value.response.status_code == 403
    line_member.say("/who")
    assert line_member.read_line() == f"* 1 here: {line_member.member_id}"


def web_member_named(port: int, host: str) -> ClientConnection:
    """A WebSocket member over 127.0.0.1 whose browser knows the server as host (Host and
    Origin both say host:port), as after a DNS lookup of that name."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS)
    try:
        return connect(
            f"ws://{host}:{port}/ws",
            sock=sock,
            origin=Origin(f"http://{host}:{port}"),
            open_timeout=WAIT_SECONDS,
        )
    except BaseException:
        sock.close()
        raise


def test_dns_rebinding_gets_403_for_the_page_and_the_websocket_and_nobody_joins(
    room: Room,
) -> None:
    port = room.server().port
    [line_member] = room.joined_members(port, 1)
    status, _, body = get(port, "/", host=f"evil.example:{port}")
    assert status == 403 and b"--web-origin" in body
    with pytest.raises(InvalidStatus) as refused:
        web_member_named(port, "evil.example")
    assert refused.value.response.status_code == 403
    line_member.say("/who")
    assert line_member.read_line() == f"* 1 here: {line_member.member_id}"


@pytest.mark.parametrize("name", ["127.0.0.1", "[::1]", "localhost", socket.gethostname()])
def test_an_ip_localhost_or_the_machines_own_name_is_served_and_joins(
    room: Room, name: str
) -> None:
    port = room.server().port
    [line_member] = room.joined_members(port, 1)
    assert get(port, "/", host=f"{name}:{port}")[:2] == (200, "text/html")
    with web_member_named(port, name) as ws:
        join(ws)
        line_member.expect(f"* {own_id(ws)} joined")


def test_a_web_origins_name_is_served_and_joins(room: Room) -> None:
    """The name is what --web-origin allows as Host; the page there is then the room's own."""
    port = room.server("--web-origin", "http://chat.example:5050").port
    [line_member] = room.joined_members(port, 1)
    assert get(port, "/", host=f"chat.example:{port}")[:2] == (200, "text/html")
    with web_member_named(port, "chat.example") as ws:
        join(ws)
        line_member.expect(f"* {own_id(ws)} joined")
    assert get(port, "/", host=f"chat.example.evil:{port}")[0] == 403


def test_an_allowlisted_origin_may_join(room: Room) -> None:
    port = room.server("--web-origin", "https://chat.school.example").port
    with web_member(port, origin="https://chat.school.example") as ws:
        join(ws)


def test_a_message_over_max_line_is_refused_and_the_member_stays(room: Room) -> None:
    port = room.server("--max-line", "100").port
    [line_member] = room.joined_members(port, 1)
    with web_member(port) as ws:
        join(ws)
        line_member.expect(f"* {own_id(ws)} joined")
        ws.send("x" * 100)  # 101 bytes as a line
        assert ws.recv(WAIT_SECONDS) == "ERROR :Line too long (max 100 bytes)"
        ws.send("y" * 99)
        assert line_member.read_line() == f"[{own_id(ws)}] " + "y" * 99


def test_a_message_over_the_hard_cap_closes_with_1009(room: Room) -> None:
    port = room.server("--max-line", "100").port
    with web_member(port, max_size=None) as ws:
        join(ws)
        ws.send("x" * (100 + 65536 + 1))
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(WAIT_SECONDS)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009


def test_a_slow_loris_http_request_is_cut_at_the_line_deadline(room: Room) -> None:
    port = room.server("--line-timeout", "0.5").port
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS) as sock:
        started = time.monotonic()
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and the blank line never comes
        assert sock.recv(4096) == b""  # closed, without a byte of answer
        assert time.monotonic() - started < 3


class SilentBrowser:
    """A WebSocket client that never answers a ping: websockets' protocol over a raw socket,
    whose automatic pongs are never sent."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS)
        self.client = ClientProtocol(parse_uri(f"ws://127.0.0.1:{port}/ws"))
        self.client.send_request(self.client.connect())
        self.sock.sendall(b"".join(self.client.data_to_send()))
        while not self.client.events_received():  # the 101, then it is open
            data = self.sock.recv(65536)
            assert data, "closed before the handshake's answer"
            self.client.receive_data(data)

    def frames_until_closed(self) -> list[Frame]:
        frames: list[Frame] = []
        while data := self.sock.recv(65536):
            self.client.receive_data(data)
            frames += [e for e in self.client.events_received() if isinstance(e, Frame)]
        return frames


def test_a_member_that_does_not_answer_pings_is_closed_with_1011(room: Room) -> None:
    server = room.server("--web-ping-interval", "0.2", "--web-ping-timeout", "0.3")
    [line_member] = room.joined_members(server.port, 1)
    with web_member(server.port) as answering:  # the library answers pings: it stays
        join(answering)
        silent = SilentBrowser(server.port)
        try:
            silent.client.send_text(b"!Join")
            silent.sock.sendall(b"".join(silent.client.data_to_send()))
            frames = silent.frames_until_closed()
        finally:
            silent.sock.close()
        assert Opcode.PING in [frame.opcode for frame in frames]
        close = frames[-1]
        assert close.opcode is Opcode.CLOSE and close.data[:2] == (1011).to_bytes(2, "big")
        assert frames[-2].data == b"ERROR :Ping timeout"
        line_member.expect("left (timeout)")
        answering.send("still here")
        assert line_member.read_line().endswith("] still here")


def test_shutdown_closes_web_members_with_1001(room: Room) -> None:
    server = room.server()
    with web_member(server.port) as ws:
        join(ws)
        server.proc.terminate()
        assert ws.recv(WAIT_SECONDS) == "ERROR :Server shutting down"
        with pytest.raises(ConnectionClosed) as closed:
            ws.recv(WAIT_SECONDS)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1001


def test_wss_and_https_under_tls_on_the_same_port(room: Room, certs: Certificates) -> None:
    port = room.server(*certs.server_args()).port
    context = certs.client_context()
    [line_member] = room.joined_members(port, 1)
    page = http.client.HTTPSConnection("127.0.0.1", port, timeout=WAIT_SECONDS, context=context)
    try:
        page.request("GET", "/")
        response = page.getresponse()
        assert response.status == 200 and b"<!doctype html>" in response.read()
    finally:
        page.close()
    with connect(
        f"wss://127.0.0.1:{port}/ws",
        ssl=context,
        origin=Origin(f"https://127.0.0.1:{port}"),
        open_timeout=WAIT_SECONDS,
    ) as ws:
        join(ws)
        line_member.expect(f"* {own_id(ws)} joined")
        ws.send("over wss")
        assert line_member.read_line() == f"[{own_id(ws)}] over wss"
    with pytest.raises(InvalidStatus) as refused:  # the page's own origin is https now
        connect(
            f"wss://127.0.0.1:{port}/ws",
            ssl=context,
            origin=Origin(f"http://127.0.0.1:{port}"),
            open_timeout=WAIT_SECONDS,
        )
    assert refused.value.response.status_code == 403


def test_without_the_web_extra_http_is_told_how_to_add_it(
    room: Room, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "websockets.py").write_text("raise ImportError('websockets is not installed')\n")
    monkeypatch.setenv("PYTHONPATH", str(tmp_path))
    server = room.server()
    server.stderr.expect("no browser page: websockets is not installed")
    status, content_type, body = get(server.port, "/")
    assert (status, content_type) == (501, "text/plain; charset=utf-8")
    assert b"pip install 'chatroom[web]'" in body
    [member] = room.joined_members(server.port, 1)  # the terminal room works as ever
    member.say("/who")
    assert member.read_line() == f"* 1 here: {member.member_id}"
    logged = [line for line in server.stderr.lines if "no browser page" in line]
    assert len(logged) == 1


def test_a_line_member_is_unaffected_by_sending_http_like_text_after_joining(room: Room) -> None:
    port = room.server().port
    alice, bob = room.joined_members(port, 2)
    alice.say("GET / HTTP/1.1")
    assert bob.read_line() == f"[{alice.member_id}] GET / HTTP/1.1"


def test_a_web_origin_must_be_an_origin(room: Room) -> None:
    bad = room.run(
        [*python_script("chatroom_server.py", "--port", "0"), "--web-origin", "chat.example/x"]
    )
    assert bad.wait_exit() == 2
    assert "is not an origin like https://chat.example" in "\n".join(bad.stderr.wait_ended())


def test_an_http_request_over_16_kib_gets_431_and_a_close(room: Room) -> None:
    port = room.server().port
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\n" + (b"X-Padding: " + b"p" * 1000 + b"\r\n") * 20)
        answer = b""
        while data := sock.recv(65536):  # ends at the server's close
            answer += data
    assert answer.startswith(b"HTTP/1.1 431 ")


def test_under_require_tls_a_plain_http_request_is_told_to_use_https(
    room: Room, certs: Certificates
) -> None:
    server = room.server(*certs.server_args("--require-tls"))
    status, content_type, body = get(server.port, "/")
    assert (status, content_type) == (403, "text/plain; charset=utf-8")
    assert b"https://" in body
    server.stderr.expect("plain HTTP, and TLS is required")


def test_a_web_member_held_back_by_flood_control_is_not_taken_for_silent(room: Room) -> None:
    """Its pong waits unread behind the lines flood control holds back, as a line member's
    input waits: the ping deadline must not cut a member for the server's own pause."""
    server = room.server(
        *("--flood-burst", "1", "--flood-rate", "4"),
        *("--web-ping-interval", "0.2", "--web-ping-timeout", "0.3"),
    )
    [line_member] = room.joined_members(server.port, 1)
    with web_member(server.port) as ws:
        join(ws)
        line_member.expect(f"* {own_id(ws)} joined")
        for n in range(8):  # 2 s of lines at 4 a second, held back unread
            ws.send(f"line {n}")
        for n in range(8):
            assert line_member.read_line() == f"[{own_id(ws)}] line {n}"
        ws.send("still here")
        assert line_member.read_line() == f"[{own_id(ws)}] still here"
