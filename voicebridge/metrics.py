"""Prometheus text exposition of `Stats`, built at scrape time.

The hot path records only into `stats.Histogram` and plain ints; nothing here runs until a
scrape. `StatsCollector.collect()` then reads the `Stats` and yields, per histogram `<name>`:

* `voicebridge_<name>_seconds` (histogram): cumulative buckets at `BUCKETS_US` (50 µs .. 30 s,
  plus `+Inf` == count), `_sum` in seconds (exact), `_count`. A bucket's `le` count is
  `Histogram.cumulative_le` of the bound: exact at the bound unless the bound falls inside one
  of our log-linear buckets, then off by at most that bucket (< 0.8 % of the bound);
  (our own exact-to-0.8 % percentiles are in the admin `/health`; Prometheus takes its
  quantiles from the buckets with `histogram_quantile`, which, unlike a summary, aggregates
  across instances — and `promtool check metrics` accepts no `quantile` label on a gauge);

and `voicebridge_<counter>_total` for every counter of `stats.COUNTERS` (`calls_total` stays
`voicebridge_calls_total`), `voicebridge_openai_errors_total{code}`,
`voicebridge_call_ends_total{reason}`, `voicebridge_latency_clamped_total{histogram}` (values
above a histogram's range), gauges `voicebridge_calls_active`, `voicebridge_uptime_seconds`,
`voicebridge_draining` (1 from SIGTERM on), `voicebridge_config_reloads_total`,
`voicebridge_build_info{version,python,transport}` (always 1), and the standard `process_*`
metrics (CPU seconds, resident memory, open descriptors, start time) of prometheus_client's
`ProcessCollector`. `promtool check metrics` passes on it (tests/test_metrics.py).
"""

from __future__ import annotations

import platform
from typing import Iterable, NamedTuple

from prometheus_client import exposition
from prometheus_client.exposition import generate_latest
from prometheus_client.metrics_core import (CounterMetricFamily, GaugeMetricFamily,
                                            HistogramMetricFamily, Metric)
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.utils import floatToGoString

from .stalls import metric_families as stall_metric_families
from .stats import COUNTERS, Stats

__all__ = ["BUCKETS_US", "CONTENT_TYPE", "DaemonInfo", "StatsCollector", "make_registry", "prometheus_text"]

# The media type of what `generate_latest` writes. prometheus_client < 0.22 calls it
# CONTENT_TYPE_LATEST; newer versions moved CONTENT_TYPE_LATEST to "version=1.0.0" but still write
# the same text for legacy metric names (all of ours) and serve it as 0.0.4 unless a scraper asks
# for 1.0.0, so 0.0.4 is what we announce (understood by every Prometheus version).
CONTENT_TYPE: str = getattr(exposition, "CONTENT_TYPE_PLAIN_0_0_4", exposition.CONTENT_TYPE_LATEST)

# Histogram bucket upper bounds, µs (exposed in seconds); +Inf is added.
BUCKETS_US: tuple[int, ...] = (
    50, 100, 250, 500,
    1_000, 2_500, 5_000, 10_000, 25_000, 50_000, 100_000, 250_000, 500_000,
    1_000_000, 2_500_000, 5_000_000, 10_000_000, 30_000_000,
)
_LE: tuple[str, ...] = tuple(floatToGoString(b / 1e6) for b in BUCKETS_US) + ("+Inf",)  # type: ignore[no-untyped-call]

PREFIX = "voicebridge_"


class DaemonInfo(NamedTuple):
    """What the daemon adds to `Stats` in a scrape."""
    version: str = ""
    transport: str = ""
    draining: bool = False
    reloads: int = 0


class StatsCollector(Collector):
    """Reads one `Stats` at every `collect()` (scrape); holds no state of its own."""

    def __init__(self, stats: Stats, info: DaemonInfo | None = None) -> None:
        self.stats = stats
        self.info = info

    def describe(self) -> list[Metric]:
        """No up-front description: the registry must not call `collect()` at registration."""
        return []

    def collect(self) -> Iterable[Metric]:
        st = self.stats
        hists = st.histograms()
        clamped = CounterMetricFamily(PREFIX + "latency_clamped", "values above a latency histogram's range, "
                                      "recorded as its highest value", labels=["histogram"])
        for name, h in hists.items():
            le_counts = h.cumulative_le(BUCKETS_US + (h.highest,))  # last: everything == +Inf
            yield HistogramMetricFamily(
                f"{PREFIX}{name}_seconds", h.help,
                buckets=list(zip(_LE, le_counts)),
                sum_value=h.total / 1e6)
            clamped.add_metric([name], h.clamped)
        yield clamped

        for name, help in COUNTERS.items():
            if name == "calls_active":
                yield GaugeMetricFamily(PREFIX + name, help, value=st.calls_active)
            else:
                # CounterMetricFamily adds the `_total` suffix (and strips one we give it).
                yield CounterMetricFamily(PREFIX + name, help, value=getattr(st, name))

        errors = CounterMetricFamily(PREFIX + "openai_errors", "OpenAI Realtime error events by code",
                                     labels=["code"])
        for code, n in sorted(st.errors.items()):
            errors.add_metric([code], n)
        yield errors
        ends = CounterMetricFamily(PREFIX + "call_ends", "calls ended, by reason", labels=["reason"])
        for reason, n in sorted(st.call_ends.items()):
            ends.add_metric([reason], n)
        yield ends
        tools = CounterMetricFamily(PREFIX + "tool_calls", "function calls by tool and outcome",
                                    labels=["tool", "outcome"])
        for key, n in sorted(st.tools.items()):
            tools.add_metric(key.split("|", 1), n)
        yield tools
        tokens = CounterMetricFamily(PREFIX + "tokens", "Realtime tokens used (response.done usage), "
                                     "by profile and kind", labels=["profile", "kind"])
        for key, n in sorted(st.tokens.items()):
            tokens.add_metric(key.split("|", 1), n)
        yield tokens
        yield from stall_metric_families(st)   # slow frames/loop ticks, gc runs and time by generation
        yield GaugeMetricFamily(PREFIX + "uptime_seconds", "seconds since the process started",
                                value=st.uptime_s())
        info = self.info
        if info is not None:
            build = GaugeMetricFamily(PREFIX + "build_info", "the running build (always 1)",
                                      labels=["version", "python", "transport"])
            build.add_metric([info.version, platform.python_version(), info.transport], 1)
            yield build
            yield GaugeMetricFamily(PREFIX + "draining", "1 once SIGTERM began the drain",
                                    value=int(info.draining))
            yield CounterMetricFamily(PREFIX + "config_reloads", "configurations taken by SIGHUP",
                                      value=info.reloads)


def make_registry(stats: Stats, info: DaemonInfo | None = None) -> CollectorRegistry:
    """A private registry: a `StatsCollector` for `stats`; with `info` (the daemon's scrape)
    also the build/draining gauges and the `process_*` metrics of this process."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StatsCollector(stats, info))
    if info is not None:
        ProcessCollector(registry=reg)
    return reg


def prometheus_text(stats: Stats, info: DaemonInfo | None = None) -> bytes:
    """The Prometheus text exposition (format 0.0.4, `CONTENT_TYPE`) of `stats`, read now."""
    return generate_latest(make_registry(stats, info))
