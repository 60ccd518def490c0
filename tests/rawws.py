"""A raw websocket client for attack and fuzz tests: any frame, in any order, bypassing checks.

A well-behaved client library refuses to send what these tests need (empty continuation frames
by the thousand, pings it never reads the answers to, two upgrade requests in one segment), so
this one writes bytes itself: `RawWs.open()` performs the HTTP upgrade by hand, `frame()` builds
one masked frame of any opcode, `send()` writes bytes without waiting for the peer, and
`read_frames()` parses what the server sent with websockets' own Sans-I/O frame parser.
Everything is bounded in time by the caller (`asyncio.wait_for` or the `timeout_s` arguments).
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from typing import Iterable

OP_CONT, OP_TEXT, OP_BINARY, OP_CLOSE, OP_PING, OP_PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA


def frame(opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True, rsv: int = 0,
          key: bytes | None = None, length: int | None = None) -> bytes:
    """One websocket frame (RFC 6455 §5.2), masked as a client must, with any opcode/fin.
    `rsv` sets RSV1-3 (bits 0x70), `key` fixes the mask key, `length` lies about the size."""
    head = bytearray([(0x80 if fin else 0) | (rsv & 0x70) | (opcode & 0x0F)])
    n = len(payload) if length is None else length
    mbit = 0x80 if mask else 0
    if n < 126:
        head.append(mbit | n)
    elif n < 65536:
        head.append(mbit | 126)
        head += struct.pack("!H", n)
    else:
        head.append(mbit | 127)
        head += struct.pack("!Q", n)
    if not mask:
        return bytes(head) + payload
    key = os.urandom(4) if key is None else key
    head += key
    n = len(payload)
    if n and key != b"\0\0\0\0":
        # XOR with the repeated key, via int arithmetic (fast enough for test sizes)
        reps = (key * (n // 4 + 1))[:n]
        payload = (int.from_bytes(payload, "big") ^ int.from_bytes(reps, "big")).to_bytes(n, "big")
    return bytes(head) + payload


def text(s: str | bytes, **kw: bool) -> bytes:
    return frame(OP_TEXT, s.encode() if isinstance(s, str) else s, **kw)


def upgrade_request(path: str, host: str, token: str | None, extra: Iterable[tuple[str, str]] = ()) -> bytes:
    key = base64.b64encode(os.urandom(16)).decode()
    lines = [f"GET {path} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class RawWs:
    """One raw TCP connection to the bridge. `status` is the HTTP status of the upgrade answer."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.status: int | None = None
        self.head = b""
        self._buf = b""

    @classmethod
    async def connect(cls, host: str, port: int) -> "RawWs":
        reader, writer = await asyncio.open_connection(host, port, limit=2**24)
        return cls(reader, writer)

    @classmethod
    async def open(cls, host: str, port: int, path: str, token: str | None,
                   timeout_s: float = 5.0) -> "RawWs":
        """Connect and upgrade; `status` tells whether the server said 101."""
        ws = await cls.connect(host, port)
        ws.send(upgrade_request(path, f"{host}:{port}", token))
        await ws.read_head(timeout_s)
        return ws

    async def read_head(self, timeout_s: float = 5.0) -> int | None:
        """Read the HTTP answer's head; returns its status (None if the server closed first)."""
        try:
            self.head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), timeout_s)
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            return None
        self.status = int(self.head.split(b" ", 2)[1])
        return self.status

    def send(self, data: bytes) -> None:
        """Write without waiting for the peer (the kernel and the transport buffer it)."""
        if not self.writer.is_closing():
            self.writer.write(data)

    async def drain(self, timeout_s: float = 5.0) -> None:
        await asyncio.wait_for(self.writer.drain(), timeout_s)

    async def read_frames(self, timeout_s: float) -> list[tuple[int, bytes]]:
        """Frames (opcode, payload) that arrive within `timeout_s`; stops early on a close frame
        or EOF. Unmasked server frames are parsed here (fin/fragments are not reassembled)."""
        out: list[tuple[int, bytes]] = []
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            while True:
                parsed = self._parse_one()
                if parsed is None:
                    break
                out.append(parsed)
                if parsed[0] == OP_CLOSE:
                    return out
            left = end - loop.time()
            if left <= 0:
                return out
            try:
                data = await asyncio.wait_for(self.reader.read(65536), left)
            except (asyncio.TimeoutError, TimeoutError):
                return out
            except ConnectionError:
                return out
            if not data:
                return out
            self._buf += data

    def _parse_one(self) -> tuple[int, bytes] | None:
        b = self._buf
        if len(b) < 2:
            return None
        op = b[0] & 0x0F
        n = b[1] & 0x7F
        i = 2
        if n == 126:
            if len(b) < 4:
                return None
            n = struct.unpack("!H", b[2:4])[0]
            i = 4
        elif n == 127:
            if len(b) < 10:
                return None
            n = struct.unpack("!Q", b[2:10])[0]
            i = 10
        if len(b) < i + n:
            return None
        self._buf = b[i + n:]
        return op, b[i:i + n]

    async def closed_by_peer(self, timeout_s: float) -> bool:
        """True once the server closed the TCP connection (EOF or reset) within `timeout_s`."""
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while loop.time() < end:
            try:
                data = await asyncio.wait_for(self.reader.read(1 << 20), end - loop.time())
            except (asyncio.TimeoutError, TimeoutError):
                return False
            except ConnectionError:
                return True
            if not data:
                return True
        return False

    def stop_reading(self) -> None:
        """Read nothing more from the socket: what the server sends piles up in its buffers."""
        self.writer.transport.pause_reading()

    def abort(self) -> None:
        transport = self.writer.transport
        if not transport.is_closing():
            transport.abort()
