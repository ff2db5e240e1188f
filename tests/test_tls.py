"""A private room through the real server: TLS on the same port as plain text, the room
password, and what a stranger gets for trying either. Certificates come from a CA made by
trustme for the test session."""

from __future__ import annotations

import hashlib
import selectors
import shutil
import signal
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme

from chatroom import protocol

from . import test_any_client
from .conftest import WAIT_SECONDS, Member, Program, Room, python_script
from .test_hardening import chat_for, p99

PASSWORD = "correct horse battery"

java_client = test_any_client.java_client  # the fixture: the Java client, compiled once


@dataclass(frozen=True)
class Certificates:
    ca: trustme.CA
    ca_file: str  # the CA's certificate, for --tls-ca
    cert_file: str  # the server's certificate chain, for --tls-cert
    key_file: str  # its key, for --tls-key
    fingerprint: str  # the server certificate's SHA-256, as openssl prints it
    password_file: str  # PASSWORD, for --password-file
    wrong_password_file: str

    def client_context(self) -> ssl.SSLContext:
        context = ssl.create_default_context()
        self.ca.configure_trust(context)
        return context

    def server_args(self, *more: str) -> tuple[str, ...]:
        return ("--tls-cert", self.cert_file, "--tls-key", self.key_file, *more)


@pytest.fixture(scope="module")
def certs(tmp_path_factory: pytest.TempPathFactory) -> Certificates:
    where = tmp_path_factory.mktemp("tls")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca.cert_pem.write_to_path(str(where / "ca.pem"))
    cert.private_key_pem.write_to_path(str(where / "key.pem"))
    with open(where / "cert.pem", "wb") as chain:
        for pem in cert.cert_chain_pems:
            chain.write(pem.bytes())
    der = ssl.PEM_cert_to_DER_cert(cert.cert_chain_pems[0].bytes().decode())
    digest = hashlib.sha256(der).hexdigest().upper()
    (where / "password").write_text(PASSWORD + "\n")
    (where / "wrong").write_text("battery staple\n")
    return Certificates(
        ca,
        str(where / "ca.pem"),
        str(where / "cert.pem"),
        str(where / "key.pem"),
        ":".join(digest[i : i + 2] for i in range(0, 64, 2)),
        str(where / "password"),
        str(where / "wrong"),
    )


def client_hello() -> bytes:
    """The first flight of a TLS client: a ClientHello, which it then waits to be answered."""
    tls = ssl.create_default_context().wrap_bio(
        ssl.MemoryBIO(), outgoing := ssl.MemoryBIO(), server_hostname="chat.example"
    )
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def assert_nobody_saw_a_join(
    room: Room,
    port: int,
    member: Member,
    tls: ssl.SSLContext | None = None,
    password: str | None = None,
) -> None:
    """The next line member gets is a newcomer's join: nothing came before it."""
    newcomer = room.member(port, tls=tls)
    if password is not None:
        newcomer.say(f"!Pass {password}")
    newcomer.join()
    assert member.read_line() == f"* {newcomer.member_id} joined"


def assert_failed_cleanly(client: Program, needle: str) -> list[str]:
    """Exit status 1, at most two lines on stderr (one naming the cause), no traceback."""
    assert client.wait_exit() == 1
    errors = client.stderr.wait_ended()
    assert 1 <= len(errors) <= 2, errors
    assert not any("Traceback" in line for line in errors)
    assert any(needle in line for line in errors), errors
    return errors


# TLS on the same port


