"""`make demo`: the bridge between the fake OpenAI Realtime server and a simulated VAIC caller.

Everything runs in this process on 127.0.0.1 (no credentials, no network): the fake model
answers with tones of scripted length, the caller speaks (tones), listens in real time, and
barges in once; the agent then says goodbye and ends the call with its `end_call` tool, which
the bridge carries out only once the goodbye has been played. Prints the caller's timeline, turn latencies, the barge-in truncation and the
bridge's own call log lines.
"""

from __future__ import annotations

import argparse
import io
import json
import sys

import uvloop

from .config import load_config
from .log import setup
from .server import Bridge
from .sim.caller import (BargeIn, CallerConfig, Silence, Speak, WaitForActivity, WaitForBot, format_timeline,
                         run_call)
from .sim.fake_openai import FakeOpenAIConfig, FakeRealtimeServer

DEMO_KEY = "demo-openai-key"      # shared only between the in-process fake and the bridge
DEMO_TOKEN = "demo-vaic-token"
THINK_MS = 250


async def demo(fmt: str, stop_policy: str) -> int:
    logbuf = io.StringIO()
    setup("info", stream=logbuf)
    fake = FakeRealtimeServer(FakeOpenAIConfig(
        api_key=DEMO_KEY, think_ms=THINK_MS, delta_audio_ms=100, delta_interval_ms=25,
        reply_ms=[1800, 3000, 1200], greeting_ms=1500,
        replies=["Sure, our opening hours are nine to five on weekdays.",
                 "Let me explain our three different plans in detail, starting with the basic one",
                 'The premium plan, then. Thanks for calling, goodbye! @@end_call {"reason": "question answered"}']))
    await fake.start()
    cfg, secrets = load_config(None, env={"VOICEBRIDGE_TOKEN": DEMO_TOKEN, "OPENAI_API_KEY": DEMO_KEY}, overrides={
        "server": {"host": "127.0.0.1", "port": 0, "admin_port": -1},
        "openai": {"url": f"ws://127.0.0.1:{fake.port}/v1/realtime",
                   "greeting": "Greet the caller and offer help.",
                   "instructions": "You are the phone assistant of ACME. The caller dialled {callee}."},
        "audio": {"vaic_stop_policy": stop_policy},
        "profiles": {"default": {"tools": ["end_call"]}},
    })
    bridge = Bridge(cfg, secrets)
    await bridge.start()
    print(f"voicebridge demo: bridge on ws://127.0.0.1:{bridge.port}{cfg.server.path}, "
          f"fake OpenAI Realtime on 127.0.0.1:{fake.port} (think time {THINK_MS} ms)\n")
    try:
        result = await run_call(CallerConfig(
            url=f"ws://127.0.0.1:{bridge.port}{cfg.server.path}", token=DEMO_TOKEN,
            formats=[fmt], stop_policy=stop_policy,  # type: ignore[arg-type]
            script=[WaitForBot(6000), Speak(1200), WaitForBot(8000), Silence(300),
                    Speak(1000), BargeIn(after_heard_ms=1200, ms=900),
                    WaitForActivity("hangup", 10000), Silence(300)]))
        await fake.wait_closed_all(2.0)
    finally:
        await bridge.stop()
        await fake.stop()

    print(format_timeline(result))
    session = fake.sessions[0] if fake.sessions else None
    print("\nbarge-in:")
    if session and session.truncations:
        for t in session.truncations:
            print(f"  conversation.item.truncate item={t.get('item_id')} "
                  f"audio_end_ms={t.get('audio_end_ms')} (accepted by the model server)")
        interrupted = [s for s in result.streams if s.flushed_ms > 0 or s.heard_ms < s.received_ms]
        for s in interrupted:
            print(f"  caller heard {s.heard_ms:.0f} ms of stream {s.stream_id} "
                  f"({s.received_ms:.0f} ms delivered, lead kept the rest at the bridge)")
    else:
        print("  (no truncation)")
    print("\nend_call:")
    hangups = result.activities_named("hangup")
    for a in hangups:
        print(f"  the model called end_call; the hangup activity reached VAIC at {a.t_ms:.0f} ms with "
              f"{a.unplayed_ms:.0f} ms of the goodbye still unplayed and {a.cut_ms:.0f} ms cut "
              f"(reason {a.activity.get('activityParams', {}).get('hangupReason')})")
    if not hangups:
        print("  (no hang-up)")
    print("\nturn latency (caller's speech end -> first bot audio at the caller):")
    for i, t in enumerate(result.turns, 1):
        if t.latency_ms is not None:
            vad = cfg.openai.vad.silence_duration_ms
            print(f"  turn {i}: {t.latency_ms:.0f} ms = VAD silence {vad} ms + model think "
                  f"{THINK_MS} ms + bridge/transport {t.latency_ms - vad - THINK_MS:.0f} ms")
    print("\nbridge log (one line per call event):")
    for line in logbuf.getvalue().splitlines():
        ev = json.loads(line)
        if ev.get("event", "").startswith(("call.start", "call.upstream_ready", "call.barge_in",
                                           "call.tool_call", "call.hangup", "call.end",
                                           "call.upstream_failed")):
            ev.pop("timestamp", None)
            print("  " + json.dumps(ev))
    ok = (result.end_reason == "bot-hangup" and not result.violations
          and bool(session and session.truncations)
          and len(hangups) == 1 and hangups[0].unplayed_ms == 0 and result.cut_ms == 0)
    print(f"\nsummary: format {result.accepted_format}, {len(result.streams)} bot prompts, "
          f"{result.chunks_sent} caller frames sent, {result.chunks_received} bot chunks received, "
          f"violations {len(result.violations)}, ended: {result.end_reason} -> "
          f"{'OK' if ok else 'PROBLEM'}")
    return 0 if ok else 1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m voicebridge.demo", description=__doc__)
    ap.add_argument("--format", default="raw/lpcm16_24",
                    help="media format the simulated VAIC offers (default: %(default)s)")
    ap.add_argument("--stop-policy", default="flush", choices=["flush", "drain"],
                    help="what the simulated VAIC does with buffered audio on playStream.stop")
    args = ap.parse_args(argv)
    return uvloop.run(demo(args.format, args.stop_policy))


if __name__ == "__main__":
    sys.exit(main())
