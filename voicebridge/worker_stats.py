"""Worker processes' stats as snapshots, and their merge into one view of the whole daemon.

Sans-I/O: encoding, decoding and merging only. No file, socket or clock is touched here; the
worker (`worker.py`) and the supervisor (`supervisor.py`) do the I/O and pass times in
(`CLOCK_MONOTONIC` nanoseconds, the same clock in every process of the machine).

Contract
- `snapshot_of(stats, ...)` -> `WorkerSnapshot`: every counter of `stats.COUNTERS`, every
  labelled counter (each `Stats` attribute that is a dict of ints: OpenAI error codes, call end
  reasons, tool calls, tokens, ...), every histogram of `stats.HISTOGRAMS` as its bucket list
  (trailing empty buckets dropped) plus total/min/max/clamped/negative, and a few process
  figures. All of it is read generically, so a counter, dict or histogram added to `stats.py`
  travels without a change here. Costs ~70 µs for the 8 histograms of today.
- `encode(snapshot)` / `decode_snapshot(data)` / `decode_state(data)`: msgpack (msgspec). A
  decoder refuses (raises `SnapshotError`, never a traceback) more than `MAX_SNAPSHOT_BYTES`,
  negative counts, a histogram layout other than ours or with more buckets than it, and more
  than `MAX_LABELS` keys in one labelled counter. Bucket counts travel as packed int64 (native
  byte order: every process runs on the same machine), so decoding is a copy and merging a numpy
  sum: at most 2533 x 8 bytes per histogram, ~10-70 KB in practice, `MAX_SNAPSHOT_BYTES`
  whatever the counts.
- `DaemonState` is what the supervisor writes: the generation (`gen`, one per worker process
  started) whose snapshot counts for each worker slot (`live_gen`), the restarts per slot, and
  `retired`: the sum of the last snapshot of every worker process that died.
- `merge(snapshots, state)` -> `Merged`: a `Stats` equal to one that had recorded everything in
  `retired` and in the live snapshots. A snapshot whose gen is not `state.live_gen[slot]` is a
  dead process's (already folded into `retired`, or about to be): it is skipped, so nothing is
  counted twice. Readers read the worker files *before* the state file; the supervisor writes
  the state (the dead process in `retired`, its gen no longer live) *before* it deletes the dead
  process's file: whichever a reader sees, each process is counted once.

Counter semantics (Prometheus): the daemon's totals (`voicebridge_calls_total`, every
histogram) are retired + live, so they never go down when a worker dies and is replaced: no
spurious counter reset, `rate()` stays right. What a dead worker counted after its last
snapshot (at most one publish interval) is lost from the totals. Gauges (`calls_active`) sum the
live workers only. The per-worker series (label `worker`) are the worker process's own
counters: they restart at 0 with a new process, an ordinary counter reset.
"""

from __future__ import annotations

import functools
from array import array
from typing import Annotated, Any, Iterable, NamedTuple, Sequence

import msgspec
import numpy as np
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .stats import COUNTERS, HISTOGRAMS, Histogram, Stats

__all__ = ["MAX_LABELS", "MAX_SNAPSHOT_BYTES", "DaemonState", "HistogramSnapshot", "Merged",
           "SnapshotError", "WorkerSnapshot", "WorkersCollector", "decode_snapshot", "decode_state",
           "encode", "fold", "merge", "snapshot_of", "stats_of", "worker_rows"]

MAX_SNAPSHOT_BYTES = 4 << 20   # a file larger than this is refused unread (9 full histograms: 182 KB)
MAX_LABELS = 256               # keys per labelled counter (Stats caps errors at 64, tools at 256)
MAX_LABEL_DICTS = 32           # labelled counters per snapshot
STALE_S = 3.0                  # a live worker's snapshot older than this: reported as not up

Count = Annotated[int, msgspec.Meta(ge=0)]


class SnapshotError(ValueError):
    """A snapshot or state file that cannot be used; the message says why (bounded)."""


class HistogramSnapshot(msgspec.Struct, array_like=True, frozen=True):
    """One `Histogram`: `counts` is its bucket list without the trailing empty buckets, packed
    int64 (`array("q")`)."""
    highest: int
    sub_bits: int
    counts: bytes
    total: Count
    max: Count
    min: Count          # 0 when empty
    clamped: Count
    negative: Count