def test_a_tls_member_and_a_plain_member_chat_in_one_room(room: Room, certs: Certificates) -> None:
    server = room.server(*certs.server_args())
    logged = server.stderr.expect("SHA-256")
    assert logged.endswith(certs.fingerprint)
    secure = room.member(server.port, tls=certs.client_context())
    assert isinstance(secure.sock, ssl.SSLSocket)
    secure.join()
    [plain] = room.joined_members(server.port, 1)
    assert secure.read_line() == f"* {plain.member_id} joined"
    secure.say("over TLS 🔒")
    assert plain.read_line() == f"[{secure.member_id}] over TLS 🔒"
    plain.say("in the clear")
    assert secure.read_line() == f"[{plain.member_id}] in the clear"
    secure.say("!Quit")
    assert secure.read_until_eof() == [f"* Goodbye, {secure.member_id}"]
    assert plain.read_line() == f"* {secure.member_id} left (quit)"


def test_openssl_s_client_logs_its_fingerprint_as_the_server_does(
    room: Room, certs: Certificates
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    printed = subprocess.run(
        ["openssl", "x509", "-in", certs.cert_file, "-noout", "-fingerprint", "-sha256"],
        capture_output=True,
        text=True,
        check=True,
        timeout=WAIT_SECONDS,
    ).stdout.strip()
    server = room.server(*certs.server_args())
    assert server.stderr.expect("SHA-256").endswith(printed.split("=", 1)[1])


def test_require_tls_refuses_a_plain_connection_with_one_error_line(
    room: Room, certs: Certificates
) -> None:
    server = room.server(*certs.server_args("--require-tls"))
    [secure] = room.joined_members(server.port, 1, tls=certs.client_context())
    plain = room.member(server.port)
    started = time.monotonic()
    plain.say("!Join")
    [line] = plain.read_until_eof(timeout=2)
    assert line.startswith("ERROR :") and "TLS" in line
    assert time.monotonic() - started < 1
    assert_nobody_saw_a_join(room, server.port, secure, tls=certs.client_context())


def test_without_a_certificate_a_tls_handshake_is_still_another_protocol(room: Room) -> None:
    server = room.server()
    stranger = room.member(server.port)
    stranger.send(client_hello())
    assert stranger.read_until_eof(timeout=2) == [
        "ERROR :" + protocol.ERROR_WRONG_PROTOCOL,
    ]


def test_fifty_lines_in_one_read_are_all_broadcast_at_once(room: Room, certs: Certificates) -> None:
    """Records decrypted inside the server's SSLObject are invisible to select(): all 50 must
    go out although the sender sends nothing more."""
    server = room.server(*certs.server_args("--flood-rate", "0"))
    [listener] = room.joined_members(server.port, 1)
    sender = BioMember(server.port, certs.client_context())
    sender.send_records([b"!Join\n"])
    listener.expect(f"* {sender.member_id} joined")
    sender.send_records([f"record {n}\n".encode() for n in range(50)])
    for n in range(50):
        assert listener.read_line(timeout=2) == f"[{sender.member_id}] record {n}"
    sender.close()


class BioMember:
    """A TLS client over memory BIOs on a blocking socket, so that many records go out in one
    send() and reach the server in one read."""

    def __init__(self, port: int, context: ssl.SSLContext) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS)
        address, member_port = self.sock.getsockname()[:2]
        self.member_id = f"{address}:{member_port}"
        self._in, self._out = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_hostname="127.0.0.1")
        while True:
            try:
                self.tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                self.sock.sendall(self._out.read())
                data = self.sock.recv(65536)
                assert data, "the server closed during the handshake"
                self._in.write(data)
        self.sock.sendall(self._out.read())

    def send_records(self, records: list[bytes]) -> None:
        for record in records:
            self.tls.write(record)  # one record each
        self.sock.sendall(self._out.read())

    def close(self) -> None:
        self.sock.close()


# The Python client


def test_the_client_verifies_the_server_with_a_ca_and_chats(
    room: Room, certs: Certificates
) -> None:
    server = room.server(*certs.server_args("--require-tls"))
    [member] = room.joined_members(server.port, 1, tls=certs.client_context())
    client = room.client(server.port, "--tls-ca", certs.ca_file)
    member.expect(f"* {client.member_id} joined")
    client.type_line("hello over TLS")
    assert member.read_line() == f"[{client.member_id}] hello over TLS"
    member.say("and back")
    client.stdout.expect(f"[{member.member_id}] and back")
    client.close_stdin()
    assert client.wait_exit() == 0


