"""Fake OpenAI Realtime GA upstream (picows server), minimal but protocol-correct for the bridge.

Bridge mode (voicebridge dials us): `session.created` on connect; `session.update` ->
`session.updated` echoing the requested audio formats; `input_audio_buffer.append` -> stamp
check (in order, exactly once, byte-exact) and up latency; `conversation.item.truncate` ->
checked against the interrupted item, answered with `conversation.item.truncated`.
Direct mode (the baseline, no bridge): callers connect here themselves; VAIC handshake
messages are answered the way the bridge would, `userStream.chunk` is read like an append, and
the same model events are sent straight to the caller.

Model turns (`TurnDriver`, one per call, loop timers at absolute times): every `turn_s`
`speech_stopped` + `committed`; `think_ms` later `response.created` and `response_ms` of
stamped 20 ms `response.output_audio.delta`s in bursts: first (lead - 40 ms) of audio at once,
then `burst_ms` of audio every `burst_ms`. The bridge paces playout and never gives VAIC more
than `audio.playout_lead_ms` ahead; with this pattern the audio held at VAIC stays >= 40 ms
below that lead when each burst arrives, so every delta is forwardable at once and the down
latency measured is forwarding, not intended pacing delay. Every `barge_every`th turn is
interrupted halfway (50 ms after a burst): `input_audio_buffer.speech_started`, then
`late_deltas` deltas of the cancelled response (in flight, as the real server may send them;
they must NOT reach the caller), `response.output_audio.done`, `response.done` (cancelled).
"""

from __future__ import annotations

import asyncio
import itertools
import time

import msgspec
from picows import WSListener, WSMsgType, WSUpgradeRequest

from .gen_caller import FORMAT
from .gen_state import FRAME_MS, FRAME_NS, CallState, Run
from .stamp import BadStamp, check_payload, payload_parts, read_stamp

_json = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()
_perf = time.perf_counter_ns
_evt = itertools.count(1)
_KEY_APPEND = b'"audio":"'          # input_audio_buffer.append (the bridge's template)
_KEY_USERCHUNK = b'"audioChunk":"'  # userStream.chunk (direct mode)
TEXT = WSMsgType.TEXT


def _eid() -> str:
    return f"event_b{next(_evt)}"


def _send(tr, msg: dict) -> None:
    tr.send(TEXT, _enc.encode(msg))


def session_object(in_fmt: dict, out_fmt: dict) -> dict:
    return {"type": "realtime", "object": "realtime.session", "id": "sess_bench",
            "model": "gpt-realtime", "output_modalities": ["audio"],
            "audio": {"input": {"format": in_fmt, "turn_detection": {
                "type": "server_vad", "threshold": 0.5, "prefix_padding_ms": 300,
                "silence_duration_ms": 400, "create_response": True, "interrupt_response": True}},
                "output": {"format": out_fmt, "voice": "marin", "speed": 1.0}}}


