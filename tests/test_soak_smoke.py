"""The soak mode of the bench end to end (`python -m bench --soak`, ~100 calls through a real
daemon), the admin `/health` `process` figures it reads, and the soak's verdict on bad figures."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

from bench import soak
from tests.daemon_harness import clean_call, running_daemon, running_fake
from voicebridge.procinfo import open_fds, process_figures

ROOT = Path(__file__).resolve().parent.parent
SOAK_TIMEOUT_S = 120.0


def test_soak_mode_end_to_end(tmp_path: Path) -> None:
    """100 calls (and 100 warm-up), 10 at a time: passes, and the report has its fields. The RSS
    bound is wider here than the default: a 100-call warm-up does not reach the allocator's
    high-water mark (see bench/soak.py, RSS_TOLERANCE_KIB); fds, tasks and active calls stay exact."""
    r = subprocess.run([sys.executable, "-m", "bench", "--soak", "--soak-calls", "100", "--soak-concurrency", "10",
                        "--soak-warmup", "100", "--soak-rss-tolerance-kib", "16384",
                        "--soak-results-dir", str(tmp_path)],
                       cwd=ROOT, capture_output=True, text=True, timeout=SOAK_TIMEOUT_S,
                       env={k: v for k, v in os.environ.items() if not k.startswith("VOICEBRIDGE_")})
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]
    assert "Traceback" not in out, out[-3000:]
    assert "soak: PASS" in out and "open_fds" in out and "calls/s" in out, out[-3000:]
    files = list(tmp_path.glob("soak-*.json"))
    assert len(files) == 1, files
    res = json.loads(files[0].read_text())
    assert res["pass"] is True and res["why_failed"] == [], res["why_failed"]
    for reading in ("start", "end", "peak"):
        assert set(res[reading]) >= {"open_fds", "tasks", "active_calls", "rss_kib"}, res[reading]
    for k in ("open_fds", "tasks"):
        assert res["end"][k] == res["start"][k] and res["peak"][k] > res["start"][k], (k, res)
    assert res["start"]["active_calls"] == res["end"]["active_calls"] == 0 and res["peak"]["active_calls"] > 0
    assert res["calls_done"] == 100 and res["failed"] == 0 and res["calls_cut"] == 0
    assert set(res["endings"]) == set(soak.ENDINGS)
    assert all(k["failed"] == 0 and k["ok"] == k["calls"] > 0 for k in res["endings"].values()), res["endings"]
    # the OpenAI drops happened, once per openai_drop call (warm-up included), and the daemon
    # saw both kinds of VAIC ending
    drop_calls = sum(1 for i in range(200) if soak.ending_of(i) == "openai_drop")
    assert res["fake_dropped"] == res["openai_drops_expected"] == drop_calls
    ends = res["daemon_call_ends"]
    assert ends.get("vaic_session_end", 0) > 0 and ends.get("resume_grace_expired", 0) > 0, ends
    assert sum(ends.values()) == 200, ends
    assert res["duration_s"] > 0 and res["calls_per_s"] > 0 and res["vm_hwm_kib"] >= res["peak"]["rss_kib"]
    assert res["bridge_exit_code"] == 0


def test_soak_judge_fails_on_figures_not_back() -> None:
    """The verdict itself: one fd, task or active call more at the end, or RSS past the bound, fails."""
    start = {"open_fds": 16, "tasks": 1, "active_calls": 0, "rss_kib": 70000}
    base = {"start": start, "end": dict(start), "rss_tolerance_kib": 4096, "failed": 0, "bridge_exit_code": 0,
            "fake_dropped": 3, "openai_drops_expected": 3, "bridge_log": {"levels": {"warning": 2}, "non_json": 0}}
    assert soak.judge(base) == []
    for key, value, word in (("open_fds", 17, "open_fds"), ("tasks", 2, "tasks"), ("active_calls", 1, "active_calls"),
                             ("rss_kib", 70000 + 4097, "rss_kib")):
        res = {**base, "end": {**start, key: value}}
        assert any(word in why for why in soak.judge(res)), (key, soak.judge(res))
    assert soak.judge({**base, "failed": 1}) and soak.judge({**base, "fake_dropped": 2})
    assert soak.judge({**base, "bridge_log": {"levels": {"error": 1}, "non_json": 0}})


def test_procinfo_counts_descriptors() -> None:
    before = open_fds()
    assert before is not None and before > 0
    with open(__file__, "rb"):
        assert open_fds() == before + 1
    assert open_fds() == before
    figs = process_figures()
    assert figs["tasks"] == 0 and (figs["rss_kib"] or 0) > 0   # no running loop here


async def test_admin_health_has_process_figures(tmp_path: Path) -> None:
    async with running_fake() as fake, running_daemon(fake, tmp_path) as d:
        status, _, body = await d.http_get("/health", admin=True)
        assert status == 200
        proc = json.loads(body)["process"]
        assert set(proc) == {"open_fds", "tasks", "rss_kib"}
        assert all(isinstance(v, int) and v > 0 for v in proc.values()), proc
        # the daemon's own count against /proc/<pid>/fd from outside (which may still hold the
        # admin connection of that request, or not)
        assert d.fd_count() - 1 <= proc["open_fds"] <= d.fd_count() + 1, (proc, d.fd_count())
        assert d.rss_kib() // 2 <= proc["rss_kib"] <= d.rss_kib() * 2, (proc, d.rss_kib())
        # after a call, the same figures again (bounded wait for its sockets to close)
        await clean_call(d, fake, check_log=False)

        last: dict[str, int] = {}
        for _ in range(100):   # bounded: at most ~100 polls, 0.1 s apart
            last = json.loads((await d.http_get("/health", admin=True))[2])["process"]
            if last["open_fds"] == proc["open_fds"] and last["tasks"] == proc["tasks"]:
                break
            await asyncio.sleep(0.1)
        assert last["open_fds"] == proc["open_fds"] and last["tasks"] == proc["tasks"], (proc, last)
