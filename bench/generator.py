"""The load generator process: N simulated callers AND the fake upstream, in one picows loop.

    python -m bench.generator --mode bridge --calls 300 --target-port P --upstream-port U \
        --bridge-pid PID --window-s 8

Phases, each bounded in time: fake upstream listening -> callers connect and handshake
(bounded concurrency) -> streaming starts -> warm-up -> measurement window (latency samples
are kept only for frames stamped inside it; CPU of the bridge and of this process and the
bridge's RSS are read at its edges) -> callers stop sending, no new turns, drain until every
frame that must arrive has arrived (or no progress) -> every call ends with userStream.stop,
session.end and a close. Prints one JSON line with the results.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, fields

from picows import ws_create_server

from .gen_caller import Ticker, conversation_id, end_call, setup_call
from .gen_state import CallState, Params, Run
from .gen_upstream import FakeUpstream
from .percentiles import summarize
from .procstat import cpu_seconds, pin, rss_kib, system_cpu
from .stream_check import VIOLATION_KEYS, merge

OVERLOAD_ABORT_NS = 1_000_000_000   # a frame 1 s late: the level has failed, stop its window early
DRAIN_STALL_S = 3.0
TIMELY_NS = 50_000_000              # max down latency below which the barge-in checks are strict


def _settle_unstopped(run: Run, calls: list[CallState]) -> int:
    """Barge-ins whose playStream.stop never came: their undelivered deltas count as dropped."""
    n = 0
    for cs in calls:
        if cs.barge_ns:
            n += 1
            run.barge_dropped += cs.down.settle(cs.barge_lo, cs.barge_hi)
            cs.barge_ns = 0
    return n


def _drained(run: Run, calls: list[CallState]) -> bool:
    for cs in calls:
        if cs.up.outstanding() or cs.down.outstanding() or cs.resp_active or cs.barge_ns:
            return False
        if run.p.mode == "bridge" and cs.truncates_ok < cs.barges:
            return False
    return True


def _progress(calls: list[CallState]) -> int:
    return sum(cs.up.ok + cs.down.ok + cs.truncates_ok for cs in calls)


async def generate(p: Params) -> dict:
    run = Run(p)
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, ctx: run.error(
        "loop_exception", f"{ctx.get('message')}: {ctx.get('exception')!r}"))
    t_begin = time.monotonic()
    calls = [CallState(i, conversation_id(i)) for i in range(p.calls)]
    server = await ws_create_server(lambda req: FakeUpstream(run, calls, req), "127.0.0.1",
                                    p.upstream_port, max_frame_size=16 * 2**20)
    url = f"ws://127.0.0.1:{p.target_port}{p.path}"
    sem = asyncio.Semaphore(p.connect_concurrency)
    setup_failed = 0

    async def one(cs: CallState) -> None:
        nonlocal setup_failed
        async with sem:
            try:
                await setup_call(run, cs, url)
            except Exception as e:  # counted and reported; the run fails
                setup_failed += 1
                run.error("setup_failed", f"call {cs.idx}: {type(e).__name__}: {e}")
                cs.caller_closed = True

    await asyncio.wait_for(asyncio.gather(*(one(cs) for cs in calls)), 60 + p.calls * 0.1)
    setup_s = time.monotonic() - t_begin

    ticker = Ticker(run, [cs for cs in calls])
    max_stream_s = p.warmup_s + p.window_s + 5.0
    tick_task = asyncio.ensure_future(ticker.run_until_stopped(max_stream_s))

    await asyncio.sleep(p.warmup_s)
    # ---- measurement window
    pid = p.bridge_pid
    c0 = cpu_seconds(pid) if pid else 0.0
    g0 = time.process_time()
    sys0 = system_cpu()
    t0 = time.perf_counter_ns()
    run.w0, run.w1 = t0, t0 + int(p.window_s * 1e9)
    rss_max = 0
    end = loop.time() + p.window_s
    aborted = ""
    while loop.time() < end - 0.5:
        await asyncio.sleep(0.5)
        if pid:
            rss_max = max(rss_max, rss_kib(pid))
        worst = max(run.up_lat[-1] if run.up_lat else 0, run.down_lat[-1] if run.down_lat else 0)
        if worst > OVERLOAD_ABORT_NS:   # hopelessly behind: stop early, the level has failed
            aborted = f"overload: a frame took {worst / 1e9:.1f} s; window cut at {loop.time() - end + p.window_s:.1f} s"
            break
    if not aborted:
        await asyncio.sleep(max(0.0, end - loop.time()))
    run.w1 = min(run.w1, time.perf_counter_ns())
    wall = (time.perf_counter_ns() - t0) / 1e9
    bridge_cpu = (cpu_seconds(pid) - c0) / wall if pid else None
    gen_cpu = (time.process_time() - g0) / wall
    sys1 = system_cpu()
    machine = {k: round(100 * (sys1[k] - sys0.get(k, 0.0)) / wall, 1) for k in sys1}
    # everything else on the machine: other processes, and kernel work not charged to ours
    machine["other"] = round(machine.get("busy", 0.0) - 100 * ((bridge_cpu or 0.0) + gen_cpu), 1)
    rss_end = rss_kib(pid) if pid else None
    if pid:
        rss_max = max(rss_max, rss_end or 0)
    # ---- stop sending, drain
    run.callers_stop = True
    run.turns_stop = True
    for cs in calls:
        if cs.turn_driver is not None:
            cs.turn_driver.finish_now()
    await asyncio.wait_for(tick_task, 5.0)
    t_drain = loop.time()
    last, last_change = -1, loop.time()
    drain = "complete"
    while not _drained(run, calls):
        now = loop.time()
        prog = _progress(calls)
        if prog != last:
            last, last_change = prog, now
        if now - last_change > DRAIN_STALL_S:
            drain = "stalled"     # nothing arrives any more: what is still missing is lost
            break
        if now - t_drain > p.drain_max_s:
            drain = "cut"         # still arriving: a backlog (overload), not a loss
            break
        await asyncio.sleep(0.05)
    drain_s = loop.time() - t_drain
    for cs in calls:
        if cs.turn_driver is not None:
            cs.turn_driver.stop()
    # ---- end every call (bounded)
    if drain == "cut":
        for cs in calls:         # the bridge is seconds behind: a graceful end would not finish
            cs.ending = True
            if cs.caller_tr is not None:
                cs.caller_tr.disconnect()
    else:
        await asyncio.gather(*(end_call(run, cs) for cs in calls if not cs.caller_closed))
        deadline = loop.time() + 3.0
        while loop.time() < deadline and not all(cs.upstream_closed for cs in calls if cs.upstream_tr):
            await asyncio.sleep(0.05)
        not_closed = sum(1 for cs in calls if cs.upstream_tr is not None and not cs.upstream_closed)
        if not_closed:
            run.error("upstream_not_closed", f"{not_closed} upstream sockets still open 3 s after session.end")
    server.close()
    # ---- results
    unstopped = _settle_unstopped(run, calls)
    up = merge([cs.up for cs in calls])
    down = merge([cs.down for cs in calls])
    undelivered = 0
    if drain == "cut":           # not lost: still on their way when the drain was cut
        undelivered = up["lost"] + down["lost"]
        up["lost"] = down["lost"] = 0
    # Barge-in checks that hold only while the bridge is timely. Every delta got through in
    # < 50 ms: then none can have been held back for pacing (that needs a 60 ms swing, see
    # gen_upstream) and the prompt was still playing when speech_started reached the bridge
    # (>= 110 ms of slack), so every barge-in must give playStream.stop + a truncate and drop
    # nothing. Slower than that (overload), the bridge may legitimately drop held audio or find
    # the prompt finished: reported under "timing_dependent", not judged.
    truncates = sum(cs.truncates_ok for cs in calls) if p.mode == "bridge" else None
    checks = {}
    if truncates is not None and truncates < run.barges_sent:
        checks["truncate_missing"] = f"{run.barges_sent - truncates} barge-ins without a valid truncate"
    if unstopped:
        checks["barge_in_not_stopped"] = f"{unstopped} barge-ins without playStream.stop"
    if run.barge_dropped:
        checks["down_dropped_at_barge_in"] = (f"{run.barge_dropped} deltas sent before speech_started "
                                              "never reached the caller")
    timely = run.down_max_ns < TIMELY_NS
    timing_dependent = {}
    for k, v in checks.items():
        if timely and drain != "cut":
            run.error(k, f"{v} (max down latency {run.down_max_ns / 1e6:.1f} ms)")
        else:
            timing_dependent[k] = v
    violations = {f"up_{k}": up[k] for k in VIOLATION_KEYS if up[k]}
    violations.update({f"down_{k}": down[k] for k in VIOLATION_KEYS if down[k]})
    for k, v in run.errors.items():
        if k not in ("up_corrupt", "down_corrupt"):
            violations[k] = v
    tick = summarize(run.tick_late)
    return {
        "mode": p.mode, "calls": p.calls, "window_s": round(wall, 2), "setup_s": round(setup_s, 2),
        "drain_s": round(drain_s, 2), "drain": drain, "undelivered_at_cut": undelivered,
        "aborted": aborted, "setup_failed": setup_failed,
        "up_us": summarize(run.up_lat), "down_us": summarize(run.down_lat),
        "turn_us": summarize(run.turn_lat), "barge_us": summarize(run.barge_lat),
        "barge_speech_us": summarize(run.barge_speech_lat),
        "gen_tick_late_us": tick,
        "up_counts": up, "down_counts": down,
        "window_up_frames": run.window_up_frames, "window_down_frames": run.window_down_frames,
        "late_up_frames": run.late_up_frames,
        "turns": run.turns_started, "responses_done": run.responses_done,
        "barge_dropped": run.barge_dropped, "timing_dependent": timing_dependent, "down_max_all_us": round(run.down_max_ns / 1000, 1),
        "barges_sent": run.barges_sent, "barges_stopped": run.barges_stopped, "truncates_ok": truncates,
        "bridge_cpu_pct": round(100 * bridge_cpu, 1) if bridge_cpu is not None else None,
        "gen_cpu_pct": round(100 * gen_cpu, 1),
        "machine_cpu_pct": machine,
        "bridge_rss_kib": rss_end, "bridge_rss_max_kib": rss_max or None,
        "violations": violations, "error_lines": run.error_lines, "counters": run.counters,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.generator")
    for f in fields(Params):
        flag = "--" + f.name.replace("_", "-")
        ap.add_argument(flag, type=type(f.default), default=f.default)
    ap.add_argument("--cpu", type=int, default=-1, help="pin to this CPU (-1: no pinning)")
    a = ap.parse_args(argv)
    if a.cpu >= 0:
        pin(a.cpu)
    p = Params(**{f.name: getattr(a, f.name) for f in fields(Params)})
    import uvloop
    try:
        res = uvloop.run(generate(p))
    except Exception as e:  # one JSON line either way, so the orchestrator can report it
        res = {"mode": p.mode, "calls": p.calls, "fatal": f"{type(e).__name__}: {e}"[:500],
               "violations": {"generator_failed": 1}}
    res["params"] = asdict(p)
    sys.stdout.write(json.dumps(res) + "\n")
    sys.stdout.flush()
    os._exit(0)   # skip interpreter teardown of thousands of sockets


if __name__ == "__main__":
    sys.exit(main())
