"""The socket seam: "an end that yields frames and accepts frames", and its bounds.

`call.py` only sees `Endpoint`. Two implementations: `WsEndpoint` here (websockets' asyncio
layer) and `fastws.FastEndpoint` (websockets' Sans-I/O protocol on uvloop). Both keep the same
contract, including every bound in `Limits`:
- `send_nowait(text)` (and `send`, its awaitable twin) never waits for the peer: the frame goes
  to the transport's buffer. A socket
  whose unsent bytes exceed `send_buffer_bytes`, or whose writes stay paused (peer not reading)
  for `send_timeout_s`, is aborted; `send` then raises `EndpointClosed`. So a peer that stops
  reading costs bounded memory and never blocks the task that also watches the other peer.
- received, unread messages are bounded in bytes (`recv_queue_bytes`) as well as in count:
  beyond either, the socket is not read (TCP backpressure) until the reader catches up.
- a fragmented message may have at most `max_fragments` fragments (and `max_size` bytes).
- `EndpointClosed.cause` says who ended the connection and why: None when the peer closed it
  (then `code` is the peer's code, 1006 if it sent none), else one of `CAUSES` for a close or an
  abort of our own (then `code` is the code we sent, or 1006 for an abort).
"""

from __future__ import annotations

import asyncio
from typing import Any, NamedTuple, Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Close
from websockets.protocol import State

# our own reasons for ending a connection (EndpointClosed.cause)
CAUSES = ("frame_too_big", "protocol_error", "keepalive_timeout", "shutdown", "send_buffer_full",
          "send_timeout", "closed")
MAX_QUEUED_MESSAGES = 64   # received, unread messages per connection (bytes: Limits.recv_queue_bytes)


MAX_REQUEST_HEAD_BYTES = 16 * 1024
_BAD_REQUEST = (b"HTTP/1.1 400 Bad Request\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n"
                b"Connection: close\r\n\r\n%s")


class RequestHead:
    """Server side, before the upgrade: hands the parser exactly one HTTP request head.

    Bytes after the head (a second, pipelined request, or frames sent before our 101) and heads
    larger than `MAX_REQUEST_HEAD_BYTES` are refused with a 400 and the connection is closed:
    the websocket client must wait for the answer to its upgrade before it sends anything."""

    __slots__ = ("buf", "done")

    def __init__(self) -> None:
        self.buf = b""
        self.done = False

    def feed(self, data: bytes, transport: Any) -> bytes | None:
        """The complete head once it is in (feed it to the protocol), else None (wait for more,
        or refused: the 400 has been written and the transport closed)."""
        buf = self.buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > MAX_REQUEST_HEAD_BYTES:
                self.refuse(transport, b"request head too large\n")
            else:
                self.buf = buf
            return None
        self.done = True
        self.buf = b""
        if end + 4 != len(buf):
            self.refuse(transport, b"one request per connection, and no data before the 101\n")
            return None
        return buf

    @staticmethod
    def refuse(transport: Any, text: bytes) -> None:
        if not transport.is_closing():
            transport.write(_BAD_REQUEST % (len(text), text))
            transport.close()


class Limits(NamedTuple):
    """Per-connection bounds, from `server.*` (see README, "Limits and hardening")."""
    send_buffer_bytes: int = 1024 * 1024
    send_timeout_s: float = 10.0
    recv_queue_bytes: int = 4 * 1024 * 1024
    max_fragments: int = 128


class EndpointClosed(Exception):
    """The connection is over; `code`/`reason` say how, `cause` who (see the module docstring)."""

    def __init__(self, code: int | None, reason: str, cause: str | None = None) -> None:
        super().__init__(f"closed code={code} reason={reason!r} cause={cause}")
        self.code = code
        self.reason = reason
        self.cause = cause


class ConnectFailed(Exception):
    """Dialing upstream failed; `reason` is safe to log (never contains credentials)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Endpoint(Protocol):
    async def recv(self) -> str | bytes: ...
    async def send(self, frame: str) -> None: ...
    def send_nowait(self, frame: str) -> None: ...
    async def close(self, code: int = 1000, reason: str = "") -> None: ...
    def abort(self) -> None: ...
    @property
    def close_code(self) -> int | None: ...


def cause_of_code(code: int) -> str:
    """Our reason for a close frame we sent first, from its code."""
    if code == 1009:
        return "frame_too_big"
    if code in (1002, 1003, 1007, 1008):
        return "protocol_error"
    if code == 1011:
        return "keepalive_timeout"   # the only 1011 the transports send themselves
    if code == 1001:
        return "shutdown"
    return "closed"


def closed_error(sent: Close | None, rcvd: Close | None, rcvd_then_sent: bool | None,
                 cause: str | None) -> EndpointClosed:
    """The `EndpointClosed` for a connection's close frames (websockets' attributes)."""
    if cause is not None:   # we aborted it (send bounds): no close frame could be trusted
        return EndpointClosed(1006, cause.replace("_", " "), cause)
    if sent is not None and (rcvd is None or rcvd_then_sent is False):
        return EndpointClosed(sent.code, sent.reason, cause_of_code(sent.code))
    if rcvd is not None:
        return EndpointClosed(rcvd.code, rcvd.reason, None)
    return EndpointClosed(1006, "", None)


class _SendBounds:
    """The send bounds of `Limits` for a websockets asyncio connection (mixin)."""

    limits = Limits()
    vb_cause: str | None = None
    _send_timer: asyncio.TimerHandle | None = None
    loop: asyncio.AbstractEventLoop
    transport: Any
    paused: bool

    def vb_abort(self, cause: str) -> None:
        if self.vb_cause is None:
            self.vb_cause = cause
        self.transport.abort()

    def pause_writing(self) -> None:
        super().pause_writing()  # type: ignore[misc]
        self._send_timer = self.loop.call_later(self.limits.send_timeout_s, self.vb_abort,
                                                "send_timeout")

    def resume_writing(self) -> None:
        super().resume_writing()  # type: ignore[misc]
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def data_received(self, data: bytes) -> None:
        super().data_received(data)  # type: ignore[misc]
        # received pings queue pongs: a peer that never reads must not grow them without bound
        if self.paused and self.transport.get_write_buffer_size() > self.limits.send_buffer_bytes:
            self.vb_abort("send_buffer_full")

    def connection_lost(self, exc: Exception | None) -> None:
        if self._send_timer is not None:
            self._send_timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]


class BoundedClientConnection(_SendBounds, ClientConnection):
    """websockets' client connection with the send bounds."""


