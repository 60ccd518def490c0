"""Fake OpenAI Realtime GA server for end-to-end tests, ``make demo`` and the load benchmark.

It speaks the GA WebSocket protocol as described in
``/work/shared/protocols/openai-realtime.md`` (§2, §3.1, §4.3–4.5, §6): handshake and auth,
``session.created`` / ``session.update`` validation, ``input_audio_buffer.*`` with an energy
VAD, scripted audio responses, barge-in, truncation, the benign error codes, a session time
limit and fault knobs.

Contracts
---------
* Binds wherever :class:`FakeOpenAIConfig` says; the default host is ``127.0.0.1`` and port ``0``
  (ephemeral, read :attr:`FakeRealtimeServer.port` after :meth:`FakeRealtimeServer.start`).
* Every wait is bounded: handshake ``open_timeout`` 5 s, close handshake 2 s, server stop
  ``timeout`` (default 5 s), response pacing by the configured intervals.
* Per connection: exactly one reader coroutine (the ``websockets`` handler) and at most one
  response task at a time. No task and no log line per frame; audio deltas are built from a
  pre-encoded tone and a string template.
* Recording (``FakeSession.received`` / ``sent`` / ``errors_sent`` / ``truncations`` /
  ``responses``) is append-only and unbounded; set ``FakeOpenAIConfig.record = False`` to keep
  those lists empty (the per-connection :class:`FakeSession` object and its counters remain).
* The config object is read live: a test may change e.g. ``server.config.close_after_deltas``
  between sessions.
* All times in records are ``time.monotonic()`` seconds; all audio durations are milliseconds.
* Tool calls (function and MCP), the checks on the client's answers and the ``usage`` of each
  ``response.done`` are described in the :class:`FakeOpenAIConfig` docstring.

Choices where the spec is silent are marked ``[fake]`` in comments and docstrings.

Layout: this module holds the server and the CLI and re-exports the public names of
``records`` (config and records), ``audio`` (codecs, tone, energy VAD) and ``validate``
(``session.update`` and client-event validation). The per-connection handler is
``connection._Conn``, whose response half is ``responses._ResponseMixin``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import http
import logging
import sys
import time
from dataclasses import replace
from typing import Any, Callable
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from voicebridge.sim.fake_openai.audio import (
    _aligned_freq,
    _EnergyVad,  # noqa: F401  not in __all__; tests/test_fake_openai.py imports it from here
    bytes_per_ms,
    decode_audio,
    encode_audio,
    make_tone,
    sample_rate,
)
from voicebridge.sim.fake_openai.connection import BETA_CLOSE_REASON, CLOSE_TIMEOUT_S, _Conn, _json_encode
from voicebridge.sim.fake_openai.records import (
    FakeClientItem,
    FakeClientResponse,
    FakeFunctionCall,
    FakeMcpCall,
    FakeOpenAIConfig,
    FakeResponse,
    FakeSession,
    _new_id,
)
from voicebridge.sim.fake_openai.validate import apply_session_update, default_session

__all__ = [
    "AZURE_PATH",
    "BETA_CLOSE_REASON",
    "FakeClientItem",
    "FakeClientResponse",
    "FakeFunctionCall",
    "FakeMcpCall",
    "FakeOpenAIConfig",
    "FakeRealtimeServer",
    "FakeResponse",
    "FakeSession",
    "OPENAI_PATH",
    "apply_session_update",
    "bytes_per_ms",
    "decode_audio",
    "default_session",
    "encode_audio",
    "main",
    "make_tone",
    "sample_rate",
]

log = logging.getLogger("voicebridge.sim.fake_openai")

OPENAI_PATH = "/v1/realtime"
AZURE_PATH = "/openai/v1/realtime"
MAX_SIZE_BYTES = 16 * 2**20
OPEN_TIMEOUT_S = 5.0


# ----------------------------------------------------------------------------------------------
# Server
# ----------------------------------------------------------------------------------------------


class FakeRealtimeServer:
    """A fake OpenAI Realtime GA WebSocket server on ``config.host:config.port``.

    Use ``async with FakeRealtimeServer(think_ms=10) as srv:`` or ``await srv.start()`` /
    ``await srv.stop()``. Keyword overrides are applied on top of ``config``.

    Recording attributes: ``sessions`` (one :class:`FakeSession` per accepted connection, in
    accept order, kept even with ``record=False``), ``rejected_handshakes``
    (``(http_status, reason)`` per refused handshake) and ``handshake_times`` (the monotonic time
    of every handshake request, refused or not, in order).
    """

    def __init__(self, config: FakeOpenAIConfig | None = None, **overrides: Any) -> None:
        base = config if config is not None else FakeOpenAIConfig()
        self.config: FakeOpenAIConfig = replace(base, **overrides) if overrides else base
        self.sessions: list[FakeSession] = []
        self.rejected_handshakes: list[tuple[int, str]] = []
        self.handshake_times: list[float] = []
        self._refused = 0  # handshakes refused by the ``refuse`` knob
        self._server: Server | None = None
        self._port: int | None = None
        self._open = 0
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._tones: dict[tuple[str, int, int], tuple[str, str]] = {}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> FakeRealtimeServer:
        """Bind and start accepting. Returns ``self``. Idempotent."""
        if self._server is not None:
            return self
        self._server = await serve(
            self._handler,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            compression=None,
            max_size=MAX_SIZE_BYTES,
            open_timeout=OPEN_TIMEOUT_S,
            close_timeout=CLOSE_TIMEOUT_S,
            logger=logging.getLogger("voicebridge.sim.fake_openai.websockets"),
        )
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self, timeout: float = 5.0) -> None:
        """Close all connections (1001) and stop listening, within ``timeout`` seconds."""
        server = self._server
        if server is None:
            return
        server.close()
        try:
            async with asyncio.timeout(timeout):
                await server.wait_closed()
        except TimeoutError:
            for conn in list(server.connections):
                conn.transport.abort()
        self._server = None

    async def __aenter__(self) -> FakeRealtimeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- addresses ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port (valid after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("FakeRealtimeServer is not started")
        return self._port

    @property
    def url(self) -> str:
        """OpenAI-form URL, e.g. ``ws://127.0.0.1:PORT/v1/realtime?model=gpt-realtime``."""
        return f"ws://{self.config.host}:{self.port}{OPENAI_PATH}?model={self.config.model}"

    @property
    def azure_url(self) -> str:
        """Azure GA-form URL: ``ws://127.0.0.1:PORT/openai/v1/realtime?model=gpt-realtime``."""
        return f"ws://{self.config.host}:{self.port}{AZURE_PATH}?model={self.config.model}"

    # -- observation ----------------------------------------------------------------------

    def open_sessions(self) -> int:
        """Number of accepted connections whose handler has not finished yet."""
        return self._open

    async def wait_closed_all(self, timeout: float) -> bool:
        """Wait until no session is open; ``True`` if that happened within ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                await self._all_closed.wait()
        except TimeoutError:
            return False
        return True

    async def wait_sessions(self, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` sessions were accepted; ``True`` if within ``timeout``."""
        deadline = time.monotonic() + timeout
        while len(self.sessions) < count:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    # -- internals ------------------------------------------------------------------------

    def _tone_b64(self, fmt: str, ms: int, base_ms: int) -> tuple[str, str]:
        key = (fmt, ms, base_ms)
        cached = self._tones.get(key)
        if cached is None:
            raw = make_tone(ms, fmt, freq_hz=_aligned_freq(base_ms))
            full = base64.b64encode(raw).decode()
            rest = base64.b64encode(raw[12:]).decode() if len(raw) > 12 else full
            cached = self._tones[key] = (full, rest)
        return cached

    def _reject(self, status: int, reason: str, message: str, code: str | None,
                retry_after_s: float | None = None) -> Response:
        self.rejected_handshakes.append((status, reason))
        body = _json_encode(
            {"error": {"message": message, "type": "invalid_request_error", "code": code,
                       "param": None}}
        )
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        headers = Headers(
            [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
             ("Connection", "close")]
        )
        if retry_after_s is not None:
            headers["Retry-After"] = f"{retry_after_s:g}"
        return Response(status, phrase, headers, body)

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        cfg = self.config
        self.handshake_times.append(time.monotonic())
        if cfg.refuse is not None and (cfg.refuse_first <= 0 or self._refused < cfg.refuse_first):
            self._refused += 1
            return self._reject(cfg.refuse, "refused", "Refused by the fake server (fault knob).",
                                "refused", cfg.retry_after_s)
        parts = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if parts.path not in (OPENAI_PATH, AZURE_PATH):
            return self._reject(404, "not_found", f"Invalid URL (GET {parts.path})", None)
        azure = parts.path == AZURE_PATH
        if azure and "api-version" in query:
            return self._reject(401, "api_version_not_allowed",
                                "The GA endpoint /openai/v1/realtime does not take an api-version.",
                                "invalid_api_version")
        key: str | None = None
        auth = request.headers.get("Authorization")
        if auth is not None and auth[:7].lower() == "bearer ":
            key = auth[7:].strip() or None
        if key is None and azure:
            key = request.headers.get("api-key") or query.get("api-key") or None
        if key is None:
            return self._reject(401, "missing_api_key",
                                "You didn't provide an API key. Provide it in an Authorization "
                                "header using Bearer auth (Authorization: Bearer YOUR_KEY).", None)
        if cfg.api_key is not None and key != cfg.api_key:
            return self._reject(401, "invalid_api_key",
                                f"Incorrect API key provided: {key[:3]}***{key[-2:]}.",
                                "invalid_api_key")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        parts = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        rec = FakeSession(
            id=_new_id("sess_"),
            model=query.get("model") or query.get("deployment") or "gpt-realtime",
            path=parts.path,
            query=query,
            headers=request.headers.copy(),
            opened_at=time.monotonic(),
            azure=parts.path == AZURE_PATH,
            peer=ws.remote_address,
        )
        self.sessions.append(rec)
        self._open += 1
        self._all_closed.clear()
        log.info("session %s open model=%s path=%s peer=%s", rec.id, rec.model, rec.path,
                 ws.remote_address)
        try:
            await _Conn(self, ws, rec).run()
        finally:
            rec.closed_at = time.monotonic()
            rec.close_code = ws.close_code
            rec.close_reason = ws.close_reason
            self._open -= 1
            if self._open == 0:
                self._all_closed.set()
            log.info(
                "session %s closed code=%s deltas=%d responses=%d duration_s=%.1f",
                rec.id, rec.close_code, rec.deltas_sent, len(rec.responses),
                rec.closed_at - rec.opened_at,
            )


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m voicebridge.sim.fake_openai",
        description="Fake OpenAI Realtime GA server (for tests, demos and benchmarks). "
        "Runs until Ctrl-C; prints one line per session start/end.",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9099, help="TCP port (default 9099)")
    p.add_argument("--api-key", default=None, help="required bearer key (default: any non-empty)")
    p.add_argument("--think-ms", type=float, default=150.0, help="commit -> response.created")
    p.add_argument("--first-delta-delay-ms", type=float, default=0.0,
                   help="extra delay before the first audio delta of each response")
    p.add_argument("--delta-interval-ms", type=float, default=20.0, help="wall time between deltas")
    p.add_argument("--session-limit-s", type=float, default=None,
                   help="send session_expired and close 1001 after this many seconds")
    p.add_argument("--refuse", type=int, default=None, metavar="HTTP_STATUS",
                   help="reject every handshake with this HTTP status")
    p.add_argument("--refuse-first", type=int, default=0, metavar="N",
                   help="with --refuse: refuse only the first N handshakes (default: all)")
    p.add_argument("--retry-after-s", type=float, default=None,
                   help="with --refuse: send this Retry-After header")
    p.add_argument("--drop-after-s", type=float, default=None,
                   help="end each session this long after it opened (abort, or --drop-code)")
    p.add_argument("--drop-code", type=int, default=None,
                   help="with --drop-after-s: send a close frame with this code instead of aborting")
    p.add_argument("--close-after-deltas", type=int, default=None, metavar="N",
                   help="abort the TCP connection (no close frame) after N audio deltas")
    p.add_argument("--record", action="store_true",
                   help="keep per-event records in memory (off by default for long runs)")
    p.add_argument("--greeting", default=None, metavar="TEXT",
                   help="greeting text (may end with tool calls, e.g. '@@end_call {}')")
    p.add_argument("--reply", dest="replies", action="append", metavar="TEXT",
                   help="scripted reply, repeatable, used in turn order; tool calls as "
                   "'Goodbye! @@end_call {\"reason\": \"done\"}' or '@@mcp:LABEL:TOOL {}'")
    p.add_argument("--mcp-call-ms", type=float, default=100.0,
                   help="run time of a scripted MCP call (default %(default)s; 0: done before response.done)")
    return p.parse_args(argv)


