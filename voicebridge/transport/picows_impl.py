"""Transport `picows`: picows' Cython frame codec under the bridge's own bounds.

Why: with the `fast` transport most of the bridge's transport CPU is websockets' frame codec in
Python (parse, serialise, one generator step per frame). picows parses frames in Cython and
writes a server frame straight to the socket. Here it does only that. What the contract in `base`
asks for (the bounds, the close handshake, keepalive, the close codes) is done here, not by
picows' own helpers, so this transport behaves like `fast`:

- **Opening handshake (server).** `_Opening`, a plain `asyncio.Protocol`, owns a connection until
  its upgrade: the pending-handshake cap (the oldest is dropped), `handshake_timeout_s`, one
  request head (`RequestHead`), parsed and checked by websockets' Sans-I/O `ServerProtocol`
  (the same checks as `fast`), `process_request`, `process_response`. On a 101 the socket is
  handed to picows' protocol, which is fed a canonical upgrade request carrying the client's key:
  picows writes the 101 (with our `Server` header), and from then on it parses the frames.
- **Dial (client).** picows sends the upgrade request with our headers and checks the answer;
  redirects are not followed (a 3xx is a `ConnectFailed` with its status). Client frames are
  built here, masked with keys from the pooled CSPRNG read of `_masks` (picows masks with libc
  `rand()`, which RFC 6455 §5.3 rules out); the payload is masked by websockets' C `apply_mask`.
- **Frames received.** `PicowsEndpoint.on_ws_frame` checks what picows leaves to its user:
  reserved bits (1002), continuation order (1002), the size of a fragmented message (1009) and
  the count of its fragments (`Limits.max_fragments`, 1009), close codes and reasons (1002,
  1007), pings per second (`MAX_PINGS_PER_S`, 1008; pongs are ours, picows' auto-pong is off).
  picows itself closes 1009 on a frame over `max_size` and 1002 on a malformed frame. Text
  messages are returned as `bytes` of UTF-8, as `fast` does.
- **Reads** are at most `READ_CAP_BYTES` per callback: picows keeps one read buffer per
  connection, which grows to about twice that plus the largest frame and never shrinks, so the
  cap is what keeps a burst of model audio from leaving tens of KiB behind on every call. Past
  the received-queue bounds the socket is not read. Once a connection is open nothing of its
  handshake is kept (websockets' parser, the request, picows' copies of the headers).
- **Sends** never wait; the send bounds of `Limits` abort the socket (causes as in `base`).
- **Close.** As websockets' Sans-I/O protocol: the peer's close frame is echoed, a server then
  half-closes (EOF) and a client waits for the server's EOF, both bounded by the close timeout;
  failing a connection sends our close frame and discards what follows.

From `_shared` (the same in the `fast` transport, none of it per frame): `PicowsServer`'s
listener half (the pending-handshake cap, the answer to the upgrade request, handler tasks,
close/abort_all/wait_closed) and the endpoint's send and close timers (`EndpointTimers`).
The per-frame path (`on_ws_frame`, `recv`, `send_nowait`) is all here.

picows logs nothing (`_Quiet`): what happened to a connection is told by the bridge's own
events. picows' protocol class and constructor are internal: the version range in
pyproject.toml is the one tested here.
"""

from __future__ import annotations

import asyncio
import os
import ssl as ssl_mod
import struct
from collections import deque
from typing import Any, Callable, NamedTuple

from picows import (WSAutoPingStrategy, WSCloseCode, WSError, WSInvalidStatusError, WSListener,
                    WSMsgType, WSUpgradeResponse, WSUpgradeResponseWithListener)
from picows.picows import WSProtocol  # type: ignore[attr-defined]  # the class picows' own api builds
from picows.url import parse_url
from websockets.http11 import Request
from websockets.server import ServerProtocol

from ._masks import PooledSecrets
from ._shared import EndpointTimers, SansIoServer, hooks
from .base import (MAX_PINGS_PER_S, MAX_QUEUED_MESSAGES, ConnectFailed, EndpointClosed, Handler,
                   Limits, ListenOptions, OnRefused, ProcessRequest, ProcessResponse, RequestHead,
                   closed_error, retry_after_s)

try:
    from websockets.speedups import apply_mask
except ImportError:  # websockets built without its C extension
    from websockets.utils import apply_mask

READ_CAP_BYTES = 4 * 1024       # bytes handed to picows per read callback: its buffer grows to
                                # about twice this plus the largest frame, and stays (memory)
