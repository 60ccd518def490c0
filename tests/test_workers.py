"""`server.workers`: the supervisor, worker processes sharing one port (SO_REUSEPORT), and the merged
view of the daemon (worker_stats.py, worker.py, supervisor.py).

The unit tests cover the configuration key, the snapshot format and its bounds, the merge (equal
to one `Stats` that recorded everything; nothing counted twice or lost across a worker restart)
and `reuse_port` on both transports. One end-to-end test runs the real daemon with 2 workers
under a test NOTIFY_SOCKET: calls until both workers carry some, merged /health and /metrics,
kill -9 of one worker (restart, lost-call count, totals kept), SIGHUP in both, SIGTERM drain and
exit 0. Every wait is bounded."""

from __future__ import annotations

import asyncio
import json
from array import array
import os
import re
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
from typing import Any, Iterator

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import SECRETS, bridge_config, wait_for
from tests.daemon_harness import ROOT, TOKEN, free_port, running_fake, start_daemon
from tests.test_systemd import _mdwe_works, _refuse_wx
from voicebridge import transport
from voicebridge.config import MAX_WORKERS, ConfigError, load_config, worker_count
from voicebridge.server import Bridge
from voicebridge.sim.caller import CallerConfig, Silence, Speak, WaitForBot, run_call
from voicebridge.stats import COUNTERS, Stats
from voicebridge.transport import Limits, ListenOptions
from voicebridge.worker_stats import (MAX_SNAPSHOT_BYTES, DaemonState, SnapshotError, decode_snapshot,
                                      decode_state, encode, fold, merge, snapshot_of)


def _cfg(**server: Any) -> Any:
    cfg, _ = load_config(None, env={"VOICEBRIDGE_TOKEN": "t"}, overrides={"server": server})
    return cfg


# ------------------------------------------------------------------------------------ config

def test_workers_key_accepts_int_and_auto() -> None:
    assert worker_count(_cfg().server) == 1                       # the default: one process
    assert worker_count(_cfg(workers=3).server) == 3
    assert worker_count(_cfg(workers="auto").server) == len(os.sched_getaffinity(0))
    env = {"VOICEBRIDGE_TOKEN": "t", "VOICEBRIDGE_SERVER_WORKERS": "auto"}
    cfg, _ = load_config(None, env=env)
    assert cfg.server.workers == "auto"
    cfg, _ = load_config(None, env={**env, "VOICEBRIDGE_SERVER_WORKERS": "4"})
    assert cfg.server.workers == 4


@pytest.mark.parametrize("value", [0, -2, MAX_WORKERS + 1, "AUTO", "two", True, 2.5])
def test_workers_key_rejects_with_a_message_naming_it(value: Any) -> None:
    with pytest.raises(ConfigError) as e:
        _cfg(workers=value)
    assert str(e.value).startswith("server.workers:"), e.value


def test_several_workers_need_fixed_ports() -> None:
    with pytest.raises(ConfigError, match=r"^server\.port: must be a fixed port"):
        _cfg(workers=2, port=0)
    with pytest.raises(ConfigError, match=r"^server\.admin_port: must be a fixed port"):
        _cfg(workers=2, port=9000, admin_port=0)
    assert _cfg(workers=2, port=9000, admin_port=-1).server.admin_port == -1
    assert _cfg(workers=1, port=0, admin_port=0).server.port == 0   # one process: any port, as before


# ------------------------------------------------------------------------------------ snapshots

values = st.lists(st.integers(min_value=-5, max_value=70_000_000), max_size=60)


def _record(stats: Stats, ups: list[int], downs: list[int], calls: int, errors: list[str]) -> None:
    for v in ups:
        stats.up_forward.record(v)
    for v in downs:
        stats.down_forward.record(v)
    stats.calls_total += calls
    stats.calls_active += calls // 2
    for code in errors:
        stats.count_error(code)
        stats.count_call_end(code + "_end")


