"""Names in colour: a stable colour per member on the tag of its lines, the user's own name and
IP:PORT picked out where someone else mentions them, and no colour off a terminal."""

from __future__ import annotations

import io

import pytest

from chatroom import protocol
from chatroom.terminal import MENTION, RESET, Painter, colour_of, wants_colour

BOB = "10.0.0.2:4000"


def shown(line: bytes) -> str:
    return protocol.decode_line(line.rstrip(b"\n"))


def uncoloured(text: str) -> str:
    return text.replace(MENTION, "").replace(RESET, "").replace(colour_of(BOB), "")


@pytest.mark.parametrize(
    ("line", "painted"),
    [
        (protocol.chat_line(BOB, "hi"), f"[{colour_of(BOB)}{BOB}{RESET}] hi"),
        (
            protocol.chat_line(f"bob@{BOB}", "hi"),
            f"[{colour_of(BOB)}bob@{BOB}{RESET}] hi",
        ),
        (
            protocol.action_line(f"bob@{BOB}", "waves"),
            f"[{colour_of(BOB)}bob@{BOB}{RESET}] * waves",
        ),
        (
            protocol.private_line(f"bob@{BOB}", "psst"),
            f"[{colour_of(BOB)}bob@{BOB}{RESET} (private)] psst",
        ),
    ],
)
def test_a_member_line_s_tag_takes_its_sender_s_colour(line: bytes, painted: str) -> None:
    assert Painter().paint(shown(line)) == painted


def test_a_history_line_s_tag_is_coloured_after_its_time() -> None:
    line = shown(protocol.history_line(0, protocol.chat_line(BOB, "before")))
    assert Painter().paint(line) == f"{line[:8]}[{colour_of(BOB)}{BOB}{RESET}] before"


@pytest.mark.parametrize(
    "line",
    [
        protocol.joined_line(BOB),
        protocol.renamed_line(BOB, f"bob@{BOB}"),
        protocol.private_sent_line(f"bob@{BOB}", "psst"),
        protocol.error_line(protocol.name_taken_error("bob")),
        protocol.welcome_line(BOB, 1),
    ],
)
def test_notices_and_errors_are_left_as_they_are(line: bytes) -> None:
    assert Painter().paint(shown(line)) == shown(line)


def test_a_member_keeps_its_colour_through_a_rename_and_members_get_different_ones() -> None:
    assert colour_of(BOB) == colour_of(BOB)
    before = Painter().paint(shown(protocol.chat_line(BOB, "x")))
    after = Painter().paint(shown(protocol.chat_line(f"bob@{BOB}", "x")))
    assert before.split(BOB)[0] == after.split("bob@")[0] == "[" + colour_of(BOB)
    assert len({colour_of(f"10.0.0.{n}:4000") for n in range(40)}) > 3


def test_the_user_s_name_and_address_are_picked_out_where_another_member_mentions_them() -> None:
    painter = Painter()
    painter.set_own_label("ann@127.0.0.1:5000")
    text = "Ann, anna, ann-x, ann: 127.0.0.1:5000 or 127.0.0.1:50001 or ann@127.0.0.1:5000"
    painted = painter.paint(shown(protocol.chat_line(BOB, text)))
    assert painted.endswith(
        f"{MENTION}Ann{RESET}, anna, ann-x, {MENTION}ann{RESET}: {MENTION}127.0.0.1:5000{RESET}"
        f" or 127.0.0.1:50001 or {MENTION}ann{RESET}@{MENTION}127.0.0.1:5000{RESET}"
    )
    assert uncoloured(painted) == f"[{BOB}] {text}"


def test_the_user_s_own_line_and_the_tag_are_never_picked_out() -> None:
    painter = Painter()
    painter.set_own_label("ann@127.0.0.1:5000")
    own = shown(protocol.chat_line("ann@127.0.0.1:5000", "ann here"))
    assert MENTION not in painter.paint(own)
    assert MENTION not in painter.paint(shown(protocol.chat_line("ann2@10.0.0.2:4000", "x")))


def test_before_the_welcome_nothing_is_picked_out() -> None:
    assert MENTION not in Painter().paint(shown(protocol.chat_line(BOB, "ann 127.0.0.1:5000")))


class FakeStdout(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self._tty = tty

    def isatty(self) -> bool:
        return self._tty


@pytest.mark.parametrize(
    ("environ", "tty", "colour"),
    [
        ({}, True, True),
        ({"NO_COLOR": ""}, True, True),  # set but empty: no-color.org says it does not count
        ({"NO_COLOR": "1"}, True, False),
        ({"NO_COLOR": "0"}, True, False),  # any value at all
        ({}, False, False),  # a pipe or a file: the server's lines byte for byte
    ],
)
def test_colour_only_on_a_terminal_and_never_with_no_color(
    environ: dict[str, str], tty: bool, colour: bool
) -> None:
    assert wants_colour(environ, FakeStdout(tty)) is colour
