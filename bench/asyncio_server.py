"""A peer for the benchmark: the chat room as a Python programmer would write it with asyncio
streams. A coroutine per client, every line written to every member's StreamWriter. Same lines
as chatroom_server.py; no limits. usage: asyncio_server.py PORT"""

from __future__ import annotations

import asyncio
import sys

members: dict[asyncio.StreamWriter, str] = {}


def broadcast(line: bytes, sender: asyncio.StreamWriter | None = None) -> None:
    for writer in members:
        if writer is not sender:
            writer.write(line)


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    host, port = writer.get_extra_info("peername")[:2]
    member_id = f"{host}:{port}"
    try:
        while raw := await reader.readline():
            line = raw.rstrip(b"\r\n")
            if line == b"!Join" and writer not in members:
                writer.write(f"* Welcome, {member_id}. Others here: {len(members)}\n".encode())
                broadcast(f"* {member_id} joined\n".encode())
                members[writer] = member_id
            elif line == b"!Quit":
                break
            elif writer in members and line:
                broadcast(b"[" + member_id.encode() + b"] " + line + b"\n", writer)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        if members.pop(writer, None) is not None:
            broadcast(f"* {member_id} left (quit)\n".encode())
        writer.close()


async def main() -> None:
    server = await asyncio.start_server(serve, "127.0.0.1", int(sys.argv[1]), backlog=1024)
    print(f"listening on 127.0.0.1:{server.sockets[0].getsockname()[1]}", flush=True)
    async with server:
        await server.serve_forever()


if __name__ == "__main__":
    asyncio.run(main())
