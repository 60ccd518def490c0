"""Tests of the simulated VoiceAI Connect caller: playout model, audio, WAV framing, end-to-end runs."""

from __future__ import annotations

import base64
import io
import json
import struct
import wave
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from voicebridge.sim.caller import (
    BargeIn,
    CallResult,
    CallerConfig,
    DropAndResume,
    Silence,
    Speak,
    WaitForBot,
    format_timeline,
    main,
    parse_script,
    run_call,
    validate_connection,
)
from voicebridge.sim.caller_audio import (
    FORMATS,
    SpeechSource,
    get_format,
    mulaw_encode,
    strip_wav_header,
    wav_header,
)
from voicebridge.sim.playout_model import PlayoutModel

PCM24 = get_format("raw/lpcm16_24")

# --- playout model (pure; times fed explicitly, in ms) ---------------------------------------------


def test_drain_plays_out_after_stop_and_then_is_final() -> None:
    m = PlayoutModel("drain")
    s = m.start(0.0, "1", "raw/lpcm16_24")
    m.chunk(0.0, 100.0)
    m.chunk(0.0, 100.0)
    assert m.heard_ms(s, 50.0) == 50.0
    m.stop(60.0)
    assert m.heard_ms(s, 150.0) == 150.0
    assert m.poll(199.0) == []
    assert m.poll(250.0) == [s]
    assert (s.heard_ms, s.flushed_ms, s.finished_t, s.underruns) == (200.0, 0.0, 200.0, 0)
    assert m.heard_ms(s, 999.0) == 200.0


def test_flush_on_stop_freezes_heard() -> None:
    m = PlayoutModel("flush")
    s = m.start(0.0, "1", "raw/lpcm16_24")
    m.chunk(10.0, 300.0)
    m.stop(130.0)
    assert m.poll(130.0) == [s]
    assert (s.heard_ms, s.flushed_ms, s.finished_t) == (120.0, 180.0, 130.0)
    assert m.is_idle(130.0)


def test_underrun_counts_gap_and_heard_follows_real_time() -> None:
    m = PlayoutModel("drain")
    s = m.start(0.0, "1", "raw/lpcm16_24")
    m.chunk(0.0, 100.0)
    m.chunk(150.0, 100.0)  # buffer ran dry at 100: a 50 ms gap
    assert (s.underruns, s.gap_ms) == (1, 50.0)
    assert m.heard_ms(s, 175.0) == 125.0
    m.chunk(200.0, 100.0)  # buffer still holds 50 ms: no underrun
    assert s.underruns == 1
    m.stop(210.0)
    m.poll(400.0)
    assert (s.heard_ms, s.finished_t) == (300.0, 350.0)


def test_first_chunk_after_idle_is_not_an_underrun() -> None:
    m = PlayoutModel("drain")
    m.start(0.0, "1", "raw/lpcm16_24")
    m.chunk(500.0, 20.0)
    assert m.latest is not None and m.latest.underruns == 0


def test_barge_in_flush_freezes_and_discards_later_chunks() -> None:
    m = PlayoutModel("flush")
    s = m.start(0.0, "1", "raw/lpcm16_24")
    m.chunk(0.0, 200.0)
    m.barge_in(50.0)
    m.chunk(60.0, 100.0)  # late chunk of the same stream: discarded
    assert m.current_heard_ms(70.0) == 50.0
    m.stop(80.0)
    m.poll(80.0)
    assert (s.received_ms, s.heard_ms, s.flushed_ms) == (300.0, 50.0, 250.0)


def test_barge_in_with_drain_does_not_touch_the_buffer() -> None:
    m = PlayoutModel("drain")
    s = m.start(0.0, "1", "raw/lpcm16_24")
    m.chunk(0.0, 200.0)
    m.barge_in(50.0)
    assert m.heard_ms(s, 150.0) == 150.0


