"""End to end over real sockets on 127.0.0.1: simulated VAIC caller -> bridge -> fake OpenAI."""

from __future__ import annotations

import socket

import pytest

from voicebridge.sim.caller import BargeIn, CallerConfig, Silence, Speak, WaitForBot, run_call
pytestmark = pytest.mark.usefixtures("both_transports")

from tests.conftest import TOKEN, assert_events_valid, fast_fake, running, vaic_url, wait_for  # noqa: E402

ALL_FORMATS = ["raw/lpcm16_24", "raw/mulaw", "raw/lpcm16", "raw/lpcm16_8",
               "wav/lpcm16_24", "wav/mulaw", "wav/lpcm16", "wav/lpcm16_8"]
OPENAI_FORMAT = {"lpcm16_24": "audio/pcm", "mulaw": "audio/pcmu", "lpcm16": "audio/pcm",
                 "lpcm16_8": "audio/pcm"}


@pytest.mark.parametrize("fmt", ALL_FORMATS)
async def test_full_call_per_format(fmt, logs):
    async with running() as (fake, bridge):
        res = await run_call(CallerConfig(url=vaic_url(bridge), token=TOKEN, formats=[fmt],
                                          script=[Speak(600), WaitForBot(5000), Silence(100)]))
        assert await fake.wait_closed_all(2.0)
    assert res.accepted_format == fmt
    assert res.violations == []
    assert res.end_reason == "caller-hangup"
    [stream] = res.streams
    assert stream.media_format == fmt
    # the whole 600 ms reply reached the caller and was played (resampling may shift a few ms)
    assert abs(stream.received_ms - 600) <= 5, stream
    assert abs(stream.heard_ms - stream.received_ms) < 1e-6
    assert stream.underruns == 0
    [session] = fake.sessions
    codec = fmt.split("/")[1]
    assert session.session["audio"]["input"]["format"]["type"] == OPENAI_FORMAT[codec]
    assert len(session.received_of("input_audio_buffer.append")) > 0
    assert assert_events_valid(fake) > 0
    [end] = logs.events("call.end")
    assert end["reason"] == "vaic_session_end" and end["format"] == fmt
    assert end["frames_up"] == res.chunks_sent and end["frames_down"] == res.chunks_received


async def test_passthrough_payload_is_byte_exact():
    """raw/lpcm16_24 and raw/mulaw: what the caller hears is exactly what the model sent."""
    from voicebridge.sim.fake_openai import make_tone
    async with running() as (fake, bridge):
        res = await run_call(CallerConfig(url=vaic_url(bridge), token=TOKEN, formats=["raw/mulaw"],
                                          script=[Speak(500), WaitForBot(5000)]))
    [stream] = res.streams
    assert len(stream.heard_bytes) == 600 * 8
    assert stream.heard_bytes[:800] == make_tone(100, "audio/pcmu")


async def test_greeting_agent_speaks_first():
    async with running(openai={"greeting": "Greet the caller warmly."},
                       call={"start_wait_ms": 300}) as (fake, bridge):
        res = await run_call(CallerConfig(url=vaic_url(bridge), token=TOKEN,
                                          script=[WaitForBot(5000), Silence(100)]))
    assert res.violations == []
    assert len(res.streams) == 1 and abs(res.streams[0].heard_ms - 600) <= 1
    [session] = fake.sessions
    [create] = session.received_of("response.create")
    assert create["response"]["instructions"] == "Greet the caller warmly."
    assert_events_valid(fake)


@pytest.mark.parametrize("policy, delta_interval_ms", [("flush", 10), ("drain", 10), ("flush", 90)])
async def test_barge_in_truncates_to_what_was_heard(policy, delta_interval_ms, logs):
    """Fast generation: the response is complete but still playing when the caller barges in.
    Near-real-time generation (90 ms per 100 ms delta): the response is still active, so it is
    cancelled and its late deltas must be dropped."""
    fake_cfg = fast_fake(reply_ms=[3000], delta_interval_ms=delta_interval_ms)
    async with running(fake_cfg, audio={"vaic_stop_policy": policy, "playout_lead_ms": 200}) as (fake, bridge):
        res = await run_call(CallerConfig(
            url=vaic_url(bridge), token=TOKEN, stop_policy=policy,
            script=[Speak(600), BargeIn(after_heard_ms=800, ms=600), WaitForBot(5000), Silence(100)]))
    assert res.violations == []
    first = res.streams[0]
    assert first.stop_t is not None
    [session] = fake.sessions
    [trunc] = session.truncations
    # the truncate position matches what the simulated caller really played, within one frame
    assert abs(trunc["audio_end_ms"] - first.heard_ms) <= 20, (trunc, first)
    assert 800 <= first.heard_ms < 3000
    assert session.errors_sent == []          # the truncate was accepted
    if policy == "flush":
        assert first.received_ms - first.heard_ms <= 220 + 100  # never more than lead + a chunk queued
    # the caller got a fresh, complete answer afterwards
    assert len(res.streams) == 2 and abs(res.streams[1].heard_ms - 3000) <= 1
    assert res.speech_started_from_bot, "userStream.speech.started was not sent"
    [b] = logs.events("call.barge_in")
    assert b["truncate_ms"] == trunc["audio_end_ms"]
    [end] = logs.events("call.end")
    if delta_interval_ms == 90:
        assert session.responses[0].status == "cancelled"
        assert end["late_deltas_dropped"] >= 1      # the in-flight delta after the cancel
    else:
        assert session.responses[0].status == "completed"
    # (a chunk of the first answer after its playStream.stop would be a recorded violation)
    assert_events_valid(fake)


async def test_no_truncate_when_playout_already_finished():
    async with running() as (fake, bridge):
        res = await run_call(CallerConfig(url=vaic_url(bridge), token=TOKEN,
                                          script=[Speak(600), WaitForBot(5000), Silence(300),
                                                  Speak(600), WaitForBot(5000)]))
    assert res.violations == [] and len(res.streams) == 2
    [session] = fake.sessions
    assert session.truncations == [] and session.received_of("conversation.item.truncate") == []


async def test_tcp_nodelay_on_both_sockets():
    async with running(fast_fake(reply_ms=[2000])) as (fake, bridge):
        import asyncio
        task = asyncio.create_task(run_call(CallerConfig(
            url=vaic_url(bridge), token=TOKEN, script=[Speak(600), WaitForBot(5000)])))
        assert await wait_for(lambda: any(c.up is not None for c in bridge.calls), 5.0)
        [call] = bridge.calls
        for end in (call.ac, call.up):
            sock = end.extra_info("socket")
            assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
        await task
