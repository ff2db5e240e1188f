"""chatroom.tls without sockets: the server's TLS codec and a client's SSLObject talking through
memory BIOs, and the fingerprints as openssl prints them."""

from __future__ import annotations

import contextlib
import ssl
import warnings
from pathlib import Path

import pytest
import trustme

from chatroom import protocol, tls
from chatroom.connection import LineCodec

CA = trustme.CA()
SERVER_CERT = CA.issue_cert("chat.example", "127.0.0.1")


class Client:
    """A TLS client as a peer would run it, over memory BIOs."""

    def __init__(
        self, maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED, legacy: bool = False
    ) -> None:
        context = ssl.create_default_context()
        CA.configure_trust(context)
        if legacy:  # what an old client offers: OpenSSL 3 needs its security level lowered
            context.set_ciphers("DEFAULT:@SECLEVEL=0")
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                context.minimum_version = ssl.TLSVersion.TLSv1
                context.maximum_version = maximum
        else:
            context.maximum_version = maximum
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.tls = context.wrap_bio(self.incoming, self.outgoing, server_hostname="chat.example")

    def step(self) -> bytes:
        """Drives the handshake once; gives what it has for the server."""
        with contextlib.suppress(ssl.SSLWantReadError):
            self.tls.do_handshake()
        return self.outgoing.read()

    def send(self, data: bytes) -> bytes:
        self.tls.write(data)
        return self.outgoing.read()

    def receive(self, data: bytes) -> bytes:
        self.incoming.write(data)
        received = b""
        while True:
            try:
                received += self.tls.read(65536)
            except ssl.SSLWantReadError:
                return received


def connected(context: ssl.SSLContext | None = None) -> tuple[tls.TlsCodec, Client]:
    codec = tls.TlsCodec(context or hardened_server_context(), LineCodec(protocol.MAX_LINE))
    client = Client()
    while not (codec.handshake_done and client.tls.version() is not None):
        to_server = client.step()
        codec.receive(to_server)
        client.receive(codec.take_output())
    return codec, client


def hardened_server_context() -> ssl.SSLContext:
    """What the server runs with: TLS 1.2 at least, no renegotiation."""
    with SERVER_CERT.private_key_and_cert_chain_pem.tempfile() as pem:
        return tls.server_context(pem, pem)


def lines(codec: tls.TlsCodec) -> list[bytes]:
    out = []
    while (line := codec.next_line()) is not None:
        out.append(line)
    return out


def test_lines_go_both_ways_once_the_handshake_is_done() -> None:
    codec, client = connected()
    assert codec.version in ("TLSv1.2", "TLSv1.3")
    codec.receive(client.send(b"!Join\nhello\n"))
    assert lines(codec) == [b"!Join", b"hello"]
    assert client.receive(codec.encode(b"* Welcome\n[a] b\n")) == b"* Welcome\n[a] b\n"


def test_fifty_lines_in_one_read_come_out_at_once() -> None:
    """Decrypted bytes left inside the SSLObject are invisible to select(): receive() must
    take all of them, not one record's worth."""
    codec, client = connected()
    records = b"".join(client.send(f"line {n}\n".encode()) for n in range(50))  # 50 records
    codec.receive(records)
    assert lines(codec) == [f"line {n}".encode() for n in range(50)]


def test_a_record_cut_anywhere_is_whole_once_the_rest_arrives() -> None:
    codec, client = connected()
    record = client.send(b"split across reads\n")
    for cut in range(1, len(record)):
        codec.receive(record[:cut])
        assert codec.next_line() is None
        assert codec.has_partial_line  # an unfinished record is timed like an unfinished line
        codec.receive(record[cut:])
        assert lines(codec) == [b"split across reads"]
        assert not codec.has_partial_line
        record = client.send(b"split across reads\n")


def test_nothing_can_be_sent_before_the_handshake_is_done() -> None:
    codec = tls.TlsCodec(hardened_server_context(), LineCodec())
    assert codec.encode(b"ERROR :Join timeout\n") == b""
    codec.receive(Client().step())  # the ClientHello
    assert codec.take_output()[:1] == b"\x16"  # the server's handshake answer
    assert codec.encode(b"ERROR :Join timeout\n") == b""


@pytest.mark.parametrize(
    "garbage",
    [b"\x16\x03\x01\x00\x05hello" + b"\x00" * 64, b"\x17\x03\x03\x00\x10" + b"x" * 16],
    ids=["bad-handshake", "data-before-handshake"],
)
def test_garbage_in_place_of_a_handshake_is_the_peers_error(garbage: bytes) -> None:
    codec = tls.TlsCodec(hardened_server_context(), LineCodec())
    with pytest.raises(tls.TlsError):
        codec.receive(garbage)
    assert isinstance(tls.TlsError("x"), protocol.RemoteProtocolError)


def test_garbage_after_the_handshake_is_the_peers_error() -> None:
    codec, _client = connected()
    with pytest.raises(tls.TlsError):
        codec.receive(b"\x17\x03\x03\x00\x20" + b"\xaa" * 32)  # a record that fails its MAC


def test_tls_1_1_is_refused() -> None:
    codec = tls.TlsCodec(hardened_server_context(), LineCodec())
    client = Client(maximum=ssl.TLSVersion.TLSv1_1, legacy=True)
    try:
        hello = client.step()
    except ssl.SSLError:
        pytest.skip("this OpenSSL cannot even offer TLS 1.1")
    with pytest.raises(tls.TlsError):
        codec.receive(hello)


def test_close_notify_ends_the_session_cleanly_for_the_peer() -> None:
    codec, client = connected()
    closing = codec.closing_bytes()
    assert closing
    client.incoming.write(closing)
    assert client.tls.read(100) == b""  # a clean end, not a ragged one (SSLEOFError)


def test_queued_ciphertext_thrown_away_cuts_the_output_for_good() -> None:
    codec, _ = connected()
    queued = bytearray(codec.encode(b"x" * 5000 + b"\n"))
    assert codec.kept_when_discarding(queued) == 0
    assert codec.encode(b"ERROR :SendQ exceeded\n") == b""  # it could not be read after a cut


def test_a_fingerprint_reads_as_openssl_prints_it_and_is_accepted_in_any_form(
    tmp_path: Path,
) -> None:
    pem = tmp_path / "cert.pem"
    SERVER_CERT.cert_chain_pems[0].write_to_path(str(pem))
    fingerprint = tls.certificate_fingerprint(str(pem))
    assert len(fingerprint) == 95 and fingerprint == fingerprint.upper()
    digits = fingerprint.replace(":", "")
    for typed in (digits.lower(), fingerprint, f"sha256 Fingerprint={fingerprint}", digits):
        assert tls.parse_fingerprint(typed) == fingerprint
    for bad in ("", "AB:CD", digits[:-1] + "G"):
        with pytest.raises(ValueError):
            tls.parse_fingerprint(bad)


def test_the_server_asks_for_tls_1_2_at_least_and_refuses_renegotiation() -> None:
    context = hardened_server_context()
    assert context.minimum_version == ssl.TLSVersion.TLSv1_2
    assert context.options & ssl.OP_NO_RENEGOTIATION
