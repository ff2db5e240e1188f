"""The command lines: help, version, and one clear line on stderr for every failure."""

from __future__ import annotations

import time

import pytest

from chatroom import __version__

from .conftest import Room, Server, closed_port

SCRIPTS = ["chatroom_server.py", "chatroom_client.py"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_describes_the_flags(room: Room, script: str) -> None:
    program = room.program(script, "--help")
    assert program.wait_exit() == 0
    usage = "\n".join(program.stdout.wait_ended())
    assert "--host" in usage and "--port" in usage and "--version" in usage


@pytest.mark.parametrize("script", SCRIPTS)
def test_version(room: Room, script: str) -> None:
    program = room.program(script, "--version")
    assert program.wait_exit() == 0
    assert program.stdout.wait_ended() == [f"chatroom-{script.split('_')[1][:-3]} {__version__}"]


@pytest.mark.parametrize("script", SCRIPTS)
@pytest.mark.parametrize(
    ("args", "complaint"),
    [
        (["--port", "http"], "'http' is not a whole number"),
        (["--port", "70000"], "70000 is not between"),
        (["--colour"], "unrecognized arguments: --colour"),
    ],
)
def test_a_bad_argument_is_one_line_and_exit_2(
    room: Room, script: str, args: list[str], complaint: str
) -> None:
    program = room.program(script, *args)
    assert program.wait_exit() == 2
    [line] = program.stderr.wait_ended()
    assert complaint in line and line.endswith("(see --help)")


def test_a_port_in_use_is_one_line_naming_the_port(room: Room, server: Server) -> None:
    started = time.monotonic()
    second = room.program("chatroom_server.py", "--port", str(server.port))
    assert second.wait_exit() == 1
    assert time.monotonic() - started < 5
    assert second.stderr.wait_ended() == [
        f"chatroom-server: cannot listen on 127.0.0.1:{server.port}: Address already in use"
    ]


def test_a_client_against_a_closed_port_is_one_line_and_exit_1(room: Room) -> None:
    port = closed_port()
    client = room.program("chatroom_client.py", "--port", str(port))
    assert client.wait_exit() == 1
    assert client.stderr.wait_ended() == [
        f"chatroom-client: cannot connect to 127.0.0.1:{port}: Connection refused"
    ]


def test_a_client_whose_server_is_killed_says_so_in_one_line_and_exits_1(
    room: Room, server: Server
) -> None:
    client = room.client(server.port)
    server.proc.kill()
    started = time.monotonic()
    assert client.wait_exit() == 1
    assert time.monotonic() - started < 2
    [line] = client.stderr.wait_ended()
    assert line in (
        "chatroom-client: the server closed the connection",
        "chatroom-client: connection lost: Connection reset by peer",
    )


@pytest.mark.parametrize(
    ("script", "failure"),
    [("chatroom_server.py", "cannot listen on"), ("chatroom_client.py", "cannot connect to")],
)
def test_an_unknown_host_is_one_line_in_the_same_words_for_both(
    room: Room, script: str, failure: str
) -> None:
    program = room.program(script, "--host", "nosuchhost.invalid", "--port", "5050")
    assert program.wait_exit() == 1
    prog = "chatroom-" + script.split("_")[1][:-3]
    assert program.stderr.wait_ended() == [
        f"{prog}: {failure} nosuchhost.invalid:5050: unknown host"
    ]
