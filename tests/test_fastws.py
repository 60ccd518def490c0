"""The lean transport's own edge cases (the e2e suites run every call path over it too)."""

from __future__ import annotations

import asyncio
import socket

import pytest
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from voicebridge.transport import ConnectFailed, EndpointClosed
from voicebridge.transport.fast_impl import FastEndpoint, FastServer
from voicebridge.transport.fast_impl import dial as fast_dial


async def start(handler, **kw) -> tuple[FastServer, int]:
    server = FastServer(handler, lambda conn, req: None, max_size=1 << 20,
                        close_timeout_s=kw.pop("close_timeout_s", 1.0),
                        ping_interval_s=kw.pop("ping_interval_s", None), server_header="t", **kw)
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


class _NullTransport:
    def __init__(self) -> None:
        self.written = 0
        self.aborted = False

    def write(self, data: bytes) -> None:
        self.written += len(data)

    def get_write_buffer_size(self) -> int:
        return self.written            # nothing ever leaves: a peer that does not read

    def can_write_eof(self) -> bool:
        return False

    def abort(self) -> None:
        self.aborted = True


def _open_endpoint(**limits) -> tuple[FastEndpoint, _NullTransport]:
    from websockets.protocol import State
    from websockets.server import ServerProtocol
    from voicebridge.transport import Limits
    ep = FastEndpoint(ServerProtocol(state=State.OPEN), close_timeout_s=1, ping_interval_s=None,
                      limits=Limits(**limits))
    tr = _NullTransport()
    ep.connection_made(tr)  # type: ignore[arg-type]
    return ep, tr


async def test_send_never_waits_and_a_full_send_buffer_aborts():
    ep, tr = _open_endpoint(send_buffer_bytes=10_000, send_timeout_s=60)
    ep.pause_writing()                     # the peer stopped reading
    for _ in range(10):                    # below the bound: each send completes at once
        await asyncio.wait_for(ep.send("x" * 900), 0.5)
    assert not tr.aborted
    with pytest.raises(EndpointClosed) as e:
        for _ in range(10):
            await asyncio.wait_for(ep.send("x" * 900), 0.5)
    assert tr.aborted and e.value.cause == "send_buffer_full" and e.value.code == 1006


async def test_writes_paused_too_long_abort():
    ep, tr = _open_endpoint(send_timeout_s=0.05)
    ep.pause_writing()
    await asyncio.sleep(0.02)
    ep.resume_writing()                    # caught up in time: nothing happens
    await asyncio.sleep(0.08)
    assert not tr.aborted
    ep.pause_writing()
    await asyncio.sleep(0.15)
    assert tr.aborted
    ep.connection_lost(None)
    with pytest.raises(EndpointClosed) as e:
        await ep.recv()
    assert e.value.cause == "send_timeout"


async def test_unfinished_http_upgrade_is_dropped():
    async def handler(ep: FastEndpoint) -> None:
        raise AssertionError("never upgraded")

    server, port = await start(handler, handshake_timeout_s=0.2)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    assert await asyncio.wait_for(reader.read(), 3) == b""   # the server hung up
    writer.close()
    reader2, writer2 = await asyncio.open_connection("127.0.0.1", port)
    writer2.write(b"GET / HTTP/1.1\r\n")
    await asyncio.sleep(0.05)
    server.close()                                           # aborts connections still in handshake
    assert await asyncio.wait_for(reader2.read(), 3) == b""
    writer2.close()
    await asyncio.wait_for(server.wait_closed(), 5)


async def test_receive_queue_is_bounded_by_pausing_the_socket():
    import voicebridge.transport.fast_impl as fastws
    n, size = 400, 100_000                    # 40 MB in all, far more than the kernel buffers hold
    got: list[bytes] = []
    reading = asyncio.Event()
    endpoints: list[FastEndpoint] = []

    async def handler(ep: FastEndpoint) -> None:
        endpoints.append(ep)
        await reading.wait()                  # a reader that lags behind
        while len(got) < n:
            got.append(await ep.recv())

    server, port = await start(handler)
    async with connect(f"ws://127.0.0.1:{port}/", max_size=None) as ws:
        async def sender() -> None:
            for i in range(n):
                await ws.send(f"{i:06d}" + "x" * (size - 6))

        task = asyncio.create_task(sender())
        await asyncio.sleep(0.5)
        ep = endpoints[0]
        # one socket read (<= 256 KiB) may land past the limit before reading pauses
        assert ep._reading_paused and len(ep._queue) <= fastws.MAX_QUEUED_MESSAGES + 256_000 // size + 1
        assert ep._queued_bytes <= ep.limits.recv_queue_bytes + 256_000
        assert not task.done()                # the sender feels the backpressure
        reading.set()
        await asyncio.wait_for(task, 10)
        for _ in range(500):
            if len(got) == n:
                break
            await asyncio.sleep(0.01)
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)
    assert [int(m[:6]) for m in got] == list(range(n))     # nothing lost, in order
