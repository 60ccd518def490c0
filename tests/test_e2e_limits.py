"""Per-connection bounds on both transports, in-process (the daemon-level attack tests in
test_hardening.py run the default transport): a peer that never reads its pongs, fragment
floods, unread big frames, pipelined upgrades, the call cap, and what the call logs as its end."""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.conftest import TOKEN, fast_fake, running, wait_for
from tests.rawws import OP_CLOSE, OP_CONT, OP_PING, OP_TEXT, RawWs, frame, text, upgrade_request
from voicebridge.sim.caller import CallerConfig, Silence, Speak, WaitForBot, run_call

pytestmark = pytest.mark.usefixtures("both_transports")

INIT = json.dumps({"type": "session.initiate", "conversationId": "lim-1", "botName": "b",
                   "caller": "+1", "expectAudioMessages": True,
                   "supportedMediaFormats": ["raw/lpcm16_24"]})


async def _open(bridge) -> RawWs:
    ws = await RawWs.open("127.0.0.1", bridge.port, bridge.cfg.server.path, TOKEN)
    assert ws.status == 101
    return ws


async def test_peer_that_never_reads_its_pongs_is_dropped(logs):
    """Attack A: pings in batches, never reading: the unsent pongs stay bounded, then the socket
    is aborted; a clean call beside it is unaffected."""
    async with running(server={"send_buffer_bytes": 65536, "send_timeout_s": 1.0}) as (fake, bridge):
        ws = await _open(bridge)
        ws.send(text(INIT))
        await ws.read_frames(0.3)                 # session.accepted; from now on read nothing
        ws.stop_reading()
        ping = frame(OP_PING, b"p" * 125)
        clean = asyncio.create_task(run_call(CallerConfig(
            url=f"ws://127.0.0.1:{bridge.port}{bridge.cfg.server.path}", token=TOKEN,
            script=[Speak(400), WaitForBot(3000), Silence(100)])))
        closed = False
        for _ in range(400):                      # at most ~20 MB of pings; never read a byte
            ws.send(ping * 400)
            try:
                await ws.drain(0.05)
            except (asyncio.TimeoutError, TimeoutError, ConnectionError):
                pass
            if ws.writer.transport.is_closing() or ws.reader.at_eof():
                closed = True
                break
            await asyncio.sleep(0.01)
        res = await asyncio.wait_for(clean, 15)
        assert await wait_for(lambda: len(bridge.calls) == 0, 5.0)
        ws.abort()
    assert res.end_reason == "caller-hangup" and res.violations == [] and len(res.streams) == 1
    ends = {e["call_id"]: e for e in logs.events("call.end")}
    # the ping cap (1008, 64/s) usually closes it before the unsent pongs pass the send bound
    assert ends["lim-1"]["reason"] in ("vaic_protocol_error", "vaic_not_reading"), ends["lim-1"]
    assert closed or ends["lim-1"]


async def test_fragment_flood_is_closed_with_1009(logs):
    """Attack B: one text fragment, then empty continuation frames by the thousand."""
    async with running(server={"max_fragments": 64}) as (fake, bridge):
        ws = await _open(bridge)
        ws.send(text(INIT))
        ws.send(frame(OP_TEXT, b"{", fin=False) + frame(OP_CONT, b"", fin=False) * 5000)
        frames = await ws.read_frames(5.0)
        ws.abort()
        assert await wait_for(lambda: not bridge.calls, 5.0)
    closes = [p for op, p in frames if op == OP_CLOSE]
    assert closes and int.from_bytes(closes[0][:2], "big") == 1009
    [end] = logs.events("call.end")
    assert end["reason"] == "vaic_frame_too_big" and end["detail"] == "code=1009"


async def test_unread_big_frames_pause_the_socket(logs):
    """Attack D: big frames the call cannot keep up with stay bounded in bytes: the socket is
    not read past `server.recv_queue_bytes`, and the call ends normally afterwards."""
    big = json.dumps({"type": "weird.big", "pad": "x" * 900_000})
    async with running(server={"recv_queue_bytes": 2_000_000}) as (fake, bridge):
        ws = await _open(bridge)
        ws.send(text(INIT))
        payload = text(big) * 20                   # 18 MB
        ws.send(payload)
        await asyncio.sleep(0.5)
        [call] = bridge.calls
        ep = call.ac
        queued = getattr(ep, "_queued_bytes", None)
        if queued is not None:                     # the lean transport: bytes are observable
            assert queued <= 2_000_000 + 1_000_000
        ws.send(text(json.dumps({"type": "session.end", "conversationId": "lim-1"})))
        assert await wait_for(lambda: not bridge.calls, 10.0)
        ws.abort()
    [end] = logs.events("call.end")
    assert end["reason"] == "vaic_session_end"


