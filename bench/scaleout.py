"""`make scaleout`: several voicebridge instances behind HAProxy on 127.0.0.1, one drained mid-run.

    python -m bench.scaleout [--instances 3] [--calls 100] [--spacing-s 0.3] [--drain-after 40]

What runs, all on 127.0.0.1: the in-repo fake OpenAI Realtime server (in this process), N daemon
processes (`python -m voicebridge --config config.toml`, environment overrides for the ports),
HAProxy with the configuration `render_haproxy_cfg` makes from deploy/haproxy.cfg (its `defaults`
and backend rules as they are; only the `bind`/`server` lines and the global settings that need
root are replaced), and simulated VAIC callers (voicebridge/sim/caller.py) that dial HAProxy.
One call starts every `spacing_s`; between call `drain_after` and the next one the last instance
gets SIGTERM. It then drains: HAProxy's health check (GET /ready) sees 503 and stops sending it
calls, and the calls it has go on to their end.

What it asserts (`check`, a pure function of what was recorded; exit status 1 when one fails):
- no call is cut: every call ends by its own script (`caller-hangup`, no hangup from the bot, no
  session.error, no connect error, no protocol violation, no script wait timed out), the
  daemon logs `call.end` reason `vaic_session_end` for it, and the drained instance logs
  `server.drained` with `ended_by_timeout` 0 and exits 0;
- new calls land on the others: every call that started after the drained instance logged
  `server.draining` started (`call.start`) on another instance; the drained one had calls when
  it got the signal, and each other instance takes calls after it;
- every frame arrives, both ways: caller chunks sent == `input_audio_buffer.append`s the fake
  received for that call == the daemon's `frames_up`; bot audio the fake sent (all responses
  completed) == bot audio the caller received (within 2 ms a stream), chunks the caller
  received == the daemon's `frames_down`.

Figures printed: calls per instance before/after the drain, HAProxy's time to mark the instance
DOWN, its retries/redispatches, the drain duration, frames both ways, turn latency, and the round
trip HAProxy adds (websocket ping/pong through HAProxy vs straight to an instance, alternated on
two idle connections while the calls run). Every wait is bounded; the whole run by `timeout_s`.
Exit status: 0 pass, 1 an assertion failed, 2 could not run (no haproxy, a process did not start).
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from websockets.asyncio.client import connect

from voicebridge.sim.caller import CallerConfig, CallResult, ScriptItem, Silence, Speak, WaitForBot, run_call
from voicebridge.sim.fake_openai import FakeOpenAIConfig, FakeRealtimeServer, FakeSession

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = REPO / "deploy" / "haproxy.cfg"
TOKEN = "scaleout-vaic-token"
API_KEY = "sk-scaleout-not-a-real-key"
BOT_PATH = "/voicebridge"
BACKEND = "voicebridge"
# the fake finds each call's OpenAI session by the caller number in its instructions
INSTRUCTIONS = "You are a test assistant for {caller}."
START_TIMEOUT_S = 20.0
UP_TIMEOUT_S = 15.0
STOP_TIMEOUT_S = 10.0
LOG_WAIT_S = 5.0               # for the last call.end lines after the callers are done
DRAIN_TIMEOUT_S = 30           # the instances' server.drain_timeout_s: far above a call's length
STREAM_TOLERANCE_MS = 2.0      # bot audio: fake sent vs caller received, per stream
PROBE_PINGS = 60
PROBE_GAP_S = 0.05
# global settings of the template that need root or system paths; the rest is kept
# (maxconn: the template's is sized for a fleet, and needs a descriptor limit only root gets)
GLOBAL_DROP = frozenset({"log", "chroot", "stats", "user", "group", "daemon", "pidfile",
                         "ca-base", "crt-base", "master-worker", "maxconn"})
LOCAL_MAXCONN = 400            # HAProxy needs 2 descriptors each (+31): fits a 1024 soft limit
SECTIONS = frozenset({"global", "defaults", "frontend", "backend", "listen", "resolvers", "peers",
                      "userlist", "mailers", "program", "http-errors", "ring", "cache"})


class SetupError(RuntimeError):
    """The run could not be set up (exit status 2), as opposed to a failed assertion."""


@dataclass
class Opts:
    instances: int = 3
    calls: int = 100
    spacing_s: float = 0.3       # one new call this often
    drain_after: int = 40        # the last instance gets SIGTERM after this many calls started
    timeout_s: float = 150.0     # the whole run
    keep: bool = False           # keep the work directory (logs) even when everything passed
    probe: bool = True           # measure the round trip HAProxy adds
    log: Any = print


# ------------------------------------------------------------------------------- HAProxy config
def haproxy_binary() -> str | None:
    """The haproxy executable: on PATH, or where Debian puts it (/usr/sbin is not on every PATH)."""
    found = shutil.which("haproxy")
    if found:
        return found
    for p in ("/usr/sbin/haproxy", "/usr/local/sbin/haproxy"):
        if os.access(p, os.X_OK):
            return p
    return None


def _split_sections(text: str) -> list[tuple[str, list[str]]]:
    """(header line, body lines) per section; text before the first section has header ''."""
    out: list[tuple[str, list[str]]] = [("", [])]
    for line in text.splitlines():
        word = line.split(None, 1)[0] if line.strip() else ""
        if line[:1] not in (" ", "\t", "#", "") and word in SECTIONS:
            out.append((line, []))
        else:
            out[-1][1].append(line)
    return out


def render_haproxy_cfg(template: str, *, front_port: int, servers: list[tuple[str, int]],
                       stats_socket: Path, extra_ports: list[int]) -> str:
    """deploy/haproxy.cfg turned into a local one: the calls' frontend (the one whose
    `default_backend` is `voicebridge`) binds 127.0.0.1:`front_port` without TLS, every other
    frontend/listen binds the next port of `extra_ports`; the `voicebridge` backend's `server`
    lines become one per `servers` entry (name, port) on 127.0.0.1, each with the options of the
    template's first server line; `global` loses what needs root or system paths (GLOBAL_DROP)
    and gets a stats socket at `stats_socket`, logging to stdout and `maxconn` LOCAL_MAXCONN. Everything else (defaults,
    timeouts, balance, checks, retries) is kept verbatim. Raises ValueError if the template
    has no such frontend or backend."""
    out: list[str] = []
    ports = iter(extra_ports)
    seen_front = seen_back = False
    for header, body in _split_sections(template):
        kind, _, name = header.partition(" ")
        name = name.strip()
        words = [ln.split() for ln in body]
        if kind == "global":
            out.append(header)
            out += [ln for ln, w in zip(body, words) if not w or w[0] not in GLOBAL_DROP]
            out.append(f"    stats socket {stats_socket} mode 600 level admin")
            out.append("    log stdout format raw local0 info")
            out.append(f"    maxconn {LOCAL_MAXCONN}")
            continue
        if kind in ("frontend", "listen"):
            calls = any(w[:2] == ["default_backend", BACKEND] for w in words)
            seen_front |= calls
            out.append(header)
            bound = False
            for ln, w in zip(body, words):
                if w and w[0] == "bind":
                    if not bound:
                        port = front_port if calls else next(ports)
                        out.append(f"    bind 127.0.0.1:{port}")
                        bound = True
                    continue
                out.append(ln)
            continue
        if kind == "backend" and name == BACKEND:
            seen_back = True
            out.append(header)
            opts: list[str] | None = None
            for ln, w in zip(body, words):
                if w and w[0] == "server":
                    if opts is None:
                        opts = w[3:]
                        for sname, port in servers:
                            out.append("    " + " ".join(["server", sname, f"127.0.0.1:{port}", *opts]))
                    continue
                out.append(ln)
            if opts is None:
                raise ValueError(f"backend {BACKEND} of the template has no server line")
            continue
        if header:
            out.append(header)
        out += body
    if not seen_front or not seen_back:
        raise ValueError(f"the template needs a frontend with `default_backend {BACKEND}` "
                         f"and a backend `{BACKEND}`")
    return "\n".join(out) + "\n"


def haproxy_check(binary: str, cfg_path: Path) -> tuple[bool, str]:
    """`haproxy -c -f cfg_path`: (valid, its output)."""
    p = subprocess.run([binary, "-c", "-f", str(cfg_path)], capture_output=True, text=True, timeout=20)
    return p.returncode == 0, (p.stdout + p.stderr).strip()


async def haproxy_stat(sock: Path, timeout_s: float = 2.0) -> list[dict[str, str]]:
    """`show stat` on the runtime API socket: one dict per proxy/server row (pxname, svname,
    status, scur, stot, wretr, wredis, check_status, ...)."""
    async def go() -> str:
        reader, writer = await asyncio.open_unix_connection(str(sock))
        try:
            writer.write(b"show stat\n")
            await writer.drain()
            return (await reader.read(1 << 20)).decode()
        finally:
            writer.close()
    text = await asyncio.wait_for(go(), timeout_s)
    lines = text.strip().splitlines()
    if not lines or not lines[0].startswith("# "):
        return []
    return list(csv.DictReader(io.StringIO("\n".join([lines[0][2:], *lines[1:]]))))


# ------------------------------------------------------------------------------- processes
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def http_status(port: int, path: str, timeout_s: float = 2.0) -> int:
    """Status code of one `GET path` on 127.0.0.1:port."""
    async def go() -> int:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
            line = await reader.readline()
            return int(line.split()[1])
        finally:
            writer.close()
    return await asyncio.wait_for(go(), timeout_s)


@dataclass
class Instance:
    """One voicebridge daemon process."""
    name: str
    port: int
    admin_port: int
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None

    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = []
        try:
            text = self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return []
        for line in text.splitlines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if isinstance(ev, dict) and (name is None or ev.get("event") == name):
                out.append(ev)
        return out

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def instance_env(inst: Instance, fake_port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VOICEBRIDGE_") and k not in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY")}
    env.update({
        "VOICEBRIDGE_TOKEN": TOKEN,
        "OPENAI_API_KEY": API_KEY,
        "VOICEBRIDGE_SERVER_HOST": "127.0.0.1",
        "VOICEBRIDGE_SERVER_PORT": str(inst.port),
        "VOICEBRIDGE_SERVER_ADMIN_PORT": str(inst.admin_port),
        "VOICEBRIDGE_SERVER_DRAIN_TIMEOUT_S": str(DRAIN_TIMEOUT_S),
        "VOICEBRIDGE_OPENAI_URL": f"ws://127.0.0.1:{fake_port}/v1/realtime",
        "VOICEBRIDGE_OPENAI_INSTRUCTIONS": json.dumps(INSTRUCTIONS),
        "VOICEBRIDGE_CALL_RESUME_GRACE_S": "0",   # a dropped socket ends its call at once: visible
        "VOICEBRIDGE_LOG_LEVEL": "info",
        "PYTHONUNBUFFERED": "1",
    })
    return env


async def start_instance(inst: Instance, fake_port: int) -> None:
    """Start the daemon and wait (bounded) until its /health answers 200."""
    with open(inst.log_path, "wb") as out:
        inst.proc = subprocess.Popen([sys.executable, "-m", "voicebridge", "--config", str(REPO / "config.toml")],
                                     env=instance_env(inst, fake_port), cwd=REPO, stdout=out,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    end = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < end:
        if inst.proc.poll() is not None:
            raise SetupError(f"{inst.name} exited {inst.proc.returncode} at start: see {inst.log_path}")
        try:
            if await http_status(inst.port, "/health") == 200:
                return
        except (OSError, ValueError, IndexError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.1)
    raise SetupError(f"{inst.name} did not answer /health within {START_TIMEOUT_S:g} s: see {inst.log_path}")


def call_logs(insts: list[Instance]) -> tuple[dict[str, list[str]], dict[str, dict[str, Any]]]:
    """From the instances' logs: conversation id -> the instances that logged its call.start,
    and conversation id -> its call.end event."""
    started_on: dict[str, list[str]] = {}
    ends: dict[str, dict[str, Any]] = {}
    for inst in insts:
        for ev in inst.events():
            if ev.get("event") == "call.start":
                started_on.setdefault(str(ev.get("conversation_id")), []).append(inst.name)
            elif ev.get("event") == "call.end":
                ends[str(ev.get("call_id"))] = ev
    return started_on, ends


def stop_proc(proc: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM,
              timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """Signal the process (by its own handle), wait, then SIGKILL. Returns its exit status."""
    if proc is None:
        return None
    if proc.poll() is None:
        proc.send_signal(sig)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)
    return proc.returncode


async def wait_exit(proc: subprocess.Popen[bytes], timeout_s: float) -> tuple[int | None, float | None]:
    """(exit status, seconds waited) once the process ended within `timeout_s`, else (None, None)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout_s:
        if proc.poll() is not None:
            return proc.returncode, round(time.monotonic() - t0, 2)
        await asyncio.sleep(0.05)
    return None, None