READ_BUFFER_BYTES = 2048        # picows' initial read buffer per connection (its minimum; it grows on demand)

_TEXT, _BINARY, _CONT = WSMsgType.TEXT, WSMsgType.BINARY, WSMsgType.CONTINUATION
_PING, _PONG, _CLOSE = WSMsgType.PING, WSMsgType.PONG, WSMsgType.CLOSE
_CONNECTING, _OPEN, _CLOSING, _CLOSED = 0, 1, 2, 3
# close codes a peer may send (RFC 6455 §7.4; as websockets' `Close.check`)
_VALID_CODES = frozenset((1000, 1001, 1002, 1003, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014))



class _Quiet:
    """picows' logger: says nothing (our own events tell what happened). Not a `logging.Logger`,
    so picows does not make a child logger per connection either."""

    def isEnabledFor(self, level: int) -> bool:
        return False

    def _nothing(self, *args: Any, **kwargs: Any) -> None:
        pass

    debug = info = warning = error = exception = critical = log = _nothing


_LOG = _Quiet()

_KEYS = PooledSecrets()         # client frame masks (see _masks); a forked child drops them
_H2, _H4, _H10 = struct.Struct("!BB").pack, struct.Struct("!BBH").pack, struct.Struct("!BBQ").pack
_tls: ssl_mod.SSLContext | None = None

os.register_at_fork(after_in_child=_KEYS.drop)


def _tls_context() -> ssl_mod.SSLContext:
    """One shared client TLS context: creating one costs ~50 ms of blocked loop."""
    global _tls
    if _tls is None:
        _tls = ssl_mod.create_default_context()
    return _tls


def client_frame(opcode: int, payload: bytes) -> bytes:
    """One final client frame (RFC 6455 §5.2), masked with a key from the CSPRNG pool."""
    n = len(payload)
    if n < 126:
        head = _H2(0x80 | opcode, 0x80 | n)
    elif n < 65536:
        head = _H4(0x80 | opcode, 0xFE, n)
    else:
        head = _H10(0x80 | opcode, 0xFF, n)
    key = _KEYS.token_bytes(4)
    return b"".join((head, key, apply_mask(payload, key)))


class _Close(NamedTuple):
    """A close frame as `base.closed_error` reads it."""
    code: int
    reason: str


class _Protocol(WSProtocol):  # type: ignore[misc]
    """picows' protocol, handed at most `READ_CAP_BYTES` per read (its buffer only grows)."""

    def get_buffer(self, size_hint: int) -> memoryview:
        buf: memoryview = WSProtocol.get_buffer(self, size_hint)
        return buf[:READ_CAP_BYTES] if len(buf) > READ_CAP_BYTES else buf


def _protocol(client: bool, host_port: str | None, path: str | None,
              factory: Callable[..., Any], max_size: int,
              headers: list[tuple[str, str]] | None) -> _Protocol:
    # picows' own handshake timeout and auto-ping/pong are off: ours are in the endpoint
    return _Protocol(host_port, path, client, factory, _LOG, True, None, False, 20.0, 20.0,
                     WSAutoPingStrategy.PING_WHEN_IDLE, False, max_size, headers, READ_BUFFER_BYTES)


