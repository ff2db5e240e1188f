"""Names, commands, private messages, actions, history and the newcomer's hint, through the
real server process over loopback. Each test ends with a probe line: a member whose next
line is the probe received nothing it should not have."""

from __future__ import annotations

import re

from .conftest import Member, Room, Server


def probe(sender: Member, *listeners: Member) -> None:
    """Everything before this point has arrived: each listener's next line is the probe."""
    sender.say("probe")
    for listener in listeners:
        assert listener.read_line() == f"[{sender.label}] probe"


def named(member: Member, name: str) -> Member:
    member.label = f"{name}@{member.member_id}"
    return member


def test_a_name_given_at_join_is_on_every_line_beside_the_address(
    room: Room, server: Server
) -> None:
    [bob] = room.joined_members(server.port, 1)
    alice = named(room.member(server.port), "alice")
    alice.say("!Join alice")
    assert alice.read_line() == f"* Welcome, {alice.label}. Others here: 1"
    assert bob.read_line() == f"* {alice.label} joined"
    alice.say("hi")
    assert bob.read_line() == f"[{alice.label}] hi"
    alice.say("/nick Alicia")
    assert alice.read_line() == f"* You are now Alicia@{alice.member_id}"
    assert bob.read_line() == f"* {alice.label} is now Alicia@{alice.member_id}"


def test_names_collide_ignoring_case_and_the_loser_hears_it_alone(
    room: Room, server: Server
) -> None:
    first, second, third = room.joined_members(server.port, 3)
    first.say("/nick Ann")
    first.expect("You are now")
    for member in (second, third):
        member.expect("is now Ann@")
    second.say("/nick ann")
    assert second.read_line() == "ERROR :Name taken: ann"
    probe(second, first, third)


def test_a_private_message_reaches_its_target_only(room: Room, server: Server) -> None:
    alice, bob, carol = room.joined_members(server.port, 3)
    bob.say("/nick bob")
    bob.expect("You are now")
    for member in (alice, carol):
        member.expect("is now bob@")
    named(bob, "bob")
    alice.say("/msg BOB meet at noon")
    assert bob.read_line() == f"[{alice.member_id} (private)] meet at noon"
    assert alice.read_line() == f"* Private to {bob.label}: meet at noon"
    alice.say(f"/msg {carol.member_id} and you")
    assert carol.read_line() == f"[{alice.member_id} (private)] and you"
    assert alice.read_line() == f"* Private to {carol.member_id}: and you"
    alice.say("/msg nobody hello?")
    assert alice.read_line().startswith("ERROR :No such member: nobody")
    probe(alice, bob, carol)


def test_an_action_can_never_pass_for_a_leave_notice(room: Room, server: Server) -> None:
    alice, bob = room.joined_members(server.port, 2)
    alice.say("/me left (quit)")
    line = bob.read_line()
    assert line == f"[{alice.member_id}] * left (quit)"
    assert not line.startswith("* ")


def test_commands_are_never_broadcast(room: Room, server: Server) -> None:
    alice, bob = room.joined_members(server.port, 2)
    for command in ("/shrug", "/who", "/help", "/nick 1nvalid", "/me"):
        alice.say(command)
    assert alice.read_line() == (
        "ERROR :Unknown command /shrug: /help lists them; //shrug sends a line starting /"
    )
    assert re.fullmatch(rf"\* 2 here: {re.escape(alice.member_id)}, \S+", alice.read_line())
    assert alice.read_line().startswith("* /nick NAME")
    alice.expect("/quit (or !Quit)")
    assert alice.read_line().startswith("ERROR :Invalid name")
    assert alice.read_line() == "ERROR :Usage: /me TEXT"
    alice.say("//shrug")
    assert bob.read_line() == f"[{alice.member_id}] /shrug"
    probe(alice, bob)


def test_a_latecomer_gets_the_history_after_its_welcome_and_before_any_live_line(
    room: Room,
) -> None:
    server = room.server("--history", "2")
    [alice] = room.joined_members(server.port, 1)
    for n in range(3):
        alice.say(f"line {n}")
    alice.say(f"/msg {alice.member_id} a private note is never history")
    alice.expect("Private to")
    late = room.member(server.port)
    late.say("!Join")
    assert late.read_line() == f"* Welcome, {late.member_id}. Others here: 1"
    assert late.read_line() == "* History: 2 lines said before you came"
    for n in (1, 2):
        assert re.fullmatch(
            rf"\[\d\d:\d\d\] \[{re.escape(alice.member_id)}\] line {n}", late.read_line()
        )
    assert late.read_line() == "* End of history"
    probe(alice, late)


def test_a_silent_newcomer_is_told_how_to_join_and_a_quick_one_never_is(
    room: Room, server: Server
) -> None:
    [member] = room.joined_members(server.port, 1)
    quick = room.member(server.port)
    quick.say("!Join")
    silent = room.member(server.port)
    assert quick.read_line().startswith("* Welcome")
    assert silent.read_line() == (
        "* This is a chat room: send !Join (or !Join NAME) to enter,"
        " /help for the commands, !Quit to leave"
    )
    assert member.read_line() == f"* {quick.member_id} joined"
    probe(member, quick)