class FakeUpstream(WSListener):
    """One socket to the fake: from voicebridge (bridge mode) or from a caller (direct mode)."""

    def __init__(self, run: Run, calls: list[CallState], request: WSUpgradeRequest | None) -> None:
        self.run = run
        self.calls = calls
        self.direct = run.p.mode == "direct"
        self.key = _KEY_USERCHUNK if self.direct else _KEY_APPEND
        self.klen = len(self.key)
        self.cs: CallState | None = None
        self.tr = None
        if request is not None and not self.direct:
            self._check_request(request)

    def _check_request(self, req: WSUpgradeRequest) -> None:
        path = req.path.decode() if isinstance(req.path, bytes) else str(req.path)
        if not path.startswith("/v1/realtime?model="):
            self.run.error("upstream_bad_path", path[:100])
        hdrs = {str(k).lower(): v for k, v in req.headers.items()}
        if "authorization" not in hdrs:
            self.run.error("upstream_no_auth", "no Authorization header from the bridge")
        if "openai-beta" in hdrs:
            self.run.error("upstream_beta_header", "the bridge sent OpenAI-Beta")

    # -- picows callbacks
    def on_ws_connected(self, tr) -> None:
        self.tr = tr
        if not self.direct:
            fmt = {"type": "audio/pcm", "rate": 24000}
            _send(tr, {"type": "session.created", "event_id": _eid(),
                       "session": session_object(fmt, fmt)})

    def on_ws_disconnected(self, tr) -> None:
        cs = self.cs
        if cs is not None:
            cs.upstream_closed = True
            if cs.turn_driver is not None:
                cs.turn_driver.stop()
            if not self.run.callers_stop:
                self.run.error("upstream_closed_mid_call", f"call {cs.idx}")

    def on_ws_frame(self, tr, frame) -> None:
        try:
            self._frame(tr, frame)
        except Exception as e:  # a generator bug must fail the run, not vanish into a log line
            self.run.error("generator_exception", f"upstream frame: {type(e).__name__}: {e}")

    def _frame(self, tr, frame) -> None:
        mt = frame.msg_type
        if mt is not TEXT:
            if mt is WSMsgType.CLOSE:
                tr.send_close(frame.get_close_code())
                tr.disconnect()
            return
        if not frame.fin:
            self.run.error("fragmented_frame", "upstream")
            return
        buf = frame.get_payload_as_bytes()
        i = buf.find(self.key)
        if i >= 0:
            self._append(buf, i + self.klen)
        else:
            self._control(tr, buf)

    # -- audio from the caller (through the bridge, or directly)
    def _append(self, buf: bytes, start: int) -> None:
        now = _perf()
        run = self.run
        cs = self.cs
        if cs is None:  # bridge mode: the first append's stamp names the call
            try:
                c, _, _ = read_stamp(buf, start)
            except BadStamp as e:
                run.error("up_unbound_corrupt", f"unbound upstream: {e}")
                return
            if c >= len(self.calls) or self.calls[c].upstream_tr is not None:
                run.error("up_misrouted", f"call index {c} on a second upstream socket")
                return
            cs = self._bind(self.calls[c])
        ok, seq, t = check_payload(buf, start, cs.idx)
        if not ok:
            cs.up.corrupted()
            run.error("up_corrupt", f"call {cs.idx} seq {seq}: payload not byte-exact")
            return
        cs.up.received(seq)
        if run.w0 <= t < run.w1:
            run.up_lat.append(now - t)
            run.window_up_frames += 1
            if now - (cs.sched0_ns + seq * FRAME_NS) > FRAME_NS:   # over a frame period late
                run.late_up_frames += 1
        drv = cs.turn_driver
        if drv is None:
            cs.turn_driver = drv = TurnDriver(run, cs, self.tr)
            drv.start()

    def _bind(self, cs: CallState) -> CallState:
        self.cs = cs
        cs.upstream_tr = self.tr
        return cs

    # -- control events
    def _control(self, tr, buf: bytes) -> None:
        run = self.run
        try:
            msg = _json.decode(buf)
            typ = msg["type"]
        except (msgspec.DecodeError, KeyError, TypeError):
            run.error("upstream_bad_frame", buf[:120].decode("utf-8", "replace"))
            return
        if self.direct:
            self._vaic_control(tr, typ, msg)
            return
        if typ == "session.update":
            s = msg.get("session") or {}
            audio = s.get("audio") or {}
            in_fmt = (audio.get("input") or {}).get("format") or {"type": "audio/pcm", "rate": 24000}
            out_fmt = (audio.get("output") or {}).get("format") or {"type": "audio/pcm", "rate": 24000}
            if s.get("type") != "realtime":
                run.error("session_update_type", str(s.get("type")))
            if in_fmt.get("type") != "audio/pcm" or out_fmt.get("type") != "audio/pcm":
                run.error("session_update_format", f"{in_fmt} / {out_fmt} (expected pass-through audio/pcm)")
            _send(tr, {"type": "session.updated", "event_id": _eid(),
                       "session": session_object(in_fmt, out_fmt)})
        elif typ == "conversation.item.truncate":
            cs = self.cs
            item, end_ms = msg.get("item_id"), msg.get("audio_end_ms")
            if cs is None or item != cs.barge_item or not isinstance(end_ms, int) \
                    or not 0 <= end_ms <= cs.item_ms.get(item, -1):
                run.error("bad_truncate", f"call {cs.idx if cs else '?'}: {msg} (barged item "
                          f"{cs.barge_item if cs else '?'}, sent {cs.item_ms.get(item) if cs else '?'} ms)")
            else:
                cs.truncates_ok += 1
            _send(tr, {"type": "conversation.item.truncated", "event_id": _eid(),
                       "item_id": item, "content_index": msg.get("content_index", 0),
                       "audio_end_ms": end_ms})
        else:
            run.count(f"upstream_rx:{typ}")

    def _vaic_control(self, tr, typ: str, msg: dict) -> None:
        """Direct mode: answer the caller's VAIC handshake the way the bridge would."""
        if typ == "session.initiate":
            try:
                idx = int(str(msg.get("conversationId", "")).split("-")[1])
                self._bind(self.calls[idx])
            except (IndexError, ValueError):
                self.run.error("direct_bad_initiate", str(msg)[:120])
                return
            _send(tr, {"type": "session.accepted", "mediaFormat": FORMAT})
        elif typ == "userStream.start":
            _send(tr, {"type": "userStream.started"})
        elif typ == "userStream.stop":
            _send(tr, {"type": "userStream.stopped"})
        elif typ == "session.end":
            tr.send_close()
            tr.disconnect()
        elif typ != "activities":
            self.run.count(f"direct_rx:{typ}")


