"""Recording and replay end to end: the real daemon records a call selected by its profile (and
not the other call), then `python -m voicebridge.replay` replays the caller side of that file,
once through a fresh bridge of its own with the fake model and once through the running daemon,
and the replayed timelines have the recorded turns, barge-in, play streams and truncate."""

from __future__ import annotations

import asyncio
import json
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from tests.daemon_harness import ROOT, TOKEN, fake_config, running_daemon, running_fake
from voicebridge.recording import read_recording
from voicebridge.sim.caller import BargeIn, CallerConfig, Silence, Speak, WaitForBot, run_call
from voicebridge.timeline import VAIC_COUNTS, summarize, timeline

RECORDED_CALLEE = "+15550199"
SCRIPT = [WaitForBot(4000), Speak(600), BargeIn(after_heard_ms=600, ms=600), WaitForBot(4000), Silence(200)]


def config_file(tmp: Path, rec_dir: Path) -> Path:
    text = (ROOT / "config.toml").read_text()
    text += f"""
[recording]
dir = "{rec_dir}"
retention_days = 2

[profiles.recorded]
match_callee = ["{RECORDED_CALLEE}"]
record = true
"""
    p = tmp / "config.toml"
    p.write_text(text)
    return p


async def wait_complete(rec_dir: Path, n: int, timeout_s: float = 8.0) -> list[Path]:
    """The `n` recordings once each ends with its recording.end note."""
    end = time.monotonic() + timeout_s
    while True:
        files = sorted(rec_dir.glob("*.vbrec"))
        done = [p for p in files
                if (recs := read_recording(p).records) and b'"recording.end"' in recs[-1].text]
        if len(done) >= n or time.monotonic() > end:
            return done
        await asyncio.sleep(0.1)


async def replay(*args: str, timeout_s: float = 60.0) -> tuple[int, dict[str, Any], str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voicebridge.replay", *args, "--json", cwd=ROOT,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), timeout_s)
    assert proc.returncode in (0, 1), err.decode()[-2000:]
    return proc.returncode, json.loads(out), err.decode()


async def test_record_by_profile_then_replay(tmp_path: Path) -> None:
    rec_dir = tmp_path / "recordings"
    cfg = config_file(tmp_path, rec_dir)
    async with running_fake(fake_config(reply_ms=[2500, 600], greeting_ms=600)) as fake:
        async with running_daemon(fake, tmp_path, config_path=cfg,
                                  VOICEBRIDGE_OPENAI_GREETING="Greet the caller.") as d:
            # a call of the default profile (record unset) first: the one writer thread handles
            # files in order, so a file of this call would be there before the next one's end
            other = await run_call(CallerConfig(url=d.url, token=TOKEN, callee="+15550100",
                                                conversation_id="rec-e2e-2",
                                                script=[WaitForBot(4000), Speak(600), WaitForBot(4000)]))
            assert other.end_reason == "caller-hangup"
            res = await run_call(CallerConfig(url=d.url, token=TOKEN, callee=RECORDED_CALLEE,
                                              conversation_id="rec-e2e-1", script=SCRIPT))
            assert res.end_reason == "caller-hangup" and not res.violations, res.violations
            [path] = await wait_complete(rec_dir, 1)
            assert sorted(rec_dir.glob("*.vbrec")) == [path]
            assert "rec-e2e-1" in path.name                       # only the profile's call
            assert stat.S_IMODE(path.stat().st_mode) == 0o600
            assert stat.S_IMODE(rec_dir.stat().st_mode) == 0o700
            assert TOKEN.encode() not in path.read_bytes()
            rec = read_recording(path)
            assert rec.header["profile"] == "recorded" and rec.complete
            recorded = summarize(timeline(rec))
            assert (recorded["caller_turns"], recorded["barge_ins"], recorded["play_streams"],
                    recorded["truncates"]) == (2, 1, 3, 1), recorded
            assert recorded["play_streams"] == len(res.streams)

            # 1. the tool's own bridge and fake model
            code, own, err = await replay(str(path))
            assert own["mode"].startswith("own bridge"), own
            assert own["differences"] == [], (own["differences"], err[-1000:])
            assert code == 0
            for k in ("caller_turns", "barge_ins", "play_streams", "truncates", "responses"):
                assert own["replayed"][k] == recorded[k], (k, own["replayed"], recorded)
            keys = [e["key"] for e in own["replayed_timeline"]]
            assert keys.count("barge-in") == 1 and keys[-1] == "recording.end"

            # 2. the running daemon (and its fake): compared on what the caller sees
            code, live, err = await replay(str(path), "--bridge", d.url, "--token", TOKEN)
            assert live["compared"] == list(VAIC_COUNTS)
            assert live["differences"] == [], (live["differences"], err[-1000:])
            for k in VAIC_COUNTS:
                assert live["replayed"][k] == recorded[k], (k, live["replayed"], recorded)


async def test_a_dropped_and_resumed_vaic_socket_is_replayed(tmp_path: Path) -> None:
    """The recording notes the VAIC socket's loss and its session.resume; the replay drops and
    resumes at the same points, and the call goes on as recorded."""
    from tests.conftest import API_KEY, SECRETS, bridge_config
    from tests.conftest import TOKEN as BRIDGE_TOKEN
    from voicebridge.replay import replay_own
    from voicebridge.server import Bridge
    from voicebridge.sim.caller import DropAndResume
    from voicebridge.sim.fake_openai import FakeOpenAIConfig, FakeRealtimeServer

    fake = FakeRealtimeServer(FakeOpenAIConfig(api_key=API_KEY, think_ms=50, delta_interval_ms=10,
                                               reply_ms=[600], greeting_ms=600))
    await fake.start()
    cfg = bridge_config(fake, recording={"dir": str(tmp_path), "record_all": True},
                        call={"resume_grace_s": 5.0})
    bridge = Bridge(cfg, SECRETS)
    await bridge.start()
    try:
        res = await run_call(CallerConfig(
            url=f"ws://127.0.0.1:{bridge.port}{cfg.server.path}", token=BRIDGE_TOKEN,
            script=[Speak(600), WaitForBot(4000), DropAndResume(after_ms=200, gap_ms=300),
                    Speak(600), WaitForBot(4000), Silence(200)]))
    finally:
        await bridge.stop()
        await fake.stop()
    assert res.end_reason == "caller-hangup" and [r.outcome for r in res.resumes] == ["accepted"], res
    [path] = sorted(tmp_path.glob("*.vbrec"))
    rec = read_recording(path)
    keys = [e.key for e in timeline(rec)]
    assert keys.count("vaic.closed") == 1 and keys.count("vaic.resumed") == 1
    out = await replay_own(rec)
    got = [e.key for e in out.replayed]
    assert got.count("vaic.closed") == 1 and got.count("vaic.resumed") == 1, got
    assert out.diffs == [], (out.diffs, out.notes)
    assert out.replayed_counts["play_streams"] == out.recorded_counts["play_streams"] == 2
