"""stalls.py: slow-frame and slow-loop decisions, the rate limit, the collector hook and the
figures in /metrics; every time is injected (no clock, no timing threshold). The daemon test
holds one model delta inside the real daemon (a test-only sitecustomize) and checks the one
bounded `slow_frame` line and the counters."""

from __future__ import annotations

import asyncio
import gc
import json
import shutil
import subprocess
import textwrap

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.daemon_harness import clean_call, running_daemon, running_fake
from voicebridge.config import ConfigError, load_config
from voicebridge.metrics import DaemonInfo, prometheus_text
from voicebridge.stalls import NEVER_US, LogWindow, StallWatch, tune_gc
from voicebridge.stats import Stats

MS = 1_000_000   # ns


class Recorder:
    """A structlog-like logger that keeps (level, event, fields)."""

    def __init__(self) -> None:
        self.lines: list[tuple[str, str, dict]] = []

    def warning(self, event: str, **kw: object) -> None:
        self.lines.append(("warning", event, kw))

    def events(self, name: str) -> list[dict]:
        return [kw for _, ev, kw in self.lines if ev == name]


def watch(**kw: object) -> tuple[StallWatch, Stats, Recorder]:
    st, rec = Stats(), Recorder()
    args: dict = dict(slow_frame_ms=10, slow_loop_ms=20, loop_probe_ms=25, log_max=2, log_interval_s=60)
    args.update(kw)
    return StallWatch(st, log=rec, **args), st, rec


# ------------------------------------------------------------------------------ the rate limit

def test_log_window_passes_max_then_counts_and_reports_what_it_refused():
    w = LogWindow(2, 10.0)
    assert [w.allow(t * MS) for t in (0, 1, 2, 3)] == [0, 0, None, None]
    # a new window 10 s after the first pass: the next line carries the two refused
    assert w.allow(10_000 * MS) == 2
    assert w.allow(10_001 * MS) == 0
    assert w.allow(10_002 * MS) is None
    # an idle stretch: the window restarts at the next call, not on a fixed grid
    assert w.allow(100_000 * MS) == 1
    assert w.allow(100_001 * MS) == 0


def test_log_window_of_one():
    w = LogWindow(1, 1.0)
    assert w.allow(0) == 0
    assert all(w.allow(t * MS) is None for t in range(1, 1000, 7))
    assert w.allow(1000 * MS) == len(range(1, 1000, 7))


# ------------------------------------------------------------------------------ slow frames

def test_slow_frame_counts_every_one_and_logs_a_bounded_number():
    sw, st, rec = watch()
    for i in range(7):
        sw.slow_frame("call-a", "up", 12_345, t0_ns=i * MS, now_ns=i * MS + 13 * MS)
    assert st.slow_frames == {"forward": 7, "loop": 0}
    lines = rec.events("slow_frame")
    assert len(lines) == 2
    assert lines[0] == {"call_id": "call-a", "direction": "up", "forward_ms": 12.345,
                        "threshold_ms": 10.0, "gc_ms": 0.0}
    assert "suppressed" not in lines[1]
    # the next window's first line says how many were not written
    sw.slow_frame("call-b", "down", 50_000, t0_ns=61_000 * MS, now_ns=61_050 * MS)
    last = rec.events("slow_frame")[-1]
    assert last["suppressed"] == 5 and last["direction"] == "down" and last["call_id"] == "call-b"
    assert st.slow_frames["forward"] == 8


def test_slow_frame_names_a_collection_that_ended_inside_it():
    sw, st, rec = watch()
    sw.on_gc_phase("start", 2, 100 * MS)
    sw.on_gc_phase("stop", 2, 115 * MS)          # a 15 ms full collection
    sw.slow_frame("c", "up", 16_000, t0_ns=99 * MS, now_ns=115 * MS + 1000)
    sw.slow_frame("c", "up", 11_000, t0_ns=116 * MS, now_ns=127 * MS)   # after it: not its fault
    a, b = rec.events("slow_frame")
    assert a["gc_ms"] == 15.0 and b["gc_ms"] == 0.0


def test_threshold_zero_is_off():
    sw, _, _ = watch(slow_frame_ms=0, slow_loop_ms=0)
    assert sw.frame_us == NEVER_US and sw.loop_us == NEVER_US
    assert sw.settings()["slow_frame_ms"] == 0 and sw.settings()["slow_loop_ms"] == 0
    sw2, _, _ = watch(slow_frame_ms=0.5)
    assert sw2.frame_us == 500


