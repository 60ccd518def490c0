"""Regression tests for issue 7: every attack A–Q of the adversarial run, against the REAL daemon
process over real sockets on 127.0.0.1.

Each test is bounded in time, asserts the bound the fix promises (RSS growth, time until the
attacker's socket is closed, log volume, close codes and end reasons) and that a clean call
running beside the attack (or right after it, for the signal tests) completes with no frame lost
in either direction (`daemon_harness.clean_call`). Measured figures go to $VB_HARDENING_FIGURES
(JSON lines) when that variable is set.

Daemons: one module-scoped daemon for the attacks that do not kill it; separate ones where a
config override or a signal is the point (limits E/F, slow upstream N/O, second SIGTERM O,
SIGHUP and keepalive P/Q). All of them talk to fake OpenAI servers in this process; the
malicious upstream knobs (`silent`, `bad_delta`, `stop_reading_after_s`) are read per session at
connect, so a test switches one on for the attack call only and off again before its clean call.
"""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import time
import uuid
from typing import Any, Callable

import pytest
import pytest_asyncio

from tests.daemon_harness import (
    TOKEN,
    Daemon,
    RssSampler,
    clean_call,
    fake_config,
    fake_session_of,
    figures,
    new_caller,
    running_fake,
    start_daemon,
    wait_until,
)
from tests.rawws import OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, RawWs, frame, text, upgrade_request
from voicebridge.config import ServerConfig
from voicebridge.sim.caller import CallerConfig, Silence, run_call
from voicebridge.transport import TRANSPORTS
from voicebridge.sim.fake_openai import make_tone

pytestmark = pytest.mark.asyncio(loop_scope="module")

ADMIN_TOKEN = "admin-harness-token"
RATE_PER_S = 5
MB = 1024 * 1024
RSS_BOUND_KIB = 60 * 1024           # "RSS growth bounded": < 60 MB over any one attack
INJECTION = 'AAAA","type":"activities","activities":[{"type":"event","name":"transfer"}],"x":"'

# the module daemon: default limits except those that make attacks quick to observe
MODULE_ENV = {
    "VOICEBRIDGE_SERVER_SEND_TIMEOUT_S": "3",
    "VOICEBRIDGE_OPENAI_SESSION_TIMEOUT_S": "2",
    "VOICEBRIDGE_LOG_RATE_LIMIT_PER_S": str(RATE_PER_S),
    "VOICEBRIDGE_SERVER_MAX_CALLS": "100",
    "VOICEBRIDGE_ADMIN_TOKEN": ADMIN_TOKEN,
}


# ------------------------------------------------------------------------------------ fixtures


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def fake():
    async with running_fake(fake_config()) as f:
        yield f


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def daemon(fake, tmp_path_factory):
    d = await start_daemon(fake, tmp_path_factory.mktemp("vb-main"), name="main", **MODULE_ENV)
    try:
        yield d
    finally:
        await d.stop()
        d.kill()


_OPEN_RAW: list["RawCall"] = []
_TASKS: list["asyncio.Task[Any]"] = []


def spawn(coro: Any) -> "asyncio.Task[Any]":
    """A background task of this test; cancelled at teardown if a failure left it running."""
    task = asyncio.get_running_loop().create_task(coro)
    _TASKS.append(task)
    return task


def _retrieve(task: "asyncio.Task[Any]") -> None:
    if not task.cancelled():
        task.exception()     # never left for a finalizer ("exception was never retrieved")


@pytest.fixture(autouse=True)
def _reset_fake_knobs(request):
    yield
    while _OPEN_RAW:                  # raw attack sockets a failed test left open
        _OPEN_RAW.pop().abort()
    while _TASKS:                     # background calls a failed test left behind
        task = _TASKS.pop()
        if task.done():
            _retrieve(task)
        else:
            task.cancel()
            task.add_done_callback(_retrieve)
    if "fake" in request.fixturenames:
        f = request.getfixturevalue("fake")
        f.config.silent = False
        f.config.bad_delta = None
        f.config.stop_reading_after_s = None


def assert_log_clean(d: Daemon) -> None:
    bad = d.non_json_lines()
    assert bad == [], f"non-JSON log lines: {bad[:5]}"
    assert "Traceback" not in d.log_text()
    assert not d.events("call.internal_error")


async def with_knob(fake, name: str, value: Any, start: Callable[[], "asyncio.Task[Any]"], caller: str,
                    timeout_s: float = 5.0) -> "asyncio.Task[Any]":
    """Switch a fake knob on, start the attack call (a task), wait until its fake session exists
    (knobs are read at connect), switch the knob off again."""
    setattr(fake.config, name, value)
    try:
        task = start()
        ok = await wait_until(lambda: fake_session_of(fake, caller) is not None or task.done(), timeout_s)
        assert ok and fake_session_of(fake, caller) is not None, f"no fake session for the {name} call"
        return task
    finally:
        setattr(fake.config, name, None if name != "silent" else False)


# ------------------------------------------------------------------------------------ raw VAIC


