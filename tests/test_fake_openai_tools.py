"""Tests of the fake OpenAI Realtime server's tool calls, MCP, client checks and usage.

Over real sockets on 127.0.0.1, against a hand-driven client; every wait is bounded, no
assertion depends on wall-clock thresholds.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection

from tests.test_fake_openai import FAST, open_ws, recv, recv_until, send, speech_then_silence
from voicebridge.sim.fake_openai import FakeOpenAIConfig, FakeRealtimeServer
from voicebridge.sim.fake_openai.server import _parse_args, config_from_args
from voicebridge.sim.fake_openai.tools import ScriptedCall, parse_reply

END_CALL = {"type": "function", "name": "end_call", "description": "Hang up.",
            "parameters": {"type": "object", "properties": {"reason": {"type": "string"}}}}
TRANSFER = {"type": "function", "name": "transfer_call", "description": "Hand over.",
            "parameters": {"type": "object", "properties": {"target": {"type": "string"}}}}
CRM = {"type": "mcp", "server_label": "crm", "server_url": "https://crm.invalid/mcp",
       "allowed_tools": ["lookup_order"], "require_approval": "never"}


async def session_update(ws: ClientConnection, **session: Any) -> list[dict[str, Any]]:
    """session.update; returns every event up to and including session.updated."""
    await send(ws, {"type": "session.update", "session": {"type": "realtime", **session}})
    _, seen = await recv_until(ws, "session.updated")
    return seen


async def speak(ws: ClientConnection) -> None:
    for chunk in speech_then_silence("audio/pcm"):
        await send(ws, {"type": "input_audio_buffer.append", "audio": chunk})


def of(seen: list[dict[str, Any]], etype: str) -> list[dict[str, Any]]:
    return [e for e in seen if e["type"] == etype]


# -- reply scripts (pure) ------------------------------------------------------------------


def test_parse_reply_splits_spoken_text_and_calls_in_order() -> None:
    spoken, calls = parse_reply('Bye now. @@end_call {"reason": "done"} @@mcp:crm:lookup {"n": 1}')
    assert spoken == "Bye now."
    assert calls == [ScriptedCall("end_call", '{"reason": "done"}'),
                     ScriptedCall("lookup", '{"n": 1}', "crm")]
    assert calls[1].label == "mcp:crm:lookup"
    assert parse_reply("@@hang_up") == ("", [ScriptedCall("hang_up", "{}")])
    assert parse_reply("mcp:x") == ("mcp:x", [])
    assert parse_reply("@@mcp:onlylabel {}") == ("", [ScriptedCall("mcp:onlylabel", "{}")])


def test_cli_scripts_the_greeting_replies_and_mcp_time() -> None:
    cfg = config_from_args(_parse_args(["--greeting", "Hi. @@end_call {}", "--reply", "a",
                                        "--reply", "@@mcp:crm:lookup {}", "--mcp-call-ms", "0"]))
    assert (cfg.greeting_text, cfg.replies, cfg.mcp_call_ms) == (
        "Hi. @@end_call {}", ["a", "@@mcp:crm:lookup {}"], 0.0)
    default = config_from_args(_parse_args([]))
    assert (default.greeting_text, default.replies) == (FakeOpenAIConfig().greeting_text, FakeOpenAIConfig().replies)


# -- function calls ------------------------------------------------------------------------


async def test_function_call_ga_sequence_records_and_the_next_reply() -> None:
    cfg = FakeOpenAIConfig(greeting_text='Goodbye! @@end_call {"reason": "done"}',
                           replies=["After the tool."], **FAST)
    async with FakeRealtimeServer(cfg) as server, open_ws(server.url) as ws:
        await recv(ws)
        await session_update(ws, tools=[END_CALL, TRANSFER], tool_choice="auto")
        await send(ws, {"type": "response.create"})
        done, seen = await recv_until(ws, "response.done")
        rid = done["response"]["id"]
        kinds = [e["type"] for e in seen]
        [added] = [e for e in of(seen, "response.output_item.added") if e["item"]["type"] == "function_call"]
        item = added["item"]
        assert (added["response_id"], added["output_index"]) == (rid, 1)
        assert (item["status"], item["name"], item["arguments"]) == ("in_progress", "end_call", "")
        call_id, item_id = item["call_id"], item["id"]
        [delta] = of(seen, "response.function_call_arguments.delta")
        [args] = of(seen, "response.function_call_arguments.done")
        for ev in (delta, args):
            assert (ev["response_id"], ev["item_id"], ev["output_index"], ev["call_id"]) == (
                rid, item_id, 1, call_id)
        assert json.loads(args["arguments"]) == {"reason": "done"} and args["name"] == "end_call"
        [final] = [e for e in of(seen, "response.output_item.done") if e["item"]["type"] == "function_call"]
        assert final["item"]["status"] == "completed" and final["item"]["arguments"] == args["arguments"]
        order = [kinds.index("response.function_call_arguments.done"), kinds.index("response.done")]
        assert order == sorted(order)
        out = done["response"]["output"]
        assert [o["type"] for o in out] == ["message", "function_call"]
        assert out[1]["call_id"] == call_id and out[1]["name"] == "end_call"
        await send(ws, {"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": call_id, "output": '{"ok": true}'}})
        await send(ws, {"type": "response.create"})
        done2, seen2 = await recv_until(ws, "response.done")
        [tr] = of(seen2, "response.output_audio_transcript.done")
    assert tr["transcript"] == "After the tool."  # the greeting is spoken once per session
    rec = server.sessions[0]
    assert rec.tools_offered == ["end_call", "transfer_call"] and rec.tools_history == [rec.tools_offered]
    [call] = rec.function_calls
    assert (call.name, call.call_id, call.item_id, call.response_id, call.output_index, call.offered) == (
        "end_call", call_id, item_id, rid, 1, True)
    assert call.outputs == ['{"ok": true}'] and rec.function_outputs == {call_id: '{"ok": true}'}
    assert rec.responses[0].tool_calls == [call] and rec.responses[0].function_call == (
        "end_call", '{"reason": "done"}')
    assert [r.reason for r in rec.client_responses] == ["bare", "function_call_output"]
    assert rec.client_responses[1].response_id == done2["response"]["id"]
    assert rec.responses[1].client_request is rec.client_responses[1]
    assert rec.violations == [] and rec.unanswered_calls() == []


async def test_transfer_after_a_vad_turn_then_the_scripted_sorry() -> None:
    cfg = FakeOpenAIConfig(replies=['One moment. @@transfer_call {"target": "sales"}',
                                    "Sorry, the transfer failed."], **FAST)
    async with FakeRealtimeServer(cfg) as server, open_ws(server.url) as ws:
        await recv(ws)
        await session_update(ws, tools=[TRANSFER])
        await speak(ws)
        _, seen = await recv_until(ws, "response.done")
        [args] = of(seen, "response.function_call_arguments.done")
        await send(ws, {"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": args["call_id"], "output": "transferring"}})
        await send(ws, {"type": "conversation.item.create", "item": {
            "type": "message", "role": "system",
            "content": [{"type": "input_text", "text": "The transfer failed: declined."}]}})
        await send(ws, {"type": "response.create"})
        _, seen = await recv_until(ws, "response.done")
        [tr] = of(seen, "response.output_audio_transcript.done")
    assert tr["transcript"] == "Sorry, the transfer failed."
    rec = server.sessions[0]
    assert [r.trigger for r in rec.responses] == ["vad", "response.create"]
    assert json.loads(rec.function_calls[0].arguments) == {"target": "sales"}
    [req] = rec.client_responses
    assert req.reason == "function_call_output"
    assert [(i.type, i.role, i.text) for i in req.items] == [
        ("function_call_output", None, "transferring"),
        ("message", "system", "The transfer failed: declined.")]
    assert [i.call_id for i in rec.client_items] == [args["call_id"], None]
    assert rec.violations == []


async def test_bad_outputs_and_response_create_while_active_are_recorded() -> None:
    cfg = FakeOpenAIConfig(greeting_text="Let me hang up. @@end_call {} @@not_offered {}",
                           greeting_ms=2000, **FAST)
    async with FakeRealtimeServer(cfg) as server, open_ws(server.url) as ws:
        await recv(ws)
        await session_update(ws, tools=[END_CALL])
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.output_audio.delta")
        await send(ws, {"type": "response.create", "event_id": "evt_second"})
        err, _ = await recv_until(ws, "error")
        done, seen = await recv_until(ws, "response.done")
        calls = of(seen, "response.function_call_arguments.done")
        assert [c["name"] for c in calls] == ["end_call", "not_offered"]
        assert [o["type"] for o in done["response"]["output"]] == ["message", "function_call", "function_call"]
        first = calls[0]["call_id"]
        for call_id in (first, first, "call_nobody"):
            await send(ws, {"type": "conversation.item.create", "item": {
                "type": "function_call_output", "call_id": call_id, "output": "x"}})
            await recv_until(ws, "conversation.item.done")
    assert err["error"]["code"] == "conversation_already_has_active_response"
    assert err["error"]["event_id"] == "evt_second"
    rec = server.sessions[0]
    assert [c.offered for c in rec.function_calls] == [True, False]
    assert [r.rejected for r in rec.client_responses] == [None, "conversation_already_has_active_response"]
    assert rec.client_responses[1].response_id is None
    assert len(rec.violations) == 3, rec.violations
    assert "while response" in rec.violations[0]
    assert "second function_call_output" in rec.violations[1]
    assert "unknown call_id 'call_nobody'" in rec.violations[2]
    assert rec.function_calls[0].outputs == ["x", "x"] and rec.function_outputs == {first: "x"}
    assert [c.name for c in rec.unanswered_calls()] == ["not_offered"]


async def test_tools_are_validated() -> None:
    async with FakeRealtimeServer(**FAST) as server, open_ws(server.url) as ws:
        await recv(ws)
        bad: list[tuple[list[dict[str, Any]], str, str]] = [
            ([dict(END_CALL, name="end call")], "invalid_value", "session.tools[0].name"),
            ([END_CALL, END_CALL], "invalid_value", "session.tools[1].name"),
            ([dict(END_CALL, parameters="x")], "invalid_type", "session.tools[0].parameters"),
            ([{"type": "mcp", "server_url": "https://x.invalid"}], "missing_required_parameter",
             "session.tools[0].server_label"),
            ([{"type": "mcp", "server_label": "crm"}], "missing_required_parameter",
             "session.tools[0].server_url"),
            ([dict(CRM, secret="x")], "unknown_parameter", "session.tools[0].secret"),
        ]
        for tools, code, param in bad:
            await send(ws, {"type": "session.update", "session": {"type": "realtime", "tools": tools}})
            err, _ = await recv_until(ws, "error")
            assert (err["error"]["code"], err["error"]["param"]) == (code, param), tools
    assert server.sessions[0].tools_history == []


# -- MCP -----------------------------------------------------------------------------------


async def test_mcp_listing_then_a_call_that_completes_after_response_done() -> None:
    cfg = FakeOpenAIConfig(greeting_text='Let me check. @@mcp:crm:lookup_order {"order": "42"}',
                           replies=["It has shipped."], mcp_call_ms=20,
                           mcp_outputs={"crm:lookup_order": '{"status": "shipped"}'}, **FAST)
    async with FakeRealtimeServer(cfg) as server, open_ws(server.url) as ws:
        await recv(ws)
        await session_update(ws, tools=[END_CALL, CRM])
        listed, seen = await recv_until(ws, "conversation.item.done")
        assert [e["type"] for e in seen] == ["conversation.item.added", "mcp_list_tools.in_progress",
                                             "mcp_list_tools.completed", "conversation.item.done"]
        assert listed["item"]["type"] == "mcp_list_tools" and listed["item"]["server_label"] == "crm"
        assert [t["name"] for t in listed["item"]["tools"]] == ["lookup_order"]
        assert seen[1]["item_id"] == listed["item"]["id"]
        await send(ws, {"type": "response.create"})
        done_ev, seen = await recv_until(ws, "response.mcp_call.completed")
        final, after = await recv_until(ws, "conversation.item.done")
        kinds = [e["type"] for e in seen]
        mcp_kinds = [k for k in kinds if "mcp" in k or k == "response.done"]
        assert mcp_kinds == ["response.mcp_call_arguments.delta", "response.mcp_call_arguments.done",
                             "response.mcp_call.in_progress", "response.done", "response.mcp_call.completed"]
        [added] = [e for e in of(seen, "response.output_item.added") if e["item"]["type"] == "mcp_call"]
        item_id = added["item"]["id"]
        assert added["item"] | {"id": "x"} == {
            "id": "x", "object": "realtime.item", "type": "mcp_call", "server_label": "crm",
            "name": "lookup_order", "arguments": "", "approval_request_id": None, "error": None,
            "output": None}
        [args] = of(seen, "response.mcp_call_arguments.done")
        assert (args["item_id"], args["output_index"], json.loads(args["arguments"])) == (item_id, 1, {"order": "42"})
        [resp_done] = of(seen, "response.done")
        listed_out = resp_done["response"]["output"][1]
        assert listed_out["type"] == "mcp_call" and listed_out["output"] is None
        assert (done_ev["item_id"], done_ev["output_index"]) == (item_id, 1)
        [item_done] = of(after, "response.output_item.done")
        assert item_done["item"]["output"] == '{"status": "shipped"}' and item_done["item"]["error"] is None
        assert final["item"]["id"] == item_id
        # the server starts no follow-up response: the client asks for it
        await send(ws, {"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": item_id, "output": "not mine to answer"}})
        await recv_until(ws, "conversation.item.done")
        await send(ws, {"type": "response.create"})
        _, seen = await recv_until(ws, "response.done")
        [tr] = of(seen, "response.output_audio_transcript.done")
    assert tr["transcript"] == "It has shipped."
    rec = server.sessions[0]
    assert rec.tools_offered == ["end_call", "mcp:crm"]
    [call] = rec.mcp_calls
    assert (call.server_label, call.name, call.status, call.output, call.offered) == (
        "crm", "lookup_order", "completed", '{"status": "shipped"}', True)
    assert call.done_at is not None and rec.responses[0].done_at is not None
    assert call.done_at >= rec.responses[0].done_at
    assert len(rec.responses) == 2 and rec.function_calls == []
    assert rec.violations == [f"function_call_output for unknown call_id {item_id!r}: an MCP call (run by the server)"]


async def test_mcp_failure_before_response_done_and_a_failed_listing() -> None:
    cfg = FakeOpenAIConfig(greeting_text="@@mcp:crm:lookup_order {}", mcp_call_ms=0,
                           mcp_failures={"lookup_order": "backend down"}, mcp_list_fail=["crm"], **FAST)
    async with FakeRealtimeServer(cfg) as server, open_ws(server.url) as ws:
        await recv(ws)
        await session_update(ws, tools=[CRM])
        listed, seen = await recv_until(ws, "conversation.item.done")
        assert "mcp_list_tools.failed" in [e["type"] for e in seen] and listed["item"]["tools"] == []
        await send(ws, {"type": "response.create"})
        done, seen = await recv_until(ws, "response.done")
    kinds = [e["type"] for e in seen]
    assert kinds.index("response.mcp_call.failed") < kinds.index("response.done")
    assert "response.mcp_call.completed" not in kinds and "response.output_audio.delta" not in kinds
    error = {"type": "tool_execution_error", "message": "backend down"}
    [item_done] = of(seen, "response.output_item.done")
    assert item_done["item"]["error"] == error and item_done["item"]["output"] is None
    assert done["response"]["output"][0]["error"] == error
    [call] = server.sessions[0].mcp_calls
    assert (call.status, call.error, call.output_index) == ("failed", error, 0)


async def test_response_create_while_an_mcp_call_runs_is_a_violation() -> None:
    cfg = FakeOpenAIConfig(greeting_text="@@mcp:crm:lookup_order {}", mcp_call_ms=5000,
                           replies=["Too early."], **FAST)
    async with FakeRealtimeServer(cfg) as server, open_ws(server.url) as ws:
        await recv(ws)
        await session_update(ws, tools=[CRM])
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.done")
        await send(ws, {"type": "response.create"})
        await recv_until(ws, "response.done")
    assert await server.wait_closed_all(3.0)
    rec = server.sessions[0]
    assert rec.violations == ["response.create while MCP call(s) still running: crm:lookup_order"]
    assert rec.mcp_calls[0].status == "in_progress"  # the session closed first: never completed


# -- usage ---------------------------------------------------------------------------------


def ceil4(text: str) -> int:
    return math.ceil(len(text) / 4)


async def test_usage_follows_what_was_said_and_heard() -> None:
    instructions = "Be brief. " * 440  # 4400 characters: 1100 text tokens, enough to be cached
    greeting = "Hello there, how can I help?"
    cfg = FakeOpenAIConfig(greeting_text=greeting, greeting_ms=1000, replies=["Sure."],
                           reply_ms=[600], **FAST)
    async with FakeRealtimeServer(cfg) as server, open_ws(server.url) as ws:
        await recv(ws)
        await session_update(ws, instructions=instructions, tools=[END_CALL])
        await send(ws, {"type": "response.create"})
        first, seen = await recv_until(ws, "response.done")
        [item] = [e["item"] for e in of(seen, "response.output_item.added")]
        await send(ws, {"type": "conversation.item.truncate", "item_id": item["id"],
                        "content_index": 0, "audio_end_ms": 500})
        await recv_until(ws, "conversation.item.truncated")
        await speak(ws)
        second, seen = await recv_until(ws, "response.done")
        [started] = of(seen, "input_audio_buffer.speech_started")
        [stopped] = of(seen, "input_audio_buffer.speech_stopped")
    tools_tokens = ceil4(json.dumps([END_CALL]))
    u1, u2 = first["response"]["usage"], second["response"]["usage"]
    assert u1["input_token_details"] | {"cached_tokens_details": None} == {
        "text_tokens": ceil4(instructions) + tools_tokens, "audio_tokens": 0, "image_tokens": 0,
        "cached_tokens": 0, "cached_tokens_details": None}
    assert u1["output_token_details"] == {"text_tokens": ceil4(greeting), "audio_tokens": 1000 // 50}
    assert u1["input_tokens"] == ceil4(instructions) + tools_tokens
    assert u1["output_tokens"] == ceil4(greeting) + 20 and u1["total_tokens"] == u1["input_tokens"] + u1["output_tokens"]
    speech_ms = stopped["audio_end_ms"] - started["audio_start_ms"]
    # the greeting is input now at its truncated length (500 ms / 50), the caller at 1 per 100 ms
    assert u2["input_token_details"]["audio_tokens"] == 500 // 50 + math.ceil(speech_ms / 100)
    assert u2["input_token_details"]["text_tokens"] == u1["input_tokens"]
    assert u2["input_token_details"]["cached_tokens"] == u1["input_tokens"] // 64 * 64
    assert u2["output_token_details"] == {"text_tokens": ceil4("Sure."), "audio_tokens": 600 // 50}
    rec = server.sessions[0]
    assert [r.usage for r in rec.responses] == [u1, u2]
    assert rec.usage_total() == u1["total_tokens"] + u2["total_tokens"]
    assert rec.usage_total("output_tokens") == u1["output_tokens"] + u2["output_tokens"]


@pytest.mark.parametrize("text_only", [False, True])
async def test_function_call_and_output_count_as_text(text_only: bool) -> None:
    cfg = FakeOpenAIConfig(greeting_text="@@end_call {}", replies=["Ok."], reply_ms=[100], **FAST)
    async with FakeRealtimeServer(cfg) as server, open_ws(server.url) as ws:
        await recv(ws)
        await session_update(ws, instructions="", output_modalities=["text"] if text_only else ["audio"])
        await send(ws, {"type": "response.create"})
        first, seen = await recv_until(ws, "response.done")
        [args] = of(seen, "response.function_call_arguments.done")
        await send(ws, {"type": "conversation.item.create", "item": {
            "type": "function_call_output", "call_id": args["call_id"], "output": "done and dusted"}})
        await send(ws, {"type": "response.create"})
        second, _ = await recv_until(ws, "response.done")
    u1, u2 = first["response"]["usage"], second["response"]["usage"]
    assert u1["output_token_details"] == {"text_tokens": ceil4("end_call{}"), "audio_tokens": 0}
    assert u2["input_token_details"]["text_tokens"] == ceil4("end_call{}") + ceil4("done and dusted")
    assert u2["output_token_details"]["audio_tokens"] == (0 if text_only else 100 // 50)
    assert server.sessions[0].violations == []
