"""What the `fast` and `picows` transports share, all of it outside the per-frame path.

Both serve the opening handshake with websockets' Sans-I/O `ServerProtocol` from a plain
`asyncio.Protocol`, and both endpoints keep their timers and bounds in attributes of the same
names. What is the same in both lives here once:

- `SansIoServer`, the listener (`base.Listener`): the pending-handshake cap (past
  `max_pending` the *oldest* connection in its handshake is dropped and `on_refused` is told
  `"max_pending_handshakes"`), the answer to an upgrade request (`process_request`'s, websockets'
  accept when it has none, a 500 when it raises; `Server: server_header`; `process_response`),
  one handler task per upgraded connection (closed 1000 when the handler returns), and the
  lifecycle (`start`, `sockets`, `close` with 1001 "server shutting down", `abort_all`,
  `wait_closed`). A transport's subclass makes the protocol of an accepted connection (`_make`)
  and sends the answer (`_on_request`); all of it runs once per connection or per server.
- `hooks`: `base`'s `listen` hooks in the raw form `SansIoServer` calls (websockets' `Request`
  and `Response`).
- `EndpointTimers`, a base of both endpoints (no slots, no instance dict): the send timeout (`pause_writing`,
  `resume_writing`), an abort with our own cause, the close timeout and the wait at the end of
  `close()`. None of it runs per frame: the per-frame code (`recv`, `send_nowait`, parsing and
  delivering frames) stays in each transport's module, written for its library.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Generic, Protocol, TypeVar

from websockets.http11 import Request, Response
from websockets.server import ServerProtocol

from ._websockets_http import answer
from .base import Handler, Limits, ProcessRequest, ProcessResponse

# the listener's hooks, in websockets' types (`hooks` makes them from `base`'s)
RawProcessRequest = Callable[[Any, Request], Response | None]
RawProcessResponse = Callable[[Any, Request, Response], None]


class ServerEndpoint(Protocol):
    """What `SansIoServer` needs of an endpoint."""

    _lost_fut: asyncio.Future[None]     # done once the socket is gone

    def abort(self) -> None: ...

    async def close(self, code: int = 1000, reason: str = "") -> None: ...


E = TypeVar("E", bound=ServerEndpoint)


def hooks(handler: Handler, process_request: ProcessRequest,
          process_response: ProcessResponse | None
          ) -> tuple[Callable[[Any], Awaitable[None]], RawProcessRequest, RawProcessResponse | None]:
    """`base`'s `listen` hooks as `SansIoServer` calls them: the handler with the endpoint as
    its own `Conn`, `process_request` on `base.HttpRequest` (see `_websockets_http.answer`),
    `process_response` with the status sent."""
    def on_request(ep: Any, request: Request) -> Response | None:
        return answer(process_request, request, ep, ep.remote_address)

    def on_response(ep: Any, request: Request, response: Response) -> None:
        process_response(ep, response.status_code)  # type: ignore[misc]

    def run(ep: Any) -> Awaitable[None]:
        return handler(ep, ep)

    return run, on_request, on_response if process_response is not None else None


class SansIoServer(Generic[E]):
    """Listener: HTTP upgrade answered by `process_request` first (health, auth), then `handler`
    (see the module docstring). Subclasses provide `_make` (the `asyncio.Protocol` of an accepted
    connection, which calls `_admit` once) and answer the request with `_answer`, then `_spawn`
    the handler once the connection is open."""

    def __init__(self, handler: Callable[[E], Awaitable[None]],
                 process_request: RawProcessRequest, *, server_header: str, max_pending: int,
                 backlog: int, reuse_port: bool, on_refused: Callable[[str], None] | None,
                 process_response: RawProcessResponse | None) -> None:
        self._handler = handler
        self._process_request = process_request
        self._process_response = process_response
        self._server_header = server_header
        self._max_pending = max_pending
        self._backlog = backlog
        self._reuse_port = reuse_port
        self._on_refused = on_refused
        self._pending: dict[object, E] = {}   # accepted, not yet answered, oldest first (-> its endpoint)
        self._all: set[E] = set()             # every accepted TCP connection
        self._conns: set[E] = set()           # upgraded connections
        self._tasks: set[asyncio.Task[None]] = set()
        self._server: asyncio.base_events.Server | None = None

    def _make(self) -> asyncio.BaseProtocol:
        """The protocol of one accepted connection (`create_server`'s factory)."""
        raise NotImplementedError

    def _admit(self, key: object, ep: E) -> None:
        """Count a new connection (`key`: what `_answer` is given for it) as in its handshake;
        past `max_pending` the oldest one in its handshake is dropped."""
        if len(self._pending) >= self._max_pending:
            oldest = next(iter(self._pending))
            self._pending.pop(oldest).abort()
            if self._on_refused is not None:
                self._on_refused("max_pending_handshakes")
        self._all.add(ep)
        self._pending[key] = ep

        def gone(_: Any) -> None:
            self._all.discard(ep)
            self._pending.pop(key, None)
        ep._lost_fut.add_done_callback(gone)

    def _answer(self, key: object, proto: ServerProtocol, ep: E, request: Request) -> Response:
        """The answer to the upgrade request of `key`'s connection (no longer pending), not sent
        yet: `process_request`'s, else websockets' accept (101 or its refusal of a bad request);
        500 when `process_request` raises; with our `Server` header; told to `process_response`."""
        self._pending.pop(key, None)
        try:
            response = self._process_request(ep, request)
        except Exception:  # a bug in process_request must not kill the listener
            response = proto.reject(500, "internal error\n")
        if response is None:
            response = proto.accept(request)
        if self._server_header:
            response.headers["Server"] = self._server_header
        if self._process_response is not None:
            self._process_response(ep, request, response)
        return response

    def _spawn(self, ep: E) -> None:
        """`ep` is open: run the handler on it."""
        self._conns.add(ep)
        task = asyncio.get_running_loop().create_task(self._run(ep))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, ep: E) -> None:
        try:
            await self._handler(ep)
        finally:
            self._conns.discard(ep)
            await ep.close(1000, "")

    async def start(self, host: str, port: int) -> None:
        self._server = await asyncio.get_running_loop().create_server(
            self._make, host, port, backlog=self._backlog, reuse_port=self._reuse_port or None)

    @property
    def sockets(self) -> Any:
        assert self._server is not None
        return self._server.sockets

    def close(self, close_connections: bool = True) -> None:
        assert self._server is not None
        self._server.close()
        if close_connections:
            loop = asyncio.get_running_loop()
            for ep in list(self._all):
                if ep in self._conns:
                    loop.create_task(ep.close(1001, "server shutting down"))
                else:
                    ep.abort()  # never upgraded (or still in its handshake)

    def abort_all(self) -> None:
        """Abort every connection at once (forced shutdown)."""
        for ep in list(self._all):
            ep.abort()

    async def wait_closed(self) -> None:
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()


