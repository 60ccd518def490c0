"""The real daemon as a subprocess: CLI, /health, /metrics, SIGUSR1 stats dump, clean SIGTERM."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get(url: str) -> tuple[int, bytes]:
    with urllib.request.urlopen(url, timeout=3) as r:
        return r.status, r.read()


@pytest.fixture
def daemon(tmp_path):
    port, admin = free_port(), free_port()
    env = {**os.environ, "VOICEBRIDGE_TOKEN": "daemon-test-token", "OPENAI_API_KEY": "sk-never-logged",
           "VOICEBRIDGE_SERVER_HOST": "127.0.0.1", "VOICEBRIDGE_SERVER_PORT": str(port),
           "VOICEBRIDGE_SERVER_ADMIN_PORT": str(admin)}
    out = tmp_path / "out.log"
    with open(out, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "voicebridge", "--config", str(ROOT / "config.toml")],
                                env=env, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                get(f"http://127.0.0.1:{admin}/health")
                break
            except OSError:
                time.sleep(0.05)
        yield proc, port, admin, out
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def test_daemon_health_metrics_sigusr1_sigterm(daemon):
    proc, port, admin, out = daemon
    status, body = get(f"http://127.0.0.1:{port}/health")        # public: cheap liveness
    live = json.loads(body)
    assert status == 200 and live["status"] == "ok" and "latency_us" not in live
    with pytest.raises(urllib.error.HTTPError) as e:             # metrics: admin listener only
        get(f"http://127.0.0.1:{port}/metrics")
    assert e.value.code == 404
    status, body = get(f"http://127.0.0.1:{admin}/health")
    health = json.loads(body)
    assert status == 200 and health["status"] == "ok" and health["active_calls"] == 0
    assert set(health["latency_us"]) >= {"up_forward", "down_forward", "barge_in"}
    status, body = get(f"http://127.0.0.1:{admin}/metrics")
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert "voicebridge_up_forward_seconds" in names and "voicebridge_calls_active" in names
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline and "stats.table" not in out.read_text():
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(10) == 0
    events = [json.loads(line) for line in out.read_text().splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "stats.dump" in names and "stats.table" in names and names[-1] == "server.stopped"
    dump = next(e for e in events if e["event"] == "stats.dump")
    assert "latency_us" in dump and "counters" in dump
    text = out.read_text()
    assert "sk-never-logged" not in text and "daemon-test-token" not in text


def test_daemon_refuses_invalid_config(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('[audio]\nplayout_lead_ms = 5\n')
    r = subprocess.run([sys.executable, "-m", "voicebridge", "--config", str(bad)],
                       env={**os.environ, "VOICEBRIDGE_TOKEN": "x"}, capture_output=True, text=True,
                       timeout=30, cwd=ROOT)
    assert r.returncode == 2
    assert "audio.playout_lead_ms" in r.stderr and "Traceback" not in r.stderr
