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

A reader coroutine handles bot messages at any time, feeds bot audio into the analytic
:class:`~voicebridge.sim.playout_model.PlayoutModel` and records protocol violations instead of
raising. Every message this module sends carries ``conversationId``. All waits are bounded: each
step by ``accept_timeout_s`` or its script timeout, the whole call by ``call_timeout_s``.

Readings chosen where the spec is silent (all unverified against a real VAIC):
* ``session.error`` from the bot: record the reason and close the socket without ``session.end``.
* A bot ``hangup``/``transfer`` activity ends the call at once: audio still buffered then counts as
  ``cut_ms`` (so a bridge that hangs up before its goodbye finished playing is visible).
* ``playFinished`` is sent once per stream when it is finished (played out, or flushed by the stop
  policy), as ``activities`` ``[{"type":"event","name":"playFinished",...}]``.
* Only ``userStream.speech.started`` (not ``hypothesis``) triggers the barge-in flush.
* ``playStream.start`` while a stream is active: a violation; the old stream is stopped implicitly
  (stop policy applies) and the new one starts. A ``playStream.start`` without ``mediaFormat`` is a
  violation and the accepted format is assumed.
* A RIFF header at the start of a chunk of a ``raw/`` play stream is a violation (it would be
  played as noise); in ``wav/`` play streams it is stripped (see ``caller_audio``).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import functools
import json
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timezone
from collections.abc import Callable
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from voicebridge.sim.caller_audio import FORMATS, AudioFormat, SpeechSource, strip_wav_header, wav_header
from voicebridge.sim.playout_model import STOP_POLICIES, PlayedStream, PlayoutModel, StopPolicy

MAX_SIZE_BYTES = 16 * 1024 * 1024
CLOSE_TIMEOUT_S = 2.0
CALL_TIMEOUT_MARGIN_S = 5.0
MAX_VIOLATIONS = 200
"""Violations kept verbatim per call; further ones are only counted (``violations_suppressed``)."""

# --- script ----------------------------------------------------------------------------------------


@dataclass
class Speak:
    """The caller talks: ``ms`` of speech (300 Hz tone, amplitude 8000) in the accepted format."""

    ms: int


@dataclass
class Silence:
    """The caller is quiet: ``ms`` of digital silence."""

    ms: int


@dataclass
class WaitForBot:
    """Stream silence until the bot's answer has finished playing, or ``timeout_ms`` passed.

    "The bot's answer" is a play stream started at or after the end of the caller's last
    Speak/BargeIn (or call start); done when such a stream is finished (stopped and played out or
    flushed) and nothing is left playing. A timeout is counted in ``CallResult.script_timeouts``.
    """

    timeout_ms: int = 10000


@dataclass
class BargeIn:
    """Stream silence until ``after_heard_ms`` of a bot stream has been heard, then ``Speak(ms)``.

    The stream must have started at or after the end of the caller's last Speak/BargeIn (or call
    start). On timeout (counted in ``script_timeouts``) the caller speaks anyway.
    """

    after_heard_ms: int
    ms: int
    timeout_ms: int = 10000


ScriptItem = Speak | Silence | WaitForBot | BargeIn


def default_script() -> list[ScriptItem]:
    """Listen to the greeting, say something for 1.5 s, listen to the answer."""
    return [WaitForBot(), Speak(1500), WaitForBot()]


def parse_script(text: str) -> list[ScriptItem]:
    """Parse ``"speak:1500,silence:2000,bargein:800:1200,wait"`` into script items.

    Items: ``speak:MS``, ``silence:MS``, ``wait[:TIMEOUT_MS]``, ``bargein:AFTER_MS:MS[:TIMEOUT_MS]``.
    Raises ``ValueError`` with the offending item on bad input.
    """
    items: list[ScriptItem] = []
    for raw in text.split(","):
        token = raw.strip()
        if not token:
            continue
        name, *args = token.split(":")
        try:
            nums = [int(a) for a in args]
            if name == "speak" and len(nums) == 1:
                items.append(Speak(nums[0]))
            elif name == "silence" and len(nums) == 1:
                items.append(Silence(nums[0]))
            elif name == "wait" and len(nums) <= 1:
                items.append(WaitForBot(*nums))
            elif name == "bargein" and len(nums) in (2, 3):
                items.append(BargeIn(*nums))
            else:
                raise ValueError
        except ValueError:
            raise ValueError(
                f"bad script item {token!r}; use speak:MS, silence:MS, wait[:TIMEOUT_MS], "
                "bargein:AFTER_MS:MS[:TIMEOUT_MS]"
            ) from None
    return items


