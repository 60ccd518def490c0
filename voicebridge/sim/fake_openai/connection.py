"""Per-connection protocol handler of the fake OpenAI Realtime server.

:class:`_Conn` owns one accepted WebSocket: the reader loop, dispatch and validation of client
events, ``session.update``, the input audio buffer with its energy VAD, conversation items, the
session time limit and the close. Responses come from :class:`_ResponseMixin`
(:mod:`voicebridge.sim.fake_openai.responses`).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any, Awaitable, Callable

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.protocol import State

from voicebridge.sim.fake_openai.audio import _EnergyVad, bytes_per_ms
from voicebridge.sim.fake_openai.records import (
    FakeClientItem,
    FakeFunctionCall,
    FakeMcpCall,
    FakeSession,
    _Item,
    _new_id,
)
from voicebridge.sim.fake_openai.responses import _ResponseMixin, _Run
from voicebridge.sim.fake_openai.validate import (
    _CLIENT_EVENT_KEYS,
    _ENVELOPE_KEYS,
    _ClientError,
    _expect,
    _invalid_value,
    _is_int,
    _missing,
    apply_session_update,
    default_session,
)

if TYPE_CHECKING:
    from voicebridge.sim.fake_openai import FakeRealtimeServer

log = logging.getLogger("voicebridge.sim.fake_openai")

CLOSE_TIMEOUT_S = 2.0
BETA_CLOSE_CODE = 4000
BETA_CLOSE_REASON = (
    "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
)
SESSION_EXPIRED_CLOSE_CODE = 1001
MIN_COMMIT_MS = 100
_MAX_ITEMS = 512  # items remembered per session for truncate/retrieve/previous_item_id
_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode


class _Conn(_ResponseMixin):
    """Protocol state of one accepted connection. Owns the reader loop and the response task."""

    def __init__(self, server: FakeRealtimeServer, ws: ServerConnection, rec: FakeSession) -> None:
        self.server = server
        self.cfg = server.config
        self.ws = ws
        self.rec = rec
        self.record = self.cfg.record
        self.loop = asyncio.get_running_loop()
        self._event_prefix = "event_" + secrets.token_hex(4)
        self._event_n = 0
        self.conversation_id = _new_id("conv_")
        self.session = default_session(rec.id, rec.model)
        rec.session = self.session
        self.in_fmt = "audio/pcm"
        self.out_fmt = "audio/pcm"
        self.vad = _EnergyVad()
        self.buffered_bytes = 0
        self.pending_user_item: str | None = None
        self.speech_start_ms: int | None = None  # VAD: audio_start_ms of the pending user turn
        self.items: dict[str, _Item] = {}
        self.last_item_id: str | None = None
        self.active: _Run | None = None
        self.reply_index = 0
        self.user_turns = 0
        self.updated_once = False
        self.audio_output_started = False
        self.requests_remaining = 5000
        self.tokens_remaining = 400000
        self.expire_handle: asyncio.TimerHandle | None = None
        self.stop_reading_handle: asyncio.TimerHandle | None = None
        self.drop_handle: asyncio.TimerHandle | None = None
        self.drop_task: asyncio.Task[None] | None = None
        self.fails_left = list(self.cfg.fail_responses)  # ``fail_responses`` knob, per session
        self.greeted = False  # the greeting was spoken (see ``FakeOpenAIConfig``)
        self.prev_input_tokens = 0  # input tokens of the previous response (cache estimate)
        # tool calls (``tools``): issued call_ids, MCP servers listed, MCP calls still running
        self.calls_by_id: dict[str, FakeFunctionCall] = {}
        self.mcp_listed: set[str] = set()
        self.mcp_pending: dict[str, FakeMcpCall] = {}
        self.mcp_tasks: set[asyncio.Task[None]] = set()
        self.items_since_response: list[FakeClientItem] = []
        # malicious-upstream knobs, fixed for the whole session
        self.silent = self.cfg.silent
        self.bad_delta = self.cfg.bad_delta
        self.stop_reading_after_s = self.cfg.stop_reading_after_s
        # timed fault knobs, also fixed at connect (before the first await: a test may reset
        # them for later sessions as soon as it sees this one in ``server.sessions``)
        self.session_limit_s = self.cfg.session_limit_s
        self.drop_after_s, self.drop_code = self.cfg.drop_after_s, self.cfg.drop_code
        self.expire_task: asyncio.Task[None] | None = None
        self.handlers: dict[str, Callable[[dict[str, Any], str | None], Awaitable[None]]] = {
            "session.update": self._on_session_update,
            "input_audio_buffer.append": self._on_append,
            "input_audio_buffer.commit": self._on_commit,
            "input_audio_buffer.clear": self._on_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.truncate": self._on_truncate,
            "conversation.item.delete": self._on_item_delete,
            "conversation.item.retrieve": self._on_item_retrieve,
            "response.create": self._on_response_create,
            "response.cancel": self._on_response_cancel,
            "output_audio_buffer.clear": self._on_output_clear,
        }

    # -- sending --------------------------------------------------------------------------

    def _eid(self) -> str:
        self._event_n += 1
        return f"{self._event_prefix}{self._event_n:06x}"

    async def send(self, type_: str, *, injected: bool = False, **fields: Any) -> dict[str, Any]:
        """Send one server event (not an audio delta); records it when recording is on.

        ``error`` events are also appended to ``errors_sent``; an ``injected`` one (fault knob)
        is recorded there as a copy carrying ``"injected": True`` (never sent on the wire).
        """
        event = {"type": type_, "event_id": self._eid(), **fields}
        if self.record:
            self.rec.sent.append((time.monotonic(), event))
            if type_ == "error":
                self.rec.errors_sent.append(dict(event, injected=True) if injected else event)
        await self.ws.send(_json_encode(event), text=True)
        return event

    async def send_error(
        self,
        code: str | None,
        message: str,
        param: str | None = None,
        event_id: str | None = None,
        err_type: str = "invalid_request_error",
        injected: bool = False,
    ) -> None:
        await self.send(
            "error",
            injected=injected,
            error={
                "type": err_type,
                "code": code,
                "message": message,
                "param": param,
                "event_id": event_id,
            },
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes. Never raises for connection errors."""
        ws, rec = self.ws, self.rec
        try:
            if "openai-beta" in rec.headers:
                rec.beta_rejected = True
                await ws.close(BETA_CLOSE_CODE, BETA_CLOSE_REASON)
                return
            intent = rec.query.get("intent")
            if intent is not None and intent != "realtime":
                # [fake] only speech-to-speech sessions are simulated; transcription is refused too.
                await self.send_error("invalid_intent", f"Invalid intent: '{intent}'.", "intent")
                await ws.close(4000, "invalid_request_error.invalid_intent")
                return
            if self.stop_reading_after_s is not None:
                self._arm_stop_reading(self.stop_reading_after_s)
            if self.silent:
                await self._read_silently()
                return
            await self.send("session.created", session=self.session)
            limit = self.session_limit_s
            if limit is not None:
                self.expire_handle = self.loop.call_later(limit, self._start_expire, limit)
            if self.drop_after_s is not None:
                self.drop_handle = self.loop.call_later(
                    max(0.0, self.drop_after_s), self._drop, self.drop_code)
            async for message in ws:
                try:
                    await self._on_message(message)
                except ConnectionClosed:
                    raise
                except Exception:  # a bug in the fake must not kill the session silently
                    log.exception("fake_openai: handler failed in session %s", rec.id)
                    await self.send_error(
                        None, "The server had an error while processing your request.",
                        err_type="server_error",
                    )
        except ConnectionClosed:
            pass
        finally:
            await self._cleanup()

    async def _read_silently(self) -> None:
        """``silent`` knob: read (and record) client events, never answer anything."""
        async for message in self.ws:
            if not self.record or isinstance(message, bytes):
                continue
            try:
                event = _json_decode(message)
            except msgspec.DecodeError:
                continue
            if isinstance(event, dict):
                self.rec.received.append((time.monotonic(), event))

    def _arm_stop_reading(self, after_s: float) -> None:
        """``stop_reading_after_s`` knob: small receive buffer now, no reading after ``after_s``."""
        sock = self.ws.transport.get_extra_info("socket")
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 16384)
            except OSError:
                pass
        self.stop_reading_handle = self.loop.call_later(max(0.0, after_s), self._stop_reading)

    def _stop_reading(self) -> None:
        transport = self.ws.transport
        if transport.is_closing():
            return
        # websockets resumes reading when its own frame queue drains; it must not any more
        self.ws.recv_messages.resume = lambda: None
        transport.pause_reading()
        self.rec.reading_stopped_at = time.monotonic()
        log.info("session %s stopped reading (fault knob)", self.rec.id)

    def _drop(self, code: int | None) -> None:
        """``drop_after_s`` knob: abort the TCP connection, or close with ``code``."""
        self.rec.dropped_at = time.monotonic()
        log.info("session %s dropped (fault knob, code=%s)", self.rec.id, code)
        if code is None:
            self.rec.aborted = True
            self.ws.transport.abort()
        else:
            self.drop_task = self.loop.create_task(self._close_quietly(code))

    async def _close_quietly(self, code: int) -> None:
        try:
            await self.ws.close(code, "dropped by the fake server (fault knob)")
        except ConnectionClosed:
            pass

    async def _cleanup(self) -> None:
        if self.drop_handle is not None:
            self.drop_handle.cancel()
        if self.stop_reading_handle is not None:
            self.stop_reading_handle.cancel()
        if self.expire_handle is not None:
            self.expire_handle.cancel()
        run = self.active
        if run is not None and run.task is not None and not run.task.done():
            run.task.cancel()
            await asyncio.wait({run.task}, timeout=CLOSE_TIMEOUT_S)
        for mcp_task in list(self.mcp_tasks):
            mcp_task.cancel()
        if self.mcp_tasks:
            await asyncio.wait(set(self.mcp_tasks), timeout=CLOSE_TIMEOUT_S)
        for task in (self.expire_task, self.drop_task):
            if task is not None and not task.done():
                await asyncio.wait({task}, timeout=CLOSE_TIMEOUT_S + 1)
        if self.ws.state is not State.CLOSED:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S + 1):
                    await self.ws.close()
            except (TimeoutError, ConnectionClosed):
                self.ws.transport.abort()
        self.items.clear()

    def _start_expire(self, limit_s: float) -> None:
        self.expire_task = self.loop.create_task(self._expire(limit_s))

    async def _expire(self, limit_s: float) -> None:
        minutes = limit_s / 60.0
        text = f"{minutes:g}" if minutes != int(minutes) else str(int(minutes))
        message = f"Your session hit the maximum duration of {text} minutes."
        try:
            await self.send_error("session_expired", message)
            await self.ws.close(SESSION_EXPIRED_CLOSE_CODE, message)
        except ConnectionClosed:
            pass

    # -- dispatch -------------------------------------------------------------------------

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            # [fake] behaviour of the live API for binary frames is undocumented.
            await self.send_error(
                "invalid_event",
                "Binary WebSocket frames are not supported; send each event as a JSON text frame.",
            )
            return
        try:
            event = _json_decode(message)
        except msgspec.DecodeError as exc:
            # [fake] "invalid_json" is an invented code: the live API's answer is undocumented.
            await self.send_error("invalid_json", f"The event is not valid JSON: {exc}.")
            return
        if not isinstance(event, dict):
            await self.send_error("invalid_event", "The event must be a JSON object.")
            return
        if self.record:
            self.rec.received.append((time.monotonic(), event))
        eid = event.get("event_id")
        event_id = eid if isinstance(eid, str) else None
        try:
            etype = event.get("type")
            if etype is None:
                raise _ClientError("invalid_event", "The 'type' field is missing.", "type")
            handler = self.handlers.get(etype) if isinstance(etype, str) else None
            if handler is None:
                raise _ClientError("invalid_event", f"Invalid event type: '{etype}'.", "type")
            allowed = _CLIENT_EVENT_KEYS[etype]
            for key in event:
                if key not in _ENVELOPE_KEYS and key not in allowed:
                    raise _ClientError("unknown_parameter", f"Unknown parameter: '{key}'.", key)
            await handler(event, event_id)
        except _ClientError as err:
            await self.send_error(err.code, err.message, err.param, event_id, err.err_type)

    # -- session --------------------------------------------------------------------------

    async def _on_session_update(self, event: dict[str, Any], event_id: str | None) -> None:
        if "session" not in event:
            raise _missing("session")
        new = apply_session_update(self.session, event["session"])
        if self.audio_output_started and new["audio"]["output"]["voice"] != self.session["audio"]["output"]["voice"]:
            raise _ClientError(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                "session.audio.output.voice",
            )
        new_in = new["audio"]["input"]["format"]["type"]
        if new_in != self.in_fmt:
            self.vad.tail = b""
            self.buffered_bytes = 0
        self.in_fmt = new_in
        self.out_fmt = new["audio"]["output"]["format"]["type"]
        if new["audio"]["input"]["turn_detection"] is None:
            self.vad.reset_state()
        self.session = new
        self.rec.session = new
        await self.send("session.updated", session=new)
        if not self.updated_once:
            self.updated_once = True
            chooser = self.cfg.drop_after_ms_for
            if chooser is not None and self.drop_handle is None:
                instructions = new.get("instructions")
                drop_ms = chooser(instructions if isinstance(instructions, str) else "")
                if drop_ms is not None:
                    self.drop_handle = self.loop.call_later(max(0.0, drop_ms) / 1000, self._drop, None)
            for code in list(self.cfg.inject_errors):
                if code == "server_error":
                    await self.send_error(
                        "server_error",
                        "The server had an error while processing your request. Sorry about that!",
                        err_type="server_error",
                        injected=True,
                    )
                else:
                    await self.send_error(code, f"Injected error '{code}' (fake server fault knob).",
                                          injected=True)
        await self._tools_updated(event["session"])

    # -- input audio ----------------------------------------------------------------------

    def _turn_detection(self) -> dict[str, Any] | None:
        td: dict[str, Any] | None = self.session["audio"]["input"]["turn_detection"]
        return td

    async def _on_append(self, event: dict[str, Any], event_id: str | None) -> None:
        if "audio" not in event:
            raise _missing("audio")
        audio = event["audio"]
        _expect(audio, isinstance(audio, str), "audio", "a string")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise _ClientError(
                "invalid_value", "Invalid 'audio'. Expected base64-encoded audio bytes.", "audio"
            ) from None
        if not data:
            return
        self.buffered_bytes += len(data)
        td = self._turn_detection()
        fmt = self.in_fmt
        if td is None:
            self.vad.advance(len(data) / bytes_per_ms(fmt))
            return
        # [fake] turn_detection.threshold scales the configured RMS (0.5 = vad_threshold_rms).
        threshold = float(td.get("threshold", 0.5))
        events = self.vad.feed(
            data,
            fmt,
            self.cfg.vad_threshold_rms * threshold / 0.5,
            self.cfg.vad_min_speech_ms,
            int(td.get("silence_duration_ms", 500)),
            int(td.get("prefix_padding_ms", 300)),
        )
        for kind, at_ms in events:
            if kind == "started":
                await self._speech_started(at_ms, td)
            else:
                await self._speech_stopped(at_ms, td)

    async def _speech_started(self, at_ms: int, td: dict[str, Any]) -> None:
        item_id = _new_id("item_")
        self.pending_user_item = item_id
        self.speech_start_ms = at_ms
        await self.send("input_audio_buffer.speech_started", audio_start_ms=at_ms, item_id=item_id)
        run = self.active
        if run is not None and td.get("interrupt_response", True):
            run.cancel("turn_detected", self.cfg.inflight_after_cancel)

    async def _speech_stopped(self, at_ms: int, td: dict[str, Any]) -> None:
        item_id = self.pending_user_item or _new_id("item_")
        self.pending_user_item = None
        start_ms, self.speech_start_ms = self.speech_start_ms, None
        await self.send("input_audio_buffer.speech_stopped", audio_end_ms=at_ms, item_id=item_id)
        await self._commit(item_id, None if start_ms is None else max(0, at_ms - start_ms))
        # [fake] when a response is still active at speech stop, no second one is started.
        if td.get("create_response", True) and self.active is None:
            self._start_response("vad", None)

    async def _commit(self, item_id: str, speech_ms: int | None = None) -> None:
        """Turn the buffer into a user item: committed, conversation.item.added/done.

        ``speech_ms``: the item's audio (VAD: speech start to stop); None = the whole buffer.
        """
        if speech_ms is None:
            speech_ms = int(self.buffered_bytes / bytes_per_ms(self.in_fmt))
        self.buffered_bytes = 0
        self.user_turns += 1
        previous = self.last_item_id
        await self.send("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        self._remember(item_id, _Item("user", item, audio_ms=speech_ms, has_audio=True))
        await self.send("conversation.item.added", previous_item_id=previous, item=item)
        await self.send("conversation.item.done", previous_item_id=previous, item=item)
        if self.session["audio"]["input"].get("transcription") is not None and self.cfg.input_transcripts:
            texts = self.cfg.input_transcripts
            text = texts[(self.user_turns - 1) % len(texts)].replace("{n}", str(self.user_turns))
            await self.send("conversation.item.input_audio_transcription.completed", item_id=item_id,
                            content_index=0, transcript=text,
                            usage={"type": "duration", "seconds": 1})

    async def _on_commit(self, event: dict[str, Any], event_id: str | None) -> None:
        ms = self.buffered_bytes / bytes_per_ms(self.in_fmt)
        if ms < MIN_COMMIT_MS:
            raise _ClientError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {ms:.2f}ms of audio.",
            )
        item_id = self.pending_user_item or _new_id("item_")
        self.pending_user_item = None
        self.speech_start_ms = None
        self.vad.reset_state()
        await self._commit(item_id)

    async def _on_clear(self, event: dict[str, Any], event_id: str | None) -> None:
        self.buffered_bytes = 0
        self.pending_user_item = None
        self.speech_start_ms = None
        self.vad.reset_state()
        await self.send("input_audio_buffer.cleared")

    async def _on_output_clear(self, event: dict[str, Any], event_id: str | None) -> None:
        raise _ClientError(
            "invalid_event",
            "output_audio_buffer.clear is only supported for WebRTC and SIP sessions.",
            "type",
        )

    # -- conversation items ---------------------------------------------------------------

    def _remember(self, item_id: str, item: _Item) -> None:
        self.items[item_id] = item
        self.last_item_id = item_id
        if len(self.items) > _MAX_ITEMS:
            del self.items[next(iter(self.items))]

    async def _on_item_create(self, event: dict[str, Any], event_id: str | None) -> None:
        if "item" not in event:
            raise _missing("item")
        item = event["item"]
        _expect(item, isinstance(item, dict), "item", "an object")
        previous = event.get("previous_item_id", self.last_item_id)
        if previous is not None and previous != "root" and previous not in self.items:
            raise _ClientError(
                "invalid_value",
                f"Previous item with id '{previous}' not found.",
                "previous_item_id",
            )
        kind = item.get("type")
        if kind == "message":
            role = item.get("role")
            allowed_parts = {
                "user": ("input_text", "input_audio"),
                "system": ("input_text",),
                "assistant": ("output_text",),
            }.get(str(role))
            if allowed_parts is None:
                raise _invalid_value("item.role", role, ("user", "system", "assistant"))
            content = item.get("content")
            if "content" not in item:
                raise _missing("item.content")
            _expect(content, isinstance(content, list), "item.content", "an array")
            for i, part in enumerate(content):
                p = f"item.content[{i}]"
                _expect(part, isinstance(part, dict), p, "an object")
                if part.get("type") not in allowed_parts:
                    raise _invalid_value(f"{p}.type", part.get("type"), allowed_parts)
        elif kind == "function_call_output":
            role = "tool"
            for key in ("call_id", "output"):
                if key not in item:
                    raise _missing(f"item.{key}")
                _expect(item[key], isinstance(item[key], str), f"item.{key}", "a string")
        elif kind == "function_call":
            role = "assistant"
            for key in ("call_id", "name", "arguments"):
                if key not in item:
                    raise _missing(f"item.{key}")
        else:
            raise _invalid_value(
                "item.type", kind, ("message", "function_call", "function_call_output")
            )
        out = dict(item)
        given = out.get("id")
        item_id = given if isinstance(given, str) else _new_id("item_")
        out["id"] = item_id
        out["object"] = "realtime.item"
        out["status"] = "completed"
        self._remember(item_id, _Item(role, out))
        self._client_item(out)
        await self.send("conversation.item.added", previous_item_id=previous, item=out)
        await self.send("conversation.item.done", previous_item_id=previous, item=out)

    def _known_item(self, event: dict[str, Any]) -> tuple[str, _Item]:
        if "item_id" not in event:
            raise _missing("item_id")
        item_id = event["item_id"]
        _expect(item_id, isinstance(item_id, str), "item_id", "a string")
        found = self.items.get(item_id)
        if found is None:
            raise _ClientError(
                "invalid_value", f"Conversation item with item_id '{item_id}' not found.", "item_id"
            )
        return item_id, found

    async def _on_truncate(self, event: dict[str, Any], event_id: str | None) -> None:
        for key in ("content_index", "audio_end_ms"):
            if key not in event:
                raise _missing(key)
            _expect(event[key], _is_int(event[key]), key, "an integer")
        item_id, item = self._known_item(event)
        content_index, end_ms = event["content_index"], event["audio_end_ms"]
        if item.role != "assistant" or item.response is None:
            raise _ClientError(
                "invalid_value", "Only assistant messages with audio can be truncated.", "item_id"
            )
        if content_index != 0:
            raise _invalid_value("content_index", content_index, (0,))
        if end_ms < 0:
            raise _invalid_value("audio_end_ms", end_ms)
        if end_ms > item.audio_ms:
            raise _ClientError(
                "invalid_value",
                f"Audio content of {item.audio_ms}ms is already shorter than {end_ms}ms",
                "audio_end_ms",
            )
        resp = item.response
        if self.record:
            self.rec.truncations.append(
                {
                    "at": time.monotonic(),
                    "item_id": item_id,
                    "content_index": content_index,
                    "audio_end_ms": end_ms,
                    "item_audio_ms": resp.audio_ms_sent,
                    "response_id": resp.id,
                    "response_status": resp.status,
                }
            )
        item.audio_ms = end_ms
        item.truncated = True
        await self.send(
            "conversation.item.truncated",
            item_id=item_id,
            content_index=content_index,
            audio_end_ms=end_ms,
        )

    async def _on_item_delete(self, event: dict[str, Any], event_id: str | None) -> None:
        item_id, _ = self._known_item(event)
        del self.items[item_id]
        await self.send("conversation.item.deleted", item_id=item_id)

    async def _on_item_retrieve(self, event: dict[str, Any], event_id: str | None) -> None:
        _, item = self._known_item(event)
        await self.send("conversation.item.retrieved", item=item.item)
