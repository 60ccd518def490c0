"""The I/O shell of one call: moves bytes and time between two sockets and a `CallSession`.

All call logic is in `session.CallSession` (Sans-I/O). This module only:
- runs the VAIC receive pump (the connection's handler task) and, once OpenAI is dialled, the
  OpenAI receive pump (one task), feeding each frame to the session with `monotonic_ns()`;
- sends what the session queued (`to_vaic`, `to_openai`) with `send_nowait` (sends never wait
  for a peer: `transport.Limits` bounds a peer that does not read);
- keeps one timer armed at `session.next_deadline_ns()`;
- carries out the session's effects: dial OpenAI, close a side, write a log line, stop;
- records the forward latencies (it owns the clock) and the session's `marks`.
Hot path per caller frame: recv -> `vaic_frame` -> `send_nowait` -> one histogram record; no
task, no timer, no log line, no list.

Sockets can be swapped mid-call (`swap_openai`, `swap_vaic`): the session decides what to re-send.
"""

from __future__ import annotations

import asyncio
from time import monotonic_ns
from typing import Any, Awaitable, Callable, Coroutine

from .config import Config, Secrets
from .log import exc_fields, get_logger
from .recording import CallRecorder, for_call
from .control import RunTool
from .session import (FORWARDED, CallSession, CloseOpenAI, CloseVaic, Dial, Finished, Log,
                      Phase, Resume, Transcript, Upstream)
from .transcripts import TranscriptFile
from .webhooks import default_runner
from .stalls import NEVER_US, StallWatch
from .stats import Stats
from .transport import ConnectFailed, Endpoint, EndpointClosed, Limits, dial

Dialer = Callable[..., Awaitable[Endpoint]]
# the server's lookup for session.resume: the call waiting for `conversation_id` adopts the
# endpoint and is returned, or None
Resumer = Callable[[str, Endpoint], "Call | None"]
VAIC_CLOSE_TIMEOUT_S = 2.0


def limits_of(cfg: Config) -> Limits:
    s = cfg.server
    return Limits(send_buffer_bytes=s.send_buffer_bytes, send_timeout_s=s.send_timeout_s,
                  recv_queue_bytes=s.recv_queue_bytes, max_fragments=s.max_fragments)


