"""deploy/grafana-dashboard.json and deploy/prometheus-alerts.yml agree with what the daemon exposes.

* the alert rules pass `promtool check rules`, and promtool's unit tests
  (tests/prometheus_alerts_test.yml) make every alert fire on made-up series and stay quiet
  where it must;
* the dashboard is valid JSON an operator can import: a datasource template variable, and every
  panel but the rows has a PromQL query (whose syntax promtool checks);
* every metric name used by a dashboard query, a dashboard variable or an alert rule is in a real
  daemon's scrape after one call: a single process, and a supervisor with two workers once the
  daemon has `server.workers` (`PROMETHEUS_OWN` names are made by Prometheus itself; the
  supervisor's own metrics, `WORKERS_ONLY`, are required of the two-worker daemon only, and are
  allowed through an explicit entry, with a warning, while the daemon has no workers);
* where a Prometheus server is installed, it scrapes a real daemon (one process, then two
  workers) through one call, runs every dashboard query without error (the latency, call, frame
  and worker panels with data), and evaluates every alert rule without error.
promtool and prometheus come with Debian's prometheus package (`make promtool`); the tests that
need them are skipped where they are missing.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Any, Callable

import pytest
import yaml

from tests.daemon_harness import clean_call, config_has, free_port, running_daemon, running_fake, wait_until

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "deploy" / "grafana-dashboard.json"
ALERTS = ROOT / "deploy" / "prometheus-alerts.yml"
ALERT_TESTS = ROOT / "tests" / "prometheus_alerts_test.yml"

PROMTOOL = shutil.which("promtool")
PROMETHEUS = shutil.which("prometheus")
needs_promtool = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (make promtool)")

# series Prometheus records itself for every target, never in a scrape
PROMETHEUS_OWN = {"up"}
# the supervisor's metrics: a single process (server.workers = 1) has none
WORKERS_ONLY = {
    "voicebridge_worker_restarts_total": "the supervisor's worker restart counter (server.workers, issue 12 item 1)",
    "voicebridge_worker_calls_active": "calls in progress per worker",
    "voicebridge_worker_cpu_seconds_total": "CPU seconds per worker",
    "voicebridge_worker_up": "workers publishing their stats",
    "voicebridge_workers": "workers configured",
}
# the alerts the operator asked for (issue 12 item 7), by name
REQUIRED_ALERTS = {"VoicebridgeDown", "VoicebridgeOpenAIErrorsRising", "VoicebridgeTurnOverheadHigh",
                   "VoicebridgeDrainingLong", "VoicebridgeWorkerRestarted"}

# PromQL words that are not metric names when they stand alone (functions are told by their "(")
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right",
             "bool", "offset", "inf", "nan"}


# ----------------------------------------------------------------------------- readers
def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def panels(dash: dict[str, Any]) -> list[dict[str, Any]]:
    """Every panel, the ones inside collapsed rows too."""
    out = []
    for p in dash["panels"]:
        out.append(p)
        out += p.get("panels") or []
    return out


def variable_query(var: dict[str, Any]) -> str:
    q = var.get("query")
    return q.get("query", "") if isinstance(q, dict) else str(q or "")


def dashboard_queries(dash: dict[str, Any]) -> list[tuple[str, str]]:
    """(where, PromQL) of every panel target and of every query variable's label_values(...) argument."""
    out = [(f"panel {p['title']!r} {t['refId']}", t["expr"])
           for p in panels(dash) if p["type"] != "row" for t in p.get("targets") or []]
    for var in dash["templating"]["list"]:
        if var["type"] == "query":
            m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\)\s*", variable_query(var))
            assert m, f"variable {var['name']}: expected label_values(<selector>, <label>)"
            out.append((f"variable {var['name']}", m.group(1)))
    return out


