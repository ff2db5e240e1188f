"""TLS for the chat room: a codec that runs TLS inside the selectors loop, and the contexts and
certificate fingerprints both programs need.

The codec is a layer between the socket and the codec of the plaintext (lines, or the web
codec's HTTP and WebSocket), as asyncio's sslproto is between transport and protocol: ciphertext
from the socket goes into an incoming ssl.MemoryBIO, the SSLObject decrypts it, and the plaintext
goes to the inner codec; what the inner codec has for the peer goes into the SSLObject and comes
out of the outgoing MemoryBIO as ciphertext, for the connection's queue.
It does no I/O, so the loop (and a test) drives it the way it drives plain lines.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import re
import socket
import ssl
from typing import TYPE_CHECKING

from chatroom import protocol

if TYPE_CHECKING:
    from chatroom.connection import Codec

# Plaintext taken out of the SSLObject per call; every call until it has no more is made at
# once, since decrypted bytes waiting inside it are invisible to select().
READ_SIZE = 65536

_PEM_CERTIFICATE = re.compile(
    r"-----BEGIN CERTIFICATE-----\s+.*?-----END CERTIFICATE-----", re.DOTALL
)
_HEX_ONLY = re.compile(r"[0-9A-Fa-f]{64}\Z")


class TlsError(protocol.RemoteProtocolError):
    """The peer's TLS failed: a handshake that went wrong, a record that is not one, a
    renegotiation. The connection cannot go on."""


class FingerprintMismatch(Exception):
    """The server's certificate is not the one pinned with --tls-fingerprint."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__(f"expected {expected}, the server's is {actual}")
        self.expected = expected
        self.actual = actual


def format_fingerprint(der: bytes) -> str:
    """The SHA-256 of a certificate as `openssl x509 -fingerprint -sha256` prints it."""
    digest = hashlib.sha256(der).hexdigest().upper()
    return ":".join(digest[i : i + 2] for i in range(0, len(digest), 2))


def parse_fingerprint(text: str) -> str:
    """A SHA-256 fingerprint as the user typed it (colons, spaces and case optional, an
    "SHA256:" or "sha256 Fingerprint=" prefix allowed) in the form format_fingerprint gives.
    Raises ValueError if it is not 64 hexadecimal digits."""
    digits = text.strip()
    for prefix in ("sha256 fingerprint=", "sha256:", "sha256="):
        if digits.lower().startswith(prefix):
            digits = digits[len(prefix) :]
    digits = digits.replace(":", "").replace(" ", "")
    if not _HEX_ONLY.match(digits):
        raise ValueError(f"{text!r} is not a SHA-256 fingerprint (64 hexadecimal digits)")
    upper = digits.upper()
    return ":".join(upper[i : i + 2] for i in range(0, len(upper), 2))


def certificate_fingerprint(cert_file: str) -> str:
    """The fingerprint of the first certificate in a PEM file (the server's own: a chain
    file starts with it)."""
    with open(cert_file, encoding="ascii", errors="replace") as pem:
        found = _PEM_CERTIFICATE.search(pem.read())
    if found is None:
        raise ValueError(f"no PEM certificate in {cert_file}")
    return format_fingerprint(ssl.PEM_cert_to_DER_cert(found.group(0)))


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    # OpenSSL 3 already refuses a client's renegotiation; say so for older ones too. TLS 1.3
    # has no renegotiation at all.
    context.options |= getattr(ssl, "OP_NO_RENEGOTIATION", 0)
    return context


def server_context(cert_file: str, key_file: str) -> ssl.SSLContext:
    """TLS 1.2 or newer, no renegotiation, the certificate and key given. Raises OSError or
    ssl.SSLError if they cannot be loaded."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(cert_file, key_file)
    return context


def client_context(ca_file: str | None = None, pinned: bool = False) -> ssl.SSLContext:
    """Verifies the server against the system's CAs, or ca_file's; pinned: checks no CA and
    no host name, since the fingerprint of the leaf is checked instead (check_pinned)."""
    context = _harden(ssl.create_default_context(cafile=ca_file))
    if pinned:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def check_pinned(sock: ssl.SSLSocket, expected: str) -> None:
    """Raises FingerprintMismatch unless the server's certificate has this SHA-256."""
    der = sock.getpeercert(binary_form=True) or b""
    actual = format_fingerprint(der) if der else "none"
    if not hmac.compare_digest(actual, expected):
        raise FingerprintMismatch(expected, actual)


def connect(
    sock: socket.socket, host: str, ca_file: str | None, fingerprint: str | None
) -> ssl.SSLSocket:
    """The TLS client side of a connected socket: the handshake, then the pinned check.
    Nothing is sent over it before both pass. Raises ssl.SSLError (SSLCertVerificationError
    for a certificate not trusted), FingerprintMismatch or OSError."""
    context = client_context(ca_file, pinned=fingerprint is not None)
    tls = context.wrap_socket(sock, server_hostname=host)
    try:
        if fingerprint is not None:
            check_pinned(tls, fingerprint)
    except FingerprintMismatch:
        tls.close()
        raise
    return tls


