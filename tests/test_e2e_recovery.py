"""End to end, issue 10: the call survives OpenAI faults (connect retries, a lost socket,
rotation, failed responses) and VAIC's session.resume. Real sockets on 127.0.0.1, the in-process
bridge on both transports, the fake's fault knobs and the simulated caller's DropAndResume.

Measured figures (turn latencies, the extra latency a reconnect or rotation adds to the caller's
next turn, the silence heard, resume times) are printed, and appended as JSON lines to
$VB_FAULT_FIGURES when set. Times: the caller's ms since its call start; the fake's records are
put on that clock with `res.started_at`.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import time
from typing import Any

import pytest
from websockets.asyncio.client import connect

from voicebridge.sim.caller import (CallerConfig, CallResult, DropAndResume, Silence, Speak,
                                    WaitForBot, run_call)
pytestmark = pytest.mark.usefixtures("both_transports")

from tests.conftest import TOKEN, fast_fake, running, vaic_url, wait_for  # noqa: E402

REPLY = "Hello, how can I help you?"            # the fake's first scripted reply


def figure(test: str, **numbers: Any) -> None:
    """Print one measured figure; append it as a JSON line to $VB_FAULT_FIGURES if set."""
    line = json.dumps({"test": test, **numbers})
    print(f"\nFIGURE {line}")
    path = os.environ.get("VB_FAULT_FIGURES")
    if path:
        with open(path, "a") as f:
            f.write(line + "\n")


def caller(bridge, script, **kw: Any) -> CallerConfig:
    return CallerConfig(url=vaic_url(bridge), token=TOKEN, script=script, **kw)


def ms(res: CallResult, t_monotonic: float | None) -> float | None:
    """A monotonic time (the fake's records) on the caller's clock."""
    return None if t_monotonic is None else (t_monotonic - res.started_at) * 1000


def hangup(res: CallResult) -> tuple[str, float]:
    """(hangupReason, caller ms) of the bot's hang-up activity."""
    [act] = [a for a in res.received_activities if a.get("name") == "hangup"]
    [t] = [e.t_ms for e in res.events if e.type == "activities" and e.detail == "event:hangup"]
    return act["activityParams"]["hangupReason"], t


def latencies(res: CallResult) -> list[float | None]:
    return [None if t.latency_ms is None else round(t.latency_ms, 1) for t in res.turns]


def appends(fake) -> int:
    return sum(len(s.received_of("input_audio_buffer.append")) for s in fake.sessions)


def reseeded(session) -> list[tuple[str, str]]:
    """(role, text) of each conversation.item.create the session received."""
    out = []
    for ev in session.received_of("conversation.item.create"):
        item = ev["item"]
        assert item["type"] == "message" and len(item["content"]) == 1, item
        part = item["content"][0]
        assert part["type"] == {"user": "input_text", "assistant": "output_text"}[item["role"]]
        out.append((item["role"], part["text"]))
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


TWO_TURNS = [Speak(600), WaitForBot(5000), Silence(300), Speak(600), WaitForBot(5000), Silence(100)]

# ------------------------------------------------------------------------------ connect retries


async def test_connect_503_twice_then_accepted(logs):
    async with running(fast_fake(refuse=503, refuse_first=2),
                       openai={"connect_budget_s": 5.0}) as (fake, bridge):
        res = await run_call(caller(bridge, [Speak(600), WaitForBot(5000), Silence(100)]))
        n_appends = appends(fake)
    assert res.end_reason == "caller-hangup" and res.violations == []
    assert len(res.streams) == 1 and res.streams[0].heard_ms == 600
    assert fake.rejected_handshakes == [(503, "refused")] * 2 and len(fake.sessions) == 1
    retries = logs.events("call.openai_retry")
    assert [(r["attempt"], r["status"]) for r in retries] == [(1, 503), (2, 503)]
    waits = [b - a for a, b in zip(fake.handshake_times, fake.handshake_times[1:])]
    assert waits[0] >= 0.24 and waits[1] >= 0.49           # back-off 0.25 s, 0.5 s
    assert n_appends == res.chunks_sent                    # the caller's early audio was kept
    [end] = logs.events("call.end")
    assert end["reason"] == "vaic_session_end" and end["early_dropped"] == 0
    figure("connect_503_twice", waits_s=[round(w, 3) for w in waits], turn_latency_ms=latencies(res))


async def test_connect_429_honours_retry_after(logs):
    async with running(fast_fake(refuse=429, refuse_first=1, retry_after_s=1),
                       openai={"connect_budget_s": 4.0}) as (fake, bridge):
        res = await run_call(caller(bridge, [Speak(600), WaitForBot(5000), Silence(100)]))
    assert res.end_reason == "caller-hangup" and len(res.streams) == 1
    [retry] = logs.events("call.openai_retry")
    assert retry["status"] == 429 and retry["wait_ms"] == 1000
    wait = fake.handshake_times[1] - fake.handshake_times[0]
    assert 1.0 <= wait < 1.5
    figure("connect_429_retry_after_1s", wait_s=round(wait, 3), turn_latency_ms=latencies(res))


@pytest.mark.parametrize("status", [401, 403, 404])
async def test_connect_4xx_is_not_retried(status, logs):
    async with running(fast_fake(refuse=status), openai={"connect_budget_s": 5.0}) as (fake, bridge):
        res = await run_call(caller(bridge, [Speak(400), Silence(3000)]))
    assert res.end_reason == "bot-hangup"
    reason, t = hangup(res)
    assert reason == "model-unreachable"
    assert len(fake.handshake_times) == 1 and logs.events("call.openai_retry") == []
    assert t < 1000                                         # at once, not after a budget
    [end] = logs.events("call.end")
    assert end["reason"] == "openai_connect_failed" and str(status) in end["detail"]


@pytest.mark.parametrize("how", ["503", "refused", "429_beyond_budget"])
async def test_connect_gives_up_within_the_budget(how, logs):
    """Always failing: the caller is hung up (openai_connect_failed) once the budget (2 s) is
    spent, not left in silence; a Retry-After beyond the budget gives up at once."""
    fake_cfg = fast_fake(refuse=429, retry_after_s=30) if how == "429_beyond_budget" else (
        fast_fake(refuse=503) if how == "503" else None)
    openai: dict[str, Any] = {"connect_budget_s": 2.0, "connect_timeout_s": 1.0}
    if how == "refused":
        openai["url"] = f"ws://127.0.0.1:{free_port()}/v1/realtime"    # nothing listens there
    async with running(fake_cfg, openai=openai) as (fake, bridge):
        t0 = time.monotonic()
        res = await run_call(caller(bridge, [Speak(400), Silence(4000)]))
        assert time.monotonic() - t0 < 4.0
    assert res.end_reason == "bot-hangup"
    reason, t = hangup(res)
    assert reason == "model-unreachable", reason
    [end] = logs.events("call.end")
    assert end["reason"] == "openai_connect_failed"
    if how != "429_beyond_budget":
        assert "attempts)" in end["detail"]                   # the detail says how many
    retries = logs.events("call.openai_retry")
    if how == "429_beyond_budget":
        assert retries == [] and len(fake.handshake_times) == 1 and t < 1000
    else:
        assert len(retries) >= 2 and t < 2000 + 700             # the budget, plus the hang-up
        if how == "503":
            assert len(fake.handshake_times) == len(retries) + 1
    assert fake.sessions == []
    figure(f"connect_unreachable_{how}", hangup_ms=round(t, 1), attempts=len(retries) + 1)


# ------------------------------------------------------------------------------ mid-call loss

LOSSES = [  # (fault, when, transcription)
    ("1006", "speech", False), ("1006", "speech", True), ("1006", "playback", False),
    ("1011", "speech", False), ("1001", "speech", False), ("session_expired", "speech", False),
    ("1011", "on_frame", False)]


@pytest.mark.parametrize("fault, when, transcription", LOSSES)
async def test_openai_lost_mid_call_reconnects(fault, when, transcription, logs):
    """The OpenAI socket is lost during the caller's second utterance ("speech", 2.31 s after
    the session opened) or while the first answer is still playing ("playback", 1.36 s; all of
    it already received). A second session gets session.update and the turns so far, the call
    goes on, and no frame of caller audio is lost.

    (The loss times sit mid-way between the caller's 20 ms frames, whose grid starts about when
    the session opens; "on_frame" (2.30 s, 1011) makes the close arrive as a caller frame is
    being forwarded. On an abort (1006) a frame the bridge wrote just before the reset reached
    it is lost in TCP, which no bridge can know: at most one such frame is allowed there, and
    counted in the figure. With a close frame there is no such excuse: every frame must arrive.)"""
    at = {"speech": 2.31, "playback": 1.36, "on_frame": 2.30}[when]
    knobs: dict[str, Any] = ({"session_limit_s": at} if fault == "session_expired" else
                             {"drop_after_s": at, "drop_code": None if fault == "1006" else int(fault)})
    openai = {"connect_budget_s": 3.0, "transcription_model": "gpt-4o-transcribe" if transcription else ""}
    async with running(fast_fake(**knobs), openai=openai) as (fake, bridge):
        task = asyncio.create_task(run_call(caller(bridge, TWO_TURNS)))
        assert await fake.wait_sessions(1, 5.0)
        fake.config.drop_after_s = fake.config.session_limit_s = None     # one loss only
        res = await task
        n_appends = appends(fake)
    assert res.end_reason == "caller-hangup" and res.violations == []
    assert len(fake.sessions) == 2, [s.close_code for s in fake.sessions]
    s1, s2 = fake.sessions
    assert s1.close_code == (1006 if fault == "1006" else 1001 if fault == "session_expired" else int(fault))
    # the new session: session.update, then the turns so far as text, then audio
    types = [e["type"] for _, e in s2.received]
    assert types[0] == "session.update"
    expected = ([("user", "caller turn 1")] if transcription else []) + [("assistant", REPLY)]
    assert reseeded(s2) == expected
    last_item = max(i for i, t in enumerate(types) if t == "conversation.item.create")
    assert last_item < types.index("input_audio_buffer.append")
    assert s2.session["instructions"] == s1.session["instructions"]
    # the caller's next turn is answered, by the new session; nothing of its audio was lost
    assert len(res.streams) == 2 and all(s.heard_ms == 600 for s in res.streams)
    assert [r.status for r in s2.responses] == ["completed"]
    in_flight = res.chunks_sent - n_appends
    assert 0 <= in_flight <= (1 if fault == "1006" else 0), (n_appends, res.chunks_sent)
    [lost] = logs.events("call.openai_lost")
    [rec] = logs.events("call.openai_reconnected")
    assert rec["reseeded_items"] == len(expected)
    [end] = logs.events("call.end")
    assert end["reason"] == "vaic_session_end" and end["frames_up"] == res.chunks_sent
    lat = latencies(res)
    assert None not in lat
    spans = res.audible()
    silence = round(spans[1][0] - spans[0][1], 1) if len(spans) == 2 else None
    figure(f"openai_lost_{fault}_{when}" + ("_transcribed" if transcription else ""),
           loss_ms=round(ms(res, s1.dropped_at or s1.closed_at), 1),
           reconnect_gap_ms=rec["gap_ms"], turn_latency_ms=lat,
           extra_latency_ms=round(lat[1] - lat[0], 1), silence_between_answers_ms=silence,
           early_frames=rec.get("early_frames"), frames_lost_in_flight=in_flight)


# ------------------------------------------------------------------------------ rotation


async def test_rotation_at_a_pause_is_not_heard(logs):
    """rotate_after_s = 2: the session is replaced in the pause after the first answer; the
    second turn is answered by the new session as fast as the first."""
    script = [Speak(600), WaitForBot(5000), Silence(800), Speak(600), WaitForBot(5000), Silence(100)]
    async with running(fast_fake(), openai={"rotate_after_s": 2.0}) as (fake, bridge):
        res = await run_call(caller(bridge, script))
        n_appends = appends(fake)
    assert res.end_reason == "caller-hangup" and res.violations == []
    assert len(fake.sessions) >= 2
    s1, s2 = fake.sessions[:2]
    assert s1.close_code == 1000 and s2.opened_at - s1.opened_at >= 2.0
    rotated_ms = ms(res, s2.opened_at)
    speech2_start = res.turns[1].speech_end_ms - 600
    assert res.streams[0].end_t <= rotated_ms <= speech2_start, (rotated_ms, res.streams[0].end_t)
    assert [e["type"] for _, e in s2.received][0] == "session.update"
    assert reseeded(s2) == [("assistant", REPLY)]
    assert len(res.streams) == 2 and all(s.heard_ms == 600 and s.underruns == 0 for s in res.streams)
    assert n_appends == res.chunks_sent
    rot = logs.events("call.openai_rotated")
    assert rot and rot[0]["reseeded_items"] == 1
    assert logs.events("call.openai_lost") == []
    lat = latencies(res)
    figure("rotation_in_pause", rotated_at_ms=round(rotated_ms, 1), rotation_gap_ms=rot[0]["gap_ms"],
           turn_latency_ms=lat, extra_latency_ms=round(lat[1] - lat[0], 1), sessions=len(fake.sessions))


# ------------------------------------------------------------------------------ failed responses


async def test_failed_response_transient_is_retried_once(logs):
    async with running(fast_fake(fail_responses=["rate_limit_exceeded"])) as (fake, bridge):
        res = await run_call(caller(bridge, [Speak(600), WaitForBot(5000), Silence(100)]))
    assert res.end_reason == "caller-hangup" and res.violations == []
    assert len(res.streams) == 1 and res.streams[0].heard_ms == 600          # not a silent turn
    [s] = fake.sessions
    assert [r.status for r in s.responses] == ["failed", "completed"]
    assert len(s.received_of("response.create")) == 1
    assert len(logs.events("call.response_retry")) == 1
    [failed] = logs.events("call.response_failed")
    assert failed["code"] == "rate_limit_exceeded"
    retry_ms = (s.responses[1].first_delta_at - s.responses[0].done_at) * 1000
    figure("response_failed_transient", turn_latency_ms=latencies(res), retry_to_audio_ms=round(retry_ms, 1))


@pytest.mark.parametrize("codes, reason", [(["server_error", "server_error"], "openai_response_failed"),
                                           (["insufficient_quota"], "openai_error")])
async def test_failed_response_ends_the_call(codes, reason, logs):
    """A second failure of the same turn, or a fatal one at once: the caller is hung up with a
    reason, never left with a silent turn."""
    async with running(fast_fake(fail_responses=codes)) as (fake, bridge):
        res = await run_call(caller(bridge, [Speak(600), WaitForBot(3000), Silence(3000)]))
    assert res.end_reason == "bot-hangup" and res.streams == []
    text, t = hangup(res)
    assert text == "model-unreachable", text               # VAIC gets the token, the log the detail
    [end] = logs.events("call.end")
    assert end["reason"] == reason and codes[-1] in end["detail"]
    [s] = fake.sessions
    assert [r.status for r in s.responses] == ["failed"] * len(codes)
    assert len(s.received_of("response.create")) == len(codes) - 1        # the one retry, or none
    after_ms = t - ms(res, s.responses[-1].done_at)
    assert after_ms < 500
    figure(f"response_failed_{'_'.join(codes)}", hangup_after_failure_ms=round(after_ms, 1))


# ------------------------------------------------------------------------------ VAIC resume


@pytest.mark.parametrize("when", ["pause", "mid_prompt"])
async def test_vaic_resume_within_grace(when, logs):
    """VAIC drops its socket and resumes 0.5 s later: the same call and OpenAI session go on.
    Dropped mid-prompt, the prompt is truncated at what the caller heard and the next answer
    is a new play stream."""
    if when == "pause":
        fake_cfg, first = fast_fake(), [Speak(600), WaitForBot(5000)]
    else:   # a 3 s answer; the drop after about 1 s of it was heard
        fake_cfg, first = fast_fake(reply_ms=[3000, 600]), [Speak(600), Silence(1500)]
    script = first + [DropAndResume(gap_ms=500), Speak(600), WaitForBot(5000), Silence(100)]
    async with running(fake_cfg, call={"resume_grace_s": 3.0}) as (fake, bridge):
        task = asyncio.create_task(run_call(caller(bridge, script)))
        # once resumed, the daemon counts one call, not the socket that carried the resume too
        assert await wait_for(lambda: bool(logs.events("call.resumed")), 15.0)
        assert len(bridge.calls) == 1 and bridge.stats.calls_active == 1
        res = await task
        assert await wait_for(lambda: not bridge.calls, 3.0)
        assert len(bridge.finished) == 1                  # one call.end, one call
    assert res.end_reason == "caller-hangup" and res.violations == [], res.violations
    [r] = res.resumes
    assert r.outcome == "accepted" and r.detail == res.accepted_format
    [s] = fake.sessions                                   # the same OpenAI session throughout
    assert s.closed_at is not None and ms(res, s.closed_at) > r.reply_ms
    assert len(res.streams) == 2 and res.streams[1].heard_ms == 600
    assert len({st.stream_id for st in res.streams}) == 2
    assert res.turns[-1].latency_ms is not None
    assert len(logs.events("call.vaic_detached")) == 1
    [resumed] = logs.events("call.resumed")
    ends = logs.events("call.end")
    assert [e["reason"] for e in ends] == ["vaic_session_end"]
    trunc_heard = None
    if when == "mid_prompt":
        first_stream = res.streams[0]
        assert 700 <= first_stream.heard_ms < 3000
        [trunc] = s.truncations
        trunc_heard = trunc["audio_end_ms"] - first_stream.heard_ms
        assert abs(trunc_heard) <= 60, (trunc, first_stream.heard_ms)
    figure(f"vaic_resume_inside_grace_{when}", gap_ms=500, resumed_gap_ms=resumed.get("gap_ms"),
           accept_ms=round(r.reply_ms - r.connected_ms, 1), turn_latency_ms=latencies(res),
           truncate_minus_heard_ms=trunc_heard)


async def test_vaic_resume_after_grace_is_refused(logs):
    """Resumed 4 s after the drop with a 3 s grace: the call has ended (resume_grace_expired),
    its OpenAI session stayed open during the grace and was closed within a second of its end;
    the late session.resume gets session.error."""
    script = [Speak(600), WaitForBot(5000), DropAndResume(gap_ms=4000), Speak(600), WaitForBot(3000)]
    async with running(call={"resume_grace_s": 3.0}) as (fake, bridge):
        res = await run_call(caller(bridge, script))
        assert await wait_for(lambda: not bridge.calls, 3.0)
    [r] = res.resumes
    assert r.outcome == "error" and r.detail == "conversation not found"
    assert res.end_reason == "session.error" and res.session_error == "conversation not found"
    [s] = fake.sessions
    grace_end_ms = r.drop_ms + 3000
    closed_after_grace = ms(res, s.closed_at) - grace_end_ms
    assert -150 < closed_after_grace < 1000, closed_after_grace
    reasons = sorted(e["reason"] for e in logs.events("call.end"))
    assert "resume_grace_expired" in reasons
    assert len(logs.events("call.vaic_detached")) == 1 and logs.events("call.resumed") == []
    figure("vaic_resume_outside_grace", gap_ms=4000, grace_s=3,
           openai_closed_after_grace_end_ms=round(closed_after_grace, 1))


@pytest.mark.parametrize("whose", ["unknown", "live_call"])
async def test_vaic_resume_of_a_call_not_waiting_is_refused(whose, logs):
    """session.resume naming no call, or a call whose socket is still up (no hijacking): a
    session.error, the socket is closed, and a live call is not disturbed."""
    async with running(call={"resume_grace_s": 3.0}) as (fake, bridge):
        task = None
        cid = "nobody-here"
        if whose == "live_call":
            cid = "live-1"
            task = asyncio.create_task(run_call(caller(bridge, TWO_TURNS, conversation_id=cid)))
            assert await fake.wait_sessions(1, 5.0)
        async with connect(vaic_url(bridge), additional_headers={"Authorization": f"Bearer {TOKEN}"}) as ws:
            await ws.send(json.dumps({"type": "session.resume", "conversationId": cid}))
            reply = json.loads(await asyncio.wait_for(ws.recv(), 3.0))
            async with asyncio.timeout(3.0):
                try:
                    while True:
                        await ws.recv()
                except Exception:
                    pass
        assert reply["type"] == "session.error" and reply["reason"] == "conversation not found"
        assert ws.close_code is not None
        if task is not None:
            res = await task
            assert res.end_reason == "caller-hangup" and res.violations == []
            assert len(res.streams) == 2 and res.resumes == []
        assert len(fake.sessions) == (1 if task else 0)
    assert logs.events("call.resumed") == []
