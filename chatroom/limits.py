"""What a peer may make the server hold or do, and the bookkeeping to enforce it: pure, no I/O.

Every default carries its reason; README.md's limits table repeats them for users.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from chatroom import protocol

KiB = 1024
MiB = 1024 * KiB


@dataclass(frozen=True)
class Limits:
    # Longest client line, counting its "\n" (see protocol.MAX_LINE for the reason).
    max_line: int = protocol.MAX_LINE
    # A member whose queue stays over the soft limit this long is too slow; over the hard limit
    # at once. IRC servers drop at 100 kB-1 MiB of send queue, Redis pub/sub at 8 MiB for 60 s
    # or 32 MiB: a chat line is small, so 256 KiB is thousands of unread lines.
    sendq_soft: int = 256 * KiB
    sendq_soft_seconds: float = 10.0
    sendq_hard: int = 1 * MiB
    # What the kernel may hold for one member on top of its queue here (SO_SNDBUF; Linux
    # doubles it for its own bookkeeping). Left alone, Linux grows it to 4 MiB (tcp_wmem), and
    # 300 members that never read held ~1 GiB of kernel memory before any limit here saw a
    # byte. 64 KiB is still hundreds of chat lines in flight.
    send_buffer: int = 64 * KiB
    # All queues together (Redis' maxmemory-clients): past it the largest queue is dropped, and
    # input waits for the next turn, so a broadcast storm cannot run the server out of memory.
    sendq_total: int = 64 * MiB
    # A queue that the kernel accepts no byte of for this long belongs to a dead or stuck peer
    # (nginx send_timeout 60 s, NATS write deadline 10 s).
    write_timeout: float = 30.0
    # Token bucket per connection: a 20-line paste passes at once, then 2 lines a second
    # (Ergo and Solanum: burst 5, 2/s; RFC 1459: burst 5, 1 per 2 s). 0 turns it off.
    flood_rate: float = 2.0
    flood_burst: int = 20
    # Redis' maxclients default: a join storm of 10,000 fits with the default settings. The
    # server raises its own open-files limit to fit it, as far as the hard limit allows, and
    # only past that lowers it (Redis' adjustOpenFilesLimit).
    max_members: int = 10_000
    # Connections that have not joined yet, on top of the members: a tenth of the members'
    # places. A client sends !Join at once, so even a join storm has only a few turns' accepts
    # (64 a turn) waiting; past this, the one that has waited longest is cut, so connections
    # that never join can never keep a member out.
    max_unjoined: int = 1024
    # Ergo's default per-address cap; loopback is exempt so one machine can host a class.
    max_per_ip: int = 16
    exempt_loopback: bool = True
    # An IPv6 subscriber is handed a whole /64 (RFC 6177): counted per address, one attacker
    # would have 2^64 of them. IRC servers count IPv6 by /64 for the same reason.
    ipv6_prefix: int = 64
    # A connection must send !Join within this long (Ergo 60 s, InspIRCd 90 s, ngircd 20 s).
    join_timeout: float = 60.0
    # A line must end within this long of its first byte: slow-loris (Solanum 30 s, Node 40 s).
    line_timeout: float = 30.0
    # A WebSocket member is pinged after this long without one, and must answer within the
    # timeout (websockets' own defaults, 20 s and 20 s): a browser tab whose machine slept or
    # whose Wi-Fi dropped is found in under a minute, long before TCP keepalive would notice.
    web_ping_interval: float = 20.0
    web_ping_timeout: float = 20.0


class TokenBucket:
    """rate tokens a second, at most burst banked; each line takes one."""

    __slots__ = ("_burst", "_rate", "_tokens", "_updated")

    def __init__(self, rate: float, burst: int, now: float) -> None:
        self._rate = rate
        self._burst = burst
        # A newcomer may send its !Join and then paste a whole burst at once.
        self._tokens = burst + 1.0
        self._updated = now  # when _tokens was last topped up

    def seconds_until_token(self, now: float) -> float:
        """0 if a line may go now, else how long until one may."""
        if self._tokens < self._burst:  # never clamp a newcomer's extra token away
            self._tokens = min(self._burst, self._tokens + (now - self._updated) * self._rate)
        self._updated = now
        return 0.0 if self._tokens >= 1 else (1 - self._tokens) / self._rate

    def take(self) -> None:
        self._tokens -= 1


LOOPBACK = "loopback"


def address_key(ip: str, ipv6_prefix: int) -> str:
    """Whose connections are counted together against --max-per-ip: every loopback address is
    this one machine (127.0.0.2 is not someone else, nor is ::1), an IPv6 address counts by its
    /ipv6_prefix network, an IPv4 address by itself."""
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:  # not an address (a scoped IPv6 address on Python 3.8, say): itself
        return ip
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    if address.is_loopback:
        return LOOPBACK
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, ipv6_prefix), strict=False))
    return str(address)


# Wrong passwords from one address (all of loopback is one, as for --max-per-ip): each one in
# the window answers the next more slowly, and past the last the address is refused for a
# while. InspIRCd and ngircd refuse after a few failures; three leaves room for two typos.
PASSWORD_FAILURES = 3
PASSWORD_FAILURE_WINDOW_SECONDS = 60.0
PASSWORD_LOCKOUT_SECONDS = 60.0
# The n-th wrong password in the window is answered (n - 1) times this late.
PASSWORD_DELAY_STEP_SECONDS = 1.0
# Addresses remembered, so that a spread of addresses cannot grow the table without bound;
# the one that failed longest ago is forgotten first.
PASSWORD_ADDRESSES = 4096


class PasswordFailures:
    """Wrong passwords per address, and who is refused for them. Pure: time is an argument."""

    def __init__(
        self,
        failures: int = PASSWORD_FAILURES,
        window: float = PASSWORD_FAILURE_WINDOW_SECONDS,
        lockout: float = PASSWORD_LOCKOUT_SECONDS,
        delay_step: float = PASSWORD_DELAY_STEP_SECONDS,
        addresses: int = PASSWORD_ADDRESSES,
    ) -> None:
        self._failures = failures
        self._window = window
        self._lockout = lockout
        self._delay_step = delay_step
        self._addresses = addresses
        # address → (failures in the window, when the window began, refused until): in the
        # order they last failed, so the first is the one to forget.
        self._table: dict[str, tuple[int, float, float]] = {}

    def __len__(self) -> int:
        return len(self._table)

    def is_refused(self, address: str, now: float) -> bool:
        entry = self._table.get(address)
        return entry is not None and now < entry[2]

    def record_failure(self, address: str, now: float) -> float:
        """Counts a wrong password; gives how long to wait before answering it."""
        count, since, _ = self._table.pop(address, (0, now, 0.0))
        if now - since > self._window:
            count, since = 0, now
        count += 1
        refused_until = now + self._lockout if count >= self._failures else 0.0
        self._table[address] = (count, since, refused_until)
        while len(self._table) > self._addresses:
            del self._table[next(iter(self._table))]
        return (count - 1) * self._delay_step
