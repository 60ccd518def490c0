"""What `Histogram.record` costs: `python -m bench.record_cost`.

Best of `repeat` timeit runs of `n` calls, loop overhead subtracted, over log-uniform values
1 µs .. 100 ms, called the way call sites call it (`h.record(v)`). A measurement, not a test.
"""

from __future__ import annotations

import math
import random
import timeit

from voicebridge.stats import Histogram


def measure_record_ns(n: int = 1_000_000, repeat: int = 5) -> float:
    """Measured cost of `Histogram.record` in ns per call (see the module docstring)."""
    rnd = random.Random(12345)
    vals = [int(math.exp(rnd.uniform(0.0, math.log(100_000)))) for _ in range(1000)]
    loops = max(1, n // len(vals))
    h = Histogram("bench", "record benchmark")
    env = {"h": h, "vals": vals}
    t_rec = min(timeit.repeat("for v in vals: h.record(v)", number=loops, repeat=repeat, globals=env))
    t_nop = min(timeit.repeat("for v in vals: pass", number=loops, repeat=repeat, globals=env))
    return (t_rec - t_nop) / (loops * len(vals)) * 1e9


if __name__ == "__main__":
    h = Histogram("t", "cost")
    print(f"Histogram.record: {measure_record_ns():.0f} ns per call; {len(h.counts)} buckets, "
          f"bucket list {h.nbytes} bytes")
