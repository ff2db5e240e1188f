"""One room on three servers through a real redis-server: chat, names, /msg and /who across
servers, a server's death, Redis' death and return, a hung Redis, hostile messages on the
room's channel, and the bounded queue to Redis."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from .conftest import (
    WAIT_SECONDS,
    Member,
    Program,
    Room,
    Server,
    closed_port,
    python_script,
    rss_bytes,
    wait_for,
)

if TYPE_CHECKING:
    import hiredis

pytestmark = [
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="redis-server not installed"),
    pytest.mark.timeout(90),
]
pytest.importorskip("hiredis")

# Short heartbeats, so a test sees a server die in about a second and a half.
FAST = ("--redis-heartbeat", "0.25", "--redis-timeout", "1.5")

SPLIT = "* The room is split"
WHOLE = "* The room is whole again"


def start_redis(room: Room, port: int, *args: str) -> Program:
    """A redis-server of the test's own on a loopback port, saving nothing."""
    where = ["--port", str(port), "--bind", "127.0.0.1"]
    redis = room.run(["redis-server", *where, "--save", "", "--appendonly", "no", *args])
    redis.stdout.expect("Ready to accept connections")
    return redis


def redis_command(port: int, *words: bytes) -> bytes:
    """One command over a raw socket, as redis-cli would send it; its reply's first bytes."""
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_SECONDS) as sock:
        parts = [b"*%d\r\n" % len(words)]
        parts += [b"$%d\r\n%s\r\n" % (len(word), word) for word in words]
        sock.sendall(b"".join(parts))
        return sock.recv(65536)


class Cluster:
    """A Redis and servers sharing one room on it, all cleaned up by the Room fixture."""

    def __init__(self, room: Room) -> None:
        self._room = room
        self.port = closed_port()  # Redis', the same after a restart
        self.redis = start_redis(room, self.port)

    def restart_redis(self) -> None:
        self.redis = start_redis(self._room, self.port)

    def publish(self, payload: bytes) -> None:
        """Anyone who can reach Redis can publish on the room's channel."""
        redis_command(self.port, b"PUBLISH", b"chatroom:0:chatroom", payload)

    def server(self, *args: str) -> Server:
        server = self._room.server("--redis", f"redis://127.0.0.1:{self.port}", *args)
        server.stderr.expect("joined the room on")
        return server

    def member(self, server: Server, name: str) -> Member:
        member = self._room.member(server.port)
        member.say(f"!Join {name}")
        member.label = member.expect("Welcome").split()[2].rstrip(".")
        return member


@pytest.fixture
def cluster(room: Room) -> Iterator[Cluster]:
    yield Cluster(room)


def three_servers(cluster: Cluster, *args: str) -> tuple[list[Server], list[Member]]:
    """Three servers and a member on each (ann, ben, cat), each member having seen the
    later ones join."""
    servers = [cluster.server(*FAST, *args) for _ in range(3)]
    members: list[Member] = []
    for server, name in zip(servers, ("ann", "ben", "cat")):
        newcomer = cluster.member(server, name)
        for member in members:
            member.expect(f"* {newcomer.label} joined")
        members.append(newcomer)
    return servers, members


def test_three_servers_are_one_room(cluster: Cluster) -> None:
    _, (ann, ben, cat) = three_servers(cluster)
    assert cat.lines[0].endswith("Others here: 2")
    ann.say("hello from one")
    assert ben.expect("hello from one") == f"[{ann.label}] hello from one"
    assert cat.expect("hello from one") == f"[{ann.label}] hello from one"
    cat.say("/me waves")
    assert ann.expect("waves") == f"[{cat.label}] * waves"
    ben.say("/nick bob")
    assert ben.expect("You are now") == f"* You are now bob@{ben.member_id}"
    assert ann.expect(" is now ") == f"* {ben.label} is now bob@{ben.member_id}"
    cat.expect(f"is now bob@{ben.member_id}")
    ben.label = f"bob@{ben.member_id}"
    ann.say("/msg BOB just for you")
    assert ben.expect("just for you") == f"[{ann.label} (private)] just for you"
    assert ann.expect("Private to") == f"* Private to {ben.label}: just for you"
    ben.say(f"/msg {cat.member_id} by address")
    assert cat.expect("by address") == f"[{ben.label} (private)] by address"
    cat.say("/who")
    who = cat.expect("here:")
    assert who.startswith("* 3 here: ")
    for member in (ann, ben):
        assert member.label + " (on " in who
    assert cat.label in who
    cat.say("/nick ANN")
    assert cat.expect("ERROR") == "ERROR :Name taken: ANN"
    # Nothing said twice: the chat line reached each member once.
    assert ben.lines.count(f"[{ann.label}] hello from one") == 1


