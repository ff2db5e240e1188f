"""A turn's lines handed out without sockets: order, shared bytes, and shares that change
in the middle of a turn, checked against a naive model by hypothesis."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from chatroom.fanout import Fanout


def fanout_of(*members: str) -> Fanout[str]:
    fanout: Fanout[str] = Fanout()
    for member in members:
        fanout.add_member(member)
    fanout.take()
    return fanout


def test_members_that_get_every_line_share_one_bytes_object() -> None:
    fanout = fanout_of("a", "b", "c", "d")
    fanout.to_members(b"1\n", sender="a")
    fanout.to_members(b"2\n", sender="a")
    shares = dict(fanout.take())
    assert shares == {"b": b"1\n2\n", "c": b"1\n2\n", "d": b"1\n2\n"}
    assert shares["b"] is shares["c"] is shares["d"]


def test_a_line_for_one_peer_keeps_its_place_among_broadcasts() -> None:
    fanout = fanout_of("a", "b")
    fanout.to_members(b"[b] first\n", sender="b")
    fanout.to_peer("a", b"ERROR :Already joined\n")
    fanout.to_members(b"[b] second\n", sender="b")
    assert dict(fanout.take()) == {"a": b"[b] first\nERROR :Already joined\n[b] second\n"}


def test_a_newcomer_gets_what_came_after_it_joined_and_a_leaver_what_came_before() -> None:
    fanout = fanout_of("a", "b")
    fanout.to_members(b"before\n")
    fanout.add_member("c")
    fanout.remove_member("b")
    fanout.to_members(b"after\n")
    assert dict(fanout.take()) == {"a": b"before\nafter\n", "b": b"before\n", "c": b"after\n"}


def test_a_finished_peer_gets_nothing_after_its_last_line() -> None:
    fanout = fanout_of("a", "b")
    fanout.to_members(b"said before\n", sender="b")
    fanout.to_peer("a", b"* Goodbye\n")
    fanout.finish("a")
    fanout.to_members(b"said after\n", sender="b")
    fanout.to_peer("a", b"never\n")
    assert dict(fanout.take())["a"] == b"said before\n* Goodbye\n"


def test_a_visitor_gets_only_its_own_lines_and_a_turn_starts_empty() -> None:
    fanout = fanout_of("a")
    fanout.to_peer("visitor", b"ERROR :Join first\n")
    fanout.to_members(b"room\n")
    assert dict(fanout.take()) == {"a": b"room\n", "visitor": b"ERROR :Join first\n"}
    assert not fanout.has_lines() and fanout.pending_bytes == 0
    assert list(fanout.take()) == []


PEERS = ["p0", "p1", "p2", "p3"]

operations = st.lists(
    st.tuples(
        st.sampled_from(["join", "leave", "finish", "broadcast", "to_peer"]),
        st.sampled_from(PEERS),
    ),
    max_size=40,
)


@given(st.lists(operations, min_size=1, max_size=4))
def test_every_share_is_what_a_line_by_line_copy_would_have_given(
    turns: list[list[tuple[str, str]]],
) -> None:
    """The model copies every line into each recipient's list at once, as the server did
    before it shared bytes; the fan-out must hand out exactly the same, turn by turn."""
    fanout: Fanout[str] = Fanout()
    members: list[str] = []
    for turn in turns:
        model: dict[str, list[bytes]] = {peer: [] for peer in PEERS}
        finished: set[str] = set()
        left: set[str] = set()
        for number, (operation, peer) in enumerate(turn):
            line = f"{number} {operation} {peer}\n".encode()
            if peer in finished:
                continue  # the server never produces a line for a finished peer
            if operation == "join" and peer not in members and peer not in left:
                fanout.add_member(peer)
                members.append(peer)
            elif operation == "leave" and peer in members:
                fanout.remove_member(peer)
                members.remove(peer)
                left.add(peer)  # its connection is gone: it never comes back in that turn
            elif operation == "finish":
                fanout.finish(peer)
                finished.add(peer)
            elif operation == "broadcast":
                fanout.to_members(line, sender=peer)
                for member in members:
                    if member != peer and member not in finished:
                        model[member].append(line)
            elif operation == "to_peer":
                fanout.to_peer(peer, line)
                model[peer].append(line)
        expected = {peer: b"".join(lines) for peer, lines in model.items() if lines}
        assert dict(fanout.take()) == expected