# ------------------------------------------------------------------------------ the collector

def test_collections_recorded_by_generation():
    sw, st, _ = watch()
    for gen, start, stop in ((0, 0, 200_000), (0, 1 * MS, 1 * MS + 300_000), (2, 5 * MS, 17 * MS)):
        sw.on_gc_phase("start", gen, start)
        sw.on_gc_phase("stop", gen, stop)
    assert st.gc_collections == {"0": 2, "1": 0, "2": 1}
    assert st.gc_time_us == {"0": 500, "1": 0, "2": 12_000}
    assert st.gc_pause.count == 3 and st.gc_pause.max == 12_000 and st.gc_pause.min == 200
    assert sw.gc_total_us == 12_500 and sw.gc_last_pause_us == 12_000 and sw.gc_last_end_ns == 17 * MS


def test_a_stop_without_its_start_is_ignored():
    sw, st, _ = watch()
    sw.on_gc_phase("stop", 1, 5 * MS)        # hooked while that collection ran
    assert st.gc_pause.count == 0 and st.gc_collections["1"] == 0


def test_the_real_collector_hook():
    """start() hooks gc.callbacks: a gc.collect() is counted; stop() unhooks it."""
    async def go() -> tuple[dict, dict]:
        sw, st, _ = watch(loop_probe_ms=0)
        sw.start(asyncio.get_running_loop())
        try:
            gc.collect()
            during = dict(st.gc_collections)
        finally:
            sw.stop()
        gc.collect()
        return during, dict(st.gc_collections)

    during, after = asyncio.run(go())
    assert during["2"] >= 1
    assert after == during
    assert not any(getattr(cb, "__self__", None).__class__ is StallWatch for cb in gc.callbacks)


# ------------------------------------------------------------------------------ the loop probe

def probe(**kw: object) -> tuple[StallWatch, Stats, Recorder]:
    sw, st, rec = watch(**kw)
    sw.reset_tick(0, 0)
    sw.arm(0)                                     # due at 25 ms
    return sw, st, rec


def test_tick_on_time_records_lag_only():
    sw, st, rec = probe()
    assert sw.tick(25 * MS + 400_000, 1 * MS) == 400
    assert st.loop_lag.count == 1 and st.loop_lag.max == 400
    assert st.slow_frames["loop"] == 0 and rec.lines == []
    sw.arm(30 * MS)
    assert sw.tick(54 * MS, 2 * MS) == 0          # a timer fired early (ms resolution): lag 0


@pytest.mark.parametrize("cpu_ms, gc_ms, hint", [(40, 0, "busy"), (5, 0, "not_running"), (40, 30, "gc")])
def test_slow_loop_says_what_held_it(cpu_ms, gc_ms, hint):
    sw, st, rec = probe()
    if gc_ms:
        sw.on_gc_phase("start", 2, 10 * MS)
        sw.on_gc_phase("stop", 2, (10 + gc_ms) * MS)
    lag = sw.tick(75 * MS, cpu_ms * MS)          # due at 25 ms, ran at 75: 50 ms late
    assert lag == 50_000
    assert st.slow_frames == {"forward": 0, "loop": 1}
    (line,) = rec.events("slow_loop")
    assert line == {"lag_ms": 50.0, "threshold_ms": 20.0, "interval_ms": 75.0, "cpu_ms": float(cpu_ms),
                    "gc_ms": float(gc_ms), "hint": hint}


def test_slow_loop_rate_limited_and_intervals_from_the_previous_tick():
    sw, st, rec = probe(log_max=1, log_interval_s=1.0)
    t, cpu = 0, 0
    for _ in range(5):                            # five ticks, each 30 ms late
        sw.arm(t)
        t += 25 * MS + 30 * MS
        cpu += 50 * MS
        sw.tick(t, cpu)
    assert st.slow_frames["loop"] == 5
    (line,) = rec.events("slow_loop")
    assert line["interval_ms"] == 55.0 and line["cpu_ms"] == 50.0
    sw.arm(t)
    t += 1000 * MS + 25 * MS
    sw.tick(t, cpu + 1 * MS)                      # a second later, 1 s late, no CPU: not running
    last = rec.events("slow_loop")[-1]
    assert last["suppressed"] == 4 and last["hint"] == "not_running" and last["interval_ms"] == 1025.0
    # frames and the loop have separate windows
    sw.slow_frame("c", "up", 20_000, t, t)
    assert len(rec.events("slow_frame")) == 1