def test_lines_keep_each_senders_order(cluster: Cluster) -> None:
    _, (ann, ben, cat) = three_servers(cluster, "--flood-rate", "0")
    for i in range(200):
        ann.say(f"a{i}")
        cat.say(f"c{i}")
    got = [ben.read_line() for _ in range(400)]
    assert [line for line in got if line.startswith(f"[{ann.label}]")] == [
        f"[{ann.label}] a{i}" for i in range(200)
    ]
    assert [line for line in got if line.startswith(f"[{cat.label}]")] == [
        f"[{cat.label}] c{i}" for i in range(200)
    ]


def test_history_is_the_rooms(cluster: Cluster) -> None:
    one, two = cluster.server(*FAST), cluster.server(*FAST)
    ann = cluster.member(one, "ann")
    ann.say("said on one")
    ann.say("/me hums")
    cluster.member(two, "watcher").expect("* hums")  # server two has had both lines
    ben = cluster.member(two, "ben")
    assert ben.expect("History:") == "* History: 2 lines said before you came"
    assert ben.read_line().endswith(f"[{ann.label}] said on one")
    assert ben.read_line().endswith(f"[{ann.label}] * hums")
    # A server started later reads the history from Redis.
    carl = cluster.member(cluster.server(*FAST), "carl")
    carl.expect("History: 2 lines")


def test_a_history_record_too_big_to_read_is_skipped_not_a_wedge(cluster: Cluster) -> None:
    said = {"s": "far", "n": 1, "t": "say", "m": "6.6.6.6:6", "name": None, "act": False}
    good = json.dumps({**said, "text": "kept", "at": 0.0}).encode()
    # Over the most a reply may hold (20,000 + 20 history lines of 13,312 bytes each) and
    # over what one read takes beyond it.
    huge = padded({**said, "text": "too big", "at": 0.0}, 1_000_000)
    for record in (good, huge):
        redis_command(cluster.port, b"RPUSH", b"chatroom:chatroom:history", record)
    server = cluster.server(*FAST, "--redis-max-message", "20000")
    ann = cluster.member(server, "ann")
    assert ann.expect("History:") == "* History: 1 line said before you came"
    assert ann.read_line().endswith("[6.6.6.6:6] kept")


def test_a_redis_down_for_many_tries_is_one_log_line(room: Room) -> None:
    port = closed_port()
    with socket.create_server(("127.0.0.1", port)) as fake:  # takes a connection, then closes it
        fake.settimeout(WAIT_SECONDS)
        early = room.server("--redis", f"redis://127.0.0.1:{port}", *FAST)
        for _ in range(8):  # four tries of two connections each
            fake.accept()[0].close()
    start_redis(room, port)
    early.stderr.expect("joined the room on", timeout=30)
    assert sum("Redis link down" in line for line in early.stderr.lines) == 1


def test_a_redis_that_refuses_scripts_is_joined_without_history(room: Room) -> None:
    port = closed_port()
    start_redis(room, port, "--user", "default", "on", "nopass", "~*", "&*", "+@all", "-eval")
    server = room.server("--redis", f"redis://127.0.0.1:{port}", *FAST)
    server.stderr.expect("history not read")
    server.stderr.expect("joined the room on")


