"""The wire recorder (voicebridge/recording.py) and the timeline (voicebridge/timeline.py), in
process: the file format round trip, mode 0600, retention, the per-call bound, the pre-buffer
decision, no secrets in files, and a real call through the bridge recorded end to end."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import stat
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.conftest import API_KEY, SECRETS, TOKEN, bridge_config
from voicebridge import recording as rec_mod
from voicebridge.config import ConfigError, RecordingConfig, load_config
from voicebridge.recording import (AUDIO, AUDIO_REF, NOTE, OPENAI_IN, OPENAI_OUT, REDACTED, VAIC_IN, VAIC_OUT,
                                   CallRecorder, Encoder, RecordingService, encode_header, read_recording,
                                   scrub, split_audio, sweep)
from voicebridge.server import Bridge
from voicebridge.sim.caller import BargeIn, CallerConfig, Silence, Speak, WaitForBot, run_call
from voicebridge.sim.fake_openai import FakeOpenAIConfig, FakeRealtimeServer
from voicebridge.timeline import fake_config_for, side_by_side, summarize, timeline


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def chunk_in(audio: bytes, cid: str = "c1") -> str:
    return json.dumps({"type": "userStream.chunk", "conversationId": cid, "audioChunk": b64(audio)},
                      separators=(",", ":"))


def append_out(audio: bytes) -> str:
    return '{"type":"input_audio_buffer.append","audio":"' + b64(audio) + '"}'


def delta_in(audio: bytes, rid: str = "r1") -> str:
    return ('{"type":"response.output_audio.delta","event_id":"e","response_id":"' + rid
            + '","item_id":"i1","output_index":0,"content_index":0,"delta":"' + b64(audio) + '"}')


def play_chunk(audio: bytes, sid: str = "1") -> str:
    return '{"type":"playStream.chunk","streamId":"' + sid + '","audioChunk":"' + b64(audio) + '"}'


def write_file(path: Path, frames: list[tuple[int, int, str | bytes]]) -> None:
    enc = Encoder()
    with open(path, "wb") as f:
        f.write(encode_header({"format": 1, "call_id": "c1"}))
        for kind, t, frame in frames:
            f.write(enc.record(kind, t, frame))


# ------------------------------------------------------------------------------------ format


def test_round_trip_every_kind(tmp_path: Path) -> None:
    pcm = bytes(range(256)) * 19                     # 4864 bytes
    frames: list[tuple[int, int, str | bytes]] = [
        (VAIC_IN, 1, '{"type":"session.initiate","conversationId":"c1","caller":"Zoë ☎"}'),
        (VAIC_OUT, 2, '{"type":"session.accepted","mediaFormat":"raw/lpcm16_24"}'),
        (VAIC_IN, 3, chunk_in(pcm[:960]).encode()),           # read as bytes
        (OPENAI_OUT, 4, append_out(pcm[:960])),               # same audio: stored as a reference
        (OPENAI_IN, 5, delta_in(pcm)),
        (VAIC_OUT, 6, play_chunk(pcm[:2400])),                # slices of the delta: references
        (VAIC_OUT, 7, play_chunk(pcm[2400:])),
        (VAIC_OUT, 8, play_chunk(b"\x01\x02\x03" * 10)),      # not in any delta: stored
        (VAIC_IN, 9, '{"type":"userStream.chunk","conversationId":"c1","audioChunk":"AB=="}'),  # not canonical
        (VAIC_IN, 10, '{"type":"activities","conversationId":"Zoë","activities":[{"name":"start"}],'
                      '"audioChunk":"x"}'),
        (NOTE, 11, b'{"event":"vaic_closed","code":1006}'),
        (VAIC_IN, 12, '{"type":"userStream.chunk","conversationId":"Zoë ☎","audioChunk":"' + b64(pcm[:30]) + '"}'),
        (VAIC_IN, 13, json.dumps({"conversationId": "c1", "type": "userStream.chunk",   # spaces, type later
                                  "audioChunk": b64(pcm[:300])})),
        (OPENAI_OUT, 14, json.dumps({"type": "input_audio_buffer.append", "audio": b64(pcm[:300])})),
        (VAIC_IN, 2**40, chunk_in(b"")),
    ]
    p = tmp_path / "a.vbrec"
    write_file(p, frames)
    got = read_recording(p)
    assert got.complete and got.header["call_id"] == "c1"
    assert [(r.kind, r.t_ns) for r in got.records] == [(k, t) for k, t, _ in frames]
    for r, (_, _, frame) in zip(got.records, frames):
        want = frame.decode() if isinstance(frame, bytes) else frame
        assert r.frame() == want
    flags = [r.flags for r in got.records]
    assert flags[2] & AUDIO and flags[2] & rec_mod.BYTES
    assert flags[3] & AUDIO_REF and flags[5] & AUDIO_REF and flags[6] & AUDIO_REF
    assert flags[4] == AUDIO and flags[7] == AUDIO
    assert not flags[8] & AUDIO                  # kept as text: it would not round-trip
    assert flags[12] == AUDIO and flags[13] == AUDIO | AUDIO_REF
    # audio costs its bytes once: the file is smaller than the base64 of the caller audio twice
    assert p.stat().st_size < len(pcm) * 4 / 3 + 2 * 960 + 3000


@settings(max_examples=40, deadline=None)
@given(st.binary(min_size=6, max_size=3000), st.lists(st.integers(1, 200), min_size=1, max_size=8), st.booleans())
def test_round_trip_random_audio(tmp_path_factory: Any, audio: bytes, cuts: list[int], same: bool) -> None:
    """Any audio, split into pieces as the bridge splits deltas (6-byte multiples), reads back."""
    frames: list[tuple[int, int, str | bytes]] = [(OPENAI_IN, 0, delta_in(audio))]
    pos, t = 0, 1
    for c in cuts:
        piece = audio[pos:pos + 6 * c] if same else bytes(reversed(audio[pos:pos + 6 * c]))
        if not piece:
            break
        frames.append((VAIC_OUT, t, play_chunk(piece)))
        frames.append((VAIC_IN, t, chunk_in(piece)))
        frames.append((OPENAI_OUT, t, append_out(piece)))
        pos += 6 * c
        t += 1
    p = tmp_path_factory.mktemp("rt") / "r.vbrec"
    write_file(p, frames)
    assert [r.frame() for r in read_recording(p).records] == [f for _, _, f in frames]


def test_round_trip_chunks_of_older_deltas(tmp_path: Path) -> None:
    """The bridge plays a delta's audio after later deltas came in: the reference goes back."""
    deltas = [os.urandom(4800) for _ in range(3)]
    frames: list[tuple[int, int, str | bytes]] = [(OPENAI_IN, i, delta_in(d)) for i, d in enumerate(deltas)]
    frames += [(VAIC_OUT, 10 + i, play_chunk(d[1200:3600])) for i, d in enumerate(deltas)]
    p = tmp_path / "d.vbrec"
    write_file(p, frames)
    got = read_recording(p).records
    assert [r.frame() for r in got] == [f for _, _, f in frames]
    assert all(r.flags & AUDIO_REF for r in got[3:])
    assert p.stat().st_size < 3 * 4800 + 2000      # the played audio is not stored again