class EndpointTimers:
    """A base of both endpoints: the send timeout, our own abort cause, the close timeout. It
    has no slots of its own (so no instance dict either): the endpoint's class lists the
    attributes declared here, sets them, and defines `abort` and `_wake` (resume a waiting
    `recv()`)."""

    if TYPE_CHECKING:   # for mypy only, which would check the assignments below against `()`
        limits: Limits
        _loop: asyncio.AbstractEventLoop
        _paused: bool                             # writes paused by the transport
        _send_timer: asyncio.TimerHandle | None
        _cause: str | None                        # why we aborted it ourselves (send bounds)
        _close_handle: asyncio.TimerHandle | None
        _close_timeout_s: float
        _lost: bool
        _lost_fut: asyncio.Future[None]

        def abort(self) -> None: ...

        def _wake(self) -> None: ...
    else:
        __slots__ = ()

    def pause_writing(self) -> None:
        """The peer does not read fast enough: it has `send_timeout_s` to catch up."""
        self._paused = True
        if self._send_timer is None:
            self._send_timer = self._loop.call_later(self.limits.send_timeout_s,
                                                     self._abort_for, "send_timeout")

    def resume_writing(self) -> None:
        self._paused = False
        if self._send_timer is not None:
            self._send_timer.cancel()
            self._send_timer = None

    def _abort_for(self, cause: str) -> None:
        if self._cause is None:
            self._cause = cause
        self.abort()
        self._wake()

    def _expect_close(self) -> None:
        if self._close_handle is None and not self._lost:
            self._close_handle = self._loop.call_later(self._close_timeout_s, self.abort)

    async def _await_close(self) -> None:
        """The end of `close()`: until the socket is gone, at most the close timeout, then abort
        (the timer aborts it even if this coroutine is cancelled)."""
        self._expect_close()
        try:
            await asyncio.wait_for(asyncio.shield(self._lost_fut), self._close_timeout_s)
        except (asyncio.TimeoutError, TimeoutError):
            self.abort()