def test_probe_runs_on_a_loop_and_stops():
    """start() with a probe period arms the timer chain; ticks land in loop_lag; stop() ends it."""
    async def go() -> tuple[int, int]:
        sw, st, _ = watch(loop_probe_ms=5, slow_loop_ms=0)
        sw.start(asyncio.get_running_loop())
        for _ in range(200):                      # bounded: at most 2 s
            if st.loop_lag.count >= 3:
                break
            await asyncio.sleep(0.01)
        sw.stop()
        n = st.loop_lag.count
        await asyncio.sleep(0.05)
        return n, st.loop_lag.count

    n, later = asyncio.run(go())
    assert n >= 3 and later == n


# ------------------------------------------------------------------------------ exposition

def stall_stats() -> Stats:
    sw, st, _ = watch()
    sw.slow_frame("c", "up", 11_000, 0, 11 * MS)
    for i in range(3):
        sw.on_gc_phase("start", i, i * 10 * MS)
        sw.on_gc_phase("stop", i, i * 10 * MS + (i + 1) * MS)
    sw.reset_tick(0, 0)
    sw.arm(0)
    sw.tick(60 * MS, 0)
    return st


def test_metrics_have_the_stall_figures():
    st = stall_stats()
    fams = {f.name: f for f in text_string_to_metric_families(prometheus_text(st).decode())}
    slow = {s.labels["kind"]: s.value for s in fams["voicebridge_slow_frames"].samples}
    assert slow == {"forward": 1, "loop": 1}
    runs = {s.labels["generation"]: s.value for s in fams["voicebridge_gc_collections"].samples}
    assert runs == {"0": 1, "1": 1, "2": 1}
    spent = {s.labels["generation"]: s.value for s in fams["voicebridge_gc_time_seconds"].samples}
    assert spent == {"0": 0.001, "1": 0.002, "2": 0.003}
    pause = {s.name: s.value for s in fams["voicebridge_gc_pause_seconds"].samples}
    assert pause["voicebridge_gc_pause_seconds_count"] == 3
    lag = {s.name: s.value for s in fams["voicebridge_loop_lag_seconds"].samples}
    assert lag["voicebridge_loop_lag_seconds_count"] == 1
    assert lag["voicebridge_loop_lag_seconds_sum"] == pytest.approx(0.035)


def test_snapshot_and_table_have_them():
    st = stall_stats()
    snap = st.snapshot()
    assert snap["slow_frames"] == {"forward": 1, "loop": 1}
    assert snap["gc"]["collections"] == {"0": 1, "1": 1, "2": 1}
    assert snap["latency_us"]["gc_pause"]["count"] == 3 and snap["latency_us"]["loop_lag"]["max"] == 35_000
    json.dumps(snap)
    table = st.table()
    assert "slow frames:" in table and "gc collections:" in table and "loop_lag" in table


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make promtool)")
def test_promtool_check_metrics_with_stall_figures():
    text = prometheus_text(stall_stats(), DaemonInfo(version="0.1.0", transport="fast"))
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()[:2000]


# ------------------------------------------------------------------------------ configuration

ENV = {"VOICEBRIDGE_TOKEN": "t"}


@pytest.mark.parametrize("key, value, fragment", [
    ("slow_frame_ms", -1, "server.slow_frame_ms"),
    ("slow_frame_ms", 0.0001, "server.slow_frame_ms"),
    ("slow_loop_ms", 0.5, "server.slow_loop_ms"),
    ("loop_probe_ms", 1, "server.loop_probe_ms"),
    ("slow_log_max", 0, "server.slow_log_max"),
    ("slow_log_interval_s", 0, "server.slow_log_interval_s"),
    ("gc_threshold", [0, 10, 10], "server.gc_threshold"),
    ("gc_threshold", [700, 10, 10, 10], "server.gc_threshold"),
])
def test_config_refuses(key, value, fragment):
    with pytest.raises(ConfigError, match=fragment.replace(".", r"\.")):
        load_config(None, env=ENV, overrides={"server": {key: value}})