class WorkerSnapshot(msgspec.Struct, frozen=True):
    """One worker process's `Stats` at `at_ns` (CLOCK_MONOTONIC ns), with its identity."""
    slot: int                    # 0..workers-1 (-1: the supervisor's `retired` sum)
    gen: int                     # which process of that slot (the supervisor numbers them)
    pid: int
    at_ns: int
    started_ns: int
    draining: bool = False
    reloads: int = 0
    max_calls: int = 0
    counters: dict[str, Count] = {}
    labelled: dict[str, dict[str, Count]] = {}   # Stats attribute -> its dict (errors, call_ends, ...)
    histograms: dict[str, HistogramSnapshot] = {}
    cpu_s: float = 0.0
    rss_kib: int | None = None
    open_fds: int | None = None
    tasks: int = 0


class DaemonState(msgspec.Struct, frozen=True):
    """Written by the supervisor whenever a worker starts or dies (see the module docstring)."""
    supervisor_pid: int
    started_ns: int              # CLOCK_MONOTONIC
    started_unix: float          # the same instant, wall clock (process_start_time_seconds)
    workers: int
    live_gen: list[int]          # per slot: the gen whose snapshot counts (0: none running)
    restarts: list[int]          # per slot: processes started after the first
    retired: WorkerSnapshot | None = None


_encoder = msgspec.msgpack.Encoder()
_snapshot_decoder = msgspec.msgpack.Decoder(WorkerSnapshot)
_state_decoder = msgspec.msgpack.Decoder(DaemonState)
_reference: Stats | None = None


def _ref() -> Stats:
    """A `Stats` of this build: the histogram layouts snapshots must have."""
    global _reference
    if _reference is None:
        _reference = Stats()
    return _reference


def _capped(d: dict[str, int]) -> dict[str, int]:
    if len(d) <= MAX_LABELS:
        return dict(d)
    items = list(d.items())
    keep = dict(items[:MAX_LABELS - 1])
    keep["other"] = keep.get("other", 0) + sum(v for _, v in items[MAX_LABELS - 1:])
    return keep


@functools.lru_cache(maxsize=1)
def _label_attrs() -> tuple[str, ...]:
    """The `Stats` attributes that are dicts (labelled counters), in slot order."""
    st = Stats()
    return tuple(name for name in Stats.__slots__
                 if name not in HISTOGRAMS and name not in COUNTERS and isinstance(getattr(st, name, None), dict))


def _labelled(stats: Stats) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for name in _label_attrs()[:MAX_LABEL_DICTS]:
        d = getattr(stats, name)
        if all(type(v) is int and v >= 0 for v in d.values()):   # counts only (never a float)
            out[name] = _capped(d)
    return out


def _hist_snapshot(h: Histogram) -> HistogramSnapshot:
    return HistogramSnapshot(h.highest, h.sub_bits, array("q", h.counts[:h.bucket_index(h.max) + 1]).tobytes(),
                             h.total, h.max, h.min, h.clamped, h.negative)


def snapshot_of(stats: Stats, *, slot: int, gen: int, pid: int, at_ns: int, started_ns: int,
                draining: bool = False, reloads: int = 0, max_calls: int = 0, cpu_s: float = 0.0,
                rss_kib: int | None = None, open_fds: int | None = None,
                tasks: int = 0) -> WorkerSnapshot:
    """Everything `stats` holds, as one snapshot (see the module docstring)."""
    return WorkerSnapshot(
        slot=slot, gen=gen, pid=pid, at_ns=at_ns, started_ns=started_ns, draining=draining,
        reloads=reloads, max_calls=max_calls, counters=stats.counters(), labelled=_labelled(stats),
        histograms={name: _hist_snapshot(h) for name, h in stats.histograms().items()},
        cpu_s=cpu_s, rss_kib=rss_kib, open_fds=open_fds, tasks=tasks)


def encode(obj: WorkerSnapshot | DaemonState) -> bytes:
    return _encoder.encode(obj)


