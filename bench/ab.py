"""A/B of checkouts of the bridge in one session: `python -m bench --ab DIR[,DIR...]`.

Why: on these noisy VMs only figures measured side by side compare. This runs the same
traffic through the bridge of each older checkout (A, B, ..., e.g. `git worktree`s of earlier
commits) and of this tree (the last letter), alternating per round and level, plus one direct
baseline per level; it reports per variant the median over rounds of the bridge's CPU, CPU per
call and the added latency percentiles, and each variant's ratio to A.

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
    return None if b is None or base is None else round(b - base, 1)


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


def _transport_of(base: Path, default: str) -> tuple[Path, str]:
    """`DIR@NAME` -> (DIR, NAME); a plain DIR keeps `default`."""
    head, sep, name = str(base).rpartition("@")
    if sep and name and "/" not in name:
        return Path(head).resolve(), name
    return base, default


def run_ab(opts: orch.Opts, bases: list[Path], levels: list[int], rounds: int,
           say: Callable[[str], None]) -> dict[str, Any]:
    """`bases` are the older checkouts (A, B, ...); this tree is the last variant. A base
    written `DIR@NAME` runs its bridge with `server.transport = NAME` (e.g. `.@fast` against
    this tree with `--transport picows`); the others, and this tree, with `opts.transport`."""
    variants = [(chr(ord("A") + i), *_transport_of(d, opts.transport)) for i, d in enumerate(bases)]
    variants.append((chr(ord("A") + len(bases)), orch.REPO, opts.transport))
    out: dict[str, Any] = {"variants": {n: f"{d} (transport {t})" for n, d, t in variants},
                           "rounds": rounds, "levels": {}}
    keys = ("bridge_cpu_pct", "cpu_pct_per_call", "added_up_p50_us", "added_up_p99_us",
            "added_down_p50_us", "added_down_p99_us", "rss_per_call_kib")
    for calls in levels:
        d = orch.run_level(replace(opts, window_s=min(opts.window_s, 5.0)), "direct", calls)
        say(f"  direct {calls} calls: up p50/p99 {d.get('up_us', {}).get('p50')}/"
            f"{d.get('up_us', {}).get('p99')} µs")
        rows: dict[str, list[dict]] = {n: [] for n, _, _ in variants}
        for i in range(rounds):
            for name, src, tr in variants:
                r = orch.run_level(replace(opts, bridge_dir=src, transport=tr), "bridge", calls)
                row = _row(r, d, calls)
                rows[name].append(row)
                say(f"  round {i + 1} {name} {calls} calls: CPU {row['bridge_cpu_pct']} %, "
                    f"added up p50/p99 {row['added_up_p50_us']}/{row['added_up_p99_us']} µs, "
                    f"down {row['added_down_p50_us']}/{row['added_down_p99_us']} µs, "
                    f"steal {row['steal_pct']} %"
                    + (f"  VIOLATIONS {row['violations']}" if row["violations"] else ""))
        median = {name: {k: _median(rows[name], k) for k in keys} for name in rows}
        first = variants[0][0]
        ratio = {name: {k: (round(median[name][k] / median[first][k], 3)
                            if median[first][k] and median[name][k] is not None else None)
                        for k in keys} for name in rows if name != first}
        out["levels"][calls] = {"runs": rows, "median": median, f"over_{first}": ratio,
                                "violations": any(x["violations"] for v in rows.values() for x in v)}
    return out


def table(res: dict[str, Any]) -> str:
    names = list(res["variants"])
    first = names[0]
    lines = [f"{n} = {d}" for n, d in res["variants"].items()]
    lines.append(f"{'calls':>6} {'variant':>8} {'CPU %':>7} {'CPU %/call':>11} {'up p50':>8} {'up p99':>8} "
                 f"{'down p50':>9} {'down p99':>9} {'RSS/call':>9}   (added µs, medians of {res['rounds']} runs)")
    for calls, lv in res["levels"].items():
        rows = [(n, lv["median"][n], "{:.1f}") for n in names]
        rows += [(f"{n}/{first}", lv[f"over_{first}"][n], "{:.3f}") for n in names[1:]]
        for label, m, fmt in rows:
            f = (lambda v, fmt=fmt: "-" if v is None else fmt.format(v))
            lines.append(f"{calls:>6} {label:>8} {f(m['bridge_cpu_pct']):>7} {f(m['cpu_pct_per_call']):>11} "
                         f"{f(m['added_up_p50_us']):>8} {f(m['added_up_p99_us']):>8} "
                         f"{f(m['added_down_p50_us']):>9} {f(m['added_down_p99_us']):>9} "
                         f"{f(m['rss_per_call_kib']):>9}")
    return "\n".join(lines)