def test_cut_short_file_reads_its_whole_records(tmp_path: Path) -> None:
    p = tmp_path / "cut.vbrec"
    write_file(p, [(VAIC_IN, i, chunk_in(bytes([i]) * 960)) for i in range(5)])
    data = p.read_bytes()
    p.write_bytes(data[:-100])
    got = read_recording(p)
    assert not got.complete and len(got.records) == 4
    p.write_bytes(b"not a recording at all")
    with pytest.raises(rec_mod.RecordingError):
        read_recording(p)


def test_split_audio_only_for_audio_frames() -> None:
    assert split_audio(b'{"type":"session.update","audio":"AAAA"}') is None
    assert split_audio(b'{"type":"response.output_audio_transcript.delta","delta":"AAAA"}') is None
    text, off, audio = split_audio(delta_in(b"\x00\x01\x02").encode()) or (b"", 0, b"")
    assert audio == b"\x00\x01\x02" and text[:off].endswith(b'"delta":"')


def test_scrub_replaces_secret_looking_values() -> None:
    frame = (b'{"type":"session.created","session":{"client_secret":{"value":"ek_live_123"},'
             b'"usage":{"input_tokens":5},"Authorization":"Bearer sk-abc","items":[{"api_key":"k"}]}}')
    out, flags = scrub(frame)
    assert flags == REDACTED
    for secret in (b"ek_live_123", b"sk-abc", b'"k"'):
        assert secret not in out
    assert json.loads(out)["session"]["usage"] == {"input_tokens": 5}
    assert scrub(b'{"type":"response.done","usage":{"total_tokens":9}}') == (
        b'{"type":"response.done","usage":{"total_tokens":9}}', 0)
    out, flags = scrub(b'not json "password": 1')
    assert flags == REDACTED and b"password\": 1" not in out