def test_drain_queues_next_stream_behind_the_previous_one() -> None:
    m = PlayoutModel("drain")
    a = m.start(0.0, "a", "raw/lpcm16_24")
    m.chunk(0.0, 300.0)
    m.stop(10.0)
    b = m.start(20.0, "b", "raw/lpcm16_24")
    m.chunk(20.0, 100.0)
    assert m.heard_ms(b, 250.0) == 0.0  # a still playing
    assert m.heard_ms(b, 310.0) == 10.0
    assert m.poll(310.0) == [a] and a.heard_ms == 300.0


def test_end_call_counts_unplayed_audio_as_cut() -> None:
    m = PlayoutModel("flush")
    s = m.start(0.0, "1", "raw/lpcm16_24")
    m.chunk(0.0, 300.0)
    m.end_call(100.0)
    assert (s.heard_ms, s.cut_ms, s.flushed_ms, s.finished_t) == (100.0, 200.0, 0.0, 100.0)


def test_audible_spans_skip_underruns_and_follow_the_queue() -> None:
    model = PlayoutModel("drain")
    model.start(0, "1", "raw/lpcm16_24")
    model.chunk(0, 100)
    model.chunk(150, 100)                      # an underrun from 100 to 150
    model.stop(160)
    model.start(200, "2", "raw/lpcm16_24")
    model.chunk(200, 50)                       # queued behind stream 1: plays from 250
    model.stop(200)
    model.start(400, "3", "raw/lpcm16_24")
    model.chunk(400, 100)
    model.end_call(450)                        # cut at call end
    result = CallResult(url="u", conversation_id="c", streams=model.streams)
    assert [s.play_start_t for s in model.streams] == [0, 250, 400]
    assert model.streams[0].gap_spans == [(100, 150)]
    assert result.audible() == [(0, 100), (150, 300), (400, 450)]


def test_heard_bytes_is_the_exact_heard_prefix() -> None:
    m = PlayoutModel("flush")
    audio = bytes(range(256)) * 15  # 3840 bytes = 80 ms at 24 kHz
    m.start(0.0, "1", "raw/lpcm16_24", PCM24)
    m.chunk(0.0, PCM24.ms_for_bytes(len(audio)), audio)
    s = m.stop(10.0)
    m.poll(10.0)
    assert s.heard_bytes == audio[: 10 * PCM24.bytes_per_ms]


# --- audio -----------------------------------------------------------------------------------------


def mulaw_decode_reference(data: bytes) -> np.ndarray:
    """Textbook G.711 μ-law decoder, written independently of the encoder under test."""
    out = []
    for byte in data:
        u = ~byte & 0xFF
        exponent = (u >> 4) & 0x07
        mantissa = u & 0x0F
        magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
        out.append(-magnitude if u & 0x80 else magnitude)
    return np.array(out, dtype=np.int32)


def test_mulaw_round_trip_against_reference_decoder() -> None:
    codes = bytes(b for b in range(256) if b != 0x7F)  # 0x7F is "negative zero", re-encodes as 0xFF
    assert mulaw_encode(mulaw_decode_reference(codes)) == codes
    x = np.arange(-32635, 32636, 7, dtype=np.int32)
    encoded = mulaw_encode(x)
    decoded = mulaw_decode_reference(encoded)
    exponent = ((~np.frombuffer(encoded, dtype=np.uint8)) >> 4) & 0x07
    assert np.all(np.abs(decoded - x) <= (4 << exponent.astype(np.int32)))  # half a quantisation step
    assert mulaw_encode(np.array([0])) == b"\xff"


@pytest.mark.parametrize("name", sorted(FORMATS))
def test_frame_lengths_and_content_per_format(name: str) -> None:
    fmt = FORMATS[name]
    src = SpeechSource(fmt)
    expected = fmt.sample_rate_hz // 1000 * 20 * fmt.sample_width_bytes
    speech, silence = src.speech(20), src.silence(20)
    assert len(speech) == len(silence) == expected == fmt.bytes_for_ms(20)
    assert silence == (b"\xff" if fmt.codec == "mulaw" else b"\x00") * expected
    assert speech != silence
    if fmt.codec == "lpcm16":
        peak = np.abs(np.frombuffer(SpeechSource(fmt).speech(100), dtype="<i2")).max()
        assert 7000 <= peak <= 8000


