"""The picows transport's own edges (the e2e suites run every call path over it too): what it
checks that picows leaves to its user, the close handshake, keepalive, the send bounds, client
masks from the CSPRNG pool, the dial's failures, and wss://."""

from __future__ import annotations

import asyncio
import json

import pytest
from websockets.frames import Frame
from websockets.streams import StreamReader

from tests.rawws import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWs, frame, text
from voicebridge.transport import ConnectFailed, EndpointClosed, Limits, ListenOptions
from voicebridge.transport import picows_impl as pw


def _opts(**kw) -> ListenOptions:
    base = dict(max_size=65536, ping_interval_s=None, close_timeout_s=1.0, handshake_timeout_s=5.0,
                max_pending=64, backlog=64, limits=Limits(), server_header="vb-test")
    base.update(kw)
    return ListenOptions(**base)  # type: ignore[arg-type]


class Echo:
    """A picows listener whose handler echoes each message `times` times, and records how the
    connection ended."""

    def __init__(self, times: int = 1) -> None:
        self.times = times
        self.ended: list[EndpointClosed] = []
        self.got: list[bytes] = []

    async def handler(self, ep, conn) -> None:
        assert conn is ep and not conn.is_closing()
        try:
            while True:
                msg = await ep.recv()
                self.got.append(msg)
                for _ in range(self.times):
                    ep.send_nowait(msg.decode())
        except EndpointClosed as e:
            self.ended.append(e)

    async def start(self, **kw):
        server = await pw.listen(self.handler, lambda req: None, "127.0.0.1", 0, opts=_opts(**kw))
        return server, server.sockets[0].getsockname()[1]


def _parse_client_frame(data: bytes) -> Frame:
    reader = StreamReader()
    reader.feed_data(data)
    gen = Frame.parse(reader.read_exact, mask=True)
    try:
        next(gen)
    except StopIteration as stop:
        return stop.value
    raise AssertionError("incomplete frame")


def test_client_frames_take_their_masks_from_the_pool(monkeypatch):
    """picows masks with libc rand(); ours come from the pooled os.urandom read (RFC 6455 §5.3)."""
    monkeypatch.setattr(pw._KEYS, "_buf", bytes(range(8)))
    monkeypatch.setattr(pw._KEYS, "_pos", 0)
    for payload, key in ((b"hello", bytes(range(4))), (b"x" * 300, bytes(range(4, 8)))):
        data = pw.client_frame(0x1, payload)
        hdr = 2 if len(payload) < 126 else 4
        assert data[hdr:hdr + 4] == key                   # the next 4 bytes of the pool
        f = _parse_client_frame(data)
        assert f.fin and f.data == payload and f.opcode.value == 0x1


@pytest.mark.parametrize("n", [0, 125, 126, 65535, 65536])
def test_client_frames_of_every_length_form(n):
    f = _parse_client_frame(pw.client_frame(0x2, b"y" * n))
    assert f.data == b"y" * n and f.opcode.value == 0x2


async def test_dial_listen_round_trip_in_order():
    echo = Echo(times=3)
    server, port = await echo.start()
    up = await pw.dial(f"ws://127.0.0.1:{port}/x?y=1", {"X-Test": "1"}, timeout_s=3, max_size=1 << 20,
                       close_timeout_s=1)
    for i in range(4):
        up.send_nowait(f"m{i}" * (1 + 20_000 * (i == 2)))     # one frame over 64 KiB
    got = [await asyncio.wait_for(up.recv(), 3) for _ in range(12)]
    assert got == [(f"m{i}" * (1 + 20_000 * (i == 2))).encode() for i in range(4) for _ in range(3)]
    assert len(echo.got) == 4
    await up.close()
    assert up.close_code == 1000
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)
    assert [e.code for e in echo.ended] == [1000] and echo.ended[0].cause is None


def _close_code(frames: list[tuple[int, bytes]]) -> int | None:
    closes = [p for op, p in frames if op == OP_CLOSE]
    return int.from_bytes(closes[0][:2], "big") if closes else None


