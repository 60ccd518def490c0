"""metrics.py: Prometheus exposition of Stats parses, buckets are cumulative, counters labelled."""

from __future__ import annotations

import math
import random
import shutil
import subprocess

import pytest
from prometheus_client.parser import text_string_to_metric_families

from voicebridge.metrics import BUCKETS_US, CONTENT_TYPE, StatsCollector, make_registry, prometheus_text
from voicebridge.stats import COUNTERS, HISTOGRAMS, Stats


def parse(stats: Stats) -> dict:
    return {f.name: f for f in text_string_to_metric_families(prometheus_text(stats).decode())}


@pytest.fixture
def stats() -> Stats:
    s = Stats()
    rnd = random.Random(11)
    for i, h in enumerate(s.histograms().values()):
        for _ in range(500 + 100 * i):
            h.record(int(math.exp(rnd.uniform(0, math.log(40_000_000)))))
    s.up_forward.record(10**11)                 # clamped
    s.calls_total = 4
    s.calls_active = 2
    s.calls_rejected = 1
    s.frames_up = 1000
    s.frames_down = 800
    s.bytes_up = 640_000
    s.bytes_down = 512_000
    s.truncates = 2
    s.barge_ins = 3
    s.late_deltas_dropped = 5
    s.early_audio_dropped = 0
    s.count_error("session_expired")
    s.count_error("conversation_already_has_active_response")
    s.count_error("conversation_already_has_active_response")
    s.count_call_end("session.end")
    s.count_call_end("openai closed")
    return s


def test_content_type():
    assert CONTENT_TYPE == "text/plain; version=0.0.4; charset=utf-8"


def test_histograms(stats):
    fams = parse(stats)
    for name, h in stats.histograms().items():
        fam = fams[f"voicebridge_{name}_seconds"]
        assert fam.type == "histogram"
        buckets = [(s.labels["le"], s.value) for s in fam.samples if s.name.endswith("_bucket")]
        les = [float(le) for le, _ in buckets]
        assert les[-1] == math.inf
        assert les[:-1] == [b / 1e6 for b in BUCKETS_US]
        counts = [v for _, v in buckets]
        assert counts == sorted(counts)                        # cumulative, monotone
        sample = {s.name: s.value for s in fam.samples if not s.name.endswith("_bucket")}
        assert counts[-1] == sample[f"voicebridge_{name}_seconds_count"] == h.count
        assert sample[f"voicebridge_{name}_seconds_sum"] == pytest.approx(h.total / 1e6)
        # each bucket agrees with the raw cumulative counts of our histogram
        assert counts[:-1] == h.cumulative_le(BUCKETS_US)


def test_bucket_counts_close_to_exact():
    s = Stats()
    rnd = random.Random(5)
    values = [int(math.exp(rnd.uniform(0, math.log(40_000_000)))) for _ in range(20_000)]
    for v in values:
        s.model_ttfa.record(v)
    fam = parse(s)["voicebridge_model_ttfa_seconds"]
    got = [x.value for x in fam.samples if x.name.endswith("_bucket")][:-1]
    for b, c in zip(BUCKETS_US, got):
        exact = sum(v <= b for v in values)
        below = sum(v < b - b // 128 for v in values)          # lower edge of b's bucket or below
        assert below <= c <= exact


def test_no_quantile_gauges(stats):
    """Quantiles come from the buckets (histogram_quantile); a gauge with a `quantile` label
    fails `promtool check metrics`, and a summary would not aggregate across instances."""
    fams = parse(stats)
    assert not [n for n in fams if "quantile" in n]
    assert all("quantile" not in s.labels for f in fams.values() for s in f.samples)


def test_daemon_scrape_has_build_info_draining_and_process_metrics(stats):
    from voicebridge.metrics import DaemonInfo
    fams = {f.name: f for f in text_string_to_metric_families(prometheus_text(
        stats, DaemonInfo(version="9.9", transport="fast", draining=True, reloads=2)).decode())}
    (b,) = fams["voicebridge_build_info"].samples
    assert b.value == 1 and b.labels["version"] == "9.9" and b.labels["transport"] == "fast"
    assert fams["voicebridge_draining"].samples[0].value == 1
    assert fams["voicebridge_config_reloads"].samples[0].value == 2
    assert fams["process_resident_memory_bytes"].samples[0].value > 0
    assert fams["process_open_fds"].samples[0].value > 0


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed (make promcheck installs it)")
def test_promtool_check_metrics(stats):
    """`promtool check metrics` finds nothing to complain about in a daemon's scrape."""
    from voicebridge.metrics import DaemonInfo
    text = prometheus_text(stats, DaemonInfo(version="0.1.0", transport="fast"))
    r = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert r.returncode == 0, (r.stdout + r.stderr).decode()[:2000]


def test_empty_stats():
    fams = parse(Stats())
    fam = fams["voicebridge_up_forward_seconds"]
    assert all(s.value == 0 for s in fam.samples)
    assert fams["voicebridge_openai_errors"].samples == []


def test_counters_and_labels(stats):
    fams = parse(stats)
    for name in COUNTERS:
        if name == "calls_active":
            fam = fams["voicebridge_calls_active"]
            assert fam.type == "gauge" and fam.samples[0].value == 2
            continue
        base = name[:-len("_total")] if name.endswith("_total") else name
        fam = fams[f"voicebridge_{base}"]
        assert fam.type == "counter"
        (sample,) = fam.samples
        assert sample.name == f"voicebridge_{base}_total"
        assert sample.value == getattr(stats, name)
    assert fams["voicebridge_calls"].samples[0].name == "voicebridge_calls_total"
    assert fams["voicebridge_frames_up"].samples[0].value == 1000

    errors = {s.labels["code"]: s.value for s in fams["voicebridge_openai_errors"].samples}
    assert errors == {"session_expired": 1, "conversation_already_has_active_response": 2}
    ends = {s.labels["reason"]: s.value for s in fams["voicebridge_call_ends"].samples}
    assert ends == {"session.end": 1, "openai closed": 1}
    clamped = {s.labels["histogram"]: s.value for s in fams["voicebridge_latency_clamped"].samples}
    assert set(clamped) == set(HISTOGRAMS) and clamped["up_forward"] == 1

    up = fams["voicebridge_uptime_seconds"]
    assert up.type == "gauge" and up.samples[0].value >= 0


def test_only_our_metrics(stats):
    names = set(parse(stats))
    assert all(n.startswith("voicebridge_") for n in names)   # no process_/python_gc_ collectors


def test_scrape_reads_live_values(stats):
    reg = make_registry(stats)
    assert reg.get_sample_value("voicebridge_frames_up_total") == 1000
    stats.frames_up += 1
    stats.up_forward.record(10)
    assert reg.get_sample_value("voicebridge_frames_up_total") == 1001
    assert reg.get_sample_value("voicebridge_up_forward_seconds_count") == stats.up_forward.count
    assert list(StatsCollector(stats).describe()) == []