def test_config_slow_loop_needs_the_probe():
    with pytest.raises(ConfigError, match=r"server\.slow_loop_ms: needs the loop probe"):
        load_config(None, env=ENV, overrides={"server": {"loop_probe_ms": 0}})
    cfg, _ = load_config(None, env=ENV, overrides={"server": {"loop_probe_ms": 0, "slow_loop_ms": 0}})
    assert cfg.server.loop_probe_ms == 0


def test_config_defaults_and_env():
    cfg, _ = load_config(None, env={**ENV, "VOICEBRIDGE_SERVER_SLOW_FRAME_MS": "2.5",
                                    "VOICEBRIDGE_SERVER_GC_THRESHOLD": "[5000, 20, 20]"})
    s = cfg.server
    assert (s.slow_frame_ms, s.gc_threshold) == (2.5, [5000, 20, 20])
    assert (s.slow_loop_ms, s.loop_probe_ms, s.slow_log_max, s.gc_freeze) == (20.0, 25.0, 5, True)


def test_tune_gc():
    before = gc.get_threshold()
    try:
        out = tune_gc(True, [5000, 20, 30])
        assert out["gc_threshold"] == [5000, 20, 30] and gc.get_threshold() == (5000, 20, 30)
        assert out["gc_frozen"] > 0 and gc.get_freeze_count() > 0   # frozen objects may still die
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
    assert tune_gc(False)["gc_frozen"] == 0 and gc.get_threshold() == before


# ------------------------------------------------------------------------------ the real daemon

STALL_S = 0.6

SITECUSTOMIZE = textwrap.dedent(f"""
    # test only (tests/test_stalls.py): the daemon holds its 3rd forwarded model delta {STALL_S} s
    import time
    from voicebridge import session as _session
    _orig = _session.CallSession.openai_frame
    _n = [0]

    def openai_frame(self, frame, now_ns):
        r = _orig(self, frame, now_ns)
        if r == _session.FORWARDED:
            _n[0] += 1
            if _n[0] == 3:
                time.sleep({STALL_S})
        return r

    _session.CallSession.openai_frame = openai_frame
""")


async def test_daemon_logs_one_slow_frame_for_one_stall(tmp_path):
    """One model delta held 0.6 s inside the daemon: exactly one `slow_frame` line (down, with the
    call's id, one bounded JSON line), voicebridge_slow_frames_total{kind="forward"} == 1, the
    loop probe saw the same stall, and the SIGUSR1 dump carries the counts."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    async with running_fake() as fake:
        async with running_daemon(fake, tmp_path, PYTHONPATH=str(site),
                                  VOICEBRIDGE_SERVER_SLOW_FRAME_MS="300",
                                  VOICEBRIDGE_SERVER_SLOW_LOOP_MS="300") as d:
            out = await clean_call(d, fake)
            lines = [ln for ln in d.log_text().splitlines() if '"slow_frame"' in ln]
            assert len(lines) == 1, lines
            assert len(lines[0]) < 400
            ev = json.loads(lines[0])
            assert ev["event"] == "slow_frame" and ev["level"] == "warning"
            assert ev["direction"] == "down" and ev["call_id"] == out.conversation_id
            assert ev["forward_ms"] >= STALL_S * 1000 and ev["threshold_ms"] == 300.0
            assert d.events("slow_loop"), "the probe must have seen the loop held"
            _, _, body = await d.http_get("/metrics", admin=True)
            fams = {f.name: f for f in text_string_to_metric_families(body.decode())}
            slow = {s.labels["kind"]: s.value for s in fams["voicebridge_slow_frames"].samples}
            assert slow["forward"] == 1 and slow["loop"] >= 1
            assert sum(s.value for s in fams["voicebridge_gc_collections"].samples) >= 0
            settings = d.events("server.stalls")
            assert settings and settings[0]["slow_frame_ms"] == 300.0 and settings[0]["gc_frozen"] > 0
            import signal
            d.signal(signal.SIGUSR1)
            dump = await d.wait_event("stats.dump", 5.0)
            assert dump is not None and dump["slow_frames"]["forward"] == 1
            assert dump["latency_us"]["loop_lag"]["max"] >= STALL_S * 1e6 * 0.5