# ------------------------------------------------------------------------------- records
@dataclass
class CallRecord:
    """What the caller saw of one call, and when it began (wall clock, to line up with logs)."""
    idx: int
    cid: str
    caller: str
    started_wall: float
    end_reason: str | None = None
    connect_error: str | None = None
    session_error: str | None = None
    violations: int = 0
    script_timeouts: int = 0
    bot_hangup: bool = False
    chunks_sent: int = 0
    chunks_received: int = 0
    received_ms: list[float] = field(default_factory=list)   # per bot stream
    turn_ms: list[float] = field(default_factory=list)
    duration_s: float = 0.0

    @classmethod
    def of(cls, idx: int, caller: str, started_wall: float, res: CallResult) -> "CallRecord":
        return cls(idx=idx, cid=res.conversation_id, caller=caller, started_wall=started_wall,
                   end_reason=res.end_reason, connect_error=res.connect_error,
                   session_error=res.session_error,
                   violations=len(res.violations) + res.violations_suppressed,
                   script_timeouts=res.script_timeouts,
                   bot_hangup=any(a.get("name") in ("hangup", "transfer") for a in res.received_activities),
                   chunks_sent=res.chunks_sent, chunks_received=res.chunks_received,
                   received_ms=[s.received_ms for s in res.streams],
                   turn_ms=[t.latency_ms for t in res.turns if t.latency_ms is not None],
                   duration_s=res.duration_ms / 1000)


