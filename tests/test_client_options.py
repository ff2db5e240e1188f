"""The client's options for issue 13, as real processes against the real server: --name."""

from __future__ import annotations

from .conftest import Room, Server

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