def describe_failure(exc: ssl.SSLError) -> str:
    """A TLS failure in a few words: why a certificate was not trusted, or OpenSSL's reason."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate not trusted: {exc.verify_message}"
    reason = exc.reason or exc.strerror or str(exc)
    return str(reason).replace("_", " ").lower()


class TlsCodec:
    """TLS around another codec, over two memory BIOs; the server's side of one connection.

    The handshake is driven by each receive(); what it answers is taken with take_output()
    after every receive, so the handshake moves as fast as the peer does. A stalled handshake
    costs nothing but the connection's join deadline, which it has not met.
    """

    def __init__(self, context: ssl.SSLContext, inner: Codec) -> None:
        self._incoming = ssl.MemoryBIO()  # ciphertext from the peer, not yet decrypted
        self._outgoing = ssl.MemoryBIO()  # ciphertext for the peer, not yet taken
        self._tls = context.wrap_bio(self._incoming, self._outgoing, server_side=True)
        self._inner = inner  # the plaintext's codec
        self._records = _RecordFraming()  # whether a record is half received
        self.handshake_done = False  # application data may flow
        self.peer_closed = False  # the peer sent close_notify: it sends no more
        self._output_cut = False  # queued ciphertext was thrown away: nothing more can follow

    @property
    def version(self) -> str | None:
        return self._tls.version()

    def receive(self, data: bytes) -> None:
        """Ciphertext in; the plaintext in it goes to the inner codec, all of it.
        Raises TlsError if the peer's TLS is broken."""
        self._incoming.write(data)
        self._records.feed(data)
        try:
            if not self.handshake_done:
                self._tls.do_handshake()
                self.handshake_done = True
            while not self.peer_closed:
                plaintext = self._tls.read(READ_SIZE)
                if plaintext:
                    self._inner.receive(plaintext)
                else:
                    self.peer_closed = True
        except ssl.SSLWantReadError:
            return
        except ssl.SSLZeroReturnError:
            self.peer_closed = True
        except ssl.SSLError as exc:
            raise TlsError(describe_failure(exc)) from exc

    def take_output(self) -> bytes:
        """What TLS itself has for the peer (the handshake's answers, an alert), then what the
        inner codec has of its own accord (an HTTP answer, a pong), encrypted."""
        handshake = self._outgoing.read()
        return handshake + self._encrypt(self._inner.take_output())

    def next_line(self) -> bytes | None:
        return self._inner.next_line()

    @property
    def has_partial_line(self) -> bool:
        """An unfinished line, or an unfinished TLS record: a slow-loris may trickle either."""
        return self._inner.has_partial_line or self._records.partial

    def encode(self, lines: bytes) -> bytes:
        """The ciphertext for these lines; nothing before the handshake is done, since no
        line can be sent then (nor after queued output was thrown away)."""
        if not self.handshake_done:
            return b""
        return self._encrypt(self._inner.encode(lines))

    def _encrypt(self, plaintext: bytes) -> bytes:
        if not plaintext or self._output_cut:
            return b""
        try:
            self._tls.write(plaintext)
        except ssl.SSLError:
            return b""  # the TLS session is broken: the connection is failing anyway
        return self._outgoing.read()

    def kept_when_discarding(self, queued: bytearray) -> int:
        """How much of a queue about to be thrown away must stay: with TLS, nothing can be
        kept whole (a record may be half sent), so nothing is, and nothing more is sent."""
        self._output_cut = True
        return 0

    def closing_bytes(self) -> bytes:
        """The inner codec's last bytes, then close_notify, for a clean end of the TLS
        session before the TCP one."""
        if not self.handshake_done or self._output_cut:
            return b""
        last = self._encrypt(self._inner.closing_bytes())
        # SSLWantReadError: the close_notify is written, the peer's is not awaited.
        with contextlib.suppress(ssl.SSLError):
            self._tls.unwrap()
        return last + self._outgoing.read()

    @property
    def ended(self) -> bool:
        return self._inner.ended

    @property
    def keeps_alive(self) -> bool:
        return self._inner.keeps_alive and not self._output_cut

    def ping(self) -> bytes:
        return self._encrypt(self._inner.ping())

    @property
    def awaiting_pong(self) -> bool:
        return self._inner.awaiting_pong


class _RecordFraming:
    """Follows the TLS record headers (type, version, 2-byte length) in the peer's stream, to
    tell whether a record is half received: OpenSSL takes a partial record out of the BIO and
    holds it where nobody can see it."""

    HEADER = 5

    def __init__(self) -> None:
        self._header = bytearray()  # the start of a header not yet whole
        self._body_left = 0  # bytes still to come of the current record's body

    @property
    def partial(self) -> bool:
        return bool(self._header) or self._body_left > 0

    def feed(self, data: bytes) -> None:
        at = 0
        while at < len(data):
            if self._body_left:
                taken = min(self._body_left, len(data) - at)
                self._body_left -= taken
                at += taken
                continue
            needed = self.HEADER - len(self._header)
            self._header += data[at : at + needed]
            at += needed
            if len(self._header) == self.HEADER:
                self._body_left = int.from_bytes(self._header[3:5], "big")
                self._header.clear()
