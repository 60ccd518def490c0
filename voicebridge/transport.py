"""The socket seam: "an end that yields frames and accepts frames".

`call.py` only sees `Endpoint`; this is the one module that knows the websocket library, so a
faster transport (e.g. `websockets`' Sans-I/O protocol driven from uvloop protocols) replaces
this file and nothing else.
"""

from __future__ import annotations

import asyncio
from typing import Protocol

from websockets.asyncio.client import ClientConnection, connect
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI


class EndpointClosed(Exception):
    """The peer closed (or the connection broke); `code`/`reason` say how, if known."""

    def __init__(self, code: int | None, reason: str) -> None:
        super().__init__(f"closed code={code} reason={reason!r}")
        self.code = code
        self.reason = reason


class ConnectFailed(Exception):
    """Dialing upstream failed; `reason` is safe to log (never contains credentials)."""

    def __init__(self, reason: str, status: int | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.status = status


class Endpoint(Protocol):
    async def recv(self) -> str | bytes: ...
    async def send(self, frame: str) -> None: ...
    async def close(self, code: int = 1000, reason: str = "") -> None: ...
    def abort(self) -> None: ...
    @property
    def close_code(self) -> int | None: ...


class WsEndpoint:
    """An `Endpoint` over a `websockets` asyncio connection (server or client side)."""

    __slots__ = ("_ws", "_recv", "_send")

    def __init__(self, ws: ServerConnection | ClientConnection) -> None:
        self._ws = ws
        self._recv = ws.recv
        self._send = ws.send

    async def recv(self) -> str | bytes:
        try:
            return await self._recv()
        except ConnectionClosed as e:
            rcvd = e.rcvd
            raise EndpointClosed(rcvd.code if rcvd else 1006, rcvd.reason if rcvd else "") from None

    async def send(self, frame: str) -> None:
        try:
            await self._send(frame)
        except ConnectionClosed as e:
            rcvd = e.rcvd
            raise EndpointClosed(rcvd.code if rcvd else 1006, rcvd.reason if rcvd else "") from None

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
    def request_headers(self) -> dict[str, str]:  # for logs/tests; no secrets logged from here
        req = getattr(self._ws, "request", None)
        return dict(req.headers.raw_items()) if req is not None else {}


async def dial(url: str, headers: dict[str, str], *, timeout_s: float, max_size: int,
               close_timeout_s: float, ping_interval_s: float | None = 20.0) -> WsEndpoint:
    """Open an upstream websocket. Raises ConnectFailed with a loggable reason."""
    try:
        ws = await asyncio.wait_for(
            connect(url, additional_headers=headers, max_size=max_size, compression=None,
                    open_timeout=None, close_timeout=close_timeout_s, proxy=None,
                    ping_interval=ping_interval_s, ping_timeout=ping_interval_s,
                    user_agent_header="voicebridge"),
            timeout_s)
    except InvalidStatus as e:
        status = e.response.status_code
        raise ConnectFailed(f"upstream refused the websocket: HTTP {status}", status) from None
    except (asyncio.TimeoutError, TimeoutError):
        raise ConnectFailed(f"upstream connect timed out after {timeout_s:g} s") from None
    except (OSError, InvalidHandshake, InvalidURI, ValueError) as e:
        raise ConnectFailed(f"upstream connect failed: {type(e).__name__}: {e}"[:200]) from None
    return WsEndpoint(ws)
