"""Tool calls of the fake OpenAI Realtime server: scripted function and MCP calls, MCP tool
listing, and the checks on what the client sends back.

:func:`parse_reply` splits a scripted reply into its spoken text and its calls (syntax in the
``FakeOpenAIConfig`` docstring). :class:`_ToolMixin` is the tool half of the per-connection
handler (``_Conn`` inherits it through ``_ResponseMixin``): it emits the GA event sequences of a
``function_call`` and of a server-side ``mcp_call``, lists MCP tools after ``session.update``,
and records calls, client items, client ``response.create`` requests and violations in the
session's :class:`~voicebridge.sim.fake_openai.records.FakeSession`.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from websockets.exceptions import ConnectionClosed

from voicebridge.sim.fake_openai.records import (
    FakeClientItem,
    FakeClientResponse,
    FakeFunctionCall,
    FakeMcpCall,
    FakeOpenAIConfig,
    FakeSession,
    _Item,
    _new_id,
)

if TYPE_CHECKING:
    from voicebridge.sim.fake_openai.responses import _Run

FUNCTION_CALL_MARKER = "@@"
MCP_PREFIX = "mcp:"
DEFAULT_MCP_OUTPUT = '{"ok": true}'
MAX_CALLS_REMEMBERED = 256  # call_ids kept per session for the output checks


@dataclass(frozen=True)
class ScriptedCall:
    """One call of a scripted reply: a function call, or an MCP call when ``server_label``."""

    name: str
    arguments: str
    server_label: str | None = None

    @property
    def label(self) -> str:
        """``name``, or ``mcp:LABEL:TOOL`` for an MCP call (as written in the script)."""
        if self.server_label is None:
            return self.name
        return f"{MCP_PREFIX}{self.server_label}:{self.name}"


def parse_reply(text: str) -> tuple[str, list[ScriptedCall]]:
    """Split ``"spoken text @@name {args} @@mcp:label:tool {args}"`` into the spoken text
    (stripped) and its calls in order. A call without arguments gets ``"{}"``; an ``mcp:``
    name without both a label and a tool is taken as a plain function name."""
    spoken, *calls_text = text.split(FUNCTION_CALL_MARKER)
    calls: list[ScriptedCall] = []
    for raw in calls_text:
        name, _, args = raw.strip().partition(" ")
        args = args.strip() or "{}"
        if name.startswith(MCP_PREFIX):
            label, sep, tool = name[len(MCP_PREFIX):].partition(":")
            if sep and label and tool:
                calls.append(ScriptedCall(tool, args, label))
                continue
        calls.append(ScriptedCall(name, args))
    return spoken.strip(), calls


def tool_names(tools: Any) -> list[str]:
    """Names of a ``tools`` list: a function's ``name``, ``mcp:<server_label>`` for MCP."""
    names: list[str] = []
    for tool in tools if isinstance(tools, list) else ():
        if not isinstance(tool, dict):
            continue
        if tool.get("type", "function") == "mcp":
            names.append(f"{MCP_PREFIX}{tool.get('server_label')}")
        else:
            names.append(str(tool.get("name")))
    return names


def _item_text(item: dict[str, Any]) -> str:
    if item.get("type") == "function_call_output":
        return str(item.get("output", ""))
    texts = []
    for part in item.get("content") or ():
        if isinstance(part, dict):
            for key in ("text", "transcript"):
                if isinstance(part.get(key), str):
                    texts.append(part[key])
    return " ".join(texts)