class RawCall:
    """A VAIC peer written by hand (tests/rawws.py): any frame, read or not read, ping or not."""

    def __init__(self, ws: RawWs, d: Daemon) -> None:
        self.ws = ws
        self.d = d
        self.msgs: list[dict[str, Any]] = []
        self.raw_texts: list[bytes] = []
        self.close_code: int | None = None
        self.eof = False
        self.cid = "raw-" + uuid.uuid4().hex[:10]
        self.caller = new_caller()

    @classmethod
    async def open(cls, d: Daemon, *, token: str | None = TOKEN, rcvbuf: int | None = None) -> "RawCall":
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        if rcvbuf is not None:  # before connect: no autotuning of the window, the kernel absorbs little
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
        sock.setblocking(False)
        await asyncio.wait_for(loop.sock_connect(sock, ("127.0.0.1", d.port)), 5)
        reader, writer = await asyncio.open_connection(sock=sock, limit=2**24)
        ws = RawWs(reader, writer)
        ws.send(upgrade_request(d.path, f"127.0.0.1:{d.port}", token))
        await ws.read_head(5.0)
        call = cls(ws, d)
        _OPEN_RAW.append(call)
        return call

    @property
    def local_port(self) -> int:
        return self.ws.writer.get_extra_info("sockname")[1]

    def daemon_holds_socket(self) -> bool:
        return bool(self.d.tcp_sockets(local_port=self.d.port, remote_port=self.local_port))

    def send_json(self, msg: dict[str, Any]) -> None:
        msg = {"type": msg["type"], "conversationId": self.cid, **msg}
        self.ws.send(text(json.dumps(msg, separators=(",", ":"))))

    def initiate(self, fmt: str = "raw/lpcm16_24") -> None:
        self.send_json({"type": "session.initiate", "botName": "b", "caller": self.caller,
                        "expectAudioMessages": True, "supportedMediaFormats": [fmt]})

    def chunk(self, b64: str) -> bytes:
        return text(json.dumps({"type": "userStream.chunk", "conversationId": self.cid, "audioChunk": b64},
                               separators=(",", ":")))

    async def read_until(self, pred: Callable[[dict[str, Any]], bool] | None, timeout_s: float,
                         answer_pings: bool = True) -> dict[str, Any] | None:
        """Read (and record) messages until `pred` matches one, a close frame or EOF, or timeout."""
        ws = self.ws
        loop = asyncio.get_running_loop()
        end = loop.time() + timeout_s
        while True:
            while True:
                f = ws._parse_one()
                if f is None:
                    break
                op, payload = f
                if op == OP_PING and answer_pings:
                    ws.send(frame(OP_PONG, payload))
                elif op == OP_CLOSE:
                    self.close_code = int.from_bytes(payload[:2], "big") if len(payload) >= 2 else 1005
                    if answer_pings:        # a compliant peer answers the close handshake, then
                        ws.send(frame(OP_CLOSE, payload[:2]))   # closes TCP (RFC 6455 7.1.1)
                        ws.writer.close()
                    return None
                elif op == OP_TEXT:
                    self.raw_texts.append(payload)
                    try:
                        msg = json.loads(payload)
                    except ValueError:
                        msg = {"type": "<non-json>", "raw": payload[:200]}
                    self.msgs.append(msg)
                    if pred is not None and pred(msg):
                        return msg
            left = end - loop.time()
            if left <= 0:
                return None
            try:
                data = await asyncio.wait_for(ws.reader.read(1 << 20), left)
            except (asyncio.TimeoutError, TimeoutError):
                return None
            except ConnectionError:
                self.eof = True
                return None
            if not data:
                self.eof = True
                return None
            ws._buf += data

    async def accepted(self, timeout_s: float = 5.0) -> dict[str, Any]:
        msg = await self.read_until(lambda m: m.get("type") in ("session.accepted", "session.error"), timeout_s)
        assert msg is not None and msg["type"] == "session.accepted", (msg, self.msgs)
        return msg

    async def upstream(self, fake, timeout_s: float = 5.0):
        """The fake OpenAI session of this call, once the bridge has sent its session.update."""
        ok = await wait_until(lambda: fake_session_of(fake, self.caller) is not None, timeout_s)
        assert ok, f"no OpenAI session for raw call {self.cid}"
        return fake_session_of(fake, self.caller)

    async def closed(self, timeout_s: float) -> bool:
        """True once the daemon closed the connection (close frame, EOF or reset) in `timeout_s`."""
        if self.close_code is not None or self.eof:
            return True
        await self.read_until(None, timeout_s)
        return self.close_code is not None or self.eof

    def abort(self) -> None:
        self.ws.abort()


def silence_b64(ms: int, bytes_per_ms: int = 48) -> str:
    return base64.b64encode(bytes(ms * bytes_per_ms)).decode()


async def wait_gone(pred: Callable[[], bool], timeout_s: float) -> float | None:
    """Seconds until `pred()` is true, or None if not within `timeout_s`."""
    t0 = time.monotonic()
    if await wait_until(pred, timeout_s, 0.02):
        return time.monotonic() - t0
    return None


def attack_figures(test: str, rss: RssSampler | None, log0: int, d: Daemon, clean, **extra: Any) -> None:
    nums: dict[str, Any] = dict(extra)
    if rss is not None:
        nums["peak_rss_delta_kib"] = rss.growth_kib
    nums["log_bytes"] = d.log_bytes() - log0
    if clean is not None:
        nums.update(clean.figures())
    figures(test, **nums)


# ------------------------------------------------------------------------------------ A


async def test_A_ping_flood_never_read_is_closed(daemon, fake):
    """See `attack_A` (also run on the other transports)."""
    await attack_A(daemon, fake)


async def attack_A(daemon, fake, tag: str = ""):
    """A: pings (125-byte payloads, in batches) from a client that never reads: the pongs are
    unsent bytes, bounded by send_buffer_bytes / send_timeout_s: the socket is closed, RSS flat."""
    d = daemon
    log0 = d.log_bytes()
    att = await RawCall.open(d, rcvbuf=4096)
    assert att.ws.status == 101
    att.initiate()
    att.ws.writer.transport.pause_reading()          # never read anything from here on
    clean = spawn(clean_call(d, fake))
    ping = frame(OP_PING, b"p" * 125)
    batch = ping * 2000                               # ~270 KB of pings per write
    with RssSampler(d) as rss:
        t0 = time.monotonic()
        closed_after = None
        while time.monotonic() - t0 < 15:
            if att.ws.writer.transport.is_closing() or not att.daemon_holds_socket():
                closed_after = time.monotonic() - t0
                break
            att.ws.send(batch)
            await asyncio.sleep(0.01)
    att.abort()
    out = await clean
    attack_figures("A" + tag, rss, log0, d, out, seconds_to_close=closed_after)
    assert closed_after is not None, "a client that never reads its pongs was not closed within 15 s"
    assert closed_after < 10
    assert rss.growth_kib < RSS_BOUND_KIB, f"RSS grew {rss.growth_kib} KiB"
    assert_log_clean(d)


# ------------------------------------------------------------------------------------ B


async def test_B_empty_continuation_flood_closed_1009(daemon, fake):
    """See `attack_B` (also run on the other transports)."""
    await attack_B(daemon, fake)


async def attack_B(daemon, fake, tag: str = ""):
    """B: after session.initiate, TEXT fin=0 "{" then empty CONT frames by the 50 000, answering
    pings: more than max_fragments fragments -> close 1009, call.end vaic_frame_too_big."""
    d = daemon
    log0 = d.log_bytes()
    clean = spawn(clean_call(d, fake))
    att = await RawCall.open(d)
    att.initiate()
    await att.accepted()
    cont = frame(OP_CONT, b"", fin=False)
    with RssSampler(d) as rss:
        t0 = time.monotonic()
        att.ws.send(text("{", fin=False))
        for _ in range(4):
            att.ws.send(cont * 50_000)
            await asyncio.sleep(0.02)
        closed = await att.closed(10.0)
        secs = time.monotonic() - t0
    att.abort()
    out = await clean
    end = await d.wait_event("call.end", 5.0, call_id=att.cid)
    attack_figures("B" + tag, rss, log0, d, out, seconds_to_close=round(secs, 3), close_code=att.close_code)
    assert closed and secs < 5, f"fragment flood not closed within 5 s (closed={closed})"
    assert att.close_code == 1009, att.close_code
    assert end is not None and end["reason"] == "vaic_frame_too_big" and "1009" in end["detail"], end
    assert rss.growth_kib < RSS_BOUND_KIB
    assert_log_clean(d)


# ------------------------------------------------------------------------------------ C


async def test_C_unique_huge_activity_names_bounded_log_and_keys(daemon, fake):
    """C: activities with unique ~1 MB names: names clipped in the log, at most 64 "log once" keys
    per call, log volume and RSS bounded."""
    d = daemon
    log0 = d.log_bytes()
    clean = spawn(clean_call(d, fake))
    att = await RawCall.open(d)
    att.initiate()
    await att.accepted()
    n_names = 70
    filler = "n" * 1_000_000
    with RssSampler(d) as rss:
        t0 = time.monotonic()
        for i in range(n_names):
            act = {"type": "activities", "conversationId": att.cid,
                   "activities": [{"type": "event", "name": f"{i:04d}{filler}", "id": "x" * 1000}]}
            att.ws.send(text(json.dumps(act)))
            await att.ws.drain(10)
        att.send_json({"type": "session.end", "reasonCode": "client-disconnected"})
        end = await d.wait_event("call.end", 20.0, call_id=att.cid)
        secs = time.monotonic() - t0
    att.abort()
    out = await clean
    grown = d.log_bytes() - log0
    ignored = d.events("call.activity_ignored", call_id=att.cid)
    attack_figures("C", rss, log0, d, out, seconds=round(secs, 2), activity_lines=len(ignored))
    assert end is not None and end["reason"] == "vaic_session_end", end
    assert len(ignored) <= 64, len(ignored)
    assert all(len(str(e.get("name", ""))) <= 200 for e in ignored)
    assert grown < 512 * 1024, f"{grown} bytes of log for {n_names} activity names"
    assert rss.growth_kib < RSS_BOUND_KIB, rss.growth_kib
    assert_log_clean(d)