async def test_pipelined_upgrades_get_a_400_and_no_traceback(logs):
    """Attack I: two upgrade requests in one segment."""
    async with running() as (fake, bridge):
        ws = await RawWs.connect("127.0.0.1", bridge.port)
        req = upgrade_request(bridge.cfg.server.path, "x", TOKEN)
        ws.send(req + req)
        assert await ws.read_head(3.0) == 400
        assert await ws.closed_by_peer(3.0)
        assert not bridge.calls and fake.sessions == []
    assert all(e["level"] != "error" for e in logs.events())


async def test_max_calls_gets_503_before_the_upgrade(logs):
    async with running(server={"max_calls": 2}) as (fake, bridge):
        held = [await _open(bridge) for _ in range(2)]
        for ws in held:
            ws.send(text(INIT))
        extra = await RawWs.open("127.0.0.1", bridge.port, bridge.cfg.server.path, TOKEN)
        assert extra.status == 503 and b"Retry-After: 1" in extra.head
        for ws in held:
            ws.abort()
        assert await wait_for(lambda: not bridge.calls, 5.0)
        again = await RawWs.open("127.0.0.1", bridge.port, bridge.cfg.server.path, TOKEN)
        assert again.status == 101                 # capacity is given back
        again.abort()
        assert bridge.stats.calls_refused == 1
    assert logs.events("conn.refused")[0]["reason"] == "max_calls"


async def test_injection_from_the_upstream_never_reaches_vaic(logs):
    """Attack K: a delta whose "base64" closes the JSON string and adds a transfer activity."""
    evil = 'AAAA","type":"activities","activities":[{"type":"event","name":"transfer"}],"x":"'
    async with running(fast_fake(bad_delta=evil)) as (fake, bridge):
        res = await run_call(CallerConfig(
            url=f"ws://127.0.0.1:{bridge.port}{bridge.cfg.server.path}", token=TOKEN,
            script=[Speak(400), WaitForBot(3000), Silence(200)]))
    assert res.end_reason == "caller-hangup"
    assert not any(a.get("name") == "transfer" for a in res.received_activities)
    assert logs.events("call.openai_bad_audio")


async def test_slowloris_cannot_lock_out_a_real_call(logs):
    """Attack F: more half-finished handshakes than the cap: the oldest are dropped, and a real
    call (which sends its request at once) still gets through."""
    async with running(server={"max_pending_handshakes": 20, "handshake_timeout_s": 30}) as (fake, bridge):
        slow = []
        for _ in range(60):
            ws = await RawWs.connect("127.0.0.1", bridge.port)
            ws.send(b"GET /voicebridge HTTP/1.1\r\nHost: x\r\n")      # and never the rest
            slow.append(ws)
        await asyncio.sleep(0.2)
        res = await run_call(CallerConfig(
            url=f"ws://127.0.0.1:{bridge.port}{bridge.cfg.server.path}", token=TOKEN,
            script=[Speak(400), WaitForBot(3000), Silence(100)]))
        dropped = sum([await ws.closed_by_peer(0.05) for ws in slow])
        for ws in slow:
            ws.abort()
    assert res.end_reason == "caller-hangup" and res.violations == [] and len(res.streams) == 1
    assert dropped >= 40                       # at most 20 were ever held
    assert logs.events("conn.refused")[0]["reason"] == "max_pending_handshakes"


async def test_oversized_head_in_one_write_and_duplicate_auth_are_refused(logs):
    """A request head over 16 KiB arriving in one piece gets 400; two Authorization headers
    are a wrong token (401), never a 500."""
    async with running() as (fake, bridge):
        ws = await RawWs.connect("127.0.0.1", bridge.port)
        ws.send(upgrade_request(bridge.cfg.server.path, "x", TOKEN, [("X-Pad", "p" * 40_000)]))
        assert await ws.read_head(3.0) == 400
        ws.abort()
        ws = await RawWs.connect("127.0.0.1", bridge.port)
        ws.send(upgrade_request(bridge.cfg.server.path, "x", TOKEN, [("Authorization", "Bearer x")]))
        assert await ws.read_head(3.0) == 401
        ws.abort()
        assert fake.sessions == [] and bridge.stats.auth_rejected == 1


