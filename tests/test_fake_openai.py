"""Tests of the fake OpenAI Realtime GA server, over real sockets on 127.0.0.1.

Every wait is bounded by a timeout; assertions never depend on wall-clock thresholds.
"""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
import sys
import warnings
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError, InvalidStatus

from voicebridge.sim.fake_openai import (
    BETA_CLOSE_REASON,
    FakeOpenAIConfig,
    FakeRealtimeServer,
    _EnergyVad,
    bytes_per_ms,
    decode_audio,
    encode_audio,
    make_tone,
)

KEY = "sk-test-key"
FAST = dict(think_ms=5.0, delta_interval_ms=2.0, api_key=KEY)
STEP_S = 3.0  # upper bound for any single wait in these tests


@pytest.fixture
async def srv() -> AsyncIterator[FakeRealtimeServer]:
    async with FakeRealtimeServer(**FAST) as server:
        yield server


def open_ws(url: str, key: str | None = KEY, **headers: str) -> Any:
    hdrs = dict(headers)
    if key is not None:
        hdrs["Authorization"] = f"Bearer {key}"
    return connect(url, additional_headers=hdrs, open_timeout=STEP_S, close_timeout=1,
                   max_size=16 * 2**20)


async def recv(ws: ClientConnection) -> dict[str, Any]:
    return json.loads(await asyncio.wait_for(ws.recv(), STEP_S))