def _snap(stats: Stats, slot: int, gen: int, at_ns: int = 1) -> Any:
    return snapshot_of(stats, slot=slot, gen=gen, pid=1000 + gen, at_ns=at_ns, started_ns=0)


def _state(live_gen: list[int], retired: Any = None, restarts: list[int] | None = None) -> DaemonState:
    return DaemonState(supervisor_pid=1, started_ns=0, started_unix=0.0, workers=len(live_gen),
                       live_gen=live_gen, restarts=restarts or [0] * len(live_gen), retired=retired)


def _same(a: Stats, b: Stats) -> None:
    assert a.counters() == b.counters()
    assert a.errors == b.errors and a.call_ends == b.call_ends
    for name, h in a.histograms().items():
        o = getattr(b, name)
        assert (h.counts, h.total, h.min, h.max, h.clamped, h.negative) == \
               (o.counts, o.total, o.min, o.max, o.clamped, o.negative), name
        assert h.snapshot() == o.snapshot(), name


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(values, values, st.integers(0, 50),
                          st.lists(st.sampled_from(["rate_limit", "server_error", "x"]), max_size=4)),
                min_size=1, max_size=4))
def test_merge_of_snapshots_equals_one_stats_that_recorded_everything(parts: list[Any]) -> None:
    together = Stats()
    snaps = []
    for slot, (ups, downs, calls, errors) in enumerate(parts):
        own = Stats()
        _record(own, ups, downs, calls, errors)
        _record(together, ups, downs, calls, errors)
        snaps.append(decode_snapshot(encode(_snap(own, slot, slot + 1))))   # through the wire format
    m = merge(snaps, _state([s.gen for s in snaps]), now_ns=2)
    _same(m.stats, together)


def test_a_dead_workers_counts_are_kept_once_and_never_go_backwards() -> None:
    """The supervisor's order (state with the dead process retired, then its file removed) seen
    from a reader at every step: each process counted once, totals never lower than before."""
    a, b = Stats(), Stats()
    _record(a, [100, 200, 5000], [50], 6, ["rate_limit"])
    _record(b, [300], [70, 80], 4, [])
    a_snap, b_snap = _snap(a, 0, 1), _snap(b, 1, 2)
    before = merge([a_snap, b_snap], _state([1, 2]), 3).stats
    assert before.calls_total == 10 and before.up_forward.count == 4 and before.calls_active == 5
    # worker 0 (gen 1) dies: the state retires it and its slot has no live gen ...
    st1 = _state([0, 2], retired=fold(None, a_snap), restarts=[0, 0])
    # ... while its file may still be there (read before the unlink) or gone
    for files in ([a_snap, b_snap], [None, b_snap]):
        m = merge(files, st1, 4)
        assert m.stats.calls_total == 10 and m.stats.up_forward.count == 4, files
        assert m.stats.calls_active == b.calls_active      # the dead worker's calls are gone
        assert m.stats.errors == {"rate_limit": 1}
    # the new process (gen 3) starts from zero and counts on top
    c = Stats()
    _record(c, [400], [], 2, ["server_error"])
    st2 = _state([3, 2], retired=fold(None, a_snap), restarts=[1, 0])
    after = merge([a_snap, b_snap, _snap(c, 0, 3)][1:], st2, 5)   # worker-0 file is now gen 3's
    assert after.stats.calls_total == 12 and after.stats.up_forward.count == 5
    assert after.stats.errors == {"rate_limit": 1, "server_error": 1}
    # a stale gen-1 file next to the new state is never counted
    stale = merge([a_snap, b_snap], st2, 6)
    assert stale.stats.calls_total == 4 + 6      # retired (6) + worker 1 (4), not gen 1 again
    # fold accumulates: a second death of slot 0 keeps both processes' totals
    st3 = fold(fold(None, a_snap), _snap(c, 0, 3))
    assert st3.counters["calls_total"] == 8 and st3.counters["calls_active"] == 0


