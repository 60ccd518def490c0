"""End to end, things going wrong: auth, bad VAIC input, OpenAI refusing/closing/erroring,
VAIC vanishing. Real sockets on 127.0.0.1; the OpenAI socket must never outlive the call."""

from __future__ import annotations

import asyncio
import json
import time
import urllib.request

import pytest
import uvloop
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from voicebridge.sim.caller import (CallerConfig, Silence, Speak, WaitForBot, run_call,
                                    validate_connection)
pytestmark = pytest.mark.usefixtures("both_transports")

from tests.conftest import TOKEN, assert_events_valid, fast_fake, running, vaic_url, wait_for  # noqa: E402

INIT = {"type": "session.initiate", "conversationId": "conv-1", "botName": "b", "caller": "+1",
        "expectAudioMessages": True, "supportedMediaFormats": ["raw/mulaw"]}


async def test_runs_on_uvloop():
    assert isinstance(asyncio.get_running_loop(), uvloop.Loop)


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": TOKEN}])
async def test_auth_401_before_upgrade(headers, logs):
    async with running() as (fake, bridge):
        with pytest.raises(InvalidStatus) as e:
            async with connect(vaic_url(bridge), additional_headers=headers):
                pass
        assert e.value.response.status_code == 401
        assert fake.sessions == []              # no OpenAI session was opened
    assert logs.events("auth.rejected")
    assert TOKEN not in json.dumps(logs.events())


async def test_health_and_404():
    async with running() as (fake, bridge):
        def get(path: str) -> tuple[int, dict]:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{bridge.port}{path}", timeout=3) as r:
                    return r.status, json.loads(r.read())
            except urllib.error.HTTPError as err:
                return err.code, json.loads(err.read())
        status, body = await asyncio.to_thread(get, "/health")
        assert status == 200 and body["status"] == "ok" and body["active_calls"] == 0
        assert body["version"]
        status, _ = await asyncio.to_thread(get, "/elsewhere")
        assert status == 404


async def test_connection_validate():
    async with running() as (fake, bridge):
        reply = await validate_connection(vaic_url(bridge), TOKEN)
    assert reply == {"type": "connection.validated", "success": True}
    assert fake.sessions == []


