"""The daemon: accept VAIC websockets, authenticate, serve health and metrics, run one `Call` per socket.

Lifecycle (uvicorn-like, one readable path): `start()` raises the descriptor limit and binds the
public listener (and the admin listener); `serve_forever()` installs the signal handlers and
waits; on SIGTERM/SIGINT `shutdown()` drains (new calls 503, calls in progress go on up to
`server.drain_timeout_s`), hangs up what is left, then `stop()` closes the listeners, bounded by
`server.shutdown_timeout_s`, after which everything left is aborted; a second SIGTERM/SIGINT
aborts everything at once. SIGHUP re-reads the config file for new calls (`reload`); SIGUSR1
writes the stats to the log.

The socket layer is the transport named by `server.transport` (`transport.get`): the bridge uses
only its interface (`listen`, `dial`, `Listener`, `Endpoint`; see `transport/base.py`) and sees
HTTP as `HttpRequest`/`HttpResponse`, whatever the library.

HTTP handling happens in `process_request`, before any websocket exists. Public listener:
- `GET /health` -> 200 JSON {status, version, active_calls, uptime_s} (cheap), 503 "draining"
  from the first SIGTERM on (a balancer's check); `GET /live` -> the same, 200 even while
  draining (a liveness probe that restarts the process must not cut the drain short);
  `GET /ready` -> 200, or 503 while draining or while every OpenAI dial fails;
- `GET /metrics`, `GET /health?detail=1` -> only with `Authorization: Bearer $VOICEBRIDGE_ADMIN_TOKEN`
  (404 when no admin token is configured: they live on the admin listener);
- any path but `server.path` -> 404;
- `server.path`: `Authorization: Bearer <VOICEBRIDGE_TOKEN>` checked in constant time, or a
  valid JWT of VAIC's OAuth mode with `[oauth]` (`oauth.py`) -> else 401;
  more than `server.max_calls` calls -> 503 with `Retry-After`; both before the upgrade, so no
  OpenAI session is started.
Admin listener (`server.admin_host:admin_port`, loopback by default): `/health` with the latency
histograms and `/metrics` (Prometheus text, rendered at most once per `server.metrics_cache_s`).
Log lines a peer can trigger at will (failed auth, refused connections) are rate limited.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import resource
import signal
import time
from collections import deque
from typing import TYPE_CHECKING, Any

import msgspec

from . import __version__, recording, transport, webhooks
from .bounds import clip
from .call import Call, Dialer, limits_of
from .procinfo import process_figures
from .realtime import target
from .session import Phase
from .config import Config, Secrets, load_config
from .log import Throttled, get_logger, install_loop_handler, setup
from .metrics import CONTENT_TYPE, DaemonInfo, prometheus_text
from .oauth import JwtValidator
from .stalls import StallWatch, tune_gc
from .stats import Stats
from .systemd import Heartbeat, Notifier
from .transport import (Conn, Endpoint, Handler, HttpRequest, HttpResponse, Listener,
                        ListenOptions, ProcessRequest, ProcessResponse)

if TYPE_CHECKING:
    from .worker import WorkerLink

# server.* keys a SIGHUP reload applies at once; the others are bound to the listening sockets
RELOADABLE_SERVER_KEYS = frozenset({
    "server.path", "server.max_calls", "server.metrics_cache_s", "server.drain_timeout_s",
    "server.shutdown_timeout_s", "server.ready_dial_fail_s", "server.allow_unauthenticated"})


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two configuration structs."""
    out: list[str] = []
    for f in msgspec.structs.fields(type(old)):
        a, b = getattr(old, f.name), getattr(new, f.name)
        if isinstance(a, msgspec.Struct) and type(a) is type(b):
            out += _changed_keys(a, b, f"{prefix}{f.name}.")
        elif a != b:
            out.append(prefix + f.name)
    return out


FD_RESERVE = 64          # descriptors kept free for logs, the admin listener, dials in progress
ADMIN_MAX_PENDING = 16   # admin connections in their request at once


