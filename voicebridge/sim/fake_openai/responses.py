"""Scripted responses of the fake OpenAI Realtime server.

``response.create`` / ``response.cancel`` and the paced §2.4 event script of one response (audio
or text deltas, then the scripted function and MCP calls of :mod:`.tools`), with cancellation by
barge-in or the client, and the response's ``usage`` (:mod:`.usage`).

:class:`_ResponseMixin` is the response half of the per-connection handler
:class:`~voicebridge.sim.fake_openai.connection._Conn`, which inherits it: it works on the
connection's state (declared below) and sends through the connection's ``send``.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import struct
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import msgspec
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed

from voicebridge.sim.fake_openai.records import (
    DEFAULT_REPLIES,
    FakeClientResponse,
    FakeOpenAIConfig,
    FakeResponse,
    FakeSession,
    _Item,
    _new_id,
)
from voicebridge.sim.fake_openai.tools import (
    FUNCTION_CALL_MARKER,
    ScriptedCall,
    _ToolMixin,
    parse_reply,
)
from voicebridge.sim.fake_openai.usage import input_usage, item_tokens, response_usage
from voicebridge.sim.fake_openai.validate import (
    _RESPONSE_KEYS,
    _check_common,
    _check_keys,
    _ClientError,
    _expect,
    _invalid_value,
)

if TYPE_CHECKING:
    from voicebridge.sim.fake_openai import FakeRealtimeServer

log = logging.getLogger("voicebridge.sim.fake_openai")

__all__ = ["FUNCTION_CALL_MARKER"]
_json_encode = msgspec.json.Encoder().encode


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Aborted(Exception):
    """The response task aborted the transport on purpose (``close_after_deltas``)."""


@dataclass(eq=False)
class _Run:
    """Control block of the one active response: cancellation and wake-up of its pacing."""

    rec: FakeResponse
    task: asyncio.Task[None] | None = None
    wake: asyncio.Future[None] | None = None
    cancel_reason: str | None = None
    inflight_left: int = 0
    fail_code: str | None = None  # ``fail_responses`` knob: this response fails with this code
    calls: list[ScriptedCall] = field(default_factory=list)  # scripted tool calls, in order

    def cancel(self, reason: str, inflight: int) -> None:
        """Ask the response to stop after at most ``inflight`` more deltas (idempotent)."""
        if self.cancel_reason is not None:
            return
        self.cancel_reason = reason
        self.rec.cancelled_at = time.monotonic()
        self.inflight_left = inflight if self.rec.deltas_sent > 0 else 0
        if self.wake is not None:
            _resolve(self.wake)


class _ResponseMixin(_ToolMixin):
    """Response handling of one connection; mixed into ``_Conn``, which owns the state below."""

    server: FakeRealtimeServer
    cfg: FakeOpenAIConfig
    ws: ServerConnection
    rec: FakeSession
    record: bool
    loop: asyncio.AbstractEventLoop
    conversation_id: str
    session: dict[str, Any]
    out_fmt: str
    last_item_id: str | None
    active: _Run | None
    reply_index: int
    user_turns: int
    audio_output_started: bool
    requests_remaining: int
    tokens_remaining: int
    bad_delta: str | None
    fails_left: list[str]
    greeted: bool
    prev_input_tokens: int
    items: dict[str, _Item]

    if TYPE_CHECKING:  # provided by _Conn

        async def send(self, type_: str, *, injected: bool = False, **fields: Any) -> dict[str, Any]: ...

        def _eid(self) -> str: ...

        def _remember(self, item_id: str, item: _Item) -> None: ...

    async def _on_response_create(self, event: dict[str, Any], event_id: str | None) -> None:
        params = event.get("response")
        instructions: str | None = None
        if params is not None:
            _expect(params, isinstance(params, dict), "response", "an object")
            _check_keys(params, _RESPONSE_KEYS, "response")
            for key, val in params.items():
                if key in ("instructions", "tools", "tool_choice", "output_modalities",
                           "max_output_tokens", "prompt"):
                    _check_common(key, val, "response")
                elif key == "conversation" and val not in ("auto", "none"):
                    raise _invalid_value("response.conversation", val, ("auto", "none"))
            instructions = params.get("instructions")
        req = self._client_response(instructions)
        if self.active is not None:
            req.rejected = "conversation_already_has_active_response"
            self._violation(f"response.create while response {self.active.rec.id} is active")
            raise _ClientError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self.active.rec.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        self.items_since_response = []
        self._start_response("response.create", instructions, params, req)

    async def _on_response_cancel(self, event: dict[str, Any], event_id: str | None) -> None:
        run = self.active
        wanted = event.get("response_id")
        if run is None or (wanted is not None and wanted != run.rec.id):
            raise _ClientError(
                "response_cancel_not_active", "Cancellation failed: no active response found"
            )
        run.cancel("client_cancelled", self.cfg.inflight_after_cancel)

    def _plan(self, trigger: str) -> tuple[str, int]:
        """Text and audio ms of the next scripted answer."""
        cfg = self.cfg
        if trigger == "response.create" and self.user_turns == 0 and not self.greeted:
            self.greeted = True
            return cfg.greeting_text, cfg.greeting_ms
        replies = cfg.replies or DEFAULT_REPLIES
        i = self.reply_index % len(replies)
        self.reply_index += 1
        text = replies[i]
        if cfg.reply_ms:
            ms = cfg.reply_ms[i % len(cfg.reply_ms)]
        else:
            spoken = text.split(FUNCTION_CALL_MARKER, 1)[0].strip()
            ms = min(4000, max(800, 60 * len(spoken)))
        return text, ms

    def _start_response(
        self, trigger: str, instructions: str | None, params: dict[str, Any] | None = None,
        req: FakeClientResponse | None = None,
    ) -> None:
        fail = self.fails_left.pop(0) if self.fails_left else None
        reply_index, greeted = self.reply_index, self.greeted
        text, ms = self._plan(trigger)
        if fail is not None:  # a failed response does not use up its reply
            self.reply_index, self.greeted = reply_index, greeted
        spoken, calls = parse_reply(text)
        scripted = [(c.label, c.arguments) for c in calls]
        rec = FakeResponse(
            id=_new_id("resp_"),
            item_id=_new_id("item_") if spoken else None,
            trigger=trigger,
            text=spoken,
            planned_audio_ms=ms if spoken else 0,
            scheduled_at=time.monotonic(),
            instructions=instructions,
            function_call=scripted[0] if scripted else None,
            calls=scripted,
            client_request=req,
        )
        if req is not None:
            req.response_id = rec.id
        if self.record:
            self.rec.responses.append(rec)
        run = _Run(rec, fail_code=fail)
        run.calls = calls
        self.active = run
        run.task = self.loop.create_task(self._run_response(run, params or {}))

    async def _pause(self, run: _Run, seconds: float) -> None:
        """Sleep ``seconds`` unless the response is cancelled meanwhile (wakes at once)."""
        if seconds <= 0 or run.cancel_reason is not None:
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        handle = self.loop.call_later(seconds, _resolve, fut)
        run.wake = fut
        try:
            await fut
        finally:
            handle.cancel()
            run.wake = None

    def _delta_audio(self, ms: int) -> tuple[str, str]:
        """(base64 of ``ms`` tone, base64 of the tone minus its first 12 bytes) for out_fmt."""
        return self.server._tone_b64(self.out_fmt, ms, self.cfg.delta_audio_ms)

    async def _run_response(self, run: _Run, params: dict[str, Any]) -> None:
        try:
            await self._stream_response(run, params)
        except (ConnectionClosed, asyncio.CancelledError, _Aborted):
            pass
        except Exception:
            log.exception("fake_openai: response task failed in session %s", self.rec.id)
        finally:
            if self.active is run:
                self.active = None

    def _response_obj(self, run: _Run, status: str, output: list[dict[str, Any]],
                      modalities: list[str], params: dict[str, Any]) -> dict[str, Any]:
        details: dict[str, Any] | None = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": run.cancel_reason}
        return {
            "object": "realtime.response",
            "id": run.rec.id,
            "status": status,
            "status_details": details,
            "output": output,
            "conversation_id": self.conversation_id,
            "output_modalities": modalities,
            "max_output_tokens": params.get("max_output_tokens", "inf"),
            "audio": {"output": {"format": self.session["audio"]["output"]["format"],
                                 "voice": self.session["audio"]["output"]["voice"]}},
            "usage": None,
            "metadata": params.get("metadata"),
        }

    async def _stream_response(self, run: _Run, params: dict[str, Any]) -> None:
        """The §2.4 script. Sends nothing after the connection task cancels it."""
        cfg, rec = self.cfg, run.rec
        modalities = params.get("output_modalities") or self.session["output_modalities"]
        text_only = modalities == ["text"]
        await self._pause(run, cfg.think_ms / 1000.0)
        rec.created_at = time.monotonic()
        tools = params["tools"] if "tools" in params else self.session.get("tools") or []
        # the conversation as it stands at response.created is this response's input
        counts = self._context_tokens()
        await self.send("response.created",
                        response=self._response_obj(run, "in_progress", [], modalities, params))
        self.requests_remaining -= 1
        self.tokens_remaining -= 4096
        await self.send(
            "rate_limits.updated",
            rate_limits=[
                {"name": "requests", "limit": 5000, "remaining": self.requests_remaining,
                 "reset_seconds": 0.012},
                {"name": "tokens", "limit": 400000, "remaining": self.tokens_remaining,
                 "reset_seconds": 0.58},
            ],
        )
        if run.fail_code is not None and run.cancel_reason is None:
            rec.status = "failed"
            rec.done_at = time.monotonic()
            response = self._response_obj(run, "failed", [], modalities, params)
            response["status_details"] = {
                "type": "failed", "error": {"type": run.fail_code, "code": run.fail_code}}
            if self.active is run:
                self.active = None
            await self.send("response.done", response=response)
            return
        usage_in = self._input_usage(params.get("instructions"), tools, counts)
        output: list[dict[str, Any]] = []
        if rec.item_id is not None and run.cancel_reason is None:
            output.append(await self._stream_message(run, text_only))
        later: list[tuple[Any, _Item, str | None]] = []  # MCP calls ending after response.done
        call_texts: list[str] = []
        for call in run.calls:
            if run.cancel_reason is not None:
                break
            call_texts.append(call.name + call.arguments)
            if call.server_label is None:
                output.append(await self._emit_function_call(run, call, len(output), tools))
                continue
            item, made, entry, previous = await self._emit_mcp_call(run, call, len(output), tools)
            if cfg.mcp_call_ms > 0:
                output.append(item)
                later.append((made, entry, previous))
            else:
                await self._finish_mcp_call(made, entry, previous)
                output.append(entry.item)
        status = "cancelled" if run.cancel_reason is not None else "completed"
        rec.status = status
        rec.reason = run.cancel_reason
        rec.done_at = time.monotonic()
        response = self._response_obj(run, status, output, modalities, params)
        response["usage"] = rec.usage = response_usage(
            usage_in, rec.transcript_sent, rec.audio_ms_sent, call_texts)
        if self.active is run:
            self.active = None
        await self.send("response.done", response=response)
        for made, entry, previous in later:
            self._finish_mcp_later(made, entry, previous)

    def _context_tokens(self) -> list[tuple[int, int]]:
        """(text, audio) tokens of every item in the conversation now."""
        return [item_tokens(entry.item, entry.audio_ms, entry.has_audio)
                for entry in self.items.values()]

    def _input_usage(self, instructions: str | None, tools: Any,
                     counts: list[tuple[int, int]]) -> dict[str, Any]:
        """The input half of a response's usage (see :mod:`.usage`)."""
        if not isinstance(instructions, str):
            value = self.session.get("instructions")
            instructions = value if isinstance(value, str) else ""
        usage = input_usage(instructions, tools if isinstance(tools, list) else [], counts,
                            self.prev_input_tokens)
        self.prev_input_tokens = usage["input_tokens"]
        return usage

    async def _stream_message(self, run: _Run, text_only: bool) -> dict[str, Any]:
        """Assistant message item with audio (or text) deltas; returns the final item."""
        cfg, rec = self.cfg, run.rec
        item_id = rec.item_id
        assert item_id is not None
        ids: dict[str, Any] = {"response_id": rec.id, "item_id": item_id, "output_index": 0, "content_index": 0}
        item: dict[str, Any] = {"id": item_id, "object": "realtime.item", "type": "message",
                "status": "in_progress", "role": "assistant", "content": []}
        entry = _Item("assistant", item, response=None if text_only else rec,
                      has_audio=not text_only)
        previous = self.last_item_id
        self._remember(item_id, entry)
        await self.send("response.output_item.added", response_id=rec.id, output_index=0, item=item)
        await self.send("conversation.item.added", previous_item_id=previous, item=item)
        await self.send("response.content_part.added", **ids,
                        part={"type": "text", "text": ""} if text_only
                        else {"type": "audio", "transcript": ""})
        delta_ms = max(1, int(cfg.delta_audio_ms))
        total_ms = max(delta_ms if text_only else 1, rec.planned_audio_ms)
        n = max(1, math.ceil(total_ms / delta_ms))
        words = rec.text.split()
        said = 0
        head = ('{"type":"response.output_audio.delta","event_id":"')
        mid = (f'","response_id":"{rec.id}","item_id":"{item_id}",'
               '"output_index":0,"content_index":0,"delta":"')
        await self._pause(run, cfg.first_delta_delay_ms / 1000.0)
        interval = cfg.delta_interval_ms / 1000.0
        ws = self.ws
        for i in range(n):
            if run.cancel_reason is not None:
                if run.inflight_left <= 0:
                    break
                run.inflight_left -= 1
            chunk_ms = delta_ms if i < n - 1 else total_ms - delta_ms * (n - 1)
            if not text_only and i == 0 and self.bad_delta is not None:
                # fault knob: the first delta of the response is an injection attempt, no audio
                self.audio_output_started = True
                await ws.send(head + self._eid() + mid + _json_encode(self.bad_delta).decode()[1:-1] + '"}')
                self.rec.bad_deltas_sent += 1
            elif not text_only:
                full, rest = self._delta_audio(chunk_ms)
                if cfg.stamp_deltas and len(rest) != len(full):
                    stamp = struct.pack(">IQ", self.rec.deltas_sent, time.monotonic_ns())
                    full = base64.b64encode(stamp).decode() + rest
                if rec.first_delta_at is None:
                    rec.first_delta_at = time.monotonic()
                self.audio_output_started = True
                await ws.send(head + self._eid() + mid + full + '"}')
                rec.deltas_sent += 1
                rec.audio_ms_sent += chunk_ms
                self.rec.deltas_sent += 1
                if not entry.truncated:
                    entry.audio_ms += chunk_ms
                limit = cfg.close_after_deltas
                if limit is not None and self.rec.deltas_sent >= limit:
                    self.rec.aborted = True
                    ws.transport.abort()  # fault knob: no close frame, the peer sees 1006
                    raise _Aborted
            target = math.ceil((i + 1) * len(words) / n)
            if target > said:
                piece = (" " if said else "") + " ".join(words[said:target])
                said = target
                rec.transcript_sent += piece
                if text_only:
                    await self.send("response.output_text.delta", **ids, delta=piece)
                else:
                    await self.send("response.output_audio_transcript.delta", **ids, delta=piece)
            if i < n - 1:
                await self._pause(run, interval)
        done_text = rec.transcript_sent
        if text_only:
            await self.send("response.output_text.done", **ids, text=done_text)
            part = {"type": "text", "text": done_text}
            content = [{"type": "output_text", "text": done_text}]
        else:
            await self.send("response.output_audio.done", **ids)
            await self.send("response.output_audio_transcript.done", **ids, transcript=done_text)
            part = {"type": "audio", "transcript": done_text}
            content = [{"type": "output_audio", "transcript": done_text}]
        await self.send("response.content_part.done", **ids, part=part)
        final = dict(item)
        final["status"] = "incomplete" if run.cancel_reason is not None else "completed"
        final["content"] = content
        entry.item = final
        await self.send("response.output_item.done", response_id=rec.id, output_index=0, item=final)
        await self.send("conversation.item.done", previous_item_id=previous, item=final)
        return final
