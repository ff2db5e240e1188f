"""chatroom_limits without sockets: the token bucket, at its burst and one line over."""

from __future__ import annotations

import pytest

from chatroom.limits import Limits, TokenBucket


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