# ------------------------------------------------------------------------------------ D + Q(1009)


async def test_D_big_frames_unread_bounded_and_oversize_1009(daemon, fake):
    """D: 50 frames of ~1 MB (just under max_message_bytes) from a client that never reads: the
    receive queue is bounded in bytes, RSS flat, every frame processed (dropped as too long).
    Q: a 4 MiB frame is closed with 1009 and logged as vaic_frame_too_big, code=1009."""
    d = daemon
    log0 = d.log_bytes()
    clean = spawn(clean_call(d, fake))
    att = await RawCall.open(d, rcvbuf=4096)
    att.initiate()
    await att.accepted()
    att.send_json({"type": "userStream.start"})
    att.ws.writer.transport.pause_reading()
    big = att.chunk("A" * 1_000_000)                # 20 s of 24 kHz audio: over max_frame_ms
    with RssSampler(d) as rss:
        for _ in range(50):
            att.ws.send(big)
        await att.ws.drain(20)
        att.send_json({"type": "session.end", "reasonCode": "client-disconnected"})
        await att.ws.drain(5)
        end = await d.wait_event("call.end", 20.0, call_id=att.cid)
    att.abort()
    # Q: one frame over max_message_bytes (1 MiB default): 1009
    q = await RawCall.open(d)
    q.initiate()
    await q.accepted()
    t0 = time.monotonic()
    q.ws.send(q.chunk("A" * (4 * MB)))
    closed = await q.closed(10.0)
    secs = time.monotonic() - t0
    q.abort()
    q_end = await d.wait_event("call.end", 5.0, call_id=q.cid)
    out = await clean
    attack_figures("D", rss, log0, d, out, seconds_to_close_4mib=round(secs, 3), close_code=q.close_code)
    assert end is not None and end["reason"] == "vaic_session_end", end
    assert end["bad_frames_in"] == 50, end
    assert rss.growth_kib < RSS_BOUND_KIB, rss.growth_kib
    assert closed and secs < 5 and q.close_code == 1009, (closed, secs, q.close_code)
    assert q_end is not None and q_end["reason"] == "vaic_frame_too_big" and "1009" in q_end["detail"], q_end
    assert_log_clean(d)


# ------------------------------------------------------------------------------------ G


async def test_G_bad_token_flood_log_rate_limited(daemon, fake):
    """G: a flood of upgrade requests with a wrong token: each gets 401, but `auth.rejected` is
    written at most ~log.rate_limit_per_s times per second (the rest counted as suppressed=N)."""
    d = daemon
    clean = spawn(clean_call(d, fake))
    n_before = len(d.events("auth.rejected"))
    log0 = d.log_bytes()
    statuses: dict[int | None, int] = {}
    stop_at = time.monotonic() + 2.0
    attempts = 0

    async def worker() -> None:
        nonlocal attempts
        while time.monotonic() < stop_at:
            attempts += 1
            try:
                ws = await RawWs.open("127.0.0.1", d.port, d.path, "wrong-token", timeout_s=3)
                st = ws.status
                ws.abort()
            except (OSError, asyncio.TimeoutError, TimeoutError):
                st = None
            statuses[st] = statuses.get(st, 0) + 1

    t0 = time.monotonic()
    cpu0 = d.cpu_s()
    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(32))), 20)
    secs = time.monotonic() - t0
    cpu = d.cpu_s() - cpu0
    out = await clean
    await asyncio.sleep(0.3)
    lines = d.events("auth.rejected")[n_before:]
    suppressed = sum(int(e.get("suppressed", 0) or 0) for e in lines)
    grown = d.log_bytes() - log0
    attack_figures("G", None, log0, d, out, attempts=attempts, seconds=round(secs, 2),
                   rate_per_s=round(attempts / secs), auth_lines=len(lines), suppressed=suppressed,
                   cpu_ms_per_attempt=round(1000 * cpu / max(1, attempts), 3))
    assert statuses.get(401, 0) >= 0.95 * attempts, statuses
    assert attempts > 300, attempts                 # it was a flood
    assert len(lines) <= RATE_PER_S * (secs + 2) + 2, (len(lines), secs)
    assert len(lines) + suppressed <= attempts
    assert suppressed > 0
    assert grown < 64 * 1024, f"{grown} bytes of log for {attempts} bad-token attempts"
    assert TOKEN not in d.log_text() and "wrong-token" not in d.log_text()
    assert_log_clean(d)


# ------------------------------------------------------------------------------------ H