def _validate(s: WorkerSnapshot) -> None:
    if len(s.labelled) > MAX_LABEL_DICTS or any(len(d) > MAX_LABELS for d in s.labelled.values()):
        raise SnapshotError(f"more than {MAX_LABEL_DICTS} labelled counters or {MAX_LABELS} keys in one")
    ref = _ref().histograms()
    for name, h in s.histograms.items():
        r = ref.get(name)
        if r is None:
            continue    # a histogram this build does not know: ignored by merge
        if ((h.highest, h.sub_bits) != (r.highest, r.sub_bits) or len(h.counts) % 8
                or len(h.counts) // 8 > len(r.counts)):
            raise SnapshotError(f"histogram {name[:40]!r}: layout ({h.highest}, {h.sub_bits}, "
                                f"{len(h.counts)} bytes of buckets) is not this build's")
        if h.counts and int(np.frombuffer(h.counts, dtype=np.int64).min()) < 0:
            raise SnapshotError(f"histogram {name[:40]!r}: a negative bucket count")


def _decode_bounded(data: bytes, decoder: Any, what: str, article: str) -> Any:
    """`decoder.decode(data)`, refusing more than MAX_SNAPSHOT_BYTES; SnapshotError on failure."""
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"{what} of {len(data)} bytes, more than {MAX_SNAPSHOT_BYTES}")
    try:
        return decoder.decode(data)
    except (msgspec.DecodeError, msgspec.ValidationError) as e:
        raise SnapshotError(f"not {article}: {str(e)[:200]}") from None


def decode_snapshot(data: bytes) -> WorkerSnapshot:
    """A worker's snapshot from `encode`'s bytes; SnapshotError if it is unusable."""
    s: WorkerSnapshot = _decode_bounded(data, _snapshot_decoder, "snapshot", "a worker snapshot")
    _validate(s)
    return s


def decode_state(data: bytes) -> DaemonState:
    """The supervisor's state from `encode`'s bytes; SnapshotError if it is unusable."""
    st: DaemonState = _decode_bounded(data, _state_decoder, "state", "a supervisor state")
    if st.retired is not None:
        _validate(st.retired)
    if not (len(st.live_gen) == len(st.restarts) == st.workers):
        raise SnapshotError("supervisor state: live_gen / restarts do not match workers")
    return st


# ------------------------------------------------------------------------------------ merging

def _sum(parts: Iterable[tuple[WorkerSnapshot, bool]]) -> Stats:
    """A fresh `Stats` holding the sum of the snapshots; each comes with `gauges`: whether its
    levels (calls_active) count (False for `retired`, whose calls are gone)."""
    stats = Stats()
    hists = stats.histograms()
    sums: dict[str, Any] = {}     # name -> int64 array of the summed buckets
    for s, gauges in parts:
        for name, v in s.counters.items():
            if name in COUNTERS and (gauges or name != "calls_active"):
                setattr(stats, name, getattr(stats, name) + v)
        for attr, d in s.labelled.items():
            if attr not in _label_attrs():
                continue
            target: dict[str, int] = getattr(stats, attr)
            for key, v in d.items():
                target[key] = target.get(key, 0) + v
        for name, hs in s.histograms.items():
            h = hists.get(name)
            if h is None or (hs.highest, hs.sub_bits) != (h.highest, h.sub_bits):
                continue
            counts = np.frombuffer(hs.counts, dtype=np.int64)
            if len(counts) > len(h.counts) or not counts.any():
                continue
            acc = sums.get(name)
            if acc is None:
                acc = sums[name] = np.zeros(len(h.counts), dtype=np.int64)
            acc[:len(counts)] += counts
            h.total += hs.total
            h.clamped += hs.clamped
            h.negative += hs.negative
            if hs.max > h.max:
                h.max = hs.max
            if hs.min < h._min:     # Histogram.merge's rule, without building a Histogram first
                h._min = hs.min
    for name, acc in sums.items():
        hists[name].counts[:] = acc.tolist()   # same length: the list stays the histogram's own
    return stats


def stats_of(snapshots: Iterable[WorkerSnapshot], *, started_s: float | None = None,
             gauges: bool = True) -> Stats:
    """A fresh `Stats` holding the sum of `snapshots`. `started_s`: its `started`
    (`time.monotonic()` seconds), so `uptime_s` is the daemon's."""
    st = _sum((s, gauges) for s in snapshots)
    if started_s is not None:
        st.started = started_s
    return st