def test_speech_is_phase_continuous_across_frames_and_the_cycle_wrap() -> None:
    a, b = SpeechSource(PCM24), SpeechSource(PCM24)
    assert a.speech(10) + a.speech(10) == b.speech(20)
    a, b = SpeechSource(PCM24), SpeechSource(PCM24)
    assert a.speech(1500) == b.speech(990) + b.speech(510)


def test_wav_header_pcm_parses_with_stdlib_wave() -> None:
    fmt = get_format("wav/lpcm16")
    header = wav_header(fmt)
    assert len(header) == 44
    with wave.open(io.BytesIO(header + b"\x00" * 640)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, 16000)


def test_wav_header_mulaw_fields() -> None:
    header = wav_header(get_format("wav/mulaw"))
    riff, riff_size, wave_id, fmt_id, fmt_size = struct.unpack_from("<4sI4s4sI", header, 0)
    tag, channels, rate, byte_rate, align, bits = struct.unpack_from("<HHIIHH", header, 20)
    data_id, data_size = struct.unpack_from("<4sI", header, 36)
    assert (riff, wave_id, fmt_id, data_id) == (b"RIFF", b"WAVE", b"fmt ", b"data")
    assert (fmt_size, tag, channels, rate, byte_rate, align, bits) == (16, 7, 1, 8000, 8000, 1, 8)
    assert riff_size == data_size == 0xFFFFFFFF


def test_strip_wav_header() -> None:
    audio = b"\x01\x02" * 10
    assert strip_wav_header(wav_header(PCM24) + audio) == audio
    assert strip_wav_header(audio) == audio
    with_list = wav_header(PCM24)[:36] + b"LIST" + struct.pack("<I", 4) + b"INFO" + wav_header(PCM24)[36:]
    assert strip_wav_header(with_list + audio) == audio


def test_parse_script() -> None:
    assert parse_script("speak:1500, silence:2000,bargein:800:1200,wait,wait:300,bargein:1:2:3") == [
        Speak(1500),
        Silence(2000),
        BargeIn(800, 1200),
        WaitForBot(),
        WaitForBot(300),
        BargeIn(1, 2, 3),
    ]
    assert parse_script("resume:500,resume:4000:100") == [DropAndResume(gap_ms=500),
                                                          DropAndResume(after_ms=100, gap_ms=4000)]
    with pytest.raises(ValueError, match="shout"):
        parse_script("shout:3")


