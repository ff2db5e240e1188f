"""What a client reads back from the server's lines: its own label, and a member line's tag."""

from __future__ import annotations

import pytest

from chatroom import protocol


@pytest.mark.parametrize(
    ("line", "label"),
    [
        (protocol.welcome_line("127.0.0.1:5000", 3), "127.0.0.1:5000"),
        (protocol.welcome_line("ann@127.0.0.1:5000", 0), "ann@127.0.0.1:5000"),
        (protocol.named_line("ann@[::1]:5000"), "ann@[::1]:5000"),
        (protocol.named_line("[fe80::1%eth0]:5000"), "[fe80::1%eth0]:5000"),
        (protocol.renamed_line("127.0.0.1:5000", "ann@127.0.0.1:5000"), None),
        (protocol.chat_line("1.2.3.4:5", "* You are now ann@1.2.3.4:5"), None),
        (protocol.private_sent_line("1.2.3.4:5", "* You are now ann@1.2.3.4:5"), None),
        (b"* You are now " + b"x" * 80 + b"\n", None),  # no label: never a prompt
        (b"* Welcome, 1.2.3.4:5. Others here: 1 and more\n", None),
    ],
)
def test_own_label_is_read_from_a_welcome_or_a_rename_only(line: bytes, label: str | None) -> None:
    assert protocol.own_label(protocol.decode_line(line.rstrip(b"\n"))) == label


@pytest.mark.parametrize(
    ("line", "name", "member_id", "label", "text"),
    [
        (protocol.chat_line("1.2.3.4:5", "hi"), None, "1.2.3.4:5", "1.2.3.4:5", "hi"),
        (
            protocol.chat_line("ann@1.2.3.4:5", "[x] y"),
            "ann",
            "1.2.3.4:5",
            "ann@1.2.3.4:5",
            "[x] y",
        ),
        (protocol.action_line("ann@[::1]:5", "waves"), "ann", "[::1]:5", "ann@[::1]:5", "* waves"),
        (
            protocol.private_line("ann@1.2.3.4:5", "psst"),
            "ann",
            "1.2.3.4:5",
            "ann@1.2.3.4:5",
            "psst",
        ),
        (
            protocol.history_line(0, protocol.chat_line("1.2.3.4:5", "before")),
            None,
            "1.2.3.4:5",
            "1.2.3.4:5",
            "before",
        ),
    ],
)
def test_sender_tag_finds_the_label_and_where_the_text_starts(
    line: bytes, name: str | None, member_id: str, label: str, text: str
) -> None:
    decoded = protocol.decode_line(line.rstrip(b"\n"))
    tag = protocol.sender_tag(decoded)
    assert tag is not None
    assert (tag.name, tag.member_id) == (name, member_id)
    assert decoded[tag.label_start : tag.label_end] == label
    assert decoded[tag.text_start :] == text


@pytest.mark.parametrize(
    "line",
    [
        protocol.joined_line("1.2.3.4:5"),
        protocol.private_sent_line("ann@1.2.3.4:5", "psst"),
        protocol.error_line("[1.2.3.4:5] x"),
        protocol.HISTORY_END_LINE,
        b"[12:30] hi\n",
        b"[friend] admin here\n",
    ],
)
def test_no_other_line_has_a_sender_tag(line: bytes) -> None:
    assert protocol.sender_tag(protocol.decode_line(line.rstrip(b"\n"))) is None


def test_split_label() -> None:
    assert protocol.split_label("ann@1.2.3.4:5") == ("ann", "1.2.3.4:5")
    assert protocol.split_label("[::1]:5") == (None, "[::1]:5")
    assert protocol.split_label("ann@") is None