def test_decoders_refuse_what_they_cannot_use() -> None:
    s = Stats()
    s.up_forward.record(1234)
    good = _snap(s, 0, 1)
    assert decode_snapshot(encode(good)) == good
    with pytest.raises(SnapshotError, match="more than"):
        decode_snapshot(b"\x00" * (MAX_SNAPSHOT_BYTES + 1))
    with pytest.raises(SnapshotError, match="not a worker snapshot"):
        decode_snapshot(b"\xc1garbage")
    hs = good.histograms["up_forward"]
    import msgspec
    wrong_layout = msgspec.structs.replace(good, histograms={"up_forward": msgspec.structs.replace(hs, sub_bits=5)})
    with pytest.raises(SnapshotError, match="layout"):
        decode_snapshot(encode(wrong_layout))
    too_long = msgspec.structs.replace(good, histograms={"up_forward": msgspec.structs.replace(
        hs, counts=array("q", [1] * (len(s.up_forward.counts) + 1)).tobytes())})
    with pytest.raises(SnapshotError, match="layout"):
        decode_snapshot(encode(too_long))
    ragged = msgspec.structs.replace(good, histograms={"up_forward": msgspec.structs.replace(hs, counts=b"\x01" * 9)})
    with pytest.raises(SnapshotError, match="layout"):
        decode_snapshot(encode(ragged))
    below_zero = msgspec.structs.replace(good, histograms={"up_forward": msgspec.structs.replace(
        hs, counts=array("q", [3, -1]).tobytes())})
    with pytest.raises(SnapshotError, match="negative"):
        decode_snapshot(encode(below_zero))
    negative = msgspec.structs.replace(good, counters={"calls_total": -1})
    with pytest.raises(SnapshotError):
        decode_snapshot(encode(negative))
    many = msgspec.structs.replace(good, labelled={"errors": {str(i): 1 for i in range(300)}})
    with pytest.raises(SnapshotError, match="labelled"):
        decode_snapshot(encode(many))
    with pytest.raises(SnapshotError, match="do not match"):
        decode_state(encode(DaemonState(1, 0, 0.0, 2, [1], [0, 0])))


def test_snapshot_size_is_bounded_whatever_is_recorded() -> None:
    s = Stats()
    for h in s.histograms().values():   # every bucket of every histogram non-empty, big counts
        for i in range(len(h.counts)):
            h.counts[i] = 2**40
        h.max = h.highest
    for i in range(500):
        s.count_error(f"code-{i}")
        s.count_call_end(f"reason-{i}")
    data = encode(_snap(s, 0, 1))
    assert len(data) < MAX_SNAPSHOT_BYTES, len(data)
    assert decode_snapshot(data).labelled["call_ends"].keys() <= {f"reason-{i}" for i in range(500)} | {"other"}
    assert len(decode_snapshot(data).labelled["call_ends"]) <= 256


def test_every_counter_travels() -> None:
    s = Stats()
    for i, name in enumerate(COUNTERS):
        setattr(s, name, i + 1)
    m = merge([decode_snapshot(encode(_snap(s, 0, 1)))], _state([1]), 1)
    assert m.stats.counters() == s.counters()


# ------------------------------------------------------------------------------------ transports

def _opts(reuse: bool) -> ListenOptions:
    return ListenOptions(max_size=65536, ping_interval_s=None, close_timeout_s=1.0, handshake_timeout_s=2.0,
                         max_pending=8, backlog=16, limits=Limits(), server_header="t", reuse_port=reuse)


@pytest.mark.parametrize("name", sorted(transport.TRANSPORTS))
async def test_listen_reuse_port_lets_two_listeners_share_a_port(name: str) -> None:
    mod = transport.get(name)

    async def handler(end: Any, conn: Any) -> None:
        return None

    port = free_port()
    first = await mod.listen(handler, lambda r: None, "127.0.0.1", port, opts=_opts(True))
    try:
        second = await mod.listen(handler, lambda r: None, "127.0.0.1", port, opts=_opts(True))
        for srv in (first, second):
            assert srv.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 1
        second.close()
        await second.wait_closed()
        with pytest.raises(OSError):          # without the option the port stays exclusive
            await mod.listen(handler, lambda r: None, "127.0.0.1", port, opts=_opts(False))
    finally:
        first.close()
        await first.wait_closed()


