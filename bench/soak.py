"""`python -m bench --soak`: thousands of short calls through one real daemon; does it come back?

One voicebridge process (CPU 0, as in the load bench) and, in this process (CPU 1), the fake
OpenAI Realtime server and the simulated VAIC callers. Each call: upgrade with the bearer token,
`session.initiate`, `session.accepted`, the `start` activity (the bridge's greeting makes the
fake stream assistant audio down), `userStream.start`, `chunks` frames of 20 ms silence on
absolute 20 ms deadlines, then one of three endings, by call index in turn:

* `normal`: `userStream.stop`, `userStream.stopped`, `session.end`; the bridge closes the socket;
* `caller_drop`: the TCP socket is aborted, no `session.end` (the bridge waits its
  `call.resume_grace_s`, 1 s here, then ends the call and closes the OpenAI socket);
* `openai_drop`: the fake aborts that call's OpenAI socket `OPENAI_DROP_AFTER_MS` after its
  first `session.update` (`FakeOpenAIConfig.drop_after_ms_for`, first session of the caller
  only); the caller streams on until that drop has happened, then half its `chunks` more; the
  bridge reconnects or hangs up, either is fine; then it ends like `normal` (or with
  `session.end` answering the bridge's hang-up).

Calls run `concurrency` at a time; every step waits at most `STEP_TIMEOUT_S`, a call at most
`CALL_TIMEOUT_S`, the whole run at most `max_run_s`. A call that fails to set up or to end
cleanly is a failure, and any failure fails the run.

The check: the daemon's admin `/health` `process` figures (open fds, asyncio tasks, RSS) and
`active_calls`, read after a warm-up (`warmup_calls` calls of the same mix, then quiet) and at
the end (after a bounded settle wait), must return to the start: fds, tasks and active calls
exactly, RSS within `rss_tolerance_kib` (see `RSS_TOLERANCE_KIB`). Peaks are sampled every
`SAMPLE_S` during the run; VmHWM is the kernel's RSS high-water mark. `run()` returns the result
dict (also written to `bench/results/soak-<stamp>.json`); `result["pass"]` is the verdict.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import time
import urllib.request
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from voicebridge.sim.fake_openai import FakeOpenAIConfig, FakeRealtimeServer

from . import orchestrate as orch
from .procstat import cpu_seconds, pin

ENDINGS = ("normal", "caller_drop", "openai_drop")
FRAME_MS = 20
FORMAT = "raw/lpcm16_24"
SILENCE_B64 = base64.b64encode(bytes(24 * 2 * FRAME_MS)).decode()   # 20 ms of 24 kHz PCM16
STEP_TIMEOUT_S = 10.0          # each wait of a call (handshake, an answer, the bridge's close)
CALL_TIMEOUT_S = 30.0          # one whole call
OPENAI_DROP_AFTER_MS = 100.0   # after the first session.update: mid-call (the chunks take 200 ms+)
RESUME_GRACE_S = 1             # call.resume_grace_s of the soaked bridge
SAMPLE_S = 0.5                 # /health sampling period during the run (peaks)
QUIET_TIMEOUT_S = 30.0         # wait for the warm-up's calls to leave before the start reading
SETTLE_S = 30.0                # the end's bounded settle wait
# RSS may end above its start by this much. Measured (2 vCPU VM, 50 at a time): RSS climbs about
# 3.5 MiB over the first ~2 500 calls, then stays nearly flat (a 20 000-call run: +0.36 MiB from
# call 2 357 to call 20 000): the allocator's and the garbage collector's high-water mark
# (pymalloc arenas, glibc heaps, the most calls at once), not a leak. So the start reading comes
# after a warm-up of the same mix (`WARMUP_MAX_CALLS`); after it, two 5 000-call runs ended
# +0.25 and +1.36 MiB above the start (the latter in one step late in the run). 4 MiB is about
# three times the worst of those; a leak of 1 KiB per call (5 MiB over 5 000 calls) exceeds it
# (a 2 KiB/call leak put in on purpose failed 2 000 calls at +6.3 MiB). The fds and tasks checks
# are exact and catch a socket or a task per call at once.
RSS_TOLERANCE_KIB = 4096
WARMUP_MAX_CALLS = 2500
INSTRUCTIONS = "Soak test assistant for {caller}."
CALLER_RE = re.compile(r"\+1555(\d{7})")
MAX_FAILURES_KEPT = 20
CALL_END_RE = re.compile(r'^voicebridge_call_ends_total\{reason="([^"]*)"\} ([0-9.e+]+)$', re.M)


@dataclass
class SoakOpts:
    """One soak run. Times in seconds unless the name says otherwise."""

    calls: int = 5000
    concurrency: int = 50
    warmup_calls: int | None = None          # None: see `warmup()`
    chunks: int = 10                         # 20 ms caller frames per call
    rss_tolerance_kib: int = RSS_TOLERANCE_KIB
    settle_s: float = SETTLE_S
    max_run_s: float = 900.0
    transport: str = "fast"
    pin: bool = True
    results_dir: Path = orch.RESULTS

    def warmup(self) -> int:
        """Calls before the start reading: half the measured calls, 100 .. `WARMUP_MAX_CALLS`."""
        if self.warmup_calls is not None:
            return self.warmup_calls
        return max(100, min(WARMUP_MAX_CALLS, self.calls // 2))


@dataclass
class CallOutcome:
    """What one call did. `stage` is where it failed ("" when it did not)."""

    index: int
    ending: str
    ok: bool = False
    stage: str = ""
    detail: str = ""
    bridge_hung_up: bool = False
    chunks_down: int = 0
    close_code: int | None = None
    seconds: float = 0.0


def ending_of(index: int) -> str:
    return ENDINGS[index % len(ENDINGS)]


def caller_of(index: int) -> str:
    return f"+1555{index:07d}"


# ------------------------------------------------------------------------------------ one call
class _Reader:
    """Reads the bridge's messages of one call; `news` is set on every control message."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.news = asyncio.Event()
        self.accepted = self.started = self.stopped = self.hangup = self.closed = False
        self.error: str | None = None
        self.chunks_down = 0

    async def run(self) -> None:
        try:
            async for msg in self.ws:
                if isinstance(msg, bytes):
                    continue
                if '"playStream.chunk"' in msg[:48]:
                    self.chunks_down += 1
                    continue
                try:
                    ev = json.loads(msg)
                except ValueError:
                    continue
                typ = ev.get("type") if isinstance(ev, dict) else None
                if typ == "session.accepted":
                    self.accepted = True
                elif typ == "session.error":
                    self.error = str(ev.get("reason", ""))[:200]
                elif typ == "userStream.started":
                    self.started = True
                elif typ == "userStream.stopped":
                    self.stopped = True
                elif typ == "activities":
                    acts = ev.get("activities") if isinstance(ev.get("activities"), list) else []
                    if any(isinstance(a, dict) and a.get("name") == "hangup" for a in acts):
                        self.hangup = True
                self.news.set()
        except ConnectionClosed:
            pass
        finally:
            self.closed = True
            self.news.set()

    async def until(self, pred: Callable[[], bool], timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until `pred()` or the socket closed; returns `pred()`."""
        deadline = time.monotonic() + timeout_s
        while not pred() and not self.closed:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            self.news.clear()
            try:
                await asyncio.wait_for(self.news.wait(), left)
            except (asyncio.TimeoutError, TimeoutError):
                break
        return pred()


class _Failed(Exception):
    def __init__(self, stage: str, detail: str) -> None:
        super().__init__(detail)
        self.stage, self.detail = stage, detail


async def _send(ws: ClientConnection, cid: str, msg: dict[str, Any]) -> None:
    await ws.send(json.dumps({"type": msg["type"], "conversationId": cid, **msg}, separators=(",", ":")))


async def one_call(url: str, index: int, chunks: int, drops: _DropChooser | None = None) -> CallOutcome:
    """One soak call (see the module docstring), bounded by `CALL_TIMEOUT_S`; never raises.
    An `openai_drop` call streams on past its `chunks` until `drops` says its OpenAI socket was
    dropped (at most `STEP_TIMEOUT_S` more), then half as many frames again."""
    t0 = time.monotonic()
    out = CallOutcome(index, ending_of(index))
    try:
        await asyncio.wait_for(_call_steps(url, out, chunks, drops), CALL_TIMEOUT_S)
    except _Failed as f:
        out.stage, out.detail = f.stage, f.detail
    except (asyncio.TimeoutError, TimeoutError):
        out.stage, out.detail = out.stage or "call", f"call not over within {CALL_TIMEOUT_S:g} s"
    except (OSError, ConnectionClosed, InvalidHandshake) as e:
        out.stage, out.detail = out.stage or "call", f"{type(e).__name__}: {str(e)[:200]}"
    else:
        out.ok = True
    out.seconds = time.monotonic() - t0
    return out


async def _call_steps(url: str, out: CallOutcome, chunks: int, drops: _DropChooser | None) -> None:
    cid = f"soak-{out.index:07d}-{uuid.uuid4().hex[:6]}"
    try:
        ws = await connect(url, additional_headers={"Authorization": f"Bearer {orch.TOKEN}"},
                           compression=None, open_timeout=STEP_TIMEOUT_S, close_timeout=2.0,
                           ping_interval=None, max_size=4 * 2**20, proxy=None)
    except InvalidStatus as e:
        raise _Failed("connect", f"HTTP {e.response.status_code}") from None
    except (OSError, InvalidHandshake, TimeoutError) as e:
        raise _Failed("connect", f"{type(e).__name__}: {str(e)[:200]}") from None
    reader = _Reader(ws)
    task = asyncio.get_running_loop().create_task(reader.run())
    stage = "setup"
    try:
        await _send(ws, cid, {"type": "session.initiate", "botName": "soak", "caller": caller_of(out.index),
                              "expectAudioMessages": True, "supportedMediaFormats": [FORMAT]})
        if not await reader.until(lambda: reader.accepted or reader.error is not None, STEP_TIMEOUT_S):
            raise _Failed(stage, "socket closed before session.accepted" if reader.closed
                          else f"no session.accepted within {STEP_TIMEOUT_S:g} s")
        if reader.error is not None:
            raise _Failed(stage, f"session.error: {reader.error}")
        await _send(ws, cid, {"type": "activities", "activities": [
            {"id": uuid.uuid4().hex, "type": "event", "name": "start",
             "parameters": {"caller": caller_of(out.index), "callee": "+15550199"}}]})
        await _send(ws, cid, {"type": "userStream.start"})
        if not await reader.until(lambda: reader.started, STEP_TIMEOUT_S):
            raise _Failed(stage, "no userStream.started")
        stage = "audio"
        chunk = f'{{"type":"userStream.chunk","conversationId":"{cid}","audioChunk":"{SILENCE_B64}"}}'
        start = time.monotonic()
        k, end_k, drop_seen = 0, chunks, out.ending != "openai_drop" or drops is None
        while k < end_k:
            delay = start + k * FRAME_MS / 1000 - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            if reader.closed or reader.hangup:
                break
            await ws.send(chunk)
            k += 1
            if k == end_k and not drop_seen and drops is not None:
                due = drops.due.get(out.index)
                if due is not None and time.monotonic() > due:   # its timer ran before this wake-up
                    drop_seen = True
                    end_k = k + max(1, chunks // 2)
                elif k < chunks + STEP_TIMEOUT_S * 1000 / FRAME_MS:
                    end_k = k + 1
                else:
                    raise _Failed(stage, "the fake never dropped this call's OpenAI socket "
                                  f"(no session.update within {STEP_TIMEOUT_S:g} s?)")
        stage = "end"
        if out.ending == "caller_drop":
            if reader.closed:
                raise _Failed(stage, "the bridge closed the socket before the caller dropped")
            ws.transport.abort()
            return
        if not reader.hangup and not reader.closed:
            await _send(ws, cid, {"type": "userStream.stop"})
            await reader.until(lambda: reader.stopped or reader.hangup, STEP_TIMEOUT_S)
        if reader.hangup:
            out.bridge_hung_up = True
            if out.ending != "openai_drop":
                raise _Failed(stage, "the bridge hung up a normal call")
            await _send(ws, cid, {"type": "session.end", "reasonCode": "bot-disconnected", "reason": "Bot Side"})
        elif not reader.stopped:
            raise _Failed(stage, "socket closed before userStream.stopped" if reader.closed
                          else f"no userStream.stopped within {STEP_TIMEOUT_S:g} s")
        else:
            await _send(ws, cid, {"type": "session.end", "reasonCode": "client-disconnected",
                                  "reason": "Client Side"})
        if not await reader.until(lambda: False, STEP_TIMEOUT_S) and not reader.closed:
            raise _Failed(stage, f"the bridge did not close the socket within {STEP_TIMEOUT_S:g} s of session.end")
        out.close_code = ws.close_code
        if ws.close_code != 1000:
            raise _Failed(stage, f"closed with code {ws.close_code} after session.end")
    except ConnectionClosed:
        raise _Failed(stage, "socket closed by the bridge mid-call") from None
    finally:
        if drops is not None:
            drops.due.pop(out.index, None)
        out.chunks_down = reader.chunks_down
        if not reader.closed:
            ws.transport.abort()
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


# ------------------------------------------------------------------------------------ many calls
async def run_calls(url: str, first: int, n: int, concurrency: int, chunks: int, deadline: float,
                    outcomes: list[CallOutcome] | None = None,
                    drops: _DropChooser | None = None) -> tuple[list[CallOutcome], int]:
    """Calls `first .. first+n-1`, `concurrency` at a time; none starts after `deadline`.
    Returns (outcomes, calls not started because of the deadline); `outcomes` (appended to as
    calls finish) lets a watcher count them meanwhile."""
    indices = iter(range(first, first + n))
    outcomes = [] if outcomes is None else outcomes
    cut = 0

    async def worker() -> None:
        nonlocal cut
        for i in indices:    # one iterator shared by the workers: each index is taken once
            if time.monotonic() > deadline:
                cut += 1
                continue
            outcomes.append(await one_call(url, i, chunks, drops))

    await asyncio.gather(*(worker() for _ in range(max(1, min(concurrency, n)))))
    return outcomes, cut


class _DropChooser:
    """`FakeOpenAIConfig.drop_after_ms_for`: the first OpenAI session of an `openai_drop` call."""

    def __init__(self) -> None:
        self.chosen: set[int] = set()   # at most one entry per call of the run
        self.due: dict[int, float] = {}   # call -> monotonic time of its drop (the call removes it)

    def __call__(self, instructions: str) -> float | None:
        m = CALLER_RE.search(instructions)
        if m is None:
            return None
        index = int(m.group(1))
        if ending_of(index) != "openai_drop" or index in self.chosen:
            return None
        self.chosen.add(index)
        self.due[index] = time.monotonic() + OPENAI_DROP_AFTER_MS / 1000
        return OPENAI_DROP_AFTER_MS


class _FakeTally:
    """Counts the fake's sessions, dropping closed ones from its (unbounded) list as it goes."""

    def __init__(self, fake: FakeRealtimeServer) -> None:
        self.fake = fake
        self.sessions = 0
        self.dropped = 0

    def collect(self) -> None:
        done = [s for s in self.fake.sessions if s.closed_at is not None]
        if done:
            self.fake.sessions[:] = [s for s in self.fake.sessions if s.closed_at is None]
            self.sessions += len(done)
            self.dropped += sum(1 for s in done if s.dropped_at is not None)


# ------------------------------------------------------------------------------------ the daemon
FIGURES = ("open_fds", "tasks", "active_calls", "rss_kib")


def soak_toml(bridge: orch.Bridge, upstream_port: int, opts: SoakOpts) -> str:
    return (f'[server]\nhost = "127.0.0.1"\nport = {bridge.port}\ntransport = "{opts.transport}"\n'
            f'admin_port = {bridge.admin_port}\nmax_calls = {max(400, 4 * opts.concurrency)}\n\n'
            f'[openai]\nurl = "ws://127.0.0.1:{upstream_port}/v1/realtime"\n'
            f'instructions = "{INSTRUCTIONS}"\ngreeting = "Greet the caller."\n\n'
            f'[audio]\nformat_preference = ["{FORMAT}"]\n\n'
            f'[call]\nresume_grace_s = {RESUME_GRACE_S}\nhangup_grace_s = 2\n\n'
            f'[log]\nlevel = "warning"\n')


def figures(bridge: orch.Bridge) -> dict[str, int]:
    """The admin /health figures the soak judges (blocking: call it in a thread)."""
    h = bridge.health() or {}
    p = h.get("process") or {}
    return {"open_fds": p.get("open_fds"), "tasks": p.get("tasks"),
            "active_calls": h.get("active_calls"), "rss_kib": p.get("rss_kib")}


def call_ends(bridge: orch.Bridge) -> dict[str, int]:
    """`voicebridge_call_ends_total` by reason, from the admin /metrics (blocking)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{bridge.admin_port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m.group(1): int(float(m.group(2))) for m in CALL_END_RE.finditer(text)}


def vm_hwm_kib(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


async def _figures(bridge: orch.Bridge) -> dict[str, int] | None:
    try:
        return await asyncio.to_thread(figures, bridge)
    except (OSError, ValueError):
        return None


async def _wait_level(bridge: orch.Bridge, ok: Callable[[dict[str, int]], bool], timeout_s: float,
                      tally: _FakeTally) -> tuple[dict[str, int] | None, bool, float]:
    """Poll /health until `ok(figures)` (bounded): (last figures, reached, seconds waited)."""
    t0 = time.monotonic()
    last = None
    while True:
        tally.collect()
        last = await _figures(bridge)
        if last is not None and ok(last):
            return last, True, time.monotonic() - t0
        if time.monotonic() - t0 >= timeout_s:
            return last, False, time.monotonic() - t0
        await asyncio.sleep(0.25)


async def _sample_peaks(bridge: orch.Bridge, peak: dict[str, int], stop: asyncio.Event,
                        tally: _FakeTally, done: list[CallOutcome], trace: list[list[float]]) -> None:
    """Until `stop`: the peak of each figure, and `trace` rows [s, calls done, rss_kib, active
    calls] every `SAMPLE_S` (at most max_run_s / SAMPLE_S rows)."""
    t0 = time.monotonic()
    while not stop.is_set():
        f = await _figures(bridge)
        if f is not None:
            for k in FIGURES:
                if isinstance(f.get(k), int):
                    peak[k] = max(peak.get(k, 0), f[k])
            trace.append([round(time.monotonic() - t0, 1), len(done), f.get("rss_kib") or 0,
                          f.get("active_calls") or 0])
        tally.collect()
        try:
            await asyncio.wait_for(stop.wait(), SAMPLE_S)
        except (asyncio.TimeoutError, TimeoutError):
            pass


def _log_summary(lines: list[str]) -> dict[str, Any]:
    by_event: Counter[str] = Counter()
    levels: Counter[str] = Counter()
    non_json = 0
    for ln in lines:
        try:
            ev = json.loads(ln)
        except ValueError:
            non_json += 1
            continue
        if isinstance(ev, dict):
            by_event[str(ev.get("event"))] += 1
            levels[str(ev.get("level"))] += 1
    return {"lines": len(lines), "non_json": non_json, "levels": dict(levels),
            "by_event": dict(by_event.most_common(12))}


# ------------------------------------------------------------------------------------ the run
async def _soak(opts: SoakOpts, say: Callable[[str], None], res: dict[str, Any]) -> None:
    """The run; fills `res` as it goes (so a run that stops early still reports what it has)."""
    chooser = _DropChooser()
    fake = FakeRealtimeServer(FakeOpenAIConfig(port=orch.free_port(), record=False, think_ms=20,
                                               greeting_ms=400, delta_audio_ms=100, delta_interval_ms=20,
                                               drop_after_ms_for=chooser))
    await fake.start()
    tally = _FakeTally(fake)
    bridge = orch.Bridge(orch.Opts(pin=opts.pin, transport=opts.transport), fake.port)
    if bridge.admin_port is None:
        await fake.stop()
        raise RuntimeError("this checkout's bridge has no admin listener: the soak needs its /health")
    bridge.config.write_text(soak_toml(bridge, fake.port, opts))
    url = f"ws://127.0.0.1:{bridge.port}/voicebridge"
    try:
        await asyncio.to_thread(bridge.start)
        res["bridge_pid"] = bridge.pid
        t_run = time.monotonic()
        deadline = t_run + opts.max_run_s
        # ---- warm-up, then a quiet start reading
        n_warm = opts.warmup()
        say(f"soak: warm-up {n_warm} calls, {opts.concurrency} at a time ...")
        warm, _ = await run_calls(url, 0, n_warm, opts.concurrency, opts.chunks, deadline, drops=chooser)
        quiet = lambda f: f.get("active_calls") == 0 and fake.open_sessions() == 0
        start, reached, _ = await _wait_level(bridge, quiet, QUIET_TIMEOUT_S, tally)
        if reached:   # and once more, so that nothing still closing is in the start reading
            await asyncio.sleep(1.0)
            start, reached, _ = await _wait_level(bridge, quiet, QUIET_TIMEOUT_S, tally)
        res["warmup_failed"] = sum(1 for o in warm if not o.ok)
        res["start"] = start
        if not reached or start is None:
            raise RuntimeError(f"the daemon did not go quiet after the warm-up: {start}")
        if not all(isinstance(start.get(k), int) for k in FIGURES):
            raise RuntimeError(f"the daemon's admin /health has no process figures: {start}")
        # ---- the measured calls
        say(f"soak: start {start}; {opts.calls} calls, {opts.concurrency} at a time ...")
        cpu0 = cpu_seconds(bridge.pid)
        peak: dict[str, int] = dict(start)
        stop = asyncio.Event()
        outcomes: list[CallOutcome] = []
        trace: list[list[float]] = []
        res["rss_trace"] = trace
        sampler = asyncio.get_running_loop().create_task(_sample_peaks(bridge, peak, stop, tally, outcomes, trace))
        t0 = time.monotonic()
        _, cut = await run_calls(url, n_warm, opts.calls, opts.concurrency, opts.chunks, deadline, outcomes, chooser)
        duration = time.monotonic() - t0
        stop.set()
        await sampler
        res["bridge_cpu_s"] = round(cpu_seconds(bridge.pid) - cpu0, 1)
        # ---- settle, end reading
        tol = opts.rss_tolerance_kib
        back = lambda f: (f.get("open_fds") == start["open_fds"] and f.get("tasks") == start["tasks"]
                          and f.get("active_calls") == 0 and fake.open_sessions() == 0
                          and (f.get("rss_kib") or 0) - start["rss_kib"] <= tol)
        end, settled, settle_s = await _wait_level(bridge, back, opts.settle_s, tally)
        res["end"] = end
        res["settled"] = settled
        res["settle_s"] = round(settle_s, 1)
        res["peak"] = peak
        res["vm_hwm_kib"] = vm_hwm_kib(bridge.pid)
        tally.collect()
        res["daemon_call_ends"] = await asyncio.to_thread(call_ends, bridge)
        res["duration_s"] = round(duration, 1)
        res["calls_per_s"] = round(len(outcomes) / duration, 1) if duration > 0 else None
        res["calls_done"] = len(outcomes)
        res["calls_cut"] = cut
        kinds: dict[str, dict[str, int]] = {}
        for o in outcomes:
            k = kinds.setdefault(o.ending, {"calls": 0, "ok": 0, "failed": 0, "bridge_hung_up": 0})
            k["calls"] += 1
            k["ok" if o.ok else "failed"] += 1
            k["bridge_hung_up"] += o.bridge_hung_up
        res["endings"] = kinds
        res["failed"] = sum(1 for o in outcomes if not o.ok)
        res["failures"] = [asdict(o) for o in outcomes if not o.ok][:MAX_FAILURES_KEPT]
        secs = sorted(o.seconds for o in outcomes)
        res["call_s"] = {"p50": round(secs[len(secs) // 2], 3), "max": round(secs[-1], 3)} if secs else {}
        res["chunks_down_per_call"] = round(sum(o.chunks_down for o in outcomes) / max(1, len(outcomes)), 1)
    finally:
        if bridge.proc is not None:   # SIGTERM and wait first: its log is read before it is removed
            await asyncio.to_thread(orch.stop_process, bridge.proc)
            res["bridge_exit_code"] = bridge.proc.returncode
            res["bridge_log"] = _log_summary(bridge.log_lines())
        await asyncio.to_thread(bridge.stop)
        await fake.stop(timeout=3.0)
        tally.collect()
        res["fake_sessions"] = tally.sessions
        res["fake_dropped"] = tally.dropped
        res["openai_drops_expected"] = len(chooser.chosen)


def judge(res: dict[str, Any]) -> list[str]:
    """Why the run fails ([] = it passes)."""
    why: list[str] = [res["error"]] if res.get("error") else []
    start, end = res.get("start") or {}, res.get("end") or {}
    for k in ("open_fds", "tasks", "active_calls"):
        if end.get(k) != (start.get(k) if k != "active_calls" else 0):
            why.append(f"{k}: start {start.get(k)}, end {end.get(k)}")
    if start.get("active_calls") != 0:
        why.append(f"active_calls at the start: {start.get('active_calls')}")
    grow = (end.get("rss_kib") or 0) - (start.get("rss_kib") or 0)
    if end.get("rss_kib") is None or grow > res["rss_tolerance_kib"]:
        why.append(f"rss_kib: grew {grow} KiB > {res['rss_tolerance_kib']} KiB")
    if res.get("failed"):
        why.append(f"{res['failed']} calls failed to set up or end cleanly")
    if res.get("warmup_failed"):
        why.append(f"{res['warmup_failed']} warm-up calls failed")
    if res.get("calls_cut"):
        why.append(f"{res['calls_cut']} calls not started (max_run_s)")
    if res.get("fake_dropped") != res.get("openai_drops_expected") and res.get("openai_drops_expected"):
        why.append(f"OpenAI drops done {res.get('fake_dropped')} of {res.get('openai_drops_expected')}")
    if res.get("bridge_exit_code") not in (0,):
        why.append(f"bridge exit code {res.get('bridge_exit_code')} after SIGTERM")
    log = res.get("bridge_log") or {}
    bad = {lv: n for lv, n in (log.get("levels") or {}).items() if lv in ("error", "critical")}
    if bad or log.get("non_json"):
        why.append(f"bridge log: {bad} error lines, {log.get('non_json')} non-JSON lines")
    return why


def table(res: dict[str, Any]) -> str:
    start, end, peak = res.get("start") or {}, res.get("end") or {}, res.get("peak") or {}
    rows = [f"{'':<14}{'start':>10}{'end':>10}{'peak':>10}  check"]
    for k, rule in (("open_fds", "exact"), ("tasks", "exact"), ("active_calls", "exact (0)"),
                    ("rss_kib", f"end - start <= {res['rss_tolerance_kib']} KiB")):
        ok = (end.get(k) == start.get(k) if k != "rss_kib"
              else end.get(k) is not None and end[k] - start.get(k, 0) <= res["rss_tolerance_kib"])
        rows.append(f"{k:<14}{start.get(k, '-')!s:>10}{end.get(k, '-')!s:>10}{peak.get(k, '-')!s:>10}  "
                    f"{'ok' if ok else 'FAIL'} ({rule})")
    rows.append(f"{'VmHWM KiB':<14}{'':>10}{'':>10}{res.get('vm_hwm_kib', '-')!s:>10}  (kernel high-water mark)")
    return "\n".join(rows)


def run(opts: SoakOpts, say: Callable[[str], None], stamp: str,
        machine: dict[str, Any] | None = None) -> dict[str, Any]:
    """The whole soak (blocking); prints the report, writes the JSON, returns the result."""
    try:
        old = os.sched_getaffinity(0)
    except (AttributeError, OSError):
        old = None
    if opts.pin:
        pin(orch.GEN_CPU)
    res: dict[str, Any] = {"mode": "soak", "timestamp": stamp, "machine": machine or {},
                           "calls": opts.calls, "concurrency": opts.concurrency,
                           "warmup_calls": opts.warmup(), "chunks_per_call": opts.chunks,
                           "frame_ms": FRAME_MS, "resume_grace_s": RESUME_GRACE_S,
                           "openai_drop_after_ms": OPENAI_DROP_AFTER_MS,
                           "rss_tolerance_kib": opts.rss_tolerance_kib, "transport": opts.transport}
    try:
        import uvloop
        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:
        runner = asyncio.run
    try:
        runner(_soak(opts, say, res))
    except (RuntimeError, OSError) as e:   # the bridge did not start, or did not go quiet
        res["error"] = f"{type(e).__name__}: {str(e)[:1500]}"
    finally:
        if old is not None:
            os.sched_setaffinity(0, old)
    res["why_failed"] = judge(res)
    res["pass"] = not res["why_failed"]
    say("")
    say(f"soak: {res.get('calls_done')} calls (+{res['warmup_calls']} warm-up), {res['concurrency']} at a "
        f"time, {res['chunks_per_call']} x {FRAME_MS} ms caller chunks each; {res.get('duration_s')} s, "
        f"{res.get('calls_per_s')} calls/s; bridge CPU {res.get('bridge_cpu_s')} s; settled in "
        f"{res.get('settle_s')} s")
    say(table(res))
    endings = res.get("endings") or {}
    for kind in (e for e in ENDINGS if e in endings):
        k = endings[kind]
        extra = ""
        if kind == "openai_drop":
            extra = (f"; OpenAI sockets dropped {res.get('fake_dropped')} of {res.get('openai_drops_expected')} "
                     f"(warm-up included), the bridge hung up {k['bridge_hung_up']} calls, reconnected the rest")
        say(f"  {kind:<12} {k['calls']:>6} calls, {k['ok']} ok, {k['failed']} failed{extra}")
    say(f"  daemon call ends by reason: {res.get('daemon_call_ends')}; fake OpenAI sessions "
        f"{res.get('fake_sessions')} (calls + reconnects); call length p50/max {res.get('call_s')} s")
    for f in res.get("failures") or []:
        say(f"  failed call {f['index']} ({f['ending']}) at {f['stage']}: {f['detail']}")
    path = opts.results_dir / f"soak-{stamp}.json"
    opts.results_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(res, indent=1, default=str))
    res["json_path"] = str(path)
    say(f"results: {path}")
    say("soak: PASS" if res["pass"] else "soak: FAIL: " + "; ".join(res["why_failed"]))
    return res