async def _serve_until_stopped(cfg: FakeOpenAIConfig) -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    async with FakeRealtimeServer(cfg) as server:
        print(f"fake OpenAI Realtime listening on {server.url}", flush=True)
        await stop.wait()
        print("stopping", flush=True)


def config_from_args(args: argparse.Namespace) -> FakeOpenAIConfig:
    """The :class:`FakeOpenAIConfig` the CLI's parsed arguments describe."""
    cfg = FakeOpenAIConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        think_ms=args.think_ms,
        first_delta_delay_ms=args.first_delta_delay_ms,
        delta_interval_ms=args.delta_interval_ms,
        session_limit_s=args.session_limit_s,
        refuse=args.refuse,
        refuse_first=args.refuse_first,
        retry_after_s=args.retry_after_s,
        drop_after_s=args.drop_after_s,
        drop_code=args.drop_code,
        close_after_deltas=args.close_after_deltas,
        record=args.record,
        mcp_call_ms=args.mcp_call_ms,
    )
    if args.greeting is not None:
        cfg.greeting_text = args.greeting
    if args.replies:
        cfg.replies = list(args.replies)
    return cfg


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGINT/SIGTERM. Returns the process exit status."""
    cfg = config_from_args(_parse_args(argv))
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO)
    logging.getLogger(f"{log.name}.websockets").setLevel(logging.WARNING)
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(_serve_until_stopped(cfg))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