async def test_one_process_daemon_is_unchanged() -> None:
    """workers = 1: no worker link, no SO_REUSEPORT, /health without worker fields."""
    async with running_fake() as fake:
        async with Bridge(bridge_config(fake), SECRETS) as b:
            assert b.worker is None
            assert b._server is not None
            assert b._server.sockets[0].getsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT) == 0
            h = b.health()
            assert "workers" not in h and "worker" not in h and "supervisor" not in h
            assert b"voicebridge_worker" not in b.metrics_text()


def test_supervisor_refuses_a_port_already_in_use(tmp_path: Path) -> None:
    """A listener already on the port (even one with SO_REUSEPORT, which the workers could
    join silently): exit 1 with one server.start_failed line, no worker started."""
    with socket.socket() as held:
        held.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        held.bind(("127.0.0.1", 0))
        held.listen()
        port = held.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEBRIDGE_")}
        env.update(VOICEBRIDGE_TOKEN="t", OPENAI_API_KEY="k", VOICEBRIDGE_SERVER_WORKERS="2",
                   VOICEBRIDGE_SERVER_HOST="127.0.0.1", VOICEBRIDGE_SERVER_PORT=str(port),
                   VOICEBRIDGE_SERVER_ADMIN_PORT=str(free_port()))
        out = subprocess.run([sys.executable, "-m", "voicebridge", "--config", str(ROOT / "config.toml")],
                             env=env, cwd=ROOT, capture_output=True, timeout=30)
    lines = [json.loads(x) for x in out.stdout.decode().splitlines() if x.startswith("{")]
    assert out.returncode == 1, out
    assert [e["event"] for e in lines] == ["server.start_failed"], lines
    assert lines[0]["port"] == port and lines[0]["workers"] == 2


# ------------------------------------------------------------------------------------ end to end

class CredReceiver:
    """The systemd side of NOTIFY_SOCKET, with the sender's pid of every datagram (SO_PASSCRED)."""

    def __init__(self, path: str) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.messages: list[tuple[int, dict[str, str]]] = []

    def drain(self) -> list[tuple[int, dict[str, str]]]:
        while len(self.messages) < 10_000:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(12))
            except BlockingIOError:
                break
            pid = next(struct.unpack("iII", c[:12])[0] for lvl, kind, c in anc
                       if lvl == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS)
            self.messages.append((pid, dict(x.split("=", 1) for x in data.decode().split("\n"))))
        return self.messages

    def with_key(self, key: str) -> list[dict[str, str]]:
        return [m for _, m in self.drain() if key in m]


@pytest.fixture
def short_dir() -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="vbwk-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def _metric(text: str, name: str, labels: str = "") -> float | None:
    m = re.search(rf"^{re.escape(name)}{re.escape(labels)} (\S+)$", text, re.M)
    return float(m.group(1)) if m else None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