# --- configuration and result ----------------------------------------------------------------------


@dataclass
class CallerConfig:
    """One simulated call. ``formats`` is the ordered ``supportedMediaFormats`` offer; unknown
    strings may be offered (negative tests) but at least one must be a format this simulator can
    generate. ``call_timeout_s=None`` derives a bound from the script and ``accept_timeout_s``.
    ``record_audio=False`` skips keeping bot audio (``heard_bytes`` stays empty) for load tests.
    """

    url: str
    token: str | None = None
    formats: list[str] = field(default_factory=lambda: ["raw/lpcm16_24", "raw/mulaw"])
    conversation_id: str | None = None
    caller: str = "+15550100"
    callee: str = "+15550199"
    bot_name: str = "voicebridge"
    frame_ms: int = 20
    script: list[ScriptItem] = field(default_factory=default_script)
    stop_policy: StopPolicy = "flush"
    play_finished: bool = False
    accept_timeout_s: float = 5.0
    send_start_activity: bool = True
    hangup: Literal["caller", "drop"] = "caller"
    record_audio: bool = True
    call_timeout_s: float | None = None


Direction = Literal["in", "out", "sim"]
EndReason = Literal[
    "caller-hangup",
    "caller-drop",
    "bot-hangup",
    "transfer",
    "session.error",
    "socket-closed",
    "timeout",
    "connect-failed",
]


@dataclass
class Event:
    """One timeline entry: ``t_ms`` since call start; ``in`` = bot→caller, ``out`` = caller→bot,
    ``sim`` = the simulator's own observation (script steps, playout, timeouts)."""

    t_ms: float
    direction: Direction
    type: str
    detail: str = ""


@dataclass
class Turn:
    """One caller utterance (Speak or BargeIn): ``speech_end_ms`` = its last frame was sent;
    ``first_audio_ms`` = first chunk of the first play stream whose first chunk came after that."""

    speech_end_ms: float
    first_audio_ms: float | None
    latency_ms: float | None


@dataclass
class CallResult:
    """Everything observed during one call. Times are ms since call start (just before dialing).

    ``events`` holds control messages and simulator notes in the order recorded (chunks are only
    counted, except the first of each stream); ``playout.*`` notes carry their exact analytic time,
    which may precede entries recorded before them, so sort by ``t_ms`` for a strict timeline (as
    :func:`format_timeline` does). ``streams`` are final when the result is returned.
    ``end_reason`` adds ``"caller-drop"`` (``hangup="drop"``) and ``"connect-failed"`` (see
    ``connect_error``) to the reasons of the call contract.
    """

    url: str
    conversation_id: str
    events: list[Event] = field(default_factory=list)
    chunks_sent: int = 0
    chunks_received: int = 0
    accepted_format: str | None = None
    session_error: str | None = None
    streams: list[PlayedStream] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    speech_started_from_bot: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    violations_suppressed: int = 0
    end_reason: EndReason | None = None
    close_code: int | None = None
    received_activities: list[dict[str, Any]] = field(default_factory=list)
    unknown_messages: list[str] = field(default_factory=list)
    script_timeouts: int = 0
    connect_error: str | None = None
    duration_ms: float = 0.0


def _default_call_timeout_s(cfg: CallerConfig) -> float:
    script_ms = 0
    for item in cfg.script:
        if isinstance(item, (Speak, Silence)):
            script_ms += item.ms
        elif isinstance(item, WaitForBot):
            script_ms += item.timeout_ms
        else:
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


