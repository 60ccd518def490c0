"""stats.py: log-linear histogram accuracy, layout, merge, bounds, fixed memory; Stats output."""

from __future__ import annotations

import bisect
import json
import math
import random
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from voicebridge.stats import COUNTERS, HISTOGRAMS, Histogram, Stats

HIGHEST = 60_000_000
PS = (50, 90, 99, 99.9)


def exact_percentile(sorted_vals: list[int], p: float) -> int:
    """Nearest-rank percentile: the ceil(p/100 * n)-th smallest value (p read as a decimal)."""
    n = len(sorted_vals)
    rank = max(1, math.ceil(Fraction(str(p)) * n / 100))
    return sorted_vals[rank - 1]


def filled(values: list[int], **kw) -> Histogram:
    h = Histogram("t", "test", **kw)
    for v in values:
        h.record(v)
    return h


def check_percentiles(h: Histogram, values: list[int], ps=PS) -> None:
    """Reported percentile is >= the exact one and at most 1 % (in fact 2**-7) above it."""
    s = sorted(values)
    for p in ps:
        exact = exact_percentile(s, p)
        got = h.percentile(p)
        assert got >= exact, (p, got, exact)
        assert got - exact <= exact / 128, (p, got, exact)
        assert abs(got - exact) <= 0.01 * exact, (p, got, exact)


# -- layout -------------------------------------------------------------------------------------

def test_default_layout_size_and_contiguity():
    h = Histogram("t", "test")
    assert len(h.counts) == 2533
    assert h.bucket_index(HIGHEST) == len(h.counts) - 1
    prev_hi = -1
    for i in range(len(h.counts)):
        lo, hi = h.bucket_bounds(i)
        assert lo == prev_hi + 1             # buckets tile 0..highest without gaps or overlaps
        assert lo <= hi
        if lo >= 256:
            assert hi - lo + 1 <= lo / 128   # width <= 1/128 of the lowest value
        else:
            assert lo == hi                  # exact below 2**sub_bits
        prev_hi = hi
    assert prev_hi == HIGHEST


@given(st.integers(min_value=0, max_value=HIGHEST))
def test_value_lies_in_its_bucket(v):
    h = Histogram("t", "test")
    lo, hi = h.bucket_bounds(h.bucket_index(v))
    assert lo <= v <= hi
    assert hi - v <= v / 128


@given(st.integers(min_value=0, max_value=HIGHEST - 1))
def test_bucket_index_is_monotone(v):
    h = Histogram("t", "test")
    assert 0 <= h.bucket_index(v + 1) - h.bucket_index(v) <= 1


@pytest.mark.parametrize("highest,sub_bits", [(1, 2), (1000, 4), (2**20, 8), (2**20 - 1, 8), (60_000_000, 10)])
def test_other_layouts_tile_the_range(highest, sub_bits):
    h = Histogram("t", "test", highest=highest, sub_bits=sub_bits)
    assert h.bucket_index(highest) == len(h.counts) - 1
    prev = -1
    for i in range(len(h.counts)):
        lo, hi = h.bucket_bounds(i)
        assert lo == prev + 1 and lo <= hi
        if lo >= 1 << sub_bits:
            assert hi - lo + 1 <= lo / (1 << (sub_bits - 1))
        prev = hi
    assert prev == highest


def test_invalid_layout():
    with pytest.raises(ValueError):
        Histogram("t", "test", highest=0)
    with pytest.raises(ValueError):
        Histogram("t", "test", sub_bits=1)


# -- accuracy -----------------------------------------------------------------------------------

