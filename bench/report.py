"""The benchmark's outputs: the printed tables, bench/results/bench-<ts>.json and latency-<ts>.png."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

TARGETS = {"calls": 300, "added_p50_us": 150, "added_p99_us": 2000, "rss_per_call_kib": 64,
           "capacity_calls_per_core": 300, "capacity_stretch": 600}

PACING_NOTE = (
    "down latency = fake's send of a response.output_audio.delta -> the caller's receipt of the "
    "playStream.chunk.\n  The fake sends audio in bursts (first lead-40 ms at once, then 100 ms every "
    "100 ms), so VAIC never holds more\n  than the bridge's 200 ms playout lead when a burst arrives: "
    "every chunk is forwardable at once and this is\n  the bridge's forwarding latency, not its "
    "intended pacing delay.")


def _f(v: Any, width: int = 7) -> str:
    if v is None:
        return "-".rjust(width)
    if isinstance(v, float):
        return f"{v:,.0f}".rjust(width) if abs(v) >= 100 else f"{v:.1f}".rjust(width)
    return str(v).rjust(width)


def _q(d: dict | None) -> list[Any]:
    d = d or {}
    return [d.get("p50"), d.get("p99"), d.get("p999"), d.get("max")]


def latency_table(levels: list[dict], direct: list[dict]) -> str:
    head = (f"{'calls':>6} {'run':<7}{'dir':<5}{'n':>8} | {'raw p50':>7} {'p99':>7} {'p99.9':>7} {'max':>7}"
            f" | {'added p50':>9} {'p99':>7} {'p99.9':>7} {'max':>7} {'vs direct':>9}  (µs)")
    rows = [head, "-" * len(head)]
    for r in direct:
        for d in ("up", "down"):
            s = r.get(f"{d}_us") or {}
            rows.append(f"{r['calls']:>6} {'direct':<7}{d:<5}{_f(s.get('n'), 8)} | "
                        + " ".join(_f(v) for v in _q(s)) + " |")
    for r in levels:
        for d in ("up", "down"):
            s = r.get(f"{d}_us") or {}
            a = (r.get("added") or {}).get(d) or {}
            ref = r.get("direct_ref_calls")
            rows.append(f"{r['calls']:>6} {r.get('phase', ''):<7}{d:<5}{_f(s.get('n'), 8)} | "
                        + " ".join(_f(v) for v in _q(s)) + " | "
                        + _f(a.get("p50"), 9) + " " + " ".join(_f(v) for v in _q(a)[1:])
                        + f" {('@' + str(ref)) if ref else '-':>9}")
    return "\n".join(rows)


def resource_table(levels: list[dict], direct: list[dict]) -> str:
    head = (f"{'calls':>6} {'run':<7}| {'turn p50':>8} {'p99':>6} | {'barge p50':>9} {'p99':>6} {'n':>4} | "
            f"{'bridge':>6} {'gen':>5} {'steal':>5} | {'RSS/call':>8} | {'lost':>4} {'reord':>5} {'corr':>4} "
            f"{'late':>5} | verdict")
    sub = (f"{'':>6} {'':<7}| {'µs':>8} {'':>6} | {'µs':>9} {'':>6} {'':>4} | {'CPU %':>6} {'CPU%':>5} {'%':>5} | "
           f"{'KiB':>8} | {'':>4} {'':>5} {'':>4} {'':>5} |")
    rows = [head, sub, "-" * len(head)]
    for r in [*direct, *levels]:
        up, dn = r.get("up_counts") or {}, r.get("down_counts") or {}
        lost = (up.get("lost") or 0) + (dn.get("lost") or 0)
        reord = (up.get("reordered") or 0) + (dn.get("reordered") or 0)
        corr = (up.get("corrupt") or 0) + (dn.get("corrupt") or 0)
        t, b = r.get("turn_us") or {}, r.get("barge_us") or {}
        v = r.get("verdict")
        if r.get("mode") == "direct":
            vtxt = "baseline" + (" (violations!)" if r.get("violations") else "")
            if r.get("generator_saturated"):
                vtxt += " [generator-bound: " + r["generator_note"] + "]"
        elif v is None:
            vtxt = "-"
        else:
            vtxt = "pass" if v["pass"] else "FAIL: " + "; ".join(v["reasons"])[:90]
            if v.get("generator_saturated"):
                vtxt += " [generator saturated: " + v["generator_note"] + "]"
            if v.get("noisy"):
                vtxt += " [noisy: " + v["noise_note"] + "]"
        run = "direct" if r.get("mode") == "direct" else r.get("phase", "")
        rows.append(f"{r['calls']:>6} {run:<7}| {_f(t.get('p50'), 8)} {_f(t.get('p99'), 6)} | "
                    f"{_f(b.get('p50'), 9)} {_f(b.get('p99'), 6)} {_f(b.get('n'), 4)} | "
                    f"{_f(r.get('bridge_cpu_pct'), 6)} {_f(r.get('gen_cpu_pct'), 5)} "
                    f"{_f((r.get('machine_cpu_pct') or {}).get('steal'), 5)} | "
                    f"{_f(r.get('rss_per_call_kib'), 8)} | {lost:>4} {reord:>5} {corr:>4} "
                    f"{_f(r.get('late_up_frames'), 5)} | {vtxt}")
    return "\n".join(rows)


def targets_table(res: dict) -> str:
    lv = next((r for r in res["levels"] if r["calls"] == TARGETS["calls"]), None)
    cap = res.get("capacity") or {}
    out = [f"{'targets (not asserted)':<58}measured"]

    def line(label: str, value: str, ok: bool | None) -> None:
        mark = "" if ok is None else ("  ok" if ok else "  MISS")
        out.append(f"  {label:<56}{value}{mark}")

    if lv is None:
        out.append(f"  (no bridge level at {TARGETS['calls']} calls)")
    else:
        for d in ("up", "down"):
            a = (lv.get("added") or {}).get(d) or {}
            p50, p99 = a.get("p50"), a.get("p99")
            line(f"added {d} p50 <= {TARGETS['added_p50_us']} µs @300", _f(p50, 8).strip() + " µs",
                 None if p50 is None else p50 <= TARGETS["added_p50_us"])
            line(f"added {d} p99 <= {TARGETS['added_p99_us'] / 1000:g} ms @300",
                 _f(p99, 8).strip() + " µs", None if p99 is None else p99 <= TARGETS["added_p99_us"])
        rss = lv.get("rss_per_call_kib")
        line(f"RSS <= {TARGETS['rss_per_call_kib']} KiB per call @300", f"{rss} KiB",
             None if rss is None else rss <= TARGETS["rss_per_call_kib"])
    c = cap.get("calls_per_core")
    lc = next((r for r in res["levels"] if c is not None and r["calls"] == c), None)
    if lc is not None and lc is not lv:
        a = lc.get("added") or {}
        out.append(f"  at the capacity level ({c} calls): added p50 up {_f((a.get('up') or {}).get('p50')).strip()} / "
                   f"down {_f((a.get('down') or {}).get('p50')).strip()} µs, p99 up "
                   f"{_f((a.get('up') or {}).get('p99')).strip()} / down {_f((a.get('down') or {}).get('p99')).strip()} µs, "
                   f"RSS {lc.get('rss_per_call_kib')} KiB per call")
    txt = f"{'>= ' if cap.get('lower_bound') else ''}{c} calls/core" if c is not None else "none passed"
    line(f"capacity >= {TARGETS['capacity_calls_per_core']} calls/core @{res['budget_ms']:g} ms "
         f"(stretch {TARGETS['capacity_stretch']})", txt,
         None if c is None else c >= TARGETS["capacity_calls_per_core"])
    return "\n".join(out)


def floor_table(res: dict) -> str:
    fl = res.get("floor") or {}
    if fl.get("skipped"):
        return f"transport floor: skipped ({fl['skipped']})"
    rows = fl.get("rows") or []
    if not rows:
        return "transport floor: no result" + (f" ({fl.get('stderr')})" if fl.get("stderr") else "")
    out = [f"transport floor ({fl.get('script', 'relay_floor.py')} {fl.get('cmd', '').split('relay_floor.py')[-1].strip()}): "
           "a minimal relay, 1 frame each way per call every 20 ms",
           f"  {'relay':<13}{'calls':>6} {'CPU %':>6} {'%/call':>7} {'µs/frame':>9} {'calls/core*':>11} "
           f"{'rtt p50':>9} {'p99':>9} {'lost':>6}"]
    for r in rows:
        if "error" in r:
            out.append(f"  {r.get('variant', '?'):<13} error: {r['error'][:80]}")
            continue
        if "skipped" in r:
            out.append(f"  {r.get('variant', '?'):<13} skipped: {r['skipped']}")
            continue
        m = r.get("_derived") or {}
        out.append(f"  {r['variant']:<13}{r['calls']:>6} {_f(r.get('relay_cpu_pct'), 6)} "
                   f"{m.get('cpu_pct_per_call', 0):>7.2f} {_f(m.get('cpu_us_per_frame'), 9)} "
                   f"{_f(m.get('calls_per_core'), 11)} {_f(r.get('p50_us'), 9)} {_f(r.get('p99_us'), 9)} "
                   f"{r.get('lost', 0):>6}" + ("  saturated" if m.get("saturated") else ""))
    cmp_ = res.get("comparison") or {}
    for key, label in (("voicebridge", "voicebridge"), ("voicebridge_unsaturated", "voicebridge")):
        vb = cmp_.get(key)
        if not vb or (key == "voicebridge_unsaturated" and cmp_.get("voicebridge")
                      and vb["calls"] == cmp_["voicebridge"]["calls"]):
            continue
        out.append(f"  {label:<13}{vb['calls']:>6} {_f(vb.get('cpu_pct'), 6)} "
                   f"{vb.get('cpu_pct_per_call', 0):>7.2f} {_f(vb.get('cpu_us_per_frame'), 9)} "
                   f"{_f(vb.get('calls_per_core'), 11)} {'':>9} {'':>9} {'':>6}"
                   + ("  saturated" if vb.get("saturated") else "")
                   + f"  ({vb['frames_per_call_s']:.0f} frames/s per call: 50 up + "
                   f"{vb['down_frames_per_call_s']:.0f} down)")
    out.append("  * calls/core = what one core relays at this cost per frame (1e6 / (µs/frame x frames/s "
               "per call)); no latency budget, so an upper bound.")
    out.append("    Saturated rows relay fewer frames than offered; µs/frame falls under saturation "
               "(more frames per wake-up), so compare rows of the same load.")
    vb = cmp_.get("voicebridge")
    for name, r in (cmp_.get("ratios") or {}).items():
        out.append(f"  voicebridge@{vb['calls']} / {name:<10}: CPU per call x{r['cpu_per_call']:.2f}, "
                   f"CPU per frame x{r['cpu_per_frame']:.2f}, calls/core x{r['capacity']:.2f}"
                   + (f"; measured capacity at the budget / floor's calls/core x{r['measured_capacity']:.2f}"
                      if r.get("measured_capacity") is not None else ""))
    return "\n".join(out)


def internal_table(levels: list[dict]) -> str:
    """The bridge's own histograms from GET /health ("latency_us"), when it has them."""
    rows = [r for r in levels if isinstance(r.get("bridge_health_latency_us"), dict)]
    if not rows:
        return ""
    names = [n for n in ("up_forward", "down_forward", "pacer_late", "turn_overhead", "barge_in")
             if any(n in r["bridge_health_latency_us"] for r in rows)]
    out = ["the bridge's own view (GET /health latency_us, whole run incl. warm-up and drain; "
           "µs, count p50/p99/p99.9/max):"]
    for r in sorted(rows, key=lambda r: r["calls"]):
        h = r["bridge_health_latency_us"]
        parts = []
        for n in names:
            x = h.get(n) or {}
            if x.get("count"):
                parts.append(f"{n} {x['count']}: {x.get('p50')}/{x.get('p99')}/{x.get('p999')}/{x.get('max')}")
        dfw = (h.get("down_forward") or {}).get("count")
        rx = (r.get("down_counts") or {}).get("received")
        if dfw is not None and rx is not None:   # chunks the bridge did not forward at once
            parts.append(f"chunks held for pacing: {max(0, rx - dfw)} of {rx}")
        out.append(f"  {r['calls']:>5} calls: " + "; ".join(parts))
    return "\n".join(out)


