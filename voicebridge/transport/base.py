"""The socket seam, library-neutral: what the bridge sees of a transport, and its bounds.

`call.py` only sees `Endpoint`; `server.py` only sees the module interface below. Nothing here
imports a websocket library.

## What a transport module provides

A transport is one module `voicebridge/transport/<name>_impl.py`, registered by one line in
`voicebridge/transport/__init__.py` (`TRANSPORTS`, name -> module path). `server.transport` is
validated against that table and the module is imported only when chosen. Adding a transport
touches only its module and the table. The module provides:

- `async def listen(handler, process_request, host, port, *, opts: ListenOptions,
  process_response=None, on_refused=None) -> Listener`: bind and serve.
  - `process_request(HttpRequest) -> HttpResponse | None` runs on the HTTP request before the
    upgrade; a response is sent as is (status, reason, headers, body; the module adds
    `Server: opts.server_header`), None accepts the upgrade. An exception in it answers 500.
  - `process_response(conn, status)` (optional) runs once the answer to a request is decided,
    with the status actually sent (101, or the library's refusal of a bad upgrade request);
  - `handler(endpoint, conn)` runs once per upgraded connection; `conn` is the same object as
    `HttpRequest.conn` for that connection (see `Conn`). When it returns the module closes the
    endpoint (1000).
  - `on_refused(reason)` (optional) is told of connections dropped by a listener bound, today
    `"max_pending_handshakes"`.
  - `opts.reuse_port`: bind with `SO_REUSEPORT`, so worker processes (`server.workers`, see
    `supervisor.py`) each listen on the same address and the kernel spreads new connections.
  - the bounds of `ListenOptions` hold: at most `max_pending` connections in their opening
    handshake (past it the *oldest* is dropped, so a slowloris holding the slots cannot lock out
    a real client), each given `handshake_timeout_s`; one request head per connection, at most
    `MAX_REQUEST_HEAD_BYTES` (use `RequestHead`); every `Limits` bound on every upgraded
    connection.
- `async def dial(url, headers, *, timeout_s, max_size, close_timeout_s, ping_interval_s=20.0,
  limits=Limits()) -> Endpoint`: open an upstream websocket (ws:// and wss://) or raise
  `ConnectFailed` (with the HTTP status when the peer answered one); never leaves a socket open
  on failure or cancellation.
- both sides return `Endpoint`s honouring the contract below, and end them with
  `EndpointClosed` built by `closed_error`.

## The Endpoint contract (every bound in `Limits`)

- `recv()` returns the next message (text or binary; text may come as UTF-8 `bytes`: our
  decoders take both) or raises `EndpointClosed`.
- `send_nowait(text)` (and `send`, its awaitable twin) never waits for the peer: the frame goes
  to the transport's buffer. A socket whose unsent bytes exceed `send_buffer_bytes`, or whose
  writes stay paused (peer not reading) for `send_timeout_s`, is aborted; `send` then raises
  `EndpointClosed`. So a peer that stops reading costs bounded memory and never blocks the task
  that also watches the other peer.
- received, unread messages are bounded in bytes (`recv_queue_bytes`) as well as in count
  (`MAX_QUEUED_MESSAGES`): beyond either, the socket is not read (TCP backpressure) until the
  reader catches up.
- a fragmented message may have at most `max_fragments` fragments (and `max_size` bytes).
- keepalive: a ping every `ping_interval_s`; no pong in time drops the connection (1011).
- `close(code, reason)` runs the close handshake, bounded by its close timeout, then aborts;
  `abort()` drops the socket at once.
- `EndpointClosed.cause` says who ended the connection and why: None when the peer closed it
  (then `code` is the peer's code, 1006 if it sent none), else one of `CAUSES` for a close or an
  abort of our own (then `code` is the code we sent, or 1006 for an abort).
"""

from __future__ import annotations

from typing import Any, Awaitable, Callable, Mapping, NamedTuple, Protocol, Sequence

# our own reasons for ending a connection (EndpointClosed.cause)
CAUSES = ("frame_too_big", "protocol_error", "keepalive_timeout", "shutdown", "send_buffer_full",
          "send_timeout", "closed")
MAX_QUEUED_MESSAGES = 64   # received, unread messages per connection (bytes: Limits.recv_queue_bytes)