@dataclass
class FakeSide:
    """What the fake OpenAI server saw of one call."""
    appends: int
    sent_ms: float
    responses: int
    all_completed: bool


@dataclass
class Observed:
    """Everything `check` judges, gathered after the run."""
    calls: list[CallRecord]
    instances: list[str]
    drained: str
    draining_wall: float | None                        # the drained instance's server.draining
    started_on: dict[str, list[str]]                   # conversation id -> instances (call.start)
    ends: dict[str, dict[str, Any]]                    # conversation id -> its call.end event
    fake: dict[str, FakeSide]                          # caller number -> the fake's side
    drain_log: dict[str, Any] | None                   # the drained instance's server.drained
    drained_exit: int | None
    expected_turns: int


def check(o: Observed) -> list[str]:
    """The assertions of the run, as a list of failures (empty: passed)."""
    bad: list[str] = []
    for c in o.calls:
        what = f"call {c.idx} ({c.cid})"
        if c.connect_error:
            bad.append(f"{what}: could not connect: {c.connect_error}")
            continue
        if c.end_reason != "caller-hangup" or c.bot_hangup or c.session_error:
            bad.append(f"{what}: cut: ended {c.end_reason}, session.error {c.session_error!r}, "
                       f"hangup from the bot {c.bot_hangup}")
        if c.violations or c.script_timeouts:
            bad.append(f"{what}: {c.violations} protocol violations, {c.script_timeouts} script waits timed out")
        if len(c.turn_ms) != o.expected_turns:
            bad.append(f"{what}: {len(c.turn_ms)} answered turns, the script has {o.expected_turns}")
        where = o.started_on.get(c.cid, [])
        if len(where) != 1:
            bad.append(f"{what}: call.start logged by {where or 'no instance'}")
        end = o.ends.get(c.cid)
        if end is None:
            bad.append(f"{what}: no call.end logged")
        else:
            if end.get("reason") != "vaic_session_end":
                bad.append(f"{what}: the daemon ended it: {end.get('reason')} {end.get('detail', '')}")
            if end.get("frames_up") != c.chunks_sent or end.get("frames_down") != c.chunks_received:
                bad.append(f"{what}: frames caller sent/received {c.chunks_sent}/{c.chunks_received}, "
                           f"daemon up/down {end.get('frames_up')}/{end.get('frames_down')}")
        fk = o.fake.get(c.caller)
        if fk is None:
            bad.append(f"{what}: no OpenAI session at the fake")
        else:
            if fk.appends != c.chunks_sent:
                bad.append(f"{what}: caller sent {c.chunks_sent} chunks, the fake got {fk.appends}")
            got = sum(c.received_ms)
            if not fk.all_completed or abs(fk.sent_ms - got) > STREAM_TOLERANCE_MS * max(1, len(c.received_ms)):
                bad.append(f"{what}: the fake sent {fk.sent_ms:.0f} ms of bot audio "
                           f"({fk.responses} responses, all completed: {fk.all_completed}), the caller got {got:.0f} ms")
        if (o.draining_wall is not None and c.started_wall > o.draining_wall
                and o.drained in where):
            bad.append(f"{what}: started {c.started_wall - o.draining_wall:.3f} s after the drain began, "
                       f"landed on the draining {o.drained}")
    if o.draining_wall is None:
        bad.append(f"{o.drained} never logged server.draining")
    if o.drain_log is None:
        bad.append(f"{o.drained} never logged server.drained")
    else:
        if o.drain_log.get("ended_by_timeout") != 0 or o.drain_log.get("forced"):
            bad.append(f"{o.drained}: calls hung up by the drain: {o.drain_log}")
        if not o.drain_log.get("calls_at_signal"):
            bad.append(f"{o.drained} had no call when it got SIGTERM: the drain was not exercised")
    if o.drained_exit != 0:
        bad.append(f"{o.drained} exit status {o.drained_exit}, not 0")
    after = split_by_drain(o)[1]
    for name in o.instances:
        if name != o.drained and not after.get(name):
            bad.append(f"{name} took no call after the drain")
    return bad