class PicowsEndpoint(EndpointTimers, WSListener):
    """One websocket connection (either side) as a `base.Endpoint`, and its `base.Conn`.
    `pause_writing`, `resume_writing` (ahead of `WSListener`'s), `_abort_for`, `_expect_close`
    and the end of `close()` are `_shared.EndpointTimers`'."""

    __slots__ = ("_client", "_ws", "_tr", "limits", "_max_size", "_close_timeout_s",
                 "_ping_interval_s", "_loop", "_state", "_queue", "_queued_bytes",
                 "_reading_paused", "_waiter", "_frags", "_frag_bytes", "_pings", "_pings_since",
                 "_awaiting_pong", "_ping_handle", "_close_handle", "_send_timer", "_paused",
                 "_cause", "_lost", "_lost_fut", "_sent", "_rcvd", "_rcvd_then_sent", "_discard",
                 "_eof_sent")

    def __init__(self, *, client: bool, max_size: int, close_timeout_s: float,
                 ping_interval_s: float | None, limits: Limits) -> None:
        self._client = client
        self._ws: Any = None                     # picows' WSTransport, once upgraded
        self._tr: asyncio.Transport | None = None
        self.limits = limits
        self._max_size = max_size
        self._close_timeout_s = close_timeout_s
        self._ping_interval_s = ping_interval_s
        self._loop = asyncio.get_running_loop()
        self._state = _CONNECTING
        self._queue: deque[bytes] = deque()
        self._queued_bytes = 0
        self._reading_paused = False
        self._waiter: asyncio.Future[None] | None = None
        self._frags: list[bytes] | None = None   # the fragmented message being received
        self._frag_bytes = 0
        self._pings = 0
        self._pings_since = 0.0
        self._awaiting_pong = False
        self._ping_handle: asyncio.TimerHandle | None = None
        self._close_handle: asyncio.TimerHandle | None = None
        self._send_timer: asyncio.TimerHandle | None = None
        self._paused = False
        self._cause: str | None = None           # why we aborted it ourselves (send bounds)
        self._lost = False
        self._lost_fut: asyncio.Future[None] = self._loop.create_future()
        self._sent: _Close | None = None
        self._rcvd: _Close | None = None
        self._rcvd_then_sent: bool | None = None
        self._discard = False                    # closing or failed: frames are ignored
        self._eof_sent = False

    # ------------------------------------------------------------------ picows' callbacks
    def on_ws_connected(self, transport: Any) -> None:
        self._ws = transport
        self._tr = transport.underlying_transport
        self._state = _OPEN
        for message in (transport.request, transport.response):   # picows keeps both for good:
            if message is not None:                                 # not their headers (memory,
                message.headers.clear()                             # and the dial's credentials)
        if self._ping_interval_s:
            self._ping_handle = self._loop.call_later(self._ping_interval_s, self._ping_tick)

    def on_ws_frame(self, transport: Any, frame: Any) -> None:
        if self._discard:
            return
        op = frame.msg_type
        if frame.rsv1 or frame.rsv2 or frame.rsv3:
            self._fail(1002, "reserved bits must be 0")
        elif op is _TEXT or op is _BINARY:
            if self._frags is not None:
                self._fail(1002, "expected a continuation frame")
            elif frame.fin:
                self._deliver(frame.get_payload_as_bytes())
            else:
                data = frame.get_payload_as_bytes()
                self._frags, self._frag_bytes = [data], len(data)
        elif op is _CONT:
            frags = self._frags
            if frags is None:
                self._fail(1002, "unexpected continuation frame")
                return
            data = frame.get_payload_as_bytes()
            self._frag_bytes += len(data)
            if self._frag_bytes > self._max_size:
                self._fail(1009, f"message over {self._max_size} bytes")
                return
            frags.append(data)
            if frame.fin:
                self._frags = None
                self._deliver(b"".join(frags))
            elif len(frags) > self.limits.max_fragments:
                self._fail(1009, "too many fragments")   # the size bound counts bytes, this fragments
        elif op is _PONG:
            self._awaiting_pong = False
        elif op is _PING:
            now = self._loop.time()
            if now - self._pings_since >= 1.0:
                self._pings_since, self._pings = now, 0
            self._pings += 1
            if self._pings > MAX_PINGS_PER_S:
                self._fail(1008, "too many pings")
                return
            self._send_frame(_PONG, 0xA, frame.get_payload_as_bytes())
            self._check_send_buffer()
        elif op is _CLOSE:
            self._close_received(frame.get_payload_as_bytes())

    def on_ws_disconnected(self, transport: Any) -> None:
        self._adopt_picows_close()
        self._connection_lost()

    # ------------------------------------------------------------------ internals
    def _deliver(self, data: bytes) -> None:
        q = self._queue
        q.append(data)
        self._queued_bytes += len(data)
        if ((len(q) > MAX_QUEUED_MESSAGES or self._queued_bytes > self.limits.recv_queue_bytes)
                and not self._reading_paused and not self._lost and self._tr is not None):
            self._reading_paused = True  # bounded memory: TCP backpressure on a fast sender
            self._tr.pause_reading()
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _wake(self) -> None:
        w = self._waiter
        if w is not None:
            self._waiter = None
            if not w.done():
                w.set_result(None)

    def _send_frame(self, op: Any, opcode: int, payload: bytes) -> None:
        """A control frame on either side."""
        if self._lost or self._tr is None or self._eof_sent:
            return
        if self._client:
            self._tr.write(client_frame(opcode, payload))
        else:
            self._ws.send(op, payload)

    def _send_close_frame(self, code: int, reason: bytes) -> None:
        """A close frame. On the server side picows sends it, so that it sends nothing after it
        (not even its own close on a malformed frame: a write after our EOF is an error)."""
        if self._client or self._lost or self._tr is None or self._eof_sent:
            self._send_frame(_CLOSE, 0x8, code.to_bytes(2, "big") + reason if code != 1005 else b"")
            return
        self._ws.send_close(WSCloseCode(code if code != 1005 else 1000), reason)

    def _check_send_buffer(self) -> None:
        tr = self._tr
        if self._paused and tr is not None and tr.get_write_buffer_size() > self.limits.send_buffer_bytes:
            self._abort_for("send_buffer_full")  # e.g. pongs to a peer that never reads

    def _send_close(self, code: int, reason: str) -> None:
        self._send_close_frame(code, reason.encode()[:123].decode(errors="ignore").encode())  # <= 125 bytes, valid UTF-8
        self._sent = _Close(code, reason)
        if self._rcvd is not None:
            self._rcvd_then_sent = True
        self._state = _CLOSING

    def _write_eof(self) -> None:
        tr = self._tr
        if tr is not None and not self._lost and not self._eof_sent and tr.can_write_eof():
            self._eof_sent = True
            try:
                tr.write_eof()
            except (OSError, RuntimeError):  # uvloop raises when the socket is already gone
                pass

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 §7.1.7) as websockets does: our close frame (unless one
        was sent), then what the peer sends is discarded; a server half-closes at once, a
        client waits for the server to close. Aborted after the close timeout either way."""
        self._discard = True
        self._frags = None
        if self._state == _OPEN:
            self._send_close(code, reason)
        if not self._client:
            self._write_eof()
        self._expect_close()
        self._wake()

    def _adopt_picows_close(self) -> None:
        """picows failed the connection itself (a frame over `max_size`: 1009; a malformed one:
        1002), which it does not tell its listener: take its close frame as ours."""
        ws = self._ws
        if self._sent is None and ws is not None and ws.is_close_frame_sent:
            hs = ws.close_handshake
            sent = hs.sent if hs is not None else None
            self._sent = _Close(int(sent.code), sent.reason or "") if sent is not None else _Close(1002, "")
            self._rcvd_then_sent = None
            self._state = _CLOSING
            self._discard = True
            self._expect_close()

    def _close_received(self, payload: bytes) -> None:
        self._adopt_picows_close()
        n = len(payload)
        if n == 0:
            rcvd = _Close(1005, "")
        else:
            code = int.from_bytes(payload[:2], "big")
            if n == 1 or not (code in _VALID_CODES or 3000 <= code < 5000):
                self._fail(1002, "invalid close frame")
                return
            try:
                rcvd = _Close(code, payload[2:].decode())
            except UnicodeDecodeError:
                self._fail(1007, "invalid close reason")
                return
        self._rcvd = rcvd
        if self._state == _CLOSING:
            self._rcvd_then_sent = False
        if self._frags is not None:
            self._fail(1002, "incomplete fragmented message")
            return
        if self._state == _OPEN:
            self._send_close_frame(rcvd.code, payload[2:])   # echo it, as websockets does
            self._sent = rcvd
            self._rcvd_then_sent = True
            self._state = _CLOSING
        self._discard = True
        if not self._client:
            self._write_eof()
        self._expect_close()
        self._wake()

    def _connection_lost(self) -> None:
        if self._lost:
            return
        self._lost = True
        self._state = _CLOSED
        for h in (self._ping_handle, self._close_handle, self._send_timer):
            if h is not None:
                h.cancel()
        if not self._lost_fut.done():
            self._lost_fut.set_result(None)
        self._wake()

    def _closed_error(self) -> EndpointClosed:
        self._adopt_picows_close()
        return closed_error(self._sent, self._rcvd, self._rcvd_then_sent, self._cause)

    def _ping_tick(self) -> None:
        if self._lost or self._state != _OPEN:
            return
        if self._awaiting_pong:
            self._fail(1011, "keepalive ping timeout")
            self.abort()
            return
        self._awaiting_pong = True
        self._send_frame(_PING, 0x9, b"vb")
        self._check_send_buffer()
        self._ping_handle = self._loop.call_later(self._ping_interval_s, self._ping_tick)  # type: ignore[arg-type]

    # ------------------------------------------------------------------ Endpoint
    async def recv(self) -> bytes:
        while True:
            q = self._queue
            if q:
                data = q.popleft()
                self._queued_bytes -= len(data)
                if (self._reading_paused and len(q) <= MAX_QUEUED_MESSAGES // 2
                        and self._queued_bytes <= self.limits.recv_queue_bytes // 2):
                    self._reading_paused = False
                    if not self._lost and self._tr is not None:
                        self._tr.resume_reading()
                return data
            if self._lost or self._state != _OPEN:
                raise self._closed_error()
            fut = self._loop.create_future()
            self._waiter = fut
            await fut

    async def send(self, frame: str) -> None:
        self.send_nowait(frame)

    def send_nowait(self, frame: str) -> None:
        """Never waits: see `base.Limits` for what bounds a peer that does not read."""
        if self._state != _OPEN:
            raise self._closed_error()
        if self._client:    # framed here, with our masks
            self._tr.write(client_frame(0x1, frame.encode()))  # type: ignore[union-attr]
        else:               # picows frames it and writes it straight to the socket
            self._ws.send(_TEXT, frame)
        if self._paused:
            self._check_send_buffer()
            if self._cause is not None:
                raise self._closed_error()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self._lost:
            return
        if self._state == _OPEN:
            self._send_close(code, reason)
        elif self._state == _CONNECTING:
            self.abort()
            return
        await self._await_close()   # aborts after close_timeout_s, even if this is cancelled

    def abort(self) -> None:
        if self._tr is not None and not self._lost:
            self._tr.abort()

    @property
    def close_code(self) -> int | None:
        if not self._lost and self._state == _OPEN:
            return None
        return self._rcvd.code if self._rcvd is not None else 1006

    @property
    def remote_address(self) -> Any:
        return self._tr.get_extra_info("peername") if self._tr is not None else None

    def is_closing(self) -> bool:
        """`base.Conn`: the socket is closing or gone."""
        return self._tr is None or self._tr.is_closing()

    def extra_info(self, name: str) -> Any:
        """The socket transport's `get_extra_info(name)` (e.g. "socket", "peername")."""
        return self._tr.get_extra_info(name) if self._tr is not None else None


