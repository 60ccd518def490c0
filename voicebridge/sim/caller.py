"""Simulated AudioCodes VoiceAI Connect (VAIC) caller: the Bot API WebSocket *client* that dials a bot.

Used by end-to-end tests, ``make demo`` and the load benchmark. It follows the simulator contract of
``/work/shared/protocols/audiocodes-bot-api.md`` §6:

1. connect (``Authorization: Bearer <token>`` unless the token is None; no subprotocol, no
   compression, ``max_size`` 16 MiB); send ``session.initiate``; expect ``session.accepted`` (its
   ``mediaFormat`` must be in the offer) or ``session.error``;
2. send the ``activities`` ``start`` event, then ``userStream.start``; expect ``userStream.started``;
3. stream ``userStream.chunk`` in real time for the whole script: one frame every ``frame_ms`` on
   absolute deadlines (frame k leaves at ``start + k * frame_ms``: late frames go out at once, so
   lateness never accumulates into drift);
4. at the end: ``hangup="caller"`` sends ``userStream.stop``, expects ``userStream.stopped``, sends
   ``session.end`` (``client-disconnected``) and closes; ``hangup="drop"`` just closes.

Script items beyond audio: ``Dtmf`` (VAIC's ``DTMF`` events, per digit or collected),
``NoUserInput`` (VAIC's ``noUserInput`` event) and ``WaitForActivity`` (wait for a bot activity
such as ``transfer``). With ``CallerConfig.play_finished`` VAIC's ``playFinished`` event is sent
per finished play stream with its ``playedDurationMS``; ``CallerConfig.transfer_result`` decides
whether a bot transfer ends the call or fails with a ``transferStatus`` event (see there).

A ``DropAndResume`` script item is a network blip: the socket is aborted (no close frame, no
``session.end``), and after its gap a new websocket sends ``session.resume`` with the same
``conversationId``; on ``session.accepted`` the user stream is started again and the script goes
on (``CallResult.resumes`` records each attempt).

A reader coroutine handles bot messages at any time, feeds bot audio into the analytic
:class:`~voicebridge.sim.playout_model.PlayoutModel` and records protocol violations instead of
raising. Every message this module sends carries ``conversationId``. All waits are bounded: each
step by ``accept_timeout_s`` or its script timeout, the whole call by ``call_timeout_s``.

Readings chosen where the spec is silent (all unverified against a real VAIC):
* ``session.error`` from the bot: record the reason and close the socket without ``session.end``.
* A bot ``hangup`` (or a ``transfer`` VAIC carries out) ends the call at once: audio still
  buffered then counts as ``cut_ms`` (so a bridge that hangs up before its goodbye finished
  playing is visible); ``CallResult.bot_activities`` has the unplayed amount at that moment.
* ``playFinished`` is sent once per stream when it is finished (played out, or flushed by the stop
  policy), within one frame of that instant, as ``activities`` ``[{"type":"event",
  "name":"playFinished","value":{"playedDurationMS":N,"status":"finished"}}]`` (the shape of a
  real call); ``N`` is the stream's heard ms.
* Only ``userStream.speech.started`` (not ``hypothesis``) triggers the barge-in flush.
* ``playStream.start`` while a stream is active: a violation; the old stream is stopped implicitly
  (stop policy applies) and the new one starts. A ``playStream.start`` without ``mediaFormat`` is a
  violation and the accepted format is assumed.
* A RIFF header at the start of a chunk of a ``raw/`` play stream is a violation (it would be
  played as noise); in ``wav/`` play streams it is stripped (see ``caller_audio``).

Layout: this module holds the call driver (``_Call``), :func:`run_call`,
:func:`validate_connection` and the CLI, and re-exports the script items (``caller_script``) and
the config/result records with :func:`format_timeline` (``caller_records``). The handling of bot
messages is ``caller_reader._CallReader``, which ``_Call`` inherits.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import functools
import json
import os
import sys
import time
import uuid
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any, NoReturn

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from voicebridge.sim.caller_audio import FORMATS, AudioFormat, SpeechSource, wav_header
from voicebridge.sim.caller_reader import _CallReader
from voicebridge.sim.caller_records import (
    TRANSFER_RESULTS,
    BotActivity,
    CallerConfig,
    CallResult,
    Direction,
    EndReason,
    Event,
    Resume,
    SentActivity,
    TransferResult,
    Turn,
    format_timeline,
)
from voicebridge.sim.caller_script import (
    BargeIn,
    DropAndResume,
    Dtmf,
    NoUserInput,
    ScriptItem,
    Silence,
    Speak,
    WaitForActivity,
    WaitForBot,
    default_script,
    parse_script,
)
from voicebridge.sim.playout_model import STOP_POLICIES, PlayoutModel

__all__ = [
    "BargeIn",
    "BotActivity",
    "CallResult",
    "CallerConfig",
    "Direction",
    "DropAndResume",
    "Dtmf",
    "EndReason",
    "Event",
    "NoUserInput",
    "Resume",
    "ScriptItem",
    "SentActivity",
    "Silence",
    "Speak",
    "TransferResult",
    "Turn",
    "WaitForActivity",
    "WaitForBot",
    "default_script",
    "format_timeline",
    "main",
    "parse_script",
    "run_call",
    "validate_connection",
]

MAX_SIZE_BYTES = 16 * 1024 * 1024
CLOSE_TIMEOUT_S = 2.0
CALL_TIMEOUT_MARGIN_S = 5.0
MAX_VIOLATIONS = 200
"""Violations kept verbatim per call; further ones are only counted (``violations_suppressed``)."""


def _default_call_timeout_s(cfg: CallerConfig) -> float:
    script_ms = 0.0
    for item in cfg.script:
        if isinstance(item, (Speak, Silence)):
            script_ms += item.ms
        elif isinstance(item, (WaitForBot, WaitForActivity)):
            script_ms += item.timeout_ms
        elif isinstance(item, DropAndResume):
            script_ms += item.after_ms + item.gap_ms + 2000 * cfg.accept_timeout_s
        elif isinstance(item, Dtmf):
            script_ms += item.gap_ms * len(item.digits) + cfg.frame_ms
        elif isinstance(item, BargeIn):
            script_ms += item.timeout_ms + item.ms
    return 4 * cfg.accept_timeout_s + script_ms / 1000 + CALL_TIMEOUT_MARGIN_S


def _iso_now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _dumps(obj: dict[str, Any]) -> str:
    return json.dumps(obj, separators=(",", ":"))


def _connect(url: str, token: str | None, open_timeout_s: float) -> connect:
    headers = {"Authorization": f"Bearer {token}"} if token is not None else None
    return connect(
        url,
        additional_headers=headers,
        compression=None,
        max_size=MAX_SIZE_BYTES,
        open_timeout=open_timeout_s,
        close_timeout=CLOSE_TIMEOUT_S,
        proxy=None,
    )


class _CallEnded(Exception):
    """Raised inside the driver when the reader has already ended the call."""


# --- the call --------------------------------------------------------------------------------------


class _Call(_CallReader):
    """State of one running call: a driver task (handshake, script, hang-up) and a reader task."""

    def __init__(self, cfg: CallerConfig) -> None:
        known = [f for f in cfg.formats if f in FORMATS]
        if not known:
            raise ValueError(f"no format this simulator can generate in {cfg.formats!r}")
        if cfg.frame_ms <= 0:
            raise ValueError("frame_ms must be positive")
        if cfg.stop_policy not in STOP_POLICIES:
            raise ValueError(f"stop_policy must be one of {STOP_POLICIES}")
        if cfg.hangup not in ("caller", "drop"):
            raise ValueError("hangup must be 'caller' or 'drop'")
        outcomes = [cfg.transfer_result] if isinstance(cfg.transfer_result, str) else list(cfg.transfer_result)
        if not outcomes or any(o not in TRANSFER_RESULTS for o in outcomes):
            raise ValueError(f"transfer_result must be one of {TRANSFER_RESULTS} or a non-empty list of them")
        if cfg.transfer_status_delay_ms < 0:
            raise ValueError("transfer_status_delay_ms must not be negative")
        self.cfg = cfg
        self.cid = cfg.conversation_id or str(uuid.uuid4())
        self._cid_json = json.dumps(self.cid)
        self.result = CallResult(url=cfg.url, conversation_id=self.cid)
        self.model = PlayoutModel(cfg.stop_policy, cfg.record_audio)
        self.result.streams = self.model.streams
        self.fmt: AudioFormat = FORMATS[known[0]]
        self.t0 = self.result.started_at = time.monotonic()
        self._dropping = False  # a DropAndResume aborted the socket and is resuming
        self._reattached = asyncio.Event()  # set when the resumed socket may be read
        self.end_t: float | None = None
        self.ws: ClientConnection | None = None
        self.accepted = asyncio.Event()
        self.user_started = asyncio.Event()
        self.user_stopped = asyncio.Event()
        self._user_start_pending = False
        self._user_stop_pending = False
        self._stream_ids: set[str] = set()
        self._speech_ends: list[float] = []
        self._last_utterance_end = 0.0
        self._ended_by_bot = False
        self._stream_start = 0.0  # monotonic s when the first user frame was due
        self._sent_audio_ms = 0
        self._source = SpeechSource(self.fmt)
        self._transfers = 0  # transfer activities seen (CallerConfig.transfer_outcome)
        self._tasks: set[asyncio.Task[None]] = set()  # delayed sends (transferStatus)
        self._activity_consumed: dict[str, int] = {}  # WaitForActivity: activities used per name

    # --- helpers ---------------------------------------------------------------------------------

    def now(self) -> float:
        """Milliseconds since call start."""
        return (time.monotonic() - self.t0) * 1000.0

    def _event(self, direction: Direction, type_: str, detail: str = "", t: float | None = None) -> None:
        self.result.events.append(Event(self.now() if t is None else t, direction, type_, detail))

    def _violation(self, text: str) -> None:
        if len(self.result.violations) < MAX_VIOLATIONS:
            self.result.violations.append(f"{self.now():.0f} ms: {text}")
        else:
            self.result.violations_suppressed += 1

    def _end(self, reason: EndReason) -> None:
        """Record why the call ends; the first reason wins."""
        if self.result.end_reason is None:
            self.result.end_reason = reason
            self.end_t = self.now()

    async def _send(self, msg: dict[str, Any], detail: str = "") -> None:
        assert self.ws is not None
        msg = {"type": msg["type"], "conversationId": self.cid, **msg}
        self._event("out", msg["type"], detail)
        await self.ws.send(_dumps(msg))

    async def _send_activity(self, activity: dict[str, Any], detail: str, stream_id: str | None = None) -> None:
        """Send one activity event (recorded in ``CallResult.sent_activities``)."""
        base = {"id": str(uuid.uuid4()), "timestamp": _iso_now(), "language": "en-US", "type": "event"}
        self.result.sent_activities.append(
            SentActivity(self.now(), str(activity.get("name")), activity.get("value"), stream_id))
        await self._send({"type": "activities", "activities": [{**base, **activity}]}, detail)

    async def _wait(self, event: asyncio.Event, timeout_s: float) -> bool:
        try:
            async with asyncio.timeout(timeout_s):
                await event.wait()
            return True
        except TimeoutError:
            return False

    # --- run -------------------------------------------------------------------------------------

    async def run(self) -> CallResult:
        cfg = self.cfg
        try:
            self.ws = await _connect(cfg.url, cfg.token, cfg.accept_timeout_s)
        except InvalidStatus as exc:
            self._connect_failed(f"HTTP {exc.response.status_code}")
            return self.result
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            self._connect_failed(f"{type(exc).__name__}: {exc}")
            return self.result
        self._event("sim", "connected", cfg.url)
        driver = asyncio.create_task(self._drive())
        reader = asyncio.create_task(self._read())
        timeout_s = cfg.call_timeout_s if cfg.call_timeout_s is not None else _default_call_timeout_s(cfg)
        done, _ = await asyncio.wait({driver, reader}, timeout=timeout_s, return_when=asyncio.FIRST_COMPLETED)
        if not done:
            self._violation(f"call not finished within call_timeout_s={timeout_s:.1f}")
            self._end("timeout")
        for task in (driver, reader, *self._tasks):
            task.cancel()
        outcomes = await asyncio.gather(driver, reader, *self._tasks, return_exceptions=True)
        await self.ws.close()
        self.result.close_code = self.ws.close_code
        self._finish()
        for outcome in outcomes:  # a bug in this module must not pass silently
            if isinstance(outcome, Exception) and not isinstance(outcome, ConnectionClosed):
                raise outcome
        return self.result

    def _connect_failed(self, text: str) -> None:
        self.result.connect_error = text
        self._event("sim", "connect-failed", text)
        self._end("connect-failed")
        self.result.duration_ms = self.now()

    def _finish(self) -> None:
        end_t = self.end_t if self.end_t is not None else self.now()
        self.model.end_call(end_t)
        self.result.duration_ms = self.now()
        for speech_end in self._speech_ends:
            firsts = (s.first_chunk_t for s in self.model.streams if s.first_chunk_t is not None)
            first = next((f for f in firsts if f >= speech_end), None)
            latency = None if first is None else first - speech_end
            self.result.turns.append(Turn(speech_end, first, latency))
        self._event("sim", "call.end", f"{self.result.end_reason} close_code={self.result.close_code}")

    # --- driver: handshake, script, hang-up --------------------------------------------------------

    async def _drive(self) -> None:
        cfg = self.cfg
        try:
            await self._send(
                {
                    "type": "session.initiate",
                    "botName": cfg.bot_name,
                    "caller": cfg.caller,
                    "expectAudioMessages": True,
                    "supportedMediaFormats": list(cfg.formats),
                },
                "offer=" + ",".join(cfg.formats),
            )
            if not await self._wait(self.accepted, cfg.accept_timeout_s):
                self._violation(f"no session.accepted within {cfg.accept_timeout_s} s")
                self._end("timeout")
                return
            if cfg.send_start_activity:
                await self._send_start_activity()
            self._user_start_pending = True
            await self._send({"type": "userStream.start"})
            if not await self._wait(self.user_started, cfg.accept_timeout_s):
                self._violation(f"no userStream.started within {cfg.accept_timeout_s} s")
                self._end("timeout")
                return
            await self._run_script()
            if cfg.hangup == "drop":
                self._event("sim", "drop", "closing without session.end")
                self._end("caller-drop")
                return
            self._user_stop_pending = True
            await self._send({"type": "userStream.stop"})
            if not await self._wait(self.user_stopped, cfg.accept_timeout_s):
                self._violation(f"no userStream.stopped within {cfg.accept_timeout_s} s")
            self._end("caller-hangup")
            await self._send({"type": "session.end", "reasonCode": "client-disconnected", "reason": "Client Side"})
        except ConnectionClosed:
            self._end("socket-closed")
        except _CallEnded:
            pass

    async def _send_start_activity(self) -> None:
        cfg = self.cfg
        params = {
            "vaigConversationId": self.cid,
            "caller": cfg.caller,
            "callee": cfg.callee,
            "calleeHost": "127.0.0.1",
            "callerHost": "127.0.0.1",
            "callerDisplayName": cfg.caller,
        }
        await self._send_activity({"name": "start", "parameters": params}, "start")

    async def _run_script(self) -> None:
        self._stream_start = time.monotonic()
        self._sent_audio_ms = 0
        self._source = SpeechSource(self.fmt)  # the accepted format is known only now
        for item in self.cfg.script:
            if isinstance(item, Speak):
                await self._speak(item.ms)
            elif isinstance(item, Silence):
                self._event("sim", "silence", f"{item.ms} ms")
                await self._stream_audio(item.ms, speech=False)
            elif isinstance(item, WaitForBot):
                self._event("sim", "wait-for-bot", f"timeout {item.timeout_ms} ms")
                if not await self._stream_silence_until(self._bot_answered, item.timeout_ms):
                    self._script_timeout("wait-for-bot")
            elif isinstance(item, DropAndResume):
                await self._drop_and_resume(item)
            elif isinstance(item, Dtmf):
                await self._dtmf(item)
            elif isinstance(item, NoUserInput):
                await self._wait_spoken()
                await self._send_activity({"name": "noUserInput", "value": item.count},
                                          f"noUserInput {item.count}")
                self._last_utterance_end = self.now()
            elif isinstance(item, WaitForActivity):
                await self._wait_for_activity(item)
            else:
                self._event("sim", "barge-in.wait", f"until {item.after_heard_ms} ms heard")
                heard_enough = functools.partial(self._heard_enough, item.after_heard_ms)
                if not await self._stream_silence_until(heard_enough, item.timeout_ms):
                    self._script_timeout("barge-in.wait")
                await self._speak(item.ms)

    async def _wait_spoken(self) -> None:
        """Sleep until the user audio sent so far has been spoken (its real-time end)."""
        delay = self._stream_start + self._sent_audio_ms / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if self.result.end_reason is not None:
            raise _CallEnded

    async def _dtmf(self, item: Dtmf) -> None:
        """Key presses: one DTMF event per digit (``gap_ms`` of silence between), or one."""
        presses = list(item.digits) if item.per_digit else [item.digits]
        for i, digits in enumerate(presses):
            if i and item.gap_ms:
                await self._stream_audio(item.gap_ms, speech=False)
            await self._wait_spoken()
            await self._send_activity({"name": "DTMF", "value": digits}, f"DTMF {digits}")
        self._last_utterance_end = self.now()

    async def _wait_for_activity(self, item: WaitForActivity) -> None:
        """Silence until the next bot activity event named ``item.name`` (see WaitForActivity)."""
        key = item.name.lower()
        used = self._activity_consumed.get(key, 0)
        self._event("sim", "activity.wait", f"{item.name} #{used + 1}, timeout {item.timeout_ms} ms")

        def arrived() -> bool:
            return len(self.result.activities_named(key)) > used

        if not await self._stream_silence_until(arrived, item.timeout_ms):
            self._script_timeout(f"activity.wait {item.name}")
            return
        self._activity_consumed[key] = used + 1
        arrival = self.result.activities_named(key)[used].t_ms
        self._last_utterance_end = max(self._last_utterance_end, arrival)

    async def _drop_and_resume(self, item: DropAndResume) -> None:
        """Abort the socket, wait ``gap_ms``, resume on a new one (see :class:`DropAndResume`)."""
        cfg = self.cfg
        if item.after_ms > 0:
            self._event("sim", "silence", f"{item.after_ms} ms")
            await self._stream_audio(item.after_ms, speech=False)
        delay = self._stream_start + self._sent_audio_ms / 1000 - time.monotonic()
        if delay > 0:  # the drop comes when the audio sent so far has been spoken
            await asyncio.sleep(delay)
        assert self.ws is not None
        rec = Resume(drop_ms=self.now())
        self.result.resumes.append(rec)
        self._reattached.clear()
        self._dropping = True
        self._event("sim", "drop", f"socket aborted; session.resume in {item.gap_ms} ms")
        self.ws.transport.abort()
        if self.model.active is not None:
            self.model.stop(rec.drop_ms)  # the prompt ends with the connection (stop policy)
        await asyncio.sleep(item.gap_ms / 1000)
        try:
            new = await _connect(cfg.url, cfg.token, cfg.accept_timeout_s)
        except (OSError, InvalidHandshake, TimeoutError) as exc:
            text = f"HTTP {exc.response.status_code}" if isinstance(exc, InvalidStatus) else repr(exc)
            self._resume_failed(rec, "connect-failed", text, "connect-failed")
        rec.connected_ms = self.now()
        self._event("sim", "connected", f"{cfg.url} (resume)")
        self.ws = new
        await self._send({"type": "session.resume"})
        try:
            async with asyncio.timeout(cfg.accept_timeout_s):
                raw = await new.recv()
        except TimeoutError:
            self._violation(f"no answer to session.resume within {cfg.accept_timeout_s} s")
            self._resume_failed(rec, "timeout", "", "timeout")
        except ConnectionClosed as exc:
            self._resume_failed(rec, "error", f"socket closed ({exc})", "socket-closed")
        rec.reply_ms = self.now()
        try:
            msg = json.loads(raw)
        except ValueError:
            msg = None
        typ = msg.get("type") if isinstance(msg, dict) else None
        if typ == "session.error":
            assert isinstance(msg, dict)
            self.result.session_error = rec.detail = str(msg.get("reason", ""))
            self._event("in", typ, rec.detail, rec.reply_ms)
            self._ended_by_bot = True
            self._resume_failed(rec, "error", rec.detail, "session.error")
        if typ != "session.accepted":
            self._violation(f"expected session.accepted or session.error after session.resume: {str(raw)[:80]!r}")
            self._resume_failed(rec, "error", f"unexpected {typ}", "socket-closed")
        assert isinstance(msg, dict)
        rec.outcome, rec.detail = "accepted", str(msg.get("mediaFormat"))
        self._event("in", "session.accepted", f"mediaFormat={rec.detail} (resume)", rec.reply_ms)
        if rec.detail != self.result.accepted_format:
            self._violation(f"resume: mediaFormat {rec.detail!r} differs from {self.result.accepted_format!r}")
        self._dropping = False
        self._reattached.set()  # the reader goes on with the new socket
        self.user_started.clear()
        self._user_start_pending = True
        await self._send({"type": "userStream.start"})
        if not await self._wait(self.user_started, cfg.accept_timeout_s):
            self._violation(f"no userStream.started within {cfg.accept_timeout_s} s after resume")
            self._end("timeout")
            raise _CallEnded
        self._stream_start = time.monotonic() - self._sent_audio_ms / 1000  # no catching up the gap

    def _resume_failed(self, rec: Resume, outcome: Any, detail: str, end: EndReason) -> NoReturn:
        rec.outcome, rec.detail = outcome, detail
        self._event("sim", "resume.failed", f"{outcome} {detail}".rstrip())
        self._end(end)
        raise _CallEnded

    def _script_timeout(self, what: str) -> None:
        self.result.script_timeouts += 1
        self._event("sim", "script.timeout", what)

    async def _speak(self, ms: int) -> None:
        self._event("sim", "speak", f"{ms} ms")
        await self._stream_audio(ms, speech=True)
        self._last_utterance_end = self.now()
        self._speech_ends.append(self._last_utterance_end)
        self._event("sim", "speech.end", f"{ms} ms sent")

    async def _stream_audio(self, ms: int, speech: bool) -> None:
        frame_ms = self.cfg.frame_ms
        while ms > 0:
            n = min(frame_ms, ms)
            await self._send_frame(n, speech)
            ms -= n

    async def _stream_silence_until(self, done: Callable[[], bool], timeout_ms: int) -> bool:
        """Send silence frames until ``done()`` is true (checked before each frame) or timeout."""
        deadline = self.now() + timeout_ms
        while True:
            await self._poll_playout()
            if done():
                return True
            if self.now() >= deadline:
                return False
            await self._send_frame(self.cfg.frame_ms, speech=False)

    async def _send_frame(self, ms: int, speech: bool) -> None:
        """Send ``ms`` of audio at its absolute deadline ``stream start + audio already sent``."""
        assert self.ws is not None
        delay = self._stream_start + self._sent_audio_ms / 1000 - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        if self.result.end_reason is not None:
            raise _CallEnded  # the reader ended the call (bot hang-up...): no audio after session.end
        audio = self._source.speech(ms) if speech else self._source.silence(ms)
        if self._sent_audio_ms == 0 and self.fmt.container == "wav":
            audio = wav_header(self.fmt) + audio
        if self._sent_audio_ms == 0:
            self._event("out", "userStream.chunk", f"first chunk, {len(audio)} bytes")
        b64 = base64.b64encode(audio).decode("ascii")
        await self.ws.send(
            f'{{"type":"userStream.chunk","conversationId":{self._cid_json},"audioChunk":"{b64}"}}'
        )
        self._sent_audio_ms += ms
        self.result.chunks_sent += 1
        await self._poll_playout()

    async def _poll_playout(self) -> None:
        """Finish streams whose playout ended (exact analytic times); send playFinished if enabled."""
        if self.result.end_reason is not None:
            return  # after the end decision the model is closed at the end time, not later
        for stream in self.model.poll(self.now()):
            self._event(
                "sim",
                "playout.finished",
                f"stream {stream.stream_id}: heard {stream.heard_ms:.0f} of {stream.received_ms:.0f} ms",
                t=stream.finished_t,
            )
            if self.cfg.play_finished:
                played_ms = round(stream.heard_ms)
                value = {"playedDurationMS": played_ms, "status": "finished"}
                await self._send_activity({"name": "playFinished", "value": value},
                                          f"playFinished (stream {stream.stream_id}: {played_ms} ms)",
                                          stream_id=stream.stream_id)

    def _bot_answered(self) -> bool:
        t = self.now()
        answered = any(
            s.finished_t is not None and s.started_t >= self._last_utterance_end for s in self.model.streams
        )
        return answered and self.model.is_idle(t)

    def _heard_enough(self, after_heard_ms: int) -> bool:
        latest = self.model.latest
        if latest is None or latest.started_t < self._last_utterance_end:
            return False
        return self.model.heard_ms(latest, self.now()) >= after_heard_ms


# --- public API -----------------------------------------------------------------------------------


async def run_call(cfg: CallerConfig) -> CallResult:
    """Run one simulated call to the end and return what was observed.

    Never raises for anything the bot does (refused connection, HTTP 401, protocol violations,
    socket loss): those are in the result (``end_reason``, ``connect_error``, ``violations``).
    Raises ``ValueError`` for an unusable config. Bounded by ``cfg.call_timeout_s``.
    """
    return await _Call(cfg).run()


async def validate_connection(url: str, token: str | None = None, timeout_s: float = 5.0) -> dict[str, Any]:
    """Send ``{"type":"connection.validate"}`` on a fresh socket and return the bot's JSON reply.

    Raises ``TimeoutError`` if no reply within ``timeout_s``, ``ValueError`` if the reply is not a
    JSON object, and the websockets exceptions for a failed handshake (e.g. ``InvalidStatus`` 401).
    """
    async with asyncio.timeout(timeout_s):
        async with _connect(url, token, timeout_s) as ws:
            await ws.send(_dumps({"type": "connection.validate"}))
            reply = await ws.recv()
    if isinstance(reply, bytes):
        raise ValueError(f"binary reply to connection.validate ({len(reply)} bytes)")
    parsed = json.loads(reply)
    if not isinstance(parsed, dict):
        raise ValueError(f"reply to connection.validate is not a JSON object: {reply[:80]!r}")
    return parsed


# --- CLI ------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m voicebridge.sim.caller",
        description="Simulated AudioCodes VoiceAI Connect caller: dials a Bot API (WebSocket mode) bot, "
        "runs a script in real time and prints the call timeline. Exit status 1 on protocol violations, "
        "connection failure or timeout.",
    )
    add = parser.add_argument
    add("--url", required=True, help="bot URL; with the default config.toml: ws://127.0.0.1:8080/voicebridge")
    add("--token", default=os.environ.get("VOICEBRIDGE_TOKEN"),
        help="bearer token (default: $VOICEBRIDGE_TOKEN; no Authorization header if unset)")
    add("--format", dest="formats", action="append", metavar="FORMAT",
        help="offered media format, repeatable, in preference order (default raw/lpcm16_24, raw/mulaw); "
        f"known: {', '.join(FORMATS)}")
    add("--script", default="wait,speak:1500,wait",
        help="comma-separated: speak:MS, silence:MS, wait[:TIMEOUT_MS], bargein:AFTER_MS:MS[:TIMEOUT_MS], "
        "resume:GAP_MS[:AFTER_MS] (drop the socket, session.resume after GAP_MS), "
        "dtmf:DIGITS[:GAP_MS] (DTMF events per digit) or dtmf:DIGITS:string (one collected event), "
        "nouserinput[:COUNT], activity:NAME[:TIMEOUT_MS] (wait for the next bot activity NAME, "
        "e.g. transfer) (default %(default)s)")
    add("--stop-policy", choices=STOP_POLICIES, default="flush",
        help="what playStream.stop / bot speech.started do to buffered bot audio (default %(default)s)")
    add("--play-finished", action="store_true",
        help="send playFinished {playedDurationMS, status} when a bot stream finished playing")
    add("--transfer-result", choices=TRANSFER_RESULTS, default="transferred",
        help="on a bot transfer: end the call (transferred), or send a failed transferStatus and "
        "go on (failed) (default %(default)s)")
    add("--transfer-status-delay-ms", type=int, default=100,
        help="with --transfer-result failed: delay before transferStatus (default %(default)s)")
    add("--frame-ms", type=int, default=20, help="user audio frame length (default %(default)s)")
    add("--hangup", choices=("caller", "drop"), default="caller",
        help="end of script: proper caller hang-up, or drop the socket (default %(default)s)")
    add("--conversation-id", default=None, help="default: a fresh uuid4")
    add("--caller", default="+15550100")
    add("--callee", default="+15550199")
    add("--bot-name", default="voicebridge")
    add("--accept-timeout", type=float, default=5.0, help="seconds to wait for each bot acknowledgement")
    add("--no-start-activity", action="store_true", help="do not send the start event")
    add("--validate", action="store_true", help="only send connection.validate and print the reply")
    return parser


async def _main_async(args: argparse.Namespace) -> int:
    if args.validate:
        try:
            reply = await validate_connection(args.url, args.token, args.accept_timeout)
        except (TimeoutError, OSError, InvalidHandshake, ConnectionClosed, ValueError) as exc:
            print(f"connection.validate failed: {type(exc).__name__}: {exc}", file=sys.stderr)
            return 1
        print(json.dumps(reply))
        return 0 if reply.get("type") == "connection.validated" and reply.get("success") is True else 1
    cfg = CallerConfig(
        url=args.url,
        token=args.token,
        formats=args.formats or ["raw/lpcm16_24", "raw/mulaw"],
        conversation_id=args.conversation_id,
        caller=args.caller,
        callee=args.callee,
        bot_name=args.bot_name,
        frame_ms=args.frame_ms,
        script=parse_script(args.script),
        stop_policy=args.stop_policy,
        play_finished=args.play_finished,
        accept_timeout_s=args.accept_timeout,
        send_start_activity=not args.no_start_activity,
        hangup=args.hangup,
        transfer_result=args.transfer_result,
        transfer_status_delay_ms=args.transfer_status_delay_ms,
    )
    result = await run_call(cfg)
    print(format_timeline(result))
    failed = result.violations or result.end_reason in ("connect-failed", "timeout")
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    """CLI entry point; returns the process exit status."""
    args = _build_parser().parse_args(argv)
    try:
        return asyncio.run(_main_async(args))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
