"""The supervisor: `server.workers` > 1 worker processes on one port, one daemon to the operator.

With `server.workers = N > 1` (or "auto" resolving to more than one CPU) `voicebridge` becomes a
small supervisor that binds nothing itself. It starts N workers, each the same program
(`python -m voicebridge --config ... --worker slot:gen:N`) running the ordinary `Bridge`, whose
listeners (public and admin) bind with `SO_REUSEPORT`: the kernel spreads new connections over
the workers' listening sockets by a hash of the connection's addresses.

Why a fresh interpreter per worker (fork + exec through `subprocess`), not `multiprocessing`
or a bare fork: a worker is then exactly the single-process daemon, started the same way, with
no event loop, uvloop or socket state inherited from the supervisor and no pickling; `ps` shows
what each process is; the supervisor stays a few MB. The price, ~1 s of imports per start, is
paid once per (re)start.

Contract
- Start-up: the supervisor first checks that the ports are free (a plain bind without
  SO_REUSEPORT, closed at once: another daemon already listening with SO_REUSEPORT would
  otherwise silently share the port), then starts the workers. It tells systemd `READY=1` only
  when every worker has said READY (each worker reports to the supervisor's own notify socket,
  `NOTIFY_SOCKET` in the worker's environment, never to systemd's: with `NotifyAccess=main`
  systemd hears only the supervisor). A worker that exits before every worker is ready fails
  the start: the others are stopped and the supervisor exits with that worker's code (1 for a
  port in use), as the single process would.
- A worker that dies later is restarted: `supervisor.worker_died` (error) gives its pid, exit
  code or signal, its uptime and `calls_lost`, the calls in progress in its last published
  snapshot (those calls are cut). A worker that lived `MIN_HEALTHY_UPTIME_S` restarts at once;
  one dying sooner waits 0.5 s, then twice as long each time, at most `MAX_BACKOFF_S`, so a crash
  loop does not spin. `voicebridge_worker_restarts_total{worker}` counts the restarts.
  A worker silent for its watchdog window (no WATCHDOG=1 from its event loop: a stuck loop) or
  not ready within `WORKER_START_TIMEOUT_S` is killed (`supervisor.worker_stuck`) and restarted.
- Stats: the dead worker's last snapshot is folded into the state file's `retired` sum before
  its snapshot file is removed (`worker_stats`), so the daemon's totals never go down.
- Signals: SIGTERM/SIGINT -> `STOPPING=1`, SIGTERM to every worker (each drains, the single
  process's drain); no restarts from then on; the supervisor exits 0 once every worker has
  exited. A second SIGTERM/SIGINT is forwarded again (the workers then abort their calls). If
  workers are still running `drain_timeout_s + shutdown_timeout_s + STOP_GRACE_S` after the
  first signal they are killed. SIGHUP -> `RELOADING=1`, SIGHUP to every ready worker, `READY=1`
  once each has answered READY (or after `RELOAD_TIMEOUT_S`). SIGUSR1 -> to one worker (the
  lowest ready slot), which logs the merged stats of all. Workers run in their own process
  group, so a terminal's Ctrl-C reaches only the supervisor, which forwards it once.
- systemd: `STATUS=` "N/N workers listening on host:port, M calls" (calls from the snapshots,
  updated once a second when it changed); `WATCHDOG=1` from a loop timer while at least one
  worker is ready and its own watchdog pings are current. Each worker gets
  `WATCHDOG_USEC` (systemd's, or `DEFAULT_WORKER_WATCHDOG_S`) for its pings to the supervisor.
- The run directory (snapshots, state, notify socket) is private (mode 0700), under
  `$RUNTIME_DIRECTORY` (systemd `RuntimeDirectory=`), /dev/shm or the temp dir, and removed at
  exit.
- A worker dies with the supervisor (`PR_SET_PDEATHSIG` = SIGTERM: it drains).
"""

from __future__ import annotations

import asyncio
import ctypes
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any, Mapping

from .bounds import clip
from .config import Config
from .log import exc_fields, get_logger
from .systemd import Notifier
from .worker import read_bounded, snapshot_path, state_path, write_atomic
from .worker_stats import DaemonState, SnapshotError, WorkerSnapshot, decode_snapshot, encode, fold