# ---------------------------------------------------------------------- server side
_UPGRADE = (b"GET / HTTP/1.1\r\nHost: voicebridge\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: %s\r\n\r\n")


class _Opening(asyncio.Protocol):
    """A connection until its upgrade (see the module docstring)."""

    def __init__(self, server: PicowsServer) -> None:
        self.server = server
        self.ep = PicowsEndpoint(client=False, max_size=server.opts.max_size,
                                 close_timeout_s=server.opts.close_timeout_s,
                                 ping_interval_s=server.opts.ping_interval_s,
                                 limits=server.opts.limits)
        self.proto: ServerProtocol | None = ServerProtocol(max_size=server.opts.max_size)
        self.head: RequestHead | None = RequestHead()
        self.transport: asyncio.Transport | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.answered = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        self.ep._tr = transport  # type: ignore[assignment]
        self.timer = self.ep._loop.call_later(self.server.opts.handshake_timeout_s, self.ep.abort)

    def data_received(self, data: bytes) -> None:
        proto, rh = self.proto, self.head
        if self.answered or proto is None or rh is None or rh.done:   # nothing may follow the
            return                                                     # request before our answer
        head = rh.feed(data, self.transport)
        if head is None:
            return
        try:
            proto.receive_data(head)
            events = proto.events_received()
        except Exception:   # the parser must never take the loop's callback down with it
            self.ep.abort()
            return
        for ev in events:
            if type(ev) is Request:
                self.server._on_request(self, ev)
                return
        self.answered = True        # not a valid request: websockets ends the stream
        self.flush()
        self.ep._expect_close()

    def flush(self) -> None:
        tr = self.transport
        if tr is None or self.proto is None:
            return
        for data in self.proto.data_to_send():
            if data:
                tr.write(data)
            elif tr.can_write_eof() and not tr.is_closing():
                try:
                    tr.write_eof()
                except (OSError, RuntimeError):
                    pass
                break

    def eof_received(self) -> bool | None:
        return None                 # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        if self.timer is not None:
            self.timer.cancel()
        self.ep._connection_lost()

    def upgrade(self, request: Request) -> bool:
        """Hand the socket to picows (see the module docstring); True once it is open."""
        tr, ep = self.transport, self.ep
        assert tr is not None
        if self.timer is not None:
            self.timer.cancel()
        key = request.headers.get("Sec-WebSocket-Key", "")
        headers = [("Server", self.server.opts.server_header)] if self.server.opts.server_header else []

        def factory(_request: Any) -> WSUpgradeResponseWithListener:
            return WSUpgradeResponseWithListener(WSUpgradeResponse.create_101_response(headers), ep)

        ws = _protocol(False, None, None, factory, self.server.opts.max_size, None)
        tr.set_protocol(ws)
        ws.connection_made(tr)
        raw = _UPGRADE % key.encode()
        buf = ws.get_buffer(-1)
        buf[:len(raw)] = raw
        ws.buffer_updated(len(raw))
        return ep._state == _OPEN


