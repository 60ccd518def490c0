"""A supervised worker's link to the rest of the daemon (`server.workers` > 1, see `supervisor.py`).

Each worker process runs the ordinary `Bridge` with a `WorkerLink`, which
- publishes the worker's `Stats` every `PUBLISH_INTERVAL_S` as one msgpack snapshot
  (`worker_stats.snapshot_of`) to `<run_dir>/worker-<slot>.snap`, written to a temporary file and
  renamed over the old one (a reader sees the old or the new snapshot, never half of one). The
  publish is one loop timer (`call_later`), never a task, and nothing on the call path changes:
  calls keep recording into the plain `Stats`; the cost is ~0.1-0.4 ms of loop time per second
  (packing the buckets, encoding, one write to a tmpfs, the /proc reads).
- answers `/metrics`, the detailed `/health`, the public `/health` and the SIGUSR1 dump for the
  whole daemon: it publishes its own snapshot first, then reads every other worker's latest
  snapshot and the supervisor's `daemon.snap`, and merges them (`worker_stats.merge`). The merged
  view is cached for `server.metrics_cache_s`, so a burst of scrapes or balancer checks merges
  once. Publishing first keeps every figure a scrape shows at or below the latest published
  snapshot, which is what the supervisor keeps when the worker dies: the totals never go down.
A snapshot file that is missing, too large or unreadable is left out of the view (the worker's
row then says `"up": false`) and logged, rate limited (`worker.snapshot_unreadable`).
"""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prometheus_client.exposition import generate_latest
from prometheus_client.registry import CollectorRegistry

from . import __version__
from .bounds import clip
from .log import Throttled, exc_fields, get_logger
from .metrics import DaemonInfo, StatsCollector
from .procinfo import open_fds, rss_kib
from .worker_stats import (MAX_SNAPSHOT_BYTES, DaemonState, Merged, SnapshotError, WorkerSnapshot,
                           WorkersCollector, decode_snapshot, decode_state, encode, merge,
                           snapshot_of, worker_rows)

if TYPE_CHECKING:
    from .server import Bridge

__all__ = ["PUBLISH_INTERVAL_S", "WorkerLink", "read_bounded", "snapshot_path", "state_path",
           "write_atomic"]

PUBLISH_INTERVAL_S = 1.0


def snapshot_path(run_dir: Path, slot: int) -> Path:
    return run_dir / f"worker-{slot}.snap"


def state_path(run_dir: Path) -> Path:
    return run_dir / "daemon.snap"


def write_atomic(path: Path, data: bytes) -> None:
    """`data` as `path`, by a rename over it: readers see the old file or the new one. No fsync:
    the run directory does not outlive the daemon."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
    os.replace(tmp, path)


def read_bounded(path: Path) -> bytes | None:
    """The file's bytes, None when it does not exist; SnapshotError past MAX_SNAPSHOT_BYTES."""
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SNAPSHOT_BYTES + 1)
    except FileNotFoundError:
        return None
    except OSError as e:
        raise SnapshotError(f"cannot read {path.name}: {e.strerror or e}") from None
    if len(data) > MAX_SNAPSHOT_BYTES:
        raise SnapshotError(f"{path.name} is larger than {MAX_SNAPSHOT_BYTES} bytes")
    return data