@pytest.mark.parametrize("typed", ["as-logged", "lower-no-colons"])
def test_the_client_pins_a_fingerprint_in_any_spelling(
    room: Room, certs: Certificates, typed: str
) -> None:
    server = room.server(*certs.server_args("--require-tls"))
    [member] = room.joined_members(server.port, 1, tls=certs.client_context())
    pinned = certs.fingerprint if typed == "as-logged" else certs.fingerprint.replace(":", "")
    client = room.client(server.port, "--tls-fingerprint", pinned.lower())
    member.expect(f"* {client.member_id} joined")
    client.close_stdin()
    assert client.wait_exit() == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--tls-fingerprint", "AB" * 32), "not the pinned one"),
        (("--tls",), "certificate not trusted"),  # the system's CAs never signed trustme's
        (("--tls-ca", "WRONG-CA"), "certificate not trusted"),
    ],
    ids=["wrong-fingerprint", "system-cas", "another-ca"],
)
def test_the_client_refuses_a_certificate_it_cannot_trust_and_nobody_sees_it(
    room: Room, certs: Certificates, tmp_path: Path, args: tuple[str, ...], needle: str
) -> None:
    server = room.server(*certs.server_args())
    [member] = room.joined_members(server.port, 1)
    if "WRONG-CA" in args:
        trustme.CA().cert_pem.write_to_path(str(tmp_path / "other.pem"))
        args = ("--tls-ca", str(tmp_path / "other.pem"))
    client = room.run(python_script("chatroom_client.py", "--port", str(server.port), *args))
    assert_failed_cleanly(client, needle)
    assert client.stdout.wait_ended() == []
    assert_nobody_saw_a_join(room, server.port, member)


def test_the_client_fails_cleanly_when_the_server_speaks_no_tls(room: Room) -> None:
    server = room.server()
    client = room.run(python_script("chatroom_client.py", "--port", str(server.port), "--tls"))
    assert_failed_cleanly(client, "TLS with")


# The room password


def test_join_without_the_password_is_refused_and_the_right_one_lets_in(
    room: Room, certs: Certificates
) -> None:
    server = room.server("--password-file", certs.password_file)
    server.stderr.expect("without --require-tls")  # the warning
    first = room.member(server.port)
    first.say(f"!Pass {PASSWORD}")
    first.join()
    stranger = room.member(server.port)
    for line in ("!Join", "hello?", "/who"):
        stranger.say(line)
        assert stranger.read_line() == "ERROR :" + protocol.ERROR_PASSWORD_REQUIRED
    stranger.say("/help")
    assert stranger.read_line().startswith("* /nick")
    stranger.say(f"  !pass   {PASSWORD} ")  # spaced and cased as !Join may be
    assert stranger.join().startswith(f"* Welcome, {stranger.member_id}")
    assert first.read_line() == f"* {stranger.member_id} joined"  # nothing came before it
    stranger.say(f"!Pass {PASSWORD}")  # never relayed, even once in
    stranger.say("after")
    assert first.read_line() == f"[{stranger.member_id}] after"


def test_a_wrong_password_gets_one_line_and_a_close(room: Room, certs: Certificates) -> None:
    server = room.server("--password-file", certs.password_file)
    member = room.member(server.port)
    member.say(f"!Pass {PASSWORD}")
    member.join()
    guesser = room.member(server.port)
    guesser.send(b"!Pass hunter2\n!Join\n")
    assert guesser.read_until_eof(timeout=2) == ["ERROR :Wrong password"]
    assert_nobody_saw_a_join(room, server.port, member, password=PASSWORD)