__all__ = ["Supervisor", "die_with_parent", "probe_ports", "run"]

TICK_S = 0.25                    # reaping backstop, timeouts, restarts due
STATUS_INTERVAL_S = 1.0
WORKER_START_TIMEOUT_S = 30.0    # spawn -> READY
DEFAULT_WORKER_WATCHDOG_S = 20.0
RELOAD_TIMEOUT_S = 10.0
MIN_HEALTHY_UPTIME_S = 30.0
FIRST_BACKOFF_S = 0.5
MAX_BACKOFF_S = 30.0
STOP_GRACE_S = 15.0
START_FAIL_KILL_S = 10.0         # a failed start: the other workers get this long to exit
MAX_NOTIFY_PER_WAKEUP = 256
PR_SET_PDEATHSIG = 1


def probe_ports(cfg: Config) -> None:
    """Raise OSError if `server.port` (or the admin port) already has a listener: a bind
    without SO_REUSEPORT, closed at once."""
    s = cfg.server
    targets = [(s.host, s.port)] + ([(s.admin_host, s.admin_port)] if s.admin_port > 0 else [])
    for host, port in targets:
        seen = set()
        for fam, typ, proto, _, addr in socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                                            flags=socket.AI_PASSIVE):
            if (fam, addr) in seen:
                continue
            seen.add((fam, addr))
            with socket.socket(fam, typ, proto) as sk:
                sk.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if fam == socket.AF_INET6:
                    sk.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                sk.bind(addr)


