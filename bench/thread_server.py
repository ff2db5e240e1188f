"""A peer for the benchmark: the chat room as most people first write it. A thread per client,
blocking sockets, a lock around the member table, every line sent to every member from the
sender's thread. Same lines as chatroom_server.py; no limits. usage: thread_server.py PORT"""

from __future__ import annotations

import socket
import sys
import threading

members: dict[socket.socket, threading.Lock] = {}  # each member's socket and its send lock
members_lock = threading.Lock()


def broadcast(line: bytes, sender: socket.socket | None = None) -> None:
    with members_lock:
        targets = [(sock, lock) for sock, lock in members.items() if sock is not sender]
    for sock, lock in targets:
        try:
            with lock:  # two threads' sendall() would interleave half lines
                sock.sendall(line)
        except OSError:
            pass


def serve(sock: socket.socket, address: tuple[str, int]) -> None:
    member_id = f"{address[0]}:{address[1]}"
    joined = False
    with sock, sock.makefile("rb") as lines:
        for raw in lines:
            line = raw.rstrip(b"\r\n")
            if line == b"!Join" and not joined:
                with members_lock:
                    others = len(members)
                    members[sock] = threading.Lock()
                with members[sock]:
                    sock.sendall(f"* Welcome, {member_id}. Others here: {others}\n".encode())
                broadcast(f"* {member_id} joined\n".encode(), sock)
                joined = True
            elif line == b"!Quit":
                break
            elif joined and line:
                broadcast(b"[" + member_id.encode() + b"] " + line + b"\n", sock)
        with members_lock:
            members.pop(sock, None)
    if joined:
        broadcast(f"* {member_id} left (quit)\n".encode())


def main() -> None:
    listener = socket.create_server(("127.0.0.1", int(sys.argv[1])), backlog=1024)
    print(f"listening on 127.0.0.1:{listener.getsockname()[1]}", flush=True)
    while True:
        sock, address = listener.accept()
        threading.Thread(target=serve, args=(sock, address), daemon=True).start()


if __name__ == "__main__":
    main()