class TurnDriver:
    """The model's side of one call: a turn every `turn_s`, stamped audio in bursts, barge-ins."""

    def __init__(self, run: Run, cs: CallState, tr) -> None:
        p = run.p
        self.run, self.cs, self.tr = run, cs, tr
        self.loop = asyncio.get_running_loop()
        self.direct = p.mode == "direct"
        self.first_frames = max(1, (p.lead_ms - 2 * FRAME_MS) // FRAME_MS)
        self.burst_frames = max(1, p.burst_ms // FRAME_MS)
        self.burst_s = p.burst_ms / 1000.0
        self.total = max(1, p.response_ms // FRAME_MS)
        self.late = 0 if self.direct else p.late_deltas   # no bridge to drop them in direct mode
        self.handle: asyncio.TimerHandle | None = None
        self.t0 = 0.0
        self.n = 0
        self.barge = False
        self.rid = self.item = self.uitem = ""
        self.dprefix = b""
        self.sent = 0
        self.resp_t0 = 0.0
        self.burst_no = 0

    def start(self) -> None:
        p = self.run.p
        phase = 0.25 + ((self.cs.idx * 0.6180339887) % 1.0) * p.turn_s
        self.t0 = self.loop.time() + phase
        self._at(self.t0, self.turn)

    def stop(self) -> None:
        if self.handle is not None:
            self.handle.cancel()
            self.handle = None

    def finish_now(self) -> None:
        """End of the window: no more turns; a response being sent ends after the deltas
        already sent (they are all accounted for), a scheduled barge-in is not sent."""
        self.stop()
        if self.cs.resp_active and self._alive():
            self._done("completed", next_turn=False)

    def _at(self, when: float, fn) -> None:
        self.handle = self.loop.call_at(when, self._guard, fn)

    def _guard(self, fn) -> None:
        try:
            fn()
        except Exception as e:  # a generator bug must fail the run, not vanish into a log line
            self.run.error("generator_exception", f"call {self.cs.idx}: {fn.__name__}: {type(e).__name__}: {e}")

    def _alive(self) -> bool:
        return not self.tr.is_disconnected

    def turn(self) -> None:
        run, cs = self.run, self.cs
        if run.turns_stop or not self._alive():
            return
        p = run.p
        self.n = n = cs.turn_no
        cs.turn_no += 1
        run.turns_started += 1
        idx = cs.idx
        self.uitem = f"item_u{idx}_{n}"
        self.rid, self.item = f"resp_{idx}_{n}", f"item_a{idx}_{n}"
        self.barge = bool(p.barge_every) and (n + idx) % p.barge_every == p.barge_every - 1
        end_ms = int((self.loop.time() - self.t0) * 1000) + 1000
        _send(self.tr, {"type": "input_audio_buffer.speech_stopped", "event_id": _eid(),
                        "audio_end_ms": end_ms, "item_id": self.uitem})
        _send(self.tr, {"type": "input_audio_buffer.committed", "event_id": _eid(),
                        "previous_item_id": None, "item_id": self.uitem})
        self._at(self.t0 + n * p.turn_s + p.think_ms / 1000.0, self.respond)

    def respond(self) -> None:
        if not self._alive():
            return
        cs = self.cs
        cs.resp_active = True
        _send(self.tr, {"type": "response.created", "event_id": _eid(), "response": {
            "object": "realtime.response", "id": self.rid, "status": "in_progress",
            "status_details": None, "output": [], "usage": None}})
        self.dprefix = (b'{"type":"response.output_audio.delta","event_id":"event_d","response_id":"'
                        + self.rid.encode() + b'","item_id":"' + self.item.encode()
                        + b'","output_index":0,"content_index":0,"delta":"')
        self.sent = 0
        self.burst_no = 0
        self.resp_t0 = self.loop.time()
        self.burst()

    def _delta(self, deliverable: bool) -> None:
        cs = self.cs
        seq = cs.down_seq
        cs.down_seq = seq + 1
        if deliverable:
            if self.sent == 0:
                cs.first_seq = seq
            cs.down.sent(seq)
        else:
            cs.down.forbid(seq)
        stamp, tail = payload_parts(cs.idx, seq, _perf())
        self.tr.send(TEXT, b"".join((self.dprefix, stamp, tail, b'"}')))
        if deliverable:
            self.sent += 1
            cs.item_ms[self.item] = self.sent * FRAME_MS

    def burst(self) -> None:
        if not self._alive():
            return
        n = self.first_frames if self.burst_no == 0 else self.burst_frames
        for _ in range(min(n, self.total - self.sent)):
            self._delta(True)
        self.burst_no += 1
        if self.barge and self.sent >= self.total // 2:
            self._at(self.resp_t0 + (self.burst_no - 1) * self.burst_s + 0.05, self.barge_in)
        elif self.sent >= self.total:
            self._done("completed")
        else:
            self._at(self.resp_t0 + self.burst_no * self.burst_s, self.burst)

    def barge_in(self) -> None:
        if not self._alive():
            return
        run, cs = self.run, self.cs
        cs.barge_item = self.item
        cs.barge_lo, cs.barge_hi = cs.first_seq, cs.down_seq - 1
        cs.barge_speech_seen = self.direct   # direct: speech_started itself is the stop signal
        cs.barges += 1
        run.barges_sent += 1
        cs.barge_ns = _perf()
        _send(self.tr, {"type": "input_audio_buffer.speech_started", "event_id": _eid(),
                        "audio_start_ms": int((self.loop.time() - self.t0) * 1000),
                        "item_id": f"item_u{cs.idx}_{self.n + 1}"})
        for _ in range(self.late):
            self._delta(False)
        self._done("cancelled")

    def _done(self, status: str, next_turn: bool = True) -> None:
        tr, cs = self.tr, self.cs
        _send(tr, {"type": "response.output_audio.done", "event_id": _eid(), "response_id": self.rid,
                   "item_id": self.item, "output_index": 0, "content_index": 0})
        details = {"type": "cancelled", "reason": "turn_detected"} if status == "cancelled" else None
        _send(tr, {"type": "response.done", "event_id": _eid(), "response": {
            "object": "realtime.response", "id": self.rid, "status": status,
            "status_details": details, "output": [], "usage": None}})
        cs.resp_active = False
        self.run.responses_done += 1
        if len(cs.item_ms) > 8:
            for k in list(cs.item_ms)[:-4]:
                del cs.item_ms[k]
        if next_turn:
            nxt = self.t0 + (self.n + 1) * self.run.p.turn_s
            self._at(max(nxt, self.loop.time()), self.turn)
