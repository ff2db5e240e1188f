"""The bridge's messages and presence, sans-IO: no Redis, no sockets, time passed in."""

from __future__ import annotations

import json

import pytest

from chatroom import bridge, protocol, remote

A, B = "1.2.3.4:5", "[::1]:6"


def pair() -> tuple[bridge.Bridge, bridge.Bridge]:
    return bridge.Bridge("one", timeout=8.0), bridge.Bridge("two", timeout=8.0)


def test_every_event_goes_across_as_it_was() -> None:
    one, two = pair()
    two.receive(one.hello([], ask=False), now=0.0)  # two has heard of one: no gap below
    events: list[remote.Event] = [
        remote.MemberJoined(A, "ann"),
        remote.MemberJoined(B, None),
        remote.MemberRenamed(A, "anna"),
        remote.MemberRenamed(A, None),
        remote.MemberSaid(A, "ann", "hi 👋", False),
        remote.MemberSaid(B, None, "waves", True),
        remote.PrivateMessage(A, B, "two", "psst"),
        remote.MemberLeft(A, protocol.REASON_QUIT),
    ]
    for event in events:
        assert two.receive(one.encode(event, now=1.0), now=1.0) == [bridge.FromServer("one", event)]


def test_a_server_drops_its_own_echo_and_its_link_is_overdue_without_one() -> None:
    one = bridge.Bridge("one", timeout=8.0, heartbeat=2.0)
    assert not one.echo_overdue(100.0)  # no link, no deadline
    one.link_up(10.0)
    assert one.next_deadline() == 12.0  # the first heartbeat
    assert one.receive(one.heartbeat(), now=11.0) == []  # its own echo: nothing to do
    assert not one.echo_overdue(18.9)
    assert one.echo_overdue(19.0)  # 8 s after the last echo: Redis is hung or the link gone
    one.link_down()
    assert not one.echo_overdue(30.0)
    assert one.next_deadline() is None


def test_heartbeats_are_due_every_interval_while_the_link_is_up() -> None:
    one = bridge.Bridge("one", heartbeat=2.0)
    assert not one.beat_due(5.0)  # not up
    one.link_up(10.0)
    assert not one.beat_due(11.9)
    assert one.beat_due(12.0)
    assert not one.beat_due(13.9)
    assert one.beat_due(14.5)
    assert one.next_deadline() == 16.5


def test_rosters_are_asked_for_at_most_once_a_heartbeat() -> None:
    one = bridge.Bridge("one", heartbeat=2.0)
    one.link_up(10.0)
    assert one.may_ask(10.0)  # on joining
    assert not one.may_ask(10.5)  # a gap at once after: put off ...
    assert one.ask_pending
    assert one.beat_due(12.0)  # ... to the next beat, which asks
    assert one.may_ask(12.0)
    assert not one.ask_pending


def test_asks_for_rosters_are_answered_at_most_once_a_heartbeat() -> None:
    one = bridge.Bridge("one", heartbeat=2.0)
    one.link_up(10.0)
    assert one.may_answer(10.0)
    assert not one.may_answer(10.5)  # asked again at once: put off ...
    assert one.answer_pending
    assert one.beat_due(12.0)  # ... to the next beat, which answers
    assert one.may_answer(12.0)
    assert not one.answer_pending


def test_a_private_message_for_another_server_is_not_this_ones() -> None:
    one, two = pair()
    two.receive(one.hello([], ask=False), now=0.0)
    message = remote.PrivateMessage(A, B, "three", "not for two")
    assert two.receive(one.encode(message, now=0.0), now=0.0) == []


def test_a_gap_in_the_numbers_is_reported_and_old_numbers_are_dropped() -> None:
    one, two = pair()
    first = one.encode(remote.MemberJoined(A, None), now=0.0)
    assert two.receive(first, now=0.0) == [
        bridge.Gap("one", 0),  # never heard of: its roster is wanted
        bridge.FromServer("one", remote.MemberJoined(A, None)),
    ]
    one.heartbeat()  # lost on the way
    one.heartbeat()
    said = remote.MemberSaid(A, None, "x", False)
    assert two.receive(one.encode(said, now=0.0), now=0.0) == [
        bridge.Gap("one", 2),
        bridge.FromServer("one", said),
    ]
    assert two.receive(first, now=0.0) == []  # once only


