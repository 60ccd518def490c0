"""`make bench` / `python -m bench`: end-to-end load benchmark of voicebridge on this machine.

Quick mode (default, ~2 minutes): relay_floor at 300 calls; direct baseline at 300 calls;
bridge at 100 and 300 calls (8 s windows); a short capacity ramp (5 s windows).
--full: 30 s windows, a direct baseline at every level, a ramp in steps of 100 up to the
first failing level. Exit code 1 when any frame was lost, duplicated, reordered, corrupted or
leaked, or any protocol check failed. See bench/README.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

from voicebridge.transport import TRANSPORTS

from . import orchestrate as orch
from . import report
from .percentiles import added
from .profile import top


def _machine() -> dict:
    model = ""
    try:
        for ln in Path("/proc/cpuinfo").read_text().splitlines():
            if ln.startswith("model name"):
                model = ln.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        rev = subprocess.run(["git", "-C", str(orch.REPO), "rev-parse", "--short", "HEAD"],
                             capture_output=True, text=True, timeout=5).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(orch.REPO), "status", "--porcelain", "voicebridge"],
                                    capture_output=True, text=True, timeout=5).stdout.strip())
    except (OSError, subprocess.SubprocessError):
        rev, dirty = "", False
    return {"cpu": model, "cpus": os.cpu_count(), "python": platform.python_version(),
            "kernel": platform.release(), "git": rev + ("+dirty" if dirty else ""),
            "bridge_dir": str(Path(os.environ.get("BENCH_BRIDGE_DIR", orch.REPO)))}


def _levels(text: str) -> list[int]:
    return sorted({int(x) for x in text.split(",") if x.strip()})


SATURATED_CPU_PCT = 85.0


def _floor_derived(floor: dict) -> None:
    """Per relay_floor row: CPU per call, CPU µs per relayed frame, calls/core it sustains."""
    for r in floor.get("rows") or []:
        if "error" in r or not r.get("relay_cpu_pct") or not r.get("calls") or not r.get("frames"):
            continue
        frames_s = 2 * r["frames"] / (r.get("wall_s") or 1)       # each round trip = 2 relayed frames
        us_frame = r["relay_cpu_pct"] / 100 * 1e6 / frames_s
        r["_derived"] = {"cpu_pct_per_call": round(r["relay_cpu_pct"] / r["calls"], 4),
                         "cpu_us_per_frame": round(us_frame, 2),
                         "calls_per_core": round(1e6 / (us_frame * 100)),   # 100 frames/s per call
                         "saturated": r["relay_cpu_pct"] >= SATURATED_CPU_PCT or (r.get("lost") or 0) > 0
                         or (r.get("p50_us") or 0) > 20_000}


def _vb_cost(lv: dict) -> dict:
    w = lv["window_s"]
    frames_s = (lv["window_up_frames"] + lv["window_down_frames"]) / w
    per_call_frames = frames_s / lv["calls"]
    us_frame = lv["bridge_cpu_pct"] / 100 * 1e6 / frames_s if frames_s else None
    return {"calls": lv["calls"], "cpu_pct": lv["bridge_cpu_pct"],
            "cpu_pct_per_call": round(lv["bridge_cpu_pct"] / lv["calls"], 4),
            "cpu_us_per_frame": round(us_frame, 2) if us_frame else None,
            "frames_per_call_s": round(per_call_frames, 1),
            "down_frames_per_call_s": lv["window_down_frames"] / w / lv["calls"],
            "calls_per_core": round(1e6 / (us_frame * per_call_frames)) if us_frame else None,
            "saturated": lv["bridge_cpu_pct"] >= SATURATED_CPU_PCT or bool(lv.get("aborted"))}


def _comparison(res: dict) -> dict:
    """voicebridge against the floors: at the floors' own load (300 calls) and, for the cost per
    frame outside saturation, at voicebridge's highest level below 85 % CPU."""
    measured = [r for r in res["levels"] if r.get("bridge_cpu_pct") and r.get("window_up_frames")]
    if not measured:
        return {}
    floor_calls = next((r["calls"] for r in (res.get("floor") or {}).get("rows") or [] if "calls" in r), 300)
    same = next((r for r in measured if r["calls"] == floor_calls), None)
    light = [r for r in measured if r["bridge_cpu_pct"] < SATURATED_CPU_PCT and not r.get("aborted")]
    out: dict = {"voicebridge": _vb_cost(same) if same else None,
                 "voicebridge_unsaturated": _vb_cost(max(light, key=lambda r: r["calls"])) if light else None}
    vb = out["voicebridge"]
    cap = (res.get("capacity") or {}).get("calls_per_core")
    ratios = {}
    for r in (res.get("floor") or {}).get("rows") or []:
        d = r.get("_derived")
        if not d or not vb or not vb["cpu_us_per_frame"]:
            continue
        ratios[r["variant"]] = {
            "cpu_per_call": vb["cpu_pct_per_call"] / d["cpu_pct_per_call"],
            "cpu_per_frame": vb["cpu_us_per_frame"] / d["cpu_us_per_frame"],
            "capacity": vb["calls_per_core"] / d["calls_per_core"],
            "measured_capacity": (cap / d["calls_per_core"]) if cap else None}
    out["ratios"] = ratios
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full", action="store_true", help="30 s windows, direct baseline per level, ramp in steps of 100")
    ap.add_argument("--budget-ms", type=float, default=5.0, help="added p99 budget per direction (default 5)")
    ap.add_argument("--profile", action="store_true", help="py-spy the bridge during an extra 300-call run")
    ap.add_argument("--levels", help="bridge levels of the table, e.g. 100,300 (default: 100,300; --full: the ramp)")
    ap.add_argument("--seconds", type=float, help="measurement window per level (default 8; --full 30)")
    ap.add_argument("--no-floor", action="store_true", help="skip relay_floor.py")
    ap.add_argument("--no-ramp", action="store_true", help="skip the capacity ramp")
    ap.add_argument("--transport", default="picows", choices=sorted(TRANSPORTS),
                    help="the bridge's server.transport (default picows, the daemon's default)")
    ap.add_argument("--profile-calls", type=int, default=300, help="calls during the profiled run (default 300)")
    ap.add_argument("--ab", metavar="DIR[,DIR...]", help="A/B only: the bridge of each older checkout "
                    "(A, B, ...) against this tree (the last letter), alternating, at --levels (default "
                    "100,200); e.g. DIR = a git worktree of an earlier commit; DIR@NAME runs that "
                    "checkout on server.transport NAME (e.g. --ab .@fast --transport picows)")
    ap.add_argument("--rounds", type=int, default=2, help="--ab: runs per variant and level (default 2)")
    ap.add_argument("--soak", action="store_true", help="soak only: set up and tear down --soak-calls calls "
                    "(normal ends, caller drops, OpenAI drops) and check the daemon's fds, tasks, active "
                    "calls and RSS return to their start (see bench/soak.py)")
    ap.add_argument("--soak-calls", type=int, default=5000, help="--soak: measured calls (default 5000)")
    ap.add_argument("--soak-concurrency", type=int, default=50, help="--soak: calls at once (default 50)")
    ap.add_argument("--soak-rss-tolerance-kib", type=int, default=None,
                    help="--soak: RSS may end this far above its start (default 4096)")
    ap.add_argument("--soak-warmup", type=int, default=None, help="--soak: warm-up calls before the start "
                    "reading (default: half of --soak-calls, 100 .. 2500)")
    ap.add_argument("--soak-results-dir", type=Path, default=None, help="--soak: where the JSON goes "
                    "(default bench/results)")
    ap.add_argument("--churn", action="store_true", help="churn only: at --churn-calls streaming calls, "
                    "--churn-rate new calls per second for --churn-seconds, alternating with steady rounds: "
                    "does call setup disturb the calls already up? (see bench/churn_run.py)")
    ap.add_argument("--churn-calls", type=int, default=300, help="--churn: streaming calls (default 300)")
    ap.add_argument("--churn-rate", type=float, default=50.0, help="--churn: new calls per second (default 50)")
    ap.add_argument("--churn-seconds", type=float, default=10.0, help="--churn: how long (default 10)")
    a = ap.parse_args(argv)
    if a.soak and (a.soak_calls < 1 or a.soak_concurrency < 1 or (a.soak_warmup or 0) < 0):
        ap.error("--soak-calls and --soak-concurrency must be at least 1, --soak-warmup at least 0")

    t_start = time.monotonic()
    quick_deadline = t_start + 100.0   # no new level starts after this (make bench <= 2 min)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    window = a.seconds or (30.0 if a.full else 8.0)
    ramp_window = window if a.full else min(window, 5.0)
    pin = orch.can_pin()
    opts = orch.Opts(window_s=window, warmup_s=2.0 if a.full else 1.0, budget_ms=a.budget_ms, pin=pin,
                     transport=a.transport)
    say = lambda s: print(s, flush=True)
    res: dict = {"timestamp": stamp, "mode": "soak" if a.soak else "full" if a.full else "quick", "budget_ms": a.budget_ms,
                 "machine": _machine(), "window_s": window, "ramp_window_s": ramp_window,
                 "pinned": pin, "levels": [], "direct": [], "targets": report.TARGETS,
                 "traffic": {"frame_ms": 20, "payload_bytes": 960, "format": "raw/lpcm16_24 <-> audio/pcm",
                             "turn_s": opts.turn_s, "think_ms": opts.think_ms,
                             "response_ms": opts.response_ms, "barge_every": opts.barge_every,
                             "lead_ms": orch.LEAD_MS, "late_deltas_after_barge_in": 1}}
    m = res["machine"]
    say(f"voicebridge bench ({res['mode']}) on {m['cpus']} CPUs ({m['cpu']}), python {m['python']}, "
        f"git {m['git']}; bridge on CPU {orch.BRIDGE_CPU}, generator on CPU {orch.GEN_CPU}"
        + ("" if pin else "  [NOT PINNED: fewer than 2 CPUs available, numbers are not comparable]"))

    if a.soak:
        from . import soak
        sopts = soak.SoakOpts(calls=a.soak_calls, concurrency=a.soak_concurrency, transport=a.transport,
                              pin=pin, results_dir=a.soak_results_dir or orch.RESULTS,
                              warmup_calls=a.soak_warmup)
        if a.soak_rss_tolerance_kib is not None:
            sopts.rss_tolerance_kib = a.soak_rss_tolerance_kib
        return 0 if soak.run(sopts, say, stamp, m)["pass"] else 1

    if a.churn:
        from . import churn_run
        res["churn"] = churn_run.run(opts, a.churn_calls, a.churn_rate, a.churn_seconds, a.rounds, say)
        say("")
        say(churn_run.table(res["churn"]))
        say(f"results: {report.write_json(res, orch.RESULTS, stamp)}")
        return 0 if res["churn"]["pass"] else 1

    if a.ab:
        from . import ab
        levels = _levels(a.levels) if a.levels else [100, 200]
        say(f"A/B: {a.ab} vs this tree, levels {levels}, {a.rounds} rounds, {window:g} s windows")
        res["ab"] = ab.run_ab(opts, [Path(d).resolve() for d in a.ab.split(",")], levels, a.rounds, say)
        res["elapsed_s"] = round(time.monotonic() - t_start, 1)
        say("")
        say(ab.table(res["ab"]))
        say(f"results: {report.write_json(res, orch.RESULTS, stamp)}")
        return 1 if any(lv["violations"] for lv in res["ab"]["levels"].values()) else 0

    # ---- transport floor (first, on a quiet machine)
    if not a.no_floor:
        say(f"relay_floor ({orch.relay_floor_path().relative_to(orch.REPO)}): websockets, sansio, picows relays "
            "at 300 calls ...")
        res["floor"] = orch.run_relay_floor(300, 10 if a.full else 5, say, pin=pin)
        _floor_derived(res["floor"])

    direct: dict[int, dict] = {}

    def run_direct(calls: int, w: float) -> dict:
        r = orch.run_level(replace(opts, window_s=w), "direct", calls)
        r["generator_saturated"], r["generator_note"] = orch.generator_saturated(r)
        direct[calls] = r
        res["direct"].append(r)
        say(f"  direct {calls:>5} calls: up p50/p99 {r.get('up_us', {}).get('p50')}/{r.get('up_us', {}).get('p99')} µs, "
            f"down {r.get('down_us', {}).get('p50')}/{r.get('down_us', {}).get('p99')} µs, gen CPU {r.get('gen_cpu_pct')} %, "
            f"steal {orch.steal_pct(r)} %"
            + (f"  VIOLATIONS {r['violations']}" if r.get("violations") else ""))
        return r

    def run_bridge(calls: int, phase: str, w: float) -> dict:
        if calls not in direct and (a.full or (direct and calls < min(direct))):
            run_direct(calls, w if a.full else min(w, 5.0))   # quick: only below the lowest baseline
        d = orch.nearest(direct, calls)
        for attempt in (1, 2):
            r = orch.run_level(replace(opts, window_s=w), "bridge", calls)
            r["phase"] = phase
            r["direct_ref_calls"] = d["calls"] if d else None
            r["added"] = {k: added(r.get(f"{k}_us") or {}, (d or {}).get(f"{k}_us") or {}) for k in ("up", "down")}
            r["verdict"] = orch.verdict(r, d, a.budget_ms)
            v = r["verdict"]
            saturated = (r.get("bridge_cpu_pct") or 0) >= 90 or r.get("aborted")  # fails regardless
            if v["pass"] or not v["noisy"] or saturated or attempt == 2 or r.get("violations") \
                    or (not a.full and time.monotonic() + 1.3 * r["elapsed_s"] > quick_deadline):
                break
            say(f"  bridge {calls:>5} calls: failed under {v['noise_note']}: once more")
            res.setdefault("noisy_runs", []).append(r)
        res["levels"].append(r)
        say(f"  bridge {calls:>5} calls: added up p50/p99 {r['added']['up']['p50']}/{r['added']['up']['p99']} µs, "
            f"down {r['added']['down']['p50']}/{r['added']['down']['p99']} µs, bridge CPU {r.get('bridge_cpu_pct')} %, "
            f"gen CPU {r.get('gen_cpu_pct')} %, steal {orch.steal_pct(r)} % "
            f"-> {'pass' if v['pass'] else 'FAIL: ' + '; '.join(v['reasons'])}")
        return r

    # ---- measured levels
    if a.full:
        table = _levels(a.levels) if a.levels else []
        ramp = list(range(100, 3001, 100))
    else:
        table = _levels(a.levels) if a.levels else [100, 300]
        ramp = [450, 600, 800, 1000, 1200, 1500, 2000]
    say(f"levels: direct baseline, then the bridge; {window:g} s windows"
        + ("" if a.no_ramp else f", ramp {ramp_window:g} s windows"))
    if not a.full:
        for calls in table:
            run_direct(calls, min(window, 5.0))   # a subtrahend: 5 s give >= 25k samples per 100 calls
    for calls in table:
        run_bridge(calls, "table", window)
    if not a.no_ramp:
        time_left = (lambda: float("inf")) if a.full else (lambda: quick_deadline - time.monotonic())
        res["capacity"] = orch.capacity_search(
            res["levels"], lambda c: run_bridge(c, "ramp", ramp_window),
            [c for c in ramp if c > (max(table) if table else 0)] if table else ramp, time_left, say)
    else:
        res["capacity"] = orch.capacity_search(res["levels"], lambda c: {}, [], lambda: 0.0, lambda s: None)

    # ---- profile
    if a.profile:
        prof_file = orch.RESULTS / f"profile-{stamp}.txt"
        orch.RESULTS.mkdir(parents=True, exist_ok=True)
        popen: list = []
        delay = opts.warmup_s + 1.5
        pc = a.profile_calls
        say(f"profile: py-spy on the bridge during a {pc}-call run (10 s, after {delay:g} s) ...")
        r = orch.run_level(replace(opts, window_s=max(window, 12.0)), "bridge", pc,
                           on_started=lambda proc, pid: popen.append(orch.start_profiler(pid, 10, prof_file, delay)))
        prof: dict = {"calls": pc, "bridge_cpu_pct_while_profiled": r.get("bridge_cpu_pct"),
                      "violations": r.get("violations"), "overloaded": bool(r.get("aborted")),
                      "aborted": r.get("aborted")}
        sp = popen[0] if popen else None
        if sp is None:
            prof["error"] = "py-spy not found"
        else:
            try:
                _, err = sp.communicate(timeout=30)
            except subprocess.TimeoutExpired:
                sp.kill()
                err = b"timeout"
            if prof_file.exists() and prof_file.stat().st_size:
                prof.update(top(prof_file))
            else:
                prof["error"] = f"py-spy produced no profile: {err.decode(errors='replace')[-300:]}"
        res["profile"] = prof
        if r.get("violations"):
            res["profile_run_violations"] = r["violations"]

    # ---- report
    res["comparison"] = _comparison(res)
    res["elapsed_s"] = round(time.monotonic() - t_start, 1)
    say("")
    say("forward latency (µs); added = bridge - direct baseline at "
        + (", ".join(f"{d} calls" for d in sorted(direct)) if direct else "-")
        + " (per bridge level: the largest baseline at or below it, column 'vs direct')")
    say(report.latency_table(res["levels"], res["direct"]))
    say("  " + report.PACING_NOTE)
    say("")
    say("turn overhead = fake's first delta of a response -> first playStream.chunk at the caller; "
        "barge-in = fake's speech_started -> playStream.stop at the caller")
    say(report.resource_table(res["levels"], res["direct"]))
    say("")
    internal = report.internal_table(res["levels"])
    if internal:
        say(internal)
        say("")
    cap = res["capacity"]
    if cap.get("calls_per_core") is not None:
        say(f"capacity at added p99 <= {a.budget_ms:g} ms: {'>= ' if cap['lower_bound'] else ''}"
            f"{cap['calls_per_core']} calls per core"
            + (f" (first failing level {cap['first_failing_calls']}: {'; '.join(cap['first_failure'])})"
               if cap.get("first_failing_calls") else "")
            + (" (ramp stopped by the quick-mode time budget)" if cap.get("stopped_by_time") else ""))
    else:
        say("capacity: no level passed" + (f" ({'; '.join(cap['first_failure'] or [])})" if cap.get("first_failure") else ""))
    if cap.get("inconclusive"):
        say("  NOTE: " + cap["inconclusive"])
    if cap.get("noisy"):
        say("  NOTE: " + cap["noisy"])
    noisy = [(r["mode"], r["calls"], orch.steal_pct(r)) for r in [*res["direct"], *res["levels"]]
             if (orch.steal_pct(r) or 0) > orch.NOISY_STEAL_PCT]
    if noisy:
        say("  NOTE: the hypervisor took CPU from this VM during " + ", ".join(
            f"{m} {c} ({s:.0f} % of a core)" for m, c, s in noisy)
            + ": latencies there include waiting for a real CPU; rerun on a quiet host")
    say("")
    say(report.targets_table(res))
    say("")
    if "floor" in res:
        say(report.floor_table(res))
        say("")
    if res.get("profile"):
        say(report.profile_text(res["profile"]))
        say("")
    bad = [(r.get("mode"), r["calls"], r.get("phase", ""), r["violations"], r.get("error_lines", [])[:5])
           for r in [*res["direct"], *res["levels"], *res.get("noisy_runs", [])] if r.get("violations")]
    if res.get("profile_run_violations"):
        bad.append(("bridge", 300, "profile", res["profile_run_violations"], []))
    logs = [(r["calls"], r["bridge_log_lines"], r.get("bridge_log_head", [])) for r in res["levels"]
            if r.get("bridge_log_lines")]
    for calls, n, head in logs:
        say(f"bridge log at {calls} calls: {n} lines at level warning+, first: {head[:3]}")
    gen_sat = [r["calls"] for r in res["levels"] if r["verdict"].get("generator_saturated")]
    if gen_sat:
        say(f"NOTE: the generator was saturated at {gen_sat} calls (bridge runs): those levels measure the generator too")
    for r in res["direct"]:
        if r.get("generator_saturated"):
            say(f"NOTE: the direct baseline at {r['calls']} calls was generator-bound ({r['generator_note']}): "
                "the added latency of bridge levels compared with it is understated")
    for r in res["levels"]:
        if r.get("timing_dependent"):
            say(f"note: {r['calls']} calls: barge-in checks not judged (bridge too late for them to be strict: "
                f"max down latency {r.get('down_max_all_us', 0) / 1000:.0f} ms): {r['timing_dependent']}")
    res["exit_code"] = 1 if bad else 0
    json_path = report.write_json(res, orch.RESULTS, stamp)
    png = report.write_chart(res, orch.RESULTS, stamp)
    say(f"results: {json_path}" + (f", chart: {png}" if png else "") + f"  ({res['elapsed_s']:.0f} s)")
    if bad:
        say("")
        say("FAILED: violations (frames lost/duplicated/reordered/corrupted/leaked or protocol errors):")
        for mode, calls, phase, v, lines in bad:
            say(f"  {mode} {calls} calls {phase}: {v}")
            for ln in lines:
                say(f"      {ln}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