def test_repeated_wrong_passwords_are_answered_later_then_refused(
    room: Room, certs: Certificates
) -> None:
    server = room.server("--password-file", certs.password_file)
    guessers = [room.member(server.port) for _ in range(4)]
    started = time.monotonic()
    for guesser in guessers[:3]:
        guesser.say("!Pass guess")
    answered_after = []
    for guesser in guessers[:3]:
        assert guesser.read_until_eof(timeout=5) == ["ERROR :Wrong password"]
        answered_after.append(time.monotonic() - started)
    assert answered_after[0] < 0.5
    assert 1.0 <= answered_after[1] < 1.5
    assert 2.0 <= answered_after[2] < 2.5
    # Locked out: a connection already open gets no check even with the right password...
    guessers[3].say(f"!Pass {PASSWORD}")
    assert guessers[3].read_until_eof(timeout=2) == [
        protocol.PASSWORD_HINT_LINE.decode().rstrip("\n"),  # it was silent a second
        "ERROR :" + protocol.ERROR_TOO_MANY_WRONG_PASSWORDS,
    ]
    # ...and a new one is refused on connect.
    late = room.member(server.port)
    assert late.read_until_eof(timeout=2) == ["ERROR :" + protocol.ERROR_TOO_MANY_WRONG_PASSWORDS]


def test_the_client_sends_its_password_file_before_joining(room: Room, certs: Certificates) -> None:
    server = room.server(
        *certs.server_args("--require-tls", "--password-file", certs.password_file)
    )
    context = certs.client_context()
    first = room.member(server.port, tls=context)
    first.say(f"!Pass {PASSWORD}")
    first.join()
    client = room.client(
        server.port, "--tls-ca", certs.ca_file, "--password-file", certs.password_file
    )
    first.expect(f"* {client.member_id} joined")
    client.close_stdin()
    assert client.wait_exit() == 0
    assert first.read_line() == f"* {client.member_id} left (quit)"
    wrong = room.run(
        python_script(
            "chatroom_client.py",
            "--port",
            str(server.port),
            "--tls-fingerprint",
            certs.fingerprint,
            "--password-file",
            certs.wrong_password_file,
        )
    )
    assert_failed_cleanly(wrong, "closed the connection")
    assert wrong.stdout.wait_ended() == ["ERROR :Wrong password"]
    assert_nobody_saw_a_join(room, server.port, first, tls=context, password=PASSWORD)


# What a stranger gets


def open_stalled_handshakes(port: int, count: int, send: bytes) -> list[socket.socket]:
    stalled = []
    for _ in range(count):
        sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS)
        if send:
            sock.sendall(send)
        stalled.append(sock)
    return stalled


def wait_for_closes(socks: list[socket.socket], timeout: float) -> list[float]:
    """When each socket's peer closed it (EOF or reset), as monotonic times."""
    closed_at: list[float] = []
    with selectors.DefaultSelector() as selector:
        for sock in socks:
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_READ, sock)
        deadline = time.monotonic() + timeout
        while len(closed_at) < len(socks):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"{len(socks) - len(closed_at)} still open after {timeout} s")
            for key, _ in selector.select(remaining):
                sock = key.data
                try:
                    data = sock.recv(65536)
                except ConnectionError:
                    data = b""
                if not data:
                    selector.unregister(sock)
                    closed_at.append(time.monotonic())
    return closed_at


