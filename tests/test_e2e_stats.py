"""After real calls, the bridge's own histograms and counters say what happened."""

from __future__ import annotations

import asyncio
import json
import urllib.request

from prometheus_client.parser import text_string_to_metric_families

from voicebridge.sim.caller import BargeIn, CallerConfig, Silence, Speak, WaitForBot, run_call
from tests.conftest import TOKEN, fast_fake, running, vaic_url


def fetch(port: int, path: str) -> bytes:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=3) as r:
        return r.read()


async def test_stats_after_a_call_with_barge_in():
    async with running(fast_fake(reply_ms=[3000])) as (fake, bridge):
        res = await run_call(CallerConfig(url=vaic_url(bridge), token=TOKEN, script=[
            Speak(600), BargeIn(after_heard_ms=600, ms=600), WaitForBot(5000), Silence(100)]))
        health = json.loads(await asyncio.to_thread(fetch, bridge.admin_port, "/health"))
        metrics = (await asyncio.to_thread(fetch, bridge.admin_port, "/metrics")).decode()
        st = bridge.stats
        early = bridge.finished[-1].counters.early_buffered
    lat = health["latency_us"]
    assert st.frames_up == res.chunks_sent
    assert lat["up_forward"]["count"] == res.chunks_sent - early   # early frames waited for the connect
    assert lat["down_forward"]["count"] + lat["pacer_late"]["count"] >= 1
    assert st.frames_down == res.chunks_received
    assert lat["barge_in"]["count"] == 1 and st.barge_ins == 1 and st.truncates == 1
    assert lat["model_ttfa"]["count"] == 2 and lat["turn_overhead"]["count"] == 2
    assert lat["openai_connect"]["count"] == 1 and lat["call_setup"]["count"] == 1
    assert health["calls_total"] == 1 and st.call_ends == {"vaic_session_end": 1}
    assert 0 < lat["up_forward"]["p50"] <= lat["up_forward"]["p99"] <= lat["up_forward"]["max"]
    fams = {f.name: f for f in text_string_to_metric_families(metrics)}
    frames_up = [s.value for s in fams["voicebridge_frames_up"].samples if s.name.endswith("_total")]
    assert frames_up == [res.chunks_sent]
    inf = [s.value for s in fams["voicebridge_barge_in_seconds"].samples
           if s.name.endswith("_bucket") and s.labels["le"] == "+Inf"]
    assert inf == [1.0]