def test_names_taken_at_once_on_two_servers_stay_unique(cluster: Cluster) -> None:
    one, two = cluster.server(*FAST), cluster.server(*FAST)
    a, b = cluster.member(one, "a1"), cluster.member(two, "b1")
    a.expect(f"* {b.label} joined")
    a.send("/nick same\n")
    b.send("/nick same\n")  # both granted at once, each by its own server

    def holders(member: Member) -> list[str]:
        return [label for label in _who(member).split(": ", 1)[1].split(", ") if "same@" in label]

    def settled() -> bool:
        seen_a, seen_b = holders(a), holders(b)
        return len(seen_a) == 1 and [h.split(" (on")[0] for h in seen_b] == [
            h.split(" (on")[0] for h in seen_a
        ]

    wait_for(settled, "one holder of the name, the same on both servers")


def test_a_name_held_by_a_dead_server_s_member_goes_to_its_live_claimant(
    cluster: Cluster,
) -> None:
    """A server killed and restarted: its old member's name is still held elsewhere until the
    old server times out, and a new member who took the name on the new server (which never
    heard of the old one) lost it there, for good: each server named it differently."""
    two = cluster.server(*FAST)
    ben = cluster.member(two, "ben")
    # The dead server's member, announced once: server "0" sorts first, so its claim wins.
    ghost = {"s": "0", "n": 1, "t": "hello", "members": [["6.6.6.6:6", "ann"]], "ask": False}
    cluster.publish(json.dumps(ghost).encode())
    ben.expect("* ann@6.6.6.6:6 joined")
    one = cluster.server(*FAST)  # started after: it never hears of server "0"
    ann = cluster.member(one, "ann")
    assert ann.label == f"ann@{ann.member_id}"
    ben.expect(f"* {ann.member_id} joined")  # here the name is still the ghost's
    ben.expect("* ann@6.6.6.6:6 left (connection lost)")
    assert ben.expect(" is now ") == f"* {ann.member_id} is now ann@{ann.member_id}"


def test_a_killed_server_s_members_leave_elsewhere(cluster: Cluster) -> None:
    servers, (ann, ben, cat) = three_servers(cluster)
    servers[1].proc.send_signal(signal.SIGKILL)
    started = time.monotonic()
    assert ann.expect("left") == f"* {ben.label} left (connection lost)"
    cat.expect(f"* {ben.label} left (connection lost)")
    assert time.monotonic() - started < 5  # --redis-timeout 1.5
    cat.say("/nick ben")  # the dead member's name is free again
    cat.expect("You are now ben@")


def test_default_timeout_reports_a_killed_server_within_15_s(cluster: Cluster) -> None:
    one, two = cluster.server(), cluster.server()
    ann, ben = cluster.member(one, "ann"), cluster.member(two, "ben")
    ann.expect(f"* {ben.label} joined")
    two.proc.send_signal(signal.SIGKILL)
    started = time.monotonic()
    assert ann.expect("left", timeout=15) == f"* {ben.label} left (connection lost)"
    assert time.monotonic() - started <= 15


def test_redis_dies_and_returns(cluster: Cluster) -> None:
    servers, (ann, ben, cat) = three_servers(cluster, "--flood-rate", "0")
    ann2 = cluster.member(servers[0], "ann2")
    ann.expect(f"{ann2.label} joined")
    pid = servers[0].proc.pid
    cluster.redis.stop()
    for member in (ann, ann2, ben, cat):
        member.expect(SPLIT)
    # Local chat goes on, with no pause and nothing lost, and memory stays put.
    baseline = rss_bytes(pid)
    for i in range(300):
        ann.say(f"local {i}")
        assert ann2.expect(f"local {i}", timeout=2) == f"[{ann.label}] local {i}"
    assert rss_bytes(pid) < baseline + 8 * 1024 * 1024
    cluster.restart_redis()
    for member in (ann, ann2, ben, cat):
        member.expect(WHOLE, timeout=30)
    # Whole again: the others come back and are heard, and nobody was told twice.
    wait_for(lambda: _who(ben).startswith("* 4 here"), "the room healed", timeout=30)
    ann.say("after the storm")
    assert cat.expect("after the storm") == f"[{ann.label}] after the storm"
    for member in (ann, ann2, ben, cat):
        assert sum(line.startswith(SPLIT) for line in member.lines) == 1
        assert sum(line == WHOLE for line in member.lines) == 1
    lines = [line for line in ann2.lines if line.startswith(f"[{ann.label}] local ")]
    assert lines == [f"[{ann.label}] local {i}" for i in range(300)]
    # A server started now joins the same room, and so do its members.
    dan = cluster.member(cluster.server(*FAST), "dan")
    ann.expect(f"* {dan.label} joined")
    wait_for(lambda: _who(dan).startswith("* 5 here"), "the newcomer sees the whole room")