def _response(status: int, reason: str, body: dict[str, Any],
              extra: list[tuple[str, str]] | None = None) -> HttpResponse:
    data = json.dumps(body).encode()
    headers = [("Content-Type", "application/json"), ("Content-Length", str(len(data))),
               ("Cache-Control", "no-store"), *(extra or [])]
    return HttpResponse(status, reason, headers, data)


def _authorization(request: HttpRequest) -> bytes:
    """The Authorization header; two of them count as a wrong one (never an error)."""
    try:
        return str(request.headers.get("Authorization", "")).encode()
    except LookupError:
        return b""


def raise_nofile() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard limit; returns (soft, hard) after."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft, hard


class Bridge:
    """The voicebridge server. `async with Bridge(cfg, secrets) as b:` in tests."""

    def __init__(self, cfg: Config, secrets: Secrets, *, dialer: Dialer | None = None,
                 config_path: str | None = None, worker: WorkerLink | None = None) -> None:
        self.cfg = cfg
        # server.workers > 1: this process is one worker (supervisor.py); its listeners share the
        # port (SO_REUSEPORT) and /health, /metrics, SIGUSR1 answer for every worker (worker.py)
        self.worker = worker
        self.secrets = secrets
        self.transport = transport.get(cfg.server.transport)
        self.dialer: Dialer = dialer or self.transport.dial
        self.calls: set[Call] = set()
        self.stats = Stats()
        sv = cfg.server   # slow frames, loop lag, collector pauses (stalls.py)
        self.stalls = StallWatch(self.stats, slow_frame_ms=sv.slow_frame_ms, slow_loop_ms=sv.slow_loop_ms,
                                 loop_probe_ms=sv.loop_probe_ms, log_max=sv.slow_log_max,
                                 log_interval_s=sv.slow_log_interval_s)
        self.finished: deque[Call] = deque(maxlen=64)   # recent calls, for tests and diagnostics
        self.started_at = time.monotonic()
        self.log = get_logger()
        self.noisy = Throttled(self.log)
        self.max_calls = cfg.server.max_calls          # may be clamped by the descriptor limit
        self._server: Listener | None = None
        self._admin: Listener | None = None
        self._reserved: set[Conn] = set()  # connections let through whose call has not started
        self._expected_auth = (f"Bearer {secrets.token}".encode() if secrets.token else None)
        self._admin_auth = (f"Bearer {secrets.admin_token}".encode() if secrets.admin_token else None)
        # [oauth]: the bearer may also be a JWT of VAIC's OAuth mode (checked on the cached JWKS)
        self._jwt = JwtValidator(cfg.oauth) if cfg.oauth.enabled else None
        self._metrics_cache: tuple[float, bytes] = (-1e9, b"")
        self._stopping = asyncio.Event()   # set by the first SIGTERM/SIGINT: the drain begins
        self._force = asyncio.Event()      # set by the second: everything is aborted at once
        self._no_calls = asyncio.Event()   # set whenever no call is left
        self._no_calls.set()
        self.config_path = config_path     # re-read on SIGHUP (None: reload unavailable)
        self.reloads = 0
        self.notifier = Notifier.from_env()    # systemd READY/STATUS/WATCHDOG; a no-op without it
        self._heartbeat: Heartbeat | None = None

    # ------------------------------------------------------------------ HTTP before upgrade
    def process_request(self, request: HttpRequest) -> HttpResponse | None:
        """Public listener, before the upgrade; None lets the upgrade through."""
        path, _, query = request.path.partition("?")
        if path == "/health" and "detail" not in query:
            live = self.liveness()   # 503 while draining: a balancer stops routing calls here
            if self._stopping.is_set():
                return _response(503, "Service Unavailable", live, [("Retry-After", "5")])
            return _response(200, "OK", live)
        if path == "/ready":
            return self.readiness()
        if path == "/live":       # liveness only: 200 while the process serves, drain included
            return _response(200, "OK", self.liveness())
        if path in ("/health", "/metrics"):
            if self._admin_auth is None:
                return _response(404, "Not Found", {"error": "served on the admin listener"})
            got = _authorization(request)
            if not hmac.compare_digest(got, self._admin_auth):
                self.noisy.emit("warning", "auth.rejected", peer=clip(request.remote, 64),
                                path=path)
                return _response(401, "Unauthorized", {"error": "invalid or missing admin token"},
                                 [("WWW-Authenticate", "Bearer")])
            return self.admin_request(request)
        if path != self.cfg.server.path:
            return _response(404, "Not Found", {"error": "not found", "path": clip(path, 100)})
        if self._expected_auth is not None or self._jwt is not None:
            why = self._bearer_failure(_authorization(request))
            if why is not None:
                self.stats.auth_rejected += 1
                self.noisy.emit("warning", "auth.rejected", peer=clip(request.remote, 64),
                                has_header="Authorization" in request.headers, why=why)
                return _response(401, "Unauthorized", {"error": "invalid or missing bearer token"},
                                 [("WWW-Authenticate", "Bearer")])
        if self._stopping.is_set():
            # draining: only as many upgrades as calls wait for their session.resume (a new
            # call among them is declined at session.initiate by _admit)
            opening = sum(1 for c in self.calls if c.session.phase is Phase.INITIATING
                          and c.adopter is None)   # upgraded, no initiate/resume yet
            if (self._n_reserved() + opening >= self._waiting()
                    or len(self.calls) + self._n_reserved() >= self.max_calls + self._waiting()):
                return self._refuse("draining", "the bridge is draining: try another instance",
                                    retry_after_s=5)
            self._reserved.add(request.conn)
            return None
        # a call waiting for its session.resume is not counted: that resume must get through
        # calls waiting for their session.resume are let past the cap, up to a tenth of it, so
        # their resumes get in; a new call among those is declined at session.initiate (_admit)
        allowance = min(self._waiting(), max(1, self.max_calls // 10))
        if len(self.calls) - allowance + self._n_reserved() >= self.max_calls:
            return self._refuse("max_calls", f"at capacity ({self.max_calls} calls)")
        self._reserved.add(request.conn)   # released when the call starts, or by process_response
        return None

    def _bearer_failure(self, got: bytes) -> str | None:
        """None if `got` (the Authorization header) is the permanent token (constant-time
        compare) or a valid JWT ([oauth]); else the reason, e.g. `wrong_token`, `expired`."""
        if self._expected_auth is not None and hmac.compare_digest(got, self._expected_auth):
            return None
        if self._jwt is None:
            return "wrong_token" if got else "missing"
        return self._jwt.check(got)

    def _n_reserved(self) -> int:
        if self._reserved:   # drop connections that died between the answer and the handler
            self._reserved = {c for c in self._reserved if not c.is_closing()}
        return len(self._reserved)

    def process_response(self, conn: Conn, status: int) -> None:
        """After the upgrade answer: a handshake the library refused never starts its call."""
        if status != 101:
            self._reserved.discard(conn)

    def _refuse(self, why: str, text: str, retry_after_s: int = 1) -> HttpResponse:
        self.stats.calls_refused += 1
        self.noisy.emit("warning", "conn.refused", reason=why, active_calls=len(self.calls))
        return _response(503, "Service Unavailable", {"error": text},
                         [("Retry-After", str(retry_after_s))])

    def _on_refused(self, why: str) -> None:
        self.noisy.emit("warning", "conn.refused", reason=why)

    def admin_request(self, request: HttpRequest) -> HttpResponse:
        """Admin listener: detailed /health and /metrics; never upgrades."""
        path = request.path.partition("?")[0]
        if path == "/health":
            return _response(200, "OK", self.health())
        if path == "/metrics":
            body = self.metrics_text()
            return HttpResponse(200, "OK", [("Content-Type", CONTENT_TYPE),
                                            ("Content-Length", str(len(body)))], body)
        return _response(404, "Not Found", {"error": "not found", "path": clip(path, 100)})

    def metrics_text(self) -> bytes:
        if self.worker is not None:
            return self.worker.metrics_text()
        now = time.monotonic()
        at, body = self._metrics_cache
        if now - at >= self.cfg.server.metrics_cache_s or not body:
            body = prometheus_text(self.stats, DaemonInfo(
                version=__version__, transport=self.cfg.server.transport,
                draining=self._stopping.is_set(), reloads=self.reloads))
            self._metrics_cache = (now, body)
        return body

    def readiness(self) -> HttpResponse:
        """`GET /ready`: 200 when new calls are welcome; 503 while draining, or when every
        OpenAI dial has failed for `server.ready_dial_fail_s` (calls would only be hung up)."""
        if self._stopping.is_set():
            return _response(503, "Service Unavailable", {"ready": False, "why": "draining"},
                             [("Retry-After", "5")])
        window_s = self.cfg.server.ready_dial_fail_s
        failing_s = self.stats.dials_failing_s(time.monotonic_ns(), window_s)
        if failing_s >= window_s:
            return _response(503, "Service Unavailable",
                             {"ready": False, "why": "openai_unreachable",
                              "failing_s": round(failing_s, 1),
                              "dial_failures": self.stats.dial_fail_streak},
                             [("Retry-After", "5")])
        return _response(200, "OK", {"ready": True, "active_calls": len(self.calls)})

    @property
    def draining(self) -> bool:
        """True from the first SIGTERM/SIGINT on."""
        return self._stopping.is_set()

    def liveness(self) -> dict[str, Any]:
        live = {"status": "draining" if self._stopping.is_set() else "ok",
                "version": __version__, "active_calls": len(self.calls),
                "uptime_s": round(time.monotonic() - self.started_at, 1)}
        return live if self.worker is None else self.worker.liveness(live)

    def status_text(self) -> str:
        """The systemd STATUS= line (cheap: called once a second)."""
        n = len(self.calls)
        state = "draining" if self._stopping.is_set() else f"listening on {self.cfg.server.host}:{self.port}"
        return f"{state}, {n} call{'' if n == 1 else 's'}"

    def health(self) -> dict[str, Any]:
        """Admin /health: liveness, call counts, the latency histograms and `process` (open fds,
        asyncio tasks, RSS KiB: what `python -m bench --soak` checks returns to its start)."""
        if self.worker is not None:
            return self.worker.health()
        return {**self.liveness(), "calls_total": self.stats.calls_total,
                "max_calls": self.max_calls,
                "latency_us": {name: h.snapshot() for name, h in self.stats.histograms().items()},
                "process": process_figures()}

    def dump_stats(self) -> None:
        """SIGUSR1: all stats as one structured log event, then a human-readable table, one
        `stats.table` line per row (readable in `journalctl` as it is, no `jq` needed)."""
        if self.worker is not None:
            self.worker.dump_stats()
            return
        self.log.info("stats.dump", **self.stats.snapshot())
        for line in self.stats.table().splitlines():
            if line.strip():
                self.log.info("stats.table", line=line)

    # ------------------------------------------------------------------ per connection
    async def _handler(self, end: Endpoint, conn: Conn) -> None:
        self._reserved.discard(conn)
        # a socket upgraded before the drain began is a call in setup: its session.initiate is
        # admitted even if it arrives after the signal (the drain waits for that call)
        admit = self._admit if self._stopping.is_set() else self._admit_in_setup
        call = Call(end, self.cfg, self.secrets, dialer=self.dialer, stats=self.stats,
                    resumer=self._resume, admit=admit, stalls=self.stalls)
        self.calls.add(call)
        self._no_calls.clear()
        self.stats.calls_active = len(self.calls)
        try:
            await call.run()
        finally:
            self.calls.discard(call)
            self.stats.calls_active = len(self.calls)
            if not self.calls:
                self._no_calls.set()
            if call.adopter is None:
                self.finished.append(call)
        if call.adopter is not None:   # the transport closes the socket when this returns
            await call.adopter.done.wait()

    def _resume(self, conversation_id: str, end: Endpoint) -> Call | None:
        """session.resume on a new socket: the call waiting for that conversation adopts it.
        The socket that carried the resume then stops counting as a call of its own."""
        for call in self.calls:
            if call.waiting_for_resume and call.session.call_id == conversation_id:
                call.adopt_vaic(end)
                return call
        return None

    def _waiting(self) -> int:
        return sum(1 for c in self.calls if c.waiting_for_resume)

    def _admit_in_setup(self) -> bool:
        return self._admit(upgraded_before_drain=True)

    def _admit(self, upgraded_before_drain: bool = False) -> bool:
        """At session.initiate: room for one more call? Calls waiting for their resume count
        here (they hold an OpenAI session), though not at the upgrade, so their resumes get in."""
        if self._stopping.is_set() and not upgraded_before_drain:   # draining: no new calls
            return False
        accepted = sum(1 for c in self.calls if c.session.phase is not Phase.INITIATING
                       and c.adopter is None)
        return accepted < self.max_calls

    # ------------------------------------------------------------------ lifecycle
    def _size_for_descriptors(self) -> None:
        s = self.cfg.server
        soft, hard = raise_nofile()
        # 2 sockets per call, plus the waiting calls' allowance past the cap (process_request)
        need = 2 * (s.max_calls + max(1, s.max_calls // 10)) + s.max_pending_handshakes + FD_RESERVE
        fields: dict[str, Any] = {"soft": soft, "hard": hard, "max_calls": s.max_calls}
        if need > soft:
            self.max_calls = max(1, (soft - s.max_pending_handshakes - FD_RESERVE) * 10 // 22)
            fields.update(max_calls=self.max_calls, clamped_from=s.max_calls,
                          hint="raise LimitNOFILE (systemd) or ulimit -n")
            self.log.warning("server.nofile", **fields)
        else:
            self.log.info("server.nofile", **fields)

    async def _listen(self, handler: Handler, process_request: ProcessRequest, host: str,
                      port: int, max_pending: int,
                      process_response: ProcessResponse | None = None) -> Listener:
        s = self.cfg.server
        opts = ListenOptions(max_size=s.max_message_bytes, ping_interval_s=s.ping_interval_s,
                             close_timeout_s=2.0, handshake_timeout_s=s.handshake_timeout_s,
                             max_pending=max_pending, backlog=s.backlog, limits=limits_of(self.cfg),
                             server_header=f"voicebridge/{__version__}",
                             reuse_port=self.worker is not None)
        return await self.transport.listen(handler, process_request, host, port, opts=opts,
                                           process_response=process_response,
                                           on_refused=self._on_refused)

    async def start(self) -> None:
        s = self.cfg.server
        self._size_for_descriptors()
        self._server = await self._listen(self._handler, self.process_request, s.host, s.port,
                                          s.max_pending_handshakes, self.process_response)
        admin_port = None
        if s.admin_port >= 0:
            self._admin = await self._listen(self._handler, self.admin_request, s.admin_host,
                                             s.admin_port, ADMIN_MAX_PENDING)
            admin_port = self._admin.sockets[0].getsockname()[1]
        if self._jwt is not None:   # the first JWKS fetch, bounded; a failure is only a warning
            await self._jwt.start()
        recording.configure(self.cfg.recording)   # [recording]: the directory, a retention check
        self.log.info("server.listening", host=s.host, port=self.port, path=s.path,
                      admin_host=s.admin_host if admin_port is not None else None,
                      admin_port=admin_port, transport=s.transport, max_calls=self.max_calls,
                      auth="+".join(n for n, on in (("bearer", self._expected_auth is not None),
                                                    ("oauth", self._jwt is not None)) if on) or "none",
                      version=__version__, openai=self.cfg.openai.provider,
                      openai_endpoint=clip(target(self.cfg.openai, Secrets())[0], 200), model=self.cfg.openai.model)
        self.stalls.start(asyncio.get_running_loop())   # the collector hook and the loop probe

    @property
    def port(self) -> int:
        assert self._server is not None
        port: int = self._server.sockets[0].getsockname()[1]
        return port

    @property
    def admin_port(self) -> int | None:
        return self._admin.sockets[0].getsockname()[1] if self._admin is not None else None

    async def stop(self) -> None:
        if self._server is None:
            return
        self._stopping.set()
        for call in list(self.calls):   # no resume can come any more: end them now
            if call.waiting_for_resume:
                call.abort()
        servers = [srv for srv in (self._server, self._admin) if srv is not None]
        for srv in servers:
            srv.close(close_connections=True)
        for srv in servers:
            await srv.wait_closed()
        if self._jwt is not None:
            await self._jwt.aclose()
        await recording.drain(5.0)     # the recordings of the calls that ended are written
        await webhooks.aclose_default()   # [webhooks]: the pooled HTTP connections
        self.stalls.stop()
        self.log.info("server.stopped", finished_calls=len(self.finished))

    def abort_all(self) -> None:
        """Abort every socket at once, VAIC and OpenAI (a forced or overdue shutdown)."""
        for call in list(self.calls):
            call.abort()
        for srv in (self._server, self._admin):
            if srv is not None:
                srv.abort_all()

    def _on_stop_signal(self, signum: int) -> None:
        if self._stopping.is_set():
            self._force.set()      # a second SIGTERM/SIGINT: no more waiting
        else:
            self.notifier.stopping()   # systemd: STOPPING=1 on the first signal
            self._stopping.set()

    def _on_sighup(self) -> None:
        self.reload()

    def reload(self) -> bool:
        """SIGHUP: re-read `config_path` (and the environment's overrides). New calls get the
        new configuration, calls in progress keep theirs (each `Call` holds its own). An invalid
        file keeps the old configuration and logs one error. Listener settings (host, ports,
        transport, socket bounds) and the secrets take effect only at a restart: the log says
        which changed keys those are. Returns whether the new configuration was taken."""
        if self.config_path is None:
            self.log.warning("server.reload_unavailable", detail="started without a config file")
            return False
        if self._stopping.is_set():
            self.log.warning("server.reload_ignored", detail="draining")
            return False
        self.notifier.reloading()
        try:
            return self._reload()
        except Exception as e:    # ConfigError, or anything unforeseen: the old config stays
            self.log.error("server.reload_failed", error=clip(str(e), 300), path=self.config_path,
                           error_type=type(e).__name__,
                           detail="the previous configuration stays in force")
            return False
        finally:                  # systemd: RELOADING=1 is always followed by READY=1
            self.notifier.ready(self.status_text())

    def _reload(self) -> bool:
        assert self.config_path is not None
        cfg, secrets = load_config(self.config_path)
        old = self.cfg
        changed = _changed_keys(old, cfg)
        restart = [k for k in changed if k.split(".")[0] in ("server", "oauth")
                   and k not in RELOADABLE_SERVER_KEYS]
        # the MCP tokens are the same process environment read for the new [mcp.*] labels:
        # taken with the configuration that names them (a changed variable still needs a restart)
        if msgspec.structs.replace(secrets, mcp_tokens={}) != msgspec.structs.replace(self.secrets, mcp_tokens={}):
            restart.append("(secrets in the environment)")
        self.secrets = msgspec.structs.replace(self.secrets, mcp_tokens=secrets.mcp_tokens)
        # what a restart would take stays as it was, so the running listeners, the validator
        # and the config agree
        cfg = msgspec.structs.replace(cfg, oauth=old.oauth, server=msgspec.structs.replace(
            old.server, **{k.split(".", 1)[1]: getattr(cfg.server, k.split(".", 1)[1])
                           for k in changed if k in RELOADABLE_SERVER_KEYS}))
        self.cfg = cfg
        if "server.max_calls" in changed:
            self.max_calls = cfg.server.max_calls     # then clamped by the descriptors again
            self._size_for_descriptors()
        if any(k.startswith("log.") for k in changed):
            setup(cfg.log.level, rate_limit_per_s=cfg.log.rate_limit_per_s)
            self.log = get_logger()
            self.noisy = Throttled(self.log)
        self.reloads += 1
        self.log.info("server.reloaded", path=self.config_path,
                      changed=[k for k in changed if k not in restart][:50],
                      restart_needed=restart[:50])
        return True

    async def serve_forever(self) -> None:
        await self.start()
        # the daemon has started: what exists now is frozen out of every later collection
        tune_gc(self.cfg.server.gc_freeze, self.cfg.server.gc_threshold or None)
        self.log.info("server.stalls", **self.stalls.settings())
        loop = asyncio.get_running_loop()
        install_loop_handler(loop)
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._on_stop_signal, sig)
        loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
        loop.add_signal_handler(signal.SIGUSR1, self.dump_stats)
        if self.worker is not None:   # its first snapshot is out before READY reaches the supervisor
            self.worker.start(self, loop)
        # READY only now: a `systemctl reload` right after it must find the SIGHUP handler
        status = self.status_text()
        self.notifier.ready(status)
        self._heartbeat = Heartbeat(self.notifier, loop, self.status_text)
        self._heartbeat.start(status)   # watchdog pings and STATUS= updates: loop timers
        try:
            await self._stopping.wait()
            await self.shutdown()
        finally:
            self._heartbeat.stop()   # pings on through the bounded shutdown, not after
            if self.worker is not None:
                self.worker.stop()

    async def _until(self, event: asyncio.Event, timeout_s: float) -> None:
        """Wait for `event`, at most `timeout_s`, and no longer once a second signal came."""
        if timeout_s <= 0 or event.is_set() or self._force.is_set():
            return
        waits = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(self._force.wait())}
        try:
            await asyncio.wait(waits, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()

    async def shutdown(self) -> None:
        """The drain, then the end (README "Operations"):
        1. new calls get 503 and `/health` says draining; calls in progress go on until they
           end or `server.drain_timeout_s` passes;
        2. each call left is hung up politely (hangup activity, OpenAI closed) and given
           `call.hangup_grace_s` (at most half of `server.shutdown_timeout_s`) to end;
        3. the listeners close (what is still open gets 1001); past `server.shutdown_timeout_s`
           after the drain everything is aborted. A second SIGTERM/SIGINT jumps to the abort."""
        self._stopping.set()
        s = self.cfg.server
        t0 = time.monotonic()
        at_signal = len(self.calls)
        self.log.info("server.draining", active_calls=at_signal, drain_timeout_s=s.drain_timeout_s)
        await self._until(self._no_calls, s.drain_timeout_s)
        left = [c for c in self.calls if c.adopter is None]
        drained_s = time.monotonic() - t0
        t_end = time.monotonic()
        if left and not self._force.is_set():
            for call in left:
                call.shutdown()
            await self._until(self._no_calls, min(self.cfg.call.hangup_grace_s,
                                                  s.shutdown_timeout_s / 2))
        self.log.info("server.drained", calls_at_signal=at_signal,
                      drained=max(0, at_signal - len(left)), ended_by_timeout=len(left),
                      drain_s=round(drained_s, 2), forced=self._force.is_set())
        stopping = asyncio.ensure_future(self.stop())
        forced = asyncio.ensure_future(self._force.wait())
        try:
            rest_s = max(0.0, s.shutdown_timeout_s - (time.monotonic() - t_end))
            await asyncio.wait({stopping, forced}, timeout=rest_s, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()
        if not stopping.done():
            self.log.warning("server.shutdown_forced", active_calls=len(self.calls),
                             why="second signal" if self._force.is_set() else "shutdown_timeout_s")
            self.abort_all()
            try:
                await asyncio.wait_for(stopping, 2.0)
            except (asyncio.TimeoutError, TimeoutError):
                self.log.error("server.stopped", finished_calls=len(self.finished), incomplete=True)

    async def __aenter__(self) -> "Bridge":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