def profile_text(prof: dict | None) -> str:
    if not prof:
        return ""
    if prof.get("error"):
        return f"profile: {prof['error']}"
    out = [f"profile of the bridge ({prof['samples']} samples, py-spy, {prof['calls']} calls, "
           f"bridge CPU {prof.get('bridge_cpu_pct_while_profiled')} %"
           + (", OVERLOADED: " + prof["aborted"] if prof.get("aborted") else "")
           + f"; raw: {prof['file']})", "  top 15 by self time:"]
    out += [f"    {pct:5.1f} %  {fn}" for fn, pct in prof["self"]]
    out.append("  top 15 by total time:")
    out += [f"    {pct:5.1f} %  {fn}" for fn, pct in prof["total"]]
    return "\n".join(out)


def write_json(res: dict, results_dir: Path, stamp: str) -> Path:
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"bench-{stamp}.json"
    path.write_text(json.dumps(res, indent=1, default=str))
    shutil.copyfile(path, results_dir / "latest.json")
    return path


def write_chart(res: dict, results_dir: Path, stamp: str) -> Path | None:
    levels = sorted((r for r in res["levels"] if r.get("added")), key=lambda r: r["calls"])
    if not levels:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharey=True)
    xs = [r["calls"] for r in levels]
    for ax, d in zip(axes, ("up", "down")):
        for key, label, style in (("p50", "p50", "o-"), ("p99", "p99", "s-"), ("p999", "p99.9", "^-")):
            ys = [((r["added"].get(d) or {}).get(key)) for r in levels]
            pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, label=f"added {label}")
        ax.axhline(res["budget_ms"] * 1000, color="red", ls="--", lw=1, label=f"budget {res['budget_ms']:g} ms")
        ax.axhline(TARGETS["added_p99_us"], color="orange", ls=":", lw=1, label="target p99 2 ms")
        ax.axhline(TARGETS["added_p50_us"], color="green", ls=":", lw=1, label="target p50 150 µs")
        cap = (res.get("capacity") or {}).get("calls_per_core")
        if cap:
            ax.axvline(cap, color="grey", ls="-.", lw=1, label=f"capacity {cap} calls")
        for r in levels:
            if r.get("aborted") or r.get("drain") == "cut":
                ax.annotate("overloaded", (r["calls"], (r["added"].get(d) or {}).get("p50") or 1),
                            fontsize=7, textcoords="offset points", xytext=(-30, -12))
        ax.set_yscale("symlog", linthresh=10)
        ax.set_xlabel("concurrent calls (bridge on 1 core)")
        ax.set_title("caller -> model (up)" if d == "up" else "model -> caller (down)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("latency added by the bridge (µs, bridge - direct)")
    axes[1].legend(fontsize=8, loc="upper left")
    fig.suptitle(f"voicebridge forward latency added, {res['timestamp']}")
    fig.tight_layout()
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"latency-{stamp}.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    shutil.copyfile(path, results_dir / "latest.png")
    return path