def test_a_server_redis_drops_for_reading_too_slowly_comes_back_whole(cluster: Cluster) -> None:
    # Redis cuts a subscriber whose output passes its pub/sub buffer limit (32 MiB by default;
    # 256 KiB here, so the test need not send much): the server must notice and resynchronise.
    limit = b"pubsub 262144 131072 1"
    assert redis_command(cluster.port, b"CONFIG", b"SET", b"client-output-buffer-limit", limit)
    one, two = cluster.server(*FAST, "--flood-rate", "0"), cluster.server(*FAST)
    ann, ben = cluster.member(one, "ann"), cluster.member(two, "ben")
    ann.expect(f"* {ben.label} joined")
    two.proc.send_signal(signal.SIGSTOP)
    try:
        text = "z" * 4000
        for i in range(2500):  # 10 MB: past the kernel's buffers and Redis' limit
            ann.say(f"{i} {text}")
        ann.expect(f"{ben.label} left (connection lost)")
    finally:
        two.proc.send_signal(signal.SIGCONT)
    ben.expect(SPLIT, timeout=20)
    ben.expect(WHOLE, timeout=30)
    ann.expect(f"* {ben.label} joined", timeout=30)
    ann.say("caught up")
    assert ben.expect("caught up") == f"[{ann.label}] caught up"


def _who(member: Member) -> str:
    member.say("/who")
    return member.expect("here:")


def test_a_server_started_before_redis_serves_its_own_and_joins_the_room_later(
    room: Room,
) -> None:
    port = closed_port()
    early = room.server("--redis", f"redis://127.0.0.1:{port}", *FAST)
    early.stderr.expect("Redis link down")
    ann, ann2 = room.member(early.port), room.member(early.port)
    ann.join()
    ann2.join()
    ann.say("nobody else yet")
    assert ann2.expect("nobody else yet") == f"[{ann.member_id}] nobody else yet"
    start_redis(room, port)
    early.stderr.expect("joined the room on", timeout=30)
    late = room.server("--redis", f"redis://127.0.0.1:{port}", *FAST)
    late.stderr.expect("joined the room on")
    ben = room.member(late.port)
    ben.join()
    ann.expect(f"* {ben.member_id} joined")
    wait_for(lambda: _who(ben).startswith("* 3 here"), "the late server sees the early one's")


def test_a_hung_redis_is_found_and_the_room_heals(cluster: Cluster) -> None:
    _, (ann, ben, _cat) = three_servers(cluster)
    redis = cluster.redis.proc
    redis.send_signal(signal.SIGSTOP)
    try:
        started = time.monotonic()
        # Both within a few times --redis-timeout 1.5, in either order: the same timeout
        # runs out for Redis' silence and for the other servers'.
        expected = {SPLIT, f"* {ben.label} left (connection lost)"}
        seen = ann.lines[len(ann.lines) :]
        while not expected <= {
            line[: len(SPLIT)] if line.startswith(SPLIT) else line for line in seen
        }:
            seen.append(ann.read_line(timeout=6))
        assert time.monotonic() - started < 6
    finally:
        redis.send_signal(signal.SIGCONT)
    ann.expect(WHOLE, timeout=30)
    ann.expect(f"{ben.label} joined", timeout=30)
    ben.say("heard again")
    ann.expect("heard again")


def test_the_queue_to_redis_is_bounded(cluster: Cluster) -> None:
    server = cluster.server(*FAST, "--redis-queue", "65536", "--flood-rate", "0")
    ann, ann2 = cluster.member(server, "ann"), cluster.member(server, "ann2")
    ann.expect(f"{ann2.label} joined")
    redis = cluster.redis.proc
    redis.send_signal(signal.SIGSTOP)
    try:
        baseline = rss_bytes(server.proc.pid)
        text = "x" * 4000
        for i in range(1500):  # 6 MB: more than the kernel's buffers and the queue together
            ann.say(f"{i} {text}")
            if i % 100 == 99:
                ann2.expect(f"] {i} x", timeout=5)
        server.stderr.expect("queue to Redis over 65536 bytes")
        assert rss_bytes(server.proc.pid) < baseline + 16 * 1024 * 1024
    finally:
        redis.send_signal(signal.SIGCONT)