# ------------------------------------------------------------------------------------ retention


def test_sweep_deletes_only_old_recordings(tmp_path: Path) -> None:
    now = time.time()
    old, new, other = tmp_path / "old.vbrec", tmp_path / "new.vbrec", tmp_path / "notes.txt"
    for p in (old, new, other):
        p.write_bytes(b"x")
    os.utime(old, (now - 8 * 86400, now - 8 * 86400))
    os.utime(other, (now - 30 * 86400, now - 30 * 86400))
    link = tmp_path / "link.vbrec"
    link.symlink_to(other)
    os.utime(link, (now - 30 * 86400, now - 30 * 86400), follow_symlinks=False)
    assert sweep(tmp_path, 7 * 86400, now) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.vbrec", "new.vbrec", "notes.txt"]


async def test_configure_creates_the_dir_0700_and_sweeps_at_start(tmp_path: Path) -> None:
    d = tmp_path / "recs"
    svc = RecordingService()
    assert svc.configure(RecordingConfig(dir=str(d), retention_days=1))
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
    stale = d / "stale.vbrec"
    stale.write_bytes(b"x")
    os.utime(stale, (time.time() - 2 * 86400,) * 2)
    svc2 = RecordingService()                      # a restart: the check runs at configure
    assert svc2.configure(RecordingConfig(dir=str(d), retention_days=1))
    assert await svc2.drain(5.0)
    assert not stale.exists()


def test_configure_refuses_an_unusable_dir(tmp_path: Path, logs: Any) -> None:
    f = tmp_path / "file"
    f.write_bytes(b"")
    assert not RecordingService().configure(RecordingConfig(dir=str(f)))
    assert logs.events("recording.dir_failed")


# ------------------------------------------------------------------------------------ per call


class Owner:
    def __init__(self) -> None:
        self.rec: CallRecorder | None = None


def session(record: bool = True, final: bool = True, call_id: str = "call-1") -> SimpleNamespace:
    return SimpleNamespace(profile=SimpleNamespace(name="sales", record=record), profile_final=final,
                           call_id=call_id, end_reason="vaic_session_end")


def recorder(tmp_path: Path, sess: Any, **rc: Any) -> tuple[CallRecorder, Owner, RecordingService]:
    svc = RecordingService()
    cfg = RecordingConfig(dir=str(tmp_path), **rc)
    assert svc.configure(cfg)
    owner = Owner()
    owner.rec = CallRecorder(owner, cfg, sess, svc, time.monotonic_ns())
    return owner.rec, owner, svc


def files(d: Path) -> list[Path]:
    return sorted(d.glob("*.vbrec"))


