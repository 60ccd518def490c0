"""Transport `websockets`: websockets' asyncio layer, with the bounds of `base.Limits`.

The module interface and the `Endpoint` contract are in `base`'s docstring. What this layer
needs on top of the library: `_SendBounds` (the send bounds, as a mixin of its connection
classes), `BoundedServerConnection` (the pending-handshake cap, dropping the oldest, and
`RequestHead`), `WsEndpoint` (sends written through the Sans-I/O protocol object without awaiting
`drain()`), and adapters between `HttpRequest`/`HttpResponse` and the library's own types.
"""

from __future__ import annotations

import asyncio
from typing import Any, Sequence

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State

from ._masks import install as _install_masks
from ._websockets_http import answer
from .base import (MAX_PINGS_PER_S, READ_SLICE_BYTES, ConnectFailed, EndpointClosed, Handler, Limits,
                   ListenOptions, OnRefused, ProcessRequest, ProcessResponse, RequestHead,
                   closed_error, retry_after_s)

_install_masks()   # client frame masks from a pooled CSPRNG read (see _masks)


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

    _fragments = 0          # of the message being received
    protocol: Any

    _pings = 0
    _pings_since = 0.0

    def _vb_fail(self, code: int, reason: str) -> None:
        """Fail the connection: our close frame, then the socket is dropped after the close
        timeout whether or not the peer (which may not read) answers it."""
        self._fragments = -1                    # everything after this is discarded
        self.protocol.fail(code, reason)
        self.send_data()  # type: ignore[attr-defined]
        self.loop.call_later(getattr(self, "close_timeout", None) or 2.0, self.transport.abort)

    def process_event(self, event: Any) -> None:
        """Fragments per message are bounded (`Limits.max_fragments`): the library's own limit
        counts bytes, so empty continuation frames could pile up without one. Pings from the
        peer are bounded too (`MAX_PINGS_PER_S`)."""
        if type(event) is Frame:
            op = event.opcode
            if op is Opcode.PING:
                now = self.loop.time()
                if now - self._pings_since >= 1.0:
                    self._pings_since, self._pings = now, 0
                self._pings += 1
                if self._pings > MAX_PINGS_PER_S and self._fragments >= 0:
                    self._vb_fail(1008, "too many pings")
                return
            if op is Opcode.TEXT or op is Opcode.BINARY or op is Opcode.CONT:
                if self._fragments < 0:         # failed already: the rest is discarded
                    return
                self._fragments = 0 if event.fin else self._fragments + 1
                if self._fragments > self.limits.max_fragments:
                    self._vb_fail(1009, "too many fragments")
                    return
        super().process_event(event)  # type: ignore[misc]


class BoundedClientConnection(_SendBounds, ClientConnection):
    """websockets' client connection with the send bounds."""


class BoundedServerConnection(_SendBounds, ServerConnection):
    """websockets' server connection with the send bounds and a shared cap on connections still
    in their opening handshake (`pending`, oldest first, and `max_pending`; set by the server):
    past the cap the oldest is dropped, as `fast_impl.FastServer` does."""

    pending: dict["BoundedServerConnection", None] | None = None
    max_pending = 0
    on_refused: Any = None
    _head: RequestHead | None = None

    _backlog = b""

    def data_received(self, data: bytes) -> None:
        if self._head is None:
            self._head = RequestHead()
        if not self._head.done:
            head = self._head.feed(data, self.transport)
            if head is None:
                return
            data = head
        if self._backlog:            # still working through an earlier read: keep the order
            self._backlog += data
            self.transport.pause_reading()
            return
        self._vb_feed(data)

    def _vb_feed(self, data: bytes) -> None:
        """At most `READ_SLICE_BYTES` per loop turn, as `fast_impl` does: the library parses
        (and answers pings of) a whole read at once, which a read of tiny frames makes seconds."""
        if len(data) > READ_SLICE_BYTES:
            self._backlog = data[READ_SLICE_BYTES:]
            data = data[:READ_SLICE_BYTES]
            self.transport.pause_reading()
        super().data_received(data)
        if self._backlog:
            self.loop.call_soon(self._vb_continue)

    def _vb_continue(self) -> None:
        if self.transport is None or self.transport.is_closing() or not self._backlog:
            return
        data, self._backlog = self._backlog, b""
        self._vb_feed(data)
        if not self._backlog and not self.recv_messages.paused:   # the library's own pause stays
            self.transport.resume_reading()

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

    def is_closing(self) -> bool:
        """`base.Conn`: the socket is closing or gone."""
        return self.transport is None or self.transport.is_closing()


class WsEndpoint:
    """An `Endpoint` over a `websockets` asyncio connection (server or client side).

    `send` writes through the Sans-I/O protocol object without awaiting `drain()`, so it never
    blocks (bounded as `base.Limits` says)."""

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

    def extra_info(self, name: str) -> Any:
        transport = self._ws.transport
        return transport.get_extra_info(name) if transport is not None else None


class WsListener:
    """`base.Listener` over websockets' `Server`."""

    __slots__ = ("server",)

    def __init__(self, server: Server) -> None:
        self.server = server

    @property
    def sockets(self) -> Sequence[Any]:
        return self.server.sockets

    def close(self, close_connections: bool = True) -> None:
        self.server.close(close_connections=close_connections)

    async def wait_closed(self) -> None:
        await self.server.wait_closed()

    def abort_all(self) -> None:
        for conn in list(self.server.connections):
            if conn.transport is not None:
                conn.transport.abort()


async def listen(handler: Handler, process_request: ProcessRequest, host: str, port: int, *,
                 opts: ListenOptions, process_response: ProcessResponse | None = None,
                 on_refused: OnRefused | None = None) -> WsListener:
    """`base`'s `listen` on websockets' asyncio server."""
    limits = opts.limits
    conn_cls = type("VoicebridgeConnection", (BoundedServerConnection,), {
        "limits": limits, "pending": {}, "max_pending": opts.max_pending,
        "on_refused": staticmethod(on_refused) if on_refused is not None else None})

    def on_request(conn: BoundedServerConnection, request: Request) -> Response | None:
        conn.handshake_done()
        return answer(process_request, request, conn, conn.remote_address)

    def on_response(conn: BoundedServerConnection, request: Request, response: Response) -> None:
        process_response(conn, response.status_code)  # type: ignore[misc]

    async def run(ws: BoundedServerConnection) -> None:
        await handler(WsEndpoint(ws, limits), ws)

    server = await serve(
        run, host, port, process_request=on_request,  # type: ignore[arg-type]
        process_response=on_response if process_response is not None else None,  # type: ignore[arg-type]
        create_connection=conn_cls, max_size=opts.max_size, compression=None,
        ping_interval=opts.ping_interval_s, ping_timeout=opts.ping_interval_s,
        close_timeout=opts.close_timeout_s, open_timeout=opts.handshake_timeout_s,
        max_queue=max(2, limits.recv_queue_bytes // opts.max_size), backlog=opts.backlog,
        reuse_port=opts.reuse_port or None, server_header=opts.server_header)
    return WsListener(server)


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
        raise ConnectFailed(f"upstream refused the websocket: HTTP {status}", status,
                            retry_after_s(e.response.headers.get("Retry-After"))) from None
    except (asyncio.TimeoutError, TimeoutError):
        raise ConnectFailed(f"upstream connect timed out after {timeout_s:g} s") from None
    except (OSError, InvalidHandshake, InvalidURI, ValueError) as e:
        raise ConnectFailed(f"upstream connect failed: {type(e).__name__}: {e}"[:200]) from None
    return WsEndpoint(ws, limits)
