"""chatroom.limits without sockets: the token bucket at its burst and one line over, and whose
connections count together against the per-address cap."""

from __future__ import annotations

import pytest

from chatroom.limits import LOOPBACK, Limits, PasswordFailures, TokenBucket, address_key


def lines_allowed(bucket: TokenBucket, now: float, wanted: int) -> int:
    sent = 0
    while sent < wanted and bucket.seconds_until_token(now) == 0:
        bucket.take()
        sent += 1
    return sent


def test_a_newcomer_may_join_then_send_a_whole_burst_and_no_more() -> None:
    bucket = TokenBucket(rate=2, burst=20, now=100.0)
    assert lines_allowed(bucket, 100.0, 100) == 21  # the !Join, then the burst
    assert bucket.seconds_until_token(100.0) == pytest.approx(0.5)


def test_tokens_come_back_at_the_rate_and_never_past_the_burst() -> None:
    bucket = TokenBucket(rate=2, burst=20, now=0.0)
    lines_allowed(bucket, 0.0, 100)
    assert lines_allowed(bucket, 1.0, 100) == 2
    assert bucket.seconds_until_token(1.25) == pytest.approx(0.25)
    assert lines_allowed(bucket, 1000.0, 100) == 20


def test_the_defaults_follow_the_issue() -> None:
    limits = Limits()
    assert (limits.flood_burst, limits.flood_rate) == (20, 2.0)
    assert (limits.sendq_soft, limits.sendq_hard, limits.sendq_total) == (
        256 * 1024,
        1024 * 1024,
        64 * 1024 * 1024,
    )
    assert (limits.max_line, limits.join_timeout, limits.line_timeout) == (4096, 60.0, 30.0)


@pytest.mark.parametrize(
    ("ip", "key"),
    [
        ("127.0.0.1", LOOPBACK),
        ("127.0.0.2", LOOPBACK),  # not someone else: the same machine
        ("127.255.3.9", LOOPBACK),
        ("::1", LOOPBACK),
        ("::ffff:127.0.0.1", LOOPBACK),
        ("192.168.1.20", "192.168.1.20"),
        ("::ffff:192.168.1.20", "192.168.1.20"),
        ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff:ffff:ffff:ffff", "2001:db8:1:2::/64"),  # the same subscriber
        ("2001:db8:1:3::1", "2001:db8:1:3::/64"),
        ("not an address", "not an address"),
    ],
)
def test_addresses_are_counted_together_by_machine_and_by_ipv6_network(ip: str, key: str) -> None:
    assert address_key(ip, 64) == key


def test_the_ipv6_prefix_is_a_setting() -> None:
    assert address_key("2001:db8:1:2:aaaa::1", 48) == "2001:db8:1::/48"
    assert address_key("2001:db8:1:2:aaaa::1", 128) == "2001:db8:1:2:aaaa::1/128"


def test_wrong_passwords_are_answered_ever_later_then_the_address_is_refused_for_a_while() -> None:
    failures = PasswordFailures(failures=3, window=60, lockout=60, delay_step=1)
    assert [failures.record_failure("10.0.0.1", now) for now in (0.0, 1.0, 2.0)] == [0, 1, 2]
    assert failures.is_refused("10.0.0.1", 2.0)
    assert failures.is_refused("10.0.0.1", 61.9)
    assert not failures.is_refused("10.0.0.1", 62.0)
    assert not failures.is_refused("10.0.0.2", 2.0)  # another address is not touched
    assert failures.record_failure("10.0.0.1", 70.0) == 0  # a new window


def test_failures_spread_over_more_than_the_window_never_lock_an_address_out() -> None:
    failures = PasswordFailures(failures=3, window=60, lockout=60)
    for now in (0.0, 50.0, 100.0, 150.0, 200.0):
        failures.record_failure("10.0.0.1", now)
        assert not failures.is_refused("10.0.0.1", now)


def test_the_failure_table_forgets_the_oldest_address_past_its_size() -> None:
    failures = PasswordFailures(failures=1, addresses=3)
    for n in range(5):
        failures.record_failure(f"10.0.0.{n}", 0.0)
    assert len(failures) == 3
    assert not failures.is_refused("10.0.0.0", 1.0)  # forgotten, so no longer refused
    assert failures.is_refused("10.0.0.4", 1.0)
