"""The bridge's measurements: fixed-memory log-linear latency histograms and plain counters.

Sans-I/O: nothing here touches a socket or an event loop. The bridge records into one `Stats` per
process; `/metrics` (see `metrics.py`), `/health` and the SIGUSR1 dump read it.

Histogram layout (HDR-style, log-linear)
----------------------------------------
With `S = sub_bits` and `H = 2**(S-1)`, a value `v` (a non-negative int, microseconds by convention)
goes into bucket

    s     = max(0, v.bit_length() - S)          # how many low bits are dropped
    index = s * H + (v >> s)

* `v < 2**S` (s = 0): one bucket per value, `index == v`, exact.
* `v >= 2**S`: `v >> s` is the top S bits of `v` (always in `[H, 2H)`), so each power-of-two range
  `[2**(S-1+s), 2**(S+s))` is split into H equal buckets of width `2**s`. A bucket's width is at
  most `1/H` of its lowest value: relative error `< 2**-(S-1)` (0.78 % for the default S = 8).

Buckets are contiguous in `index`; the count list has `index(highest) + 1` entries, allocated in
`__init__` and never resized. For the defaults (highest = 60 s, S = 8) that is 2533 counters.

Percentiles use the nearest-rank definition (`rank = ceil(p/100 * count)`, the rank-th smallest
value). Counts are exact, so the bucket holding the rank-th value is found exactly; the value
reported is that bucket's *upper edge* (highest value that maps to it), clamped to the exact
`max`. So the reported percentile is never below the true one and over-states it by less than
`2**-(S-1)` relative (values below `2**S`: exactly). `percentile(0) == min`, `percentile(100) ==
max`, both exact.

Threading: `record` is meant for one thread (the event loop). Readers copy the bucket list once
per read (an atomic list copy under the GIL), so a read from another thread sees a consistent
bucket list (`+Inf == count` etc.); `total`/`min`/`max` may then differ by in-flight records.
"""

from __future__ import annotations

import functools
import math
import time
from bisect import bisect_left, bisect_right
from fractions import Fraction
from itertools import accumulate
from typing import Any, NamedTuple, Sequence

__all__ = ["Histogram", "Stats", "COUNTERS", "HISTOGRAMS"]


class _Layout(NamedTuple):
    """Bucket layout shared by every histogram with the same (highest, sub_bits)."""
    shift: tuple[int, ...]    # by bit_length(v): bits dropped, s
    offset: tuple[int, ...]   # by bit_length(v): s * 2**(sub_bits-1)
    upper: tuple[int, ...]    # by bucket index: highest value in the bucket, capped at `highest`
    lower: tuple[int, ...]    # by bucket index: lowest value in the bucket


