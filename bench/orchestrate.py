"""Processes of a benchmark run: the bridge (CPU 0), the generator (CPU 1), relay_floor, py-spy.

One measured level = a fresh bridge process (so RSS per call is measured from its own idle
RSS) + one generator process; `run_level` returns the generator's JSON plus what is read from
the outside (idle RSS, RSS per call, the bridge's log, /health). `capacity` ramps calls up until
a level fails the budget. Every subprocess has a timeout and is stopped by its pid.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from .procstat import rss_kib

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "results"
TOKEN = "bench-token"
BRIDGE_CPU, GEN_CPU = 0, 1
LEAD_MS = 200              # audio.playout_lead_ms in the bridge's bench config (its default)
GEN_SATURATED_CPU_PCT = 85.0       # the generator is the bottleneck above this CPU ...
GEN_SATURATED_TICK_P99_US = 10_000.0   # ... or when its 1 ms send steps are this late (p99)
BRIDGE_SATURATED_CPU_PCT = 98.0
NOISY_STEAL_PCT = 5.0      # hypervisor steal (% of one core) above which a level is not trusted
LATE_FRACTION_MAX = 0.001  # caller frames reaching the fake > one frame period late, beyond direct's


@dataclass
class Opts:
    window_s: float = 8.0
    warmup_s: float = 1.0
    turn_s: float = 4.0
    response_ms: int = 2000
    think_ms: int = 100
    barge_every: int = 4
    budget_ms: float = 5.0
    pin: bool = True
    transport: str = "fast"          # the bridge's server.transport: "fast" or "websockets"
    bridge_dir: Path = field(default_factory=lambda: Path(os.environ.get("BENCH_BRIDGE_DIR", REPO)))
    log: Callable[[str], None] = print


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def can_pin() -> bool:
    try:
        return len(os.sched_getaffinity(0)) >= 2
    except AttributeError:
        return False


def pinned(cmd: list[str], cpu: int | None) -> tuple[list[str], Callable[[], None] | None]:
    """`taskset -c CPU cmd` where taskset exists, else sched_setaffinity in the child."""
    if cpu is None:
        return cmd, None
    if shutil.which("taskset"):
        return ["taskset", "-c", str(cpu), *cmd], None
    return cmd, lambda: os.sched_setaffinity(0, {cpu})


def stop_process(proc: subprocess.Popen, timeout_s: float = 10.0) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


# --------------------------------------------------------------------------- the bridge process
class Bridge:
    """`python -m voicebridge --config <tmp toml>` on CPU 0, with dummy secrets."""

    def __init__(self, opts: Opts, upstream_port: int) -> None:
        self.opts = opts
        self.port = free_port()
        self.upstream_port = upstream_port
        self.dir = Path(tempfile.mkdtemp(prefix="vb-bench-"))
        self.config = self.dir / "bench.toml"
        self.logfile = self.dir / "bridge.log"
        # a bridge with the hardening bounds has an admin listener for /health and a call cap;
        # an older checkout (an A/B against it) knows neither key and would refuse them
        src = (Path(opts.bridge_dir) / "voicebridge" / "config.py").read_text()
        self.admin_port = free_port() if "admin_port" in src else None
        bounded = (f'admin_port = {self.admin_port}\nmax_calls = 5000\n'
                   if self.admin_port is not None else "")
        self.config.write_text(
            f'[server]\nhost = "127.0.0.1"\nport = {self.port}\ntransport = "{opts.transport}"\n'
            f'{bounded}\n'
            f'[openai]\nurl = "ws://127.0.0.1:{upstream_port}/v1/realtime"\n\n'
            f'[audio]\nformat_preference = ["raw/lpcm16_24"]\nplayout_lead_ms = {LEAD_MS}\n\n'
            f'[log]\nlevel = "warning"\n')
        self.proc: subprocess.Popen | None = None
        self.rss_idle_kib = 0

    def start(self, timeout_s: float = 15.0) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEBRIDGE_")}
        env.update(VOICEBRIDGE_TOKEN=TOKEN, OPENAI_API_KEY="sk-bench-dummy", PYTHONUNBUFFERED="1")
        cmd, pre = pinned([sys.executable, "-m", "voicebridge", "--config", str(self.config)],
                          BRIDGE_CPU if self.opts.pin else None)
        self._log = open(self.logfile, "wb")
        self.proc = subprocess.Popen(cmd, cwd=self.opts.bridge_dir, env=env, stdout=self._log,
                                     stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     preexec_fn=pre)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"bridge exited with {self.proc.returncode}: {self.log_tail()}")
            try:
                if self.health() is not None:
                    time.sleep(0.3)           # let it settle before the idle RSS reading
                    self.rss_idle_kib = rss_kib(self.proc.pid)
                    return
            except OSError:
                pass
            time.sleep(0.1)
        raise RuntimeError(f"bridge /health not 200 within {timeout_s:g} s: {self.log_tail()}")

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def health(self) -> dict | None:
        port = self.admin_port if self.admin_port is not None else self.port
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as r:
            return json.loads(r.read()) if r.status == 200 else None

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.logfile.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log_lines(self) -> list[str]:
        try:
            return self.logfile.read_text(errors="replace").splitlines()
        except OSError:
            return []

    def stop(self) -> None:
        if self.proc is not None:
            stop_process(self.proc)
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# --------------------------------------------------------------------------- the generator process
def run_generator(opts: Opts, mode: str, calls: int, target_port: int, upstream_port: int,
                  bridge_pid: int = 0, path: str = "/voicebridge",
                  on_started: Callable[[subprocess.Popen], None] | None = None) -> dict:
    args = {"mode": mode, "calls": calls, "target-port": target_port, "upstream-port": upstream_port,
            "bridge-pid": bridge_pid, "path": path, "token": TOKEN, "warmup-s": opts.warmup_s,
            "window-s": opts.window_s, "turn-s": opts.turn_s, "response-ms": opts.response_ms,
            "think-ms": opts.think_ms, "barge-every": opts.barge_every, "lead-ms": LEAD_MS}
    cmd = [sys.executable, "-m", "bench.generator"]
    for k, v in args.items():
        cmd += [f"--{k}", str(v)]
    cmd, pre = pinned(cmd, GEN_CPU if opts.pin else None)
    timeout_s = 60 + calls * 0.1 + opts.warmup_s + opts.window_s + 40
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, preexec_fn=pre, text=True)
    if on_started is not None:
        on_started(proc)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate(timeout=10)
        return {"mode": mode, "calls": calls, "fatal": f"generator timed out after {timeout_s:.0f} s",
                "violations": {"generator_timeout": 1}, "stderr": err[-2000:]}
    lines = [ln for ln in out.splitlines() if ln.startswith("{")]
    if not lines:
        return {"mode": mode, "calls": calls, "fatal": f"generator exit {proc.returncode}, no result",
                "violations": {"generator_failed": 1}, "stderr": err[-2000:]}
    res = json.loads(lines[-1])
    if err.strip():
        res["stderr"] = err[-2000:]
    return res


def run_level(opts: Opts, mode: str, calls: int,
              on_started: Callable[[subprocess.Popen, int], None] | None = None) -> dict:
    """One measured level: `direct` (callers -> fake) or `bridge` (callers -> voicebridge -> fake)."""
    t0 = time.monotonic()
    up_port = free_port()
    if mode == "direct":
        res = run_generator(opts, "direct", calls, up_port, up_port, path="/v1/realtime")
    else:
        bridge = Bridge(opts, up_port)
        try:
            try:
                bridge.start()
            except RuntimeError as e:
                return {"mode": "bridge", "calls": calls, "fatal": str(e)[:1500],
                        "violations": {"bridge_start_failed": 1}, "error_lines": [str(e)[:300]],
                        "elapsed_s": round(time.monotonic() - t0, 1)}
            cb = (lambda proc: on_started(proc, bridge.pid)) if on_started else None
            res = run_generator(opts, "bridge", calls, bridge.port, up_port, bridge.pid, on_started=cb)
            try:
                h = bridge.health()
                if isinstance(h, dict) and "latency_us" in h:
                    res["bridge_health_latency_us"] = h["latency_us"]
            except OSError as e:   # e.g. still busy with an overload backlog; a crash shows in the exit code
                res["health_after_run_error"] = str(e)[:200]
            res["bridge_rss_idle_kib"] = bridge.rss_idle_kib
            rss = res.get("bridge_rss_kib")
            if rss:
                res["rss_per_call_kib"] = round((rss - bridge.rss_idle_kib) / calls, 1)
            lines = bridge.log_lines()
            res["bridge_log_lines"] = len(lines)
            res["bridge_log_head"] = lines[:8]
        finally:
            bridge.stop()
        if bridge.proc is not None and bridge.proc.returncode not in (0, -signal.SIGTERM):
            res.setdefault("violations", {})["bridge_exit_code"] = bridge.proc.returncode
    res["elapsed_s"] = round(time.monotonic() - t0, 1)
    return res


# --------------------------------------------------------------------------- verdicts
def verdict(res: dict, direct: dict | None, budget_ms: float) -> dict:
    """Does this bridge level meet the budget? Also: was the generator the bottleneck?"""
    reasons: list[str] = []
    if res.get("fatal"):
        reasons.append(res["fatal"])
    if res.get("aborted"):
        reasons.append(res["aborted"])
    if res.get("drain") == "cut":
        reasons.append(f"backlog: {res.get('undelivered_at_cut')} frames still in flight "
                       f"{res.get('drain_s')} s after the window")
    if res.get("violations"):
        reasons.append("violations: " + ", ".join(f"{k}={v}" for k, v in res["violations"].items()))
    budget_us = budget_ms * 1000
    for d in ("up", "down"):
        b = (res.get(f"{d}_us") or {}).get("p99")
        base = ((direct or {}).get(f"{d}_us") or {}).get("p99") or 0.0   # no baseline: judge raw
        if b is None:
            reasons.append(f"no {d} samples")
        elif b - base > budget_us:
            reasons.append(f"added {d} p99 {(b - base) / 1000:.2f} ms > {budget_ms:g} ms")
    n = res.get("window_up_frames") or 0
    late = res.get("late_up_frames") or 0
    base_n = (direct or {}).get("window_up_frames") or 0
    base = ((direct or {}).get("late_up_frames") or 0) / base_n if base_n else 0.0
    if n and late / n - base > LATE_FRACTION_MAX:   # the platform's own lateness is the baseline's
        reasons.append(f"{late} of {n} caller frames > 20 ms late ({100 * late / n:.2f} %, "
                       f"direct {100 * base:.2f} %)")
    cpu = res.get("bridge_cpu_pct")
    if cpu is not None and cpu >= BRIDGE_SATURATED_CPU_PCT:
        reasons.append(f"bridge CPU {cpu:.0f} % (saturated)")
    steal = steal_pct(res)
    noisy = steal is not None and steal > NOISY_STEAL_PCT
    if direct is not None and (steal_pct(direct) or 0) > NOISY_STEAL_PCT:
        noisy = True
    gen_bound, note = generator_saturated(res)
    if direct is not None and generator_saturated(direct)[0]:
        note = (note + "; " if note else "") + f"its direct baseline ({direct['calls']} calls) was generator-bound"
    return {"pass": not reasons, "reasons": reasons, "generator_saturated": gen_bound,
            "generator_note": note, "noisy": noisy,
            "noise_note": (f"hypervisor steal {steal:.0f} % of a core (direct "
                           f"{steal_pct(direct) if direct else '-'} %)" if noisy else "")}


def steal_pct(res: dict | None) -> float | None:
    """CPU the hypervisor took from this VM during the window, in % of one core."""
    return ((res or {}).get("machine_cpu_pct") or {}).get("steal")


def generator_saturated(res: dict) -> tuple[bool, str]:
    """The generator limits the level: its CPU is near a full core, or (without hypervisor
    steal to blame) its 1 ms send steps fall behind."""
    gen_cpu = res.get("gen_cpu_pct") or 0
    tick99 = (res.get("gen_tick_late_us") or {}).get("p99") or 0
    stolen = (steal_pct(res) or 0) > NOISY_STEAL_PCT
    if gen_cpu >= GEN_SATURATED_CPU_PCT or (tick99 > GEN_SATURATED_TICK_P99_US and not stolen):
        return True, f"generator CPU {gen_cpu:.0f} %, its 1 ms send steps late by {tick99 / 1000:.1f} ms (p99)"
    return False, ""


def nearest(direct: dict[int, dict], calls: int) -> dict | None:
    """The direct baseline to subtract: the largest level <= calls (a lighter-loaded generator
    has lower latency, so the bridge's added latency is, if anything, overstated); if there is
    none, the smallest level above (then the added latency may be understated)."""
    if not direct:
        return None
    below = [d for d in direct if d <= calls]
    return direct[max(below)] if below else direct[min(direct)]


# --------------------------------------------------------------------------- transport floor
FLOOR_VARIANTS = ("websockets", "sansio", "picows")


def relay_floor_path() -> Path:
    """The floor relay shipped with the bench (bench/relay_floor.py)."""
    return REPO / "bench" / "relay_floor.py"


def run_relay_floor(calls: int, seconds: float, log: Callable[[str], None], *,
                    variants: tuple[str, ...] = FLOOR_VARIANTS, warmup_s: float | None = None,
                    grace_s: float | None = None, pin: bool = True) -> dict:
    """bench/relay_floor.py at `calls` calls for `seconds` per variant: {"cmd", "script", "rows",
    "elapsed_s", "stderr"}; a variant it cannot run (picows missing) is a row with "skipped"."""
    path = relay_floor_path()
    if not path.exists():
        log(f"relay_floor: {path} not found, skipped")
        return {"skipped": f"{path} not found"}
    cmd = [sys.executable, str(path), "--variants", ",".join(variants), "--calls", str(calls),
           "--seconds", str(seconds)]
    if warmup_s is not None:
        cmd += ["--warmup-s", str(warmup_s)]
    if grace_s is not None:
        cmd += ["--grace-s", str(grace_s)]
    if not pin:
        cmd.append("--no-pin")
    t0 = time.monotonic()
    try:
        out = subprocess.run(cmd, capture_output=True, text=True,
                             timeout=len(variants) * (seconds + (grace_s or 0) + 90), cwd=REPO,
                             stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return {"skipped": "relay_floor timed out"}
    rows = []
    for ln in out.stdout.splitlines():
        if ln.startswith("{"):
            try:
                rows.append(json.loads(ln))
            except ValueError:
                pass
    for r in rows:
        if r.get("skipped"):
            log(f"relay_floor: {r.get('variant')}: {r['skipped']}")
    return {"cmd": " ".join(cmd[1:]), "script": str(path.relative_to(REPO)), "rows": rows,
            "elapsed_s": round(time.monotonic() - t0, 1),
            "stderr": out.stderr[-500:] if out.returncode else ""}


# --------------------------------------------------------------------------- py-spy
def py_spy_path() -> str | None:
    p = Path(sys.executable).with_name("py-spy")
    return str(p) if p.exists() else shutil.which("py-spy")


def start_profiler(pid: int, duration_s: int, out: Path, delay_s: float) -> subprocess.Popen | None:
    exe = py_spy_path()
    if exe is None:
        return None
    # wait for setup + warm-up so the samples fall into the measurement window
    cmd = ["sh", "-c", f'sleep {delay_s:.1f}; exec "$0" "$@"', exe, "record", "--pid", str(pid),
           "--duration", str(duration_s), "--rate", "200", "--format", "raw", "--output", str(out),
           "--nonblocking"]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL)


# --------------------------------------------------------------------------- capacity search
def capacity_search(levels: list[dict], run_bridge: Callable[[int], dict], candidates: list[int],
                    time_left: Callable[[], float], log: Callable[[str], None],
                    resolution: int = 25) -> dict:
    """Ramp up through `candidates` until a level fails, then bisect between the last passing
    and the first failing level down to max(`resolution`, 10 %) calls, while time allows. Capacity = the
    highest passing level below the first failing one (the bridge runs on one core, so that is
    calls per core)."""

    def state() -> tuple[int | None, dict | None]:
        ordered = sorted(levels, key=lambda r: r["calls"])
        fail = next((r for r in ordered if not r["verdict"]["pass"]), None)
        ok = [r["calls"] for r in ordered
              if r["verdict"]["pass"] and (fail is None or r["calls"] < fail["calls"])]
        return (max(ok) if ok else None), fail

    def affordable(calls: int) -> bool:
        est = 1.3 * max((r.get("elapsed_s") or 10) for r in levels) if levels else 15.0
        if time_left() >= est:
            return True
        log(f"  capacity search stopped before {calls} calls: quick-mode time budget (use --full)")
        return False

    stopped_by_time = False
    last_pass, first_fail = state()
    if first_fail is None:
        for calls in candidates:
            if any(r["calls"] == calls for r in levels) or calls < (last_pass or 0):
                continue
            if not affordable(calls):
                stopped_by_time = True
                break
            if not run_bridge(calls)["verdict"]["pass"]:
                break
        last_pass, first_fail = state()
    while first_fail is not None and not stopped_by_time:
        lo = last_pass or 0
        step = max(resolution, int(first_fail["calls"] * 0.1) // resolution * resolution)
        if first_fail["calls"] - lo <= step:
            break
        mid = int(round((lo + first_fail["calls"]) / 2 / resolution) * resolution)
        if not lo < mid < first_fail["calls"] or any(r["calls"] == mid for r in levels):
            break
        if not affordable(mid):
            stopped_by_time = True
            break
        run_bridge(mid)
        last_pass, first_fail = state()
    out: dict[str, Any] = {"calls_per_core": last_pass, "lower_bound": first_fail is None,
                           "stopped_by_time": stopped_by_time, "resolution": resolution,
                           "first_failing_calls": first_fail["calls"] if first_fail else None,
                           "first_failure": first_fail["verdict"]["reasons"] if first_fail else None}
    if first_fail is not None and first_fail["verdict"].get("noisy"):
        out["noisy"] = ("the first failing level ran under " + first_fail["verdict"]["noise_note"]
                        + ": the machine, not only the bridge, may have failed it")
    if first_fail is not None and first_fail["verdict"].get("generator_saturated"):
        out["inconclusive"] = ("the generator saturated at the first failing level ("
                               + first_fail["verdict"]["generator_note"] + "): capacity is a lower bound")
        out["lower_bound"] = True
    return out