class PicowsServer(SansIoServer[PicowsEndpoint]):
    """`base.Listener`: `_Opening` per accepted connection, then picows; the rest of the
    listener is `_shared.SansIoServer`."""

    def __init__(self, handler: Handler, process_request: ProcessRequest, opts: ListenOptions,
                 process_response: ProcessResponse | None, on_refused: OnRefused | None) -> None:
        run, on_request, on_response = hooks(handler, process_request, process_response)
        super().__init__(run, on_request, server_header=opts.server_header,
                         max_pending=opts.max_pending, backlog=opts.backlog,
                         reuse_port=opts.reuse_port, on_refused=on_refused,
                         process_response=on_response)
        self.opts = opts

    def _make(self) -> _Opening:
        op = _Opening(self)
        self._admit(op, op.ep)
        return op

    def _on_request(self, op: _Opening, request: Request) -> None:
        op.answered = True
        proto, ep = op.proto, op.ep
        assert proto is not None
        response = self._answer(op, proto, ep, request)
        if response.status_code != 101:
            proto.send_response(response)
            op.flush()
            ep._expect_close()
            return
        try:
            opened = op.upgrade(request)
        except Exception:   # never the loop's callback: the connection is dropped instead
            opened = False
        op.proto = op.head = None   # the handshake is over: keep nothing of it
        if not opened:
            ep.abort()
            return
        self._spawn(ep)