class WorkerLink:
    """The worker's side of the exchange (see the module docstring). `slot` is 0..workers-1,
    `gen` the number the supervisor gave this process (a restarted worker gets a new one)."""

    def __init__(self, run_dir: str | Path, slot: int, gen: int, workers: int) -> None:
        self.run_dir = Path(run_dir)
        self.slot = slot
        self.gen = gen
        self.workers = workers
        self.started_ns = time.monotonic_ns()
        self.bridge: Bridge | None = None
        self.published = 0
        self.publish_failures = 0
        self._timer: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._view: Merged | None = None
        self._own_path = snapshot_path(self.run_dir, slot)

    @property
    def log(self) -> Any:
        """The bridge's logger (set up after this link was made, replaced by a reload)."""
        return self.bridge.log if self.bridge is not None else get_logger()

    @property
    def noisy(self) -> Throttled:
        return self.bridge.noisy if self.bridge is not None else Throttled(get_logger())

    # ------------------------------------------------------------------ publishing
    def start(self, bridge: Bridge, loop: asyncio.AbstractEventLoop) -> None:
        """Publish now (before READY: the supervisor's status has this worker's figures), then
        every PUBLISH_INTERVAL_S from a loop timer."""
        self.bridge = bridge
        self._loop = loop
        self._tick()

    def _tick(self) -> None:
        self.publish()
        assert self._loop is not None
        self._timer = self._loop.call_later(PUBLISH_INTERVAL_S, self._tick)

    def snapshot(self) -> WorkerSnapshot:
        b = self.bridge
        assert b is not None
        t = os.times()
        try:
            tasks = len(asyncio.all_tasks())
        except RuntimeError:
            tasks = 0
        return snapshot_of(b.stats, slot=self.slot, gen=self.gen, pid=os.getpid(),
                           at_ns=time.monotonic_ns(), started_ns=self.started_ns,
                           draining=b.draining, reloads=b.reloads, max_calls=b.max_calls,
                           cpu_s=t.user + t.system, rss_kib=rss_kib(), open_fds=open_fds(),
                           tasks=tasks)

    def publish(self) -> WorkerSnapshot:
        """Write this worker's snapshot now; returns it (also when the write failed)."""
        snap = self.snapshot()
        try:
            write_atomic(self._own_path, encode(snap))
            self.published += 1
        except OSError as e:
            self.publish_failures += 1
            self.noisy.emit("error", "worker.publish_failed", path=clip(str(self._own_path), 200),
                            **exc_fields(e))
        return snap

    def stop(self) -> None:
        """Cancel the timer and publish a last time (the final counters of a clean exit)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.bridge is not None:
            self.publish()

    # ------------------------------------------------------------------ the merged view
    def _read(self, path: Path, what: str) -> bytes | None:
        try:
            return read_bounded(path)
        except SnapshotError as e:
            self.noisy.emit("warning", "worker.snapshot_unreadable", file=what, error=clip(str(e), 200))
            return None

    def view(self, fresh: bool = False) -> Merged:
        """The merged view of every worker; rebuilt when older than `server.metrics_cache_s`."""
        b = self.bridge
        assert b is not None
        now_ns = time.monotonic_ns()
        cache_ns = int(b.cfg.server.metrics_cache_s * 1e9)
        if not fresh and self._view is not None and now_ns - self._view.at_ns < cache_ns:
            return self._view
        own = self.publish()
        snaps: list[WorkerSnapshot | None] = []
        for slot in range(self.workers):   # worker files first, then the state (module docstring)
            if slot == self.slot:
                snaps.append(own)
                continue
            data = self._read(snapshot_path(self.run_dir, slot), f"worker-{slot}.snap")
            snap = None
            if data is not None:
                try:
                    snap = decode_snapshot(data)
                except SnapshotError as e:
                    self.noisy.emit("warning", "worker.snapshot_unreadable", file=f"worker-{slot}.snap",
                                    error=clip(str(e), 200))
            snaps.append(snap)
        state: DaemonState | None = None
        data = self._read(state_path(self.run_dir), "daemon.snap")
        if data is not None:
            try:
                state = decode_state(data)
            except SnapshotError as e:
                self.noisy.emit("warning", "worker.snapshot_unreadable", file="daemon.snap",
                                error=clip(str(e), 200))
        self._view = merge(snaps, state, time.monotonic_ns())
        return self._view

    def _daemon_fields(self, m: Merged) -> dict[str, Any]:
        st = m.state
        return {"pid": st.supervisor_pid if st is not None else os.getppid(),
                "workers": self.workers,
                "workers_up": sum(1 for r in worker_rows(m, latency=False) if r.get("up")),
                "restarts_total": sum(st.restarts) if st is not None else 0,
                "uptime_s": round(m.stats.uptime_s(), 1)}

    def liveness(self, own: dict[str, Any]) -> dict[str, Any]:
        """The public `/health` body: `own` (this worker's) with the daemon's call count and
        uptime, which worker answered (`worker`) and how many there are (`worker_count`)."""
        m = self.view()
        return {**own, "active_calls": m.stats.calls_active, "uptime_s": round(m.stats.uptime_s(), 1),
                "worker": self.slot, "worker_count": self.workers}

    def health(self) -> dict[str, Any]:
        """The detailed `/health` for the whole daemon, with a `workers` row per worker."""
        b = self.bridge
        assert b is not None
        m = self.view()
        rows = worker_rows(m)
        return {**b.liveness(), "calls_total": m.stats.calls_total,
                "max_calls": sum(s.max_calls for s in m.live),
                "latency_us": {name: h.snapshot() for name, h in m.stats.histograms().items()},
                "process": m.process(), "supervisor": self._daemon_fields(m), "workers": rows}

    def metrics_text(self) -> bytes:
        """`/metrics` for the whole daemon: the merged `Stats` under the usual names, plus the
        per-worker series and the summed `process_*` figures (`WorkersCollector`)."""
        b = self.bridge
        assert b is not None
        m = self.view()
        reg = CollectorRegistry(auto_describe=False)
        reg.register(StatsCollector(m.stats, DaemonInfo(
            version=__version__, transport=b.cfg.server.transport, draining=m.draining or b.draining,
            reloads=m.reloads)))
        reg.register(WorkersCollector(m))
        return generate_latest(reg)

    def dump_stats(self) -> None:
        """SIGUSR1 (the supervisor sends it to one worker): the merged stats as one `stats.dump`
        line with a `workers` list, then the table, one `stats.table` line per row."""
        m = self.view(fresh=True)
        rows = worker_rows(m, latency=False)
        self.log.info("stats.dump", **m.stats.snapshot(), supervisor=self._daemon_fields(m),
                      workers=rows)
        for line in m.stats.table().splitlines():
            if line.strip():
                self.log.info("stats.table", line=line)
        for r in rows:
            line = (f"worker {r['worker']}: " + (
                f"pid {r['pid']}, {r['calls_active']} calls active, {r['calls_total']} total, "
                f"restarts {r.get('restarts', 0)}, snapshot {r['snapshot_age_s']:.1f} s old"
                if "pid" in r else f"no process (restarts {r.get('restarts', 0)})"))
            self.log.info("stats.table", line=line)
