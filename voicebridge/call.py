"""One call: the VAIC socket, the OpenAI socket, and the coroutines that move frames between them.

This is the only module where the two protocols meet. It owns, per call:
- `_pump_up` (runs in the VAIC connection's handler task): VAIC frame -> `AcProtocol.receive`
  -> for `userStream.chunk`, the base64 payload as is into the `input_audio_buffer.append`
  template -> OpenAI socket;
- `_upstream` (one task): dials OpenAI as soon as `session.initiate` arrives, sends
  `session.update`, flushes caller audio buffered meanwhile, then runs `_pump_down`: OpenAI
  event -> deltas into the playout queue (sent at once while within the lead) / speech events
  to VAIC / barge-in;
- `_pacer` (one task): sends queued playout when the playout clock says it is due.
No task, log line or dict per frame; the early-audio buffer and the playout queue are bounded.

Ending: whichever side ends first, the OpenAI socket is closed within `openai.close_timeout_s`
(aborted if the close handshake takes longer) and one `call.end` log line is written.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from time import perf_counter_ns
from typing import Any, Awaitable, Callable

import msgspec

from . import audiocodes as ac
from . import realtime as rt
from .audio import (WAV_HEADER_ON_PLAY_START, NoCommonFormat, Negotiated, make_transcoder,
                    ms_of_b64, negotiate, wav_header)
from .bounds import ID_CHARS, OnceKeys, clip, clip_list, is_b64
from .config import Config, Secrets
from .log import exc_fields, get_logger
from .playout import CHUNK, Playout, Taken, piece_chars, split_b64
from .stats import Stats
from .transport import ConnectFailed, Endpoint, EndpointClosed, Limits, dial

Dialer = Callable[..., Awaitable[Endpoint]]
_LOG_FIRST_N = 5          # per call, for repeated bad-input log lines
# call.end reason when the VAIC socket ended, by EndpointClosed.cause (None: VAIC closed it)
VAIC_END_REASONS = {None: "vaic_closed", "closed": "vaic_closed",
                    "frame_too_big": "vaic_frame_too_big", "protocol_error": "vaic_protocol_error",
                    "keepalive_timeout": "vaic_keepalive_timeout", "shutdown": "server_shutdown",
                    "send_buffer_full": "vaic_not_reading", "send_timeout": "vaic_not_reading"}


def limits_of(cfg: Config) -> Limits:
    s = cfg.server
    return Limits(send_buffer_bytes=s.send_buffer_bytes, send_timeout_s=s.send_timeout_s,
                  recv_queue_bytes=s.recv_queue_bytes, max_fragments=s.max_fragments)


class CallCounters(msgspec.Struct):
    frames_up: int = 0            # userStream.chunk received from VAIC
    frames_down: int = 0          # playStream.chunk sent to VAIC
    deltas: int = 0               # response.output_audio.delta received from OpenAI
    early_buffered: int = 0       # caller frames held until the OpenAI session was ready
    early_dropped: int = 0        # ... dropped because that buffer was full
    late_deltas_dropped: int = 0  # deltas of a response cancelled by barge-in
    playout_refused: int = 0      # chunks refused by the full playout queue
    barge_ins: int = 0
    truncates: int = 0
    openai_errors: int = 0
    bad_frames_in: int = 0
    play_streams: int = 0


class Call:
    """A call from `session.initiate` to `call.end`. Use: `await Call(...).run()`."""

    def __init__(self, ac_end: Endpoint, cfg: Config, secrets: Secrets, *,
                 dialer: Dialer = dial, call_id: str = "", stats: Stats | None = None) -> None:
        self.ac = ac_end
        self.stats = stats if stats is not None else Stats()
        self.cfg = cfg
        self.secrets = secrets
        self._dialer = dialer
        self.proto = ac.AcProtocol()
        self.counters = CallCounters()
        self.log = get_logger(call_id=call_id)
        self.call_id = call_id
        self.started = time.monotonic()
        self.end_reason = ""
        self.end_detail = ""
        self.format = ""
        self.caller = ""
        self.callee = ""
        self.last_truncate: tuple[str, int] | None = None
        self.openai_connect_ms: float | None = None

        self.up: Endpoint | None = None
        self._up_ready = False
        self._up_task: asyncio.Task[None] | None = None
        self._pacer_task: asyncio.Task[None] | None = None
        self._timers: list[asyncio.TimerHandle] = []
        self._early: deque[str] = deque()
        self._early_ms = 0.0
        self._ending = False
        self._start_seen = False
        self._greeted = False
        self._logged = OnceKeys()
        self._session_seen = 0            # 1: session.created, 2: session.updated (bits)
        self._last_audio_ns = perf_counter_ns()   # caller audio received (idle timeout)

        self._neg: Negotiated | None = None
        self._tc: Any = None
        self._app_prefix, self._app_suffix = rt.append_template()
        self.playout = Playout(cfg.audio.playout_lead_ms, cfg.audio.max_pending_audio_ms,
                               cfg.audio.vaic_stop_policy, cfg.audio.stop_margin_ms)
        self._wake = asyncio.Event()
        self._pacer_timer: asyncio.TimerHandle | None = None
        self._draining = False
        self._gen = 0
        self._stream_id: str | None = None
        self._chunk_prefix = self._chunk_suffix = ""
        self._active_response: str | None = None
        self._cancelled: set[str] = set()
        self._item_oai_ms: dict[str, float] = {}
        self._last_pushed_item = ""
        self._piece_chars = 0
        self._t_initiate_ns = 0
        self._t_speech_stop_ns = 0      # model TTFA clock: speech stopped -> first delta
        self._t_first_delta_ns = 0      # turn overhead clock: first delta -> first chunk sent
        self._last_response = ""        # response whose first delta was seen
        self._wav_header_ms = 0.0

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        try:
            init = await self._await_initiate()
            if init is not None and await self._begin(init):
                await self._pump_up()
        except EndpointClosed as e:
            self._set_end(VAIC_END_REASONS.get(e.cause, "vaic_closed"), f"code={e.code}")
        except Exception as e:  # never a traceback towards the caller: log and end cleanly
            self._set_end("internal_error", f"{type(e).__name__}: {e}"[:200])
            self.log.error("call.internal_error", **exc_fields(e))
        finally:
            await self._shutdown()

    def abort(self) -> None:
        """Abort both sockets at once (a forced shutdown); the tasks then end the call."""
        self._set_end("server_shutdown", "aborted")
        if self.up is not None:
            self.up.abort()
        self.ac.abort()

    def _set_end(self, reason: str, detail: str = "") -> None:
        if not self.end_reason:
            self.end_reason, self.end_detail = reason, detail

    async def _await_initiate(self) -> ac.SessionInitiate | None:
        """Read until session.initiate; answer connection.validate; reject anything else."""
        wait_s = self.cfg.call.initiate_timeout_s
        deadline = self.started + wait_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._set_end("no_initiate", f"no session.initiate within {wait_s:g} s")
                return None
            try:
                frame = await asyncio.wait_for(self.ac.recv(), left)
            except (asyncio.TimeoutError, TimeoutError):
                continue
            ev = self.proto.receive(frame)
            await self._flush_ac()
            t = type(ev)
            if t is ac.SessionInitiate:
                self._t_initiate_ns = perf_counter_ns()
                return ev  # type: ignore[return-value]
            if t is ac.Validate:
                self._set_end("validate", "connection.validate answered")
                self.log.info("call.validate")
                continue
            if t is ac.Rejected:
                self._set_end("rejected", ev.reason)  # type: ignore[union-attr]
                self.stats.calls_rejected += 1
                self.log.warning("call.rejected", reason=clip(ev.reason))  # type: ignore[union-attr]
                await self._close_ac_after_error()
                return None
            self._note_bad(ev)

    async def _begin(self, init: ac.SessionInitiate) -> bool:
        self.call_id = self.call_id or clip(init.conversationId, ID_CHARS)
        self.log = get_logger(call_id=self.call_id)
        self.caller = clip(init.caller, ID_CHARS)
        offered = init.supportedMediaFormats
        if not init.expectAudioMessages:
            return await self._decline("expectAudioMessages is false: this bot answers with audio "
                                       "(enable directTTS on the bot in VoiceAI Connect)", offered)
        try:
            neg = negotiate(offered, self.cfg.audio.format_preference)
        except NoCommonFormat as e:
            return await self._decline(str(e), offered)
        self._neg = neg
        self._tc = make_transcoder(neg)
        self.format = neg.ac.name
        self._piece_chars = piece_chars(self.cfg.audio.max_chunk_ms, neg.ac.bytes_per_ms)
        if neg.ac.container == "wav" and WAV_HEADER_ON_PLAY_START:
            self._wav_header_ms = len(wav_header(neg.ac)) / neg.ac.bytes_per_ms
        # Dial OpenAI at once, in parallel with answering VAIC.
        self._up_task = asyncio.create_task(self._upstream(), name=f"upstream-{self.call_id}")
        self._pacer_task = asyncio.create_task(self._pacer(), name=f"pacer-{self.call_id}")
        self._last_audio_ns = perf_counter_ns()
        self._timers.append(asyncio.get_running_loop().call_later(
            self.cfg.call.idle_timeout_s / 4, self._check_idle))
        self.proto.accept(neg.ac.name)
        await self._flush_ac()
        self.stats.call_setup.record((perf_counter_ns() - self._t_initiate_ns) // 1000)
        self.stats.calls_total += 1
        self.log.info("call.start", conversation_id=self.call_id, caller=self.caller,
                      bot=clip(init.botName, ID_CHARS), offered=clip_list(offered), format=neg.ac.name,
                      openai_format=neg.openai_format["type"], passthrough=neg.passthrough)
        return True

    async def _decline(self, reason: str, offered: list[str]) -> bool:
        self.stats.calls_rejected += 1
        self.proto.reject(clip(reason))
        await self._flush_ac()
        self._set_end("declined", reason)
        self.log.warning("call.declined", reason=clip(reason), offered=clip_list(offered))
        await self._close_ac_after_error()
        return False

    async def _close_ac_after_error(self) -> None:
        """After session.error VAIC disconnects; give it a moment, then close ourselves."""
        try:
            await asyncio.wait_for(self._drain_ac_until_closed(), 2.0)
        except (asyncio.TimeoutError, TimeoutError):
            pass
        await self.ac.close(1000, "session ended")

    async def _drain_ac_until_closed(self) -> None:
        try:
            while True:
                await self.ac.recv()
        except EndpointClosed:
            pass

    async def _shutdown(self) -> None:
        self._ending = True
        for h in self._timers:
            h.cancel()
        if self._pacer_timer is not None:
            self._pacer_timer.cancel()
        for task in (self._pacer_task, self._up_task):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._pacer_task, self._up_task):
            if task is not None:  # first let them finish: a dial completing now sets self.up
                try:
                    await task
                except BaseException:  # cancelled, or already logged by the task
                    pass
        await self._close_upstream()
        try:
            await asyncio.wait_for(self.ac.close(1000, "call ended"), 2.0)
        except Exception:
            self.ac.abort()
        c = self.counters
        st = self.stats
        reason = self.end_reason or "unknown"
        st.call_ends[reason] = st.call_ends.get(reason, 0) + 1
        st.truncates += c.truncates
        st.barge_ins += c.barge_ins
        st.late_deltas_dropped += c.late_deltas_dropped
        st.early_audio_dropped += c.early_dropped
        self.log.info("call.end", reason=reason, detail=clip(self.end_detail),
                      duration_s=round(time.monotonic() - self.started, 3), format=self.format,
                      frames_up=c.frames_up, frames_down=c.frames_down, deltas=c.deltas,
                      barge_ins=c.barge_ins, truncates=c.truncates,
                      late_deltas_dropped=c.late_deltas_dropped, early_buffered=c.early_buffered,
                      early_dropped=c.early_dropped, playout_refused=c.playout_refused,
                      openai_errors=c.openai_errors, bad_frames_in=c.bad_frames_in,
                      openai_connect_ms=self.openai_connect_ms)

    async def _close_upstream(self) -> None:
        up = self.up
        self._up_ready = False
        if up is None:
            return
        try:
            await asyncio.wait_for(up.close(1000, "call ended"), self.cfg.openai.close_timeout_s)
        except Exception:
            up.abort()
        if up.close_code is None:
            up.abort()

    def _fail(self, reason: str, detail: str, event: str = "call.upstream_failed") -> None:
        """The call cannot go on (OpenAI gone or unusable, idle): never leave the caller in dead air.

        Ask VAIC to hang up (hangup activity, reason in activityParams); if VAIC does not answer
        with session.end within `call.hangup_grace_s`, close its socket ourselves. The OpenAI
        socket is closed at once: it is of no further use, and an open session is billed."""
        if self._ending:
            return
        self._ending = True
        self._set_end(reason, detail)
        self.log.warning(event, reason=reason, detail=clip(detail))
        if self.up is not None:
            asyncio.get_running_loop().create_task(self._close_upstream())
        self._gen += 1
        self.playout.interrupt(time.monotonic())
        sid, self._stream_id = self._stream_id, None
        self.proto.request_hangup(clip(f"{reason}: {detail}"))
        asyncio.get_running_loop().create_task(self._hangup_frames(sid))
        h = asyncio.get_running_loop().call_later(
            self.cfg.call.hangup_grace_s, lambda: asyncio.ensure_future(self._close_ac_quietly()))
        self._timers.append(h)

    async def _close_ac_quietly(self) -> None:
        try:
            await self.ac.close(1000, "hangup")
        except Exception:
            self.ac.abort()

    async def _flush_ac(self) -> None:
        for frame in self.proto.data_to_send():
            await self.ac.send(frame)

    async def _hangup_frames(self, open_stream: str | None) -> None:
        """Close the open play stream, then send the hangup activity queued by the protocol."""
        try:
            if open_stream is not None:
                await self.ac.send(ac.encode(ac.PlayStreamStop(streamId=open_stream)))
            await self._flush_ac()
        except EndpointClosed:
            pass

    # ------------------------------------------------------------------ caller -> model
    async def _pump_up(self) -> None:
        recv = self.ac.recv
        receive = self.proto.receive
        chunk_t = ac.UserStreamChunk
        prefix, suffix = self._app_prefix, self._app_suffix
        c = self.counters
        st = self.stats
        record_up = st.up_forward.record
        tc = self._tc
        assert self._neg is not None
        # base64 characters of `audio.max_frame_ms` of caller audio (4 chars per 3 bytes)
        max_frame_chars = (self.cfg.audio.max_frame_ms * self._neg.ac.bytes_per_ms + 2) // 3 * 4
        while True:
            frame = await recv()
            t0 = perf_counter_ns()
            ev = receive(frame)
            if type(ev) is chunk_t:
                c.frames_up += 1
                payload = ev.audioChunk  # type: ignore[union-attr]
                if not is_b64(payload):  # never into the JSON template: no injection upstream
                    self._bad_audio("audioChunk is not base64")
                    continue
                if len(payload) > max_frame_chars:  # decoding cost bounded per frame
                    self._bad_audio(f"audioChunk longer than audio.max_frame_ms "
                                    f"({self.cfg.audio.max_frame_ms} ms)")
                    continue
                self._last_audio_ns = t0
                if tc is not None:
                    try:
                        payload = tc.up(payload)
                    except ValueError as e:  # binascii.Error: not decodable base64
                        self._bad_audio(f"audioChunk does not decode: {e}"[:120])
                        continue
                    if not payload:
                        continue
                if self._up_ready:
                    try:
                        await self.up.send(prefix + payload + suffix)  # type: ignore[union-attr]
                    except EndpointClosed:
                        continue  # the upstream task sees the close and ends the call
                    record_up((perf_counter_ns() - t0) // 1000)
                    st.frames_up += 1
                    st.bytes_up += len(payload)
                else:
                    self._buffer_early(payload)
                continue
            if await self._on_ac_control(ev):
                return

    def _bad_audio(self, reason: str) -> None:
        self.counters.bad_frames_in += 1
        self._log_first_n("bad_audio", "call.bad_audio_chunk", reason=reason)

    def _buffer_early(self, payload: str) -> None:
        assert self._neg is not None
        ms = ms_of_b64(payload, self._neg.openai_bytes_per_ms)
        self._early.append(payload)
        self._early_ms += ms
        self.counters.early_buffered += 1
        while self._early_ms > self.cfg.audio.early_audio_max_ms and len(self._early) > 1:
            dropped = self._early.popleft()
            self._early_ms -= ms_of_b64(dropped, self._neg.openai_bytes_per_ms)
            self.counters.early_dropped += 1

    async def _on_ac_control(self, ev: Any) -> bool:
        """Handle a non-audio VAIC event; True when the call is over (session.end)."""
        await self._flush_ac()
        t = type(ev)
        if t is ac.SessionEnd:
            self._set_end("vaic_session_end",
                          f"{clip(ev.reasonCode, ID_CHARS)} {clip(ev.reason)}".strip())
            self.log.info("call.session_end", reason_code=clip(ev.reasonCode, ID_CHARS),
                          reason=clip(ev.reason))
            return True
        if t is ac.Activities:
            for act in ev.activities:
                await self._on_activity(act)
        elif t is ac.UserStreamStop and self._tc is not None and self._up_ready:
            tail = self._tc.flush_up()  # the resampler's tail of the caller's last words
            if tail:
                await self._send_up(self._app_prefix + tail + self._app_suffix)
        elif t is ac.UserStreamStart or t is ac.UserStreamStop:
            self.log.debug("call.user_stream", type=type(ev).__struct_config__.tag)
        else:
            self._note_bad(ev)
        return False

    async def _on_activity(self, act: ac.Activity) -> None:
        name = clip(act.name, ID_CHARS).lower()
        if name == "start":
            params = act.parameters or {}
            self.callee = clip(params.get("callee"), ID_CHARS)
            self.caller = clip(params.get("caller"), ID_CHARS) or self.caller
            self._start_seen = True
            self.log.info("call.start_activity", callee=self.callee, caller=self.caller)
            if self._up_ready:
                await self._after_start()
        elif name in ("playfinished", "dtmf", "nouserinput"):
            self.log.debug("call.activity", name=name, value=clip(act.value))
        else:
            self._log_once(f"activity:{name}", "call.activity_ignored", name=name)

    def _note_bad(self, ev: Any) -> None:
        t = type(ev)
        if t is ac.UnknownMessage:
            self._log_once(f"unknown:{ev.type}", "call.unknown_message", type=clip(ev.type, ID_CHARS))
        elif t is ac.Malformed:
            self.counters.bad_frames_in += 1
            self._log_first_n("malformed", "call.malformed_frame", reason=ev.reason)
        elif t is ac.Ignored and ev.type != "userStream.chunk":  # audio while ending: expected
            self._log_first_n("ignored", "call.message_ignored", type=clip(ev.type, ID_CHARS),
                              reason=clip(ev.reason))

    def _log_once(self, key: str, event: str, **kw: Any) -> None:
        if self._logged.hit(key) == 1:
            self.log.info(event, **kw)

    def _log_first_n(self, key: str, event: str, level: str = "warning", **kw: Any) -> None:
        """Log the first `_LOG_FIRST_N` occurrences per key and call: bad input can repeat per
        frame. Keys are bounded per call (`bounds.OnceKeys`)."""
        n = self._logged.hit(key)
        if 0 < n <= _LOG_FIRST_N:
            getattr(self.log, level)(event, nth=n, **kw)

    # ------------------------------------------------------------------ upstream
    def _instructions(self) -> str:
        text = self.cfg.openai.instructions
        return text.replace("{caller}", self.caller).replace("{callee}", self.callee)

    async def _upstream(self) -> None:
        assert self._neg is not None
        url, headers = rt.target(self.cfg, self.secrets)
        o = self.cfg.openai
        t0 = perf_counter_ns()
        try:
            up = await self._dialer(url, headers, timeout_s=o.connect_timeout_s,
                                    max_size=o.max_message_bytes, close_timeout_s=o.close_timeout_s,
                                    limits=limits_of(self.cfg))
        except ConnectFailed as e:
            self._fail("openai_connect_failed", e.reason)
            return
        except Exception as e:  # a bug must not leave the caller in silence with nothing logged
            self.log.error("call.upstream_internal_error", **exc_fields(e))
            self._fail("internal_error", f"{type(e).__name__}: {e}"[:200])
            return
        connect_us = (perf_counter_ns() - t0) // 1000
        self.stats.openai_connect.record(connect_us)
        self.openai_connect_ms = round(connect_us / 1000, 1)
        self.up = up
        if self._ending:  # the call ended while we dialled: never keep a billed session open
            up.abort()
            return
        self._timers.append(asyncio.get_running_loop().call_later(
            o.session_timeout_s, self._check_session_started))
        neg = self._neg
        try:
            await up.send(rt.session_update(self.cfg, neg.openai_format, neg.openai_format,
                                            self._instructions()))
            prefix, suffix = self._app_prefix, self._app_suffix
            st = self.stats
            while self._early:  # forwarded, but not timed: they waited for the connect
                payload = self._early.popleft()
                await up.send(prefix + payload + suffix)
                st.frames_up += 1
                st.bytes_up += len(payload)
            self._early_ms = 0.0
            self._up_ready = True
            self.log.info("call.upstream_ready", connect_ms=self.openai_connect_ms,
                          early_frames=self.counters.early_buffered)
            if self._start_seen:
                await self._after_start()
            elif o.greeting:
                h = asyncio.get_running_loop().call_later(
                    self.cfg.call.start_wait_ms / 1000.0,
                    lambda: asyncio.ensure_future(self._greet()))
                self._timers.append(h)
            await self._pump_down()
        except EndpointClosed as e:
            if self._ending or self.ac.close_code is not None:
                return  # the VAIC side went away: the handler task ends the call
            how = f" ({e.cause.replace('_', ' ')})" if e.cause else ""
            self._fail("openai_closed", f"code={e.code}{how} reason={clip(e.reason, ID_CHARS)}")
        except Exception as e:  # a bug must not leave the caller in silence with nothing logged
            self.log.error("call.upstream_internal_error", **exc_fields(e))
            self._fail("internal_error", f"{type(e).__name__}: {e}"[:200])

    def _check_session_started(self) -> None:
        """`openai.session_timeout_s` after the socket opened: both session events must be in."""
        if self._session_seen != 3 and not self._ending:
            missing = " and ".join(n for bit, n in ((1, "session.created"), (2, "session.updated"))
                                   if not self._session_seen & bit)
            self._fail("openai_no_session",
                       f"no {missing} within {self.cfg.openai.session_timeout_s:g} s")

    def _check_idle(self) -> None:
        """Every quarter of `call.idle_timeout_s`: hang up a call with no audio either way."""
        idle_s = self.cfg.call.idle_timeout_s
        if self._ending:
            return
        now = time.monotonic()
        quiet_s = (perf_counter_ns() - self._last_audio_ns) / 1e9
        po = self.playout
        if quiet_s >= idle_s and not po.pending and po.play_end_t <= now:
            self._fail("idle_timeout", f"no audio either way for {idle_s:g} s", "call.idle_timeout")
            return
        self._timers.append(asyncio.get_running_loop().call_later(idle_s / 4, self._check_idle))

    async def _send_up(self, frame: str) -> None:
        """Send a control event upstream from outside the upstream task; a closed OpenAI socket
        is noticed and handled by that task's reader, so it is not an error here."""
        try:
            await self.up.send(frame)  # type: ignore[union-attr]
        except EndpointClosed:
            pass

    async def _after_start(self) -> None:
        o = self.cfg.openai
        if "{callee}" in o.instructions or "{caller}" in o.instructions:
            await self._send_up(rt.instructions_update(self._instructions()))
        await self._greet()

    async def _greet(self) -> None:
        if self._greeted or not self.cfg.openai.greeting or not self._up_ready:
            return
        self._greeted = True
        await self._send_up(rt.response_create(self.cfg.openai.greeting))

    # ------------------------------------------------------------------ model -> caller
    async def _pump_down(self) -> None:
        up = self.up
        assert up is not None
        recv = up.recv
        decode = rt.decode_server
        delta_t = rt.AudioDelta
        record_down = self.stats.down_forward.record
        playout = self.playout
        while True:
            frame = await recv()
            t0 = perf_counter_ns()
            ev = decode(frame)
            if type(ev) is delta_t:
                if ev.response_id != self._last_response:
                    self._first_delta_of_response(ev.response_id, t0)
                queued = self._on_delta(ev)
                if not self._draining:
                    await self._drain()  # sends what is due, arms the pacer for the rest
                    if queued and not playout.pending:  # all of it went out at once (not paced)
                        record_down((perf_counter_ns() - t0) // 1000)
                continue
            await self._on_event(ev, t0)

    def _first_delta_of_response(self, response_id: str, t0: int) -> None:
        self._last_response = response_id
        self._t_first_delta_ns = t0
        if self._t_speech_stop_ns:
            self.stats.model_ttfa.record((t0 - self._t_speech_stop_ns) // 1000)
            self._t_speech_stop_ns = 0

    def _on_delta(self, ev: rt.AudioDelta) -> bool:
        """Queue one delta's audio for playout; False when nothing was queued (dropped)."""
        c = self.counters
        c.deltas += 1
        if ev.response_id in self._cancelled:
            c.late_deltas_dropped += 1
            return False
        neg = self._neg
        assert neg is not None
        if not is_b64(ev.delta):  # never into the chunk template: no injection towards VAIC
            self._log_first_n("oai_bad_audio", "call.openai_bad_audio", reason="delta is not base64")
            return False
        if ms_of_b64(ev.delta, neg.openai_bytes_per_ms) > self.cfg.audio.max_delta_ms:
            self._log_first_n("oai_bad_audio", "call.openai_bad_audio",
                              reason=f"delta longer than audio.max_delta_ms ({self.cfg.audio.max_delta_ms} ms)")
            return False
        item = clip(ev.item_id, ID_CHARS)
        if item not in self._item_oai_ms and len(self._item_oai_ms) >= 8:
            self._item_oai_ms.clear()  # bounded: only the last few items can still be truncated
        self._item_oai_ms[item] = self._item_oai_ms.get(item, 0.0) + ms_of_b64(
            ev.delta, neg.openai_bytes_per_ms)
        first = item != self._last_pushed_item
        self._last_pushed_item = item
        payload = ev.delta
        if self._tc is not None:
            try:
                payload = self._tc.down(payload, first_of_stream=first)
            except ValueError as e:  # a delta that is not base64: skip it, say so once or twice
                self._log_first_n("oai_bad_audio", "call.openai_bad_audio", reason=str(e)[:120])
                return False
        return self._push_audio(item, payload, first)

    def _push_audio(self, item: str, payload: str, first: bool) -> bool:
        """Queue AudioCodes-format audio for playout, in pieces of at most `max_chunk_ms`."""
        if not payload:
            return False
        neg = self._neg
        assert neg is not None
        bpm = neg.ac.bytes_per_ms
        header_ms = self._wav_header_ms if first else 0.0
        for piece in split_b64(payload, self._piece_chars):
            if not self.playout.push_chunk(item, piece, ms_of_b64(piece, bpm) - header_ms):
                self.counters.playout_refused += 1
            header_ms = 0.0
        return True

    async def _on_event(self, ev: Any, t0: int) -> None:
        t = type(ev)
        if t is rt.SpeechStartedEv:
            await self._barge_in(t0)
        elif t is rt.AudioDone:
            if ev.response_id not in self._cancelled:
                if self._tc is not None:  # the resampler's tail belongs to this item
                    self._push_audio(ev.item_id, self._tc.flush_down(), False)
                self.playout.push_end(ev.item_id)
                await self._drain()
        elif t is rt.ResponseCreated:
            self._active_response = ev.response.id
        elif t is rt.ResponseDone:
            rid = ev.response.id
            if rid == self._active_response:
                self._active_response = None
            self._cancelled.discard(rid)
            if ev.response.status == "failed":
                self.log.warning("call.response_failed", response_id=clip(rid, ID_CHARS),
                                 details=clip(ev.response.status_details))
        elif t is rt.SpeechStoppedEv:
            self._t_speech_stop_ns = t0
            await self.ac.send(ac.encode(ac.SpeechStopped(participant=self.proto.participant)))
        elif t is rt.Committed:
            await self.ac.send(ac.encode(ac.SpeechCommitted(participant=self.proto.participant)))
        elif t is rt.InputTranscriptCompleted:
            if ev.transcript:
                await self.ac.send(ac.encode(ac.SpeechRecognition(
                    alternatives=[ac.Alternative(text=ev.transcript)],
                    participant=self.proto.participant)))
        elif t is rt.ErrorEvent:
            self._on_error(ev.error)
        elif t is rt.SessionUpdated:
            self._session_seen |= 2
            self._check_session(ev.session)
        elif t is rt.SessionCreated:
            self._session_seen |= 1
        elif t is rt.Truncated:
            self.log.debug("call.truncated", item_id=clip(ev.item_id, ID_CHARS),
                           audio_end_ms=ev.audio_end_ms)
        elif t is rt.TranscriptDone:
            self.log.debug("call.assistant_said", item_id=clip(ev.item_id, ID_CHARS),
                           transcript=clip(ev.transcript))
        elif t is rt.OtherEvent:
            self._log_once(f"oai:{clip(ev.type, ID_CHARS)}", "call.openai_unknown_event",
                           type=clip(ev.type, ID_CHARS))
        elif t is rt.BadEvent:
            self._log_first_n("oai_bad", "call.openai_bad_frame", reason=ev.reason)

    def _on_error(self, err: rt.ErrorDetail) -> None:
        self.counters.openai_errors += 1
        code = clip(err.code or "none", ID_CHARS)
        if code in self.stats.errors or len(self.stats.errors) < 64:  # bounded label set
            self.stats.errors[code] = self.stats.errors.get(code, 0) + 1
        else:
            self.stats.errors["other"] = self.stats.errors.get("other", 0) + 1
        kind = rt.classify_error(err.code)
        fields = dict(code=code, error_type=clip(err.type, ID_CHARS), message=clip(err.message),
                      param=clip(err.param, ID_CHARS), client_event_id=clip(err.event_id, ID_CHARS))
        if kind == "fatal":
            self.log.error("call.openai_error_fatal", **fields)
            self._fail("openai_error", f"{code}: {clip(err.message, 120)}")
            return
        if kind == "benign":
            self._log_first_n(f"oai_err:{code}", "call.openai_error_benign", "info", **fields)
        else:
            self._log_first_n(f"oai_err:{code}", "call.openai_error", **fields)

    def _check_session(self, session: dict[str, Any]) -> None:
        """Refuse to play audio in a format other than the one negotiated (garbage in the ear)."""
        assert self._neg is not None
        want = self._neg.openai_format.get("type")
        try:
            got = session["audio"]["output"]["format"]["type"]
        except (KeyError, TypeError):
            return
        if got != want:
            self._fail("openai_format_mismatch", f"asked for {want}, session says {clip(got, ID_CHARS)}")

    async def _barge_in(self, t0: int) -> None:
        """Caller started speaking: stop playout at once, truncate to what was heard."""
        now = time.monotonic()
        self._gen += 1  # any in-flight emit stops before its next frame
        intr = self.playout.interrupt(now)
        if self._tc is not None:
            self._tc.reset_down()
        self._last_pushed_item = ""
        send = self.ac.send
        await send(ac.encode(ac.SpeechStarted(participant=self.proto.participant)))
        if intr.stream_open and self._stream_id is not None:
            await send(ac.encode(ac.PlayStreamStop(streamId=self._stream_id)))
            self._stream_id = None
            self.stats.barge_in.record((perf_counter_ns() - t0) // 1000)
        if self._active_response is not None:
            self._cancelled.add(self._active_response)
            if not self.cfg.openai.vad.interrupt_response:
                await self.up.send(rt.response_cancel())  # type: ignore[union-attr]
        if intr.item_id is None or not intr.still_playing:
            return
        self.counters.barge_ins += 1
        oai_ms = self._item_oai_ms.get(intr.item_id, 0.0)
        end_ms = int(math.floor(max(0.0, min(intr.heard_ms, intr.sent_ms if intr.stream_open
                                                 else 0.0, oai_ms))))
        await self.up.send(rt.truncate(intr.item_id, end_ms))  # type: ignore[union-attr]
        self.counters.truncates += 1
        self.last_truncate = (intr.item_id, end_ms)
        self._item_oai_ms.clear()
        self.log.info("call.barge_in", item_id=intr.item_id, heard_ms=round(intr.heard_ms, 1),
                      sent_ms=round(intr.sent_ms, 1), truncate_ms=end_ms)

    # ------------------------------------------------------------------ pacing
    async def _pacer(self) -> None:
        wake = self._wake
        try:
            while True:
                await wake.wait()
                wake.clear()
                await self._drain(paced=True)
        except EndpointClosed:
            return  # VAIC went away: the handler task ends the call
        except Exception as e:
            self.log.error("call.pacer_internal_error", **exc_fields(e))
            self._fail("internal_error", f"{type(e).__name__}: {e}"[:200])

    def _arm(self, due: float, now: float) -> None:
        if self._pacer_timer is not None:
            self._pacer_timer.cancel()
        self._pacer_timer = asyncio.get_running_loop().call_later(max(0.0, due - now),
                                                                   self._wake.set)

    async def _drain(self, paced: bool = False) -> None:
        """Send every due playout entry; arm the pacer for the next one. One drainer at a time."""
        if self._draining:
            return
        self._draining = True
        try:
            po = self.playout
            while not self._ending:
                now = time.monotonic()
                due = po.due(now)
                if due is None:
                    break
                if due > now:
                    self._arm(due, now)
                    break
                if paced and po.pending[0].kind == CHUNK:  # audio only, not the delayed stops
                    self.stats.pacer_late.record(int((now - due) * 1_000_000))
                await self._emit(po.take(now))
        finally:
            self._draining = False

    async def _emit(self, tk: Taken) -> None:
        gen = self._gen
        send = self.ac.send
        if tk.stop_first and self._stream_id is not None:
            sid, self._stream_id = self._stream_id, None
            await send(ac.encode(ac.PlayStreamStop(streamId=sid)))
        if gen != self._gen or tk.entry.kind != CHUNK:
            return
        if tk.start:
            sid = self.proto.next_stream_id()
            self._chunk_prefix, self._chunk_suffix = ac.chunk_template(sid)
            self._stream_id = sid
            self.counters.play_streams += 1
            assert self._neg is not None
            await send(ac.encode(ac.PlayStreamStart(streamId=sid, mediaFormat=self._neg.ac.name)))
            if gen != self._gen:
                return
        self.counters.frames_down += 1
        payload = tk.entry.payload
        await send(self._chunk_prefix + payload + self._chunk_suffix)
        st = self.stats
        st.frames_down += 1
        st.bytes_down += len(payload)
        if self._t_first_delta_ns:
            st.turn_overhead.record((perf_counter_ns() - self._t_first_delta_ns) // 1000)
            self._t_first_delta_ns = 0
