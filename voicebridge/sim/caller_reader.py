"""The reader side of a simulated VAIC call: everything the bot sends.

:class:`_CallReader` parses each bot message, checks it against the Bot API contract (recording
violations instead of raising), feeds play streams into the playout model (``playStream.start`` /
``chunk`` / ``stop``, barge-in flushes) and ends the call on a bot ``hangup`` / ``transfer``
activity or ``session.error``. Every bot activity is recorded with the playout at its arrival
(``CallResult.bot_activities``); a ``transfer`` VAIC fails (``CallerConfig.transfer_result``)
is answered with a ``transferStatus`` event and the call goes on; ``sendDtmf`` digits are
recorded and checked. It is the reader half of :class:`voicebridge.sim.caller._Call`, which
inherits it and owns the state declared below.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import re
from typing import TYPE_CHECKING, Any

from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed

from voicebridge.sim.caller_audio import FORMATS, AudioFormat, strip_wav_header
from voicebridge.sim.caller_records import BotActivity, CallerConfig, CallResult, Direction, EndReason
from voicebridge.sim.playout_model import PlayoutModel

SEND_DTMF_RE = re.compile(r"^[0-9*#]{1,20}$")
TRANSFER_TARGET_RE = re.compile(r"^(sip:|sips:|tel:)\S+$")


class _CallReader:
    """Handling of the bot's messages for one call; mixed into ``_Call``, which owns the state."""

    cfg: CallerConfig
    result: CallResult
    model: PlayoutModel
    fmt: AudioFormat
    ws: ClientConnection | None
    accepted: asyncio.Event
    user_started: asyncio.Event
    user_stopped: asyncio.Event
    _user_start_pending: bool
    _user_stop_pending: bool
    _stream_ids: set[str]
    _ended_by_bot: bool
    _dropping: bool
    _reattached: asyncio.Event
    _transfers: int
    _tasks: set[asyncio.Task[None]]

    if TYPE_CHECKING:  # provided by _Call

        def now(self) -> float: ...

        def _event(self, direction: Direction, type_: str, detail: str = "", t: float | None = None) -> None: ...

        def _violation(self, text: str) -> None: ...

        def _end(self, reason: EndReason) -> None: ...

        async def _send(self, msg: dict[str, Any], detail: str = "") -> None: ...

        async def _send_activity(self, activity: dict[str, Any], detail: str) -> None: ...

    async def _read(self) -> None:
        while True:
            ws = self.ws
            assert ws is not None
            try:
                async for message in ws:
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
            if self.ws is ws and not self._dropping:
                break
            await self._reattached.wait()  # a DropAndResume: read the new socket once resumed
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
            raw_params = activity.get("activityParams")
            params: dict[str, Any] = raw_params if isinstance(raw_params, dict) else {}
            detail = f"{kind}:{name}" if kind == "event" else f"{kind}: {activity.get('text', '')}"
            self._event("in", "activities", detail, t)
            record = self._bot_activity(activity, t)
            if kind != "event" or self._ended_by_bot:
                continue
            if name == "hangup":
                self._ends_call(record)
                reason = params.get("hangupReason")
                text = reason if isinstance(reason, str) else "Bot Side"
                await self._end_by_bot("bot-hangup", "bot-disconnected", text)
            elif name in ("transfer", "handover"):
                await self._on_transfer(record, params)
            elif name == "sendDtmf":
                digits = params.get("dtmfDigits")
                if not isinstance(digits, str) or not SEND_DTMF_RE.match(digits):
                    self._violation(f"sendDtmf dtmfDigits {digits!r}: expected 1-20 of 0-9 * #")
                self.result.dtmf_received.append(digits if isinstance(digits, str) else repr(digits))

    def _bot_activity(self, activity: dict[str, Any], t: float) -> BotActivity:
        """Record ``activity`` with the playout at ``t`` (see :class:`BotActivity`)."""
        name = activity.get("name")
        kind = activity.get("type")
        end = self.model.buffer_end_t
        active = self.model.active
        record = BotActivity(
            t_ms=t,
            name=name if isinstance(name, str) else None,
            type=kind if isinstance(kind, str) else None,
            activity=activity,
            unplayed_ms=sum((left for _, left in self.model.unplayed(t)), 0.0),
            playout_end_ms=None if end == float("-inf") else end,
            open_stream=None if active is None else active.stream_id,
        )
        self.result.bot_activities.append(record)
        return record

    def _ends_call(self, record: BotActivity) -> None:
        record.ends_call = True
        record.cut_ms = record.unplayed_ms
        record.streams_cut = [s.stream_id for s, _ in self.model.unplayed(record.t_ms)]

    async def _on_transfer(self, record: BotActivity, params: dict[str, Any]) -> None:
        target = params.get("transferTarget")
        if not isinstance(target, str) or not TRANSFER_TARGET_RE.match(target):
            self._violation(f"transfer transferTarget {target!r}: expected a sip:, sips: or tel: URI")
        outcome = self.cfg.transfer_outcome(self._transfers)
        self._transfers += 1
        if outcome == "transferred":
            self._ends_call(record)
            await self._end_by_bot("transfer", "transferred", f"transfer to {target}")
            return
        self._event("sim", "transfer.failed", f"transferStatus in {self.cfg.transfer_status_delay_ms} ms")
        task = asyncio.create_task(self._send_transfer_status())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_transfer_status(self) -> None:
        """``transfer_result="failed"``: tell the bot, after the configured delay."""
        cfg = self.cfg
        await asyncio.sleep(cfg.transfer_status_delay_ms / 1000)
        if self.result.end_reason is not None or self._dropping:
            return
        value = {"status": "failed", "reasonCode": cfg.transfer_fail_reason_code,
                 "reason": cfg.transfer_fail_reason}
        try:
            await self._send_activity({"name": "transferStatus", "value": value},
                                      f"transferStatus failed ({cfg.transfer_fail_reason_code})")
        except ConnectionClosed:
            pass

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