def split_by_drain(o: Observed) -> tuple[dict[str, int], dict[str, int]]:
    """Calls started per instance before and after the drained instance logged server.draining."""
    before = {n: 0 for n in o.instances}
    after = {n: 0 for n in o.instances}
    for c in o.calls:
        for name in o.started_on.get(c.cid, []):
            late = o.draining_wall is not None and c.started_wall > o.draining_wall
            (after if late else before)[name] += 1
    return before, after


def _wall(ts: Any) -> float | None:
    """A log line's ISO-8601 timestamp as epoch seconds."""
    if not isinstance(ts, str):
        return None
    try:
        return datetime.fromisoformat(ts.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


_CALLER_RE = re.compile(r"assistant for (\+\d+)")


def fake_sides(sessions: list[FakeSession]) -> dict[str, FakeSide]:
    """Per caller number (from the instructions of the session's session.update)."""
    out: dict[str, FakeSide] = {}
    for s in sessions:
        caller = None
        for ev in s.received_of("session.update"):
            m = _CALLER_RE.search(str((ev.get("session") or {}).get("instructions") or ""))
            if m:
                caller = m.group(1)
                break
        if caller is None:
            continue
        done = [r for r in s.responses if r.status == "completed"]
        out[caller] = FakeSide(appends=len(s.received_of("input_audio_buffer.append")),
                               sent_ms=float(sum(r.audio_ms_sent for r in done)),
                               responses=len(s.responses),
                               all_completed=len(done) == len(s.responses))
    return out


def pct(values: list[float], q: float) -> float | None:
    """The q-quantile (nearest rank) of values, None when empty."""
    if not values:
        return None
    v = sorted(values)
    return v[min(len(v) - 1, max(0, round(q * (len(v) - 1))))]


# ------------------------------------------------------------------------------- the run
SCRIPT: list[ScriptItem] = [Speak(800), WaitForBot(8000), Speak(800), WaitForBot(8000), Silence(200)]
SCRIPT_TURNS = sum(isinstance(item, Speak) for item in SCRIPT)   # each Speak gets one answer


async def _probe(front_port: int, direct_port: int, n: int) -> dict[str, Any]:
    """Round trip of a websocket ping: through HAProxy and straight to an instance, alternated
    on two connections that never send session.initiate (they are no calls)."""
    hdr = {"Authorization": f"Bearer {TOKEN}"}
    rtt: dict[str, list[float]] = {"haproxy": [], "direct": []}
    async with connect(f"ws://127.0.0.1:{front_port}{BOT_PATH}", additional_headers=hdr, proxy=None,
                       compression=None, open_timeout=5) as via, \
            connect(f"ws://127.0.0.1:{direct_port}{BOT_PATH}", additional_headers=hdr, proxy=None,
                    compression=None, open_timeout=5) as direct:
        for i in range(n):
            for key, ws in (("haproxy", via), ("direct", direct)) if i % 2 else (("direct", direct), ("haproxy", via)):
                t0 = time.perf_counter()
                pong = await ws.ping()
                await asyncio.wait_for(pong, 2.0)
                rtt[key].append((time.perf_counter() - t0) * 1e6)
            await asyncio.sleep(PROBE_GAP_S)
    p50h, p50d = pct(rtt["haproxy"], 0.5), pct(rtt["direct"], 0.5)
    return {"pings": n, "rtt_haproxy_p50_us": p50h, "rtt_direct_p50_us": p50d,
            "rtt_haproxy_p90_us": pct(rtt["haproxy"], 0.9), "rtt_direct_p90_us": pct(rtt["direct"], 0.9),
            "added_rtt_p50_us": None if p50h is None or p50d is None else p50h - p50d}


async def _watch_down(sock: Path, server: str, since: float, until: asyncio.Event,
                      out: dict[str, Any]) -> None:
    """Poll HAProxy until `server` is not UP: out['down_after_s'] (since `since`, monotonic)."""
    while not until.is_set():
        try:
            for row in await haproxy_stat(sock):
                if row.get("pxname") == BACKEND and row.get("svname") == server:
                    if not row.get("status", "").startswith("UP"):
                        out["down_after_s"] = round(time.monotonic() - since, 2)
                        out["down_status"] = row.get("status")
                        out["down_check"] = row.get("check_status")
                        return
        except (OSError, asyncio.TimeoutError):
            pass
        await asyncio.sleep(0.1)


async def _wait_all_up(sock: Path, names: list[str], timeout_s: float,
                       hap: subprocess.Popen[bytes], hap_log: Path) -> None:
    end = time.monotonic() + timeout_s
    rows: list[dict[str, str]] = []
    while time.monotonic() < end:
        if hap.poll() is not None:
            raise SetupError(f"haproxy exited {hap.returncode} at start:\n{hap_log.read_text(errors='replace')[-2000:]}")
        try:
            rows = [r for r in await haproxy_stat(sock) if r.get("pxname") == BACKEND]
        except (OSError, asyncio.TimeoutError):
            rows = []
        ok = {r["svname"] for r in rows if r.get("status") == "UP" and r.get("check_status") == "L7OK"}
        if set(names) <= ok:
            return
        await asyncio.sleep(0.2)
    raise SetupError(f"HAProxy did not see every instance UP within {timeout_s:g} s: "
                     f"{[(r.get('svname'), r.get('status'), r.get('check_status')) for r in rows]}")


async def run(opts: Opts) -> tuple[int, dict[str, Any]]:
    """The whole scale-out run; (exit status, figures). See the module docstring."""
    binary = haproxy_binary()
    if binary is None:
        raise SetupError("haproxy is not installed (`make scaleout` installs Debian's haproxy package)")
    if opts.instances < 2 or opts.calls < 2 or not 0 < opts.drain_after < opts.calls:
        raise SetupError("need at least 2 instances and 2 calls, and 0 < drain_after < calls")
    work = Path(tempfile.mkdtemp(prefix="vb-scaleout-"))
    log = opts.log
    fake = FakeRealtimeServer(FakeOpenAIConfig(api_key=API_KEY, think_ms=150, delta_audio_ms=100,
                                               delta_interval_ms=20, reply_ms=[1200]))
    await fake.start()
    insts = [Instance(f"vb{i + 1}", free_port(), free_port(), work / f"vb{i + 1}.log")
             for i in range(opts.instances)]
    drained = insts[-1]
    hap: subprocess.Popen[bytes] | None = None
    sock = work / "haproxy.sock"
    front_port = free_port()
    figures: dict[str, Any] = {"instances": opts.instances, "calls": opts.calls, "work_dir": str(work)}
    passed = False
    try:
        await asyncio.gather(*(start_instance(i, fake.port) for i in insts))
        cfg = render_haproxy_cfg(TEMPLATE.read_text(), front_port=front_port,
                                 servers=[(i.name, i.port) for i in insts], stats_socket=sock,
                                 extra_ports=[free_port() for _ in range(4)])
        cfg_path = work / "haproxy.cfg"
        cfg_path.write_text(cfg)
        ok, text = haproxy_check(binary, cfg_path)
        if not ok:
            raise SetupError(f"haproxy -c refused the rendered {cfg_path}:\n{text}")
        with open(work / "haproxy.log", "wb") as hlog:
            hap = subprocess.Popen([binary, "-db", "-f", str(cfg_path)], stdout=hlog, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL, cwd=work)
        await _wait_all_up(sock, [i.name for i in insts], UP_TIMEOUT_S, hap, work / "haproxy.log")
        log(f"scaleout: {opts.instances} instances ({', '.join(f'{i.name} :{i.port}' for i in insts)}) "
            f"behind HAProxy :{front_port}; {opts.calls} calls, one every {opts.spacing_s:g} s; "
            f"{drained.name} gets SIGTERM after call {opts.drain_after}; logs in {work}")
        obs, more = await asyncio.wait_for(
            _calls(opts, front_port, insts, drained, sock, fake, figures), opts.timeout_s)
        figures.update(more)
        failures = check(obs)
        before, after = split_by_drain(obs)
        figures["calls_before_drain"], figures["calls_after_drain"] = before, after
        figures["failures"] = failures
        passed = not failures
        return (0 if passed else 1), figures
    finally:   # in threads: the fake OpenAI server on this loop serves the instances meanwhile
        await asyncio.gather(*(asyncio.to_thread(stop_proc, p) for p in [hap, *(i.proc for i in insts)]))
        await fake.stop(timeout=3.0)
        if passed and not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


async def _calls(opts: Opts, front_port: int, insts: list[Instance], drained: Instance, sock: Path,
                 fake: FakeRealtimeServer, figures: dict[str, Any]) -> tuple[Observed, dict[str, Any]]:
    """Start the calls, SIGTERM the drained instance on the way, wait for everything to end;
    (what `check` judges, the figures). `figures` gets the active calls at the signal."""
    url = f"ws://127.0.0.1:{front_port}{BOT_PATH}"
    records: list[CallRecord] = []
    down: dict[str, Any] = {}
    stop_watch = asyncio.Event()
    loop = asyncio.get_running_loop()

    async def one(idx: int) -> None:
        caller = f"+1555{idx:07d}"
        wall = time.time()
        res = await run_call(CallerConfig(url=url, token=TOKEN, conversation_id=f"scaleout-{idx:03d}-{uuid.uuid4().hex[:8]}",
                                          caller=caller, formats=["raw/lpcm16_24"], script=list(SCRIPT),
                                          record_audio=False, accept_timeout_s=5.0))
        records.append(CallRecord.of(idx, caller, wall, res))

    t0 = loop.time()
    tasks: list[asyncio.Task[None]] = []
    probe_task = (asyncio.ensure_future(_probe(front_port, insts[0].port, PROBE_PINGS))
                  if opts.probe else None)
    watch: asyncio.Task[None] | None = None
    exiting: asyncio.Future[tuple[int | None, float | None]] | None = None
    t_signal = 0.0
    for idx in range(opts.calls):
        await asyncio.sleep(max(0.0, t0 + idx * opts.spacing_s - loop.time()))
        tasks.append(asyncio.ensure_future(one(idx)))
        if idx + 1 == opts.drain_after:
            if probe_task is not None:     # its connections are no calls: closed before the drain
                await asyncio.wait({probe_task}, timeout=PROBE_PINGS * 0.2)
            # half a spacing later, when no handshake of ours is in flight
            await asyncio.sleep(opts.spacing_s / 2)
            stats = {r["svname"]: r for r in await haproxy_stat(sock) if r.get("pxname") == BACKEND}
            figures["active_at_signal"] = {n: int(stats[n]["scur"]) for n in stats if n in {i.name for i in insts}}
            t_signal = time.monotonic()
            assert drained.proc is not None
            drained.proc.send_signal(signal.SIGTERM)
            watch = asyncio.ensure_future(_watch_down(sock, drained.name, t_signal, stop_watch, down))
            exiting = asyncio.ensure_future(wait_exit(drained.proc, DRAIN_TIMEOUT_S + 15))
    await asyncio.gather(*tasks)
    stop_watch.set()
    if watch is not None:
        await watch
    exit_status, exit_after_s = await exiting if exiting is not None else (None, None)
    probe = await asyncio.wait_for(probe_task, PROBE_PINGS * 0.2) if probe_task is not None else {}
    hrows = {r["svname"]: r for r in await haproxy_stat(sock) if r.get("pxname") == BACKEND}
    await fake.wait_closed_all(5.0)

    # a caller may be done a moment before its daemon has logged call.end: wait (bounded)
    end_by = time.monotonic() + LOG_WAIT_S
    while True:
        started_on, ends = call_logs(insts)
        if all(r.cid in ends for r in records) or time.monotonic() > end_by:
            break
        await asyncio.sleep(0.1)
    draining = drained.events("server.draining")
    drain_log = next(iter(drained.events("server.drained")), None)
    records.sort(key=lambda r: r.idx)
    obs = Observed(calls=records, instances=[i.name for i in insts], drained=drained.name,
                   draining_wall=_wall(draining[0].get("timestamp")) if draining else None,
                   started_on=started_on, ends=ends, fake=fake_sides(fake.sessions), drain_log=drain_log,
                   drained_exit=exit_status, expected_turns=SCRIPT_TURNS)
    turns = [t for r in records for t in r.turn_ms]
    return obs, {
        "drained": drained.name,
        "haproxy_down_after_s": down.get("down_after_s"),
        "haproxy_down_check": down.get("down_check"),
        "drain": {k: (drain_log or {}).get(k) for k in ("calls_at_signal", "drained", "ended_by_timeout", "drain_s")},
        "drained_exit_status": exit_status,
        "drained_exit_after_s": exit_after_s,
        "haproxy_sessions": {n: int(r.get("stot") or 0) for n, r in hrows.items() if n != "BACKEND"},
        "haproxy_retries": int((hrows.get("BACKEND") or {}).get("wretr") or 0),
        "haproxy_redispatches": int((hrows.get("BACKEND") or {}).get("wredis") or 0),
        "frames_up": sum(r.chunks_sent for r in records),
        "frames_down": sum(r.chunks_received for r in records),
        "bot_audio_s": round(sum(sum(r.received_ms) for r in records) / 1000, 1),
        "call_s_p50": pct([r.duration_s for r in records], 0.5),
        "turn_ms_p50": pct(turns, 0.5), "turn_ms_p95": pct(turns, 0.95), "turn_ms_max": pct(turns, 1.0),
        "probe": probe,
    }


def report(figures: dict[str, Any]) -> str:
    """The figures, readable."""
    f = figures
    lines = []
    if "calls_before_drain" in f:
        names = list(f["calls_before_drain"])
        lines.append("calls started per instance (call.start):")
        lines.append("  " + f"{'':14}" + "".join(f"{n:>8}" for n in names))
        for label, key in (("before drain", "calls_before_drain"), ("after drain", "calls_after_drain")):
            lines.append("  " + f"{label:14}" + "".join(f"{f[key][n]:>8}" for n in names))
        lines.append("  HAProxy sessions per server: " + ", ".join(f"{n} {v}" for n, v in f["haproxy_sessions"].items()))
    if "drain" in f:
        d = f["drain"]
        seen = (f"HAProxy's check saw {f.get('haproxy_down_check')} and took it out {f['haproxy_down_after_s']} s "
                "after SIGTERM" if f.get("haproxy_down_after_s") is not None
                else "HAProxy still had it UP when the last call ended")
        lines.append(f"drain of {f['drained']}: HAProxy sessions at SIGTERM {f.get('active_at_signal')}; {seen}; "
                     f"HAProxy retries {f.get('haproxy_retries')}, redispatches {f.get('haproxy_redispatches')} "
                     "(upgrades refused with 503 while draining, sent to another instance)")
        lines.append(f"  server.drained: calls_at_signal {d.get('calls_at_signal')}, drained {d.get('drained')}, "
                     f"ended_by_timeout {d.get('ended_by_timeout')}, drain_s {d.get('drain_s')}; "
                     f"exit {f.get('drained_exit_status')} after {f.get('drained_exit_after_s')} s")
        lines.append(f"frames: {f['frames_up']} caller frames up, {f['frames_down']} bot chunks down "
                     f"({f['bot_audio_s']} s of bot audio); call length p50 {f['call_s_p50']:.1f} s")
        lines.append(f"turn latency (caller speech end -> first bot audio, incl. 400 ms VAD silence and 150 ms "
                     f"fake think time): p50 {f['turn_ms_p50']:.0f} ms, p95 {f['turn_ms_p95']:.0f} ms, "
                     f"max {f['turn_ms_max']:.0f} ms")
        p = f.get("probe") or {}
        if p.get("added_rtt_p50_us") is not None:
            lines.append(f"websocket ping round trip ({p['pings']} each, alternated, during the calls): via HAProxy "
                         f"p50 {p['rtt_haproxy_p50_us']:.0f} us (p90 {p['rtt_haproxy_p90_us']:.0f}), direct "
                         f"p50 {p['rtt_direct_p50_us']:.0f} us (p90 {p['rtt_direct_p90_us']:.0f}): HAProxy adds "
                         f"{p['added_rtt_p50_us']:.0f} us per round trip")
    for x in f.get("failures", []):
        lines.append(f"FAIL {x}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.scaleout", description=__doc__.split("\n\n")[0])
    ap.add_argument("--instances", type=int, default=Opts.instances)
    ap.add_argument("--calls", type=int, default=Opts.calls)
    ap.add_argument("--spacing-s", type=float, default=Opts.spacing_s)
    ap.add_argument("--drain-after", type=int, default=Opts.drain_after)
    ap.add_argument("--timeout-s", type=float, default=Opts.timeout_s)
    ap.add_argument("--keep", action="store_true", help="keep the work directory (logs, haproxy.cfg)")
    ap.add_argument("--json", type=Path, help="also write the figures to this file")
    a = ap.parse_args(argv)
    opts = Opts(instances=a.instances, calls=a.calls, spacing_s=a.spacing_s, drain_after=a.drain_after,
                timeout_s=a.timeout_s, keep=a.keep)
    try:
        import uvloop
        status, figures = uvloop.run(run(opts))
    except SetupError as e:
        print(f"scaleout: cannot run: {e}", file=sys.stderr)
        return 2
    except (asyncio.TimeoutError, TimeoutError):
        print(f"scaleout: FAIL: the run did not end within {opts.timeout_s:g} s", file=sys.stderr)
        return 1
    print(report(figures))
    if a.json is not None:
        a.json.write_text(json.dumps(figures, indent=1, default=str) + "\n")
    print(f"scaleout: {'PASS' if status == 0 else 'FAIL'}"
          + ("" if status == 0 else f" (logs kept in {figures['work_dir']})"))
    return status


if __name__ == "__main__":
    sys.exit(main())
