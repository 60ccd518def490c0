"""`python -m bench --churn`: does a burst of new calls disturb the calls already up?

At `calls` streaming bench calls, alternating rounds measure the bridge's added latency without
churn and with `rate` new calls per second for `seconds` (bench/churn.py on the generator's CPU,
started with the generator, so it overlaps the measured window). A direct baseline at the same
load comes first. The verdict: with churn, the added p99 of the calls already up stays within the
budget (`--budget-ms`), and every churn call was set up and ended cleanly.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from dataclasses import replace
from typing import Any, Callable

from . import orchestrate as orch
from .percentiles import added


def run(opts: orch.Opts, calls: int, rate: float, seconds: float, rounds: int,
        say: Callable[[str], None]) -> dict[str, Any]:
    direct = orch.run_level(replace(opts, window_s=max(5.0, opts.window_s / 2)), "direct", calls)
    say(f"churn: direct baseline at {calls} calls: up {direct.get('up_us')} down {direct.get('down_us')}")
    rows: dict[str, list[dict[str, Any]]] = {"steady": [], "churn": []}
    # the generator measures opts.window_s after its warm-up: the churn starts with it and lasts
    # `seconds`, so a window of at least that long sees all of it
    lopts = replace(opts, window_s=max(opts.window_s, seconds))
    for rnd in range(rounds):
        for variant in ("steady", "churn"):
            state: dict[str, Any] = {}
            bridge_port: list[int] = []
            orig_init = orch.Bridge.__init__

            def init(self: orch.Bridge, o: orch.Opts, up: int, ports: list[int] = bridge_port,
                     base: Any = orig_init) -> None:
                base(self, o, up)
                ports.append(self.port)
            orch.Bridge.__init__ = init  # type: ignore[method-assign]

            def started(proc: subprocess.Popen[Any], pid: int, variant: str = variant,
                        ports: list[int] = bridge_port, state: dict[str, Any] = state) -> None:
                if variant != "churn" or not ports:
                    return
                cmd, pre = orch.pinned([sys.executable, "-m", "bench.churn", str(ports[-1]), str(rate),
                                        str(seconds), "1.0", str(lopts.warmup_s), orch.TOKEN], orch.GEN_CPU)
                state["proc"] = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                                 text=True, preexec_fn=pre, cwd=orch.REPO)
            try:
                r = orch.run_level(lopts, "bridge", calls, on_started=started)
            finally:
                orch.Bridge.__init__ = orig_init  # type: ignore[method-assign]
            churn: dict[str, Any] | None = None
            if "proc" in state:
                try:
                    out, _ = state["proc"].communicate(timeout=seconds + 40)
                    churn = json.loads(out.strip().splitlines()[-1])
                except (subprocess.TimeoutExpired, ValueError, IndexError) as e:
                    state["proc"].kill()
                    churn = {"error": str(e)[:200]}
            row = {"added_up_us": added(r.get("up_us") or {}, direct.get("up_us") or {}),
                   "added_down_us": added(r.get("down_us") or {}, direct.get("down_us") or {}),
                   "bridge_cpu_pct": r.get("bridge_cpu_pct"), "violations": r.get("violations"),
                   "other_cpu_pct": (r.get("machine_cpu_pct") or {}).get("other"), "churn": churn}
            rows[variant].append(row)
            say(f"churn: round {rnd + 1} {variant}: added up {row['added_up_us']} down {row['added_down_us']} "
                f"bridge CPU {row['bridge_cpu_pct']} % churn {churn}")

    def med(variant: str, key: str, p: str) -> float | None:
        v = [x[key][p] for x in rows[variant] if x[key].get(p) is not None]
        return round(statistics.median(v), 1) if v else None
    summary = {v: {f"{d}_{p}": med(v, f"added_{d}_us", p) for d in ("up", "down") for p in ("p50", "p99", "max")}
               for v in rows}
    churn_calls = [x["churn"] for x in rows["churn"] if x["churn"]]
    clean = bool(churn_calls) and all(c.get("failed") == 0 and c.get("ok") == c.get("started") for c in churn_calls)
    worst_p99 = max((x["added_up_us"].get("p99") or 0, x["added_down_us"].get("p99") or 0) for x in rows["churn"])
    budget_us = opts.budget_ms * 1000
    return {"calls": calls, "rate_per_s": rate, "seconds": seconds, "rounds": rounds, "direct": direct,
            "rows": rows, "summary": summary, "churn_clean": clean,
            "worst_added_p99_us_with_churn": max(worst_p99),
            "pass": clean and max(worst_p99) <= budget_us}


def table(res: dict[str, Any]) -> str:
    s = res["summary"]
    lines = [f"churn at {res['calls']} streaming calls: {res['rate_per_s']:g} new calls/s for {res['seconds']:g} s, "
             f"{res['rounds']} alternating rounds (added µs, medians)",
             f"{'':8}{'up p50':>9}{'up p99':>9}{'up max':>10}{'down p50':>10}{'down p99':>10}{'down max':>10}"]
    for v in ("steady", "churn"):
        r = s[v]
        lines.append(f"{v:8}" + "".join(f"{(r[k] if r[k] is not None else float('nan')):>{w}.0f}"
                                         for k, w in (("up_p50", 9), ("up_p99", 9), ("up_max", 10),
                                                      ("down_p50", 10), ("down_p99", 10), ("down_max", 10))))
    for c in (x["churn"] for x in res["rows"]["churn"]):
        if c:
            lines.append(f"  churn calls: started {c.get('started')}, ok {c.get('ok')}, failed {c.get('failed')} "
                         f"{c.get('errors') or ''}, setup p50 {c.get('setup_ms_p50')} / p99 {c.get('setup_ms_p99')} / "
                         f"max {c.get('setup_ms_max')} ms")
    lines.append(f"verdict: worst added p99 with churn {res['worst_added_p99_us_with_churn']:.0f} µs, churn calls "
                 f"{'all clean' if res['churn_clean'] else 'NOT all clean'} -> {'PASS' if res['pass'] else 'FAIL'}")
    return "\n".join(lines)
