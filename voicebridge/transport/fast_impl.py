"""Transport `fast` (the default): `websockets`' Sans-I/O protocol driven straight from uvloop.

Why: the profile of `make bench` shows most of the bridge's CPU inside `websockets`' asyncio
layer (an async context manager, a weak set and a queue per send/recv). The same protocol
objects (`ServerProtocol`/`ClientProtocol`: parsing, framing, close handshake, ping/pong) fed
from a plain `asyncio.Protocol` do the same work with far less Python per frame
(../shared/perf/relay_floor.py measures that difference on this machine).

The module interface (`listen`, `dial`) and the `Endpoint` contract are in `base`'s docstring;
here text messages arrive as `bytes` of UTF-8 (both our decoders take bytes), and keepalive
aborts a connection with no pong by the next ping.
`FastEndpoint` is one connection (either side) and also its `base.Conn`; `FastServer` the
listener: at most `max_pending` connections in their opening handshake, each given
`handshake_timeout_s` to send its upgrade request; past the cap the *oldest* one is dropped, so
a slowloris holding the slots cannot lock out a real client (whose request follows its connect
at once); one request per connection. `listen` adapts `FastServer`'s hooks (websockets'
`Request`/`Response`) to `HttpRequest`/`HttpResponse`.

From `_shared` (the same in the `picows` transport, none of it per frame): `FastServer`'s
listener half (pending cap, the answer to the upgrade request, handler tasks, close/abort_all/
wait_closed), the adaptation of `listen`'s hooks and the endpoint's send and close timers
(`EndpointTimers`). The per-frame path is all here.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_mod
from collections import deque
from typing import Any, Awaitable, Callable

from websockets.client import ClientProtocol
from websockets.exceptions import InvalidURI
from websockets.frames import Frame, Opcode
from websockets.http11 import Request, Response
from websockets.protocol import State
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

from ._masks import install as _install_masks
from ._shared import EndpointTimers, RawProcessRequest, RawProcessResponse, SansIoServer, hooks
from .base import (MAX_PINGS_PER_S, MAX_QUEUED_MESSAGES, READ_SLICE_BYTES, ConnectFailed,
                   EndpointClosed, Handler, Limits, ListenOptions, OnRefused, ProcessRequest,
                   ProcessResponse, RequestHead, closed_error, retry_after_s)

_install_masks()   # client frame masks from a pooled CSPRNG read (see _masks)

_TEXT, _BINARY, _CONT, _PING, _PONG = Opcode.TEXT, Opcode.BINARY, Opcode.CONT, Opcode.PING, Opcode.PONG
# and `_OPEN` rather than `State.OPEN` per frame: on CPython 3.11 an enum class attribute read
# goes through EnumType.__getattr__'s slot wrapper, unspecialized (~0.1 µs, ~850 instructions)
_OPEN, _CLOSED = State.OPEN, State.CLOSED
_tls: ssl_mod.SSLContext | None = None


def _tls_context() -> ssl_mod.SSLContext:
    """One shared client TLS context: creating one costs ~50 ms of blocked loop."""
    global _tls
    if _tls is None:
        _tls = ssl_mod.create_default_context()
    return _tls


class FastEndpoint(EndpointTimers, asyncio.Protocol):
    """One websocket connection (either side) as an `Endpoint`. `pause_writing`,
    `resume_writing`, `_abort_for`, `_expect_close` and the end of `close()` are
    `_shared.EndpointTimers`'."""

    # Slots, not an instance dict: CPython 3.11 keeps instance attributes in its compact
    # key-shared layout only below 30 of them. Past that (31 here) no method lookup on an
    # endpoint (`ep.recv()`, `self._flush()`, ...) is specialized: ~200 instructions more each,
    # ~1 % of the bridge's CPU. tests/test_fast_slots.py checks it; list a new attribute here.
    __slots__ = ("proto", "limits", "_handshake_timeout_s", "_queued_bytes", "_backlog",
                 "_transport_paused", "_pings", "_pings_since", "_cause", "_send_timer",
                 "transport", "_loop", "_queue", "_reading_paused", "_waiter", "_fragments",
                 "_paused", "_lost", "_lost_fut", "_close_timeout_s", "_ping_interval_s",
                 "_ping_handle", "_awaiting_pong", "_close_handle", "_open_handle", "on_request",
                 "refused", "_head", "_eof_sent", "handshake", "request")

    def __init__(self, proto: ServerProtocol | ClientProtocol, *, close_timeout_s: float,
                 ping_interval_s: float | None, limits: Limits = Limits(),
                 handshake_timeout_s: float = 10.0) -> None:
        self.proto = proto
        self.limits = limits
        self._handshake_timeout_s = handshake_timeout_s
        self._queued_bytes = 0
        self._backlog = b""          # received, not parsed yet (see _feed)
        self._transport_paused = False
        self._pings = 0
        self._pings_since = 0.0
        self._cause: str | None = None           # why we aborted it ourselves (send bounds)
        self._send_timer: asyncio.TimerHandle | None = None
        self.transport: asyncio.Transport | None = None
        self._loop = asyncio.get_running_loop()
        self._queue: deque[bytes] = deque()
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._fragments: list[bytes] = []
        self._paused = False
        self._lost = False
        self._lost_fut: asyncio.Future[None] = self._loop.create_future()
        self._close_timeout_s = close_timeout_s
        self._ping_interval_s = ping_interval_s
        self._ping_handle: asyncio.TimerHandle | None = None
        self._awaiting_pong = False
        self._close_handle: asyncio.TimerHandle | None = None
        self._open_handle: asyncio.TimerHandle | None = None
        # handshake hooks, set by the listener / dialer
        self.on_request: Callable[[FastEndpoint, Request], None] | None = None
        self.refused = False
        self._head: RequestHead | None = None
        self._eof_sent = False
        self.handshake: asyncio.Future[Response] | None = None
        self.request: Request | None = None

    # ------------------------------------------------------------------ asyncio.Protocol
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        if self.refused:
            transport.abort()
            return
        if self.on_request is not None:  # server side: bound the opening handshake
            self._head = RequestHead()
            self._open_handle = self._loop.call_later(self._handshake_timeout_s, self.abort)

    def opened(self) -> None:
        """The handshake is over (101 sent or received): stop its timer, start keepalive."""
        if self._open_handle is not None:
            self._open_handle.cancel()
            self._open_handle = None
        if self._ping_interval_s:
            self._ping_handle = self._loop.call_later(self._ping_interval_s, self._ping_tick)

    def data_received(self, data: bytes) -> None:
        if self._head is not None and not self._head.done:   # server side, before the upgrade
            head = self._head.feed(data, self.transport)
            if head is None:
                return
            data = head
        if self._backlog:            # still working through an earlier read: keep the order
            self._backlog += data
            self._sync_reading()
            return
        if len(data) <= READ_SLICE_BYTES:   # the usual read: parsed at once, nothing held back
            self._parse(data)    # (`_deliver` and `recv` keep the socket's reading in step)
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        """Parse at most `READ_SLICE_BYTES` per loop turn: a read full of tiny frames (tens of
        thousands in 256 KB) must not hold the loop for seconds. The rest waits in `_backlog`,
        with the socket not read, and is parsed on the next turns."""
        if len(data) > READ_SLICE_BYTES:
            self._backlog = data[READ_SLICE_BYTES:]
            data = data[:READ_SLICE_BYTES]
        self._parse(data)
        self._sync_reading()
        if self._backlog and not self._reading_paused and not self._lost:
            self._loop.call_soon(self._continue)

    def _continue(self) -> None:
        if self._lost or self._reading_paused or not self._backlog:
            return
        data, self._backlog = self._backlog, b""
        self._feed(data)

    def _sync_reading(self) -> None:
        """Read the socket only while there is no backlog and the queue has room."""
        want_paused = bool(self._backlog) or self._reading_paused
        transport = self.transport
        if want_paused != self._transport_paused and transport is not None and not self._lost:
            self._transport_paused = want_paused
            if want_paused:
                transport.pause_reading()
            else:
                transport.resume_reading()

    def _parse(self, data: bytes) -> None:
        proto = self.proto
        try:
            proto.receive_data(data)
        except Exception:  # the parser must never take the loop's callback down with it
            self.abort()
            return
        for ev in proto.events_received():
            if type(ev) is Frame:
                op = ev.opcode
                if op is _TEXT or op is _BINARY:
                    if ev.fin:
                        self._deliver(ev.data)
                    else:
                        self._fragments = [ev.data]
                elif op is _CONT:
                    frags = self._fragments
                    frags.append(ev.data)
                    if ev.fin:
                        self._deliver(b"".join(frags))
                        self._fragments = []
                    elif len(frags) > self.limits.max_fragments:
                        self._fragments = []   # the protocol bounds bytes, this the count
                        proto.fail(1009, "too many fragments")
                        break
                elif op is _PONG:
                    self._awaiting_pong = False
                elif op is _PING:          # answered by the protocol; a flood of them is not
                    now = self._loop.time()
                    if now - self._pings_since >= 1.0:
                        self._pings_since, self._pings = now, 0
                    self._pings += 1
                    if self._pings > MAX_PINGS_PER_S:
                        proto.fail(1008, "too many pings")
                        break
                # CLOSE is handled by the protocol
            elif type(ev) is Request:
                if self.request is not None:  # a second request on one connection: refuse
                    self.abort()
                    return
                self.request = ev
                if self.on_request is not None:
                    self.on_request(self, ev)
            elif type(ev) is Response:
                if self.handshake is not None and not self.handshake.done():
                    self.handshake.set_result(ev)
        self._flush()
        if proto.state is _CLOSED or proto.close_expected():
            self._expect_close()
            self._wake()

    def eof_received(self) -> bool | None:
        if self._backlog:            # the peer is done sending: parse what is left first
            data, self._backlog = self._backlog, b""
            self._parse(data)
        self.proto.receive_eof()
        self._flush()
        self._wake()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._lost = True
        for h in (self._ping_handle, self._close_handle, self._open_handle, self._send_timer):
            if h is not None:
                h.cancel()
        if not self._lost_fut.done():
            self._lost_fut.set_result(None)
        if self.handshake is not None and not self.handshake.done():
            self.handshake.set_exception(ConnectionError("connection lost during handshake"))
        self._wake()

    # ------------------------------------------------------------------ internals
    def _deliver(self, data: bytes) -> None:
        self._queue.append(data)
        self._queued_bytes += len(data)
        if ((len(self._queue) > MAX_QUEUED_MESSAGES
             or self._queued_bytes > self.limits.recv_queue_bytes)
                and not self._reading_paused and self.transport):
            self._reading_paused = True  # bounded memory: TCP backpressure on a fast sender
            self._sync_reading()
        self._wake()

    def _wake(self) -> None:
        """Resume a `recv()` waiting for a message or for the end of the connection."""
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _flush(self) -> None:
        transport = self.transport
        if transport is None:
            return
        for data in self.proto.data_to_send():
            if self._eof_sent:
                break
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                self._eof_sent = True
                try:
                    transport.write_eof()  # the protocol ended the stream (after a close)
                except (OSError, RuntimeError):  # uvloop raises when the socket is already gone
                    pass
        if self._paused and transport.get_write_buffer_size() > self.limits.send_buffer_bytes:
            self._abort_for("send_buffer_full")  # e.g. pongs to a peer that never reads

    def _closed_error(self) -> EndpointClosed:
        p = self.proto  # close_rcvd is known as soon as the peer's close frame arrived
        return closed_error(p.close_sent, p.close_rcvd, p.close_rcvd_then_sent, self._cause)

    def _ping_tick(self) -> None:
        if self._lost or self.proto.state is not _OPEN:
            return
        if self._awaiting_pong:
            self.proto.fail(1011, "keepalive ping timeout")
            self._flush()
            self.abort()
            return
        self._awaiting_pong = True
        self.proto.send_ping(b"vb")
        self._flush()
        self._ping_handle = self._loop.call_later(self._ping_interval_s, self._ping_tick)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ Endpoint
    async def recv(self) -> bytes:
        while True:
            if self._queue:
                data = self._queue.popleft()
                self._queued_bytes -= len(data)
                if (self._reading_paused and len(self._queue) <= MAX_QUEUED_MESSAGES // 2
                        and self._queued_bytes <= self.limits.recv_queue_bytes // 2):
                    self._reading_paused = False
                    if self._backlog:        # parse the rest of the last read first
                        self._loop.call_soon(self._continue)
                    else:
                        self._sync_reading()
                return data
            if self._lost or self.proto.state is not _OPEN:
                raise self._closed_error()
            fut = self._loop.create_future()
            self._waiter = fut
            await fut

    async def send(self, frame: str) -> None:
        self.send_nowait(frame)

    def send_nowait(self, frame: str) -> None:
        """Never waits: see `base.Limits` for what bounds a peer that does not read."""
        proto = self.proto
        if proto.state is not _OPEN or self._lost:
            raise self._closed_error()
        proto.send_text(frame.encode())
        self._flush()
        if self._cause is not None:
            raise self._closed_error()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._lost:
            return
        if self.proto.state is _OPEN:
            self.proto.send_close(code, reason)
            self._flush()
        await self._await_close()   # aborts after close_timeout_s, even if this is cancelled

    def abort(self) -> None:
        if self.transport is not None and not self._lost:
            self.transport.abort()

    @property
    def close_code(self) -> int | None:
        if not self._lost and self.proto.state is _OPEN:
            return None
        return self.proto.close_code if self.proto.close_code is not None else 1006

    @property
    def remote_address(self) -> Any:
        return self.transport.get_extra_info("peername") if self.transport else None

    def is_closing(self) -> bool:
        """`base.Conn`: the socket is closing or gone."""
        return self.transport is None or self.transport.is_closing()

    def extra_info(self, name: str) -> Any:
        """The transport's `get_extra_info(name)` (e.g. "socket", "peername"); None once gone."""
        return self.transport.get_extra_info(name) if self.transport else None


class FastServer(SansIoServer[FastEndpoint]):
    """Listener: HTTP upgrade handled by `process_request` first (health, auth), then `handler`.
    Its hooks are in websockets' types (`listen` adapts `base`'s); the rest of the listener is
    `_shared.SansIoServer`."""

    def __init__(self, handler: Callable[[FastEndpoint], Awaitable[None]],
                 process_request: RawProcessRequest, *, max_size: int,
                 close_timeout_s: float, ping_interval_s: float | None, server_header: str,
                 limits: Limits = Limits(), handshake_timeout_s: float = 10.0,
                 max_pending: int = 1 << 30, backlog: int = 100, reuse_port: bool = False,
                 on_refused: Callable[[str], None] | None = None,
                 process_response: RawProcessResponse | None = None) -> None:
        super().__init__(handler, process_request, server_header=server_header,
                         max_pending=max_pending, backlog=backlog, reuse_port=reuse_port,
                         on_refused=on_refused, process_response=process_response)
        self._limits = limits
        self._handshake_timeout_s = handshake_timeout_s
        self._max_size = max_size
        self._close_timeout_s = close_timeout_s
        self._ping_interval_s = ping_interval_s

    def _make(self) -> FastEndpoint:
        ep = FastEndpoint(ServerProtocol(max_size=self._max_size),
                          close_timeout_s=self._close_timeout_s, ping_interval_s=self._ping_interval_s,
                          limits=self._limits, handshake_timeout_s=self._handshake_timeout_s)
        ep.on_request = self._on_request
        self._admit(ep, ep)
        return ep

    def _on_request(self, ep: FastEndpoint, request: Request) -> None:
        proto: ServerProtocol = ep.proto  # type: ignore[assignment]
        response = self._answer(ep, proto, ep, request)
        proto.send_response(response)
        ep._flush()
        if response.status_code != 101:
            ep._expect_close()
            return
        ep.opened()
        self._spawn(ep)


async def listen(handler: Handler, process_request: ProcessRequest, host: str, port: int, *,
                 opts: ListenOptions, process_response: ProcessResponse | None = None,
                 on_refused: OnRefused | None = None) -> FastServer:
    """`base`'s `listen` on `FastServer`."""
    run, on_request, on_response = hooks(handler, process_request, process_response)
    server = FastServer(run, on_request, max_size=opts.max_size,
                        close_timeout_s=opts.close_timeout_s, ping_interval_s=opts.ping_interval_s,
                        server_header=opts.server_header, limits=opts.limits,
                        handshake_timeout_s=opts.handshake_timeout_s, max_pending=opts.max_pending,
                        backlog=opts.backlog, reuse_port=opts.reuse_port, on_refused=on_refused,
                        process_response=on_response)
    await server.start(host, port)
    return server


async def dial(url: str, headers: dict[str, str], *, timeout_s: float, max_size: int,
               close_timeout_s: float, ping_interval_s: float | None = 20.0,
               limits: Limits = Limits()) -> FastEndpoint:
    """`base`'s `dial` on the lean transport (ws:// and wss://)."""
    loop = asyncio.get_running_loop()

    async def connect() -> FastEndpoint:
        uri = parse_uri(url)
        ssl_ctx = _tls_context() if uri.secure else None
        proto = ClientProtocol(uri, max_size=max_size)
        ep = FastEndpoint(proto, close_timeout_s=close_timeout_s, ping_interval_s=ping_interval_s,
                          limits=limits)
        await loop.create_connection(lambda: ep, uri.host, uri.port, ssl=ssl_ctx,
                                     server_hostname=uri.host if ssl_ctx else None)
        try:  # from here on the socket is ours: never leave it open (an open session is billed)
            ep.handshake = loop.create_future()
            request = proto.connect()
            for k, v in headers.items():
                request.headers[k] = v
            request.headers["User-Agent"] = "voicebridge"
            proto.send_request(request)
            ep._flush()
            response = await ep.handshake
            if response.status_code != 101:
                raise ConnectFailed(f"upstream refused the websocket: HTTP {response.status_code}",
                                    response.status_code,
                                    retry_after_s(response.headers.get("Retry-After")))
            if proto.handshake_exc is not None:
                raise ConnectFailed(f"upstream handshake invalid: {proto.handshake_exc}"[:200])
        except BaseException:
            ep.abort()
            raise
        ep.opened()
        return ep

    try:
        return await asyncio.wait_for(connect(), timeout_s)
    except ConnectFailed:
        raise
    except (asyncio.TimeoutError, TimeoutError):
        raise ConnectFailed(f"upstream connect timed out after {timeout_s:g} s") from None
    except (OSError, ConnectionError, ValueError, InvalidURI) as e:  # a URL parse_uri rejects
        raise ConnectFailed(f"upstream connect failed: {type(e).__name__}: {e}"[:200]) from None