@pytest.mark.parametrize(
    "opening", ["client-hello", "half-a-client-hello", "nothing"], ids=lambda opening: opening
)
def test_200_stalled_handshakes_end_at_the_join_deadline_and_cost_members_nothing(
    room: Room,
    certs: Certificates,
    opening: str,
    record_property: Callable[[str, object], None],
) -> None:
    server = room.server(*certs.server_args("--join-timeout", "2", "--flood-rate", "0"))
    secure, plain = (
        room.member(server.port, tls=certs.client_context()),
        room.member(server.port),
    )
    secure.join()
    plain.join()
    secure.expect(f"* {plain.member_id} joined")
    hello = client_hello()
    send = {"client-hello": hello, "half-a-client-hello": hello[:40], "nothing": b""}[opening]
    opened = time.monotonic()
    stalled = open_stalled_handshakes(server.port, 200, send)
    all_open = time.monotonic() - opened
    try:
        latencies = chat_for(1.5, plain, secure) + chat_for(0.3, secure, plain)
        closed_at = wait_for_closes(stalled, timeout=6)
    finally:
        for sock in stalled:
            sock.close()
    record_property("member_p99_ms", round(p99(latencies) * 1000, 2))
    earliest, latest = min(closed_at) - opened, max(closed_at) - opened
    record_property("stalled_closed_after_s", f"{earliest:.2f}-{latest:.2f}")
    assert p99(latencies) < 0.05
    assert earliest >= 2 - 0.05
    assert latest <= all_open + 2 + 1.0
    secure.say("still here")
    assert plain.read_line() == f"[{secure.member_id}] still here"


def test_garbage_after_a_client_hello_closes_that_connection_only(
    room: Room, certs: Certificates
) -> None:
    server = room.server(*certs.server_args())
    [secure] = room.joined_members(server.port, 1, tls=certs.client_context())
    [plain] = room.joined_members(server.port, 1)
    secure.expect(f"* {plain.member_id} joined")
    stranger = room.member(server.port)
    started = time.monotonic()
    stranger.send(client_hello() + b"\x16\x03\x03\x00\x10" + b"\x99" * 16 + b"GARBAGE" * 100)
    stranger.sock.settimeout(2)
    with pytest.raises((EOFError, ConnectionError)):
        while stranger.sock.recv(65536):  # the server's handshake answer, perhaps an alert
            pass
        raise EOFError
    assert time.monotonic() - started < 1
    server.stderr.expect("TLS failed")
    secure.say("unaffected")
    assert plain.read_line() == f"[{secure.member_id}] unaffected"


def test_a_renegotiation_attempt_is_refused_and_costs_no_one_anything(
    room: Room, certs: Certificates
) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    server = room.server(*certs.server_args())
    [member] = room.joined_members(server.port, 1)
    # Interactive s_client (no -quiet) renegotiates when a line is just "R"; TLS 1.2 has it.
    command = ["openssl", "s_client", "-tls1_2", "-connect", f"127.0.0.1:{server.port}"]
    stranger = room.run(command)
    stranger.type_line("!Join")
    stranger.stdout.expect("Welcome")
    assert member.read_line().endswith(" joined")
    stranger.type_line("R")
    assert member.read_line().endswith(" left (connection lost)")
    server.stderr.expect("TLS failed")
    stranger.wait_exit()
    assert_nobody_saw_a_join(room, server.port, member)


def test_openssl_s_client_joins_like_nc(room: Room, certs: Certificates) -> None:
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    server = room.server(*certs.server_args("--require-tls"))
    [member] = room.joined_members(server.port, 1, tls=certs.client_context())
    command = ["openssl", "s_client", "-quiet", "-connect", f"127.0.0.1:{server.port}"]
    s_client = room.client_from(command, send_join=True)
    member.expect(f"* {s_client.member_id} joined")
    s_client.type_line("typed into s_client")
    assert member.read_line() == f"[{s_client.member_id}] typed into s_client"


def test_a_tls_member_that_never_reads_is_dropped_at_the_output_limit(
    room: Room, certs: Certificates
) -> None:
    """The queue counts ciphertext, and the limits hold for TLS members as for plain ones."""
    server = room.server(*certs.server_args("--flood-rate", "0", "--sendq-hard", "200000"))
    [sender] = room.joined_members(server.port, 1)
    stalled = room.member(server.port, receive_buffer=16384, tls=certs.client_context())
    stalled.join()
    sender.expect(f"* {stalled.member_id} joined")
    sender.send(("x" * 1000 + "\n") * 5000)  # 5 MB: more than any kernel buffer holds
    assert sender.expect("left", timeout=10) == f"* {stalled.member_id} left (too slow)"
    server.stderr.expect(f"closing {stalled.member_id}: output queue over 200000 bytes")