async def listen(handler: Handler, process_request: ProcessRequest, host: str, port: int, *,
                 opts: ListenOptions, process_response: ProcessResponse | None = None,
                 on_refused: OnRefused | None = None) -> PicowsServer:
    """`base`'s `listen` (see the module docstring)."""
    server = PicowsServer(handler, process_request, opts, process_response, on_refused)
    await server.start(host, port)
    return server


# ---------------------------------------------------------------------- client side
def _host_header(netloc: str) -> str:
    return netloc.rpartition("@")[2]     # never credentials in the Host header


async def dial(url: str, headers: dict[str, str], *, timeout_s: float, max_size: int,
               close_timeout_s: float, ping_interval_s: float | None = 20.0,
               limits: Limits = Limits()) -> PicowsEndpoint:
    """`base`'s `dial` (ws:// and wss://); picows does the upgrade, redirects are refused."""
    loop = asyncio.get_running_loop()

    async def connect() -> PicowsEndpoint:
        u = parse_url(url)
        ssl_ctx = _tls_context() if u.is_secure else None
        ep = PicowsEndpoint(client=True, max_size=max_size, close_timeout_s=close_timeout_s,
                            ping_interval_s=ping_interval_s, limits=limits)
        extra = [*headers.items(), ("User-Agent", "voicebridge")]
        factory: Callable[[], _Protocol] = lambda: _protocol(
            True, _host_header(u.netloc), u.resource_name, lambda *_: ep, max_size, extra)
        tr, ws = await loop.create_connection(factory, u.host, u.port, ssl=ssl_ctx,
                                              server_hostname=u.host if ssl_ctx else None)
        try:  # from here on the socket is ours: never leave it open (an open session is billed)
            ep._tr = tr
            await ws.wait_until_handshake_complete()
            if ep._state != _OPEN:
                raise ConnectionError("connection lost during handshake")
        except BaseException:
            tr.abort()
            raise
        return ep

    try:
        return await asyncio.wait_for(connect(), timeout_s)
    except WSInvalidStatusError as e:
        r = e.response
        status = int(r.status) if r is not None else None
        raise ConnectFailed(f"upstream refused the websocket: HTTP {status}", status,
                            retry_after_s(r.headers.get("Retry-After") if r is not None else None)) from None
    except (asyncio.TimeoutError, TimeoutError):
        raise ConnectFailed(f"upstream connect timed out after {timeout_s:g} s") from None
    except WSError as e:   # a bad URL or an invalid answer to the upgrade
        raise ConnectFailed(f"upstream handshake invalid: {type(e).__name__}: {e}"[:200]) from None
    except (OSError, ConnectionError, ValueError) as e:
        raise ConnectFailed(f"upstream connect failed: {type(e).__name__}: {e}"[:200]) from None

