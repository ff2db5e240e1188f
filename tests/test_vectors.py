"""PROTOCOL.md's test vectors, run against the real server (or, with
CHATROOM_VECTORS_SERVER=host:port, against another implementation at its default limits)."""

from __future__ import annotations

import json
import os
import re
from typing import Any

import pytest

from .conftest import ROOT, Member, Room

VECTORS = json.loads((ROOT / "tests" / "vectors" / "protocol.json").read_text(encoding="utf-8"))
OTHER_SERVER = os.environ.get("CHATROOM_VECTORS_SERVER", "")


@pytest.mark.parametrize("case", VECTORS["cases"], ids=[case["name"] for case in VECTORS["cases"]])
def test_protocol_vector(room: Room, case: dict[str, Any]) -> None:
    if OTHER_SERVER:
        if case["server_args"]:
            pytest.skip(f"needs the server started with {case['server_args']}")
        host, port_text = OTHER_SERVER.rsplit(":", 1)
        host, port = host.strip("[]"), int(port_text)
    else:
        host, port = "127.0.0.1", room.server(*case["server_args"]).port
    connections: dict[str, Member] = {}
    present: set[str] = set()  # joined and not closed: each must see the final probe join

    def with_ids(line: str, escape: bool = False) -> str:
        for name, member in connections.items():
            member_id = re.escape(member.member_id) if escape else member.member_id
            line = line.replace("{" + name + "}", member_id)
        return line

    for step in case["steps"]:
        if "connect" in step:
            connections[step["connect"]] = room.member(port, host)
        elif "send" in step:
            data = bytes.fromhex(step["hex"]) if "hex" in step else with_ids(step["text"]).encode()
            connections[step["send"]].send(data)
        elif "close" in step:
            connections[step["close"]].close()
            present.discard(step["close"])
        elif step.get("closed"):
            assert connections[step["receive"]].read_until_eof() == []
            present.discard(step["receive"])
        elif "pattern" in step:
            line = connections[step["receive"]].read_line()
            assert re.fullmatch(with_ids(step["pattern"], escape=True), line), line
        else:
            line = connections[step["receive"]].read_line()
            assert line == with_ids(step["line"])
            if line.startswith("* Welcome, "):
                present.add(step["receive"])
    # Nothing else arrived: the next line each member still present gets is a newcomer's join.
    if not present:
        return
    probe = room.member(port, host)
    probe.join()
    for name in sorted(present):
        assert connections[name].read_line() == f"* {probe.member_id} joined", name
