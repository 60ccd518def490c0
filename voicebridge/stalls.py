"""Stalls, seen in production: slow frames, event-loop lag and garbage-collector pauses.

What it gives operators (README "Stalls"):
- `slow_frame` (warning, one JSON line): one frame's path through the bridge (what the
  `up_forward` / `down_forward` histograms record: frame read -> frame handed to the other
  socket) took at least `server.slow_frame_ms`. Fields: `call_id`, `direction` (`up`: caller ->
  OpenAI, `down`: OpenAI -> caller), `forward_ms`, `threshold_ms`, `gc_ms` (the pause of a
  garbage collection that ended inside that frame, 0 if none), `suppressed` (lines of this event
  not written since the previous one, when there were any).
- `slow_loop` (warning): the loop probe, a timer every `server.loop_probe_ms`, ran `lag_ms >=
  server.slow_loop_ms` late, i.e. the event loop was held that long by something (one long
  callback, a big batch of work, a collection, or the process not running at all). Fields:
  `lag_ms`, `threshold_ms`, `interval_ms` (wall time since the previous tick), `cpu_ms` (this
  thread's CPU time in that interval), `gc_ms` (collector pauses in that interval), `hint`
  (`gc` when collections account for half the lag or more; `not_running` when the thread had
  less CPU time than half the lag: it was preempted by another process, throttled by a CPU quota,
  its vCPU was not running (steal), or it was blocked in a system call (a sleep, a slow disk
  write); otherwise `busy`: the loop was running, the bridge's own code or kernel work charged to
  it), `suppressed`.
- Each event writes at most `server.slow_log_max` lines per `server.slow_log_interval_s`; every
  occurrence is counted in `Stats.slow_frames` (`{"forward": n, "loop": n}`), which `/metrics`
  exposes as `voicebridge_slow_frames_total{kind}`.
- Every collection's pause goes into the `gc_pause` histogram (`voicebridge_gc_pause_seconds`),
  counts and total pause per generation into `Stats.gc_collections` / `Stats.gc_time_us`
  (`voicebridge_gc_collections_total{generation}`, `voicebridge_gc_time_seconds_total{generation}`);
  every probe tick's lag into the `loop_lag` histogram (`voicebridge_loop_lag_seconds`). All of
  them live in `Stats`, so they are in `/health`, the SIGUSR1 dump and a multi-worker merge.

Cost: the hot path only compares the forward time it already computed with `frame_us` (one
integer comparison per frame, no clock read, no allocation); the probe is one timer callback per
`loop_probe_ms` (two clock reads and a histogram record); the collector hook runs once per
collection (two clock reads and a record), and collections are rare in steady streaming.

Resolution: uvloop keeps timers in whole milliseconds, so the probe's lag is exact to about
1 ms; a stall shorter than `loop_probe_ms` is seen only if the probe's timer fell due inside it
(a sample, like any profiler's), one longer than that always.

`StallWatch` holds the decisions and takes its times as arguments (`slow_frame`, `on_gc_phase`,
`tick`), so they are tested without clocks; `start(loop)` / `stop()` are the only I/O (a
`gc.callbacks` entry and the probe's timer).

GC tuning (`tune_gc`, from `Bridge.start`): `server.gc_freeze` runs one full collection and then
`gc.freeze()` once the daemon has started, moving everything that exists by then (modules,
classes, functions, the configuration: ~45 000 objects) into the permanent generation that no
later collection scans. `server.gc_threshold` sets `gc.set_threshold` (the defaults of CPython).
"""

from __future__ import annotations

import asyncio
import gc
from time import monotonic_ns, thread_time_ns
from typing import Any, Callable, Iterable

from prometheus_client.metrics_core import CounterMetricFamily, Metric

from .log import get_logger
from .stats import Stats

__all__ = ["NEVER_US", "LogWindow", "StallWatch", "tune_gc", "metric_families", "GC_GENERATIONS"]

NEVER_US = 1 << 62          # `frame_us` when slow_frame_ms is 0 (off): no frame ever reaches it
GC_GENERATIONS = ("0", "1", "2")
SLOW_KINDS = ("forward", "loop")


class LogWindow:
    """At most `max_lines` passes per fixed window of `interval_ns`; the rest are counted.

    `allow(now_ns)`: None when refused; otherwise how many were refused since the previous pass
    (0 or more), which the caller writes as `suppressed`. A window starts at the first call after
    the previous one ended, so an idle stretch costs nothing and the first line after it passes.
    """

    __slots__ = ("max_lines", "interval_ns", "_start_ns", "_used", "_refused")

    def __init__(self, max_lines: int, interval_s: float) -> None:
        self.max_lines = max_lines
        self.interval_ns = int(interval_s * 1e9)
        self._start_ns: int | None = None
        self._used = 0
        self._refused = 0

    def allow(self, now_ns: int) -> int | None:
        if self._start_ns is None or now_ns - self._start_ns >= self.interval_ns:
            self._start_ns = now_ns
            self._used = 0
        if self._used >= self.max_lines:
            self._refused += 1
            return None
        self._used += 1
        refused, self._refused = self._refused, 0
        return refused