async def test_two_workers_share_the_port_merge_stats_restart_reload_and_drain(tmp_path: Path,
                                                                             short_dir: Path) -> None:
    config = tmp_path / "config.toml"
    config.write_text((ROOT / "config.toml").read_text())
    notify = CredReceiver(str(short_dir / "notify"))
    worker_pids: set[int] = set()
    calls: list[asyncio.Task[Any]] = []
    # under W^X (what MemoryDenyWriteExecute=yes asks for), inherited by the workers, when the
    # kernel has it
    preexec = _refuse_wx if _mdwe_works() else None
    async with running_fake() as fake:
        d = await start_daemon(fake, tmp_path, name="workers", config_path=config, preexec=preexec, **{
            "VOICEBRIDGE_SERVER_WORKERS": "2", "VOICEBRIDGE_SERVER_METRICS_CACHE_S": "0",
            "VOICEBRIDGE_SERVER_DRAIN_TIMEOUT_S": "2", "VOICEBRIDGE_SERVER_SHUTDOWN_TIMEOUT_S": "5",
            "NOTIFY_SOCKET": str(short_dir / "notify"), "WATCHDOG_USEC": "6000000"})
        try:
            # ---- start: READY (from the supervisor only) once both workers listen
            assert await d.wait_event("supervisor.ready", 20), d.log_text()[-3000:]
            ready = d.events("supervisor.worker_ready")
            assert sorted(e["worker"] for e in ready) == [0, 1], ready
            worker_pids |= {e["pid"] for e in d.events("supervisor.worker_started")}
            names = [e["event"] for e in d.events()]
            assert names.index("supervisor.ready") > max(i for i, n in enumerate(names) if n == "supervisor.worker_ready")
            assert await wait_for(lambda: bool(notify.with_key("READY")), 3)
            first_ready = notify.with_key("READY")[0]
            assert first_ready["STATUS"].startswith(f"2/2 workers listening on 127.0.0.1:{d.port}"), first_ready

            async def detail() -> dict[str, Any]:
                status, _, body = await d.http_get("/health", admin=True)
                assert status == 200, body[:200]
                return json.loads(body)

            # ---- calls until both workers carry some (the kernel picks the worker per connection)
            def place() -> None:
                calls.append(asyncio.ensure_future(run_call(CallerConfig(
                    url=d.url, token=TOKEN, conversation_id="wk-" + uuid.uuid4().hex[:10],
                    caller="+1555" + uuid.uuid4().hex[:8], formats=["raw/lpcm16_24"],
                    script=[Speak(400), WaitForBot(6000), Silence(40_000)]))))

            for _ in range(4):
                place()
            h: dict[str, Any] = {}
            for _ in range(12):
                async def counted() -> bool:
                    nonlocal h
                    h = await detail()
                    return (sum(r.get("calls_active", 0) for r in h["workers"]) == len(calls)
                            and h["calls_total"] == len(calls))
                end = time.monotonic() + 6
                while not await counted() and time.monotonic() < end:
                    await asyncio.sleep(0.2)
                assert h["calls_total"] == len(calls), h
                if all(r["calls_active"] >= 1 for r in h["workers"]):
                    break
                place()
            rows = h["workers"]
            assert all(r["calls_active"] >= 1 and r["up"] for r in rows), rows
            n = len(calls)
            # every call got its first answer (so the histograms have values on both workers)
            assert await wait_for(lambda: len(d.events("call.start")) >= n, 5)
            end = time.monotonic() + 10
            while time.monotonic() < end:
                h = await detail()
                if all(r["latency_us"]["model_ttfa"]["count"] >= r["calls_total"] for r in h["workers"]):
                    break
                await asyncio.sleep(0.3)
            rows = h["workers"]

            # ---- one view: sums and merged histograms, whichever worker answers
            assert h["active_calls"] == n and h["calls_total"] == n
            assert sum(r["calls_total"] for r in rows) == n
            for name in ("call_setup", "up_forward", "down_forward", "model_ttfa", "openai_connect"):
                per = [r["latency_us"][name] for r in rows]
                assert all(p["count"] > 0 for p in per), (name, per)
                assert h["latency_us"][name]["count"] == sum(p["count"] for p in per), name
                assert h["latency_us"][name]["max"] == max(p["max"] for p in per), name
            assert h["latency_us"]["call_setup"]["count"] == n
            assert h["supervisor"]["pid"] == d.pid and h["supervisor"]["workers"] == 2
            answered: dict[int, dict[str, Any]] = {}
            for _ in range(40):    # new connections: the kernel spreads them over both workers
                status, _, body = await d.http_get("/metrics", admin=True)
                assert status == 200
                text = body.decode()
                pub = json.loads((await d.http_get("/health"))[2])
                answered.setdefault(pub["worker"], {"metrics": text, "public": pub})
                if len(answered) == 2:
                    break
            assert sorted(answered) == [0, 1], list(answered)
            for got in answered.values():
                text, pub = got["metrics"], got["public"]
                assert pub["active_calls"] == n and pub["worker_count"] == 2, pub
                assert _metric(text, "voicebridge_calls_total") == n
                assert _metric(text, "voicebridge_calls_active") == n
                assert _metric(text, "voicebridge_call_setup_seconds_count") == n
                assert _metric(text, "voicebridge_call_setup_seconds_bucket", '{le="+Inf"}') == n
                per = [_metric(text, "voicebridge_worker_calls_total", f'{{worker="{w}"}}') for w in (0, 1)]
                assert sum(p or 0 for p in per) == n and all(p and p >= 1 for p in per), per
                assert _metric(text, "voicebridge_worker_restarts_total", '{worker="0"}') == 0
                assert _metric(text, "voicebridge_workers") == 2
            if shutil.which("promtool"):
                chk = subprocess.run(["promtool", "check", "metrics"], input=answered[0]["metrics"].encode(),
                                     capture_output=True, timeout=30)
                assert chk.returncode == 0, chk.stdout + chk.stderr
            assert await wait_for(lambda: any(m.get("STATUS", "").endswith(f", {n} calls")
                                              for m in notify.with_key("STATUS")), 4), notify.messages

            # ---- kill -9 the busier worker: restarted, its calls logged as lost, totals kept
            victim = max(rows, key=lambda r: r["calls_active"])
            lost = victim["calls_active"]
            os.kill(victim["pid"], signal.SIGKILL)
            died = await d.wait_event("supervisor.worker_died", 5, pid=victim["pid"])
            assert died is not None, d.log_text()[-2000:]
            assert died["worker"] == victim["worker"] and died["signal"] == "SIGKILL", died
            assert died["calls_lost"] == lost, (died, victim)
            assert await wait_for(lambda: len(d.events("supervisor.worker_ready", worker=victim["worker"])) == 2, 15), \
                d.log_text()[-2000:]
            restarted = d.events("supervisor.worker_started", worker=victim["worker"])[-1]
            worker_pids.add(restarted["pid"])
            assert restarted["pid"] != victim["pid"] and restarted["restarts"] == 1
            h = await detail()
            row = h["workers"][victim["worker"]]
            assert row["pid"] == restarted["pid"] and row["restarts"] == 1 and row["calls_total"] == 0, row
            assert h["calls_total"] == n, h["calls_total"]        # not lost, not counted twice
            assert h["active_calls"] == n - lost
            status, _, body = await d.http_get("/metrics", admin=True)
            text = body.decode()
            assert _metric(text, "voicebridge_worker_restarts_total", f'{{worker="{victim["worker"]}"}}') == 1
            assert _metric(text, "voicebridge_calls_total") == n
            assert _metric(text, "voicebridge_call_setup_seconds_count") == n

            # ---- SIGHUP: every worker reloads; RELOADING=1 then READY=1 to systemd
            config.write_text(config.read_text().replace('voice = "marin"', 'voice = "cedar"'))
            d.signal(signal.SIGHUP)
            assert await wait_for(lambda: {e.get("worker") for e in d.events("server.reloaded")} == {0, 1}, 8), \
                d.events("server.reloaded")
            assert all("openai.voice" in e["changed"] for e in d.events("server.reloaded"))
            assert await wait_for(lambda: len(notify.with_key("READY")) >= 2, 5)
            keys = [next(iter(m)) for _, m in notify.drain() if "RELOADING" in m or "READY" in m]
            assert keys[-2:] == ["RELOADING", "READY"], keys
            # ---- SIGUSR1: one merged dump
            d.signal(signal.SIGUSR1)
            assert await d.wait_event("stats.dump", 5), d.log_text()[-3000:]
            await asyncio.sleep(0.5)
            dumps = d.events("stats.dump")
            assert len(dumps) == 1 and dumps[0]["counters"]["calls_total"] == n, dumps
            assert len(dumps[0]["workers"]) == 2

            # ---- SIGTERM: both drain, the supervisor exits 0
            d.signal(signal.SIGTERM)
            assert await d.wait_event("supervisor.stopping", 3)
            status, _, body = await d.http_get("/health")
            assert status == 503 and json.loads(body)["status"] == "draining"
            rc = await d.wait_exit(20)
            assert rc == 0, (rc, d.log_text()[-3000:])
            drained = d.events("server.drained")
            assert sorted(e["worker"] for e in drained) == [0, 1], drained
            assert sum(e["calls_at_signal"] for e in drained) == n - lost, drained
            assert d.events("supervisor.stopped", exit_code=0)
            assert notify.with_key("STOPPING")
            assert all(pid == d.pid for pid, _ in notify.drain()), {p for p, _ in notify.messages}
            assert notify.with_key("WATCHDOG")        # WatchdogSec: the supervisor pinged
            results = await asyncio.wait_for(asyncio.gather(*calls), 15)
            cut = [r for r in results if r.end_reason not in ("bot-hangup", "caller-hangup")]
            assert len(cut) == lost, [r.end_reason for r in results]      # only the killed worker's
            assert not any(_alive(p) for p in worker_pids)
            assert not d.non_json_lines(), d.non_json_lines()[:5]
        finally:
            for t in calls:
                t.cancel()
            await d.stop()
            d.kill()
            for pid in worker_pids:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            notify.sock.close()