async def _raw(bridge, frames: list[str | bytes], expect: int) -> list[dict]:
    """Send frames on a raw VAIC socket; collect `expect` replies (bounded wait)."""
    got: list[dict] = []
    async with connect(vaic_url(bridge), additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
        for f in frames:
            await ws.send(f)
        try:
            while len(got) < expect:
                got.append(json.loads(await asyncio.wait_for(ws.recv(), 3.0)))
        except Exception:
            pass
    return got


@pytest.mark.parametrize("first", ["{not json", '{"type":"userStream.chunk","audioChunk":"AA=="}',
                                   b"\x00\x01", '{"type":"session.resume","conversationId":"x"}',
                                   '{"type":"session.initiate","supportedMediaFormats":"raw/mulaw"}'])
async def test_bad_first_message_gets_session_error(first, logs):
    async with running() as (fake, bridge):
        [reply] = await _raw(bridge, [first], 1)
        assert reply["type"] == "session.error" and reply["reason"]
        assert await wait_for(lambda: not bridge.calls, 3.0)
        assert fake.sessions == []
    assert logs.events("call.end")[0]["reason"] == "rejected"


async def test_no_common_format_and_no_audio_output(logs):
    async with running() as (fake, bridge):
        [r1] = await _raw(bridge, [json.dumps({**INIT, "supportedMediaFormats": ["raw/opus", "raw/alaw"]})], 1)
        [r2] = await _raw(bridge, [json.dumps({**INIT, "expectAudioMessages": False})], 1)
        assert await wait_for(lambda: not bridge.calls, 3.0)
        assert fake.sessions == []
    assert r1["type"] == "session.error" and "raw/opus" in r1["reason"]
    assert r2["type"] == "session.error" and "expectAudioMessages" in r2["reason"]
    assert [e["reason"] for e in logs.events("call.end")] == ["declined", "declined"]


async def test_malformed_and_out_of_order_mid_call_are_ignored(logs):
    """Garbage during a call is logged and ignored; the call carries on and ends normally."""
    async with running() as (fake, bridge):
        frames = [json.dumps(INIT), '{"type":"userStream.start","conversationId":"conv-1"}',
                  "garbage{", b"\xff\xfe", '{"type":"weird.new","conversationId":"conv-1"}',
                  '{"type":"weird.new"}', json.dumps(INIT),
                  '{"type":"userStream.start","conversationId":"conv-1"}',
                  '{"type":"userStream.chunk","audioChunk":12}',
                  '{"type":"connection.validate"}',
                  '{"type":"userStream.chunk","conversationId":"conv-1","audioChunk":"//////8="}',
                  '{"type":"userStream.stop","conversationId":"conv-1"}',
                  '{"type":"session.end","conversationId":"conv-1","reasonCode":"client-disconnected"}']
        replies = await _raw(bridge, frames, 4)
        assert await fake.wait_closed_all(2.0)
    assert [r["type"] for r in replies] == ["session.accepted", "userStream.started",
                                            "connection.validated", "userStream.stopped"]
    assert len(logs.events("call.unknown_message")) == 1          # once per type and call
    assert len(logs.events("call.malformed_frame")) == 3
    assert len(logs.events("call.message_ignored")) == 2           # 2nd initiate, 2nd start
    [end] = logs.events("call.end")
    assert end["reason"] == "vaic_session_end" and end["bad_frames_in"] == 3
    assert end["frames_up"] == 1
    assert all(e["level"] != "error" for e in logs.events())      # no tracebacks


@pytest.mark.parametrize("status", [503, 401])
async def test_openai_refuses_caller_is_hung_up(status, logs):
    async with running(fast_fake(refuse=status)) as (fake, bridge):
        res = await run_call(CallerConfig(url=vaic_url(bridge), token=TOKEN,
                                          script=[Speak(400), Silence(3000)]))
    assert res.end_reason == "bot-hangup"
    [act] = [a for a in res.received_activities if a.get("name") == "hangup"]
    assert act["activityParams"]["hangupReason"] == "model-unreachable"   # a short token for SIP
    [end] = logs.events("call.end")
    assert end["reason"] == "openai_connect_failed" and str(status) in end["detail"]


async def test_openai_closes_mid_response(logs):
    """With reconnecting off (see test_e2e_recovery.py for the default), a lost OpenAI socket
    hangs up with a reason after closing the open play stream."""
    async with running(fast_fake(close_after_deltas=3, reply_ms=[2000]),
                       openai={"reconnect": False}) as (fake, bridge):
        res = await run_call(CallerConfig(url=vaic_url(bridge), token=TOKEN,
                                          script=[Speak(600), WaitForBot(5000), Silence(3000)]))
    assert res.end_reason == "bot-hangup" and res.violations == []
    assert res.streams and res.streams[0].stop_t is not None        # play stream closed first
    [end] = logs.events("call.end")
    assert end["reason"] == "openai_closed" and "1006" in end["detail"]


async def test_openai_session_expired_is_fatal(logs):
    """With reconnecting off, session_expired ends the call (by default it rotates instead)."""
    async with running(fast_fake(session_limit_s=0.8), openai={"reconnect": False}) as (fake, bridge):
        res = await run_call(CallerConfig(url=vaic_url(bridge), token=TOKEN, script=[Silence(4000)]))
        assert await fake.wait_closed_all(2.0)
    assert res.end_reason == "bot-hangup"
    [end] = logs.events("call.end")
    assert end["reason"] == "openai_error" and "session_expired" in end["detail"]


async def test_benign_openai_errors_do_not_end_the_call(logs):
    codes = ["conversation_already_has_active_response", "response_cancel_not_active",
             "input_audio_buffer_commit_empty"]
    async with running(fast_fake(inject_errors=codes)) as (fake, bridge):
        res = await run_call(CallerConfig(url=vaic_url(bridge), token=TOKEN,
                                          script=[Speak(600), WaitForBot(5000), Silence(100)]))
    assert res.end_reason == "caller-hangup" and len(res.streams) == 1
    assert sorted(e["code"] for e in logs.events("call.openai_error_benign")) == sorted(codes)
    [end] = logs.events("call.end")
    assert end["reason"] == "vaic_session_end" and end["openai_errors"] == 3
    assert_events_valid(fake)


@pytest.mark.parametrize("how", ["drop", "session.end"])
async def test_vaic_gone_closes_openai_within_a_second(how, logs):
    async with running(fast_fake(reply_ms=[3000])) as (fake, bridge):
        await run_call(CallerConfig(
            url=vaic_url(bridge), token=TOKEN, hangup="drop" if how == "drop" else "caller",
            script=[Speak(600), WaitForBot(400)]))            # hang up while the bot talks
        t_end = time.monotonic()
        assert await fake.wait_closed_all(2.0)
        [session] = fake.sessions
        assert session.closed_at is not None and session.closed_at - t_end < 1.0
        assert await wait_for(lambda: not bridge.calls, 2.0)
    [end] = logs.events("call.end")
    assert end["reason"] == ("vaic_closed" if how == "drop" else "vaic_session_end")


async def test_openai_slow_connect_buffers_early_audio(logs, monkeypatch):
    """Caller audio that arrives before the model session is ready is buffered, not lost."""
    import voicebridge.call as call_mod
    real = call_mod.dial

    async def slow_dial(*a, **kw):
        await asyncio.sleep(0.3)
        return await real(*a, **kw)

    async with running() as (fake, bridge):
        bridge.dialer = slow_dial
        res = await run_call(CallerConfig(url=vaic_url(bridge), token=TOKEN,
                                          script=[Speak(600), WaitForBot(5000), Silence(100)]))
        [session] = fake.sessions
        appended = len(session.received_of("input_audio_buffer.append"))
    [end] = logs.events("call.end")
    assert end["early_buffered"] >= 10 and end["early_dropped"] == 0
    assert appended == res.chunks_sent == end["frames_up"]      # nothing lost
    assert len(res.streams) == 1