# The Java client: the JDK's own TLS


def test_the_java_client_pins_a_fingerprint_and_sends_its_password(
    room: Room, certs: Certificates, java_client: list[str]
) -> None:
    password = ("--password-file", certs.password_file)
    server = room.server(*certs.server_args("--require-tls", *password))
    context = certs.client_context()
    first = room.member(server.port, tls=context)
    first.say(f"!Pass {PASSWORD}")
    first.join()
    java = room.client_from(
        [
            *java_client,
            "--port",
            str(server.port),
            *password,
            "--tls-fingerprint",
            certs.fingerprint.replace(":", "").lower(),
        ]
    )
    first.expect(f"* {java.member_id} joined")
    java.type_line("hello from Java over TLS ☕")
    assert first.read_line() == f"[{java.member_id}] hello from Java over TLS ☕"
    first.say("and back")
    java.stdout.expect(f"[{first.member_id}] and back")
    java.type_line("!Quit")
    assert java.wait_exit() == 0
    assert java.stderr.wait_ended() == []
    assert first.read_line() == f"* {java.member_id} left (quit)"


def test_the_java_client_verifies_with_a_ca(
    room: Room, certs: Certificates, java_client: list[str]
) -> None:
    server = room.server(*certs.server_args("--require-tls"))
    [member] = room.joined_members(server.port, 1, tls=certs.client_context())
    java = room.client_from([*java_client, "--port", str(server.port), "--tls-ca", certs.ca_file])
    member.expect(f"* {java.member_id} joined")
    java.close_stdin()
    assert java.wait_exit() == 0


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (("--tls-fingerprint", "AB" * 32), "not the pinned one"),
        (("--tls",), "certificate not trusted"),
        (("--password-file", "WRONG"), "the server closed the connection"),
    ],
    ids=["wrong-fingerprint", "system-cas", "wrong-password"],
)
def test_the_java_client_refuses_what_it_cannot_trust_and_nobody_sees_it(
    room: Room,
    certs: Certificates,
    java_client: list[str],
    args: tuple[str, ...],
    needle: str,
) -> None:
    server = room.server(*certs.server_args("--password-file", certs.password_file))
    member = room.member(server.port)
    member.say(f"!Pass {PASSWORD}")
    member.join()
    if "WRONG" in args:
        args = ("--tls-ca", certs.ca_file, "--password-file", certs.wrong_password_file)
    java = room.run([*java_client, "--port", str(server.port), *args])
    assert_failed_cleanly(java, needle)
    assert_nobody_saw_a_join(room, server.port, member, password=PASSWORD)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_tls_client_told_to_stop_still_says_quit(
    room: Room, certs: Certificates, signum: int
) -> None:
    server = room.server(*certs.server_args("--require-tls"))
    [member] = room.joined_members(server.port, 1, tls=certs.client_context())
    client = room.client(server.port, "--tls-ca", certs.ca_file)
    member.expect(f"* {client.member_id} joined")
    started = time.monotonic()
    client.proc.send_signal(signum)
    assert client.wait_exit() == 0
    assert time.monotonic() - started < 2
    assert member.read_line() == f"* {client.member_id} left (quit)"


def test_the_server_stops_within_2_s_with_a_handshake_half_done(
    room: Room, certs: Certificates
) -> None:
    server = room.server(*certs.server_args())
    [member] = room.joined_members(server.port, 1, tls=certs.client_context())
    stalled = open_stalled_handshakes(server.port, 3, client_hello())
    try:
        started = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)
        assert server.wait_exit(timeout=2) == 0
        assert time.monotonic() - started < 2
        assert member.read_until_eof()[-1] == "ERROR :Server shutting down"
    finally:
        for sock in stalled:
            sock.close()
    assert "Traceback" not in "\n".join(server.stderr.wait_ended())
