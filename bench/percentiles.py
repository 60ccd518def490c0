"""Latency samples (integer ns) -> p50/p99/p99.9/max in microseconds (nearest-rank)."""

from __future__ import annotations

import math
from array import array

QUANTILES = (("p50", 0.50), ("p99", 0.99), ("p999", 0.999))


def summarize(samples_ns: array | list[int]) -> dict[str, float | int | None]:
    """{"n", "p50", "p99", "p999", "max"} in µs (None when there are no samples)."""
    n = len(samples_ns)
    out: dict[str, float | int | None] = {"n": n}
    if not n:
        out.update({k: None for k, _ in QUANTILES})
        out["max"] = None
        return out
    s = sorted(samples_ns)
    for name, q in QUANTILES:
        out[name] = round(s[min(n - 1, max(0, math.ceil(q * n) - 1))] / 1000.0, 1)
    out["max"] = round(s[-1] / 1000.0, 1)
    return out


def added(bridge: dict, direct: dict) -> dict[str, float | None]:
    """Per-percentile difference bridge - direct (µs); None when either side is missing."""
    out: dict[str, float | None] = {}
    for k in ("p50", "p99", "p999", "max"):
        b, d = bridge.get(k), direct.get(k)
        out[k] = round(b - d, 1) if b is not None and d is not None else None
    return out