async def test_a_recorded_call_file_is_0600_with_every_frame(tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        r, owner, svc = recorder(tmp_path, session())
        t = time.monotonic_ns()
        r.vaic_in('{"type":"session.initiate","conversationId":"call-1"}', t)
        r.sent(['{"type":"session.accepted"}'], vaic=True)
        for i in range(200):
            r.vaic_in(chunk_in(bytes([i % 256]) * 960), t + i)
            r.openai_out(append_out(bytes([i % 256]) * 960), t + i)
        r.openai_in(delta_in(bytes(4800)), t + 500)
        r.sent([play_chunk(bytes(2400)), play_chunk(bytes(2400))], vaic=True)
        r.close("vaic_session_end")
        assert owner.rec is None
        assert await svc.drain(5.0)
    finally:
        os.umask(old)
    [p] = files(tmp_path)
    assert stat.S_IMODE(p.stat().st_mode) == 0o600
    assert "call-1" in p.name
    got = read_recording(p)
    assert got.header["call_id"] == "call-1" and got.header["profile"] == "sales"
    assert len(got.records) == 2 + 400 + 3 + 1
    assert [r.kind for r in got.records[:2]] == [VAIC_IN, VAIC_OUT]
    assert json.loads(got.records[-1].text) == {"event": "recording.end", "reason": "vaic_session_end"}


async def test_profile_not_final_prebuffers_then_records(tmp_path: Path) -> None:
    sess = session(final=False)
    r, owner, svc = recorder(tmp_path, sess)
    t = time.monotonic_ns()
    r.vaic_in('{"type":"session.initiate"}', t)
    for i in range(20):
        r.vaic_in(chunk_in(bytes(960)), t + i)
    r._tick()                                  # not final yet: nothing decided, nothing written
    assert r.state == rec_mod.PENDING and owner.rec is r
    assert await svc.drain(5.0) and files(tmp_path) == []
    sess.profile_final = True                  # the start activity chose the profile
    r._tick()
    assert r.state == rec_mod.RECORDING
    r.close("x")
    assert await svc.drain(5.0)
    [p] = files(tmp_path)
    assert len(read_recording(p).records) == 21 + 1     # the early frames are in the file


async def test_profile_without_record_drops_the_prebuffer(tmp_path: Path) -> None:
    sess = session(record=False, final=False)
    r, owner, svc = recorder(tmp_path, sess)
    r.vaic_in('{"type":"session.initiate"}', time.monotonic_ns())
    sess.profile_final = True
    r._tick()
    assert r.state == rec_mod.STOPPED and owner.rec is None     # no cost for the rest of the call
    r.close("x")
    assert await svc.drain(5.0) and files(tmp_path) == []


async def test_record_all_overrides_the_profile(tmp_path: Path) -> None:
    r, owner, svc = recorder(tmp_path, session(record=False), record_all=True)
    r.vaic_in('{"type":"session.initiate"}', time.monotonic_ns())
    r.close("x")
    assert await svc.drain(5.0) and len(files(tmp_path)) == 1


async def test_prebuffer_full_before_the_profile_is_final_stops(tmp_path: Path, logs: Any) -> None:
    r, owner, svc = recorder(tmp_path, session(final=False))
    frame = chunk_in(bytes(48_000))
    for _ in range(rec_mod.PREBUFFER_BYTES // len(frame) + 2):
        r.vaic_in(frame, time.monotonic_ns())
    assert r.state == rec_mod.STOPPED and r.stop_reason == "prebuffer_full" and owner.rec is None
    assert [e["reason"] for e in logs.events("recording.stopped")] == ["prebuffer_full"]
    r.close("x")
    assert await svc.drain(5.0) and files(tmp_path) == []


@pytest.mark.parametrize("reason", ["validate", "handed_over"])
async def test_no_file_for_a_connection_check_or_a_handed_over_socket(tmp_path: Path, reason: str) -> None:
    sess = session(final=False)
    sess.end_reason = reason
    r, owner, svc = recorder(tmp_path, sess)
    r.vaic_in('{"type":"connection.validate"}', time.monotonic_ns())
    r.close(reason)
    assert await svc.drain(5.0) and files(tmp_path) == [] and owner.rec is None


async def test_max_bytes_per_call_closes_the_file_at_the_bound(tmp_path: Path, logs: Any) -> None:
    limit = 1024 * 1024
    r, owner, svc = recorder(tmp_path, session(), max_bytes_per_call=limit)
    rnd = os.urandom(4800 * 64)
    t = time.monotonic_ns()
    i = 0
    while owner.rec is not None and i < 2000:      # 2000 * 4.8 kB: far past the bound
        r.vaic_in(chunk_in(rnd[(i % 64) * 4800:(i % 64 + 1) * 4800]), t + i)
        i += 1
        if i % 50 == 0:
            assert await svc.drain(5.0)
            await asyncio.sleep(0)                 # the writer's stop reaches the loop
    assert owner.rec is None and r.stop_reason == "max_bytes_per_call"
    r.close("x")
    assert await svc.drain(5.0)
    [p] = files(tmp_path)
    assert limit - 10_000 < p.stat().st_size <= limit
    got = read_recording(p)
    assert got.complete
    assert json.loads(got.records[-1].text)["reason"] == "max_bytes_per_call"
    assert [e["reason"] for e in logs.events("recording.stopped")] == ["max_bytes_per_call"]


def test_writer_backlog_is_bounded() -> None:
    svc = RecordingService()
    assert svc.submit(("barrier", None), rec_mod.MAX_INFLIGHT_BYTES)
    assert not svc.submit(("barrier", None), 1)
    svc.written_bytes += rec_mod.MAX_INFLIGHT_BYTES
    assert svc.submit(("barrier", None), 1)


def test_config_validation() -> None:
    env = {"VOICEBRIDGE_TOKEN": "t"}
    cfg, _ = load_config(None, env=env)
    assert cfg.recording.dir == "" and cfg.recording.retention_days == 7
    for over, key in (({"dir": "relative/dir"}, "recording.dir"),
                      ({"dir": "/x", "retention_days": 0}, "recording.retention_days"),
                      ({"dir": "/x", "max_bytes_per_call": 1000}, "recording.max_bytes_per_call"),
                      ({"record_all": True}, "recording.record_all")):
        with pytest.raises(ConfigError, match=key):
            load_config(None, env=env, overrides={"recording": over})
    cfg, _ = load_config(None, env={**env, "VOICEBRIDGE_RECORDING_DIR": "/srv/rec",
                                    "VOICEBRIDGE_RECORDING_RECORD_ALL": "true"})
    assert cfg.recording.dir == "/srv/rec" and cfg.recording.record_all


def test_off_means_no_recorder() -> None:
    cfg, _ = load_config(None, env={"VOICEBRIDGE_TOKEN": "t"})
    assert rec_mod.for_call(Owner(), cfg, session()) is None


# ------------------------------------------------------------------------------------ a real call


async def test_a_bridged_call_is_recorded_without_secrets(tmp_path: Path) -> None:
    fake = FakeRealtimeServer(FakeOpenAIConfig(api_key=API_KEY, think_ms=50, delta_interval_ms=10,
                                               reply_ms=[2500, 600], greeting_ms=600))
    await fake.start()
    cfg = bridge_config(fake, recording={"dir": str(tmp_path), "record_all": True},
                        openai={"greeting": "Say hello."})
    bridge = Bridge(cfg, SECRETS)
    await bridge.start()
    try:
        res = await run_call(CallerConfig(
            url=f"ws://127.0.0.1:{bridge.port}{cfg.server.path}", token=TOKEN, formats=["raw/lpcm16_24"],
            script=[WaitForBot(4000), Speak(600), BargeIn(after_heard_ms=600, ms=600), WaitForBot(4000),
                    Silence(200)]))
        await fake.wait_closed_all(3.0)
    finally:
        await bridge.stop()
        await fake.stop()
    assert res.end_reason == "caller-hangup" and not res.violations
    [p] = files(tmp_path)
    raw = p.read_bytes()
    for secret in (TOKEN, API_KEY, "Bearer", "Authorization"):
        assert secret.encode() not in raw
    got = read_recording(p)
    session_ = fake.sessions[0]
    # every frame each way: the fake's appends, the caller's chunks, the bot's chunks
    assert len([r for r in got.records if r.kind == OPENAI_OUT and b"input_audio_buffer.append" in r.text]) \
        == len(session_.received_of("input_audio_buffer.append"))
    assert len([r for r in got.records if r.kind == VAIC_IN and b"userStream.chunk" in r.text]) == res.chunks_sent
    assert len([r for r in got.records if r.kind == VAIC_OUT and b"playStream.chunk" in r.text]) \
        == res.chunks_received
    # what the fake received is what the file says was sent, byte for byte (appends in order)
    sent = [json.loads(r.frame())["audio"] for r in got.records
            if r.kind == OPENAI_OUT and b"input_audio_buffer.append" in r.text]
    assert sent == [e["audio"] for e in session_.received_of("input_audio_buffer.append")]
    ev = summarize(timeline(got))
    assert ev["barge_ins"] == 1 and ev["truncates"] == 1 and ev["play_streams"] == 3
    assert ev["caller_turns"] == 2 and ev["responses"] == 3


# ------------------------------------------------------------------------------------ timeline


def synthetic(tmp_path: Path) -> Path:
    """A made-up call: greeting, a turn, a barge-in with truncate, an end_call tool, hangup."""
    o = 1_000_000
    s = '{"type":"session.update","session":{"audio":{"output":{"format":{"type":"audio/pcm","rate":24000}}}}}'
    frames: list[tuple[int, int, str | bytes]] = [
        (VAIC_IN, 0, '{"type":"session.initiate","conversationId":"c1","supportedMediaFormats":["raw/lpcm16_24"]}'),
        (VAIC_OUT, 1 * o, '{"type":"session.accepted","mediaFormat":"raw/lpcm16_24"}'),
        (OPENAI_OUT, 2 * o, s),
        (OPENAI_OUT, 3 * o, '{"type":"response.create","response":{"instructions":"Greet."}}'),
        (OPENAI_IN, 100 * o, '{"type":"response.created","response":{"id":"r1"}}'),
        (OPENAI_IN, 101 * o, delta_in(bytes(48 * 500), "r1")),
        (OPENAI_IN, 102 * o, '{"type":"response.done","response":{"id":"r1","status":"completed","output":[]}}'),
        (VAIC_OUT, 110 * o, '{"type":"playStream.start","streamId":"1","mediaFormat":"raw/lpcm16_24"}'),
        (VAIC_OUT, 111 * o, play_chunk(bytes(48 * 500))),
        (VAIC_OUT, 700 * o, '{"type":"playStream.stop","streamId":"1"}'),
        (VAIC_OUT, 1000 * o, '{"type":"userStream.speech.started"}'),
        (OPENAI_IN, 1000 * o, '{"type":"input_audio_buffer.speech_started"}'),
        (OPENAI_IN, 1500 * o, '{"type":"input_audio_buffer.speech_stopped"}'),
        (OPENAI_IN, 1700 * o, '{"type":"response.created","response":{"id":"r2"}}'),
        (OPENAI_IN, 1701 * o, delta_in(bytes(48 * 2000), "r2")),
        (VAIC_OUT, 1710 * o, '{"type":"playStream.start","streamId":"2","mediaFormat":"raw/lpcm16_24"}'),
        (VAIC_OUT, 1711 * o, play_chunk(bytes(48 * 1000))),
        (VAIC_OUT, 2300 * o, '{"type":"userStream.speech.started"}'),
        (VAIC_OUT, 2300 * o, '{"type":"playStream.stop","streamId":"2"}'),
        (OPENAI_OUT, 2300 * o, '{"type":"conversation.item.truncate","item_id":"i1","content_index":0,"audio_end_ms":590}'),
        (OPENAI_IN, 2301 * o, '{"type":"response.done","response":{"id":"r2","status":"cancelled","output":[]}}'),
        (OPENAI_IN, 2800 * o, '{"type":"response.created","response":{"id":"r3"}}'),
        (OPENAI_IN, 2801 * o, '{"type":"response.output_item.done","response_id":"r3","item":'
                              '{"type":"function_call","name":"end_call","arguments":"{}","call_id":"k"}}'),
        (OPENAI_IN, 2802 * o, '{"type":"response.output_item.done","response_id":"r3","item":'
                              '{"type":"function_call","name":"lookup_order","arguments":"{}","call_id":"k2"}}'),
        (OPENAI_IN, 2803 * o, '{"type":"response.done","response":{"id":"r3","status":"completed",'
                              '"output":[{"type":"function_call"},{"type":"function_call"}]}}'),
        (OPENAI_OUT, 2810 * o, '{"type":"conversation.item.create","item":{"type":"function_call_output",'
                               '"call_id":"k","output":"{\\"ok\\":true}"}}'),
        (VAIC_OUT, 2900 * o, '{"type":"activities","activities":[{"type":"event","name":"hangup",'
                             '"activityParams":{"hangupReason":"agent-ended"}}]}'),
        (VAIC_IN, 2950 * o, '{"type":"session.end","conversationId":"c1","reasonCode":"client-disconnected"}'),
        (NOTE, 2951 * o, b'{"event":"recording.end","reason":"vaic_session_end"}'),
    ]
    p = tmp_path / "syn.vbrec"
    write_file(p, frames)
    return p


def test_timeline_of_a_synthetic_call(tmp_path: Path) -> None:
    got = read_recording(synthetic(tmp_path))
    ev = timeline(got)
    keys = [e.key for e in ev]
    assert keys == ["call.initiate", "call.accepted", "model.response", "play.start", "play.stop",
                    "caller.speech", "play.start", "barge-in", "play.stop", "truncate", "model.response",
                    "tool.call", "tool.call", "model.response", "tool.output", "bot.hangup", "call.end",
                    "recording.end"]
    stop = next(e for e in ev if e.key == "play.stop")
    assert stop.detail.startswith("#1 500 ms audio") and stop.t_ms == 700
    assert next(e for e in ev if e.key == "barge-in").detail == "during play #2 (1000 ms sent)"
    assert "cancelled 2000 ms" in [e.detail for e in ev if e.key == "model.response"][1]
    c = summarize(ev)
    assert (c["caller_turns"], c["barge_ins"], c["play_streams"], c["truncates"], c["tool_calls"],
            c["bot_activities"], c["responses"], c["responses_cancelled"], c["play_audio_ms"]) == \
        (2, 1, 2, 1, 2, 1, 3, 1, 1500)
    vaic = [e.key for e in timeline(got, vaic_only=True)]
    assert "truncate" not in vaic and "model.response" not in vaic and "barge-in" in vaic


def test_fake_config_from_a_recording(tmp_path: Path) -> None:
    plan = fake_config_for(read_recording(synthetic(tmp_path)))
    cfg = plan.config
    assert cfg["greeting_ms"] == 500 and cfg["greeting_text"] == "(recorded answer 1)"
    # the cut answer gets more than it sent; the tool-only answer keeps its call tool, not the webhook
    assert cfg["reply_ms"] == [3000, 0]
    assert cfg["replies"][1].endswith("@@end_call {}") and "lookup_order" not in cfg["replies"][1]
    assert plan.skipped_calls == ["lookup_order"] and cfg["think_ms"] == 200
    assert "@@lookup_order {}" in fake_config_for(read_recording(synthetic(tmp_path)), all_tools=True).config["replies"][1]
    FakeOpenAIConfig(**cfg)                           # the fake takes them


def test_side_by_side_aligns_on_kinds(tmp_path: Path) -> None:
    a = timeline(read_recording(synthetic(tmp_path)))
    b = [e for e in a if e.key != "truncate"]
    text = side_by_side(a, b)
    lines = text.splitlines()
    assert len(lines) == 2 + len(a)
    trunc = next(line for line in lines if "truncate" in line)
    left, right, off = trunc.split(" | ")
    assert "truncate" in left and right.strip() == "" and off.strip() == ""
    assert all(line.rstrip().endswith("+0 ms") for line in lines[2:] if "truncate" not in line)


# ------------------------------------------------------------------------------------ replay plan


def test_replay_plan_gates_and_ids(tmp_path: Path) -> None:
    from voicebridge.replay import plan
    from voicebridge.timeline import bridge_overrides_for
    p = synthetic(tmp_path)
    rec = read_recording(p)
    steps, cid = plan(rec, "replay-1")
    assert cid == "replay-1" and all('"c1"' not in s.text for s in steps)
    assert [s.what for s in steps] == ["send", "send"]
    init, end = steps
    assert init.gate == ("session.accepted", "session.error") and init.gate_t_ns == 1_000_000
    assert end.after == ("activity:hangup", 2900 * 1_000_000)     # VAIC's answer to our hangup
    over = bridge_overrides_for(rec)
    assert over == {"openai": {"greeting": "Greet."}}
    kept, old = plan(rec, None)
    assert old == "c1" and '"c1"' in kept[0].text


def test_replay_plan_drop_and_resume(tmp_path: Path) -> None:
    from voicebridge.replay import plan
    o = 1_000_000
    p = tmp_path / "resume.vbrec"
    write_file(p, [
        (VAIC_IN, 0, '{"type":"session.initiate","conversationId":"c9"}'),
        (VAIC_OUT, 1 * o, '{"type":"session.accepted","mediaFormat":"raw/mulaw"}'),
        (VAIC_IN, 2 * o, chunk_in(bytes(160), "c9")),
        (NOTE, 500 * o, b'{"event":"vaic_closed","code":1006}'),
        (NOTE, 900 * o, b'{"event":"vaic_attached"}'),
        (VAIC_OUT, 901 * o, '{"type":"session.accepted","mediaFormat":"raw/mulaw"}'),
        (VAIC_IN, 902 * o, '{"type":"userStream.start","conversationId":"c9"}'),
        (VAIC_OUT, 903 * o, '{"type":"userStream.started"}'),
    ])
    steps, cid = plan(read_recording(p), "new")
    assert [s.what for s in steps] == ["send", "send", "drop", "resume", "send"]
    resume = steps[3]
    assert json.loads(resume.text) == {"type": "session.resume", "conversationId": "new"}
    assert resume.gate_t_ns == 901 * o and steps[4].gate_t_ns == 903 * o
    assert json.loads(steps[1].text)["conversationId"] == "new"


def test_bridge_overrides_carry_the_call_tools(tmp_path: Path) -> None:
    from voicebridge.timeline import bridge_overrides_for
    tools = [{"type": "function", "name": "end_call"}, {"type": "function", "name": "lookup_order"},
             {"type": "function", "name": "transfer_call",
              "parameters": {"properties": {"target": {"type": "string", "enum": ["sales", "support"]}}}}]
    upd = {"type": "session.update", "session": {"tools": tools, "audio": {"input": {"turn_detection": {
        "type": "semantic_vad", "eagerness": "low", "create_response": True, "unknown": 1}}}}}
    p = tmp_path / "t.vbrec"
    write_file(p, [(OPENAI_OUT, 0, json.dumps(upd))])
    over = bridge_overrides_for(read_recording(p))
    assert over["openai"] == {"vad": {"type": "semantic_vad", "eagerness": "low", "create_response": True}}
    assert over["profiles"]["default"]["tools"] == ["end_call", "transfer_call"]
    assert set(over["profiles"]["default"]["transfer_targets"]) == {"sales", "support"}
    cfg, _ = load_config(None, env={"VOICEBRIDGE_TOKEN": "t"}, overrides=over)   # the bridge takes them
    assert cfg.profiles["default"].tools == ["end_call", "transfer_call"]