def test_a_forged_number_far_ahead_does_not_mute_the_real_server() -> None:
    """Anyone can publish a message with another server's id and a huge number: taken
    first, it made every later real message look old, so that server's members were heard
    no more, while its heartbeats kept it alive."""
    one, two = pair()
    two.receive(one.hello([], ask=False), now=0.0)
    forged = {"s": "one", "n": 10**15, "t": "beat"}
    assert two.receive(json.dumps(forged).encode(), now=1.0) == [bridge.Gap("one", 10**15 - 2)]
    said = remote.MemberSaid(A, None, "still heard", False)
    assert two.receive(one.encode(said, now=2.0), now=2.0) == [
        bridge.Gap("one", 0),  # its numbering starts over: its roster is wanted again
        bridge.FromServer("one", said),
    ]
    assert two.receive(one.encode(said, now=3.0), now=3.0) == [bridge.FromServer("one", said)]


def test_the_servers_known_are_bounded() -> None:
    """Anyone can publish under new server ids: 300,000 of them cost a server 48 MiB and
    a 1.3 s stall when they all went silent at once. Past the bound, a new one is refused."""
    two = bridge.Bridge("two", max_servers=3)
    for server in ("a", "b", "c"):
        assert two.receive(json.dumps({"s": server, "n": 1, "t": "beat"}).encode(), now=0.0)
    with pytest.raises(bridge.BadMessage, match="over 3 servers"):
        two.receive(b'{"s": "d", "n": 1, "t": "beat"}', now=0.0)
    two.receive(b'{"s": "a", "n": 2, "t": "bye"}', now=1.0)
    assert two.receive(b'{"s": "d", "n": 1, "t": "beat"}', now=1.0) == [bridge.Gap("d", 0)]


def test_a_roster_from_a_new_server_is_no_gap() -> None:
    one, two = pair()
    hello = one.hello([(A, "ann"), (B, None)], ask=True)
    assert two.receive(hello, now=0.0) == [bridge.Roster("one", [(A, "ann"), (B, None)], True)]


def test_a_silent_server_is_gone_after_the_timeout_and_a_goodbye_at_once() -> None:
    one, two = pair()
    two.receive(one.heartbeat(), now=0.0)
    assert two.next_expiry() == 8.0
    two.receive(one.heartbeat(), now=5.0)
    assert two.gone(12.9) == []
    assert two.gone(13.0) == [bridge.ServerGone("one")]
    assert two.next_expiry() is None
    # Forgotten: heard from again, it is a server never heard of, whose roster is wanted.
    assert two.receive(one.heartbeat(), now=20.0) == [bridge.Gap("one", 0)]
    assert two.receive(one.goodbye(), now=21.0) == [bridge.ServerGone("one")]
    assert two.receive(one.heartbeat(), now=22.0) == [bridge.Gap("one", 0)]


def test_text_from_another_server_is_sanitised_and_capped() -> None:
    two = bridge.Bridge("two", max_line=64)
    message = {"s": "evil", "n": 1, "t": "say", "m": A, "text": "\x1b[2J\u202e" + "é" * 100}
    (_, item) = two.receive(json.dumps({**message, "act": False}).encode(), now=0.0)
    assert isinstance(item, bridge.FromServer) and isinstance(item.event, remote.MemberSaid)
    text = item.event.text
    assert text.startswith("\ufffd[2J\ufffd")
    assert len(text.encode()) <= 3 * 64  # as a local line of 64 bytes, each one U+FFFD
    assert protocol.sanitize(text) == text


def test_an_unknown_reason_is_connection_lost() -> None:
    two = bridge.Bridge("two")
    message = {"s": "x", "n": 1, "t": "leave", "m": A, "reason": "pwned\x1b"}
    (_, item) = two.receive(json.dumps(message).encode(), now=0.0)
    assert item == bridge.FromServer("x", remote.MemberLeft(A, protocol.REASON_LOST))