@functools.lru_cache(maxsize=None)
def _layout(highest: int, sub_bits: int) -> _Layout:
    half = 1 << (sub_bits - 1)
    nbits = highest.bit_length()
    shift = tuple(max(0, b - sub_bits) for b in range(nbits + 1))
    offset = tuple(s * half for s in shift)
    s_top = shift[nbits]
    n = offset[nbits] + (highest >> s_top) + 1
    lower = []
    upper = []
    for i in range(n):
        s = max(0, i // half - 1)
        lo = (i - s * half) << s
        lower.append(lo)
        upper.append(min(lo + (1 << s) - 1, highest))
    return _Layout(shift, offset, tuple(upper), tuple(lower))


def _rank(p: float, n: int) -> int:
    """Nearest rank (1-based) of percentile `p` among `n` values: ceil(p/100 * n), at least 1.

    `p` is read as the decimal it prints as (99.9 means 999/10), so float noise such as
    `99.9 * 1000 / 100 == 999.0000000000001` does not move the rank.
    """
    return max(1, math.ceil(Fraction(str(p)) * n / 100))


class Histogram:
    """Log-linear histogram of non-negative integer values (microseconds by convention).

    Contract:
    * `record(v)`: `v` is a Python `int`. `v < 0` is recorded as 0 (counted in `negative`);
      `v > highest` is recorded as `highest` (counted in `clamped`). O(1), no allocation
      beyond int results, memory fixed at construction.
    * `count`, `total` (exact sum of recorded values, after clamping), `min`, `max` (exact,
      after clamping, 0 when empty).
    * `percentile(p)`: see the module docstring; relative over-statement < 2**-(sub_bits-1).
    * `cumulative_le(bounds)`: for each bound b, how many values are <= b (see its docstring).
    """

    __slots__ = ("name", "help", "highest", "sub_bits", "counts", "total", "max", "_min",
                 "clamped", "negative", "_shift", "_offset", "_layout")

    def __init__(self, name: str, help: str, highest: int = 60_000_000, sub_bits: int = 8) -> None:
        if not isinstance(highest, int) or highest < 1:
            raise ValueError(f"highest must be an int >= 1, got {highest!r}")
        if not isinstance(sub_bits, int) or not 2 <= sub_bits <= 24:
            raise ValueError(f"sub_bits must be an int in 2..24, got {sub_bits!r}")
        self.name = name
        self.help = help
        self.highest = highest
        self.sub_bits = sub_bits
        lay = _layout(highest, sub_bits)
        self._layout = lay
        self._shift = lay.shift
        self._offset = lay.offset
        self.counts: list[int] = [0] * len(lay.upper)   # fixed length, never resized
        self.total = 0
        self.max = 0
        self._min = highest + 1                          # sentinel: nothing recorded yet
        self.clamped = 0
        self.negative = 0

    # -- hot path ----------------------------------------------------------------------------
    # Measured alternatives (CPython 3.11, see bench/record_cost.py): an array('q') for the counts
    # is ~40 ns slower than a list (boxing on every +=); keeping a separate `count` costs ~25 ns,
    # so count is derived from the buckets on read; a 64 Ki-entry index table for small values
    # and closures instead of a method were not measurably faster. A `record_since(t0_ns)` that
    # reads perf_counter_ns() itself (body inlined, clock bound locally) measured 10-40 ns
    # *slower* than `h.record((perf_counter_ns() - t0) // 1000)` at the call site, so there is
    # none: call sites do the subtraction themselves.

    def record(self, value: int) -> None:
        """Count one value (int, µs by convention). O(1); costs ~0.2 µs in CPython 3.11."""
        if not 0 <= value <= self.highest:
            if value < 0:
                value = 0
                self.negative += 1
            else:
                value = self.highest
                self.clamped += 1
        bl = value.bit_length()
        self.counts[self._offset[bl] + (value >> self._shift[bl])] += 1
        self.total += value
        if value > self.max:
            self.max = value
        if value < self._min:
            self._min = value

    # -- reading -----------------------------------------------------------------------------

    @property
    def count(self) -> int:
        """Number of recorded values (sum of the buckets; O(buckets), not for the hot path)."""
        return sum(self.counts)

    @property
    def min(self) -> int:
        """Smallest recorded value (exact), 0 when empty."""
        m = self._min
        return 0 if m > self.highest else m

    @property
    def mean(self) -> float:
        """Exact mean of the recorded values (after clamping), 0.0 when empty."""
        n = self.count
        return self.total / n if n else 0.0

    def bucket_index(self, value: int) -> int:
        """Index of the bucket `value` (already within 0..highest) is counted in."""
        bl = value.bit_length()
        return self._offset[bl] + (value >> self._shift[bl])

    def bucket_bounds(self, index: int) -> tuple[int, int]:
        """(lowest, highest) value counted in bucket `index`, inclusive; the top one is capped
        at `highest`."""
        return self._layout.lower[index], self._layout.upper[index]

    @property
    def nbytes(self) -> int:
        """Bytes held by the bucket list itself (pointer array; small counts share cached ints,
        counts above 256 are int objects of 28-32 bytes in the non-empty buckets)."""
        return self.counts.__sizeof__()

    def _cum(self) -> list[int]:
        """Cumulative bucket counts, from one copy of the bucket list."""
        return list(accumulate(self.counts.copy()))

    def _at_ranks(self, cum: list[int], ps: Sequence[float]) -> list[int]:
        n = cum[-1]
        if n == 0:
            return [0] * len(ps)
        mx = self.max
        mn = self.min
        upper = self._layout.upper
        out = []
        for p in ps:
            if not 0 <= p <= 100:
                raise ValueError(f"percentile must be in [0, 100], got {p!r}")
            r = _rank(p, n)
            if r <= 1:
                out.append(mn)
            else:
                v = upper[bisect_left(cum, r)]
                out.append(v if v < mx else mx)
        return out

    def percentile(self, p: float) -> int:
        """Nearest-rank percentile `p` in [0, 100], as the upper edge of the bucket holding the
        rank-th value, capped at `max` (never below the true value, over by < 2**-(sub_bits-1)
        relative). 0 when empty; `percentile(0) == min`, `percentile(100) == max` exactly."""
        return self._at_ranks(self._cum(), (p,))[0]

    def percentiles(self, ps: Sequence[float]) -> list[int]:
        """`[percentile(p) for p in ps]` from a single pass over the buckets."""
        return self._at_ranks(self._cum(), ps)

    def cumulative_le(self, bounds: Sequence[int]) -> list[int]:
        """For each bound b (any order, µs): how many recorded values are <= b.

        Exact when b < min (0), b >= max (count), b < 2**sub_bits, or b is a bucket's upper
        edge. Otherwise the bucket containing b is counted as a whole only if its upper edge is
        <= b, i.e. values in [bucket lower edge, b] are counted as above b: the same rounding
        up as `percentile`, off by at most one bucket (< 2**-(sub_bits-1) of b).
        Non-decreasing in b.
        """
        cum = self._cum()
        n = cum[-1]
        upper = self._layout.upper
        mx = self.max
        mn = self.min
        out = []
        for b in bounds:
            if n == 0 or b < mn:
                out.append(0)
            elif b >= mx:
                out.append(n)
            else:
                k = bisect_right(upper, b)        # buckets whose upper edge is <= b
                out.append(cum[k - 1] if k else 0)
        return out

    def snapshot(self) -> dict[str, Any]:
        """{"count", "mean", "p50", "p90", "p99", "p999", "max", "min"}: ints in the unit
        (µs), mean a float; all 0 when empty."""
        cum = self._cum()
        n = cum[-1]
        p50, p90, p99, p999 = self._at_ranks(cum, (50, 90, 99, 99.9))
        return {"count": n, "mean": self.total / n if n else 0.0, "p50": p50, "p90": p90,
                "p99": p99, "p999": p999, "max": self.max if n else 0, "min": self.min}

    # -- maintenance -------------------------------------------------------------------------

    def merge(self, other: "Histogram") -> None:
        """Add `other`'s values into this one. Same `highest` and `sub_bits` required
        (ValueError otherwise). Afterwards this histogram equals one that recorded both."""
        if not isinstance(other, Histogram) or (other.highest, other.sub_bits) != (self.highest, self.sub_bits):
            raise ValueError("cannot merge histograms with different layouts "
                             f"({self.highest}, {self.sub_bits}) vs "
                             f"({getattr(other, 'highest', None)}, {getattr(other, 'sub_bits', None)})")
        c = self.counts
        for i, k in enumerate(other.counts.copy()):
            if k:
                c[i] += k
        self.total += other.total
        self.clamped += other.clamped
        self.negative += other.negative
        if other.max > self.max:
            self.max = other.max
        if other._min < self._min:
            self._min = other._min

    def reset(self) -> None:
        """Forget everything recorded; the bucket list keeps its length and identity."""
        c = self.counts
        for i in range(len(c)):
            c[i] = 0
        self.total = 0
        self.max = 0
        self._min = self.highest + 1
        self.clamped = 0
        self.negative = 0

    def __repr__(self) -> str:
        return (f"Histogram({self.name!r}, count={self.count}, min={self.min}, max={self.max}, "
                f"buckets={len(self.counts)})")


# name -> help, in display order. All in microseconds.
HISTOGRAMS: dict[str, str] = {
    "up_forward": "caller frame received -> input_audio_buffer.append handed to the OpenAI socket",
    "down_forward": "model delta received -> playStream.chunk handed to the VAIC socket (chunks sent at once)",
    "pacer_late": "paced chunks: actual send time - due time",
    "model_ttfa": "speech_stopped/committed -> first output_audio.delta of the next response",
    "turn_overhead": "first delta of a response received -> its first playStream.chunk sent",
    "barge_in": "speech_started received -> playStream.stop sent",
    "openai_connect": "dial start -> OpenAI socket open",
    "call_setup": "session.initiate received -> session.accepted sent",
    "play_clock_diff": "|our playout clock - VAIC's playFinished playedDurationMS| per play stream",
    "gc_pause": "one garbage collection (any generation), start to stop: the loop is held meanwhile",
    "loop_lag": "event-loop probe timer (every server.loop_probe_ms): how late it ran",
}

# name -> help. calls_active is a level (gauge); the rest only ever increase.
COUNTERS: dict[str, str] = {
    "calls_total": "calls accepted",
    "calls_active": "calls in progress",
    "calls_rejected": "calls declined with session.error",
    "calls_refused": "upgrades refused with HTTP 503 (server.max_calls, shutting down)",
    "auth_rejected": "upgrades refused with HTTP 401 (bad or missing bearer token)",
    "frames_up": "caller audio frames forwarded to OpenAI",
    "frames_down": "playStream.chunk messages sent to VAIC",
    "bytes_up": "bytes of caller audio forwarded (decoded, as sent to OpenAI)",
    "bytes_down": "bytes of assistant audio forwarded (decoded, as sent to VAIC)",
    "truncates": "conversation.item.truncate sent",
    "barge_ins": "barge-ins handled",
    "late_deltas_dropped": "deltas of cancelled responses dropped",
    "early_audio_dropped": "early caller frames dropped (buffer bound)",
    "vaic_barge_in_off": "calls where VAIC stopped the caller stream while the bot played (barge-in off)",
    "openai_reconnects": "OpenAI sessions replaced mid-call after a loss (socket lost, session expired)",
    "openai_rotations": "OpenAI sessions replaced mid-call on purpose (openai.rotate_after_s)",
}

TOKEN_KINDS = ("input_audio", "input_text", "input_cached", "output_audio", "output_text")


class Stats:
    """All of the bridge's measurements. One instance per process; calls record into it directly.

    Histograms (µs): up_forward, down_forward, pacer_late, model_ttfa, turn_overhead, barge_in,
    openai_connect, call_setup (see `HISTOGRAMS`). Counters (plain int attributes, incremented
    in place): see `COUNTERS`. `errors` counts OpenAI error events by code, `call_ends` call end
    reasons. `started` is `time.monotonic()` at creation.
    """

    __slots__ = (*HISTOGRAMS, *COUNTERS, "errors", "call_ends", "tools", "tokens",
                 "slow_frames", "gc_collections", "gc_time_us", "started",
                 "dial_fail_streak",
                 "dial_fail_since_ns", "dial_fail_last_ns")

    up_forward: Histogram
    down_forward: Histogram
    pacer_late: Histogram
    model_ttfa: Histogram
    turn_overhead: Histogram
    barge_in: Histogram
    openai_connect: Histogram
    call_setup: Histogram
    play_clock_diff: Histogram
    gc_pause: Histogram
    loop_lag: Histogram
    calls_total: int
    calls_active: int
    calls_rejected: int
    calls_refused: int
    auth_rejected: int
    frames_up: int
    frames_down: int
    bytes_up: int
    bytes_down: int
    truncates: int
    barge_ins: int
    late_deltas_dropped: int
    early_audio_dropped: int
    vaic_barge_in_off: int
    openai_reconnects: int
    openai_rotations: int
    errors: dict[str, int]
    call_ends: dict[str, int]
    tools: dict[str, int]        # "tool|outcome" -> calls (outcome: ok, error, timeout, ...)
    tokens: dict[str, int]       # "profile|kind" -> tokens, kind in TOKEN_KINDS
    slow_frames: dict[str, int]  # stalls.py: "forward" (slow_frame), "loop" (slow_loop) -> count
    gc_collections: dict[str, int]   # stalls.py: generation "0".."2" -> collections
    gc_time_us: dict[str, int]       # stalls.py: generation -> µs spent in its collections
    started: float
    dial_fail_streak: int        # OpenAI dials failed in a row, daemon-wide (0 after a success)
    dial_fail_since_ns: int      # monotonic ns of the first failure of that streak
    dial_fail_last_ns: int       # ... and of its latest one

    def __init__(self) -> None:
        for name, help in HISTOGRAMS.items():
            setattr(self, name, Histogram(name, help))
        for name in COUNTERS:
            setattr(self, name, 0)
        self.errors = {}
        self.call_ends = {}
        self.tools = {}
        self.tokens = {}
        self.slow_frames = {"forward": 0, "loop": 0}
        self.gc_collections = {"0": 0, "1": 0, "2": 0}
        self.gc_time_us = {"0": 0, "1": 0, "2": 0}
        self.started = time.monotonic()
        self.dial_fail_streak = 0
        self.dial_fail_since_ns = 0
        self.dial_fail_last_ns = 0

    def note_dial(self, ok: bool, now_ns: int) -> None:
        """One OpenAI dial attempt ended (any call): feeds the daemon's readiness."""
        if ok:
            self.dial_fail_streak = 0
            self.dial_fail_since_ns = self.dial_fail_last_ns = 0
        else:
            if not self.dial_fail_streak:
                self.dial_fail_since_ns = now_ns
            self.dial_fail_streak += 1
            self.dial_fail_last_ns = now_ns

    def dials_failing_s(self, now_ns: int, recent_s: float) -> float:
        """How long every OpenAI dial has been failing (first to latest failure of a streak of
        at least 2), or 0 once the latest failure is older than `recent_s`: an instance taken
        out of rotation gets no calls, so no dial could ever prove it well again; after
        `recent_s` without one it is let back in, and the next calls' dials decide."""
        if self.dial_fail_streak < 2 or now_ns - self.dial_fail_last_ns > recent_s * 1e9:
            return 0.0
        return (self.dial_fail_last_ns - self.dial_fail_since_ns) / 1e9

    def histograms(self) -> dict[str, Histogram]:
        """name -> Histogram, in display order."""
        return {name: getattr(self, name) for name in HISTOGRAMS}

    def counters(self) -> dict[str, int]:
        """name -> value of every counter (including the calls_active gauge)."""
        return {name: getattr(self, name) for name in COUNTERS}

    def count_error(self, code: str) -> None:
        """One more OpenAI error event with `code` (at most 64 codes; later new ones count as
        "other": the code comes from the upstream, and each is a metric label)."""
        errors = self.errors
        if code not in errors and len(errors) >= 64:
            code = "other"
        errors[code] = errors.get(code, 0) + 1

    def count_tool(self, tool: str, outcome: str) -> None:
        """One more function call of `tool` that ended with `outcome` (at most 256 keys: tool
        names come from the model)."""
        key = f"{tool}|{outcome}"
        if key not in self.tools and len(self.tools) >= 256:
            key = f"other|{outcome}"
        self.tools[key] = self.tools.get(key, 0) + 1

    def count_tokens(self, profile: str, usage: Any) -> None:
        """Add one `response.done`'s usage (realtime.Usage) to the profile's token counters."""
        i, o = usage.input_token_details, usage.output_token_details
        if i is not None:
            vals = (i.audio_tokens, i.text_tokens, i.cached_tokens)
        else:
            vals = (0, usage.input_tokens, 0)
        outs = (o.audio_tokens, o.text_tokens) if o is not None else (0, usage.output_tokens)
        tokens = self.tokens
        for kind, n in zip(TOKEN_KINDS, (*vals, *outs)):
            if n:
                key = f"{profile}|{kind}"
                tokens[key] = tokens.get(key, 0) + n

    def count_call_end(self, reason: str) -> None:
        """One more call ended for `reason`."""
        self.call_ends[reason] = self.call_ends.get(reason, 0) + 1

    def uptime_s(self, now: float | None = None) -> float:
        """Seconds since creation (`now` is a `time.monotonic()` value; default: now)."""
        return (time.monotonic() if now is None else now) - self.started

    def snapshot(self, now: float | None = None) -> dict[str, Any]:
        """Everything, JSON-serialisable: {"uptime_s", "counters", "errors", "call_ends",
        "latency_us": {name: Histogram.snapshot()}}."""
        return {"uptime_s": round(self.uptime_s(now), 3),
                "counters": self.counters(),
                "errors": dict(self.errors),
                "call_ends": dict(self.call_ends),
                "tools": dict(self.tools),
                "tokens": dict(self.tokens),
                "slow_frames": dict(self.slow_frames),
                "gc": {"collections": dict(self.gc_collections), "time_us": dict(self.gc_time_us)},
                "latency_us": {name: h.snapshot() for name, h in self.histograms().items()}}

    def table(self) -> str:
        """Human-readable table: one row per histogram (count, p50/p90/p99/p99.9/max in ms with
        3 decimals), then counters, OpenAI errors and call end reasons."""
        cols = ("p50", "p90", "p99", "p999", "max")
        head = f"{'latency (ms)':<16}{'count':>10}" + "".join(
            f"{c:>11}" for c in ("p50", "p90", "p99", "p99.9", "max"))
        lines = [head, "-" * len(head)]
        for name, h in self.histograms().items():
            s = h.snapshot()
            lines.append(f"{name:<16}{s['count']:>10}" + "".join(f"{s[c] / 1000:>11.3f}" for c in cols))
        lines.append("")
        width = max(len(n) for n in COUNTERS)
        lines.append(f"{'uptime_s':<{width}}  {self.uptime_s():.1f}")
        lines.extend(f"{name:<{width}}  {value}" for name, value in self.counters().items())
        for title, d in (("openai errors", self.errors), ("call ends", self.call_ends),
                         ("tool calls", self.tools), ("tokens", self.tokens),
                         ("slow frames", self.slow_frames), ("gc collections", self.gc_collections),
                         ("gc time (us)", self.gc_time_us)):
            if d:
                lines.append(f"{title}:")
                lines.extend(f"  {k}  {v}" for k, v in sorted(d.items()))
        return "\n".join(lines)
