"""One chat line's CPU cost through the whole server path, in process: 50 members on
socketpairs, each line read, parsed, handed to the room, fanned out and written, turn by turn
(ChatServer.run_once). No load generator and no second process, so a before/after on one
machine is not at the mercy of the scheduler: run it on both commits, alternating.

    python bench/line_cost.py [--rounds N]
"""

from __future__ import annotations

import argparse
import dataclasses
import socket
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from chatroom.limits import Limits  # after the path is set, so a checkout runs it
from chatroom.server import ChatServer

MEMBERS = 50
TURNS_PER_ROUND = 5  # enough for every line of a round to be read, fanned out and flushed


def drain(ends: list[socket.socket]) -> int:
    """Reads everything waiting at the members' ends; says how many lines that was."""
    lines = 0
    for end in ends:
        while True:
            try:
                data = end.recv(1 << 20)
            except BlockingIOError:
                break
            if not data:
                break
            lines += data.count(b"\n")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=2000, help="each member sends this many")
    rounds = parser.parse_args().rounds
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    server = ChatServer(listener, dataclasses.replace(Limits(), flood_rate=0))
    ends = []
    for n in range(MEMBERS):
        ours, theirs = socket.socketpair()
        server.admit(ours, f"10.0.0.{n + 1}", 1000 + n)
        theirs.setblocking(False)
        theirs.send(b"!Join\n")
        ends.append(theirs)
    for _ in range(MEMBERS):
        server.run_once(0)
        drain(ends)
    started, delivered = time.process_time(), 0
    for round_number in range(rounds):
        for end in ends:
            end.send(b"hello there, a chat line of a usual length %d\n" % round_number)
        for _ in range(TURNS_PER_ROUND):
            server.run_once(0)
        delivered += drain(ends)
    seconds = time.process_time() - started
    lines = rounds * MEMBERS
    print(f"command: python bench/line_cost.py --rounds {rounds}")
    print(
        f"{lines:,} lines, {delivered:,} deliveries, {seconds:.2f} s CPU: "
        f"{seconds / lines * 1e6:.1f} µs a line, {seconds / delivered * 1e6:.2f} µs a delivery"
    )
    return 0 if delivered == lines * (MEMBERS - 1) else 1


if __name__ == "__main__":
    sys.exit(main())