class Call:
    """A call from its VAIC socket's upgrade to `call.end`. Use: `await Call(...).run()`."""

    def __init__(self, ac_end: Endpoint, cfg: Config, secrets: Secrets, *,
                 dialer: Dialer = dial, call_id: str = "", stats: Stats | None = None,
                 resumer: Resumer | None = None, admit: Callable[[], bool] | None = None,
                 stalls: StallWatch | None = None) -> None:
        self.ac: Endpoint | None = ac_end
        self._stalls = stalls    # the daemon's slow-frame watch (stalls.py); None: not watched
        self.up: Endpoint | None = None
        self.cfg = cfg
        self.stats = stats if stats is not None else Stats()
        self.session = CallSession(cfg, secrets, self.stats, monotonic_ns(), call_id, admit=admit)
        self._dialer = dialer
        self._resumer = resumer
        self._attached = asyncio.Event()   # set when a VAIC socket is (re)attached or the call ends
        self.done = asyncio.Event()        # set when the call is over and its sockets are closed
        self._adopter: Call | None = None  # the call this socket was handed to (session.resume)
        self.log = get_logger(call_id=call_id) if call_id else get_logger()
        self._log_id = call_id
        self._loop = asyncio.get_running_loop()
        # [recording]: the wire recorder, None when off (it sets this to None itself once it stops)
        self.rec: CallRecorder | None = for_call(self, cfg, self.session)
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0
        self._up_tasks: set[asyncio.Task[None]] = set()
        self._tool_tasks: set[asyncio.Task[None]] = set()   # webhook tools in flight
        self._transcript: TranscriptFile | None = None
        self._closing: set[asyncio.Task[None]] = set()
        self._finished = False
        self._in_after = False

    # -- read-only views for tests and the server
    @property
    def end_reason(self) -> str:
        return self.session.end_reason

    @property
    def counters(self) -> Any:
        return self.session.counters

    @property
    def last_truncate(self) -> tuple[str, int] | None:
        return self.session.last_truncate

    # ------------------------------------------------------------------ lifecycle
    async def run(self) -> None:
        try:
            self._rearm()        # session.initiate has a deadline from the start
            await self._pump_up()
        except Exception as e:  # a bug in the shell: never a traceback towards the caller
            self.session.internal_error(e, monotonic_ns())
            self._after()
        finally:
            await self._shutdown()

    @property
    def adopter(self) -> "Call | None":
        """The call this socket was handed to by its `session.resume`: the socket lives on
        there, so whoever runs this one must keep the connection open until `adopter.done`."""
        return self._adopter

    def shutdown(self) -> None:
        """The drain is over: hang up politely (`CallSession.shutdown`); the call then ends
        as any hung-up call does (VAIC's session.end, or `call.hangup_grace_s`)."""
        if not self._finished:
            self.session.shutdown(monotonic_ns())
            self._after()

    def abort(self) -> None:
        """Abort both sockets at once (a forced shutdown); the pumps then end the call."""
        self.session.abandon("server_shutdown", "aborted")
        for ep in (self.up, self.ac):
            if ep is not None:
                ep.abort()
        self._after()            # Finished: wakes a pump waiting for a resume

    async def _shutdown(self) -> None:
        sess = self.session
        sess.abandon("internal_error", "the call's shell stopped")   # no-op when it has ended
        self._after()
        self._finished = True
        self._attached.set()
        if self._timer is not None:
            self._timer.cancel()
        for task in list(self._tool_tasks):
            task.cancel()
        for task in list(self._up_tasks):
            if not task.done():
                task.cancel()
                try:
                    await task       # a dial completing now is aborted by the task itself
                except BaseException:
                    pass
        if self.up is not None:
            self._close_up(self.up)
        if self.ac is not None:  # both sides close at once, each bounded by its own timeout
            self._track(self._close_vaic(self.ac))
        while True:
            pending = [t for t in self._closing if not t.done()]
            if not pending:
                break
            await asyncio.gather(*pending, return_exceptions=True)
        self._rebind()
        if sess.end_reason == "handed_over":
            self.log.info("call.resume_handoff")
        elif sess.end_reason != "validate":   # a connectivity check (call.validate) is no call
            self.log.info("call.end", **sess.end_fields(monotonic_ns()))
        if self.rec is not None:
            self.rec.close(sess.end_reason)
        if self._transcript is not None:
            self._transcript.close()
        self.done.set()

    # ------------------------------------------------------------------ caller -> model
    async def _pump_up(self) -> None:
        sess = self.session
        vaic_frame = sess.vaic_frame
        record_up = self.stats.up_forward.record
        slow_us = self._stalls.frame_us if self._stalls is not None else NEVER_US
        while not self._finished:
            ep = self.ac
            if ep is None:       # detached: waiting for session.resume on a new socket
                self._attached.clear()
                await self._attached.wait()
                continue
            try:
                frame = await ep.recv()
            except EndpointClosed as e:
                if self.ac is not ep or self._finished:   # swapped, or we closed it
                    continue
                if self.rec is not None:
                    self.rec.note("vaic_closed", code=e.code, cause=e.cause)
                sess.vaic_lost(e.code, e.cause, monotonic_ns())
                if sess.vaic_gone and not self._finished:   # kept for a resume
                    self.ac = None
                    ep.abort()
                self._after()
                continue
            t0 = monotonic_ns()
            out = vaic_frame(frame, t0)
            rec = self.rec
            if rec is not None:
                rec.vaic_in(frame, t0)
            if out is not None:
                up = self.up
                if up is not None:
                    try:
                        up.send_nowait(out)
                    except EndpointClosed:   # closing: the OpenAI pump reports it soon; until
                        sess.caller_audio_unsent(out)   # then the audio waits for a new session
                    else:
                        us = (monotonic_ns() - t0) // 1000
                        record_up(us)
                        if us >= slow_us:
                            self._slow_frame("up", us, t0)
                        if rec is not None:
                            rec.openai_out(out, t0)
                continue     # a caller chunk it returns is all `vaic_frame` queued
            if sess.to_vaic or sess.to_openai or sess.effects or sess.marks:
                self._after()

    # ------------------------------------------------------------------ model -> caller
    async def _upstream(self, eff: Dial) -> None:
        sess = self.session
        o = self.cfg.openai
        try:
            up = await self._dialer(eff.url, eff.headers, timeout_s=o.connect_timeout_s,
                                    max_size=o.max_message_bytes, close_timeout_s=o.close_timeout_s,
                                    limits=limits_of(self.cfg))
        except ConnectFailed as e:
            sess.openai_connect_failed(e.reason, monotonic_ns(), e.status, e.retry_after_s)
            self._after()
            return
        except asyncio.CancelledError:
            raise
        except Exception as e:  # a bug must not leave the caller in silence with nothing logged
            self.log.error("call.upstream_internal_error", **exc_fields(e))
            sess.internal_error(e, monotonic_ns())
            self._after()
            return
        if self._finished or sess.upstream is not Upstream.DIALLING:
            up.abort()          # the call ended while we dialled: never keep a billed session
            return
        self.up = up
        sess.openai_connected(monotonic_ns())
        self._after()
        await self._pump_down(up)

    async def _pump_down(self, up: Endpoint) -> None:
        sess = self.session
        openai_frame = sess.openai_frame
        record_down = self.stats.down_forward.record
        slow_us = self._stalls.frame_us if self._stalls is not None else NEVER_US
        while True:
            try:
                frame = await up.recv()
            except EndpointClosed as e:
                if self.up is up:
                    self._openai_gone(up, e)
                return
            if self.up is not up:    # a replaced session's socket, still draining: not ours
                continue
            t0 = monotonic_ns()
            rec = self.rec
            if rec is not None:
                rec.openai_in(frame, t0)
            r = openai_frame(frame, t0)
            if r == FORWARDED and self._timer is not None and not (
                    sess.to_openai or sess.effects or sess.marks):
                # the usual delta: its chunks go out now and nothing else was queued; it moved
                # no deadline earlier (`CallSession.openai_frame`), so the armed timer stands
                self._send_all(self.ac, sess.to_vaic, vaic=True)
            else:
                self._after()
            if r == FORWARDED:
                us = (monotonic_ns() - t0) // 1000
                record_down(us)
                if us >= slow_us:
                    self._slow_frame("down", us, t0)

    def _slow_frame(self, direction: str, us: int, t0: int) -> None:
        """A frame took `slow_frame_ms` or more (rare: off the per-frame path)."""
        if self._stalls is not None:
            self._stalls.slow_frame(self.session.call_id, direction, us, t0, monotonic_ns())

    def _openai_gone(self, up: Endpoint, e: EndpointClosed) -> None:
        if self.up is up:
            self.up = None
            up.abort()
        if self.rec is not None:
            self.rec.note("openai_closed", code=e.code, cause=e.cause)
        self.session.openai_lost(e.code, e.cause, e.reason, monotonic_ns())
        self._after()

    # ------------------------------------------------------------------ outputs and effects
    def _after(self) -> None:
        """Send what the session queued, carry out its effects, re-arm the timer."""
        if self._in_after:       # re-entered from an effect: the outer loop picks it up
            return
        self._in_after = True
        sess = self.session
        try:
            while sess.to_vaic or sess.to_openai or sess.effects or sess.marks:
                if sess.to_vaic:
                    self._send_all(self.ac, sess.to_vaic, vaic=True)
                if sess.to_openai:
                    self._send_all(self.up, sess.to_openai, vaic=False)
                if sess.marks:
                    now = monotonic_ns()
                    for hist, t0 in sess.marks:
                        hist.record((now - t0) // 1000)
                    sess.marks.clear()
                if sess.effects:
                    effects = list(sess.effects)
                    sess.effects.clear()
                    for eff in effects:
                        self._do(eff)
        finally:
            self._in_after = False
        self._rearm()

    def _send_all(self, ep: Endpoint | None, frames: list[str], vaic: bool) -> None:
        try:
            if ep is not None:
                rec = self.rec
                if rec is not None:
                    rec.sent(frames, vaic)
                for f in frames:
                    ep.send_nowait(f)
        except EndpointClosed:
            pass   # that side's receive pump reads what is still queued, then sees the close
        finally:
            frames.clear()

    def _do(self, eff: Any) -> None:
        t = type(eff)
        if t is Log:
            self._rebind()
            getattr(self.log, eff.level)(eff.event, **eff.fields)
        elif t is Dial:
            task = self._loop.create_task(self._upstream(eff), name=f"upstream-{self.session.call_id}")
            self._up_tasks.add(task)
            task.add_done_callback(self._up_tasks.discard)
        elif t is Resume:
            adopter = self._resumer(eff.conversation_id, self.ac) if (
                self._resumer is not None and self.ac is not None) else None
            if adopter is None:
                self.session.resume_refused(monotonic_ns())
            else:
                self._adopter = adopter
                self.ac = None          # the socket is the adopter's now
                self.session.resume_handed_over()
        elif t is CloseOpenAI:
            up, self.up = self.up, None
            if up is not None:
                self._close_up(up)
        elif t is CloseVaic:
            pass                 # the VAIC socket is closed last, in _shutdown
        elif t is Transcript:
            self._transcribe(eff)
        elif t is RunTool:
            if not self._finished:
                task = self._loop.create_task(default_runner().run(eff, self._tool_done),
                                              name=f"tool-{eff.name}")
                self._tool_tasks.add(task)
                task.add_done_callback(self._tool_tasks.discard)
        elif t is Finished:
            self._finished = True
            self._attached.set()
            ac = self.ac
            if ac is not None:   # wakes the VAIC pump if it is waiting in recv()
                self._track(self._close_vaic(ac))

    def _tool_done(self, call_id: str, output: str, ok: bool) -> None:
        if not self._finished:
            self.session.tool_result(call_id, output, ok, monotonic_ns())
            self._after()

    def _transcribe(self, eff: Transcript) -> None:
        """One turn's words: a `call.transcript` log event, and the call's JSONL file when its
        profile asks for one and `[transcripts] dir` is set."""
        tc = self.cfg.transcripts
        self._rebind()
        self.log.info("call.transcript", role=eff.role, t_ms=eff.at_ms,
                      text=eff.text if tc.log_text else None, chars=len(eff.text))
        if not (tc.dir and self.session.profile.transcripts):
            return
        try:
            if self._transcript is None:
                self._transcript = TranscriptFile(tc.dir, self.session.call_id, self.session.profile.name,
                                                  tc.retention_days)
            self._transcript.add(eff.at_ms, eff.role, eff.text)
        except OSError as e:    # the call goes on; the log still has the words
            self.log.warning("call.transcript_write_failed", error=str(e)[:200])

    def _rebind(self) -> None:
        cid = self.session.call_id
        if cid != self._log_id:
            self._log_id = cid
            self.log = get_logger(call_id=cid)

    def _track(self, coro: Coroutine[Any, Any, None]) -> None:
        task = self._loop.create_task(coro)
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)

    def _close_up(self, up: Endpoint) -> None:
        self._track(self._close_openai(up))

    async def _close_openai(self, up: Endpoint) -> None:
        """An open Realtime session is billed: closed within `openai.close_timeout_s`, or aborted."""
        try:
            await asyncio.wait_for(up.close(1000, "call ended"), self.cfg.openai.close_timeout_s)
        except Exception:
            up.abort()
        if up.close_code is None:
            up.abort()

    async def _close_vaic(self, ac: Endpoint) -> None:
        try:
            await asyncio.wait_for(ac.close(1000, "call ended"), VAIC_CLOSE_TIMEOUT_S)
        except Exception:
            ac.abort()

    # ------------------------------------------------------------------ time
    def _rearm(self) -> None:
        """Keep one timer armed no later than the session's next deadline. A timer already armed
        earlier stays: it fires, the session finds nothing due yet, and it is re-armed then
        (cheaper than replacing the handle at every delta that moves the deadline later)."""
        d = self.session.next_deadline_ns()
        if self._finished or d == self._timer_at or (d and self._timer_at and self._timer_at < d):
            return
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._timer_at = d or 0
        if d:
            self._timer = self._loop.call_later(max(0.0, (d - monotonic_ns()) / 1e9), self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = 0
        self.session.timer(monotonic_ns())
        self._after()

    # ------------------------------------------------------------------ swapping sockets
    async def swap_openai(self, new: Endpoint) -> None:
        """Replace the OpenAI socket mid-call; the session re-sends its configuration."""
        old, self.up = self.up, None
        for task in list(self._up_tasks):
            if not task.done():
                task.cancel()
                try:
                    await task
                except BaseException:
                    pass
        if old is not None:
            self._close_up(old)
        sess = self.session
        sess.openai_swap(monotonic_ns())
        self.up = new
        sess.openai_connected(monotonic_ns())
        self._after()
        task = self._loop.create_task(self._pump_down(new))
        self._up_tasks.add(task)
        task.add_done_callback(self._up_tasks.discard)

    def adopt_vaic(self, new: Endpoint) -> None:
        """session.resume: this call, waiting since its VAIC socket dropped, continues on `new`
        (accepted again; the same OpenAI session)."""
        self.ac = new
        if self.rec is not None:
            self.rec.note("vaic_attached")
        self.session.vaic_attached(monotonic_ns())
        self._after()
        self._attached.set()

    @property
    def waiting_for_resume(self) -> bool:
        sess = self.session
        return (self.ac is None and sess.vaic_gone and not self._finished
                and sess.phase is Phase.ACTIVE)

    def swap_vaic(self, new: Endpoint) -> None:
        """Replace the VAIC socket mid-call (the same call, the same OpenAI session): the old
        one is detached and closed, then the new one adopted as a resumed socket would be."""
        old, self.ac = self.ac, None
        self.session.vaic_detached(monotonic_ns())
        if old is not None:
            self._track(self._close_vaic(old))
        self.adopt_vaic(new)