class _Call:
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
        self.cfg = cfg
        self.cid = cfg.conversation_id or str(uuid.uuid4())
        self._cid_json = json.dumps(self.cid)
        self.result = CallResult(url=cfg.url, conversation_id=self.cid)
        self.model = PlayoutModel(cfg.stop_policy, cfg.record_audio)
        self.result.streams = self.model.streams
        self.fmt: AudioFormat = FORMATS[known[0]]
        self.t0 = time.monotonic()
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

    async def _send_activity(self, activity: dict[str, Any], detail: str) -> None:
        base = {"id": str(uuid.uuid4()), "timestamp": _iso_now(), "language": "en-US", "type": "event"}
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
        for task in (driver, reader):
            task.cancel()
        outcomes = await asyncio.gather(driver, reader, return_exceptions=True)
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
            else:
                self._event("sim", "barge-in.wait", f"until {item.after_heard_ms} ms heard")
                heard_enough = functools.partial(self._heard_enough, item.after_heard_ms)
                if not await self._stream_silence_until(heard_enough, item.timeout_ms):
                    self._script_timeout("barge-in.wait")
                await self._speak(item.ms)

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
                await self._send_activity({"name": "playFinished"}, f"playFinished (stream {stream.stream_id})")

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

    # --- reader: everything the bot sends --------------------------------------------------------

    async def _read(self) -> None:
        assert self.ws is not None
        try:
            async for message in self.ws:
                if self.result.end_reason is not None:
                    continue  # the call is ending: late bot messages are not judged
                t = self.now()
                if isinstance(message, bytes):
                    self._violation(f"binary frame from bot ({len(message)} bytes)")
                    continue
                try:
                    msg = json.loads(message)
                except ValueError:
                    self._violation(f"non-JSON text frame from bot: {message[:80]!r}")
                    continue
                if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                    self._violation(f"message without a string 'type': {message[:80]!r}")
                    continue
                await self._handle(msg, t)
                if self.result.end_reason is not None and self._ended_by_bot:
                    return
        except ConnectionClosed:
            pass
        self._end("socket-closed")

    async def _handle(self, msg: dict[str, Any], t: float) -> None:
        typ: str = msg["type"]
        if not self.accepted.is_set() and typ not in ("session.accepted", "session.error"):
            self._violation(f"{typ} before session.accepted")
        if typ == "playStream.chunk":
            self._on_play_chunk(msg, t)
        elif typ == "playStream.start":
            self._on_play_start(msg, t)
        elif typ == "playStream.stop":
            self._on_play_stop(msg, t)
        elif typ == "session.accepted":
            self._on_accepted(msg, t)
        elif typ == "session.error":
            self.result.session_error = str(msg.get("reason", ""))
            self._event("in", typ, self.result.session_error, t)
            self._ended_by_bot = True
            self._end("session.error")
        elif typ in ("userStream.started", "userStream.stopped"):
            self._on_user_stream_ack(typ, t)
        elif typ == "userStream.speech.started":
            self.result.speech_started_from_bot.append(t)
            self._event("in", typ, "", t)
            self._barge_in(t)
        elif typ in ("userStream.speech.stopped", "userStream.speech.committed"):
            self._event("in", typ, "", t)
        elif typ in ("userStream.speech.hypothesis", "userStream.speech.recognition"):
            self._event("in", typ, _alternative_text(msg), t)
        elif typ == "activities":
            await self._on_activities(msg, t)
        elif typ == "session.end":
            self._event("in", typ, str(msg.get("reasonCode", "")), t)
            self._violation("session.end sent by the bot (non-standard; VAIC sends it)")
        else:
            self.result.unknown_messages.append(typ)
            self._event("in", typ, "unknown message type", t)

    def _barge_in(self, t: float) -> None:
        latest = self.model.latest
        before = 0.0 if latest is None else latest.flushed_ms
        self.model.barge_in(t)
        if latest is not None and latest.flushed_ms > before:
            discarded = latest.flushed_ms - before
            self._event("sim", "playout.flush", f"stream {latest.stream_id}: discarded {discarded:.0f} ms", t)

    def _on_accepted(self, msg: dict[str, Any], t: float) -> None:
        media_format = msg.get("mediaFormat")
        self._event("in", "session.accepted", f"mediaFormat={media_format}", t)
        if self.accepted.is_set():
            self._violation("duplicate session.accepted")
            return
        self.result.accepted_format = media_format if isinstance(media_format, str) else None
        if media_format not in self.cfg.formats:
            self._violation(f"session.accepted mediaFormat {media_format!r} not in offer {self.cfg.formats}")
        if isinstance(media_format, str) and media_format in FORMATS:
            self.fmt = FORMATS[media_format]
        self.accepted.set()

    def _on_user_stream_ack(self, typ: str, t: float) -> None:
        self._event("in", typ, "", t)
        if typ == "userStream.started":
            if not self._user_start_pending:
                self._violation("userStream.started without userStream.start")
            self._user_start_pending = False
            self.user_started.set()
        else:
            if not self._user_stop_pending:
                self._violation("userStream.stopped without userStream.stop")
            self._user_stop_pending = False
            self.user_stopped.set()

    def _on_play_start(self, msg: dict[str, Any], t: float) -> None:
        stream_id = msg.get("streamId")
        media_format = msg.get("mediaFormat")
        self._event("in", "playStream.start", f"streamId={stream_id} mediaFormat={media_format}", t)
        if not isinstance(stream_id, str) or not stream_id:
            self._violation(f"playStream.start streamId {stream_id!r} is not a non-empty string")
            stream_id = str(stream_id)
        if stream_id in self._stream_ids:
            self._violation(f"playStream.start reuses streamId {stream_id!r}")
        self._stream_ids.add(stream_id)
        if media_format is None:
            self._violation(f"playStream.start {stream_id} without mediaFormat")
            media_format = self.result.accepted_format or self.fmt.name
        elif media_format not in self.cfg.formats:
            self._violation(f"playStream.start {stream_id} mediaFormat {media_format!r} not in offer")
        elif media_format != self.result.accepted_format:
            self._violation(
                f"playStream.start {stream_id} mediaFormat {media_format!r} differs from accepted "
                f"{self.result.accepted_format!r}"
            )
        active = self.model.active
        if active is not None:
            self._violation(f"playStream.start {stream_id} while stream {active.stream_id} is active")
            self.model.stop(t)
        fmt = FORMATS.get(media_format) if isinstance(media_format, str) else None
        self.model.start(t, stream_id, str(media_format), fmt or self.fmt)

    def _on_play_chunk(self, msg: dict[str, Any], t: float) -> None:
        self.result.chunks_received += 1
        stream_id = msg.get("streamId")
        active = self.model.active
        if active is None:
            self._violation(f"playStream.chunk (streamId={stream_id!r}) outside an active play stream")
            return
        if stream_id != active.stream_id:
            self._violation(f"playStream.chunk streamId {stream_id!r} but active stream is {active.stream_id!r}")
            return
        b64 = msg.get("audioChunk")
        if not isinstance(b64, str):
            self._violation(f"playStream.chunk {stream_id} without a string audioChunk")
            return
        try:
            audio = base64.b64decode(b64, validate=True)
        except (binascii.Error, ValueError):
            self._violation(f"playStream.chunk {stream_id}: audioChunk is not valid base64")
            return
        fmt = active.fmt
        assert fmt is not None
        if audio.startswith(b"RIFF"):
            if fmt.container == "wav":
                audio = strip_wav_header(audio)
            else:
                self._violation(f"playStream.chunk {stream_id}: RIFF header in a {fmt.name} stream")
        if len(audio) % fmt.sample_width_bytes:
            self._violation(f"playStream.chunk {stream_id}: {len(audio)} bytes is not whole 16-bit samples")
            audio = audio[: len(audio) - len(audio) % fmt.sample_width_bytes]
        if active.first_chunk_t is None:
            self._event("in", "playStream.chunk", f"first chunk of {stream_id}", t)
        self.model.chunk(t, fmt.ms_for_bytes(len(audio)), audio)

    def _on_play_stop(self, msg: dict[str, Any], t: float) -> None:
        stream_id = msg.get("streamId")
        active = self.model.active
        if active is None:
            self._event("in", "playStream.stop", f"streamId={stream_id}", t)
            self._violation(f"playStream.stop (streamId={stream_id!r}) without an active play stream")
            return
        queued = active.received_ms - active.flushed_ms
        heard = self.model.heard_ms(active, t)
        detail = f"streamId={stream_id} received {active.received_ms:.0f} ms, heard {heard:.0f} ms"
        self._event("in", "playStream.stop", detail, t)
        if stream_id != active.stream_id:
            self._violation(f"playStream.stop streamId {stream_id!r} but active stream is {active.stream_id!r}")
            return
        self.model.stop(t)
        if self.cfg.stop_policy == "flush" and queued > heard:
            self._event("sim", "playout.flush", f"stream {stream_id}: discarded {queued - heard:.0f} ms", t)

    async def _on_activities(self, msg: dict[str, Any], t: float) -> None:
        activities = msg.get("activities")
        if not isinstance(activities, list):
            self._event("in", "activities", "invalid", t)
            self._violation("activities message without an 'activities' list")
            return
        for activity in activities:
            if not isinstance(activity, dict):
                self._violation(f"activity is not an object: {activity!r}")
                continue
            self.result.received_activities.append(activity)
            name = activity.get("name")
            kind = activity.get("type")
            params = activity.get("activityParams") if isinstance(activity.get("activityParams"), dict) else {}
            detail = f"{kind}:{name}" if kind == "event" else f"{kind}: {activity.get('text', '')}"
            self._event("in", "activities", detail, t)
            if kind != "event" or self._ended_by_bot:
                continue
            if name == "hangup":
                reason = params.get("hangupReason")
                text = reason if isinstance(reason, str) else "Bot Side"
                await self._end_by_bot("bot-hangup", "bot-disconnected", text)
            elif name in ("transfer", "handover"):
                target = params.get("transferTarget", "")
                await self._end_by_bot("transfer", "transferred", f"transfer to {target}")

    async def _end_by_bot(self, reason: EndReason, reason_code: str, text: str) -> None:
        self._ended_by_bot = True
        self._end(reason)
        try:
            await self._send({"type": "session.end", "reasonCode": reason_code, "reason": text}, reason_code)
        except ConnectionClosed:
            pass


