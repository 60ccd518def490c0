"""Simulated VoiceAI Connect callers (picows clients): handshake, 20 ms stamped audio, checks.

Per call: `session.initiate` -> `session.accepted`, the `start` activity, `userStream.start` ->
`userStream.started`, then one `userStream.chunk` every 20 ms (sent by `Ticker`, which spreads
the calls over 1 ms slices of the 20 ms period with absolute deadlines), and at the end
`userStream.stop` -> `userStream.stopped`, `session.end`, close.

Receive side: audio frames are never JSON-decoded; the base64 field is found by byte search and
only the 24-character stamp is decoded (bench/stamp.py). In direct mode (no bridge) the fake
upstream's `response.output_audio.delta` stands in for `playStream.chunk` and its
`input_audio_buffer.speech_started` for `playStream.stop`.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import msgspec
from picows import WSListener, WSMsgType, ws_connect

from .gen_state import CallState, Run
from .stamp import check_payload, payload_parts

_json = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()
_perf = time.perf_counter_ns
FORMAT = "raw/lpcm16_24"
_KEY_BRIDGE = b'"audioChunk":"'
_KEY_DIRECT = b'"delta":"'


def conversation_id(idx: int) -> str:
    """The call index is visible in the id (the fake reads it in direct mode)."""
    return f"bench-{idx}-{uuid.uuid4()}"


class CallerListener(WSListener):
    def __init__(self, run: Run, cs: CallState) -> None:
        self.run = run
        self.cs = cs
        self.direct = run.p.mode == "direct"
        self.key = _KEY_DIRECT if self.direct else _KEY_BRIDGE
        self.klen = len(self.key)

    def on_ws_connected(self, tr) -> None:
        self.cs.caller_tr = tr

    def on_ws_disconnected(self, tr) -> None:
        cs = self.cs
        cs.caller_closed = True
        if not cs.ending:
            self.run.error("caller_socket_closed", f"call {cs.idx} closed by the peer mid-call")
        for fut in cs.waiters.values():
            if not fut.done():
                fut.set_exception(ConnectionError("socket closed"))

    def on_ws_frame(self, tr, frame) -> None:
        try:
            self._frame(tr, frame)
        except Exception as e:  # a generator bug must fail the run, not vanish into a log line
            self.run.error("generator_exception", f"caller frame: {type(e).__name__}: {e}")

    def _frame(self, tr, frame) -> None:
        mt = frame.msg_type
        if mt is not WSMsgType.TEXT:
            if mt is WSMsgType.CLOSE:
                if not self.cs.ending:
                    self.run.error("caller_close_frame",
                                   f"call {self.cs.idx}: code {frame.get_close_code()}")
                tr.send_close(frame.get_close_code())
                tr.disconnect()
            return
        if not frame.fin:
            self.run.error("fragmented_frame", f"call {self.cs.idx}")
            return
        buf = frame.get_payload_as_bytes()
        i = buf.find(self.key)
        if i >= 0:
            self._audio(buf, i + self.klen)
        else:
            self._control(buf)

    # -- audio: the bridge's playStream.chunk (or the fake's delta in direct mode)
    def _audio(self, buf: bytes, start: int) -> None:
        now = _perf()
        cs, run = self.cs, self.run
        ok, seq, t = check_payload(buf, start, cs.idx)
        if not ok:
            cs.down.corrupted()
            run.error("down_corrupt", f"call {cs.idx} seq {seq}: payload not byte-exact")
            return
        if not self.direct and not cs.stream_open:
            run.error("chunk_outside_play_stream", f"call {cs.idx} seq {seq}")
        cs.down.received(seq)
        if now - t > run.down_max_ns:
            run.down_max_ns = now - t
        if run.w0 <= t < run.w1:
            run.down_lat.append(now - t)
            run.window_down_frames += 1
            if seq == cs.first_seq:
                run.turn_lat.append(now - t)

    # -- control messages: few per call, decoded with msgspec
    def _control(self, buf: bytes) -> None:
        now = _perf()
        cs, run = self.cs, self.run
        try:
            msg = _json.decode(buf)
            typ = msg["type"]
        except (msgspec.DecodeError, KeyError, TypeError):
            run.error("caller_bad_frame", buf[:120].decode("utf-8", "replace"))
            return
        fut = cs.waiters.pop(typ, None)
        if fut is not None and not fut.done():
            fut.set_result(msg)
        if typ == "playStream.start":
            if cs.stream_open:
                run.error("play_stream_overlap", f"call {cs.idx}: start while a stream is open")
            if msg.get("mediaFormat") != FORMAT:
                run.error("play_stream_format", f"call {cs.idx}: {msg.get('mediaFormat')}")
            cs.stream_open = True
            cs.streams += 1
        elif typ == "playStream.stop" or (self.direct and typ == "input_audio_buffer.speech_started"):
            if not self.direct:
                if not cs.stream_open:
                    run.error("play_stream_stop_without_start", f"call {cs.idx}")
                cs.stream_open = False
            if cs.barge_ns:
                if not self.direct and not cs.barge_speech_seen:
                    run.error("barge_stop_before_speech_started", f"call {cs.idx}")
                if run.w0 <= cs.barge_ns < run.w1:
                    run.barge_lat.append(now - cs.barge_ns)
                # every chunk the bridge forwarded precedes this stop: the rest was dropped
                run.barge_dropped += cs.down.settle(cs.barge_lo, cs.barge_hi)
                cs.barge_ns = 0
                run.barges_stopped += 1
        elif typ == "userStream.speech.started":
            if cs.barge_ns and not cs.barge_speech_seen:
                cs.barge_speech_seen = True
                if run.w0 <= cs.barge_ns < run.w1:
                    run.barge_speech_lat.append(now - cs.barge_ns)
            else:
                run.error("unexpected_speech_started", f"call {cs.idx}")
        elif typ in ("session.accepted", "userStream.started", "userStream.stopped"):
            if typ == "session.accepted" and msg.get("mediaFormat") != FORMAT:
                run.error("accepted_format", f"call {cs.idx}: {msg.get('mediaFormat')}")
        elif typ in ("activities", "session.error"):
            run.error("bridge_ended_call", f"call {cs.idx}: {buf[:200].decode('utf-8', 'replace')}")
        else:
            run.count(f"caller_rx:{typ}")


def _frame(d: dict) -> bytes:
    return _enc.encode(d)


def _expect(cs: CallState, typ: str) -> asyncio.Future:
    """Register (before sending the request) a future for the next message of type `typ`."""
    fut = asyncio.get_running_loop().create_future()
    cs.waiters[typ] = fut
    return fut


async def setup_call(run: Run, cs: CallState, url: str, timeout_s: float = 10.0) -> None:
    """Connect and handshake one caller; raises on any failure (bounded by timeout_s)."""
    p = run.p
    headers = {"Authorization": f"Bearer {p.token}"}
    tr, lst = await asyncio.wait_for(
        ws_connect(lambda: CallerListener(run, cs), url, extra_headers=headers,
                   websocket_handshake_timeout=timeout_s, max_frame_size=4 * 2**20),
        timeout_s)
    cs.caller_tr, cs.caller = tr, lst
    accepted = _expect(cs, "session.accepted")
    tr.send(WSMsgType.TEXT, _frame({
        "type": "session.initiate", "conversationId": cs.conv_id, "botName": "bench",
        "caller": f"+1555{cs.idx:07d}", "expectAudioMessages": True,
        "supportedMediaFormats": [FORMAT]}))
    await asyncio.wait_for(accepted, timeout_s)
    tr.send(WSMsgType.TEXT, _frame({
        "type": "activities", "conversationId": cs.conv_id, "activities": [{
            "type": "event", "name": "start", "id": str(uuid.uuid4()),
            "timestamp": "2026-01-01T00:00:00.000Z", "language": "en-US",
            "parameters": {"caller": f"+1555{cs.idx:07d}", "callee": "+15550000000",
                           "callerHost": "127.0.0.1", "calleeHost": "127.0.0.1",
                           "vaigConversationId": cs.conv_id}}]}))
    started = _expect(cs, "userStream.started")
    tr.send(WSMsgType.TEXT, _frame({"type": "userStream.start", "conversationId": cs.conv_id}))
    await asyncio.wait_for(started, timeout_s)


async def end_call(run: Run, cs: CallState, timeout_s: float = 5.0) -> None:
    """userStream.stop -> userStream.stopped, session.end, then wait for the close (bounded)."""
    tr = cs.caller_tr
    if tr is None or cs.caller_closed:
        return
    try:
        stopped = _expect(cs, "userStream.stopped")
        tr.send(WSMsgType.TEXT, _frame({"type": "userStream.stop", "conversationId": cs.conv_id}))
        await asyncio.wait_for(stopped, timeout_s)
    except (asyncio.TimeoutError, TimeoutError, ConnectionError):
        run.error("no_user_stream_stopped", f"call {cs.idx}")
    cs.ending = True
    tr.send(WSMsgType.TEXT, _frame({"type": "session.end", "conversationId": cs.conv_id,
                                    "reasonCode": "client-disconnected", "reason": "bench done"}))
    try:
        await asyncio.wait_for(tr.wait_disconnected(), timeout_s)
    except (asyncio.TimeoutError, TimeoutError):
        run.error("caller_not_closed_by_peer", f"call {cs.idx}: no close {timeout_s:g} s after session.end")
        tr.disconnect()
    except Exception:  # picows re-raises a local failure here; the socket is gone either way
        pass


class Ticker:
    """Sends every call's userStream.chunk every 20 ms, calls spread over 1 ms slices.

    Absolute deadlines: step s is due at start + s ms and carries, for the calls of slice
    s % 20, the frame seq s // 20; a late loop catches up (sends every overdue step) instead of
    drifting. A plain loop timer per step (no task switch). `tick_late` records how late each
    step really went out (generator health)."""

    SLICES = 20
    STEP_NS = 1_000_000

    def __init__(self, run: Run, calls: list[CallState]) -> None:
        self.run = run
        self.groups = [calls[k::self.SLICES] for k in range(self.SLICES)]
        # the same VAIC frames in both modes (in direct mode the fake reads them as appends)
        self.prefix = {c.idx: b'{"type":"userStream.chunk","conversationId":"' + c.conv_id.encode()
                       + b'","audioChunk":"' for c in calls}
        self.suffix = b'"}'
        self.step = 0
        self.max_steps = 0
        self.start = 0
        self.done: asyncio.Future | None = None
        self.loop: asyncio.AbstractEventLoop | None = None

    async def run_until_stopped(self, max_s: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.done = self.loop.create_future()
        self.start = _perf() + 2 * self.STEP_NS
        for k, group in enumerate(self.groups):
            for cs in group:
                cs.sched0_ns = self.start + k * self.STEP_NS
        self.max_steps = int(max_s * 1000)
        self._arm()
        await self.done

    def _arm(self) -> None:
        due = self.start + self.step * self.STEP_NS
        self.loop.call_at(self.loop.time() + (due - _perf()) / 1e9, self._tick)

    def _tick(self) -> None:
        run = self.run
        try:
            if run.callers_stop or self.step >= self.max_steps:
                self.done.set_result(None)
                return
            start, step_ns, slices = self.start, self.STEP_NS, self.SLICES
            prefix, suffix, text = self.prefix, self.suffix, WSMsgType.TEXT
            step, max_steps = self.step, self.max_steps
            now = _perf()
            while step < max_steps and start + step * step_ns <= now:
                seq = step // slices
                due = start + step * step_ns
                for cs in self.groups[step % slices]:
                    if cs.caller_closed:
                        continue
                    stamp, tail = payload_parts(cs.idx, seq, _perf())
                    cs.up.sent(seq)
                    cs.caller_tr.send(text, b"".join((prefix[cs.idx], stamp, tail, suffix)))
                    cs.up_seq = seq + 1
                if run.w0 <= due < run.w1:
                    run.tick_late.append(_perf() - due)
                step += 1
                now = _perf()
            self.step = step
            self._arm()
        except Exception as e:  # a generator bug must fail the run, not hang it
            run.error("generator_exception", f"ticker: {type(e).__name__}: {e}")
            if not self.done.done():
                self.done.set_result(None)