def test_cli_help(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "--stop-policy" in capsys.readouterr().out


# --- end to end against a tiny in-test bot ---------------------------------------------------------


@dataclass
class BotLog:
    """What the in-test bot received."""

    messages: list[dict[str, Any]] = field(default_factory=list)
    authorization: list[str | None] = field(default_factory=list)

    def of_type(self, type_: str) -> list[dict[str, Any]]:
        return [m for m in self.messages if m["type"] == type_]

    async def expect(self, ws: ServerConnection, type_: str) -> dict[str, Any]:
        """Read (and log) messages until one of ``type_`` arrives."""
        while True:
            msg = json.loads(await ws.recv())
            self.messages.append(msg)
            if msg["type"] == type_:
                return msg

    async def drain(self, ws: ServerConnection) -> None:
        """Log everything until the caller closes; answer every userStream.stop."""
        try:
            while True:
                await self.expect(ws, "userStream.stop")
                await send(ws, {"type": "userStream.stopped"})
        except ConnectionClosed:
            pass


BotHandler = Callable[[ServerConnection, BotLog], Awaitable[None]]


async def send(ws: ServerConnection, msg: dict[str, Any]) -> None:
    await ws.send(json.dumps(msg))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@asynccontextmanager
async def bot_server(handler: BotHandler, status: int | None = None) -> AsyncIterator[tuple[str, BotLog]]:
    log = BotLog()

    def process_request(conn: ServerConnection, request: Request) -> Response | None:
        log.authorization.append(request.headers.get("Authorization"))
        return conn.respond(status, "no\n") if status is not None else None

    async def handle(ws: ServerConnection) -> None:
        try:
            await handler(ws, log)
        except ConnectionClosed:
            pass

    server: Server
    async with serve(handle, "127.0.0.1", 0, process_request=process_request, compression=None) as server:
        port = server.sockets[0].getsockname()[1]
        yield f"ws://127.0.0.1:{port}/", log


async def accept(ws: ServerConnection, log: BotLog, media_format: str = "raw/lpcm16_24") -> None:
    await log.expect(ws, "session.initiate")
    await send(ws, {"type": "session.accepted", "mediaFormat": media_format})
    await log.expect(ws, "userStream.start")
    await send(ws, {"type": "userStream.started"})


GREETING = [bytes([i]) * PCM24.bytes_for_ms(100) for i in (1, 2, 3)]


async def play(ws: ServerConnection, stream_id: str, chunks: list[bytes], fmt: str = "raw/lpcm16_24") -> None:
    await send(ws, {"type": "playStream.start", "streamId": stream_id, "mediaFormat": fmt})
    for chunk in chunks:
        await send(ws, {"type": "playStream.chunk", "streamId": stream_id, "audioChunk": b64(chunk)})
    await send(ws, {"type": "playStream.stop", "streamId": stream_id})


async def test_call_plays_greeting_and_hangs_up_properly() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)
        await play(ws, "1", GREETING)
        await log.drain(ws)

    async with bot_server(bot) as (url, log):
        cfg = CallerConfig(url, token="secret", script=[WaitForBot(3000)], stop_policy="drain", play_finished=True)
        result = await run_call(cfg)

    assert result.violations == []
    assert (result.end_reason, result.accepted_format, result.script_timeouts) == ("caller-hangup", "raw/lpcm16_24", 0)
    [stream] = result.streams
    assert (stream.stream_id, stream.received_ms, stream.heard_ms, stream.flushed_ms, stream.cut_ms) == (
        "1", 300.0, 300.0, 0.0, 0.0)
    assert stream.heard_bytes == b"".join(GREETING)
    assert result.chunks_received == 3
    assert log.authorization == ["Bearer secret"]
    assert all(m["conversationId"] == result.conversation_id for m in log.messages)
    control = [m for m in log.messages if m["type"] != "userStream.chunk"]
    assert [m["type"] for m in control] == [
        "session.initiate", "activities", "userStream.start", "activities", "userStream.stop", "session.end"]
    init, start, _, finished, _, end = control
    assert init["supportedMediaFormats"] == ["raw/lpcm16_24", "raw/mulaw"] and init["expectAudioMessages"] is True
    assert start["activities"][0]["name"] == "start"
    assert start["activities"][0]["parameters"]["vaigConversationId"] == result.conversation_id
    assert finished["activities"][0]["name"] == "playFinished"
    assert end["reasonCode"] == "client-disconnected"
    chunks = [base64.b64decode(m["audioChunk"]) for m in log.of_type("userStream.chunk")]
    assert len(chunks) == result.chunks_sent > 0
    assert all(c == bytes(960) for c in chunks)  # 20 ms of 24 kHz silence
    assert "heard 300 ms" in format_timeline(result)