@pytest.mark.parametrize("data, code, cause", [
    pytest.param(frame(OP_TEXT, b"x", rsv=0x40), 1002, "protocol_error", id="rsv1"),
    pytest.param(frame(OP_CONT, b"x"), 1002, "protocol_error", id="lone-continuation"),
    pytest.param(frame(OP_TEXT, b"a", fin=False) + frame(OP_TEXT, b"b"), 1002, "protocol_error",
                 id="text-inside-a-fragmented-message"),
    pytest.param(frame(OP_TEXT, b"a" * 40000, fin=False) + frame(OP_CONT, b"b" * 40000), 1009,
                 "frame_too_big", id="fragments-over-max-size"),
    pytest.param(frame(OP_TEXT, b"{", fin=False) + frame(OP_CONT, b"", fin=False) * 10, 1009,
                 "frame_too_big", id="too-many-fragments"),
    pytest.param(frame(OP_BINARY, b"z" * 70000), 1009, "frame_too_big", id="frame-over-max-size"),
    pytest.param(frame(OP_CLOSE, (1005).to_bytes(2, "big")), 1002, "protocol_error", id="close-code-1005"),
    pytest.param(frame(OP_CLOSE, (1000).to_bytes(2, "big") + b"\xff"), 1007, "protocol_error",
                 id="close-reason-not-utf8"),
    pytest.param(frame(OP_PING, b"p") * 70, 1008, "protocol_error", id="ping-flood"),
])
async def test_what_picows_leaves_to_us_is_failed_with_websockets_codes(data, code, cause):
    echo = Echo()
    server, port = await echo.start(limits=Limits(max_fragments=4))
    ws = await RawWs.open("127.0.0.1", port, "/", None)
    assert ws.status == 101 and b"Server: vb-test" in ws.head
    ws.send(data)
    frames = await ws.read_frames(3.0)
    assert _close_code(frames) == code, frames[-3:]
    if code == 1008:
        assert sum(op == OP_PONG for op, _ in frames) == 64      # answered up to the cap
    assert await ws.closed_by_peer(3.0)        # the server ends the TCP connection
    ws.abort()
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)
    assert [(e.code, e.cause) for e in echo.ended] == [(code, cause)]


async def test_peer_close_is_echoed_and_reported_as_the_peers():
    echo = Echo()
    server, port = await echo.start()
    ws = await RawWs.open("127.0.0.1", port, "/", None)
    ws.send(text("hi"))
    assert await ws.read_frames(0.5) == [(OP_TEXT, b"hi")]
    ws.send(frame(OP_CLOSE, (4000).to_bytes(2, "big") + b"bye"))
    assert await ws.read_frames(3.0) == [(OP_CLOSE, (4000).to_bytes(2, "big") + b"bye")]
    assert await ws.closed_by_peer(3.0)        # a server half-closes after the handshake
    ws.abort()
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)
    [e] = echo.ended
    assert (e.code, e.reason, e.cause) == (4000, "bye", None)


async def test_no_pong_in_time_closes_1011():
    echo = Echo()
    server, port = await echo.start(ping_interval_s=0.1)
    ws = await RawWs.open("127.0.0.1", port, "/", None)
    frames = await ws.read_frames(3.0)         # a ping, never answered, then the close
    assert frames[0][0] == OP_PING and _close_code(frames) == 1011
    ws.abort()
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)
    assert [(e.code, e.cause) for e in echo.ended] == [(1011, "keepalive_timeout")]


async def test_a_peer_that_does_not_read_is_aborted_with_send_buffer_full():
    ended: list[EndpointClosed] = []

    async def handler(ep, conn) -> None:
        try:
            ep.pause_writing()                 # as the transport does once its buffer is high
            for _ in range(10_000):
                ep.send_nowait(json.dumps({"pad": "x" * 60_000}))
                await asyncio.sleep(0)
        except EndpointClosed as e:
            ended.append(e)

    server = await pw.listen(handler, lambda req: None, "127.0.0.1", 0,
                             opts=_opts(limits=Limits(send_buffer_bytes=256 * 1024, send_timeout_s=30)))
    port = server.sockets[0].getsockname()[1]
    ws = await RawWs.open("127.0.0.1", port, "/", None)
    ws.stop_reading()
    for _ in range(100):
        if ended:
            break
        await asyncio.sleep(0.05)
    ws.abort()
    server.close()
    await asyncio.wait_for(server.wait_closed(), 5)
    assert [(e.code, e.cause) for e in ended] == [(1006, "send_buffer_full")]