def die_with_parent(parent_pid: int) -> bool:
    """In a worker: SIGTERM (a drain) when the supervisor dies. False if it is already gone."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    except (OSError, AttributeError):   # not Linux: the worker outlives a killed supervisor
        pass
    return os.getppid() == parent_pid


def _exit_fields(rc: int) -> dict[str, Any]:
    if rc < 0:
        try:
            name = signal.Signals(-rc).name
        except ValueError:
            name = str(-rc)
        return {"exit_code": None, "signal": name}
    return {"exit_code": rc, "signal": None}


class _Slot:
    """One worker position (0..N-1) and the process filling it now."""

    __slots__ = ("index", "proc", "gen", "live", "started_at", "ready", "last_seen", "backoff_s",
                 "restart_at", "killing")

    def __init__(self, index: int) -> None:
        self.index = index
        self.proc: subprocess.Popen[bytes] | None = None
        self.gen = 0
        self.live = False        # its gen's snapshot counts (set before the process starts)
        self.started_at = 0.0
        self.ready = False
        self.last_seen = 0.0
        self.backoff_s = 0.0
        self.restart_at: float | None = None
        self.killing = False


class Supervisor:
    """See the module docstring. `run()` returns the exit code."""

    def __init__(self, cfg: Config, config_path: str, workers: int, *,
                 env: Mapping[str, str] | None = None, python: str = sys.executable) -> None:
        self.cfg = cfg
        self.config_path = config_path
        self.n = workers
        self.python = python
        self.env = dict(os.environ if env is None else env)
        self.log = get_logger()
        self.notifier = Notifier.from_env(self.env)
        wd = self.notifier.watchdog_interval_s()
        self.watchdog_interval_s = wd   # ours, towards systemd (None: not asked for)
        self.worker_watchdog_s = 2 * wd if wd is not None else DEFAULT_WORKER_WATCHDOG_S
        self.slots = [_Slot(i) for i in range(workers)]
        self.by_pid: dict[int, _Slot] = {}
        self.restarts = [0] * workers
        self.retired: WorkerSnapshot | None = None
        self.next_gen = 0
        self.started_ns = time.monotonic_ns()
        self.started_unix = time.time()
        self.announced = False          # READY=1 sent (every worker listened once)
        self.stopping = False
        self.stop_deadline = 0.0
        self.failed_code: int | None = None
        self.fail_deadline = 0.0
        self.reload_pending: set[int] = set()
        self.reload_deadline = 0.0
        self.last_status: str | None = None
        self.last_status_at = 0.0
        self.run_dir = Path()
        self._sock: socket.socket | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._done: asyncio.Future[int] | None = None
        self._timers: dict[str, asyncio.TimerHandle] = {}   # "tick", "ping": one each
        self._env: dict[str, str] = {}

    # ------------------------------------------------------------------ set-up
    def _make_run_dir(self) -> None:
        """A private (0700) directory in memory when there is one: systemd's RuntimeDirectory
        (/run is a tmpfs), else /dev/shm, else the temp dir. A snapshot write there costs
        ~20 µs against ~150 µs on an ext4 /tmp (measured)."""
        base = self.env.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
        if base is None and os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK | os.X_OK):
            base = "/dev/shm"
        self.run_dir = Path(tempfile.mkdtemp(prefix="voicebridge-", dir=base))   # mode 0700

    def _bind_notify(self) -> str:
        """Our own notify socket for the workers; returns its NOTIFY_SOCKET value."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        path = str(self.run_dir / "notify")
        if len(path.encode()) < 100:
            sock.bind(path)
            address = path
        else:    # a path too long for sun_path: an abstract name (senders are checked by pid)
            address = f"@voicebridge-{uuid.uuid4().hex}"
            sock.bind("\0" + address[1:])
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)   # the sender's pid, from the kernel
        sock.setblocking(False)
        self._sock = sock
        return address

    def _worker_env(self, notify_address: str) -> dict[str, str]:
        env = {k: v for k, v in self.env.items() if k not in ("NOTIFY_SOCKET", "WATCHDOG_PID", "WATCHDOG_USEC")}
        env["NOTIFY_SOCKET"] = notify_address
        env["WATCHDOG_USEC"] = str(int(self.worker_watchdog_s * 1e6))
        # the listeners every worker binds stay those the supervisor started with, even if the
        # file changes before a worker is restarted (they are restart-only keys anyway)
        s = self.cfg.server
        env.update({"VOICEBRIDGE_SERVER_HOST": json.dumps(s.host), "VOICEBRIDGE_SERVER_PORT": str(s.port),
                    "VOICEBRIDGE_SERVER_ADMIN_HOST": json.dumps(s.admin_host),
                    "VOICEBRIDGE_SERVER_ADMIN_PORT": str(s.admin_port),
                    "VOICEBRIDGE_SERVER_TRANSPORT": json.dumps(s.transport)})
        return env

    # ------------------------------------------------------------------ state file
    def _write_state(self) -> None:
        state = DaemonState(supervisor_pid=os.getpid(), started_ns=self.started_ns,
                            started_unix=self.started_unix, workers=self.n,
                            live_gen=[s.gen if s.live else 0 for s in self.slots],
                            restarts=list(self.restarts), retired=self.retired)
        try:
            write_atomic(state_path(self.run_dir), encode(state))
        except OSError as e:
            self.log.error("supervisor.state_write_failed", **exc_fields(e))

    def _last_snapshot(self, slot: _Slot) -> WorkerSnapshot | None:
        """The latest snapshot the slot's current process published, if readable."""
        try:
            data = read_bounded(snapshot_path(self.run_dir, slot.index))
            snap = decode_snapshot(data) if data is not None else None
        except SnapshotError:
            return None
        return snap if snap is not None and snap.gen == slot.gen else None

    # ------------------------------------------------------------------ workers
    def _spawn(self, slot: _Slot) -> None:
        self.next_gen += 1
        slot.gen = self.next_gen
        slot.ready = False
        slot.killing = False
        slot.restart_at = None
        slot.started_at = slot.last_seen = time.monotonic()
        cmd = [self.python, "-m", "voicebridge", "--config", self.config_path,
               "--worker", f"{slot.index}:{slot.gen}:{self.n}", "--run-dir", str(self.run_dir),
               "--supervisor-pid", str(os.getpid())]
        # the state first: a reader must find the new gen live before its snapshot appears
        slot.live = True
        self._write_state()
        try:
            proc = subprocess.Popen(cmd, env=self._env, stdin=subprocess.DEVNULL, process_group=0)
        except OSError as e:
            slot.live = False
            self._write_state()
            self.log.error("supervisor.spawn_failed", worker=slot.index, **exc_fields(e))
            self._schedule_restart(slot, time.monotonic() - slot.started_at)
            return
        slot.proc = proc
        self.by_pid[proc.pid] = slot
        self.log.info("supervisor.worker_started", worker=slot.index, pid=proc.pid, gen=slot.gen,
                      restarts=self.restarts[slot.index])

    def _schedule_restart(self, slot: _Slot, lived_s: float) -> float:
        if lived_s >= MIN_HEALTHY_UPTIME_S:
            slot.backoff_s = 0.0
        else:
            slot.backoff_s = min(MAX_BACKOFF_S, max(FIRST_BACKOFF_S, slot.backoff_s * 2))
        slot.restart_at = time.monotonic() + slot.backoff_s
        return slot.backoff_s

    def _reap(self) -> None:
        for slot in self.slots:
            proc = slot.proc
            if proc is None:
                continue
            rc = proc.poll()
            if rc is not None:
                self._on_exit(slot, proc, rc)

    def _on_exit(self, slot: _Slot, proc: subprocess.Popen[bytes], rc: int) -> None:
        now = time.monotonic()
        last = self._last_snapshot(slot)
        self.by_pid.pop(proc.pid, None)
        slot.proc = None
        slot.live = False
        slot.ready = False
        self.reload_pending.discard(slot.index)
        lived_s = now - slot.started_at
        fields: dict[str, Any] = {
            "worker": slot.index, "pid": proc.pid, "gen": slot.gen, **_exit_fields(rc),
            "uptime_s": round(lived_s, 1),
            "calls_lost": last.counters.get("calls_active", 0) if last is not None else None,
            "snapshot_age_s": round((time.monotonic_ns() - last.at_ns) / 1e9, 2) if last is not None else None}
        if last is not None:   # its totals stay in the daemon's (worker_stats: retired)
            self.retired = fold(self.retired, last)
        self._write_state()    # the state before the file goes: never counted twice or lost
        try:
            os.unlink(snapshot_path(self.run_dir, slot.index))
        except OSError:
            pass
        if self.stopping:
            fields.pop("calls_lost")
            self.log.info("supervisor.worker_exited", **fields)
        elif self.failed_code is not None:    # stopped by us after a failed start
            self.log.info("supervisor.worker_exited", **fields)
        elif not self.announced:
            self.log.error("supervisor.start_failed", **fields,
                           detail="a worker exited before every worker was listening")
            self._fail(rc if rc > 0 else 1)
        else:
            delay = self._schedule_restart(slot, lived_s)
            self.log.error("supervisor.worker_died", **fields, restart_in_s=round(delay, 2),
                           restarts=self.restarts[slot.index],
                           detail="the calls it carried are lost; the worker is restarted")
        self._maybe_done()

    def _fail(self, code: int) -> None:
        """A failed start: stop the others, exit with `code` once they are gone."""
        self.failed_code = code
        self.fail_deadline = time.monotonic() + START_FAIL_KILL_S
        self._forward(signal.SIGTERM, only_ready=False)

    def _alive(self) -> list[_Slot]:
        return [s for s in self.slots if s.proc is not None]

    def _maybe_done(self) -> None:
        if self._done is None or self._done.done() or self._alive():
            return
        if self.failed_code is not None:
            self._done.set_result(self.failed_code)
        elif self.stopping:
            self._done.set_result(0)

    def _forward(self, sig: int, *, only_ready: bool) -> list[int]:
        """Send `sig` to the live workers (only those that are ready: before READY a worker has
        no handler for SIGHUP/SIGUSR1, whose default action would kill it). Returns the slots."""
        sent = []
        for slot in self._alive():
            if only_ready and not slot.ready:
                continue
            assert slot.proc is not None
            try:
                slot.proc.send_signal(sig)   # a no-op once the process has been reaped
                sent.append(slot.index)
            except OSError:
                pass
        return sent

    # ------------------------------------------------------------------ notify socket
    def _on_notify(self) -> None:
        assert self._sock is not None
        for _ in range(MAX_NOTIFY_PER_WAKEUP):
            try:
                data, anc, _flags, _addr = self._sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.log.warning("supervisor.notify_error", **exc_fields(e))
                return
            pid = None
            for level, kind, cdata in anc:
                if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS and len(cdata) >= 12:
                    pid = struct.unpack("iII", cdata[:12])[0]
            slot = self.by_pid.get(pid) if pid is not None else None
            if slot is None:
                continue   # not one of our workers (or one already reaped)
            fields = dict(line.split("=", 1) for line in data.decode("utf-8", "replace").split("\n") if "=" in line)
            self._on_message(slot, fields)

    def _on_message(self, slot: _Slot, fields: dict[str, str]) -> None:
        slot.last_seen = time.monotonic()
        if fields.get("READY") == "1":
            if not slot.ready:
                slot.ready = True
                assert slot.proc is not None
                self.log.info("supervisor.worker_ready", worker=slot.index, pid=slot.proc.pid, gen=slot.gen,
                              start_s=round(slot.last_seen - slot.started_at, 2))
                if not self.announced and not self.stopping and all(s.ready for s in self.slots):
                    self._announce()
            elif slot.index in self.reload_pending:
                self.reload_pending.discard(slot.index)
                if not self.reload_pending:
                    self._reload_done(timed_out=False)

    def _announce(self) -> None:
        self.announced = True
        status = self.status_text()
        self.log.info("supervisor.ready", workers=self.n,
                      pids=[s.proc.pid for s in self.slots if s.proc is not None],
                      host=self.cfg.server.host, port=self.cfg.server.port,
                      start_s=round((time.monotonic_ns() - self.started_ns) / 1e9, 2),
                      run_dir=clip(str(self.run_dir), 200))
        self.notifier.ready(status)
        self.last_status = status
        if self.watchdog_interval_s is not None:
            self._arm("ping", self.watchdog_interval_s, self._ping)

    # ------------------------------------------------------------------ timers
    def _arm(self, name: str, delay_s: float, fn: Any) -> None:
        assert self._loop is not None
        self._timers[name] = self._loop.call_later(delay_s, fn)

    def _ping(self) -> None:
        """systemd's watchdog: pinged while a worker is ready and its own pings are current."""
        now = time.monotonic()
        if any(s.ready and now - s.last_seen <= self.worker_watchdog_s for s in self._alive()):
            self.notifier.watchdog()
        assert self.watchdog_interval_s is not None
        self._arm("ping", self.watchdog_interval_s, self._ping)

    def _tick(self) -> None:
        try:
            self._reap()
            now = time.monotonic()
            for slot in self._alive():
                assert slot.proc is not None
                if self.stopping or slot.killing or self.failed_code is not None:
                    continue
                why = None
                if not slot.ready and now - slot.started_at > WORKER_START_TIMEOUT_S:
                    why = "start_timeout"
                elif slot.ready and now - slot.last_seen > self.worker_watchdog_s:
                    why = "watchdog"
                if why is not None:
                    slot.killing = True
                    self.log.error("supervisor.worker_stuck", worker=slot.index, pid=slot.proc.pid,
                                   why=why, silent_s=round(now - slot.last_seen, 1))
                    slot.proc.kill()
            if not self.stopping and self.failed_code is None:
                for slot in self.slots:
                    if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
                        self.restarts[slot.index] += 1
                        self._spawn(slot)
            deadline = self.stop_deadline if self.stopping else (self.fail_deadline if self.failed_code is not None else 0.0)
            if deadline and now > deadline:
                for slot in self._alive():
                    if not slot.killing:
                        slot.killing = True
                        assert slot.proc is not None
                        self.log.error("supervisor.worker_killed", worker=slot.index, pid=slot.proc.pid,
                                       why="did not exit in time")
                        slot.proc.kill()
            if self.reload_pending and now > self.reload_deadline:
                self._reload_done(timed_out=True)
            if now - self.last_status_at >= STATUS_INTERVAL_S:
                self.last_status_at = now
                if self.announced:
                    text = self.status_text()
                    if text != self.last_status:
                        self.notifier.status(text)
                        self.last_status = text
        except Exception as e:   # the supervisor must keep supervising
            self.log.error("supervisor.tick_failed", **exc_fields(e))
        self._arm("tick", TICK_S, self._tick)

    def calls_active(self) -> int:
        n = 0
        for slot in self._alive():
            snap = self._last_snapshot(slot)
            if snap is not None:
                n += snap.counters.get("calls_active", 0)
        return n

    def status_text(self) -> str:
        """The systemd STATUS= line."""
        calls = self.calls_active()
        c = f"{calls} call{'' if calls == 1 else 's'}"
        if self.stopping:
            return f"draining, {c}, {len(self._alive())} workers left"
        ready = sum(1 for s in self.slots if s.ready)
        s = self.cfg.server
        return f"{ready}/{self.n} workers listening on {s.host}:{s.port}, {c}"

    # ------------------------------------------------------------------ signals
    def _on_stop_signal(self, sig: int) -> None:
        name = signal.Signals(sig).name
        if self.stopping:
            sent = self._forward(signal.SIGTERM, only_ready=False)
            self.log.warning("supervisor.stop_forced", signal=name, workers=sent)
            return
        self.stopping = True
        self.notifier.stopping()
        s = self.cfg.server
        self.stop_deadline = time.monotonic() + s.drain_timeout_s + s.shutdown_timeout_s + STOP_GRACE_S
        for slot in self.slots:
            slot.restart_at = None
        sent = self._forward(signal.SIGTERM, only_ready=False)
        self.log.info("supervisor.stopping", signal=name, workers=sent)
        self._maybe_done()

    def _on_sighup(self) -> None:
        if self.stopping or self.failed_code is not None:
            self.log.warning("supervisor.reload_ignored", detail="stopping")
            return
        self.notifier.reloading()
        sent = self._forward(signal.SIGHUP, only_ready=True)
        self.reload_pending = set(sent)
        self.reload_deadline = time.monotonic() + RELOAD_TIMEOUT_S
        self.log.info("supervisor.reload", workers=sent,
                      not_ready=[s.index for s in self.slots if not s.ready])
        if not sent:
            self._reload_done(timed_out=False)

    def _reload_done(self, *, timed_out: bool) -> None:
        if timed_out:
            self.log.warning("supervisor.reload_timeout", workers=sorted(self.reload_pending))
        self.reload_pending = set()
        if self.announced:
            self.notifier.ready(self.status_text())

    def _on_sigusr1(self) -> None:
        for slot in self.slots:
            if slot.ready and slot.proc is not None:
                slot.proc.send_signal(signal.SIGUSR1)
                self.log.info("supervisor.stats_dump", worker=slot.index, pid=slot.proc.pid)
                return
        self.log.warning("supervisor.stats_unavailable", detail="no worker is ready")

    # ------------------------------------------------------------------ main
    async def run(self) -> int:
        try:
            probe_ports(self.cfg)
        except OSError as e:
            s = self.cfg.server
            self.log.error("server.start_failed", error=clip(str(e), 200), host=s.host, port=s.port,
                           admin_port=s.admin_port, workers=self.n)
            return 1
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._done = loop.create_future()
        self._make_run_dir()
        try:
            self._env = self._worker_env(self._bind_notify())
            assert self._sock is not None
            loop.add_reader(self._sock.fileno(), self._on_notify)
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self._on_stop_signal, sig)
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            loop.add_signal_handler(signal.SIGUSR1, self._on_sigusr1)
            loop.add_signal_handler(signal.SIGCHLD, self._reap)
            self.log.info("supervisor.starting", workers=self.n, host=self.cfg.server.host,
                          port=self.cfg.server.port, admin_port=self.cfg.server.admin_port,
                          worker_watchdog_s=self.worker_watchdog_s)
            for slot in self.slots:
                self._spawn(slot)
            self._arm("tick", TICK_S, self._tick)
            code = await self._done
            self.log.info("supervisor.stopped", exit_code=code, restarts=sum(self.restarts))
            return code
        finally:
            for t in self._timers.values():
                t.cancel()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGCHLD):
                loop.remove_signal_handler(sig)
            for slot in self._alive():   # only on an unexpected error: never leave workers behind
                assert slot.proc is not None
                slot.proc.kill()
                slot.proc.wait(5)
            if self._sock is not None:
                loop.remove_reader(self._sock.fileno())
                self._sock.close()
            self.notifier.close()
            shutil.rmtree(self.run_dir, ignore_errors=True)


def run(cfg: Config, config_path: str, workers: int) -> int:
    """The supervisor's main: runs until every worker has exited; returns the exit code."""
    return asyncio.run(Supervisor(cfg, config_path, workers).run())