def _ms(us: int) -> float:
    return round(us / 1000, 3)


def _off_or_ms(us: int) -> float:
    return 0 if us >= NEVER_US else _ms(us)


class StallWatch:
    """Slow frames, loop lag and collector pauses of one daemon process (see the module docstring).

    `frame_us` is the forward-time threshold in µs the calls compare with (`NEVER_US`: off).
    `log` is any structlog-like logger (tests pass a recorder); `cpu_clock` the thread CPU clock
    the probe reads (ns).
    """

    def __init__(self, stats: Stats, *, slow_frame_ms: float = 10.0, slow_loop_ms: float = 20.0,
                 loop_probe_ms: float = 25.0, log_max: int = 5, log_interval_s: float = 60.0,
                 log: Any = None, clock: Callable[[], int] = monotonic_ns,
                 cpu_clock: Callable[[], int] = thread_time_ns) -> None:
        self.stats = stats
        self.frame_us = int(slow_frame_ms * 1000) if slow_frame_ms > 0 else NEVER_US
        self.loop_us = int(slow_loop_ms * 1000) if slow_loop_ms > 0 else NEVER_US
        self.probe_ns = int(loop_probe_ms * 1e6)
        self.log = log if log is not None else get_logger()
        self._frame_lines = LogWindow(log_max, log_interval_s)
        self._loop_lines = LogWindow(log_max, log_interval_s)
        self._clock = clock
        self._cpu_clock = cpu_clock
        # the collector: the running collection's start, the last one's end and pause, the sum
        self._gc_start_ns: int | None = None
        self.gc_last_end_ns = 0
        self.gc_last_pause_us = 0
        self.gc_total_us = 0
        # the probe: when its timer is due, and the clocks at the previous tick
        self._due_ns = 0
        self._prev_ns = 0
        self._prev_cpu_ns = 0
        self._prev_gc_us = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._hooked = False

    # ------------------------------------------------------------------ frames (hot path caller)
    def slow_frame(self, call_id: str, direction: str, forward_us: int, t0_ns: int,
                   now_ns: int) -> None:
        """A frame of `call_id` took `forward_us` (>= `frame_us`, the caller checked) from
        `t0_ns` on: count it, and log it unless this window's lines are used up."""
        counts = self.stats.slow_frames
        counts["forward"] = counts.get("forward", 0) + 1
        refused = self._frame_lines.allow(now_ns)
        if refused is None:
            return
        gc_us = self.gc_last_pause_us if self.gc_last_end_ns >= t0_ns else 0
        fields: dict[str, Any] = {"call_id": call_id, "direction": direction,
                                  "forward_ms": _ms(forward_us), "threshold_ms": _ms(self.frame_us),
                                  "gc_ms": _ms(gc_us)}
        if refused:
            fields["suppressed"] = refused
        self.log.warning("slow_frame", **fields)

    # ------------------------------------------------------------------ the collector
    def on_gc_phase(self, phase: str, generation: int, now_ns: int) -> None:
        """One `gc.callbacks` event (`phase` "start" or "stop") at `now_ns`."""
        if phase == "start":
            self._gc_start_ns = now_ns
            return
        start = self._gc_start_ns
        if start is None:                # hooked in the middle of a collection
            return
        pause_us = max(0, (now_ns - start) // 1000)
        self._gc_start_ns = None
        self.gc_last_end_ns = now_ns
        self.gc_last_pause_us = pause_us
        self.gc_total_us += pause_us
        st = self.stats
        st.gc_pause.record(pause_us)
        gen = GC_GENERATIONS[generation] if 0 <= generation < len(GC_GENERATIONS) else "other"
        st.gc_collections[gen] = st.gc_collections.get(gen, 0) + 1
        st.gc_time_us[gen] = st.gc_time_us.get(gen, 0) + pause_us

    def _gc_callback(self, phase: str, info: dict[str, Any]) -> None:
        try:
            self.on_gc_phase(phase, int(info.get("generation", -1)), self._clock())
        except Exception:    # a collector hook must never raise (it would be printed, not raised)
            pass

    # ------------------------------------------------------------------ the loop probe
    def arm(self, now_ns: int) -> None:
        """The probe's timer was (re)armed at `now_ns`: it is due `probe_ns` later."""
        self._due_ns = now_ns + self.probe_ns

    def reset_tick(self, now_ns: int, cpu_ns: int) -> None:
        """The clocks the next `tick` measures its interval from (the probe's start)."""
        self._prev_ns, self._prev_cpu_ns, self._prev_gc_us = now_ns, cpu_ns, self.gc_total_us

    def tick(self, now_ns: int, cpu_ns: int) -> int:
        """The probe's timer ran at `now_ns` (`cpu_ns`: this thread's CPU clock then): record
        its lag, count and log a slow loop. Returns the lag in µs."""
        lag_us = max(0, (now_ns - self._due_ns) // 1000)
        st = self.stats
        st.loop_lag.record(lag_us)
        if lag_us >= self.loop_us:
            counts = st.slow_frames
            counts["loop"] = counts.get("loop", 0) + 1
            refused = self._loop_lines.allow(now_ns)
            if refused is not None:
                cpu_us = max(0, (cpu_ns - self._prev_cpu_ns) // 1000)
                gc_us = self.gc_total_us - self._prev_gc_us
                hint = ("gc" if 2 * gc_us >= lag_us else "not_running" if 2 * cpu_us < lag_us
                        else "busy")
                fields: dict[str, Any] = {
                    "lag_ms": _ms(lag_us), "threshold_ms": _ms(self.loop_us),
                    "interval_ms": _ms(max(0, (now_ns - self._prev_ns) // 1000)),
                    "cpu_ms": _ms(cpu_us), "gc_ms": _ms(gc_us), "hint": hint}
                if refused:
                    fields["suppressed"] = refused
                self.log.warning("slow_loop", **fields)
        self.reset_tick(now_ns, cpu_ns)
        return lag_us

    def _on_timer(self) -> None:
        try:
            self.tick(self._clock(), self._cpu_clock())
        finally:
            self._schedule()

    def _schedule(self) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            self._timer = None
            return
        self.arm(self._clock())
        self._timer = loop.call_later(self.probe_ns / 1e9, self._on_timer)

    # ------------------------------------------------------------------ lifecycle (the I/O)
    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Hook the collector and, with `loop_probe_ms > 0`, start the probe on `loop`."""
        if not self._hooked:
            gc.callbacks.append(self._gc_callback)
            self._hooked = True
        if self.probe_ns > 0 and self._timer is None:
            self._loop = loop
            self.reset_tick(self._clock(), self._cpu_clock())
            self._schedule()

    def stop(self) -> None:
        """Unhook the collector and stop the probe (idempotent)."""
        if self._hooked:
            try:
                gc.callbacks.remove(self._gc_callback)
            except ValueError:
                pass
            self._hooked = False
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._loop = None

    def settings(self) -> dict[str, Any]:
        """The thresholds and the collector's state, for the start-up log line (`server.stalls`)."""
        return {"slow_frame_ms": _off_or_ms(self.frame_us), "slow_loop_ms": _off_or_ms(self.loop_us),
                "loop_probe_ms": self.probe_ns / 1e6, "gc_threshold": list(gc.get_threshold()),
                "gc_frozen": gc.get_freeze_count()}


def tune_gc(freeze: bool, threshold: Iterable[int] | None = None) -> dict[str, Any]:
    """Start-up GC settings: `threshold` (gc.set_threshold), then with `freeze` one full
    collection and `gc.freeze()`. Returns what was done, for the log."""
    out: dict[str, Any] = {}
    if threshold is not None:
        gc.set_threshold(*threshold)
    out["gc_threshold"] = list(gc.get_threshold())
    if freeze:
        gc.collect()
        gc.freeze()
    out["gc_frozen"] = gc.get_freeze_count()
    return out


def metric_families(stats: Stats) -> Iterable[Metric]:
    """The labelled counters of this module, for `metrics.StatsCollector` (the histograms
    `gc_pause` and `loop_lag` are exposed with the others)."""
    slow = CounterMetricFamily("voicebridge_slow_frames", "frames whose path through the bridge "
                               "took server.slow_frame_ms or more (kind=forward), event-loop probe "
                               "ticks server.slow_loop_ms or more late (kind=loop)", labels=["kind"])
    for kind in SLOW_KINDS:
        slow.add_metric([kind], stats.slow_frames.get(kind, 0))
    yield slow
    runs = CounterMetricFamily("voicebridge_gc_collections", "garbage collections, by generation",
                               labels=["generation"])
    spent = CounterMetricFamily("voicebridge_gc_time_seconds", "time spent in garbage collections "
                                "(the pauses), by generation", labels=["generation"])
    for gen in sorted(set(GC_GENERATIONS) | set(stats.gc_collections)):
        runs.add_metric([gen], stats.gc_collections.get(gen, 0))
        spent.add_metric([gen], stats.gc_time_us.get(gen, 0) / 1e6)
    yield runs
    yield spent