def rule_queries() -> list[tuple[str, str]]:
    return [(f"alert {r['alert']}", r["expr"]) for r in alert_rules()]


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression: identifiers outside strings, label matchers, ranges
    and grouping clauses that are neither a keyword nor a function call."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`', '""', expr)
    s = re.sub(r"\{[^}]*\}", " ", s)
    s = re.sub(r"\[[^\]]*\]", " ", s)
    s = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)
    s = re.sub(r"\boffset\s+-?\w+", " ", s)
    names = set()
    for m in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)\s*(\()?", s):
        if m.group(2) is None and m.group(1).lower() not in _KEYWORDS:
            names.add(m.group(1))
    return names


def exposed_names(text: str) -> set[str]:
    """Series names a Prometheus text exposition holds, including those of families that have no
    sample yet (a labelled counter before its first label value)."""
    names: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(None, 3)
            if kind == "histogram":
                names |= {name + "_bucket", name + "_sum", name + "_count"}
            elif kind == "summary":
                names |= {name, name + "_sum", name + "_count"}
            elif kind == "counter":
                names |= {name, name if name.endswith("_total") else name + "_total"}
            else:
                names.add(name)
        elif line and not line.startswith("#"):
            m = re.match(r"[A-Za-z_:][\w:]*", line)
            if m:
                names.add(m.group(0))
    return names


def substituted(expr: str, job: str = ".*", instance: str = ".*") -> str:
    """A dashboard query with its template variables filled in, as Grafana would send it."""
    return expr.replace("$job", job).replace("$instance", instance)


def promtool(*args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, cwd=cwd,
                          stdin=subprocess.DEVNULL)


# ----------------------------------------------------------------------------- the name reader
def test_metric_names_reads_names_not_functions_labels_or_keywords():
    expr = ('histogram_quantile(0.99, sum by (instance, le) (rate(voicebridge_x_seconds_bucket'
            '{code!~"a|b", job=~"$job"}[5m]))) > 1e-3 and on (instance) up == 0 '
            'or absent(other:recorded) unless vector(0) * bool_like offset 5m')
    assert metric_names(expr) == {"voicebridge_x_seconds_bucket", "up", "other:recorded", "bool_like"}
    assert metric_names('label_replace(sum(a_total), "direction", "up", "", "") / ignoring(x) group_left b') \
        == {"a_total", "b"}


def test_exposed_names_include_families_without_samples():
    text = ("# HELP a_seconds h\n# TYPE a_seconds histogram\na_seconds_bucket{le=\"+Inf\"} 1.0\n"
            "# HELP e_total errors\n# TYPE e_total counter\n"
            "# HELP g g\n# TYPE g gauge\ng 1.0\n")
    assert exposed_names(text) == {"a_seconds_bucket", "a_seconds_sum", "a_seconds_count", "e_total", "g"}


# ----------------------------------------------------------------------------- the alert rules
@needs_promtool
def test_promtool_check_rules():
    r = promtool("check", "rules", str(ALERTS))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in r.stdout, r.stdout


@needs_promtool
def test_promtool_unit_tests_of_the_alerts():
    r = promtool("test", "rules", str(ALERT_TESTS.relative_to(ROOT)))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "SUCCESS" in r.stdout, r.stdout


def test_every_alert_is_labelled_explained_and_made_to_fire_by_a_unit_test():
    rules = alert_rules()
    names = {r["alert"] for r in rules}
    assert REQUIRED_ALERTS <= names, REQUIRED_ALERTS - names
    for r in rules:
        assert r["labels"]["severity"] in ("warning", "critical"), r["alert"]
        assert r["annotations"]["summary"] and r["annotations"]["description"], r["alert"]
    doc = yaml.safe_load(ALERT_TESTS.read_text())
    assert doc["rule_files"] == ["../deploy/prometheus-alerts.yml"]
    fired = {t["alertname"] for case in doc["tests"] for t in case["alert_rule_test"] if t["exp_alerts"]}
    assert fired == names, {"never made to fire": names - fired, "no such rule": fired - names}


# ----------------------------------------------------------------------------- the dashboard
def test_dashboard_is_importable_and_every_panel_has_a_query():
    dash = dashboard()
    assert dash["title"] and dash["uid"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    ds = variables["datasource"]
    assert ds["type"] == "datasource" and ds["query"] == "prometheus"
    ds_ref = {"type": "prometheus", "uid": "${datasource}"}
    ids = [p["id"] for p in panels(dash)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    boxes = []
    queried = 0
    for p in panels(dash):
        g = p["gridPos"]
        assert 0 <= g["x"] and g["w"] > 0 and g["x"] + g["w"] <= 24 and g["h"] > 0 and g["y"] >= 0, p["title"]
        for (x, y, w, h, title) in boxes:
            overlap = g["x"] < x + w and x < g["x"] + g["w"] and g["y"] < y + h and y < g["y"] + g["h"]
            assert not overlap, f"panels {title!r} and {p['title']!r} overlap"
        boxes.append((g["x"], g["y"], g["w"], g["h"], p["title"]))
        if p["type"] == "row":
            continue
        assert p["type"] in ("timeseries", "stat", "gauge", "table", "bargauge"), p["type"]
        assert p["datasource"] == ds_ref, p["title"]
        targets = p.get("targets") or []
        assert targets, f"panel {p['title']!r} has no query"
        assert len({t["refId"] for t in targets}) == len(targets), p["title"]
        for t in targets:
            assert t["datasource"] == ds_ref and t["expr"].strip(), (p["title"], t["refId"])
            queried += 1
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == ds_ref, var["name"]
    used_vars = {m for _, q in dashboard_queries(dash) for m in re.findall(r"\$(\w+)", q)}
    assert used_vars <= set(variables), used_vars - set(variables)
    # what the operator asked to see (issue 12 item 7)
    exprs = " ".join(q for _, q in dashboard_queries(dash))
    for name in ("voicebridge_calls_active", "voicebridge_calls_total", "voicebridge_up_forward_seconds_bucket",
                 "voicebridge_down_forward_seconds_bucket", "voicebridge_turn_overhead_seconds_bucket",
                 "voicebridge_model_ttfa_seconds_bucket", "voicebridge_barge_ins_total",
                 "voicebridge_openai_errors_total", "voicebridge_call_ends_total", "voicebridge_draining",
                 "voicebridge_worker_restarts_total", "voicebridge_openai_connect_seconds_count"):
        assert name in exprs, name
    for hist in ("up_forward", "down_forward", "turn_overhead", "model_ttfa"):
        assert (f"histogram_quantile(0.99, sum by (le) (rate(voicebridge_{hist}_seconds_bucket"
                in exprs), hist
    assert queried >= 20


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path):
    """promtool parses each query, made a recording rule for the check."""
    rules = [{"record": f"dashboard_check:q{i}", "expr": substituted(q)}
             for i, (_, q) in enumerate(dashboard_queries(dashboard()))]
    path = tmp_path / "dashboard_queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = promtool("check", "rules", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"SUCCESS: {len(rules)} rules found" in r.stdout, r.stdout


# ----------------------------------------------------------------------------- against the daemon
def used_names() -> dict[str, list[str]]:
    used: dict[str, list[str]] = {}
    for where, q in [*dashboard_queries(dashboard()), *rule_queries()]:
        assert "__name__" not in q, f"{where}: name the metric, the name check cannot read __name__"
        for name in metric_names(q):
            used.setdefault(name, []).append(where)
    return used


async def _scrape(fake: Any, tmp_path: Path, **env: str) -> set[str]:
    """Series names of a daemon's /metrics after one clean call."""
    async with running_daemon(fake, tmp_path, **env) as d:
        await clean_call(d, fake)
        status, _, body = await d.http_get("/metrics", admin=True)
        assert status == 200, body[:300]
        return exposed_names(body.decode())


def _missing(used: dict[str, list[str]], exposed: set[str], allowed: set[str]) -> dict[str, list[str]]:
    return {n: w for n, w in used.items() if n not in exposed and n not in PROMETHEUS_OWN and n not in allowed}


async def test_every_metric_name_used_is_in_a_real_scrape(tmp_path):
    used = used_names()
    has_workers = config_has("server", "workers")
    async with running_fake() as fake:
        single = await _scrape(fake, tmp_path)
        multi = await _scrape(fake, tmp_path, VOICEBRIDGE_SERVER_WORKERS="2") if has_workers else None
    assert "voicebridge_up_forward_seconds_bucket" in single and "voicebridge_calls_total" in single
    missing = _missing(used, single, set(WORKERS_ONLY))
    assert not missing, f"used but not exposed by the single-process daemon: {missing}"
    if multi is not None:
        missing = _missing(used, multi, set())
        assert not missing, f"used but not exposed by the daemon with 2 workers: {missing}"
    else:
        for name, what in WORKERS_ONLY.items():
            warnings.warn(f"{name} ({what}) is used by {used.get(name)} but this daemon has no server.workers "
                          "yet: allowed by the WORKERS_ONLY entry", stacklevel=1)


# ----------------------------------------------------------------------------- on a real Prometheus
def _get_json(url: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return json.loads(r.read())
    except urllib.error.HTTPError as e:        # a bad query: 400 with the error as JSON
        return json.loads(e.read() or b"{}")


class Prom:
    """A Prometheus server on 127.0.0.1 scraping one target every second, with the alert rules."""

    def __init__(self, tmp: Path, target: str) -> None:
        assert PROMETHEUS is not None
        self.port = free_port()
        cfg = tmp / "prometheus.yml"
        cfg.write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [{"job_name": "voicebridge", "static_configs": [{"targets": [target]}]}]}))
        self.log = open(tmp / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [PROMETHEUS, f"--config.file={cfg}", f"--storage.tsdb.path={tmp / 'tsdb'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--log.level=warn"],
            stdout=self.log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)

    def api(self, path: str, **params: str) -> dict[str, Any]:
        q = ("?" + urllib.parse.urlencode(params)) if params else ""
        return _get_json(f"http://127.0.0.1:{self.port}/api/v1/{path}{q}")

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def value(self, expr: str) -> float | None:
        res = self.query(expr).get("data", {}).get("result") or []
        return float(res[0]["value"][1]) if res else None

    def ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=2) as r:
                return r.status == 200
        except OSError:
            return False

    def log_tail(self) -> str:
        return Path(self.log.name).read_text(errors="replace")[-1500:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.log.close()


async def _until(pred: Callable[[], bool], timeout_s: float, what: str, prom: Prom) -> None:
    ok = await wait_until(pred, timeout_s, step_s=0.25)
    assert ok, f"no {what} within {timeout_s:g} s; prometheus log: {prom.log_tail()}"


# panels that must show data after one call (the others may be empty: no barge-in, no error)
WITH_DATA = ("Calls active", "Calls per minute", "Call ends by reason", "Audio frames per second",
             "Forward latency up", "Forward latency down", "Turn latency: the bridge's share",
             "Turn latency: the model's share", "Draining", "CPU", "Resident memory", "Instances up",
             "Workers up")


@pytest.mark.skipif(PROMETHEUS is None, reason="prometheus not installed (Debian's prometheus package)")
@pytest.mark.parametrize("workers", [1, 2])
async def test_queries_and_rules_run_on_a_real_prometheus(tmp_path, workers):
    if workers > 1 and not config_has("server", "workers"):
        pytest.skip("this daemon has no server.workers")
    env = {"VOICEBRIDGE_SERVER_WORKERS": str(workers)} if workers > 1 else {}
    async with running_fake() as fake, running_daemon(fake, tmp_path, **env) as d:
        assert d.admin_port is not None
        target = f"127.0.0.1:{d.admin_port}"
        prom = Prom(tmp_path, target)
        try:
            await _until(prom.ready, 30, "prometheus ready", prom)
            # two scrapes before the call, so rates over the call are real increases
            await _until(lambda: (prom.value("count_over_time(voicebridge_calls_total[1m])") or 0) >= 2,
                         20, "two scrapes", prom)
            await clean_call(d, fake)
            await _until(lambda: (prom.value("sum(increase(voicebridge_turn_overhead_seconds_count[1m]))") or 0) > 0,
                         20, "a scrape after the call", prom)
            # a labelled series born with the call (its end reason) needs two samples for a rate
            await _until(lambda: (prom.value("min(count_over_time(voicebridge_call_ends_total[1m]))") or 0) >= 2,
                         20, "two scrapes of the call's end reason", prom)
            # every rule evaluated again after that scrape, none with an error
            before = _evaluations(prom)
            await _until(lambda: _all_newer(_evaluations(prom), before), 20, "every rule evaluated", prom)
            groups = prom.api("rules")["data"]["groups"]
            bad = [(r["name"], r.get("lastError")) for g in groups for r in g["rules"]
                   if r["health"] != "ok" or r.get("lastError")]
            assert not bad, bad

            jobs = prom.api("label/job/values", **{"match[]": "voicebridge_build_info"})["data"]
            assert jobs == ["voicebridge"], jobs
            instances = prom.api("label/instance/values", **{"match[]": 'voicebridge_build_info{job=~"voicebridge"}'})
            assert instances["data"] == [target], instances

            dash = dashboard()
            for p in panels(dash):
                if p["type"] == "row":
                    continue
                for t in p["targets"]:
                    expr = substituted(t["expr"], job="voicebridge", instance=target)
                    r = prom.query(expr)
                    assert r.get("status") == "success", (p["title"], expr, r)
                    if not p["title"].startswith(WITH_DATA) or (workers == 1 and metric_names(expr) & set(WORKERS_ONLY)):
                        continue
                    if "openai_closed" in expr:
                        continue              # no call ended that way
                    res = r["data"]["result"]
                    assert res, f"panel {p['title']!r} {t['refId']}: no data after a call ({expr})"
                    values = [float(s["value"][1]) for s in res]
                    assert all(math.isfinite(v) and v >= 0 for v in values), (p["title"], expr, values)
                    if "histogram_quantile" in expr:
                        assert all(v > 0 for v in values), (p["title"], expr, values)
            # the quantiles come out ordered
            for hist in ("up_forward", "turn_overhead"):
                qs = [prom.value(f"histogram_quantile({q}, sum by (le) (rate(voicebridge_{hist}_seconds_bucket[5m])))")
                      for q in (0.5, 0.99)]
                assert qs[0] is not None and qs[1] is not None and 0 < qs[0] <= qs[1], (hist, qs)
        finally:
            prom.stop()


def _evaluations(prom: Prom) -> dict[str, str]:
    """rule name -> the time of its last evaluation, as Prometheus wrote it."""
    groups = prom.api("rules").get("data", {}).get("groups") or []
    return {r["name"]: r.get("lastEvaluation", "") for g in groups for r in g["rules"]}


def _all_newer(now: dict[str, str], before: dict[str, str]) -> bool:
    return len(now) == len(alert_rules()) and all(now[n] != before.get(n) for n in now)
