"""The lean transport's own edge cases (the e2e suites run every call path over it too)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from voicebridge.fastws import FastEndpoint, FastServer, fast_dial
from voicebridge.transport import ConnectFailed, EndpointClosed


async def start(handler, **kw) -> tuple[FastServer, int]:
    server = FastServer(handler, lambda conn, req: None, max_size=1 << 20,
                        close_timeout_s=kw.get("close_timeout_s", 1.0),
                        ping_interval_s=kw.get("ping_interval_s"), server_header="t")
    await server.start("127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_fragmented_message_is_reassembled_and_echoed():
    got: list[bytes] = []

    async def handler(ep: FastEndpoint) -> None:
        got.append(await ep.recv())
        await ep.send("echo:" + got[-1].decode())
        with pytest.raises(EndpointClosed):
            await ep.recv()

    server, port = await start(handler)
    async with connect(f"ws://127.0.0.1:{port}/") as ws:
        await ws.send(["ab", "cd", "ef"])           # three frames, one message
        assert await asyncio.wait_for(ws.recv(), 3) == "echo:abcdef"
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)
    assert got == [b"abcdef"]


async def test_silent_peer_is_dropped_by_keepalive():
    closed: list[int | None] = []

    async def handler(ep: FastEndpoint) -> None:
        try:
            await ep.recv()
        except EndpointClosed as e:
            closed.append(e.code)

    server, port = await start(handler, ping_interval_s=0.2, close_timeout_s=0.2)
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                 b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n")
    try:
        for _ in range(100):                     # never answers a ping
            if closed:
                break
            await asyncio.sleep(0.02)
    finally:
        sock.close()
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)
    assert closed and closed[0] != 1000


async def test_dial_reports_http_status_and_refused_port():
    async def reject(conn, req):
        return conn.respond(503, "busy\n")

    async with serve(lambda ws: asyncio.sleep(0), "127.0.0.1", 0, process_request=reject) as srv:
        port = srv.sockets[0].getsockname()[1]
        with pytest.raises(ConnectFailed) as e:
            await fast_dial(f"ws://127.0.0.1:{port}/v1/realtime", {}, timeout_s=3, max_size=1 << 20,
                            close_timeout_s=1)
        assert e.value.status == 503
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    with pytest.raises(ConnectFailed, match="connect failed"):
        await fast_dial(f"ws://127.0.0.1:{free}/", {}, timeout_s=3, max_size=1 << 20, close_timeout_s=1)


async def test_send_after_peer_close_raises():
    async def handler(ws) -> None:
        await ws.close()

    async with serve(handler, "127.0.0.1", 0) as srv:
        port = srv.sockets[0].getsockname()[1]
        ep = await fast_dial(f"ws://127.0.0.1:{port}/", {}, timeout_s=3, max_size=1 << 20,
                             close_timeout_s=1)
        with pytest.raises(EndpointClosed) as e:
            await ep.recv()
        assert e.value.code == 1000
        with pytest.raises(EndpointClosed):
            await ep.send("x")
        await ep.close()