async def _answer_with(head: bytes) -> tuple[asyncio.AbstractServer, int, list[bytes]]:
    seen: list[bytes] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(await reader.readuntil(b"\r\n\r\n"))
        if head:
            writer.write(head)
            await writer.drain()
        await reader.read()                    # until the client hangs up
        writer.close()

    srv = await asyncio.start_server(serve, "127.0.0.1", 0)
    return srv, srv.sockets[0].getsockname()[1], seen


@pytest.mark.parametrize("head, status, retry", [
    (b"HTTP/1.1 429 Too Many Requests\r\nRetry-After: 3\r\nContent-Length: 0\r\n\r\n", 429, 3.0),
    (b"HTTP/1.1 302 Found\r\nLocation: ws://127.0.0.1:1/elsewhere\r\nContent-Length: 0\r\n\r\n", 302, None),
], ids=["429-retry-after", "302-not-followed"])
async def test_dial_refused_is_connect_failed_with_its_status_and_no_redirect(head, status, retry):
    srv, port, seen = await _answer_with(head)
    with pytest.raises(ConnectFailed) as e:
        await pw.dial(f"ws://127.0.0.1:{port}/v1/realtime?model=m", {"Authorization": "Bearer k"},
                      timeout_s=3, max_size=1 << 20, close_timeout_s=1)
    assert (e.value.status, e.value.retry_after_s) == (status, retry)
    [req] = seen
    assert req.startswith(b"GET /v1/realtime?model=m HTTP/1.1\r\n") and b"Authorization: Bearer k" in req
    assert b"User-Agent: voicebridge" in req
    srv.close()
    await srv.wait_closed()


async def test_dial_timeout_leaves_no_socket_open():
    srv, port, seen = await _answer_with(b"")  # accepts, reads the request, never answers
    with pytest.raises(ConnectFailed, match="timed out"):
        await pw.dial(f"ws://127.0.0.1:{port}/", {}, timeout_s=0.3, max_size=1 << 20, close_timeout_s=1)
    srv.close()
    await asyncio.wait_for(srv.wait_closed(), 3)   # the server's reader saw the client hang up
    assert len(seen) == 1


async def test_bad_url_is_connect_failed():
    with pytest.raises(ConnectFailed):
        await pw.dial("http://127.0.0.1:1/", {}, timeout_s=1, max_size=1 << 20, close_timeout_s=1)


def _self_signed(tmp_path):
    """A throwaway certificate for 127.0.0.1 (key and cert PEM paths)."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    kp, cp = tmp_path / "key.pem", tmp_path / "cert.pem"
    kp.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                     serialization.NoEncryption()))
    cp.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return kp, cp


async def test_dial_over_tls(tmp_path, monkeypatch):
    """wss:// (OpenAI's scheme): the client frames and picows' parser over uvloop's TLS transport."""
    import ssl

    from websockets.asyncio.server import serve

    kp, cp = _self_signed(tmp_path)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(cp, kp)
    client_ctx = ssl.create_default_context(cafile=str(cp))
    monkeypatch.setattr(pw, "_tls", client_ctx)
    seen: list[str] = []

    async def echo(ws) -> None:
        seen.append(ws.request.headers.get("Authorization", ""))
        async for msg in ws:
            await ws.send(msg * 2)

    async with serve(echo, "127.0.0.1", 0, ssl=server_ctx) as srv:
        port = srv.sockets[0].getsockname()[1]
        up = await pw.dial(f"wss://127.0.0.1:{port}/v1/realtime", {"Authorization": "Bearer k"},
                           timeout_s=5, max_size=1 << 20, close_timeout_s=1)
        for n in (10, 200, 70_000):
            up.send_nowait("a" * n)
            assert await asyncio.wait_for(up.recv(), 5) == b"a" * (2 * n)
        await up.close()
    assert seen == ["Bearer k"] and up.close_code == 1000