class _ToolMixin:
    """Tool-call half of one connection; mixed into ``_Conn``, which owns the state below."""

    cfg: FakeOpenAIConfig
    rec: FakeSession
    record: bool
    loop: asyncio.AbstractEventLoop
    session: dict[str, Any]
    last_item_id: str | None
    active: _Run | None
    calls_by_id: dict[str, FakeFunctionCall]
    mcp_listed: set[str]
    mcp_pending: dict[str, FakeMcpCall]
    mcp_tasks: set[asyncio.Task[None]]
    items_since_response: list[FakeClientItem]

    if TYPE_CHECKING:  # provided by _Conn

        async def send(self, type_: str, *, injected: bool = False, **fields: Any) -> dict[str, Any]: ...

        def _remember(self, item_id: str, item: _Item) -> None: ...

    def _violation(self, text: str) -> None:
        if self.record:
            self.rec.violations.append(text)

    # -- session.update -----------------------------------------------------------------------

    async def _tools_updated(self, upd: dict[str, Any]) -> None:
        """After ``session.updated``: record the tools; list the tools of new MCP servers."""
        tools = self.session.get("tools") or []
        if self.record:
            self.rec.tools_offered = tool_names(tools)
            if "tools" in upd:
                self.rec.tools_history.append(list(self.rec.tools_offered))
        for tool in tools:
            if not isinstance(tool, dict) or tool.get("type") != "mcp":
                continue
            label = str(tool.get("server_label"))
            if label in self.mcp_listed:
                continue
            self.mcp_listed.add(label)
            await self._list_mcp_tools(label, tool)

    async def _list_mcp_tools(self, label: str, tool: dict[str, Any]) -> None:
        cfg = self.cfg
        failed = label in cfg.mcp_list_fail
        names = cfg.mcp_server_tools.get(label)
        if names is None:
            allowed = tool.get("allowed_tools")
            if isinstance(allowed, dict):
                allowed = allowed.get("tool_names")
            names = [str(n) for n in allowed] if isinstance(allowed, list) else []
        item_id = _new_id("mcpl_")
        item: dict[str, Any] = {"id": item_id, "object": "realtime.item", "type": "mcp_list_tools",
                                "server_label": label, "tools": []}
        previous = self.last_item_id
        entry = _Item("system", item)
        self._remember(item_id, entry)
        await self.send("conversation.item.added", previous_item_id=previous, item=item)
        await self.send("mcp_list_tools.in_progress", item_id=item_id)
        if failed:
            await self.send("mcp_list_tools.failed", item_id=item_id)
        else:
            final = dict(item, tools=[
                {"name": n, "input_schema": {"type": "object", "properties": {}},
                 "description": None, "annotations": None} for n in names])
            entry.item = final
            await self.send("mcp_list_tools.completed", item_id=item_id)
            item = final
        await self.send("conversation.item.done", previous_item_id=previous, item=item)

    # -- client items and responses -------------------------------------------------------------

    def _client_item(self, item: dict[str, Any]) -> None:
        """Record an accepted ``conversation.item.create``; check a ``function_call_output``."""
        kind = str(item.get("type"))
        call_id = item.get("call_id") if isinstance(item.get("call_id"), str) else None
        entry = FakeClientItem(time.monotonic(), str(item["id"]), kind,
                               item.get("role") if kind == "message" else None,
                               _item_text(item), call_id)
        if self.record:
            self.rec.client_items.append(entry)
        self.items_since_response.append(entry)
        if kind != "function_call_output" or call_id is None:
            return
        call = self.calls_by_id.get(call_id)
        if call is None:
            what = "an MCP call (run by the server)" if call_id in self.mcp_pending or any(
                c.item_id == call_id for c in self.rec.mcp_calls) else "no call of this session"
            self._violation(f"function_call_output for unknown call_id {call_id!r}: {what}")
            return
        if call.outputs:
            self._violation(f"second function_call_output for call_id {call_id!r} ({call.name})")
        elif self.record:
            call.output_at = entry.at
            self.rec.function_outputs[call_id] = entry.text
        if self.record:
            call.outputs.append(entry.text)

    def _client_response(self, instructions: str | None) -> FakeClientResponse:
        """Record one ``response.create`` (before it is checked) and why the client sent it."""
        items = self.items_since_response
        reason = "bare"
        if any(i.type == "function_call_output" for i in items):
            reason = "function_call_output"
        else:
            roles = [i.role for i in items if i.type == "message"]
            if roles:
                reason = f"message:{roles[-1]}"
        req = FakeClientResponse(time.monotonic(), reason, list(items), instructions)
        if self.record:
            self.rec.client_responses.append(req)
        if self.mcp_pending:
            running = ", ".join(f"{c.server_label}:{c.name}" for c in self.mcp_pending.values())
            self._violation(f"response.create while MCP call(s) still running: {running}")
        return req

    # -- calls in a response ----------------------------------------------------------------------

    @staticmethod
    def _offered(call: ScriptedCall, tools: Any) -> bool:
        for tool in tools if isinstance(tools, list) else ():
            if not isinstance(tool, dict):
                continue
            if call.server_label is not None:
                if tool.get("type") == "mcp" and tool.get("server_label") == call.server_label:
                    return True
            elif tool.get("type", "function") == "function" and tool.get("name") == call.name:
                return True
        return False

    async def _emit_function_call(self, run: _Run, call: ScriptedCall, output_index: int,
                                  tools: Any) -> dict[str, Any]:
        """A ``function_call`` output item, GA event sequence; returns the final item."""
        rec = run.rec
        name, args = call.name, call.arguments
        item_id, call_id = _new_id("item_"), _new_id("call_")
        item = {"id": item_id, "object": "realtime.item", "type": "function_call",
                "status": "in_progress", "name": name, "call_id": call_id, "arguments": ""}
        previous = self.last_item_id
        entry = _Item("assistant", item)
        self._remember(item_id, entry)
        await self.send("response.output_item.added", response_id=rec.id,
                        output_index=output_index, item=item)
        await self.send("conversation.item.added", previous_item_id=previous, item=item)
        ids: dict[str, Any] = {"response_id": rec.id, "item_id": item_id, "output_index": output_index,
               "call_id": call_id}
        await self.send("response.function_call_arguments.delta", **ids, delta=args)
        await self.send("response.function_call_arguments.done", **ids, name=name, arguments=args)
        made = FakeFunctionCall(name, args, call_id, item_id, rec.id, output_index,
                                self._offered(call, tools), time.monotonic())
        self.calls_by_id[call_id] = made
        if len(self.calls_by_id) > MAX_CALLS_REMEMBERED:
            del self.calls_by_id[next(iter(self.calls_by_id))]
        if self.record:
            self.rec.function_calls.append(made)
            rec.tool_calls.append(made)
        final = dict(item, status="completed", arguments=args)
        entry.item = final
        await self.send("response.output_item.done", response_id=rec.id,
                        output_index=output_index, item=final)
        await self.send("conversation.item.done", previous_item_id=previous, item=final)
        return final

    async def _emit_mcp_call(self, run: _Run, call: ScriptedCall, output_index: int,
                             tools: Any) -> tuple[dict[str, Any], FakeMcpCall, _Item, str | None]:
        """An ``mcp_call`` item up to ``response.mcp_call.in_progress``. Returns (the item as
        it stands, the record, its conversation entry, the previous item id) for
        :meth:`_finish_mcp_call`."""
        rec = run.rec
        assert call.server_label is not None
        item_id = _new_id("mcp_")
        item: dict[str, Any] = {"id": item_id, "object": "realtime.item", "type": "mcp_call",
                                "server_label": call.server_label, "name": call.name,
                                "arguments": "", "approval_request_id": None, "error": None,
                                "output": None}
        previous = self.last_item_id
        entry = _Item("assistant", item)
        self._remember(item_id, entry)
        await self.send("response.output_item.added", response_id=rec.id,
                        output_index=output_index, item=item)
        await self.send("conversation.item.added", previous_item_id=previous, item=item)
        ids: dict[str, Any] = {"response_id": rec.id, "item_id": item_id, "output_index": output_index}
        await self.send("response.mcp_call_arguments.delta", **ids, delta=call.arguments)
        await self.send("response.mcp_call_arguments.done", **ids, arguments=call.arguments)
        await self.send("response.mcp_call.in_progress", item_id=item_id, output_index=output_index)
        made = FakeMcpCall(call.server_label, call.name, call.arguments, item_id, rec.id,
                           output_index, self._offered(call, tools), time.monotonic())
        self.mcp_pending[item_id] = made
        if self.record:
            self.rec.mcp_calls.append(made)
            rec.tool_calls.append(made)
        current = dict(item, arguments=call.arguments)
        entry.item = current
        return current, made, entry, previous

    async def _finish_mcp_call(self, made: FakeMcpCall, entry: _Item, previous: str | None,
                               delay_s: float = 0.0) -> None:
        """The MCP tool's result: ``completed`` or ``failed``, then the final item."""
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        cfg = self.cfg
        key, tool = f"{made.server_label}:{made.name}", made.name
        failure = cfg.mcp_failures.get(key, cfg.mcp_failures.get(tool))
        final = dict(entry.item)
        if failure is not None:
            made.status, made.error = "failed", {"type": "tool_execution_error", "message": failure}
            final["error"] = made.error
        else:
            made.status = "completed"
            made.output = cfg.mcp_outputs.get(key, cfg.mcp_outputs.get(tool, DEFAULT_MCP_OUTPUT))
            final["output"] = made.output
        entry.item = final
        made.done_at = time.monotonic()
        self.mcp_pending.pop(made.item_id, None)
        event = "response.mcp_call.failed" if failure is not None else "response.mcp_call.completed"
        await self.send(event, item_id=made.item_id, output_index=made.output_index)
        await self.send("response.output_item.done", response_id=made.response_id,
                        output_index=made.output_index, item=final)
        await self.send("conversation.item.done", previous_item_id=previous, item=final)

    def _finish_mcp_later(self, made: FakeMcpCall, entry: _Item, previous: str | None) -> None:
        """Run :meth:`_finish_mcp_call` after ``mcp_call_ms`` in its own bounded task."""
        task = self.loop.create_task(self._finish_quietly(made, entry, previous,
                                                          self.cfg.mcp_call_ms / 1000.0))
        self.mcp_tasks.add(task)
        task.add_done_callback(self.mcp_tasks.discard)

    async def _finish_quietly(self, made: FakeMcpCall, entry: _Item, previous: str | None,
                              delay_s: float) -> None:
        try:
            await self._finish_mcp_call(made, entry, previous, delay_s)
        except ConnectionClosed:
            pass
