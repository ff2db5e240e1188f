"""The client's options for issue 13, as real processes against the real server: --name (the
Python and the Java client), and --timestamps."""

from __future__ import annotations

import re
import time

import pytest

from . import test_any_client
from .conftest import Room, Server

# The Java client, compiled once for the session (the fixture of test_any_client.py).
java_client = test_any_client.java_client

BAD_NAME_COMPLAINT = (
    "argument --name: '9lives' is not a name: 1 to 16 ASCII letters, digits, _ or -,"
    " a letter first (see --help)"
)


def test_two_named_clients_message_privately_and_a_third_sees_nothing_of_it(
    room: Room, server: Server
) -> None:
    ann = room.client(server.port, "--name", "ann")
    ann.stdout.expect(f"* You are now ann@{ann.member_id}")
    bob = room.client(server.port, "--name", "bob")
    bob.stdout.expect(f"* You are now bob@{bob.member_id}")
    carol = room.client(server.port)
    ann.stdout.expect(f"* {carol.member_id} joined")
    ann.type_line("/msg bob the secret")
    assert bob.stdout.expect("secret") == f"[ann@{ann.member_id} (private)] the secret"
    ann.stdout.expect(f"* Private to bob@{bob.member_id}: the secret")
    ann.type_line("after the secret")
    carol.stdout.expect(f"[ann@{ann.member_id}] after the secret")
    assert not [line for line in carol.stdout.lines if "secret" in line and "after" not in line]


def test_a_taken_name_is_refused_whatever_its_case_and_the_client_stays_unnamed(
    room: Room, server: Server
) -> None:
    first = room.client(server.port, "--name", "Ann")
    first.stdout.expect(f"* You are now Ann@{first.member_id}")
    second = room.client(server.port, "--name", "ann")
    second.stdout.expect("ERROR :Name taken: ann")
    second.type_line("still here")
    first.stdout.expect(f"[{second.member_id}] still here")
    assert not [line for line in second.stdout.lines if "You are now" in line]
    assert second.proc.poll() is None


def test_a_bad_name_is_one_line_and_exit_2(room: Room) -> None:
    client = room.program("chatroom_client.py", "--name", "9lives")
    assert client.wait_exit() == 2
    assert client.stderr.wait_ended() == [f"chatroom-client: error: {BAD_NAME_COMPLAINT}"]


@pytest.mark.parametrize("client", ["python", "java"])
def test_timestamps_start_every_line_with_the_local_time(
    room: Room, server: Server, request: pytest.FixtureRequest, client: str
) -> None:
    before = time.strftime("%H:%M")
    if client == "python":
        alice = room.client(server.port, "--timestamps")
    else:
        java = request.getfixturevalue("java_client")
        alice = room.client_from([*java, "--port", str(server.port), "--timestamps"])
    bob = room.client(server.port)
    alice.stdout.expect(f"* {bob.member_id} joined")
    bob.type_line("hello")
    alice.stdout.expect(f"[{bob.member_id}] hello")
    alice.type_line("!Quit")
    assert alice.wait_exit() == 0
    after = time.strftime("%H:%M")
    lines = alice.stdout.wait_ended()
    assert [line[6:] for line in lines] == [
        f"* Welcome, {alice.member_id}. Others here: 0",
        f"* {bob.member_id} joined",
        f"[{bob.member_id}] hello",
        f"* Goodbye, {alice.member_id}",
    ]
    for line in lines:
        assert re.match(r"\d\d:\d\d ", line), line
        assert line[:5] in (before, after), line


def test_without_timestamps_lines_are_as_the_server_sent_them(room: Room, server: Server) -> None:
    alice = room.client(server.port)
    assert alice.stdout.lines[0] == f"* Welcome, {alice.member_id}. Others here: 0"


def test_the_java_client_takes_a_name_and_a_taken_one_leaves_it_joined(
    room: Room, server: Server, java_client: list[str]
) -> None:
    python = room.client(server.port, "--name", "Ann")
    python.stdout.expect(f"* You are now Ann@{python.member_id}")
    java = room.client_from([*java_client, "--port", str(server.port), "--name", "duke"])
    java.stdout.expect(f"* You are now duke@{java.member_id}")
    python.stdout.expect(f"* {java.member_id} is now duke@{java.member_id}")
    java.type_line("hello")
    python.stdout.expect(f"[duke@{java.member_id}] hello")
    taken = room.client_from([*java_client, "--port", str(server.port), "--name", "ann"])
    taken.stdout.expect("ERROR :Name taken: ann")
    taken.type_line("unnamed")
    python.stdout.expect(f"[{taken.member_id}] unnamed")


@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--name", "9lives"], BAD_NAME_COMPLAINT),
        (["--name"], "argument --name: expected one argument (see --help)"),
    ],
    ids=["bad", "missing"],
)
def test_the_java_client_refuses_a_bad_name_in_the_python_client_s_words(
    room: Room, java_client: list[str], args: list[str], complaint: str
) -> None:
    java = room.run([*java_client, *args])
    python = room.program("chatroom_client.py", *args)
    assert java.wait_exit() == 2
    assert python.wait_exit() == 2
    assert java.stderr.wait_ended() == [f"chatroom-client: error: {complaint}"]
    assert python.stderr.wait_ended() == java.stderr.wait_ended()


def test_the_java_client_help_names_every_flag(room: Room, java_client: list[str]) -> None:
    java = room.run([*java_client, "--help"])
    assert java.wait_exit() == 0
    usage = "\n".join(java.stdout.wait_ended())
    assert "--name NAME" in usage and "--timestamps" in usage


def test_a_pipe_gets_lines_byte_for_byte_even_those_that_mention_the_user(
    room: Room, server: Server
) -> None:
    alice = room.client(server.port, "--name", "alice")
    alice.stdout.expect(f"* You are now alice@{alice.member_id}")
    bob = room.client(server.port)
    alice.stdout.expect(f"* {bob.member_id} joined")
    bob.type_line(f"hi alice, or {alice.member_id}")
    assert alice.stdout.expect("hi alice") == f"[{bob.member_id}] hi alice, or {alice.member_id}"