async def test_flush_policy_keeps_heard_plus_flushed_equal_to_received() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)
        await play(ws, "1", GREETING)  # stop right after a 300 ms burst: most of it is flushed
        await log.drain(ws)

    async with bot_server(bot) as (url, _):
        result = await run_call(CallerConfig(url, script=[WaitForBot(3000)]))
    [stream] = result.streams
    assert result.violations == [] and result.script_timeouts == 0
    assert stream.received_ms == 300.0
    assert stream.heard_ms + stream.flushed_ms == stream.received_ms
    assert len(stream.heard_bytes) == round(stream.heard_ms * 24) * 2


async def test_turn_latency_measured_from_speech_end_to_first_answer_chunk() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log, "raw/mulaw")
        for _ in range(6):  # 5 frames of speech (100 ms), then the first silence frame
            await log.expect(ws, "userStream.chunk")
        await play(ws, "answer", [b"\x00" * 800], "raw/mulaw")
        await log.drain(ws)

    async with bot_server(bot) as (url, log):
        result = await run_call(CallerConfig(url, formats=["raw/mulaw"], script=[Speak(100), WaitForBot(3000)]))
    assert result.violations == [] and result.accepted_format == "raw/mulaw"
    [turn] = result.turns
    assert turn.first_audio_ms is not None and turn.latency_ms is not None and turn.latency_ms >= 0
    chunks = [base64.b64decode(m["audioChunk"]) for m in log.of_type("userStream.chunk")]
    assert all(len(c) == 160 for c in chunks)  # 20 ms of 8 kHz μ-law
    assert all(c != b"\xff" * 160 for c in chunks[:5]) and chunks[5] == b"\xff" * 160


async def test_barge_in_after_heard_ms_and_flush_on_bot_speech_started() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)
        await send(ws, {"type": "playStream.start", "streamId": "1", "mediaFormat": "raw/lpcm16_24"})
        await send(ws, {"type": "playStream.chunk", "streamId": "1", "audioChunk": b64(bytes(48000))})  # 1 s
        while base64.b64decode((await log.expect(ws, "userStream.chunk"))["audioChunk"]) == bytes(960):
            pass
        await send(ws, {"type": "userStream.speech.started"})
        await send(ws, {"type": "playStream.stop", "streamId": "1"})
        await log.drain(ws)

    async with bot_server(bot) as (url, log):
        result = await run_call(CallerConfig(url, script=[BargeIn(after_heard_ms=100, ms=100)]))
    assert result.violations == [] and result.script_timeouts == 0
    [stream] = result.streams
    assert stream.heard_ms >= 100.0  # the caller spoke only after hearing 100 ms; heard only grows
    assert stream.heard_ms + stream.flushed_ms == stream.received_ms == 1000.0
    assert len(result.speech_started_from_bot) == 1 and len(result.turns) == 1
    assert result.turns[0].first_audio_ms is None  # the bot never answered


async def test_drop_closes_without_session_end() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)
        await log.drain(ws)

    async with bot_server(bot) as (url, log):
        result = await run_call(CallerConfig(url, script=[Silence(40)], hangup="drop"))
    assert (result.end_reason, result.close_code, result.chunks_sent) == ("caller-drop", 1000, 2)
    assert [m["type"] for m in log.messages][-1] == "userStream.chunk"