class BoundedServerConnection(_SendBounds, ServerConnection):
    """websockets' server connection with the send bounds and a shared cap on connections still
    in their opening handshake (`pending`, oldest first, and `max_pending`; set by the server):
    past the cap the oldest is dropped, as `fastws.FastServer` does."""

    pending: dict["BoundedServerConnection", None] | None = None
    max_pending = 0
    on_refused: Any = None
    _head: RequestHead | None = None

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            self._head = RequestHead()
        if not self._head.done:
            head = self._head.feed(data, self.transport)
            if head is None:
                return
            data = head
        super().data_received(data)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        pending = self.pending
        if pending is not None:
            if len(pending) >= self.max_pending:
                oldest = next(iter(pending))
                del pending[oldest]
                if oldest.transport is not None:
                    oldest.transport.abort()
                if self.on_refused is not None:
                    self.on_refused("max_pending_handshakes")
            pending[self] = None
        super().connection_made(transport)

    def handshake_done(self) -> None:
        if self.pending is not None:
            self.pending.pop(self, None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.handshake_done()
        super().connection_lost(exc)


class WsEndpoint:
    """An `Endpoint` over a `websockets` asyncio connection (server or client side).

    `send` writes through the Sans-I/O protocol object without awaiting `drain()`, so it never
    blocks (bounded as the module docstring says)."""

    __slots__ = ("_ws", "_recv", "_proto", "_limits")

    def __init__(self, ws: ServerConnection | ClientConnection, limits: Limits) -> None:
        self._ws = ws
        self._recv = ws.recv
        self._proto = ws.protocol
        self._limits = limits

    def _closed(self, e: ConnectionClosed | None = None) -> EndpointClosed:
        p = self._proto
        return closed_error(p.close_sent, p.close_rcvd, p.close_rcvd_then_sent,
                            getattr(self._ws, "vb_cause", None))

    async def recv(self) -> str | bytes:
        try:
            return await self._recv()
        except ConnectionClosed as e:
            raise self._closed(e) from None

    async def send(self, frame: str) -> None:
        self.send_nowait(frame)

    def send_nowait(self, frame: str) -> None:
        ws = self._ws
        if self._proto.state is not State.OPEN:
            raise self._closed()
        self._proto.send_text(frame.encode())
        ws.send_data()
        if ws.paused and ws.transport.get_write_buffer_size() > self._limits.send_buffer_bytes:
            ws.vb_abort("send_buffer_full")  # type: ignore[union-attr]
            raise EndpointClosed(1006, "send buffer full", "send_buffer_full")

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self._ws.close(code, reason)

    def abort(self) -> None:
        transport = self._ws.transport
        if transport is not None:
            transport.abort()

    @property
    def close_code(self) -> int | None:
        return self._ws.close_code

    @property
    def remote_address(self) -> Any:
        return self._ws.remote_address


async def dial(url: str, headers: dict[str, str], *, timeout_s: float, max_size: int,
               close_timeout_s: float, ping_interval_s: float | None = 20.0,
               limits: Limits = Limits()) -> WsEndpoint:
    """Open an upstream websocket. Raises ConnectFailed with a loggable reason."""
    try:
        ws = await asyncio.wait_for(
            connect(url, additional_headers=headers, max_size=max_size, compression=None,
                    open_timeout=None, close_timeout=close_timeout_s, proxy=None,
                    ping_interval=ping_interval_s, ping_timeout=ping_interval_s,
                    max_queue=max(2, limits.recv_queue_bytes // max_size),
                    create_connection=BoundedClientConnection,
                    user_agent_header="voicebridge"),
            timeout_s)
        ws.limits = limits
    except InvalidStatus as e:
        status = e.response.status_code
        raise ConnectFailed(f"upstream refused the websocket: HTTP {status}", status) from None
    except (asyncio.TimeoutError, TimeoutError):
        raise ConnectFailed(f"upstream connect timed out after {timeout_s:g} s") from None
    except (OSError, InvalidHandshake, InvalidURI, ValueError) as e:
        raise ConnectFailed(f"upstream connect failed: {type(e).__name__}: {e}"[:200]) from None
    return WsEndpoint(ws, limits)