async def test_H_metrics_flood_and_admin_listener(daemon, fake):
    """H: /metrics on the public listener without the admin token is a cheap 404 (401 with a
    wrong token), the public /health is the cheap liveness answer, /metrics and the detailed
    /health live on the admin listener; a flood of unauthenticated scrapes stays cheap."""
    d = daemon
    status, _, body = await d.http_get("/health")
    pub = json.loads(body)
    assert status == 200 and pub["status"] == "ok" and "latency_us" not in pub, pub
    # VOICEBRIDGE_ADMIN_TOKEN is set for this daemon: missing or wrong token -> 401
    # (without it the public /metrics is a 404: test_P checks that on a daemon without one)
    assert (await d.http_get("/metrics"))[0] == 401
    assert (await d.http_get("/metrics", headers={"Authorization": "Bearer nope"}))[0] == 401
    status, _, body = await d.http_get("/metrics", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200 and b"voicebridge_calls_active" in body
    assert (await d.http_get("/health?detail=1"))[0] == 401
    status, _, body = await d.http_get("/health?detail=1", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    assert status == 200 and "latency_us" in json.loads(body)
    assert d.admin_port is not None, "no admin listener"
    status, _, body = await d.http_get("/metrics", admin=True)
    assert status == 200 and b"voicebridge_up_forward_seconds" in body
    status, _, body = await d.http_get("/health", admin=True)
    assert status == 200 and "latency_us" in json.loads(body)

    clean = spawn(clean_call(d, fake))
    log0 = d.log_bytes()
    n = 0
    codes: dict[int, int] = {}
    stop_at = time.monotonic() + 1.5

    async def worker(headers: dict[str, str] | None) -> None:
        nonlocal n
        while time.monotonic() < stop_at:
            try:
                st, _, _ = await d.http_get("/metrics", headers=headers, timeout_s=3)
            except (OSError, asyncio.TimeoutError, TimeoutError, asyncio.IncompleteReadError):
                st = -1
            codes[st] = codes.get(st, 0) + 1
            n += 1

    cpu0 = d.cpu_s()
    t0 = time.monotonic()
    health_ms: list[float] = []

    async def probe() -> None:
        while time.monotonic() < stop_at:
            t = time.monotonic()
            await d.health(timeout_s=5)
            health_ms.append(1000 * (time.monotonic() - t))
            await asyncio.sleep(0.1)

    await asyncio.wait_for(asyncio.gather(probe(), *(worker(None) for _ in range(16)),
                                          *(worker({"Authorization": "Bearer nope"}) for _ in range(8))), 20)
    secs = time.monotonic() - t0
    cpu_ms = 1000 * (d.cpu_s() - cpu0) / max(1, n)
    # authorised scrapes on the admin listener: the rendered text is cached
    t1 = time.monotonic()
    cpu1 = d.cpu_s()
    for _ in range(100):
        assert (await d.http_get("/metrics", admin=True))[0] == 200
    admin_cpu_ms = 1000 * (d.cpu_s() - cpu1) / 100
    out = await clean
    attack_figures("H", None, log0, d, out, scrapes=n, seconds=round(secs, 2), codes=codes,
                   cpu_ms_per_unauth_scrape=round(cpu_ms, 3), admin_cpu_ms_per_scrape=round(admin_cpu_ms, 3),
                   admin_100_scrapes_s=round(time.monotonic() - t1, 2),
                   max_health_ms_during_flood=round(max(health_ms), 1))
    assert set(codes) == {401}, codes
    assert n > 200, n
    assert max(health_ms) < 1000, health_ms
    assert cpu_ms < 1.5, f"{cpu_ms:.2f} ms of daemon CPU per unauthenticated /metrics"
    assert d.log_bytes() - log0 < 64 * 1024
    assert ADMIN_TOKEN not in d.log_text()
    assert_log_clean(d)


# ------------------------------------------------------------------------------------ I


async def test_I_pipelined_upgrade_requests(daemon, fake):
    """I: two upgrade requests in one segment (with and without a token): every connection gets
    an answer and is closed, no traceback and no non-JSON line in the log, log volume bounded."""
    d = daemon
    clean = spawn(clean_call(d, fake))
    log0 = d.log_bytes()

    async def one(token: str | None) -> tuple[int | None, bool]:
        ws = await RawWs.connect("127.0.0.1", d.port)
        req = upgrade_request(d.path, f"127.0.0.1:{d.port}", token)
        ws.send(req + req)
        st = await ws.read_head(5)
        closed = await ws.closed_by_peer(5)
        ws.abort()
        return st, closed

    t0 = time.monotonic()
    results = []
    for i in range(0, 400, 40):
        results += await asyncio.wait_for(asyncio.gather(
            *(one(TOKEN if k % 2 else None) for k in range(i, i + 40))), 30)
    secs = time.monotonic() - t0
    out = await clean
    attack_figures("I", None, log0, d, out, connections=len(results), seconds=round(secs, 2),
                   statuses={str(k): sum(1 for st, _ in results if st == k) for k in {st for st, _ in results}})
    # the answer is 400 (one request per connection); it may be lost to the RST the kernel sends
    # when the server closes with the second request unread (None): never 101, never a hang
    assert all(closed for _, closed in results), "a pipelined connection was left open"
    assert {st for st, _ in results} <= {400, 401, None}, {st for st, _ in results}
    assert d.log_bytes() - log0 < 64 * 1024, d.log_bytes() - log0
    assert "AssertionError" not in d.log_text()
    assert d.alive()
    assert_log_clean(d)


# ------------------------------------------------------------------------------------ J


async def test_J_deep_json_nesting(daemon, fake):
    """J: JSON nested ~1M levels: before session.initiate -> session.error; mid-call -> a
    malformed frame, the call goes on (audio before and after reaches OpenAI) and ends normally."""
    d = daemon
    log0 = d.log_bytes()
    clean = spawn(clean_call(d, fake))
    deep = "[" * 1_000_000
    pre = await RawCall.open(d)
    t0 = time.monotonic()
    pre.ws.send(text(deep))
    err = await pre.read_until(lambda m: m.get("type") == "session.error", 5.0)
    secs = time.monotonic() - t0
    pre.abort()
    assert err is not None, f"no session.error for deep nesting before initiate: {pre.msgs} close={pre.close_code}"

    mid = await RawCall.open(d)
    mid.initiate()
    await mid.accepted()
    await mid.upstream(fake)
    mid.send_json({"type": "userStream.start"})
    assert await mid.read_until(lambda m: m.get("type") == "userStream.started", 5.0)
    chunk = mid.chunk(silence_b64(20))
    for _ in range(5):
        mid.ws.send(chunk)
    mid.ws.send(text(deep))
    mid.ws.send(text('{"a":' * 150_000 + "1" + "}" * 150_000))
    for _ in range(5):
        mid.ws.send(chunk)
    mid.send_json({"type": "userStream.stop"})
    stopped = await mid.read_until(lambda m: m.get("type") == "userStream.stopped", 5.0)
    mid.send_json({"type": "session.end", "reasonCode": "client-disconnected"})
    end = await d.wait_event("call.end", 5.0, call_id=mid.cid)
    mid.abort()
    out = await clean
    session = fake_session_of(fake, mid.caller)
    attack_figures("J", None, log0, d, out, seconds_to_session_error=round(secs, 3))
    assert stopped is not None, (mid.msgs, mid.close_code, end)
    assert end is not None and end["reason"] == "vaic_session_end" and end["bad_frames_in"] >= 2, end
    assert session is not None and await wait_until(lambda: session.closed_at is not None, 3)
    assert len(session.received_of("input_audio_buffer.append")) == 10
    assert not d.events("call.end", reason="internal_error")
    assert_log_clean(d)


# ------------------------------------------------------------------------------------ K


async def test_K_base64_checked_both_directions(daemon, fake):
    """K: the upstream sends a delta whose "base64" carries a JSON injection (a transfer
    activity): it is dropped, VAIC never sees the injected keys; the genuine deltas all arrive.
    Up direction: caller chunks that are not strict base64 never reach OpenAI."""
    d = daemon
    log0 = d.log_bytes()
    caller = new_caller()
    attack = await with_knob(fake, "bad_delta", INJECTION,
                             lambda: spawn(clean_call(d, fake, caller=caller)), caller)
    clean = spawn(clean_call(d, fake))
    hit = await attack        # clean_call asserts: no transfer/hangup, no violation, genuine audio all there
    out = await clean
    session = hit.session
    assert session.bad_deltas_sent >= 1
    assert not any(a.get("name") == "transfer" for a in hit.result.received_activities)
    assert hit.result.unknown_messages == []
    assert d.events("call.openai_bad_audio", call_id=hit.conversation_id), "bad delta not logged"

    # raw view of the same attack: no frame the bridge sends may carry the injected text
    raw = await RawCall.open(d)
    fake.config.bad_delta = INJECTION
    try:
        raw.initiate("raw/lpcm16_24")
        await raw.accepted()
        await raw.upstream(fake)
    finally:
        fake.config.bad_delta = None
    raw.send_json({"type": "userStream.start"})
    tone = base64.b64encode(make_tone(20, "audio/pcm")).decode()
    for _ in range(30):                               # 600 ms of speech, then silence: one turn
        raw.ws.send(raw.chunk(tone))
    sil = raw.chunk(silence_b64(20))
    for _ in range(40):
        raw.ws.send(sil)
    await raw.read_until(lambda m: m.get("type") == "playStream.stop", 6.0)
    # up direction: not strict base64
    bad_chunks = ["AAAA AAAA", 'AA"A', "AA\\AA", "AA==AAAA", "AA-_AAAA", "AAA\u00e9", "AAAAA", "AAAA\n"]
    for b in bad_chunks:
        raw.ws.send(raw.chunk(b))
    for _ in range(3):
        raw.ws.send(sil)
    raw.send_json({"type": "session.end", "reasonCode": "client-disconnected"})
    end = await d.wait_event("call.end", 5.0, call_id=raw.cid)
    raw.abort()
    rs = fake_session_of(fake, raw.caller)
    assert rs is not None and await wait_until(lambda: rs.closed_at is not None, 3)
    attack_figures("K", None, log0, d, out, bad_deltas=session.bad_deltas_sent + rs.bad_deltas_sent,
                   raw_frames=len(raw.raw_texts))
    assert rs.bad_deltas_sent >= 1
    assert any(m.get("type") == "playStream.chunk" for m in raw.msgs), raw.msgs[:5]
    for t in raw.raw_texts:
        assert b"transfer" not in t and b"activities" not in t, t[:300]
        msg = json.loads(t)
        if msg["type"] == "playStream.chunk":
            assert set(msg) <= {"type", "conversationId", "streamId", "audioChunk"}, msg.keys()
            base64.b64decode(msg["audioChunk"], validate=True)
    assert end is not None and end["bad_frames_in"] == len(bad_chunks), end
    appends = rs.received_of("input_audio_buffer.append")
    assert len(appends) == 30 + 40 + 3, len(appends)
    for a in appends:
        base64.b64decode(a["audio"], validate=True)
    assert not [e for e in rs.errors_sent if e["error"].get("param") == "audio"], rs.errors_sent
    assert_log_clean(d)


# ------------------------------------------------------------------------------------ L


@pytest.mark.parametrize("fmt,bpms", [("raw/lpcm16", 32), ("raw/lpcm16_8", 16)])
async def test_L_huge_audio_chunks_do_not_block_the_loop(daemon, fake, fmt, bpms):
    """L: ~1 MB audioChunks (tens of seconds of audio) in the 16/8 kHz formats: dropped as bad
    input without decoding (over audio.max_frame_ms), the event loop stays responsive; a chunk
    under the limit still goes through."""
    d = daemon
    log0 = d.log_bytes()
    clean = spawn(clean_call(d, fake))
    att = await RawCall.open(d)
    att.initiate(fmt)
    await att.accepted()
    await att.upstream(fake)
    att.send_json({"type": "userStream.start"})
    big = att.chunk(base64.b64encode(bytes(750_000)).decode())       # 23 s at 16 kHz, 47 s at 8 kHz
    ok = att.chunk(silence_b64(900, bpms))                          # 900 ms: under max_frame_ms
    health_ms: list[float] = []
    stop = asyncio.Event()

    async def probe() -> None:
        while not stop.is_set():
            t = time.monotonic()
            await d.health(timeout_s=10)
            health_ms.append(1000 * (time.monotonic() - t))
            await asyncio.sleep(0.02)

    prober = spawn(probe())
    t0 = time.monotonic()
    for _ in range(20):
        att.ws.send(big)
        await att.ws.drain(10)
    att.ws.send(ok)
    att.send_json({"type": "session.end", "reasonCode": "client-disconnected"})
    end = await d.wait_event("call.end", 10.0, call_id=att.cid)
    secs = time.monotonic() - t0
    stop.set()
    await prober
    att.abort()
    out = await clean
    session = fake_session_of(fake, att.caller)
    attack_figures(f"L-{fmt}", None, log0, d, out, seconds=round(secs, 2),
                   max_health_ms=round(max(health_ms), 1))
    assert end is not None and end["bad_frames_in"] == 20, end
    # before the fix each such frame was decoded and resampled: /health took 640-670 ms here
    assert max(health_ms) < 400, f"/health took up to {max(health_ms):.0f} ms during the flood"
    assert session is not None and await wait_until(lambda: session.closed_at is not None, 3)
    assert len(session.received_of("input_audio_buffer.append")) == 1
    assert d.events("call.bad_audio_chunk", call_id=att.cid)
    assert_log_clean(d)


# ------------------------------------------------------------------------------------ M


async def test_M_silent_upstream_hangs_up_instead_of_dead_air(daemon, fake):
    """M: OpenAI accepts the socket and sends nothing: after openai.session_timeout_s (2 s here)
    the caller gets a hangup activity (reason openai_no_session...), the OpenAI socket is closed,
    call.end reason openai_no_session."""
    d = daemon
    log0 = d.log_bytes()
    caller = new_caller()
    cid = "silent-" + uuid.uuid4().hex[:8]
    attack = await with_knob(fake, "silent", True, lambda: spawn(run_call(CallerConfig(
        url=d.url, token=TOKEN, caller=caller, conversation_id=cid, formats=["raw/lpcm16_24"],
        script=[Silence(8000)]))), caller)
    clean = spawn(clean_call(d, fake))
    res = await attack
    out = await clean
    session = fake_session_of(fake, caller)
    assert session is not None
    closed = await wait_until(lambda: session.closed_at is not None, 3.0)
    t_acc = next((e.t_ms for e in res.events if e.type == "session.accepted"), None)
    t_hang = next((e.t_ms for e in res.events if e.type == "activities" and "hangup" in e.detail), None)
    end = await d.wait_event("call.end", 5.0, call_id=cid)
    secs = None if t_acc is None or t_hang is None else (t_hang - t_acc) / 1000
    attack_figures("M", None, log0, d, out, seconds_to_hangup=secs)
    assert res.end_reason == "bot-hangup", (res.end_reason, res.violations)
    [act] = [a for a in res.received_activities if a.get("name") == "hangup"]
    assert act["activityParams"]["hangupReason"] == "model-unreachable", act
    assert secs is not None and secs < 2 + 2.5, secs
    assert session.sent == [] and not session.sent_of("session.created")
    assert closed, "OpenAI socket of the silent session not closed"
    assert session.closed_at is not None
    assert end is not None and end["reason"] == "openai_no_session", end
    assert_log_clean(d)


# ------------------------------------------------------------------------------------ N (bound)


async def test_N_upstream_not_reading_send_buffer_bound(daemon, fake):
    """See `attack_N_bound` (also run on the other transports)."""
    await attack_N_bound(daemon, fake)


async def attack_N_bound(daemon, fake, tag: str = ""):
    """N: OpenAI stops reading while the caller floods: the up send never blocks the call, the
    OpenAI socket is aborted once its unsent data passes server.send_buffer_bytes (1 MiB) or stays
    paused send_timeout_s (3 s here); the call then goes on with a new OpenAI session
    (openai.reconnect, the default) or, without reconnecting, the caller is hung up; RSS bounded."""
    d = daemon
    log0 = d.log_bytes()
    att, session = await stuck_upstream_call(d, fake)
    clean = spawn(clean_call(d, fake))
    with RssSampler(d) as rss:
        t0 = time.monotonic()
        await flood(att)                              # ~12 MB: far beyond the kernel buffers
        recovered = await d.wait_event("call.openai_reconnected", 15.0, call_id=att.cid)
        hang = recovered or await att.read_until(lambda m: m.get("type") == "activities" and any(
            a.get("name") == "hangup" for a in m.get("activities", [])), 5.0)
        secs_hangup = time.monotonic() - t0
        gone = await wait_gone(lambda: not d.tcp_sockets(local_port=session.peer[1]), 5.0)
    att.abort()
    out = await clean
    end = await d.wait_event("call.end", 5.0, call_id=att.cid)
    attack_figures("N-bound" + tag, rss, log0, d, out, seconds_to_hangup=round(secs_hangup, 2),
                   upstream_closed_after_s=gone, end_reason=end and end["reason"], end_detail=end and end["detail"])
    assert hang is not None, f"neither a new session nor a hang-up while OpenAI does not read: {att.msgs[-3:]}"
    assert secs_hangup < 12, secs_hangup
    assert gone is not None, "the bridge still holds the OpenAI socket"
    assert rss.growth_kib < RSS_BOUND_KIB, rss.growth_kib
    assert end is not None and end["reason"] != "internal_error", end
    assert_log_clean(d)


async def test_module_daemon_log_all_json_and_no_secret(daemon):
    """Over every attack above: every line on stdout/stderr was one JSON object, no traceback, no
    secret, and the daemon is still up."""
    d = daemon
    assert d.alive()
    assert (await d.health())["status"] == "ok"
    assert_log_clean(d)
    text_ = d.log_text()
    for secret in (TOKEN, ADMIN_TOKEN, d.env["OPENAI_API_KEY"]):
        assert secret not in text_
    figures("log-summary", log_bytes_total=d.log_bytes(), lines=len(d.events()),
            peak_rss_kib=d.peak_rss_kib(), fds=d.fd_count())


# ------------------------------------------------------------------------------------ E + F

LIMITS_ENV = {
    "VOICEBRIDGE_SERVER_MAX_CALLS": "20",
    "VOICEBRIDGE_SERVER_MAX_PENDING_HANDSHAKES": "64",
    "VOICEBRIDGE_SERVER_HANDSHAKE_TIMEOUT_S": "2",
    "VOICEBRIDGE_CALL_IDLE_TIMEOUT_S": "2.5",
    "VOICEBRIDGE_CALL_INITIATE_TIMEOUT_S": "2",
    "VOICEBRIDGE_LOG_RATE_LIMIT_PER_S": str(RATE_PER_S),
}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def limited(fake, tmp_path_factory):
    """A daemon with small per-daemon limits, under the common 1 024-descriptor limit."""
    d = await start_daemon(fake, tmp_path_factory.mktemp("vb-limits"), name="limits",
                           nofile=(1024, 1024), **LIMITS_ENV)
    try:
        yield d
    finally:
        await d.stop()
        d.kill()


async def test_E_max_calls_503_idle_and_initiate_timeouts(limited, fake):
    """E: connections that send session.initiate then nothing: at most server.max_calls (20) are
    upgraded (each one OpenAI session), the rest get HTTP 503 (Retry-After: 1) with no OpenAI
    dial; idle ones are hung up after call.idle_timeout_s (idle-timeout); connections that never
    send session.initiate are closed after call.initiate_timeout_s (no_initiate)."""
    d = limited
    log0 = d.log_bytes()
    cid = "clean-e-" + uuid.uuid4().hex[:8]
    clean = spawn(clean_call(d, fake, conversation_id=cid))
    assert await wait_until(lambda: d.events("call.start", call_id=cid), 5), "clean call did not start"
    sessions0 = len(fake.sessions)
    idle: list[RawCall] = []
    for _ in range(19):
        c = await RawCall.open(d)
        assert c.ws.status == 101, c.ws.head
        c.initiate()
        idle.append(c)
    for c in idle:
        await c.accepted()
    t_full = time.monotonic()

    async def extra() -> tuple[int | None, bytes]:
        ws = await RawWs.open("127.0.0.1", d.port, d.path, TOKEN, timeout_s=5)
        head = ws.head
        ws.abort()
        return ws.status, head

    refused: list[tuple[int | None, bytes]] = []
    for _ in range(5):      # in batches under max_pending_handshakes (64): those are refused at TCP level
        refused += await asyncio.wait_for(asyncio.gather(*(extra() for _ in range(20))), 20)
    dialed = len(fake.sessions) - sessions0
    out = await clean
    # idle calls: hangup activity with idle-timeout, then closed
    hangups = await asyncio.gather(*(c.read_until(lambda m: m.get("type") == "activities" and any(
        a.get("name") == "hangup" for a in m.get("activities", [])), 8.0) for c in idle))
    idle_s = time.monotonic() - t_full
    for c in idle:
        c.abort()
    # the idle calls must have left the daemon's count before the next ones, or those get a 503
    ends = [await d.wait_event("call.end", 5.0, call_id=c.cid) for c in idle]
    # never-initiated connections
    mute = [await RawCall.open(d) for _ in range(3)]
    assert all(c.ws.status == 101 for c in mute), [c.ws.head for c in mute]
    t0 = time.monotonic()
    mute_closed = await asyncio.gather(*(c.closed(6.0) for c in mute))
    mute_s = time.monotonic() - t0
    for c in mute:
        c.abort()
    await asyncio.sleep(0.3)
    after = await clean_call(d, fake)
    attack_figures("E", None, log0, d, after, refused_503=sum(1 for st, _ in refused if st == 503),
                   openai_sessions_for_20_slots=dialed, seconds_idle_hangup=round(idle_s, 2),
                   seconds_no_initiate_close=round(mute_s, 2), concurrent_clean=out.figures()["clean_call"])
    assert all(st == 503 for st, _ in refused), [st for st, _ in refused]
    assert all(b"retry-after: 1" in h.lower() and b"application/json" in h.lower() for _, h in refused)
    assert dialed == 19, f"{dialed} OpenAI sessions for 19 idle calls (+0 for 100 refused)"
    assert d.events("conn.refused")
    assert all(e.get("reason") in ("max_calls", "max_pending_handshakes") for e in d.events("conn.refused"))
    assert all(h is not None for h in hangups), "an idle call was not hung up"
    for h in hangups:
        [act] = [a for a in h["activities"] if a.get("name") == "hangup"]
        assert "idle" in act["activityParams"]["hangupReason"], act
    assert idle_s < 2.5 + 4, idle_s
    assert all(e is not None and e["reason"] == "idle_timeout" for e in ends), ends
    assert all(mute_closed) and mute_s < 2 + 3, (mute_closed, mute_s)
    # the socket closes before its call.end line is written: wait for the lines (bounded)
    assert await wait_until(lambda: len(d.events("call.end", reason="no_initiate")) >= 3, 3.0)
    assert await wait_until(lambda: all(s.closed_at is not None for s in fake.sessions[sessions0:]), 5)
    assert_log_clean(d)


async def test_F_slowloris_under_1024_fds(limited, fake):
    """F: 1 100 slow half-handshakes under a 1 024-descriptor limit: at most
    max_pending_handshakes (64) are held (past it one is dropped, conn.refused logged, rate
    limited), each held one is dropped after handshake_timeout_s; the daemon never runs short of
    descriptors; a call in progress goes on, and /health and a new call work during the attack."""
    d = limited
    log0 = d.log_bytes()
    nofile = d.events("server.nofile")
    assert nofile and nofile[0]["soft"] == nofile[0]["hard"] == 1024, nofile
    cid = "clean-f-" + uuid.uuid4().hex[:8]
    clean = spawn(clean_call(d, fake, conversation_id=cid))
    assert await wait_until(lambda: d.events("call.start", call_id=cid), 5), "clean call did not start"
    conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
    partial = f"GET {d.path} HTTP/1.1\r\nHost: 127.0.0.1\r\n".encode()

    async def slow() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        try:
            r, w = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", d.port), 5)
        except (OSError, asyncio.TimeoutError, TimeoutError):
            return None
        w.write(partial)
        return r, w

    max_fds = 0
    with RssSampler(d) as rss:
        t0 = time.monotonic()
        for _ in range(0, 1100, 100):
            got = await asyncio.gather(*(slow() for _ in range(100)))
            conns += [c for c in got if c is not None]
            max_fds = max(max_fds, d.fd_count())

        async def closed(r: asyncio.StreamReader) -> float | None:
            try:
                data = await asyncio.wait_for(r.read(100), 8)
            except (asyncio.TimeoutError, TimeoutError):
                return None
            except ConnectionError:
                pass
            else:
                if data:
                    return None     # an HTTP answer to half a request? (not expected)
            return time.monotonic() - t0

        async def sample_fds() -> None:
            nonlocal max_fds
            while time.monotonic() - t0 < 5:
                max_fds = max(max_fds, d.fd_count())
                await asyncio.sleep(0.05)

        async def during() -> tuple[int, Any]:
            # a real VAIC sends its request at once: it is not kept out by the slow ones
            st, _, _ = await d.http_get("/health")
            return st, await clean_call(d, fake)

        times, _, (status, after) = await asyncio.gather(
            asyncio.gather(*(closed(r) for r, _ in conns)), sample_fds(), during())
    for _, w in conns:
        w.transport.abort()
    out = await clean
    refused = d.events("conn.refused", reason="max_pending_handshakes")
    done = [t for t in times if t is not None]
    attack_figures("F", rss, log0, d, after, connections=len(conns), max_fds=max_fds,
                   closed=len(done), seconds_all_closed=round(max(done), 2) if done else None,
                   refused_lines=len(refused), concurrent_clean=out.figures()["clean_call"])
    assert len(done) == len(conns), f"{len(conns) - len(done)} slow connections still open after 8 s"
    assert max(done) < 2 + 4
    assert max_fds < 1024 - 16, max_fds
    assert refused, "no conn.refused (max_pending_handshakes) logged"
    assert len(refused) <= RATE_PER_S * 10 + 2
    assert status == 200
    assert d.alive()
    assert_log_clean(d)


# ------------------------------------------------------------------------------------ N + O


async def stuck_upstream_call(d: Daemon, fake) -> tuple[RawCall, Any]:
    """A raw call whose OpenAI session stops reading 0.3 s after connecting (once the bridge's
    session.update, by which the test finds it, has been read). The knob is off again on return."""
    att = await RawCall.open(d)
    fake.config.stop_reading_after_s = 0.3
    try:
        att.initiate()
        await att.accepted()
        session = await att.upstream(fake)
    finally:
        fake.config.stop_reading_after_s = None
    assert await wait_until(lambda: session.reading_stopped_at is not None, 3)
    att.send_json({"type": "userStream.start"})
    return att, session


async def flood(att: RawCall, mb: int = 12) -> None:
    """~`mb` MB of caller audio (500 ms frames) as fast as the bridge reads it."""
    frame500 = att.chunk(silence_b64(500))
    for i in range(mb * 32):
        att.ws.send(frame500)
        if i % 20 == 19:
            await att.ws.drain(10)
    await att.ws.drain(10)


async def test_N_hangup_noticed_while_upstream_not_reading_and_O_sigterm_deadline(fake, tmp_path):
    """N: OpenAI stops reading, the bridge's sends to it back up (big send buffer here, so it is
    not aborted): the caller's session.end is still noticed at once, the OpenAI socket is closed
    within ~1 s. O: SIGTERM with a stuck upstream (and a silent one) exits within
    server.shutdown_timeout_s (3 s) + margin, exit status 0 (no drain: drain_timeout_s = 0)."""
    d = await start_daemon(fake, tmp_path, name="slowup", **{
        "VOICEBRIDGE_SERVER_DRAIN_TIMEOUT_S": "0",
        "VOICEBRIDGE_SERVER_SEND_BUFFER_BYTES": str(256 * MB),
        "VOICEBRIDGE_SERVER_SEND_TIMEOUT_S": "60",
        "VOICEBRIDGE_SERVER_SHUTDOWN_TIMEOUT_S": "3",
        "VOICEBRIDGE_OPENAI_SESSION_TIMEOUT_S": "30"})
    try:
        log0 = d.log_bytes()
        att, session = await stuck_upstream_call(d, fake)
        clean = spawn(clean_call(d, fake))
        with RssSampler(d) as rss:
            await flood(att)
            assert d.tcp_sockets(local_port=session.peer[1]), "upstream socket already gone"
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            att.send_json({"type": "session.end", "reasonCode": "client-disconnected"})
            reader = spawn(att.closed(6.0))   # a compliant VAIC: answers the close
            gone = await wait_gone(lambda: not d.tcp_sockets(local_port=session.peer[1]), 5.0)
            gone_s = None if gone is None else time.monotonic() - t0
            end = await d.wait_event("call.end", 5.0, call_id=att.cid)
            t_end = time.monotonic() - t0
            await reader
        att.abort()
        out = await clean
        attack_figures("N-hangup", rss, log0, d, out, seconds_to_call_end=round(t_end, 2),
                       seconds_upstream_closed=gone_s)
        assert end is not None and end["reason"] == "vaic_session_end", end
        assert t_end < 2, t_end
        assert gone_s is not None and gone_s < 2.5, gone_s

        # O: stuck upstream + silent upstream, SIGTERM
        stuck, _ = await stuck_upstream_call(d, fake)
        await flood(stuck)
        caller = new_caller()
        quiet = await with_knob(fake, "silent", True, lambda: spawn(run_call(CallerConfig(
            url=d.url, token=TOKEN, caller=caller, script=[Silence(20000)]))), caller)
        clean2 = await clean_call(d, fake)        # concurrent with both stuck calls
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        rc = await d.wait_exit(3 + 5)
        secs = time.monotonic() - t0
        res = await asyncio.wait_for(quiet, 10)
        stuck.abort()
        attack_figures("O-sigterm", None, log0, d, clean2, seconds_to_exit=round(secs, 2), exit_code=rc)
        assert rc == 0, f"exit {rc} after {secs:.1f} s"
        assert secs < 3 + 2.5, secs
        assert res.end_reason in ("socket-closed", "bot-hangup"), res.end_reason
        assert d.events("server.stopped"), "no server.stopped line"
        forced = d.events("server.shutdown_forced")
        assert all(e.get("why") == "shutdown_timeout_s" for e in forced), forced
        assert_log_clean(d)
    finally:
        await d.stop()
        d.kill()


async def test_O_second_sigterm_exits_at_once_and_Q_1001(fake, tmp_path):
    """O: a second SIGTERM during a slow shutdown ends the process at once
    (server.shutdown_forced). Q: a call running at shutdown (no drain here) is hung up by the
    bridge and logged call.end reason server_shutdown (not vaic_closed)."""
    d = await start_daemon(fake, tmp_path, name="sigterm2", **{
        "VOICEBRIDGE_SERVER_DRAIN_TIMEOUT_S": "0",
        "VOICEBRIDGE_SERVER_SHUTDOWN_TIMEOUT_S": "30",
        "VOICEBRIDGE_SERVER_SEND_BUFFER_BYTES": str(256 * MB),
        "VOICEBRIDGE_SERVER_SEND_TIMEOUT_S": "60"})
    try:
        log0 = d.log_bytes()
        # a VAIC peer that never reads (so never answers the close), and a stuck upstream
        deaf = await RawCall.open(d, rcvbuf=4096)
        deaf.initiate()
        await deaf.accepted()
        deaf.ws.writer.transport.pause_reading()
        stuck, _ = await stuck_upstream_call(d, fake)
        await flood(stuck)
        cid = "shutdown-" + uuid.uuid4().hex[:8]
        running = spawn(run_call(CallerConfig(
            url=d.url, token=TOKEN, conversation_id=cid, script=[Silence(20000)])))
        assert await wait_until(lambda: d.events("call.start", call_id=cid), 5)
        await asyncio.sleep(0.3)
        d.signal(signal.SIGTERM)
        res = await asyncio.wait_for(running, 5)
        await asyncio.sleep(0.2)
        still = d.alive()
        t0 = time.monotonic()
        d.signal(signal.SIGTERM)
        rc = await d.wait_exit(5)
        secs = time.monotonic() - t0
        end = d.events("call.end", call_id=cid)
        attack_figures("O-second-sigterm", None, log0, d, None, seconds_after_second=round(secs, 2),
                       exit_code=rc, alive_before_second=still, close_code_q=res.close_code)
        deaf.abort()
        stuck.abort()
        assert res.end_reason == "bot-hangup", (res.close_code, res.end_reason)
        hang = [a for a in res.received_activities if a.get("name") == "hangup"]
        assert hang and hang[0]["activityParams"]["hangupReason"] == "server-shutdown", hang
        assert end and end[0]["reason"] == "server_shutdown", end
        assert still, "the graceful shutdown ended before the second SIGTERM: nothing to force"
        assert rc is not None and secs < 1.5, (rc, secs)
        forced = d.events("server.shutdown_forced")
        assert forced and forced[0].get("why") == "second signal", forced
        assert_log_clean(d)
    finally:
        await d.stop()
        d.kill()


# ------------------------------------------------------------------------------------ P + Q


async def test_P_sighup_reloads_and_Q_close_codes(fake, tmp_path):
    """P: SIGHUP during a call reloads the configuration (server.reloaded): the call completes
    losslessly, the daemon keeps serving. Q: keepalive timeout -> vaic_keepalive_timeout (1011);
    VAIC's own close code and a dropped TCP connection (1006) are logged as they were."""
    d = await start_daemon(fake, tmp_path, name="sighup", **{"VOICEBRIDGE_SERVER_PING_INTERVAL_S": "1"})
    try:
        log0 = d.log_bytes()
        clean = spawn(clean_call(d, fake))
        await asyncio.sleep(0.5)
        d.signal(signal.SIGHUP)
        await asyncio.sleep(0.2)
        d.signal(signal.SIGHUP)
        out = await clean
        assert d.alive()
        reloaded = await d.wait_event("server.reloaded", 2.0)
        assert reloaded and reloaded["changed"] == [] and reloaded["restart_needed"] == [], reloaded
        after_task = spawn(clean_call(d, fake))   # runs beside the Q checks below
        # without VOICEBRIDGE_ADMIN_TOKEN the public /metrics does not exist
        assert (await d.http_get("/metrics"))[0] == 404

        # Q: keepalive: a peer that answers no ping is dropped after ~2 ping intervals, 1011
        ka = await RawCall.open(d)
        ka.initiate()
        t0 = time.monotonic()
        await ka.read_until(None, 6.0, answer_pings=False)
        ka_s = time.monotonic() - t0
        ka.abort()
        ka_end = await d.wait_event("call.end", 3.0, call_id=ka.cid)
        # Q: VAIC closes with its own code; VAIC drops the TCP connection
        own = await RawCall.open(d)
        own.initiate()
        await own.accepted()
        own.ws.send(frame(OP_CLOSE, (3001).to_bytes(2, "big") + b"bye"))
        await own.closed(3.0)
        own.abort()
        own_end = await d.wait_event("call.end", 3.0, call_id=own.cid)
        drop = await RawCall.open(d)
        drop.initiate()
        await drop.accepted()
        drop.abort()
        drop_end = await d.wait_event("call.end", 3.0, call_id=drop.cid)
        after = await after_task
        attack_figures("P", None, log0, d, out, after_clean=after.figures()["clean_call"])
        figures("Q", keepalive_close_s=round(ka_s, 2), keepalive_code=ka.close_code,
                keepalive_end=ka_end and ka_end["reason"], own_end=own_end and own_end["detail"],
                drop_end=drop_end and drop_end["detail"])
        assert ka_s < 1 * 2 + 2.5, ka_s
        assert ka_end is not None and ka_end["reason"] == "vaic_keepalive_timeout", ka_end
        assert ka_end["detail"] == "code=1011", ka_end
        assert own_end is not None and own_end["reason"] == "vaic_closed" and own_end["detail"] == "code=3001", own_end
        assert drop_end is not None and drop_end["reason"] == "vaic_closed" and drop_end["detail"] == "code=1006", drop_end
        assert d.alive()
        assert_log_clean(d)
        rc = await d.stop()
        assert rc == 0
        assert d.events("server.stopped")
    finally:
        d.kill()


# ------------------------------------------------------------------------------------ transport


@pytest.mark.parametrize("name", [t for t in sorted(TRANSPORTS) if t != ServerConfig().transport])
async def test_other_transports_A_B_N_and_1009(fake, tmp_path, name):
    """The per-connection bounds hold on every other server.transport too (the module daemon
    runs the default; issue: A was seen on two transports): ping flood never read (A),
    empty-fragment flood (B), a frame over max_message_bytes (1009), OpenAI not reading while
    the caller floods (N)."""
    d = await start_daemon(fake, tmp_path, name=name, **{
        **MODULE_ENV, "VOICEBRIDGE_SERVER_TRANSPORT": f'"{name}"'})
    try:
        await attack_A(d, fake, f"-{name}")
        await attack_B(d, fake, f"-{name}")
        q = await RawCall.open(d)
        q.initiate()
        await q.accepted()
        q.ws.send(q.chunk("A" * (2 * MB)))
        assert await q.closed(5.0) and q.close_code == 1009, q.close_code
        q.abort()
        q_end = await d.wait_event("call.end", 5.0, call_id=q.cid)
        assert q_end is not None and q_end["reason"] == "vaic_frame_too_big", q_end
        await attack_N_bound(d, fake, f"-{name}")
        assert_log_clean(d)
    finally:
        await d.stop()
        d.kill()
