"""The daemon: accept VAIC websockets, authenticate, serve /health, run one `Call` per socket.

Lifecycle (uvicorn-like, one readable path): `start()` binds; `serve_forever()` installs
SIGTERM/SIGINT handlers (and SIGUSR1: stats to the log) and waits; on a signal `stop()` closes the listening socket and every
call (each call closes its OpenAI socket within a second), then returns.

HTTP handling happens in `process_request`, before any websocket exists:
- `GET /health` -> 200 JSON {status, version, active_calls, uptime_s, calls_total, latency_us};
- `GET /metrics` -> Prometheus text exposition of the same stats (read at scrape time);
- any path but `server.path` -> 404;
- `Authorization: Bearer <VOICEBRIDGE_TOKEN>` checked in constant time -> 401 before the upgrade.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import signal
import time
from collections import deque
from typing import Any

from websockets.asyncio.server import Server, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from . import __version__
from .call import Call, Dialer
from .config import Config, Secrets
from .log import get_logger
from .metrics import CONTENT_TYPE, prometheus_text
from .stats import Stats
from .fastws import FastEndpoint, FastServer, fast_dial
from .transport import WsEndpoint, dial


def _response(status: int, reason: str, body: dict[str, Any],
              extra: list[tuple[str, str]] | None = None) -> Response:
    data = json.dumps(body).encode()
    headers = Headers([("Content-Type", "application/json"), ("Content-Length", str(len(data))),
                       ("Cache-Control", "no-store"), *(extra or [])])
    return Response(status, reason, headers, data)


class Bridge:
    """The voicebridge server. `async with Bridge(cfg, secrets) as b:` in tests."""

    def __init__(self, cfg: Config, secrets: Secrets, *, dialer: Dialer | None = None) -> None:
        self.cfg = cfg
        self.secrets = secrets
        fast = cfg.server.transport == "fast"
        self.dialer: Dialer = dialer or (fast_dial if fast else dial)
        self.calls: set[Call] = set()
        self.stats = Stats()
        self.finished: deque[Call] = deque(maxlen=64)   # recent calls, for tests and diagnostics
        self.started_at = time.monotonic()
        self.log = get_logger()
        self._server: Server | FastServer | None = None
        self._expected_auth = (f"Bearer {secrets.token}".encode() if secrets.token else None)
        self._stopping = asyncio.Event()

    # ------------------------------------------------------------------ HTTP before upgrade
    def process_request(self, connection: Any, request: Request) -> Response | None:
        """Before the upgrade; `connection` is either transport's connection (`remote_address`)."""
        path = request.path.split("?", 1)[0]
        if path == "/health":
            return _response(200, "OK", self.health())
        if path == "/metrics":
            body = prometheus_text(self.stats)
            return Response(200, "OK", Headers([("Content-Type", CONTENT_TYPE),
                                                ("Content-Length", str(len(body)))]), body)
        if path != self.cfg.server.path:
            return _response(404, "Not Found", {"error": "not found", "path": path[:100]})
        if self._expected_auth is not None:
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, self._expected_auth):
                self.log.warning("auth.rejected", peer=str(connection.remote_address),
                                 has_header="Authorization" in request.headers)
                return _response(401, "Unauthorized", {"error": "invalid or missing bearer token"},
                                 [("WWW-Authenticate", "Bearer")])
        return None

    def health(self) -> dict[str, Any]:
        return {"status": "stopping" if self._stopping.is_set() else "ok",
                "version": __version__, "active_calls": len(self.calls),
                "uptime_s": round(time.monotonic() - self.started_at, 1),
                "calls_total": self.stats.calls_total,
                "latency_us": {name: h.snapshot() for name, h in self.stats.histograms().items()}}

    def dump_stats(self) -> None:
        """SIGUSR1: all stats as one structured log event, then a human-readable table."""
        self.log.info("stats.dump", **self.stats.snapshot())
        self.log.info("stats.table", table=self.stats.table())

    # ------------------------------------------------------------------ per connection
    async def _handler(self, ws: Any) -> None:
        end = ws if isinstance(ws, FastEndpoint) else WsEndpoint(ws)
        call = Call(end, self.cfg, self.secrets, dialer=self.dialer, stats=self.stats)
        self.calls.add(call)
        self.stats.calls_active += 1
        try:
            await call.run()
        finally:
            self.stats.calls_active -= 1
            self.calls.discard(call)
            self.finished.append(call)

    # ------------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        s = self.cfg.server
        if s.transport == "fast":
            fast = FastServer(self._handler, self.process_request, max_size=s.max_message_bytes,
                              close_timeout_s=2.0, ping_interval_s=s.ping_interval_s,
                              server_header=f"voicebridge/{__version__}")
            await fast.start(s.host, s.port)
            self._server = fast
        else:
            self._server = await serve(
                self._handler, s.host, s.port, process_request=self.process_request,
                max_size=s.max_message_bytes, compression=None, ping_interval=s.ping_interval_s,
                ping_timeout=s.ping_interval_s, close_timeout=2.0,
                server_header=f"voicebridge/{__version__}")
        self.log.info("server.listening", host=s.host, port=self.port, path=s.path,
                      transport=s.transport,
                      auth="bearer" if self._expected_auth else "none",
                      openai=self.cfg.openai.provider, model=self.cfg.openai.model)

    @property
    def port(self) -> int:
        assert self._server is not None
        return self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()
        self._server.close(close_connections=True)
        await self._server.wait_closed()
        self.log.info("server.stopped", finished_calls=len(self.finished))

    async def serve_forever(self) -> None:
        await self.start()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        loop.add_signal_handler(signal.SIGUSR1, self.dump_stats)
        await self._stopping.wait()
        self.log.info("server.signal", active_calls=len(self.calls))
        await self.stop()

    async def __aenter__(self) -> "Bridge":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
