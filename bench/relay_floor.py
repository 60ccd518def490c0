"""The transport floor: what it costs one core to relay calls' audio with no bridge logic at all.

`make bench` runs this first and sets voicebridge's CPU per frame against it ("x1.8 of a bare
relay"). A *relay* process accepts N caller websockets and opens one upstream websocket per
caller. Each caller frame (`userStream.chunk`, 20 ms of 24 kHz PCM16 as base64) is decoded with
msgspec and encoded again as `input_audio_buffer.append`; each upstream frame
(`response.output_audio.delta`) is decoded and encoded again as `playStream.chunk`. That is
voicebridge's traffic shape, four websocket operations per round trip, without its call logic.

A *generator* process plays both ends: N callers, each sending one frame every 20 ms (the calls
spread over the period in 1 ms slices, like independent calls), and an echo upstream that
answers every append with one delta carrying the same audio. The first 15 bytes of each frame's
audio hold (call, sequence number, send time), so the caller reads the round-trip time, loss,
reordering and misrouting from what comes back. The relay runs on the first CPU this process may
use and the generator on the second (when there are two; `--no-pin` leaves both unpinned).

Relay variants (`--variants`):
  direct      no relay: the callers talk to the echo upstream (the generator's own share)
  websockets  websockets' asyncio server and client (one reader task per direction)
  sansio      websockets' Sans-I/O protocol objects driven from asyncio Protocols, no tasks
  picows      picows (Cython frame codec, callbacks); skipped with a note when not installed

The generator uses picows when it is installed (as bench/generator.py does), else the Sans-I/O
code (`--generator` forces either; the rows say which one ran).

Output, one JSON line per (variant, calls):
  {"variant", "calls", "sent", "frames" (round trips measured in the window), "lost",
   "reordered", "misrouted", "wall_s", "relay_cpu_pct" (null for direct), "gen_cpu_pct",
   "p50_us", "p99_us", "p999_us", "max_us" (round trip), "tick_late_p99_us" (how late the
   generator's 1 ms send steps ran), "generator"}
  or {"variant", "calls", "error"}, or {"variant", "skipped"} (picows missing).
bench/__main__.py derives CPU per frame and calls per core from it.

usage: python bench/relay_floor.py [--variants websockets,sansio,picows] [--calls 100,300]
                                   [--seconds 5] [--warmup-s 0.5] [--grace-s 0.5] [--no-pin]
Everything listens on 127.0.0.1 only; every wait and every subprocess is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import binascii
import functools
import json
import math
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections import deque
from typing import Any, Awaitable, Callable

import msgspec
from websockets.client import ClientProtocol
from websockets.frames import Opcode
from websockets.http11 import Request, Response
from websockets.server import ServerProtocol
from websockets.uri import parse_uri

VARIANTS = ("direct", "websockets", "sansio", "picows")
PERIOD_MS = 20              # one frame each way per call every 20 ms
SLICES = PERIOD_MS          # calls are spread over the period in 1 ms steps
PCM_BYTES = 960             # 20 ms of 24 kHz 16-bit mono
STAMP = struct.Struct("<HIQx")            # call, seq, send time (ns); 15 bytes = 20 base64 chars
STAMP_CHARS = 20
MAX_PENDING = 64            # frames a relay holds for a caller while its upstream is connecting
MAX_CALLS = 5000
MAX_SECONDS = 600.0
CONNECT_TIMEOUT_S = 10.0
GRACE_S = 0.5               # default wait after the last send for round trips still under way
READY_TIMEOUT_S = 20.0
PICOWS_MISSING = "picows is not installed (pip install -e '.[bench]'): its relay variant is skipped"


def picows_available() -> bool:
    try:
        import picows  # noqa: F401
    except ImportError:
        return False
    return True


# --------------------------------------------------------------------------- messages
class FromCaller(msgspec.Struct):
    """What the relay reads of a caller frame (and the echo, of a caller talking to it directly)."""
    type: str
    audioChunk: str = ""
    audio: str = ""


class FromUpstream(msgspec.Struct):
    type: str
    delta: str = ""


class Append(msgspec.Struct, tag_field="type", tag="input_audio_buffer.append"):
    audio: str


class Delta(msgspec.Struct, tag_field="type", tag="response.output_audio.delta"):
    delta: str
    response_id: str = "resp_floor"
    item_id: str = "item_floor"
    output_index: int = 0
    content_index: int = 0


class PlayChunk(msgspec.Struct, tag_field="type", tag="playStream.chunk"):
    audioChunk: str
    streamId: str = "1"


_caller_dec = msgspec.json.Decoder(FromCaller)
_upstream_dec = msgspec.json.Decoder(FromUpstream)
_enc = msgspec.json.Encoder()


def to_upstream(data: bytes) -> bytes:
    """Relay, caller -> upstream: decode, re-encode."""
    return _enc.encode(Append(_caller_dec.decode(data).audioChunk))


def to_caller(data: bytes) -> bytes:
    """Relay, upstream -> caller: decode, re-encode."""
    return _enc.encode(PlayChunk(_upstream_dec.decode(data).delta))


def echo(data: bytes) -> bytes:
    """The generator's upstream: one delta with the audio of the append (or caller chunk)."""
    m = _caller_dec.decode(data)
    return _enc.encode(Delta(m.audio or m.audioChunk))