async def test_waiting_calls_count_at_initiate_so_max_calls_bounds_openai_sessions(logs):
    """max_calls 1: a dropped call waiting for its resume keeps its slot. Another call is
    declined at session.initiate (no dial), and the waiting call's resume still gets in."""
    async with running(server={"max_calls": 1}, call={"resume_grace_s": 5.0}) as (fake, bridge):
        a = await _open(bridge)
        a.send(text(INIT))
        assert await wait_for(lambda: len(fake.sessions) == 1, 3.0)
        a.abort()                                            # waiting for its resume now
        assert await wait_for(lambda: any(c.waiting_for_resume for c in bridge.calls), 3.0)
        b = await _open(bridge)
        b.send(text(INIT.replace("lim-1", "lim-2")))
        frames = await b.read_frames(2.0)
        assert any(b'"session.error"' in p and b"capacity" in p for _, p in frames), frames
        b.abort()
        assert await wait_for(lambda: len(bridge.calls) == 1, 3.0)   # the declined one is gone
        r = await _open(bridge)
        r.send(text(json.dumps({"type": "session.resume", "conversationId": "lim-1"})))
        frames = await r.read_frames(2.0)
        assert any(b'"session.accepted"' in p for _, p in frames), frames
        assert len(fake.sessions) == 1                       # never two OpenAI sessions
        r.send(text(json.dumps({"type": "session.end", "conversationId": "lim-1"})))
        assert await wait_for(lambda: not bridge.calls, 5.0)
        r.abort()


_FLOOD = """
import asyncio, json, sys
sys.path.insert(0, {root!r})
from tests.rawws import OP_PING, OP_TEXT, RawWs, frame, text
async def main():
    ws = await RawWs.open("127.0.0.1", {port}, {path!r}, {token!r})
    ws.send(text(json.dumps({{"type": "session.initiate", "conversationId": "flood",
                             "expectAudioMessages": True, "supportedMediaFormats": ["raw/lpcm16_24"]}})))
    await asyncio.sleep(0.3)
    f = frame({op}, b"", key=b"\\0\\0\\0\\0")
    ws.send(f * (4 * 1024 * 1024 // len(f)))            # 4 MiB of empty frames at once
    for _ in range(40):                                  # read (so send bounds do not fire)
        try:
            if not await asyncio.wait_for(ws.reader.read(1 << 20), 0.1):
                break
        except (asyncio.TimeoutError, TimeoutError):
            pass
        except ConnectionError:
            break
asyncio.run(main())
"""


@pytest.mark.parametrize("kind", ["ping", "text"])
async def test_a_flood_of_tiny_frames_does_not_stall_the_loop(kind, logs):
    """Review finding: one 256 KB read of empty frames is ~40 000 frames; parsed in one go it
    held the loop for seconds (4.8 s with pings). Reads are parsed in slices, and pings are
    capped (close 1008): the loop keeps answering (generous bound: 1 s) and a clean call works."""
    import sys
    from pathlib import Path
    async with running() as (fake, bridge):
        lags: list[float] = []
        loop = asyncio.get_running_loop()

        async def monitor() -> None:
            while True:
                t = loop.time()
                await asyncio.sleep(0.01)
                lags.append(loop.time() - t - 0.01)

        mon = asyncio.create_task(monitor())
        code = _FLOOD.format(root=str(Path(__file__).resolve().parent.parent), port=bridge.port,
                             path=bridge.cfg.server.path, token=TOKEN,
                             op="OP_PING" if kind == "ping" else "OP_TEXT")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code)
        clean = asyncio.create_task(run_call(CallerConfig(
            url=f"ws://127.0.0.1:{bridge.port}{bridge.cfg.server.path}", token=TOKEN,
            script=[Speak(400), WaitForBot(3000), Silence(100)])))
        await asyncio.wait_for(proc.wait(), 30)
        res = await asyncio.wait_for(clean, 20)
        mon.cancel()
    assert max(lags) < 1.0, max(lags)
    assert res.end_reason == "caller-hangup" and res.violations == []
    if kind == "ping":
        ends = {e["call_id"]: e for e in logs.events("call.end")}
        assert ends["flood"]["reason"] == "vaic_protocol_error" and ends["flood"]["detail"] == "code=1008"