@pytest.mark.parametrize(
    "junk",
    [
        b"not json",
        b"[1, 2, 3]",
        b'{"s": "x", "n": 1}',
        b'{"s": "evil", "n": 1, "t": "say", "m": "1.2.3.4:5", "text": 5, "act": false}',
        b'{"s": "evil", "n": "1", "t": "join", "m": "1.2.3.4:5"}',
        b'{"s": "evil", "n": 1, "t": "join", "m": "me, really"}',
        b'{"s": "evil", "n": 1, "t": "hello", "members": [["1.2.3.4:5", "bad name!"]], "ask": 0}',
        b"[" * 100_000,
        b"\xff\xfe",
    ],
)
def test_junk_on_the_channel_is_logged_and_dropped(cluster: Cluster, junk: bytes) -> None:
    server = cluster.server(*FAST)
    ann = cluster.member(server, "ann")
    cluster.publish(junk)
    server.stderr.expect("bad message")
    ann.say("/who")
    assert ann.expect("here:") == f"* 1 here: {ann.label}"


def test_a_forged_server_s_members_are_bounded(cluster: Cluster) -> None:
    server = cluster.server(*FAST, "--redis-max-members", "3")
    ann = cluster.member(server, "ann")
    forged = [[f"10.6.{i // 256}.{i % 256}:6", None] for i in range(20_000)]
    cluster.publish(
        json.dumps({"s": "evil", "n": 1, "t": "hello", "members": forged, "ask": False}).encode()
    )
    assert "19997 member(s) of other servers left out" in server.stderr.expect("left out")
    ann.say("/who")
    assert ann.expect("here:").startswith("* 4 here: ")


def test_a_flood_of_forged_asks_is_answered_once_a_heartbeat(cluster: Cluster) -> None:
    """Each answer is a server's whole roster: answering every ask let a few bytes from
    anyone make every server publish its roster again and again, filling its queue to
    Redis (and dropping its members' lines for the others)."""
    import hiredis

    server = cluster.server()
    ann = cluster.member(server, "ann")
    with socket.create_connection(("127.0.0.1", cluster.port), timeout=WAIT_SECONDS) as sub:
        sub.sendall(b"*2\r\n$9\r\nSUBSCRIBE\r\n$19\r\nchatroom:0:chatroom\r\n")
        reader = hiredis.Reader()
        assert next_reply(sub, reader)[0] == b"subscribe"
        for n in range(1, 501):
            ask = {"s": "evil", "n": n, "t": "hello", "members": [], "ask": True}
            cluster.publish(json.dumps(ask).encode())
        ann.say("after the asks")
        answers = 0
        for _ in range(10_000):
            message = json.loads(next_reply(sub, reader)[2])
            if message["s"] == "evil":
                continue
            if message["t"] == "say":
                break
            answers += message["t"] == "hello"
    assert answers <= 1


def next_reply(sock: socket.socket, reader: hiredis.Reader) -> list[bytes]:
    while True:
        reply = reader.gets()
        if isinstance(reply, list):
            return reply
        data = sock.recv(65536)
        assert data, "Redis closed the connection"
        reader.feed(data)


def test_bad_messages_after_the_last_logged_are_logged_too(cluster: Cluster) -> None:
    """Bad messages are logged one line a second at most; those after the last line were
    counted, and logged only if another bad one came later, so a burst's tail went unseen."""
    server = cluster.server(*FAST)
    cluster.publish(b"first junk")
    cluster.publish(b"second junk")
    assert "dropped 1 bad message(s)" in server.stderr.expect("bad message")
    assert "dropped 1 bad message(s)" in server.stderr.expect("bad message", timeout=5)