async def recv_until(ws: ClientConnection, etype: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Read events until one of ``etype``; returns it and everything read (inclusive)."""
    seen: list[dict[str, Any]] = []
    async with asyncio.timeout(STEP_S):
        while True:
            ev = json.loads(await ws.recv())
            seen.append(ev)
            if ev["type"] == etype:
                return ev, seen


async def send(ws: ClientConnection, event: dict[str, Any]) -> None:
    await ws.send(json.dumps(event))


async def update(ws: ClientConnection, **audio: Any) -> dict[str, Any]:
    """session.update with ``audio`` and wait for session.updated."""
    await send(ws, {"type": "session.update", "session": {"type": "realtime", "audio": audio}})
    ev, _ = await recv_until(ws, "session.updated")
    return ev


def chunks(audio: bytes, fmt: str, ms: int = 20) -> list[str]:
    step = bytes_per_ms(fmt) * ms
    return [base64.b64encode(audio[i : i + step]).decode() for i in range(0, len(audio), step)]


def speech_then_silence(fmt: str, speech_ms: int = 300, silence_ms: int = 400) -> list[str]:
    samples_per_ms = 24 if fmt == "audio/pcm" else 8
    silence = encode_audio(np.zeros(silence_ms * samples_per_ms, np.int16), fmt)
    return chunks(make_tone(speech_ms, fmt, amplitude=0.3) + silence, fmt)


# -- handshake -----------------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "sk-wrong"])
async def test_bad_or_missing_key_gets_401(srv: FakeRealtimeServer, key: str | None) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(srv.url, key=key):
            pass
    assert info.value.response.status_code == 401
    body = json.loads(info.value.response.body)
    assert body["error"]["type"] == "invalid_request_error"
    assert srv.rejected_handshakes[-1][0] == 401
    assert srv.sessions == []


async def test_wrong_path_and_azure_api_version_rejected(srv: FakeRealtimeServer) -> None:
    base = f"ws://127.0.0.1:{srv.port}"
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(f"{base}/v2/realtime?model=x"):
            pass
    assert info.value.response.status_code == 404
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(f"{base}/openai/v1/realtime?model=x&api-version=2025-04-01-preview",
                           key=None, **{"api-key": KEY}):
            pass
    assert info.value.response.status_code == 401


async def test_azure_ga_form_with_api_key_header(srv: FakeRealtimeServer) -> None:
    async with open_ws(srv.azure_url, key=None, **{"api-key": KEY}) as ws:
        ev = await recv(ws)
    assert ev["type"] == "session.created"
    assert srv.sessions[0].azure and srv.sessions[0].path == "/openai/v1/realtime"


async def test_any_bearer_accepted_without_configured_key() -> None:
    async with FakeRealtimeServer(think_ms=5) as server, open_ws(server.url, key="anything") as ws:
        assert (await recv(ws))["type"] == "session.created"


async def test_refuse_knob() -> None:
    async with FakeRealtimeServer(refuse=503) as server:
        with pytest.raises(InvalidStatus) as info:
            async with open_ws(server.url):
                pass
    assert info.value.response.status_code == 503
    assert server.rejected_handshakes == [(503, "refused")]


async def test_beta_header_closed_with_4000(srv: FakeRealtimeServer) -> None:
    async with open_ws(srv.url, **{"OpenAI-Beta": "realtime=v1"}) as ws:
        with pytest.raises(ConnectionClosedError) as info:
            await asyncio.wait_for(ws.recv(), STEP_S)
    assert info.value.rcvd is not None
    assert info.value.rcvd.code == 4000
    assert info.value.rcvd.reason == BETA_CLOSE_REASON
    assert await srv.wait_closed_all(STEP_S)
    assert srv.sessions[0].beta_rejected and srv.sessions[0].close_code == 4000


# -- session -------------------------------------------------------------------------------


async def test_session_created_first_with_ga_defaults(srv: FakeRealtimeServer) -> None:
    async with open_ws(srv.url) as ws:
        ev = await recv(ws)
    assert ev["type"] == "session.created" and ev["event_id"].startswith("event_")
    s = ev["session"]
    assert s["object"] == "realtime.session" and s["id"].startswith("sess_")
    assert s["type"] == "realtime" and s["model"] == "gpt-realtime"
    assert s["audio"]["input"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert s["audio"]["output"]["format"] == {"type": "audio/pcm", "rate": 24000}
    assert s["audio"]["output"]["voice"] == "marin"
    assert s["output_modalities"] == ["audio"]
    td = s["audio"]["input"]["turn_detection"]
    assert td == {"type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                  "silence_duration_ms": 200, "idle_timeout_ms": None,
                  "create_response": True, "interrupt_response": True}
    assert s["expires_at"] > 0


async def test_session_update_validation(srv: FakeRealtimeServer) -> None:
    async with open_ws(srv.url) as ws:
        await recv(ws)
        await send(ws, {"type": "session.update", "event_id": "e1",
                        "session": {"instructions": "hi"}})
        err = (await recv_until(ws, "error"))[0]["error"]
        assert (err["code"], err["param"], err["event_id"]) == (
            "missing_required_parameter", "session.type", "e1")

        await send(ws, {"type": "session.update", "event_id": "e2",
                        "session": {"type": "realtime", "input_audio_format": "g711_ulaw"}})
        err = (await recv_until(ws, "error"))[0]["error"]
        assert (err["code"], err["param"], err["event_id"]) == (
            "unknown_parameter", "session.input_audio_format", "e2")

        await send(ws, {"type": "session.update", "session": {
            "type": "realtime", "audio": {"input": {"format": {"type": "audio/pcm", "rate": 8000}}}}})
        err = (await recv_until(ws, "error"))[0]["error"]
        assert (err["code"], err["param"]) == ("invalid_value", "session.audio.input.format.rate")

        await send(ws, {"type": "session.update", "session": {
            "type": "realtime",
            "audio": {"input": {"turn_detection": {"type": "fancy_vad"}}}}})
        err = (await recv_until(ws, "error"))[0]["error"]
        assert (err["code"], err["param"]) == (
            "invalid_value", "session.audio.input.turn_detection.type")

        ev = await update(ws, input={"format": {"type": "audio/pcmu"},
                                     "turn_detection": {"type": "server_vad",
                                                        "silence_duration_ms": 400}},
                          output={"format": {"type": "audio/pcma"}, "voice": "cedar"})
        s = ev["session"]
        assert s["audio"]["input"]["format"] == {"type": "audio/pcmu"}
        assert s["audio"]["output"] == {"format": {"type": "audio/pcma"}, "voice": "cedar",
                                        "speed": 1.0}
        assert s["audio"]["input"]["turn_detection"]["silence_duration_ms"] == 400
        assert s["audio"]["input"]["turn_detection"]["prefix_padding_ms"] == 300
        assert s["instructions"]  # untouched fields keep their value
        assert "event_id" in ev and ev["event_id"] != "e1"
    assert srv.sessions[0].session["audio"]["input"]["format"]["type"] == "audio/pcmu"
    errors = srv.sessions[0].errors_sent
    assert [e["error"]["code"] for e in errors] == [
        "missing_required_parameter", "unknown_parameter", "invalid_value", "invalid_value"]
    assert all(e["type"] == "error" and "injected" not in e for e in errors)


async def test_malformed_frames_get_errors_and_socket_stays_open(srv: FakeRealtimeServer) -> None:
    async with open_ws(srv.url) as ws:
        await recv(ws)
        await ws.send("{not json")
        assert (await recv(ws))["error"]["code"] == "invalid_json"
        await send(ws, {"event_id": "x1"})
        err = (await recv(ws))["error"]
        assert err["code"] == "invalid_event" and err["message"] == "The 'type' field is missing."
        assert err["event_id"] == "x1"
        await send(ws, {"type": "no.such.event"})
        assert (await recv(ws))["error"]["code"] == "invalid_event"
        await ws.send(b'{"type":"input_audio_buffer.clear"}')
        assert (await recv(ws))["type"] == "error"
        await send(ws, {"type": "input_audio_buffer.append", "audio": "***"})
        err = (await recv(ws))["error"]
        assert (err["code"], err["param"]) == ("invalid_value", "audio")
        await send(ws, {"type": "input_audio_buffer.clear", "bogus": 1})
        assert (await recv(ws))["error"]["code"] == "unknown_parameter"
        await send(ws, {"type": "input_audio_buffer.clear"})
        assert (await recv(ws))["type"] == "input_audio_buffer.cleared"


async def test_inject_errors_after_first_session_updated() -> None:
    async with FakeRealtimeServer(inject_errors=["server_error", "rate_limit_exceeded"],
                                  **FAST) as server, open_ws(server.url) as ws:
        await recv(ws)
        await update(ws)
        errs = [(await recv(ws)) for _ in range(2)]
        assert [e["error"]["code"] for e in errs] == ["server_error", "rate_limit_exceeded"]
        assert errs[0]["error"]["type"] == "server_error" and "injected" not in errs[0]
        await update(ws)  # only once
        await send(ws, {"type": "input_audio_buffer.clear"})
        assert (await recv(ws))["type"] == "input_audio_buffer.cleared"
    recorded = server.sessions[0].errors_sent
    assert [(e["error"]["code"], e["injected"]) for e in recorded] == [
        ("server_error", True), ("rate_limit_exceeded", True)]


# -- VAD and responses ---------------------------------------------------------------------

RESPONSE_SCRIPT = [
    "response.created", "rate_limits.updated", "response.output_item.added",
    "conversation.item.added", "response.content_part.added",
]
RESPONSE_TAIL = [
    "response.output_audio.done", "response.output_audio_transcript.done",
    "response.content_part.done", "response.output_item.done", "conversation.item.done",
    "response.done",
]


@pytest.mark.parametrize("fmt", ["audio/pcm", "audio/pcmu", "audio/pcma"])
async def test_vad_turn_triggers_scripted_response(srv: FakeRealtimeServer, fmt: str) -> None:
    async with open_ws(srv.url) as ws:
        await recv(ws)
        fmt_obj = {"type": fmt, "rate": 24000} if fmt == "audio/pcm" else {"type": fmt}
        await update(ws, input={"format": fmt_obj}, output={"format": fmt_obj})
        for chunk in speech_then_silence(fmt):
            await send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
        done, seen = await recv_until(ws, "response.done")
    types = [e["type"] for e in seen]
    turn = ["input_audio_buffer.speech_started", "input_audio_buffer.speech_stopped",
            "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
    assert types[:5] == turn
    assert types[5:10] == RESPONSE_SCRIPT
    assert types[-6:] == RESPONSE_TAIL
    middle = set(types[10:-6])
    assert middle == {"response.output_audio.delta", "response.output_audio_transcript.delta"}

    started, stopped, committed = seen[0], seen[1], seen[2]
    assert started["item_id"] == stopped["item_id"] == committed["item_id"]
    assert 0 <= started["audio_start_ms"] < stopped["audio_end_ms"]
    deltas = [e for e in seen if e["type"] == "response.output_audio.delta"]
    resp_id, item_id = done["response"]["id"], deltas[0]["item_id"]
    assert all(d["response_id"] == resp_id and d["item_id"] == item_id for d in deltas)
    audio = b"".join(base64.b64decode(d["delta"]) for d in deltas)
    samples = decode_audio(audio, fmt)
    assert np.sqrt(np.mean(samples.astype(np.float64) ** 2)) > 3000  # clearly audible tone
    assert done["response"]["status"] == "completed"
    assert done["response"]["usage"]["output_tokens"] > 0
    transcript = [e for e in seen if e["type"] == "response.output_audio_transcript.done"][0]
    assert transcript["transcript"] == "Hello, how can I help you?"

    rec = srv.sessions[0]
    assert rec.deltas_sent == len(deltas)
    assert rec.responses[0].audio_ms_sent == len(audio) // bytes_per_ms(fmt)
    assert not any(t == "response.output_audio.delta" for t in (e["type"] for _, e in rec.sent))
    assert rec.received_of("input_audio_buffer.append")


async def test_turn_detection_null_disables_vad(srv: FakeRealtimeServer) -> None:
    async with open_ws(srv.url) as ws:
        await recv(ws)
        await update(ws, input={"turn_detection": None})
        for chunk in speech_then_silence("audio/pcm"):
            await send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
        await send(ws, {"type": "input_audio_buffer.commit", "event_id": "c1"})
        ev, seen = await recv_until(ws, "conversation.item.done")
        assert [e["type"] for e in seen] == [
            "input_audio_buffer.committed", "conversation.item.added", "conversation.item.done"]
        await send(ws, {"type": "input_audio_buffer.clear"})
        assert (await recv(ws))["type"] == "input_audio_buffer.cleared"  # no auto response


async def test_benign_error_codes(srv: FakeRealtimeServer) -> None:
    async with open_ws(srv.url) as ws:
        await recv(ws)
        await send(ws, {"type": "input_audio_buffer.append",
                        "audio": base64.b64encode(bytes(48 * 40)).decode()})
        await send(ws, {"type": "input_audio_buffer.commit", "event_id": "c1"})
        err = (await recv(ws))["error"]
        assert err["code"] == "input_audio_buffer_commit_empty" and err["event_id"] == "c1"
        assert "Expected at least 100ms of audio, but buffer only has 40.00ms" in err["message"]

        await send(ws, {"type": "response.cancel", "event_id": "k1"})
        err = (await recv(ws))["error"]
        assert err["code"] == "response_cancel_not_active"
        assert err["message"] == "Cancellation failed: no active response found"

        await send(ws, {"type": "response.create"})
        await send(ws, {"type": "response.create", "event_id": "r2"})
        err, _ = await recv_until(ws, "error")
        assert err["error"]["code"] == "conversation_already_has_active_response"
        assert err["error"]["event_id"] == "r2"
        done, _ = await recv_until(ws, "response.done")
        assert done["response"]["status"] == "completed"


async def test_truncate_validation(srv: FakeRealtimeServer) -> None:
    async with open_ws(srv.url) as ws:
        await recv(ws)
        await send(ws, {"type": "response.create"})  # greeting: 1500 ms of audio
        done, _ = await recv_until(ws, "response.done")
        item_id = done["response"]["output"][0]["id"]
        sent_ms = srv.sessions[0].responses[0].audio_ms_sent
        assert sent_ms == 1500

        await send(ws, {"type": "conversation.item.truncate", "event_id": "t1",
                        "item_id": item_id, "content_index": 0, "audio_end_ms": sent_ms + 1})
        err = (await recv(ws))["error"]
        assert (err["type"], err["code"], err["param"], err["event_id"]) == (
            "invalid_request_error", "invalid_value", "audio_end_ms", "t1")
        assert err["message"] == f"Audio content of {sent_ms}ms is already shorter than {sent_ms + 1}ms"

        await send(ws, {"type": "conversation.item.truncate", "item_id": "item_nope",
                        "content_index": 0, "audio_end_ms": 10})
        assert (await recv(ws))["error"]["param"] == "item_id"

        await send(ws, {"type": "conversation.item.truncate", "item_id": item_id,
                        "content_index": 0, "audio_end_ms": 700})
        ev = await recv(ws)
        assert ev == {**ev, "type": "conversation.item.truncated", "item_id": item_id,
                      "content_index": 0, "audio_end_ms": 700}
        # after truncation the item holds 700 ms
        await send(ws, {"type": "conversation.item.truncate", "item_id": item_id,
                        "content_index": 0, "audio_end_ms": 800})
        assert "Audio content of 700ms" in (await recv(ws))["error"]["message"]
    trunc = srv.sessions[0].truncations
    assert len(trunc) == 1
    assert trunc[0]["audio_end_ms"] == 700 and trunc[0]["item_audio_ms"] == 1500


async def test_barge_in_cancels_with_turn_detected() -> None:
    async with FakeRealtimeServer(think_ms=5, delta_interval_ms=20, greeting_ms=4000,
                                  inflight_after_cancel=1) as server, open_ws(server.url) as ws:
        await recv(ws)
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.output_audio.delta")
        await send(ws, {"type": "input_audio_buffer.append",
                        "audio": base64.b64encode(make_tone(200, "audio/pcm")).decode()})
        started, _ = await recv_until(ws, "input_audio_buffer.speech_started")
        done, after = await recv_until(ws, "response.done")
        late = [e for e in after if e["type"] == "response.output_audio.delta"]
        assert len(late) <= 1
        assert done["response"]["status"] == "cancelled"
        assert done["response"]["status_details"] == {"type": "cancelled",
                                                      "reason": "turn_detected"}
        assert "response.output_audio.done" in [e["type"] for e in after]
        resp = server.sessions[0].responses[0]
        assert resp.status == "cancelled" and resp.reason == "turn_detected"
        assert resp.cancelled_at is not None and resp.audio_ms_sent < 4000


async def test_client_cancel(srv: FakeRealtimeServer) -> None:
    srv.config.greeting_ms = 4000
    srv.config.delta_interval_ms = 20
    async with open_ws(srv.url) as ws:
        await recv(ws)
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.output_audio.delta")
        await send(ws, {"type": "response.cancel"})
        done, _ = await recv_until(ws, "response.done")
    assert done["response"]["status_details"]["reason"] == "client_cancelled"


async def test_item_create_and_function_call_script() -> None:
    async with FakeRealtimeServer(greeting_text="Goodbye! @@hang_up {\"reason\": \"done\"}",
                                  **FAST) as server, open_ws(server.url) as ws:
        await recv(ws)
        await send(ws, {"type": "conversation.item.create", "item": {
            "type": "message", "role": "user", "content": [{"type": "input_text", "text": "x"}]}})
        added, _ = await recv_until(ws, "conversation.item.done")
        assert added["item"]["role"] == "user"
        await send(ws, {"type": "conversation.item.create", "item": {
            "type": "message", "role": "assistant",
            "content": [{"type": "output_audio", "transcript": "x"}]}})
        assert (await recv(ws))["error"]["code"] == "invalid_value"
        await send(ws, {"type": "response.create"})
        done, seen = await recv_until(ws, "response.done")
        out = done["response"]["output"]
        assert [o["type"] for o in out] == ["message", "function_call"]
        args = [e for e in seen if e["type"] == "response.function_call_arguments.done"][0]
        assert args["name"] == "hang_up" and json.loads(args["arguments"]) == {"reason": "done"}
        await send(ws, {"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": args["call_id"], "output": "ok"}})
        assert (await recv_until(ws, "conversation.item.done"))[0]["item"]["type"] == (
            "function_call_output")


async def test_unsupported_intent_closes_4000(srv: FakeRealtimeServer) -> None:
    async with open_ws(srv.url + "&intent=transcription") as ws:
        err = await recv(ws)
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), STEP_S)
    assert err["error"]["code"] == "invalid_intent"
    assert ws.close_code == 4000 and ws.close_reason == "invalid_request_error.invalid_intent"


# -- timers and faults ---------------------------------------------------------------------


async def test_session_limit_sends_session_expired_then_1001() -> None:
    async with FakeRealtimeServer(session_limit_s=0.2, **FAST) as server, \
            open_ws(server.url) as ws:
        await recv(ws)
        err, _ = await recv_until(ws, "error")
        assert err["error"]["code"] == "session_expired"
        assert err["error"]["message"].startswith("Your session hit the maximum duration of")
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), STEP_S)
        assert ws.close_code == 1001
        assert ws.close_reason == err["error"]["message"]
    assert await server.wait_closed_all(STEP_S)
    assert server.sessions[0].close_code == 1001


async def test_close_after_deltas_aborts_without_close_frame() -> None:
    async with FakeRealtimeServer(close_after_deltas=2, **FAST) as server, \
            open_ws(server.url) as ws:
        await recv(ws)
        await send(ws, {"type": "response.create"})
        deltas = 0
        with pytest.raises(ConnectionClosedError) as info:
            async with asyncio.timeout(STEP_S):
                while True:
                    if json.loads(await ws.recv())["type"] == "response.output_audio.delta":
                        deltas += 1
        assert deltas == 2
        assert info.value.rcvd is None  # no close frame from the server
        assert ws.close_code == 1006
    assert await server.wait_closed_all(STEP_S)
    rec = server.sessions[0]
    assert rec.aborted and rec.close_code == 1006 and rec.closed_at is not None


async def test_refuse_first_then_accept_with_retry_after() -> None:
    async with FakeRealtimeServer(refuse=429, refuse_first=2, retry_after_s=1.5, **FAST) as server:
        for _ in range(2):
            with pytest.raises(InvalidStatus) as info:
                async with open_ws(server.url):
                    pass
            assert info.value.response.status_code == 429
            assert info.value.response.headers["Retry-After"] == "1.5"
        async with open_ws(server.url) as ws:          # the third handshake is accepted
            assert (await recv(ws))["type"] == "session.created"
    assert server.rejected_handshakes == [(429, "refused")] * 2
    assert len(server.handshake_times) == 3 and len(server.sessions) == 1
    async with FakeRealtimeServer(refuse=503, **FAST) as server:   # no refuse_first: always
        for _ in range(3):
            with pytest.raises(InvalidStatus) as info:
                async with open_ws(server.url):
                    pass
            assert "Retry-After" not in info.value.response.headers
    assert server.rejected_handshakes == [(503, "refused")] * 3 and server.sessions == []


@pytest.mark.parametrize("code", [None, 1011, 1001])
async def test_drop_after_s_aborts_or_closes_with_code(code: int | None) -> None:
    async with FakeRealtimeServer(drop_after_s=0.2, drop_code=code, **FAST) as server, \
            open_ws(server.url) as ws:
        await recv(ws)
        with pytest.raises(ConnectionClosed) as info:
            async with asyncio.timeout(STEP_S):
                while True:
                    await ws.recv()
        if code is None:
            assert info.value.rcvd is None and ws.close_code == 1006   # no close frame
        else:
            assert info.value.rcvd is not None and info.value.rcvd.code == code
    assert await server.wait_closed_all(STEP_S)
    rec = server.sessions[0]
    assert rec.dropped_at is not None and 0.19 <= rec.dropped_at - rec.opened_at < 0.2 + STEP_S
    assert rec.aborted == (code is None) and rec.close_code == (1006 if code is None else code)


async def test_fail_responses_then_the_same_reply() -> None:
    async with FakeRealtimeServer(fail_responses=["rate_limit_exceeded", "insufficient_quota"],
                                  **FAST) as server, open_ws(server.url) as ws:
        await recv(ws)
        for code in ("rate_limit_exceeded", "insufficient_quota"):
            await send(ws, {"type": "response.create"})
            done, seen = await recv_until(ws, "response.done")
            r = done["response"]
            assert r["status"] == "failed" and r["output"] == []
            assert r["status_details"] == {"type": "failed", "error": {"type": code, "code": code}}
            assert not any(e["type"].startswith("response.output") for e in seen)
        await send(ws, {"type": "response.create"})     # the knob is used up: a normal answer
        done, seen = await recv_until(ws, "response.done")
        assert done["response"]["status"] == "completed"
        [tr] = [e for e in seen if e["type"] == "response.output_audio_transcript.done"]
        assert tr["transcript"] == server.config.greeting_text
    assert [r.status for r in server.sessions[0].responses] == ["failed", "failed", "completed"]
    assert server.sessions[0].deltas_sent > 0


async def test_input_transcription_completed_per_user_turn() -> None:
    async with FakeRealtimeServer(input_transcripts=["first {n}", "second {n}"], **FAST) as server, \
            open_ws(server.url) as ws:
        await recv(ws)
        await update(ws, input={"transcription": {"model": "gpt-4o-transcribe"}})
        got = []
        for _ in range(2):
            for chunk in speech_then_silence("audio/pcm"):
                await send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
            _, seen = await recv_until(ws, "response.done")
            [committed] = [e for e in seen if e["type"] == "input_audio_buffer.committed"]
            [tr] = [e for e in seen
                    if e["type"] == "conversation.item.input_audio_transcription.completed"]
            assert tr["item_id"] == committed["item_id"] and tr["content_index"] == 0
            got.append(tr["transcript"])
    assert got == ["first 1", "second 2"]
    async with FakeRealtimeServer(**FAST) as server, open_ws(server.url) as ws:   # off: none
        await recv(ws)
        for chunk in speech_then_silence("audio/pcm"):
            await send(ws, {"type": "input_audio_buffer.append", "audio": chunk})
        _, seen = await recv_until(ws, "response.done")
    assert not any("transcription" in e["type"] for e in seen)


async def test_first_delta_delay_and_stop_closes_clients() -> None:
    server = FakeRealtimeServer(first_delta_delay_ms=30, **FAST)
    await server.start()
    try:
        async with open_ws(server.url) as ws:
            await recv(ws)
            await send(ws, {"type": "response.create"})
            await recv_until(ws, "response.output_audio.delta")
            assert server.open_sessions() == 1
            await server.stop()
            with pytest.raises(ConnectionClosed):
                async with asyncio.timeout(STEP_S):
                    while True:
                        await ws.recv()
            assert ws.close_code == 1001
    finally:
        await server.stop()
    assert server.open_sessions() == 0


async def test_record_off_keeps_lists_empty() -> None:
    async with FakeRealtimeServer(record=False, **FAST) as server, open_ws(server.url) as ws:
        await recv(ws)
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.done")
    assert await server.wait_closed_all(STEP_S)
    rec = server.sessions[0]
    assert rec.deltas_sent > 0
    assert rec.sent == [] and rec.received == [] and rec.responses == []


# -- audio helpers and CLI -----------------------------------------------------------------


@pytest.mark.parametrize("fmt,fn", [("audio/pcmu", "ulaw2lin"), ("audio/pcma", "alaw2lin")])
def test_g711_tables_match_reference(fmt: str, fn: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        audioop = pytest.importorskip("audioop")
    codes = bytes(range(256))
    ref = np.frombuffer(getattr(audioop, fn)(codes, 2), dtype="<i2")
    assert np.array_equal(decode_audio(codes, fmt), ref)
    assert encode_audio(decode_audio(codes, fmt), fmt) == encode_audio(ref, fmt)
    assert np.array_equal(decode_audio(encode_audio(ref, fmt), fmt), ref)


def _two_utterances(fmt: str) -> bytes:
    silence = lambda ms: encode_audio(np.zeros(ms * (24 if fmt == "audio/pcm" else 8), np.int16), fmt)
    return (silence(100) + make_tone(300, fmt) + silence(300) + make_tone(200, fmt)
            + silence(400))


@settings(max_examples=40, deadline=None)
@given(fmt=st.sampled_from(["audio/pcm", "audio/pcmu", "audio/pcma"]),
       cuts=st.lists(st.integers(1, 3000), max_size=25))
def test_vad_events_do_not_depend_on_chunking(fmt: str, cuts: list[int]) -> None:
    audio = _two_utterances(fmt)
    args = (fmt, 500.0, 60, 200, 300)
    whole = _EnergyVad().feed(audio, *args)
    vad, events, pos = _EnergyVad(), [], 0
    for cut in cuts:
        events += vad.feed(audio[pos : pos + cut], *args)
        pos += cut
    events += vad.feed(audio[pos:], *args)
    assert events == whole
    assert [kind for kind, _ in whole] == ["started", "stopped", "started", "stopped"]
    assert whole[0][1] == 0 and whole[1][1] == 100 + 300 + 200  # prefix clamps at 0; +silence


def test_config_defaults() -> None:
    cfg = FakeOpenAIConfig()
    assert (cfg.host, cfg.port, cfg.record, cfg.inflight_after_cancel) == ("127.0.0.1", 0, True, 1)


def test_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "voicebridge.sim.fake_openai", "--help"],
                         capture_output=True, text=True, timeout=30, check=True)
    assert "--close-after-deltas" in out.stdout and "--session-limit-s" in out.stdout


async def test_cli_serves_until_interrupted() -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "voicebridge.sim.fake_openai", "--port", "0", "--think-ms", "5",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        assert proc.stdout is not None
        first = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        url = first.split(" on ", 1)[1].strip()
        async with open_ws(url, key="any") as ws:
            assert (await recv(ws))["type"] == "session.created"
        lines = [(await asyncio.wait_for(proc.stdout.readline(), STEP_S)).decode()
                 for _ in range(2)]
        assert "open" in lines[0] and "closed code=1000" in lines[1]
        proc.send_signal(2)  # SIGINT, like Ctrl-C
        assert await asyncio.wait_for(proc.wait(), 10) == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