def _distributions():
    rng = np.random.default_rng(20240601)
    n = 100_000
    return {
        "log_uniform_1us_60s": np.exp(rng.uniform(0, math.log(HIGHEST), n)),
        "uniform_0_20ms": rng.uniform(0, 20_000, n),
        "exponential_mean_300us": rng.exponential(300, n),
        "lognormal_ttfa": rng.lognormal(math.log(600_000), 0.5, n),
        "normal_20ms": np.clip(rng.normal(20_000, 3_000, n), 0, None),
        "bimodal_us_and_s": np.concatenate([rng.exponential(80, n // 2), rng.uniform(1e6, 3e6, n // 2)]),
        "small_exact": rng.integers(0, 256, n),
        "pareto_tail": np.clip(100 * (1 + rng.pareto(1.5, n)), 0, HIGHEST),
    }


@pytest.mark.parametrize("name,data", list(_distributions().items()))
def test_percentiles_within_1_percent(name, data):
    values = data.astype(np.int64).tolist()
    h = filled(values)
    check_percentiles(h, values, PS + (1, 10, 25, 75, 95, 99.99))
    arr = np.asarray(values)
    # cross-check the nearest-rank reference against numpy's inverted_cdf (not at 99.9: numpy
    # computes the rank in floats, 99.9 * 1e5 / 100 > 99900, one rank higher than the definition)
    for p in (50, 90, 99):
        assert exact_percentile(sorted(values), p) == int(np.percentile(arr, p, method="inverted_cdf"))
    assert h.count == len(values)
    assert h.total == sum(values)
    assert h.min == min(values) and h.max == max(values)
    assert h.percentile(100) == max(values)
    assert h.percentile(0) == min(values)
    assert h.mean == pytest.approx(sum(values) / len(values))


@settings(max_examples=200)
@given(st.lists(st.integers(min_value=0, max_value=HIGHEST), min_size=1, max_size=300),
       st.floats(min_value=0, max_value=100))
def test_percentile_property(values, p):
    h = filled(values)
    check_percentiles(h, values, (p, 50, 99.9))
    assert h.percentile(100) == max(values)
    assert h.percentile(0) == min(values)


def test_percentile_rank_uses_decimal_p():
    # 99.9 * 1000 / 100 is 999.0000000000001 in floats; the nearest rank is 999, not 1000.
    values = list(range(1, 1000)) + [50_000_000]
    h = filled(values)
    assert h.percentile(99.9) == 999
    assert h.percentile(100) == 50_000_000


def test_percentile_argument_checked():
    h = filled([1, 2, 3])
    for p in (-0.1, 100.1, math.nan):
        with pytest.raises(ValueError):
            h.percentile(p)


def test_empty():
    h = Histogram("t", "test")
    assert h.count == 0 and h.total == 0 and h.min == 0 and h.max == 0
    assert h.percentile(50) == 0 and h.percentile(100) == 0
    assert h.snapshot() == {"count": 0, "mean": 0.0, "p50": 0, "p90": 0, "p99": 0, "p999": 0,
                            "max": 0, "min": 0}
    assert h.cumulative_le([0, 10, HIGHEST]) == [0, 0, 0]


# -- bounds -------------------------------------------------------------------------------------

def test_bounds_zero_one_highest():
    h = filled([0, 1, HIGHEST])
    assert h.count == 3 and h.clamped == 0 and h.negative == 0
    assert h.min == 0 and h.max == HIGHEST
    assert h.counts[0] == 1 and h.counts[1] == 1 and h.counts[-1] == 1
    assert h.percentile(100) == HIGHEST


def test_above_highest_clamps():
    h = filled([HIGHEST + 1, 10**12])
    assert h.clamped == 2
    assert h.count == 2 and h.max == HIGHEST and h.min == HIGHEST
    assert h.total == 2 * HIGHEST
    assert h.counts[-1] == 2
    assert h.percentile(50) == HIGHEST


def test_negative_records_zero():
    h = filled([-1, -10**9, 5])
    assert h.negative == 2 and h.clamped == 0
    assert h.count == 3 and h.counts[0] == 2 and h.min == 0 and h.max == 5
    assert h.total == 5


def test_fixed_memory():
    h = Histogram("t", "test")
    counts = h.counts
    n = len(counts)
    size = h.nbytes
    rnd = random.Random(7)
    for _ in range(100_000):
        h.record(int(math.exp(rnd.uniform(0, math.log(10 * HIGHEST)))) - rnd.randint(0, 5))
    assert h.counts is counts and len(h.counts) == n and h.nbytes == size
    assert h.count == 100_000
    h.merge(filled([1, HIGHEST * 2]))
    assert h.counts is counts and len(h.counts) == n
    h.reset()
    assert h.counts is counts and len(h.counts) == n and h.count == 0


# -- merge / reset ------------------------------------------------------------------------------

@settings(max_examples=100)
@given(st.lists(st.integers(min_value=-5, max_value=HIGHEST + 5), max_size=200), st.data())
def test_merge_halves_equals_all(values, data):
    cut = data.draw(st.integers(min_value=0, max_value=len(values)))
    a, b = filled(values[:cut]), filled(values[cut:])
    a.merge(b)
    whole = filled(values)
    assert a.counts == whole.counts
    assert (a.count, a.total, a.min, a.max, a.clamped, a.negative) == \
        (whole.count, whole.total, whole.min, whole.max, whole.clamped, whole.negative)
    assert a.snapshot() == whole.snapshot()


def test_merge_into_empty_and_from_empty():
    a = filled([])
    a.merge(filled([7, 9000]))
    assert (a.min, a.max, a.count) == (7, 9000, 2)
    a.merge(filled([]))
    assert (a.min, a.max, a.count) == (7, 9000, 2)


def test_merge_layout_mismatch():
    with pytest.raises(ValueError):
        Histogram("a", "a").merge(Histogram("b", "b", highest=1000))
    with pytest.raises(ValueError):
        Histogram("a", "a").merge(Histogram("b", "b", sub_bits=7))


def test_reset():
    h = filled([-1, 5, 10**9])
    h.reset()
    assert (h.count, h.total, h.min, h.max, h.clamped, h.negative) == (0, 0, 0, 0, 0, 0)
    assert not any(h.counts)
    h.record(42)
    assert (h.min, h.max) == (42, 42)


# -- cumulative_le ------------------------------------------------------------------------------

@settings(max_examples=100)
@given(st.lists(st.integers(min_value=0, max_value=HIGHEST), min_size=1, max_size=200),
       st.lists(st.integers(min_value=-1, max_value=HIGHEST + 10), min_size=1, max_size=20))
def test_cumulative_le(values, bounds):
    h = filled(values)
    got = h.cumulative_le(bounds)
    for b, c in zip(bounds, got):
        exact = sum(v <= b for v in values)
        if b < 0 or b >= h.max or b < 256:
            assert c == exact
            continue
        lo, hi = h.bucket_bounds(h.bucket_index(b))
        if hi == b:
            assert c == exact                                  # bound on a bucket edge: exact
        else:
            assert sum(v < lo for v in values) <= c <= exact   # rounded: b's bucket counted above b
    ordered = sorted(bounds)
    cum = h.cumulative_le(ordered)
    assert cum == sorted(cum)


def test_cumulative_le_edges_exact_on_random_data():
    rnd = random.Random(3)
    values = [int(math.exp(rnd.uniform(0, math.log(HIGHEST)))) for _ in range(20_000)]
    h = filled(values)
    s = sorted(values)
    edges = [h.bucket_bounds(i)[1] for i in range(0, len(h.counts), 37)]
    assert h.cumulative_le(edges) == [bisect.bisect_right(s, e) for e in edges]


# -- snapshot / Stats ---------------------------------------------------------------------------

def test_histogram_snapshot():
    values = list(range(1, 1001))
    snap = filled(values).snapshot()
    assert set(snap) == {"count", "mean", "p50", "p90", "p99", "p999", "max", "min"}
    assert snap["count"] == 1000 and snap["min"] == 1 and snap["max"] == 1000
    assert snap["mean"] == pytest.approx(500.5)
    assert 500 <= snap["p50"] <= 500 * 1.01 and 999 <= snap["p999"] <= 1000


def test_stats_snapshot_json_and_table():
    s = Stats()
    rnd = random.Random(1)
    for i, h in enumerate(s.histograms().values()):
        for _ in range(100 * i):
            h.record(rnd.randint(0, 2_000_000))
    s.frames_up += 3
    s.bytes_down += 640
    s.calls_active = 1
    s.count_error("session_expired")
    s.count_call_end("session.end")
    s.count_call_end("session.end")
    snap = s.snapshot()
    text = json.dumps(snap)
    assert json.loads(text) == snap
    assert set(snap) == {"uptime_s", "counters", "errors", "call_ends", "tools", "tokens",
                         "slow_frames", "gc", "latency_us"}
    assert set(snap["counters"]) == set(COUNTERS)
    assert snap["counters"]["frames_up"] == 3 and snap["counters"]["bytes_down"] == 640
    assert snap["errors"] == {"session_expired": 1}
    assert snap["call_ends"] == {"session.end": 2}
    assert list(snap["latency_us"]) == list(HISTOGRAMS)
    assert snap["latency_us"]["up_forward"]["count"] == 0
    assert snap["latency_us"]["call_setup"]["count"] == 700
    table = s.table()
    for name in HISTOGRAMS:
        assert name in table
    for name in COUNTERS:
        assert name in table
    assert "session_expired" in table and "session.end" in table
    print("\n" + table)


def test_stats_table_ms_with_3_decimals():
    s = Stats()
    s.barge_in.record(1234)                     # 1.234 ms, exact enough: bucket [1232, 1235]
    row = next(line for line in s.table().splitlines() if line.startswith("barge_in"))
    cells = row.split()
    assert cells[1] == "1"
    assert all(len(c.split(".")[1]) == 3 for c in cells[2:])
    assert cells[-1] == "1.234"                 # max is exact


def test_stats_histograms_are_separate():
    s = Stats()
    hs = s.histograms()
    assert list(hs) == list(HISTOGRAMS)
    assert len({id(h) for h in hs.values()}) == len(hs)
    assert all(h.name == n for n, h in hs.items())
    assert Stats().up_forward is not s.up_forward