def test_restarts_back_off_in_a_crash_loop() -> None:
    from voicebridge.supervisor import MAX_BACKOFF_S, MIN_HEALTHY_UPTIME_S, Supervisor
    sup = Supervisor(_cfg(workers=2, port=9000, admin_port=9001), "config.toml", 2, env={})
    slot = sup.slots[0]
    delays = [sup._schedule_restart(slot, lived_s=1.0) for _ in range(9)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, MAX_BACKOFF_S, MAX_BACKOFF_S, MAX_BACKOFF_S]
    assert sup._schedule_restart(slot, lived_s=MIN_HEALTHY_UPTIME_S) == 0.0   # a healthy run resets it
    assert sup._schedule_restart(slot, lived_s=1.0) == 0.5
    assert sup.slots[1].backoff_s == 0.0                                      # per worker


async def test_a_stuck_worker_is_killed_and_restarted(tmp_path: Path, short_dir: Path) -> None:
    """A worker whose event loop stops (SIGSTOP: no WATCHDOG=1 pings) is killed after its
    watchdog window and replaced; systemd still gets the supervisor's pings meanwhile."""
    notify = CredReceiver(str(short_dir / "notify"))
    pids: set[int] = set()
    async with running_fake() as fake:
        d = await start_daemon(fake, tmp_path, name="stuck", **{
            "VOICEBRIDGE_SERVER_WORKERS": "2", "NOTIFY_SOCKET": str(short_dir / "notify"),
            "WATCHDOG_USEC": "3000000"})
        try:
            assert await d.wait_event("supervisor.ready", 20), d.log_text()[-3000:]
            started = {e["worker"]: e["pid"] for e in d.events("supervisor.worker_started")}
            pids |= set(started.values())
            os.kill(started[1], signal.SIGSTOP)
            stuck = await d.wait_event("supervisor.worker_stuck", 10, pid=started[1])
            assert stuck is not None and stuck["why"] == "watchdog" and stuck["silent_s"] >= 3.0, stuck
            died = await d.wait_event("supervisor.worker_died", 5, pid=started[1])
            assert died is not None and died["signal"] == "SIGKILL", died
            assert await wait_for(lambda: len(d.events("supervisor.worker_ready", worker=1)) == 2, 15)
            pids |= {e["pid"] for e in d.events("supervisor.worker_started")}
            assert notify.with_key("WATCHDOG")
            assert d.events("supervisor.worker_ready", worker=0)[0]["pid"] == started[0]   # the other untouched
            assert await d.stop() == 0
        finally:
            await d.stop()
            d.kill()
            for pid in pids:
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
            notify.sock.close()