def _alternative_text(msg: dict[str, Any]) -> str:
    alternatives = msg.get("alternatives")
    if isinstance(alternatives, list) and alternatives and isinstance(alternatives[0], dict):
        return str(alternatives[0].get("text", ""))
    return ""


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


_ARROWS: dict[Direction, str] = {"out": "caller → bot", "in": "caller ← bot", "sim": "  (caller)  "}


def format_timeline(result: CallResult) -> str:
    """Readable multi-line timeline of a call: messages, script steps, turns, streams, violations."""
    lines = [
        f"call {result.conversation_id} to {result.url}",
        f"  media format {result.accepted_format or '-'}; ended: {result.end_reason} "
        f"(close code {result.close_code}) after {result.duration_ms / 1000:.2f} s; "
        f"chunks sent {result.chunks_sent}, received {result.chunks_received}",
    ]
    if result.connect_error:
        lines.append(f"  connect error: {result.connect_error}")
    if result.session_error is not None:
        lines.append(f"  session.error: {result.session_error}")
    lines.append("")
    lines.append(f"{'t (ms)':>9}  {'':12}  message")
    for ev in sorted(result.events, key=lambda e: e.t_ms):
        detail = f"  {ev.detail}" if ev.detail else ""
        lines.append(f"{ev.t_ms:9.1f}  {_ARROWS[ev.direction]}  {ev.type}{detail}")
    lines.append("")
    lines.append("turns (caller speech end → first bot audio):")
    for i, turn in enumerate(result.turns, 1):
        if turn.latency_ms is None:
            lines.append(f"  #{i}: speech end {turn.speech_end_ms:.0f} ms → no bot audio")
        else:
            lines.append(
                f"  #{i}: speech end {turn.speech_end_ms:.0f} ms → first audio {turn.first_audio_ms:.0f} ms: "
                f"latency {turn.latency_ms:.0f} ms"
            )
    if not result.turns:
        lines.append("  (none)")
    lines.append("bot play streams:")
    for s in result.streams:
        lines.append(
            f"  {s.stream_id} ({s.media_format}): received {s.received_ms:.0f} ms, heard {s.heard_ms:.0f} ms, "
            f"flushed {s.flushed_ms:.0f} ms, cut by call end {s.cut_ms:.0f} ms, underruns {s.underruns}"
        )
    if not result.streams:
        lines.append("  (none)")
    if result.speech_started_from_bot:
        lines.append("bot speech.started at: " + ", ".join(f"{t:.0f} ms" for t in result.speech_started_from_bot))
    if result.received_activities:
        lines.append(f"activities from bot: {len(result.received_activities)}")
    if result.script_timeouts:
        lines.append(f"script waits timed out: {result.script_timeouts}")
    lines.append(f"violations: {len(result.violations) + result.violations_suppressed}")
    lines.extend(f"  - {v}" for v in result.violations)
    return "\n".join(lines)