def test_hostile_text_from_redis_is_sanitised_and_capped(cluster: Cluster) -> None:
    server = cluster.server(*FAST)
    ann = cluster.member(server, "ann")
    text = "\x1b[2Jhi" + "y" * 10_000
    message = {"s": "evil", "n": 1, "t": "say", "m": "6.6.6.6:6", "name": None, "text": text}
    payload = json.dumps({**message, "act": False, "at": 0.0}).encode()
    cluster.publish(payload)
    line = ann.expect("6.6.6.6:6")
    assert line.startswith("[6.6.6.6:6] \ufffd[2Jhi")
    assert len(line.encode()) < 3 * 4096 + 64  # a local line's most, once sanitised


def test_a_huge_reply_cuts_the_link_not_the_server(cluster: Cluster) -> None:
    server = cluster.server(*FAST)
    ann = cluster.member(server, "ann")
    cluster.publish(b"z" * (3 * 1024 * 1024))
    server.stderr.expect("Redis link down")
    ann.expect(SPLIT)
    ann.expect(WHOLE, timeout=30)


def padded(message: dict[str, object], size: int) -> bytes:
    """The message as JSON of exactly size bytes (blanks before its closing brace)."""
    payload = json.dumps(message).encode()
    return payload[:-1] + b" " * (size - len(payload)) + b"}"


def test_a_message_over_redis_max_message_is_logged_and_dropped(cluster: Cluster) -> None:
    server = cluster.server(*FAST, "--redis-max-message", "20000")
    ann = cluster.member(server, "ann")
    said = {"s": "far", "t": "say", "m": "6.6.6.6:6", "name": None, "act": False, "at": 0.0}
    cluster.publish(padded({**said, "n": 1, "text": "at the limit"}, 20000))
    assert ann.expect("at the limit") == "[6.6.6.6:6] at the limit"
    cluster.publish(padded({**said, "n": 2, "text": "one over"}, 20001))
    server.stderr.expect("20001 bytes, over 20000")
    cluster.publish(padded({**said, "n": 3, "text": "still here"}, 100))
    assert ann.expect("6.6.6.6:6") == "[6.6.6.6:6] still here"  # nothing between, no split


def test_redis_max_message_must_hold_a_line() -> None:
    done = subprocess.run(
        python_script("chatroom_server.py", "--port", "0", "--redis-max-message", "5000"),
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )
    assert done.returncode == 2
    assert "--redis-max-message must hold a whole line: at least 13312 bytes" in done.stderr


def test_redis_without_hiredis_says_how_to_install_it(tmp_path: Path) -> None:
    (tmp_path / "hiredis.py").write_text("raise ImportError('No module named hiredis')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    done = subprocess.run(
        python_script("chatroom_server.py", "--port", "0", "--redis", "redis://127.0.0.1:1"),
        env=env,
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1
    assert "pip install 'chatroom[redis]'" in lines[0]


def test_a_redis_with_a_password(room: Room) -> None:
    port = closed_port()
    start_redis(room, port, "--requirepass", "s3cret/!")
    wrong = room.server("--redis", f"redis://:nope@127.0.0.1:{port}", *FAST)
    assert "nope" not in wrong.stderr.expect("Redis link down")
    one = room.server("--redis", f"redis://:s3cret%2F%21@127.0.0.1:{port}", *FAST)
    two = room.server("--redis", f"redis://default:s3cret%2F%21@127.0.0.1:{port}/3", *FAST)
    for server in (one, two):
        server.stderr.expect("joined the room on")
    ann, ben = room.member(one.port), room.member(two.port)
    ann.join()
    ben.join()
    # Database 3 and database 0 are two rooms, though pub/sub knows no databases.
    ben.say("/who")
    assert ben.expect("here:") == f"* 1 here: {ben.member_id}"


@pytest.mark.parametrize(
    "url", ["http://127.0.0.1:6379", "redis://", "redis://h:99999", "redis://h/x"]
)
def test_a_bad_redis_url_is_one_line(url: str) -> None:
    done = subprocess.run(
        [sys.executable, "-u", "chatroom_server.py", "--port", "0", "--redis", url],
        capture_output=True,
        text=True,
        timeout=WAIT_SECONDS,
        cwd=Path(__file__).resolve().parent.parent,
    )
    assert done.returncode != 0
    assert len(done.stderr.splitlines()) == 1
    assert "--redis" in done.stderr
