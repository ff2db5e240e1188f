"""A connection's first bytes through the real server: a chat client whose opening holds a bad
byte still joins, and the byte arrives as U+FFFD, as it would in any later read."""

from __future__ import annotations

import pytest

from .conftest import Room, Server


@pytest.mark.parametrize(
    ("opening", "shown"),
    [
        (b"!Join\ncaf\xe9\n", "caf\ufffd"),  # one byte of Latin-1 in a line of text
        (b"!Join\nhi\x00 there\n", "hi\ufffd there"),  # a NUL after the first line
        # telnet reporting its window size (80 x 24: NULs) before the first line
        (b"\xff\xfb\x1f\xff\xfa\x1f\x00\x50\x00\x18\xff\xf0!Join\r\nsize sent\r\n", "size sent"),
    ],
    ids=["latin-1", "nul", "telnet-naws"],
)
def test_a_chat_client_whose_first_read_holds_a_bad_byte_joins_and_is_relayed(
    room: Room, server: Server, opening: bytes, shown: str
) -> None:
    [member] = room.joined_members(server.port, 1)
    newcomer = room.member(server.port)
    newcomer.send(opening)  # one sendall: on loopback, the server's first read holds all of it
    assert newcomer.read_line() == f"* Welcome, {newcomer.member_id}. Others here: 1"
    assert member.read_line() == f"* {newcomer.member_id} joined"
    assert member.read_line() == f"[{newcomer.member_id}] {shown}"