def fold(retired: WorkerSnapshot | None, dead: WorkerSnapshot) -> WorkerSnapshot:
    """`retired` plus the last snapshot of a process that died (the supervisor's bookkeeping):
    counters, labelled counters, histograms and CPU seconds add up; calls_active is dropped."""
    parts = [dead] if retired is None else [retired, dead]
    st = stats_of(parts, gauges=False)
    cpu = sum(p.cpu_s for p in parts)
    return snapshot_of(st, slot=-1, gen=0, pid=0, at_ns=dead.at_ns, started_ns=0, cpu_s=cpu)


class Merged(NamedTuple):
    """One view of the daemon: `stats` (retired + live), the live snapshots in slot order, the
    supervisor's state (None when it could not be read), and when it was built."""
    stats: Stats
    live: list[WorkerSnapshot]
    state: DaemonState | None
    at_ns: int

    @property
    def draining(self) -> bool:
        return any(s.draining for s in self.live)

    @property
    def reloads(self) -> int:
        """SIGHUPs taken: the most any live worker took (each reloads on every SIGHUP)."""
        return max((s.reloads for s in self.live), default=0)

    @property
    def cpu_s(self) -> float:
        retired = self.state.retired if self.state is not None else None
        return sum(s.cpu_s for s in self.live) + (retired.cpu_s if retired is not None else 0.0)

    def process(self) -> dict[str, int | None]:
        """Summed process figures of the live workers ({"open_fds", "tasks", "rss_kib"})."""
        def total(values: Sequence[int | None]) -> int | None:
            return None if any(v is None for v in values) else sum(v for v in values if v is not None)
        return {"open_fds": total([s.open_fds for s in self.live]),
                "tasks": sum(s.tasks for s in self.live),
                "rss_kib": total([s.rss_kib for s in self.live])}


def merge(snapshots: Sequence[WorkerSnapshot | None], state: DaemonState | None,
          now_ns: int) -> Merged:
    """`snapshots` (one per slot, None when missing) and `state` as one `Merged` view; without a
    state (not readable) every snapshot counts and nothing is retired."""
    live = [s for s in snapshots if s is not None and (
        state is None or (0 <= s.slot < state.workers and s.gen == state.live_gen[s.slot]))]
    live.sort(key=lambda s: s.slot)
    parts = list(live)
    if state is not None and state.retired is not None:
        parts.append(state.retired)
    started_ns = state.started_ns if state is not None else min((s.started_ns for s in live), default=now_ns)
    st = _sum((s, s.slot >= 0) for s in parts)
    st.started = started_ns / 1e9
    return Merged(st, live, state, now_ns)


def worker_rows(m: Merged, *, latency: bool = True) -> list[dict[str, Any]]:
    """Per-worker figures (the `workers` sub-object of /health and the SIGUSR1 dump), one per
    slot, also for a slot with no live process (then `"up": False` and no figures)."""
    by_slot = {s.slot: s for s in m.live}
    n = m.state.workers if m.state is not None else (max(by_slot, default=-1) + 1)
    rows: list[dict[str, Any]] = []
    for slot in range(n):
        row: dict[str, Any] = {"worker": slot}
        if m.state is not None:
            row["restarts"] = m.state.restarts[slot]
        s = by_slot.get(slot)
        if s is None:
            rows.append({**row, "up": False})
            continue
        age_s = max(0.0, (m.at_ns - s.at_ns) / 1e9)
        row.update(up=age_s <= STALE_S, pid=s.pid, gen=s.gen, draining=s.draining,
                   calls_active=s.counters.get("calls_active", 0),
                   calls_total=s.counters.get("calls_total", 0), max_calls=s.max_calls,
                   uptime_s=round((s.at_ns - s.started_ns) / 1e9, 1),
                   snapshot_age_s=round(age_s, 3), reloads=s.reloads,
                   process={"open_fds": s.open_fds, "tasks": s.tasks, "rss_kib": s.rss_kib,
                            "cpu_s": round(s.cpu_s, 3)})
        if latency:
            own = stats_of([s])
            row["latency_us"] = {name: {k: v for k, v in h.snapshot().items() if k in ("count", "p50", "p99", "max")}
                                 for name, h in own.histograms().items()}
        rows.append(row)
    return rows