# --- CLI ------------------------------------------------------------------------------------------


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m voicebridge.sim.caller",
        description="Simulated AudioCodes VoiceAI Connect caller: dials a Bot API (WebSocket mode) bot, "
        "runs a script in real time and prints the call timeline. Exit status 1 on protocol violations, "
        "connection failure or timeout.",
    )
    add = parser.add_argument
    add("--url", required=True, help="bot URL, e.g. ws://127.0.0.1:8080/")
    add("--token", default=os.environ.get("VOICEBRIDGE_TOKEN"),
        help="bearer token (default: $VOICEBRIDGE_TOKEN; no Authorization header if unset)")
    add("--format", dest="formats", action="append", metavar="FORMAT",
        help="offered media format, repeatable, in preference order (default raw/lpcm16_24, raw/mulaw); "
        f"known: {', '.join(FORMATS)}")
    add("--script", default="wait,speak:1500,wait",
        help="comma-separated: speak:MS, silence:MS, wait[:TIMEOUT_MS], bargein:AFTER_MS:MS[:TIMEOUT_MS] "
        "(default %(default)s)")
    add("--stop-policy", choices=STOP_POLICIES, default="flush",
        help="what playStream.stop / bot speech.started do to buffered bot audio (default %(default)s)")
    add("--play-finished", action="store_true", help="send playFinished when a bot stream finished playing")
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
