"""A/B of two checkouts of the bridge in one session: `python -m bench --ab DIR`.

Why: on these noisy VMs only figures measured side by side compare. This runs the same
traffic through the bridge of this tree (B, "new") and of the checkout DIR (A, "old", e.g. a
`git worktree` of an earlier commit), alternating A, B, A, B, ... per level, plus one direct
baseline per level; it reports per variant the median over rounds of the bridge's CPU per call,
CPU per frame and the added latency percentiles, and the B/A ratio of each.

Each run is a full `orchestrate.run_level`: a fresh bridge process on CPU 0, the picows
generator on CPU 1, every frame stamped and checked exactly once, in order, byte-exact.
"""

from __future__ import annotations

import statistics
from dataclasses import replace
from pathlib import Path
from typing import Any, Callable

from . import orchestrate as orch


def _added(r: dict, d: dict, k: str, p: str) -> float | None:
    b = (r.get(f"{k}_us") or {}).get(p)
    base = (d.get(f"{k}_us") or {}).get(p)
    return None if b is None or base is None else b - base


def _row(r: dict, d: dict, calls: int) -> dict[str, Any]:
    cpu = r.get("bridge_cpu_pct")
    frames_s = (r.get("window_up_frames") or 0) + (r.get("window_down_frames") or 0)
    return {"bridge_cpu_pct": cpu,
            "cpu_pct_per_call": cpu / calls if cpu is not None else None,
            "added_up_p50_us": _added(r, d, "up", "p50"), "added_up_p99_us": _added(r, d, "up", "p99"),
            "added_down_p50_us": _added(r, d, "down", "p50"),
            "added_down_p99_us": _added(r, d, "down", "p99"),
            "rss_per_call_kib": r.get("rss_per_call_kib"), "frames_in_window": frames_s,
            "steal_pct": orch.steal_pct(r), "violations": r.get("violations") or {}}


def _median(rows: list[dict], key: str) -> float | None:
    vals = [x[key] for x in rows if x.get(key) is not None]
    return round(statistics.median(vals), 3) if vals else None


def run_ab(opts: orch.Opts, base_dir: Path, levels: list[int], rounds: int,
           say: Callable[[str], None]) -> dict[str, Any]:
    new_dir = orch.REPO
    out: dict[str, Any] = {"a": str(base_dir), "b": str(new_dir), "rounds": rounds, "levels": {}}
    for calls in levels:
        d = orch.run_level(replace(opts, window_s=min(opts.window_s, 5.0)), "direct", calls)
        say(f"  direct {calls} calls: up p50/p99 {d.get('up_us', {}).get('p50')}/"
            f"{d.get('up_us', {}).get('p99')} µs")
        rows: dict[str, list[dict]] = {"a": [], "b": []}
        for i in range(rounds):
            for name, src in (("a", base_dir), ("b", new_dir)):
                r = orch.run_level(replace(opts, bridge_dir=src), "bridge", calls)
                row = _row(r, d, calls)
                rows[name].append(row)
                say(f"  round {i + 1} {name.upper()} {calls} calls: CPU {row['bridge_cpu_pct']} %, "
                    f"added up p50/p99 {row['added_up_p50_us']}/{row['added_up_p99_us']} µs, "
                    f"down {row['added_down_p50_us']}/{row['added_down_p99_us']} µs, "
                    f"steal {row['steal_pct']} %"
                    + (f"  VIOLATIONS {row['violations']}" if row["violations"] else ""))
        keys = ("bridge_cpu_pct", "cpu_pct_per_call", "added_up_p50_us", "added_up_p99_us",
                "added_down_p50_us", "added_down_p99_us", "rss_per_call_kib")
        summary = {name: {k: _median(rows[name], k) for k in keys} for name in rows}
        summary["b_over_a"] = {k: (round(summary["b"][k] / summary["a"][k], 3)
                                   if summary["a"][k] and summary["b"][k] is not None else None)
                               for k in keys}
        out["levels"][calls] = {"runs": rows, "median": summary,
                                "violations": any(x["violations"] for v in rows.values() for x in v)}
    return out


def table(res: dict[str, Any]) -> str:
    lines = [f"A = {res['a']}", f"B = {res['b']}",
             f"{'calls':>6} {'variant':>8} {'CPU %':>7} {'CPU %/call':>11} {'up p50':>8} {'up p99':>8} "
             f"{'down p50':>9} {'down p99':>9} {'RSS/call':>9}   (added µs, medians of {res['rounds']} runs)"]
    for calls, lv in res["levels"].items():
        for name in ("a", "b", "b_over_a"):
            m = lv["median"][name]
            f = (lambda v: "-" if v is None else f"{v:.3f}") if name == "b_over_a" else \
                (lambda v: "-" if v is None else f"{v:.1f}")
            lines.append(f"{calls:>6} {name.upper() if name != 'b_over_a' else 'B/A':>8} "
                         f"{f(m['bridge_cpu_pct']):>7} {f(m['cpu_pct_per_call']):>11} "
                         f"{f(m['added_up_p50_us']):>8} {f(m['added_up_p99_us']):>8} "
                         f"{f(m['added_down_p50_us']):>9} {f(m['added_down_p99_us']):>9} "
                         f"{f(m['rss_per_call_kib']):>9}")
    return "\n".join(lines)