# ------------------------------------------------------------------------------------ metrics

PREFIX = "voicebridge_"


class WorkersCollector(Collector):
    """The per-worker series (label `worker`) and the daemon-wide `process_*` figures of a
    `Merged` view, for the registry next to `metrics.StatsCollector` of the merged `Stats`:
    `voicebridge_workers`, `voicebridge_worker_up`, `voicebridge_worker_calls_active`,
    `voicebridge_worker_calls_total`, `voicebridge_worker_restarts_total`,
    `voicebridge_worker_snapshot_age_seconds`, `voicebridge_worker_cpu_seconds_total`,
    `voicebridge_worker_resident_memory_bytes`, `voicebridge_worker_config_reloads_total`; and
    `process_cpu_seconds_total` (every worker process, the dead included: a counter),
    `process_resident_memory_bytes` and `process_open_fds` (live workers summed),
    `process_start_time_seconds` (the supervisor's start)."""

    def __init__(self, merged: Merged) -> None:
        self.merged = merged

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterable[Metric]:
        m = self.merged
        rows = worker_rows(m, latency=False)
        label = ["worker"]
        yield GaugeMetricFamily(PREFIX + "workers", "worker processes configured (server.workers)",
                                value=len(rows))
        up = GaugeMetricFamily(PREFIX + "worker_up", "1 while the worker process publishes its "
                               "stats (a snapshot at most 3 s old)", labels=label)
        active = GaugeMetricFamily(PREFIX + "worker_calls_active", "calls in progress in this worker",
                                   labels=label)
        total = CounterMetricFamily(PREFIX + "worker_calls", "calls accepted by this worker process "
                                    "(restarts at 0 with a new process)", labels=label)
        restarts = CounterMetricFamily(PREFIX + "worker_restarts", "worker processes the supervisor "
                                       "restarted after one died", labels=label)
        age = GaugeMetricFamily(PREFIX + "worker_snapshot_age_seconds", "age of the worker's latest "
                                "stats snapshot", labels=label)
        cpu = CounterMetricFamily(PREFIX + "worker_cpu_seconds", "CPU seconds (user + system) of "
                                  "the worker process", labels=label)
        rss = GaugeMetricFamily(PREFIX + "worker_resident_memory_bytes", "resident memory of the "
                                "worker process", labels=label)
        reloads = CounterMetricFamily(PREFIX + "worker_config_reloads", "configurations the worker "
                                      "process took by SIGHUP", labels=label)
        for row in rows:
            w = [str(row["worker"])]
            up.add_metric(w, 1 if row.get("up") else 0)
            if "restarts" in row:
                restarts.add_metric(w, row["restarts"])
            if "pid" not in row:
                continue
            active.add_metric(w, row["calls_active"])
            total.add_metric(w, row["calls_total"])
            age.add_metric(w, row["snapshot_age_s"])
            cpu.add_metric(w, row["process"]["cpu_s"])
            if row["process"]["rss_kib"] is not None:
                rss.add_metric(w, row["process"]["rss_kib"] * 1024)
            reloads.add_metric(w, row["reloads"])
        yield from (up, active, total, restarts, age, cpu, rss, reloads)
        proc = m.process()
        yield CounterMetricFamily("process_cpu_seconds", "user and system CPU seconds of every "
                                  "worker process, those that died included", value=m.cpu_s)
        if proc["rss_kib"] is not None:
            yield GaugeMetricFamily("process_resident_memory_bytes", "resident memory of the live "
                                    "worker processes, summed", value=proc["rss_kib"] * 1024)
        if proc["open_fds"] is not None:
            yield GaugeMetricFamily("process_open_fds", "open descriptors of the live worker "
                                    "processes, summed", value=proc["open_fds"])
        if m.state is not None:
            yield GaugeMetricFamily("process_start_time_seconds", "start of the supervisor "
                                    "process, seconds since the epoch", value=m.state.started_unix)