async def test_protocol_violations_are_recorded_and_bot_hangup_ends_the_call() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)
        await send(ws, {"type": "playStream.chunk", "streamId": "x", "audioChunk": b64(b"\0\0")})
        await ws.send(b"\x00\x01")
        await ws.send("not json")
        await send(ws, {"type": "playStream.start", "streamId": "1", "mediaFormat": "raw/lpcm16"})
        await send(ws, {"type": "playStream.chunk", "streamId": "2", "audioChunk": b64(b"\0\0")})
        await send(ws, {"type": "playStream.chunk", "streamId": "1", "audioChunk": b64(b"\0\0\0")})
        await send(ws, {"type": "playStream.chunk", "streamId": "1", "audioChunk": "@@@"})
        await send(ws, {"type": "playStream.start", "streamId": "2", "mediaFormat": "raw/lpcm16_24"})
        await send(ws, {"type": "playStream.stop", "streamId": "2"})
        await send(ws, {"type": "whatever.this.is"})
        hangup = {"type": "event", "name": "hangup", "activityParams": {"hangupReason": "goodbye"}}
        await send(ws, {"type": "activities", "activities": [hangup]})
        await log.drain(ws)

    async with bot_server(bot) as (url, log):
        result = await run_call(CallerConfig(url, script=[Silence(5000)]))
    text = "\n".join(result.violations)
    for expected in (
        "outside an active play stream",
        "binary frame",
        "non-JSON",
        "'raw/lpcm16' not in offer",
        "active stream is '1'",
        "not whole 16-bit samples",
        "not valid base64",
        "while stream 1 is active",
    ):
        assert expected in text
    assert len(result.violations) == 8
    assert result.unknown_messages == ["whatever.this.is"]
    assert result.end_reason == "bot-hangup"
    assert [s.stream_id for s in result.streams] == ["1", "2"]
    assert result.received_activities[0]["name"] == "hangup"
    assert log.messages[-1]["type"] == "session.end"
    assert (log.messages[-1]["reasonCode"], log.messages[-1]["reason"]) == ("bot-disconnected", "goodbye")


async def test_session_error_ends_the_call() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await log.expect(ws, "session.initiate")
        await send(ws, {"type": "session.error", "reason": "no common media format"})
        await log.drain(ws)

    async with bot_server(bot) as (url, log):
        result = await run_call(CallerConfig(url, formats=["raw/lpcm16_8"]))
    assert (result.end_reason, result.session_error) == ("session.error", "no common media format")
    assert result.violations == []
    assert log.authorization == [None]
    assert [m["type"] for m in log.messages] == ["session.initiate"]


async def test_wav_format_headers_out_and_in() -> None:
    fmt = get_format("wav/lpcm16")
    answer = [wav_header(fmt) + b"\x01\x00" * 1600, b"\x02\x00" * 1600]  # 2 x 100 ms at 16 kHz

    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log, "wav/lpcm16")
        await play(ws, "1", answer, "wav/lpcm16")
        await log.drain(ws)

    async with bot_server(bot) as (url, log):
        cfg = CallerConfig(url, formats=["wav/lpcm16"], script=[WaitForBot(3000)], stop_policy="drain")
        result = await run_call(cfg)
    assert result.violations == []
    chunks = [base64.b64decode(m["audioChunk"]) for m in log.of_type("userStream.chunk")]
    assert chunks[0][:44] == wav_header(fmt) and len(chunks[0]) == 44 + 640
    assert all(len(c) == 640 and not c.startswith(b"RIFF") for c in chunks[1:])
    [stream] = result.streams
    assert stream.received_ms == stream.heard_ms == 200.0
    assert stream.heard_bytes == b"\x01\x00" * 1600 + b"\x02\x00" * 1600


async def test_validate_connection_and_http_401() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await log.expect(ws, "connection.validate")
        await send(ws, {"type": "connection.validated", "success": True})

    async with bot_server(bot) as (url, _):
        assert await validate_connection(url, "t") == {"type": "connection.validated", "success": True}
    async with bot_server(bot, status=401) as (url, _):
        result = await run_call(CallerConfig(url, token="wrong"))
    assert (result.end_reason, result.connect_error) == ("connect-failed", "HTTP 401")