# --------------------------------------------------------------------------- stamped frames
# a caller frame = prefix + base64(stamp) + base64(rest of the PCM) + suffix: as the stamp is a
# multiple of 3 bytes long, the two base64 parts join into the base64 of the whole 960 bytes
_PCM_TAIL_B64 = binascii.b2a_base64(bytes(range(256)) * 4, newline=False)[: (PCM_BYTES - STAMP.size) // 3 * 4]
_CALLER_PREFIX = b'{"type":"userStream.chunk","conversationId":"floor","audioChunk":"'
_CALLER_SUFFIX = _PCM_TAIL_B64 + b'"}'
_AUDIO_KEYS = (b'"audioChunk":"', b'"delta":"')     # relayed playStream.chunk, or the echo's delta


def caller_frame(idx: int, seq: int, t_ns: int) -> bytes:
    """Call `idx`'s frame number `seq`, sent at `t_ns` (perf_counter_ns)."""
    return _CALLER_PREFIX + binascii.b2a_base64(STAMP.pack(idx, seq, t_ns), newline=False) + _CALLER_SUFFIX


def read_stamp(data: bytes) -> tuple[int, int, int] | None:
    """(call, seq, send time) from the audio of a frame that came back, None if unreadable."""
    for key in _AUDIO_KEYS:
        i = data.find(key)
        if i >= 0:
            i += len(key)
            try:
                idx, seq, t_ns = STAMP.unpack(binascii.a2b_base64(data[i:i + STAMP_CHARS]))
            except (binascii.Error, struct.error):
                return None
            return idx, seq, t_ns
    return None


# --------------------------------------------------------------------------- websocket peers
class Peer:
    """One open websocket, whatever library carries it: `send(text)`, `close()`; the owner sets
    `on_text(bytes)` and `on_close()`."""

    def __init__(self) -> None:
        self.on_text: Callable[[bytes], None] = _ignore
        self.on_close: Callable[[], None] = _nothing

    def send(self, payload: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError


def _ignore(data: bytes) -> None:
    return None


def _nothing() -> None:
    return None


Listen = Callable[[int, Callable[[Peer], None]], Awaitable[Any]]   # (port, on_peer) -> server
Dial = Callable[[str], Awaitable[Peer]]


class SansIOPeer(Peer, asyncio.Protocol):
    """A websocket on an asyncio Protocol, framed by websockets' Sans-I/O `ServerProtocol` or
    `ClientProtocol`: bytes in, events out, bytes to write, with no task and no stream."""

    def __init__(self, ws: Any, on_open: Callable[[Peer], None] | None = None) -> None:
        Peer.__init__(self)
        self.ws = ws
        self.on_open = on_open
        self.opened: asyncio.Future[Peer] = asyncio.get_running_loop().create_future()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport subclass
        if hasattr(self.ws, "connect"):                  # the client side starts the handshake
            self.ws.send_request(self.ws.connect())
            self._flush()

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        for ev in ws.events_received():
            if isinstance(ev, Request):
                ws.send_response(ws.accept(ev))
                self._open()
            elif isinstance(ev, Response):
                self._open()
            elif ev.opcode is Opcode.TEXT:
                self.on_text(ev.data)
        self._flush()

    def _open(self) -> None:
        if not self.opened.done():
            self.opened.set_result(self)
        if self.on_open is not None:
            self.on_open(self)

    def _flush(self) -> None:
        tr = self.transport
        if tr is None:
            return
        for data in self.ws.data_to_send():
            if data:
                tr.write(data)
            else:                                         # the protocol is done with the socket
                tr.close()

    def eof_received(self) -> bool:
        self.ws.receive_eof()
        self._flush()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if not self.opened.done():
            self.opened.set_exception(ConnectionError("closed during the handshake"))
        self.on_close()

    def send(self, payload: bytes) -> None:
        if self.transport is not None:
            self.ws.send_text(payload)
            self._flush()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def sansio_listen(port: int, on_peer: Callable[[Peer], None]) -> asyncio.Server:
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: SansIOPeer(ServerProtocol(max_size=2**20), on_peer),
                                    "127.0.0.1", port, backlog=1024)


async def sansio_dial(url: str) -> Peer:
    uri = parse_uri(url)
    loop = asyncio.get_running_loop()
    _, peer = await loop.create_connection(lambda: SansIOPeer(ClientProtocol(uri, max_size=2**20)),
                                           uri.host, uri.port)
    return await asyncio.wait_for(peer.opened, CONNECT_TIMEOUT_S)


def picows_backend() -> tuple[Listen, Dial]:
    from picows import WSListener, WSMsgType, ws_connect, ws_create_server

    class PicowsPeer(Peer, WSListener):
        def __init__(self, on_open: Callable[[Peer], None] | None = None) -> None:
            Peer.__init__(self)
            self.on_open = on_open
            self.tr: Any = None

        def on_ws_connected(self, tr: Any) -> None:
            self.tr = tr
            if self.on_open is not None:
                self.on_open(self)

        def on_ws_frame(self, tr: Any, frame: Any) -> None:
            mt = frame.msg_type
            if mt is WSMsgType.TEXT:
                self.on_text(frame.get_payload_as_bytes())
            elif mt is WSMsgType.CLOSE:
                tr.send_close(frame.get_close_code())
                tr.disconnect()

        def on_ws_disconnected(self, tr: Any) -> None:
            self.tr = None
            self.on_close()

        def send(self, payload: bytes) -> None:
            if self.tr is not None:
                self.tr.send(WSMsgType.TEXT, payload)

        def close(self) -> None:
            if self.tr is not None:
                self.tr.disconnect()

    async def listen(port: int, on_peer: Callable[[Peer], None]) -> Any:
        return await ws_create_server(lambda request: PicowsPeer(on_peer), "127.0.0.1", port,
                                      backlog=1024)

    async def dial(url: str) -> Peer:
        _, peer = await ws_connect(PicowsPeer, url, websocket_handshake_timeout=CONNECT_TIMEOUT_S)
        if not isinstance(peer, PicowsPeer):      # None: the peer closed as the handshake completed
            raise ConnectionError(f"{url}: closed during the handshake")
        return peer

    return listen, dial


def backend(name: str) -> tuple[Listen, Dial]:
    return picows_backend() if name == "picows" else (sansio_listen, sansio_dial)


# --------------------------------------------------------------------------- relay process
async def relay_callbacks(lib: str, up_port: int) -> int:
    """A relay on `lib` ("sansio" or "picows") callbacks; returns its port once listening."""
    listen, dial = backend(lib)
    url = f"ws://127.0.0.1:{up_port}/"
    loop = asyncio.get_running_loop()

    def on_caller(down: Peer) -> None:
        pending: deque[bytes] = deque(maxlen=MAX_PENDING)
        state: dict[str, Peer | None] = {"up": None}

        def from_caller(data: bytes) -> None:
            up = state["up"]
            if up is None:
                pending.append(to_upstream(data))
            else:
                up.send(to_upstream(data))

        async def connect() -> None:
            try:
                up = await dial(url)
            except (OSError, asyncio.TimeoutError, ConnectionError):
                down.close()
                return
            up.on_text = lambda data: down.send(to_caller(data))
            up.on_close = down.close
            down.on_close = up.close
            state["up"] = up
            while pending:
                up.send(pending.popleft())

        down.on_text = from_caller
        loop.create_task(connect())       # one per call, not per frame

    server = await listen(0, on_caller)
    return int(server.sockets[0].getsockname()[1])


async def relay_websockets(up_port: int) -> int:
    """A relay on websockets' asyncio API: a reader task per direction, `await send()` per frame."""
    from websockets.asyncio.client import connect
    from websockets.asyncio.server import serve
    from websockets.exceptions import ConnectionClosed

    url = f"ws://127.0.0.1:{up_port}/"

    async def handler(down: Any) -> None:
        async with connect(url, compression=None, max_size=2**20, open_timeout=CONNECT_TIMEOUT_S) as up:
            async def downstream() -> None:
                try:
                    async for data in up:
                        await down.send(to_caller(_as_bytes(data)), text=True)
                except ConnectionClosed:
                    pass
            task = asyncio.create_task(downstream())
            try:
                async for data in down:
                    await up.send(to_upstream(_as_bytes(data)), text=True)
            except ConnectionClosed:
                pass
            finally:
                task.cancel()

    server = await serve(handler, "127.0.0.1", 0, compression=None, max_size=2**20, backlog=1024)
    return int(next(iter(server.sockets)).getsockname()[1])


def _as_bytes(data: str | bytes) -> bytes:
    return data.encode() if isinstance(data, str) else data


async def run_relay(variant: str, up_port: int) -> None:
    port = await (relay_websockets(up_port) if variant == "websockets" else relay_callbacks(variant, up_port))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    print(f"LISTENING {port}", flush=True)
    await stop.wait()


# --------------------------------------------------------------------------- generator process
class Caller:
    """One simulated call's sending and round-trip bookkeeping."""

    __slots__ = ("idx", "peer", "seq", "max_seq", "sent_w", "recv_w", "reordered", "misrouted")

    def __init__(self, idx: int) -> None:
        self.idx = idx
        self.peer: Peer | None = None
        self.seq = 0
        self.max_seq = -1
        self.sent_w = 0          # frames sent inside the measurement window
        self.recv_w = 0          # ... and received back
        self.reordered = 0
        self.misrouted = 0


def proc_cpu_s(pid: int) -> float:
    """utime + stime of `pid` in seconds, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def quantile_us(sorted_ns: list[int], p: float) -> float | None:
    """Nearest-rank percentile `p` (0..1) in µs, None when empty."""
    if not sorted_ns:
        return None
    k = max(1, math.ceil(p * len(sorted_ns)))
    return round(sorted_ns[k - 1] / 1000, 1)


async def generate(calls: int, seconds: float, warmup_s: float, target_port: int, up_port: int,
                   relay_pid: int, lib: str, grace_s: float = GRACE_S) -> dict[str, Any]:
    """One row: `calls` callers through the relay at `target_port` (the echo listens on
    `up_port`), `warmup_s` of sending, then `seconds` measured. After the last send it waits up
    to `grace_s` for the frames still under way; what has not come back by then is lost."""
    listen, dial = backend(lib)

    def on_upstream(peer: Peer) -> None:
        peer.on_text = lambda data: peer.send(echo(data))

    server = await listen(up_port, on_upstream)
    rtts: list[int] = []
    window = [1 << 62, 0]                 # [start ns, end ns]: frames stamped inside are measured
    perf_ns = time.perf_counter_ns

    def on_reply(c: Caller, data: bytes) -> None:
        now = perf_ns()
        stamp = read_stamp(data)
        if stamp is None or stamp[0] != c.idx:
            c.misrouted += 1
            return
        _, seq, t_ns = stamp
        if seq < c.max_seq:
            c.reordered += 1
        else:
            c.max_seq = seq
        if window[0] <= t_ns and (window[1] == 0 or t_ns < window[1]):
            c.recv_w += 1
            rtts.append(now - t_ns)

    callers = [Caller(i) for i in range(calls)]
    url = f"ws://127.0.0.1:{target_port}/"
    try:
        for c in callers:
            peer = await asyncio.wait_for(dial(url), CONNECT_TIMEOUT_S)
            peer.on_text = functools.partial(on_reply, c)
            c.peer = peer
        await asyncio.sleep(0.2)          # the relay's upstream sockets open meanwhile
        groups = [callers[k::SLICES] for k in range(SLICES)]
        loop = asyncio.get_running_loop()
        warm_steps = int(warmup_s * 1000)
        steps = warm_steps + int(seconds * 1000)
        late_us: list[float] = []
        clock = time.perf_counter           # loop.time() of uvloop counts whole milliseconds
        t0 = clock()
        cpu0 = gen0 = wall0 = 0.0
        for step in range(steps):
            due = t0 + step / 1000
            if step == warm_steps:
                window[0] = perf_ns()
                wall0 = time.monotonic()
                cpu0 = proc_cpu_s(relay_pid) if relay_pid else 0.0
                gen0 = time.process_time()
            if step >= warm_steps:
                late_us.append((clock() - due) * 1e6)
            measured = step >= warm_steps
            for c in groups[step % SLICES]:
                if c.peer is None:
                    continue
                c.peer.send(caller_frame(c.idx, c.seq, perf_ns()))
                c.seq += 1
                if measured:
                    c.sent_w += 1
            delay = t0 + (step + 1) / 1000 - clock()
            await asyncio.sleep(delay if delay > 0 else 0)
        window[1] = perf_ns()
        wall = time.monotonic() - wall0
        relay_cpu = (proc_cpu_s(relay_pid) - cpu0) / wall if relay_pid else None
        gen_cpu = (time.process_time() - gen0) / wall
        sent = sum(c.sent_w for c in callers)
        deadline = loop.time() + grace_s
        while sum(c.recv_w for c in callers) < sent and loop.time() < deadline:
            await asyncio.sleep(0.01)
    finally:
        for c in callers:
            if c.peer is not None:
                c.peer.close()
        server.close()
    rtts.sort()
    late_us.sort()
    return {"calls": calls, "sent": sent, "frames": len(rtts),
            "lost": sent - sum(c.recv_w for c in callers),
            "reordered": sum(c.reordered for c in callers), "misrouted": sum(c.misrouted for c in callers),
            "wall_s": round(wall, 2),
            "relay_cpu_pct": round(100 * relay_cpu, 1) if relay_cpu is not None else None,
            "gen_cpu_pct": round(100 * gen_cpu, 1),
            "p50_us": quantile_us(rtts, 0.50), "p99_us": quantile_us(rtts, 0.99),
            "p999_us": quantile_us(rtts, 0.999), "max_us": round(rtts[-1] / 1000, 1) if rtts else None,
            "tick_late_p99_us": round(late_us[max(0, math.ceil(0.99 * len(late_us)) - 1)], 1) if late_us else None,
            "generator": lib}


# --------------------------------------------------------------------------- orchestration
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpus(pin: bool) -> tuple[int | None, int | None]:
    """(relay CPU, generator CPU): the first two this process may use, or none."""
    if not pin:
        return None, None
    try:
        allowed = sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None, None
    return (allowed[0], allowed[1]) if len(allowed) >= 2 else (None, None)


def pin_self(cpu: int | None) -> None:
    if cpu is not None:
        try:
            os.sched_setaffinity(0, {cpu})
        except (AttributeError, OSError):
            pass


def run_loop(coro: Awaitable[Any]) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)  # type: ignore[arg-type]
    return uvloop.run(coro)  # type: ignore[arg-type]


def _child(role: str, *args: str) -> list[str]:
    return [sys.executable, os.path.abspath(__file__), "--role", role, *args]


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


def _tail(path: str, n: int = 400) -> str:
    try:
        with open(path, "rb") as f:
            return f.read().decode(errors="replace")[-n:]
    except OSError:
        return ""


def start_relay(variant: str, up_port: int, cpu: int | None, err_path: str) -> tuple[subprocess.Popen[bytes], int]:
    """The relay process and its port, once it listens (bounded wait)."""
    err = open(err_path, "wb")
    args = ["--variant", variant, "--up-port", str(up_port)] + (["--cpu", str(cpu)] if cpu is not None else [])
    proc = subprocess.Popen(_child("relay", *args), stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL)
    err.close()
    assert proc.stdout is not None
    deadline = time.monotonic() + READY_TIMEOUT_S
    line = b""
    while time.monotonic() < deadline and proc.poll() is None:
        ready, _, _ = select.select([proc.stdout], [], [], 0.2)
        if ready:
            line = proc.stdout.readline()
            break
    if not line.startswith(b"LISTENING "):
        _stop(proc)
        raise RuntimeError(f"relay {variant} did not start: {_tail(err_path)}")
    return proc, int(line.split()[1])


def run_generator(variant: str, calls: int, a: argparse.Namespace, port: int, up_port: int,
                  relay_pid: int, cpu: int | None, lib: str) -> dict[str, Any]:
    args = ["--calls", str(calls), "--seconds", str(a.seconds), "--warmup-s", str(a.warmup_s),
            "--grace-s", str(a.grace_s),
            "--port", str(port), "--up-port", str(up_port), "--relay-pid", str(relay_pid),
            "--generator", lib] + (["--cpu", str(cpu)] if cpu is not None else [])
    try:
        out = subprocess.run(_child("gen", *args), capture_output=True, text=True, stdin=subprocess.DEVNULL,
                             timeout=a.seconds + a.warmup_s + a.grace_s + 2 * CONNECT_TIMEOUT_S + 60)
    except subprocess.TimeoutExpired:
        return {"variant": variant, "calls": calls, "error": "generator timed out"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        return {"variant": variant, "calls": calls,
                "error": f"generator exit {out.returncode}: {out.stderr.strip()[-300:]}"}
    row = json.loads(lines[-1])
    return {"variant": variant, **row}


def measure(a: argparse.Namespace) -> list[dict[str, Any]]:
    relay_cpu, gen_cpu = cpus(not a.no_pin)
    have_picows = picows_available()
    lib = a.generator if a.generator != "auto" else ("picows" if have_picows else "sansio")
    levels = [int(x) for x in a.calls.split(",") if x.strip()]
    rows: list[dict[str, Any]] = []

    def emit(row: dict[str, Any]) -> None:
        rows.append(row)
        print(json.dumps(row), flush=True)

    if lib == "picows" and not have_picows:
        emit({"variant": "generator", "error": "--generator picows, but " + PICOWS_MISSING})
        return rows
    if lib != "picows" and have_picows is False:
        print("relay_floor: picows is not installed: the generator runs on websockets' Sans-I/O",
              file=sys.stderr)
    for variant in [v.strip() for v in a.variants.split(",") if v.strip()]:
        if variant not in VARIANTS:
            emit({"variant": variant, "error": f"unknown variant (one of {', '.join(VARIANTS)})"})
            continue
        if variant == "picows" and not have_picows:
            print(f"relay_floor: {PICOWS_MISSING}", file=sys.stderr)
            emit({"variant": variant, "skipped": PICOWS_MISSING})
            continue
        up_port = free_port()
        relay: subprocess.Popen[bytes] | None = None
        port = up_port
        with tempfile.NamedTemporaryFile(prefix=f"relay-{variant}-", suffix=".err", delete=False) as tmp:
            err_path = tmp.name
        try:
            if variant != "direct":
                try:
                    relay, port = start_relay(variant, up_port, relay_cpu, err_path)
                except RuntimeError as e:
                    for calls in levels:
                        emit({"variant": variant, "calls": calls, "error": str(e)[:400]})
                    continue
            for calls in levels:
                row = run_generator(variant, calls, a, port, up_port, relay.pid if relay else 0, gen_cpu, lib)
                if relay is not None and relay.poll() is not None:
                    row = {"variant": variant, "calls": calls,
                           "error": f"relay exited {relay.returncode}: {_tail(err_path)}"}
                emit(row)
        finally:
            if relay is not None:
                _stop(relay)
            os.unlink(err_path)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="relay_floor.py", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--variants", default="websockets,sansio,picows", help=f"comma-separated, of {', '.join(VARIANTS)}")
    ap.add_argument("--calls", default="300", help="comma-separated call counts (default 300)")
    ap.add_argument("--seconds", type=float, default=5.0, help="measurement window per row (default 5)")
    ap.add_argument("--warmup-s", type=float, default=0.5, help="sending before the window opens (default 0.5)")
    ap.add_argument("--grace-s", type=float, default=GRACE_S,
                    help=f"after the last send, wait up to this long for frames under way (default {GRACE_S:g})")
    ap.add_argument("--no-pin", action="store_true", help="leave relay and generator on any CPU")
    ap.add_argument("--generator", choices=("auto", "picows", "sansio"), default="auto",
                    help="the generator's websocket library (default: picows when installed)")
    ap.add_argument("--role", choices=("main", "relay", "gen"), default="main", help=argparse.SUPPRESS)
    ap.add_argument("--variant", help=argparse.SUPPRESS)
    ap.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--up-port", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--relay-pid", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--cpu", type=int, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if not (0 < a.seconds <= MAX_SECONDS and 0 <= a.warmup_s <= 60 and 0 <= a.grace_s <= 60):
        ap.error(f"--seconds must be within (0, {MAX_SECONDS:g}], --warmup-s and --grace-s within [0, 60]")
    if a.role == "relay":
        pin_self(a.cpu)
        run_loop(run_relay(a.variant, a.up_port))
        return 0
    if a.role == "gen":
        calls = int(a.calls)
        if not 0 < calls <= MAX_CALLS:
            ap.error(f"--calls must be within 1..{MAX_CALLS}")
        pin_self(a.cpu)
        print(json.dumps(run_loop(generate(calls, a.seconds, a.warmup_s, a.port, a.up_port,
                                           a.relay_pid, a.generator, a.grace_s))), flush=True)
        return 0
    levels = [x for x in a.calls.split(",") if x.strip()]
    if not levels or not all(x.strip().isdigit() and 0 < int(x) <= MAX_CALLS for x in levels):
        ap.error(f"--calls must be comma-separated numbers within 1..{MAX_CALLS}")
    rows = measure(a)
    return 1 if any("error" in r for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
