"""The benchmarks' minimal JSON-over-HTTP server on 127.0.0.1 (keep-alive, no framework, so that the server's own
cost stays small beside the client's), and how to start one in its own process."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable
from typing import Any

Answer = Callable[[str, dict[str, Any]], Awaitable[dict[str, Any]]]  # (path, JSON body) -> JSON reply


async def serve_json(port: int, answer: Answer, backlog: int = 1024) -> None:
    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                path = head.split(b" ", 2)[1].decode()
                length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                               if line.lower().startswith(b"content-length:")), 0)
                body = json.loads(await reader.readexactly(length) or b"{}") if length else {}
                data = json.dumps(await answer(path, body)).encode()
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: "
                             + str(len(data)).encode() + b"\r\n\r\n" + data)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", port, backlog=backlog)
    async with server:
        await server.serve_forever()


def start(command: list[str], tries: int = 400) -> tuple[subprocess.Popen, str]:
    """Run `command + ["--serve", PORT]` (a script serving on PORT) and wait until it accepts connections (at most
    `tries` looks, 50 ms apart)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    process = subprocess.Popen([*command, "--serve", str(port)])
    for _ in range(tries):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            break
        except OSError:
            time.sleep(0.05)
    return process, f"http://127.0.0.1:{port}/v1"