def resuming_bot(answer: str | None, closed: list[int | None]) -> BotHandler:
    """First socket: accept, then read until the caller drops it (its close code into `closed`).
    Later sockets: expect session.resume, then `answer` it: None = session.accepted, userStream
    ack and one 300 ms prompt; a string = session.error with that reason."""

    async def bot(ws: ServerConnection, log: BotLog) -> None:
        first = json.loads(await ws.recv())
        log.messages.append(first)
        if first["type"] == "session.initiate":
            await send(ws, {"type": "session.accepted", "mediaFormat": "raw/lpcm16_24"})
            await log.expect(ws, "userStream.start")
            await send(ws, {"type": "userStream.started"})
            try:
                while True:
                    log.messages.append(json.loads(await ws.recv()))
            except ConnectionClosed:
                closed.append(ws.close_code)
            return
        assert first["type"] == "session.resume"
        if answer is not None:
            await send(ws, {"type": "session.error", "conversationId": first["conversationId"], "reason": answer})
            await ws.close()
            return
        await send(ws, {"type": "session.accepted", "mediaFormat": "raw/lpcm16_24"})
        await log.expect(ws, "userStream.start")
        await send(ws, {"type": "userStream.started"})
        await play(ws, "after-resume", GREETING)
        await log.drain(ws)

    return bot


async def test_drop_and_resume_accepted_goes_on_with_the_script() -> None:
    closed: list[int | None] = []
    async with bot_server(resuming_bot(None, closed)) as (url, log):
        cfg = CallerConfig(url, token="t", conversation_id="c-1", stop_policy="drain",
                           script=[Silence(100), DropAndResume(after_ms=40, gap_ms=300), WaitForBot(3000)])
        result = await run_call(cfg)
    assert result.violations == [] and result.script_timeouts == 0
    assert result.end_reason == "caller-hangup"
    [r] = result.resumes
    assert (r.outcome, r.detail) == ("accepted", "raw/lpcm16_24")
    assert r.connected_ms is not None and r.reply_ms is not None
    assert r.drop_ms >= 140 - 1 and r.connected_ms - r.drop_ms >= 300 and r.reply_ms >= r.connected_ms
    assert closed == [1006]                       # aborted: no close frame, no session.end
    assert log.authorization == ["Bearer t", "Bearer t"]
    types = [m["type"] for m in log.messages if m["type"] != "userStream.chunk"]
    assert types == ["session.initiate", "activities", "userStream.start", "session.resume",
                     "userStream.start", "userStream.stop", "session.end"]
    assert all(m["conversationId"] == "c-1" for m in log.messages)
    chunks = log.of_type("userStream.chunk")
    assert len(chunks) == result.chunks_sent
    # no catching up after the gap: the frames after the resume follow real time again
    assert result.chunks_sent < (result.duration_ms - 300) / 20 + 5
    [stream] = result.streams
    assert stream.stream_id == "after-resume" and stream.heard_ms == 300.0
    assert stream.first_chunk_t is not None and stream.first_chunk_t > r.reply_ms
    assert result.audible() == [(stream.play_start_t, stream.play_start_t + 300.0)]
    assert "resume: dropped at" in format_timeline(result)


async def test_drop_and_resume_refused_ends_the_call() -> None:
    closed: list[int | None] = []
    async with bot_server(resuming_bot("conversation not found", closed)) as (url, log):
        result = await run_call(CallerConfig(url, script=[DropAndResume(gap_ms=100), Silence(2000)]))
    [r] = result.resumes
    assert (r.outcome, r.detail) == ("error", "conversation not found")
    assert (result.end_reason, result.session_error) == ("session.error", "conversation not found")
    assert result.violations == [] and closed == [1006]
    assert [m["type"] for m in log.messages if m["type"] != "userStream.chunk"] == [
        "session.initiate", "activities", "userStream.start", "session.resume"]
    assert result.duration_ms < 1500          # the rest of the script did not run


async def test_drop_and_resume_unanswered_times_out() -> None:
    async def bot(ws: ServerConnection, log: BotLog) -> None:
        await accept(ws, log)      # on the resumed socket this waits for session.initiate: silence
        await log.drain(ws)

    async with bot_server(bot) as (url, _):
        result = await run_call(CallerConfig(url, script=[DropAndResume(gap_ms=50)], accept_timeout_s=1))
    [r] = result.resumes
    assert r.outcome == "timeout" and result.end_reason == "timeout"
    assert any("session.resume" in v for v in result.violations)