MAX_REQUEST_HEAD_BYTES = 16 * 1024
READ_SLICE_BYTES = 8 * 1024    # received bytes parsed per loop turn (a tiny frame costs ~10 µs)
MAX_PINGS_PER_S = 64           # pings from a peer; more in one second: close 1008
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
        if end < 0 or end + 4 > MAX_REQUEST_HEAD_BYTES:
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
    """Dialing upstream failed; `reason` is safe to log (never contains credentials). `status`
    is the HTTP status of a refused upgrade, `retry_after_s` its `Retry-After` (seconds)."""

    def __init__(self, reason: str, status: int | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status
        self.retry_after_s = retry_after_s


def retry_after_s(value: str | None) -> float | None:
    """A `Retry-After` header in seconds (the delay form; an HTTP date is not honoured)."""
    try:
        v = float(value) if value else None
    except ValueError:
        return None
    return v if v is not None and 0 <= v <= 3600 else None


class Endpoint(Protocol):
    async def recv(self) -> str | bytes: ...
    async def send(self, frame: str) -> None: ...
    def send_nowait(self, frame: str) -> None: ...
    async def close(self, code: int = 1000, reason: str = "") -> None: ...
    def abort(self) -> None: ...
    @property
    def close_code(self) -> int | None: ...
    @property
    def remote_address(self) -> Any: ...
    def extra_info(self, name: str) -> Any: ...


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


class CloseFrame(Protocol):
    """What `closed_error` reads of a close frame (websockets' `frames.Close` has it)."""
    @property
    def code(self) -> int: ...
    @property
    def reason(self) -> str: ...


def closed_error(sent: CloseFrame | None, rcvd: CloseFrame | None, rcvd_then_sent: bool | None,
                 cause: str | None) -> EndpointClosed:
    """The `EndpointClosed` for a connection's close frames: the one we sent, the one we
    received, whether the received one came first, and our own abort cause if any."""
    if cause is not None:   # we aborted it (send bounds): no close frame could be trusted
        return EndpointClosed(1006, cause.replace("_", " "), cause)
    if sent is not None and (rcvd is None or rcvd_then_sent is False):
        return EndpointClosed(sent.code, sent.reason, cause_of_code(sent.code))
    if rcvd is not None:
        return EndpointClosed(rcvd.code, rcvd.reason, None)
    return EndpointClosed(1006, "", None)


# ---------------------------------------------------------------------- listener interface
class Conn(Protocol):
    """One accepted connection as the listener's callbacks see it (`HttpRequest.conn`, the
    handler's second argument, `process_response`'s first): opaque and hashable, so the server
    can key state on it, plus one question."""

    def is_closing(self) -> bool:
        """True once the socket is closing or gone (or was never there)."""
        ...


class HttpRequest(NamedTuple):
    """The HTTP request before the upgrade. `headers` looks keys up regardless of case
    (`get`, `in`); `remote` is the peer address for logs; `conn` as in `Conn`."""
    path: str                    # with the query, as sent
    headers: Mapping[str, str]
    remote: str
    conn: Conn


class HttpResponse(NamedTuple):
    """An answer to an `HttpRequest` instead of the upgrade."""
    status: int
    reason: str
    headers: list[tuple[str, str]]
    body: bytes


def peer_name(address: Any) -> str:
    """`HttpRequest.remote` from a socket's peer name (as `bounds.clip` would print it)."""
    return "" if address is None else repr(address)


class ListenOptions(NamedTuple):
    """How a listener treats its connections (from `server.*`)."""
    max_size: int                       # largest message, bytes
    ping_interval_s: float | None       # keepalive (None: off)
    close_timeout_s: float              # close handshake bound, then abort
    handshake_timeout_s: float          # time to send the upgrade request
    max_pending: int                    # connections in their opening handshake at once
    backlog: int
    limits: Limits
    server_header: str                  # the `Server` header of every answer
    reuse_port: bool = False            # SO_REUSEPORT: several processes (server.workers) share the port


ProcessRequest = Callable[[HttpRequest], "HttpResponse | None"]
ProcessResponse = Callable[[Conn, int], None]
Handler = Callable[[Endpoint, Conn], Awaitable[None]]
OnRefused = Callable[[str], None]


class Listener(Protocol):
    @property
    def sockets(self) -> Sequence[Any]: ...
    def close(self, close_connections: bool = True) -> None:
        """Stop accepting; with `close_connections`, close upgraded connections (1001) and
        drop the ones still in their handshake."""
        ...
    async def wait_closed(self) -> None:
        """Until every handler has returned and the listening sockets are closed."""
        ...
    def abort_all(self) -> None:
        """Abort the listener's connections at once (forced shutdown): at least every
        upgraded one."""
        ...


class TransportModule(Protocol):
    """What `transport.get(name)` returns: the module interface of the docstring above."""

    async def listen(self, handler: Handler, process_request: ProcessRequest, host: str,
                     port: int, *, opts: ListenOptions,
                     process_response: ProcessResponse | None = None,
                     on_refused: OnRefused | None = None) -> Listener: ...

    async def dial(self, url: str, headers: dict[str, str], *, timeout_s: float, max_size: int,
                   close_timeout_s: float, ping_interval_s: float | None = 20.0,
                   limits: Limits = Limits()) -> Endpoint: ...