@pytest.mark.parametrize(
    "payload",
    [
        b"",
        b"not json",
        b"\xff\xfe",
        b"[1]",
        b"[" * 100_000,
        b'{"n": 1, "t": "beat"}',
        b'{"s": "", "n": 1, "t": "beat"}',
        b'{"s": "a b", "n": 1, "t": "beat"}',
        b'{"s": "x", "n": true, "t": "beat"}',
        b'{"s": "x", "n": "1", "t": "beat"}',
        b'{"s": "x", "n": 1}',
        b'{"s": "x", "n": 1, "t": "dance"}',
        b'{"s": "x", "n": 1, "t": "join", "m": "alice"}',
        b'{"s": "x", "n": 1, "t": "join", "m": "1.2.3.4:5 fake"}',
        b'{"s": "x", "n": 1, "t": "join", "m": "1.2.3.4:5", "name": "no spaces"}',
        b'{"s": "x", "n": 1, "t": "join", "m": "1.2.3.4:5", "name": 7}',
        b'{"s": "x", "n": 1, "t": "say", "m": "1.2.3.4:5", "text": ["x"], "act": false}',
        b'{"s": "x", "n": 1, "t": "say", "m": "1.2.3.4:5", "text": "x"}',
        b'{"s": "x", "n": 1, "t": "msg", "m": "1.2.3.4:5", "to": "nobody", "on": "y", "text": "x"}',
        b'{"s": "x", "n": 1, "t": "hello", "members": "all", "ask": false}',
        b'{"s": "x", "n": 1, "t": "hello", "members": [["1.2.3.4:5"]], "ask": false}',
        b'{"s": "x", "n": 1, "t": "hello", "members": [], "ask": 1}',
    ],
)
def test_a_bad_message_is_refused(payload: bytes) -> None:
    with pytest.raises(bridge.BadMessage):
        bridge.Bridge("two").receive(payload, now=0.0)


def test_a_message_over_the_limit_is_refused_before_it_is_parsed() -> None:
    two = bridge.Bridge("two", max_message=100)
    with pytest.raises(bridge.BadMessage, match="over 100"):
        two.receive(b"{" + b" " * 200 + b"}", now=0.0)


def test_the_history_is_read_from_the_say_messages_and_bad_records_skipped() -> None:
    one, two = pair()
    said = one.encode(remote.MemberSaid(A, "ann", "hi", False), now=1700000000.0)
    acted = one.encode(remote.MemberSaid(B, None, "nods", True), now=1700000001.0)
    assert two.history([said, b"junk", acted, b"{}"]) == [
        remote.HistoryEntry(1700000000.0, A, "ann", "hi", False),
        remote.HistoryEntry(1700000001.0, B, None, "nods", True),
    ]


@pytest.mark.parametrize("at", ["1e300", "-1e300", "NaN", "Infinity", "1e17", "-1.5"])
def test_a_history_record_dated_out_of_any_clock_s_range_is_skipped(at: str) -> None:
    """Each newcomer is shown the history with its times: a date time.localtime cannot
    take would fail every join on every server that read it."""
    one, two = pair()
    said = one.encode(remote.MemberSaid(A, "ann", "hi", False), now=1700000000.0)
    forged = said.replace(b'"at":1700000000.0', b'"at":' + at.encode())
    assert forged != said
    entries = two.history([forged, said])
    assert entries == [remote.HistoryEntry(1700000000.0, A, "ann", "hi", False)]
    for entry in entries:
        protocol.history_line(entry.said_at, b"hi\n")  # raises for a date out of range


def test_redis_urls() -> None:
    redis_link = pytest.importorskip("chatroom.redis_link")
    parse = redis_link.parse_redis_url
    assert parse("redis://127.0.0.1:6400/2") == redis_link.RedisAddress("127.0.0.1", 6400, 2)
    assert parse("redis://localhost") == redis_link.RedisAddress("localhost", 6379, 0)
    assert parse("redis://[::1]:7000") == redis_link.RedisAddress("::1", 7000, 0)
    with_user = parse("redis://bot:p%40ss@h:1/2")
    assert with_user == redis_link.RedisAddress("h", 1, 2, "bot", "p@ss")
    assert with_user.auth() == ("AUTH", "bot", "p@ss")
    assert parse("redis://:pw@h").auth() == ("AUTH", "pw")
    assert "pw" not in str(parse("redis://:pw@h")) + repr(parse("redis://:pw@h"))
    with pytest.raises(ValueError) as refused:
        parse("redis://:hunter2@h:99999")
    assert "hunter2" not in str(refused.value)
    for bad in ("http://h:1", "redis://", "redis://h:1/x", "redis://h:1/0?a=b", "redis://h:0x"):
        with pytest.raises(ValueError):
            parse(bad)
