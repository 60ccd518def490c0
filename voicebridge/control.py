"""Call control, Sans-I/O: the model's tools, keypad input, VAIC's events, the call's time limit.

Owned by one `CallSession` (`session.control`), fed by it with `now_ns`, never touching a socket,
a task or a clock. It writes frames through the session's builders (`AcProtocol`, the realtime
module) and asks the session to hang up or transfer.

Function calls (`response.function_call_arguments.done`) are collected per response and acted on
at that response's `response.done`, so that every call gets exactly one `function_call_output`
and the follow-up `response.create` (at most one per batch) never goes out while a response is
active (`_want_response`: sent as soon as no response is active or requested):

- `end_call`: output at once; the `hangup` activity waits until the goodbye was played: the
  playout is idle and our clock says everything sent has been heard, and, when the profile says
  VAIC sends `playFinished`, until that arrives (or `PLAY_FINISHED_WAIT_NS` after our clock's
  end, in case it never does). Never a fixed sleep.
- `transfer_call`: the target is a name from the profile (the model never gives a number); the
  `transfer` activity follows the hand-over sentence the same way. A failed `transferStatus`
  is told to the model as a system note, with a response, so it can say so.
- `send_dtmf`: digits checked (0-9 * #, at most 20), sent with `sendDtmf` once what the model
  said before was played, then a response so the model goes on.
- webhook tools: a `RunTool` effect for the shell, which answers `tool_result`; the deadline is
  kept here (`timeout_s`), a late answer is dropped.
- MCP tools run at OpenAI. A call still running when its response is done gets no response of
  its own from the API: once every such call has ended, one `response.create` follows (a call
  that ended within its response needs none: the model went on in that response).
- a response cancelled by a barge-in (or failed) had its calls not run: each still gets its
  output ("not run"), and no response is asked for (the caller is speaking).

After-play actions (`_after`): one at a time; hang-up beats everything.
"""

from __future__ import annotations

import re
from collections import deque
from typing import TYPE_CHECKING, Any, NamedTuple
from urllib.parse import quote

import msgspec

from . import realtime as rt
from .bounds import ID_CHARS, clip
from .profiles import CALL_TOOLS, WebhookTool

if TYPE_CHECKING:
    from .session import CallSession

NS = 1_000_000_000
PLAY_FINISHED_WAIT_NS = 3 * NS     # VAIC's playFinished this late after our clock: go anyway
MAX_PENDING_CALLS = 16             # function calls of one response the bridge keeps
MAX_RESPONSES = 8                  # responses with function calls the bridge keeps at once
MAX_AFTER = 8                      # after-play actions waiting (a hang-up is always kept)
MAX_ARGS_CHARS = 16_384
_DTMF_OUT = re.compile(r"^[0-9*#]{1,20}$")
_DTMF_IN = "0123456789*#ABCDabcd"


class RunTool(NamedTuple):
    """Effect: run webhook `name` with `arguments` (JSON text); answer `tool_result(call_id)`."""
    call_id: str
    name: str
    arguments: str
    webhook: WebhookTool
    headers: dict[str, str]


class After(NamedTuple):
    """Something to do once what the caller is hearing has been played."""
    kind: str            # "hangup" | "transfer" | "dtmf"
    value: str           # hang-up reason token | transfer URI | digits
    detail: str          # for the log (and the transfer's handover reason)
    since_ns: int


_decode_args = msgspec.json.Decoder(dict[str, Any])


def _header(value: str) -> str:
    """A peer string (caller, callee, conversation id) as an HTTP header value: printable
    ASCII, the rest percent-encoded (httpx refuses non-ASCII; CR/LF would split headers)."""
    if value.isascii() and value.isprintable():
        return value
    return quote(value, safe=" !\"#$&'()*+,-./:;<=>?@[\\]^_`{|}~")


class CallControl:
    """See the module docstring. All times are monotonic ns passed in by the session."""

    def __init__(self, session: CallSession) -> None:
        self.s = session
        self._calls: dict[str, list[tuple[str, str]]] = {}   # response id -> [(call_id, name)]
        self._args: dict[str, str] = {}                       # call_id -> arguments JSON
        self._tool_deadline: dict[str, tuple[int, str]] = {}  # call_id -> (deadline, name)
        self._want_response = False
        self._requested = False          # our response.create is out, response.created not yet
        self._after: deque[After] = deque()   # bounded by `_queue` (MAX_AFTER + a hang-up)
        self._unreported = 0             # streams stopped whose playFinished has not come yet
        self._stream_done_ns = 0         # when our clock said the last stream was played out
        self._transfer_target = ""       # the transfer in progress (name)
        self._dtmf = ""                  # collected digits
        self._dtmf_deadline = 0
        self._no_input = 0
        self._accepted_ns = 0
        self._limit_at = 0               # max duration: the closing turn
        self._limit_hard = 0             # ... and the hang-up regardless
        self._closing = ""               # "" | "asked" | response id of the closing turn
        self._mcp_running: set[str] = set()   # MCP call items in progress (at OpenAI)
        self._mcp_owed = False           # a response ended while one ran: continue after it
        self.tool_calls = 0
        self.tokens = [0, 0, 0, 0, 0]    # audio in, text in, cached in, audio out, text out

    # ---------------------------------------------------------------- lifecycle
    def started(self, now_ns: int) -> None:
        """The call was accepted (its time limit counts from here)."""
        self._accepted_ns = now_ns
        self.profile_chosen()

    def profile_chosen(self) -> None:
        """The session's profile is set (at accept, and again once the `start` activity chose
        the final one): its time limit applies, counted from the accept."""
        p = self.s.profile
        if not self._accepted_ns or self._closing:
            return
        if p.max_duration_s:
            self._limit_at = self._accepted_ns + int(p.max_duration_s * NS)
            self._limit_hard = self._limit_at + int(p.closing_grace_s * NS)
        else:
            self._limit_at = self._limit_hard = 0

    def deadline(self) -> int:
        """The earliest deadline of call control (0: none). Read at every re-arm of the call's
        timer, so the common case (nothing waits) returns at the first test."""
        if not (self._dtmf_deadline or self._limit_at or self._limit_hard or self._after
                or self._tool_deadline):
            return 0
        best = 0
        for d in (self._dtmf_deadline, self._limit_at, self._limit_hard, self._after_deadline()):
            if d and (not best or d < best):
                best = d
        for d, _ in self._tool_deadline.values():
            if not best or d < best:
                best = d
        return best

    def _after_deadline(self) -> int:
        """Only the wait for VAIC's playFinished needs a timer of its own: every other moment
        an after-play action waits for (response.done, the stream's stop) is an event or a
        playout deadline already, and a stale deadline here would make the shell spin."""
        s, po = self.s, self.s.playout
        if (not self._after or not s.profile.play_finished or not self._unreported
                or not s.is_active() or s.active_response is not None or po.pending
                or po.open_item is not None):
            return 0
        return self._stream_done_ns + PLAY_FINISHED_WAIT_NS

    # ---------------------------------------------------------------- responses
    @property
    def response_requested(self) -> bool:
        """A `response.create` is out and its `response.created` has not come yet."""
        return self._requested

    def requested(self) -> None:
        """The session sent a `response.create` of its own (greeting, retry): none from here
        until its `response.created`."""
        self._requested = True

    def error_seen(self, now_ns: int) -> None:
        """An OpenAI error event: a `response.create` of ours may have been refused, so do not
        wait for its `response.created` (which would never come)."""
        if self._requested:
            self._requested = False
            self.check(now_ns)

    def response_created(self, rid: str) -> None:
        self._requested = False
        if self._closing == "asked":
            self._closing = rid

    def response_done(self, rid: str, status: str | None, usage: rt.Usage | None, now_ns: int) -> None:
        if usage is not None:
            self._add_usage(usage)
        calls = self._calls.pop(rid, ())
        completed = status == "completed"
        for call_id, name in calls:
            args = self._args.pop(call_id, "")
            if completed:
                self._run(call_id, name, args, now_ns)
            else:
                self._output(call_id, {"error": f"not run: the response was {status or 'interrupted'}"})
                self._count(name, "not_run")
        if self._mcp_running:
            self._mcp_owed = True
        if self._closing and self._closing == rid:
            self._closing = ""
            self._queue(After("hangup", "max-duration", "max_duration_s reached", now_ns))
        self.check(now_ns)

    def function_call(self, ev: rt.FunctionCallDone, now_ns: int) -> None:
        rid = clip(ev.response_id, ID_CHARS)
        call_id = clip(ev.call_id, ID_CHARS)
        name = clip(ev.name, ID_CHARS)
        if not call_id:
            return
        self.tool_calls += 1
        calls = self._calls.get(rid)
        if (calls is None and len(self._calls) >= MAX_RESPONSES) or (
                calls is not None and len(calls) >= MAX_PENDING_CALLS):
            self._output(call_id, {"error": "too many tool calls at once"})
            return
        if calls is None:
            calls = self._calls[rid] = []
        calls.append((call_id, name))
        self._args[call_id] = ev.arguments if len(ev.arguments) <= MAX_ARGS_CHARS else ""
        self.s._log("info", "call.tool_call", tool=name, function_call_id=call_id,
                    arguments=clip(ev.arguments, 200))

    def _run(self, call_id: str, name: str, args_text: str, now_ns: int) -> None:
        s, p = self.s, self.s.profile
        if name not in p.tools or (name not in CALL_TOOLS and name not in p.webhooks):
            self._output(call_id, {"error": f"no such tool: {name}"})
            self._count(name, "unknown")
            self._want_response = True
            return
        try:
            args = _decode_args.decode(args_text) if args_text else {}
        except (msgspec.DecodeError, RecursionError):
            self._output(call_id, {"error": "arguments are not a JSON object"})
            self._count(name, "bad_arguments")
            self._want_response = True
            return
        if name == "end_call":
            reason = clip(str(args.get("reason") or "the agent ended the call"))
            self._output(call_id, {"ok": True, "note": "the line closes once the caller heard you"})
            self._queue(After("hangup", "agent-hangup", reason, now_ns))
            self._count(name, "ok")
        elif name == "transfer_call":
            target = args.get("target")
            t = p.transfer_targets.get(target) if isinstance(target, str) else None
            if t is None:
                self._output(call_id, {"error": "unknown target; choose one of: " + ", ".join(p.transfer_targets)})
                self._count(name, "bad_arguments")
                self._want_response = True
                return
            assert isinstance(target, str)
            if not self._queue(After("transfer", t.uri, clip(str(args.get("reason") or ""), 200), now_ns)):
                self._refused(call_id, name)
                return
            self._output(call_id, {"ok": True, "status": "transferring"})
            self._transfer_target = target
            self._count(name, "ok")
        elif name == "send_dtmf":
            digits = args.get("digits")
            if not isinstance(digits, str) or not _DTMF_OUT.match(digits):
                self._output(call_id, {"error": "digits must be 1-20 of 0-9, * and #"})
                self._count(name, "bad_arguments")
                self._want_response = True
                return
            if not self._queue(After("dtmf", digits, "", now_ns)):
                self._refused(call_id, name)
                return
            self._output(call_id, {"ok": True, "sent": digits})
            self._count(name, "ok")
        else:
            w = p.webhooks[name]
            self._tool_deadline[call_id] = (now_ns + int(w.timeout_s * NS), name)
            s.effects.append(RunTool(call_id, name, args_text or "{}", w, self._tool_headers()))

    def mcp_started(self, item_id: str) -> None:
        if len(self._mcp_running) < 32:
            self._mcp_running.add(item_id)

    def mcp_ended(self, item_id: str, now_ns: int) -> None:
        """`response.mcp_call.completed` / `.failed`."""
        self._mcp_running.discard(item_id)
        if not self._mcp_running and self._mcp_owed:
            self._mcp_owed = False
            self._want_response = True
            self.check(now_ns)

    def _tool_headers(self) -> dict[str, str]:
        s = self.s
        h = {"X-Voicebridge-Conversation": _header(s.call_id), "X-Voicebridge-Profile": s.profile.name,
             "X-Voicebridge-Caller": _header(s.caller), "X-Voicebridge-Callee": _header(s.callee)}
        if s.secrets.webhook_secret:
            h["Authorization"] = f"Bearer {s.secrets.webhook_secret}"
        return h

    def tool_result(self, call_id: str, output: str, ok: bool, now_ns: int) -> None:
        """The shell's answer to a `RunTool` (the webhook's JSON text, or an error object)."""
        entry = self._tool_deadline.pop(call_id, None)
        if entry is None:                 # timed out already, or the session was replaced
            return
        self._output(call_id, output)
        self._count(entry[1], "ok" if ok else "error")
        if not ok:
            self.s._log("warning", "call.tool_failed", tool=entry[1], function_call_id=call_id, error=clip(output, 200))
        self._want_response = True
        self.check(now_ns)

    # ---------------------------------------------------------------- VAIC events
    def activity(self, name: str, value: Any, now_ns: int) -> bool:
        """A VAIC event activity; False if it is not one of ours."""
        if name == "dtmf":
            self._dtmf_in(value, now_ns)
            self.check(now_ns)
        elif name == "playfinished":
            self._play_finished(value, now_ns)
        elif name == "nouserinput":
            self._no_user_input(now_ns)
        elif name == "transferstatus":
            self._transfer_status(value, now_ns)
        else:
            return False
        return True

    def _dtmf_in(self, value: Any, now_ns: int) -> None:
        s, d = self.s, self.s.profile.dtmf
        digits = "".join(c for c in str(value if value is not None else "")[:64] if c in _DTMF_IN)
        # keypad entries can be PINs or card numbers: the log gets their count, never the digits
        s._log("info", "call.dtmf", digits_n=len(digits), mode=d.mode)
        if d.mode == "off" or not digits:
            return
        if d.mode == "digit":
            for c in digits:
                self._keypad(c)
            return
        for c in digits:
            if d.terminator and c == d.terminator:
                self._keypad(self._dtmf + c)
                self._dtmf = ""
                continue
            self._dtmf += c
            if len(self._dtmf) >= d.max_digits:
                self._keypad(self._dtmf)
                self._dtmf = ""
        self._dtmf_deadline = now_ns + d.pause_ms * 1_000_000 if self._dtmf else 0

    def _keypad(self, digits: str) -> None:
        s = self.s
        if s.up_ready:
            s.to_openai.append(rt.conversation_item("user", f"(keypad) {digits}"))
            self._want_response = True

    def _play_finished(self, value: Any, now_ns: int) -> None:
        """VAIC finished playing a stream: check our clock against its `playedDurationMS`."""
        was, self._unreported = self._unreported, max(0, self._unreported - 1)
        s = self.s
        played = value.get("playedDurationMS") if isinstance(value, dict) else None
        ours = s.stream_reports.popleft() if s.stream_reports else None
        if isinstance(played, (int, float)) and not isinstance(played, bool) and ours is not None:
            diff_ms = ours - float(played)
            s.stats.play_clock_diff.record(int(abs(diff_ms) * 1000))
            s.play_clock_diffs += 1
            s._log_first_n("play_clock", "call.play_finished", "debug", ours_ms=round(ours, 1),
                           vaic_ms=played, diff_ms=round(diff_ms, 1))
        # VAIC says it is done with the last stream: our clock must not think it is still playing
        po = s.playout
        if was == 1 and po.open_item is None and po.play_end_t * NS > now_ns:
            po.play_end_t = now_ns / NS
        self.check(now_ns)

    def _no_user_input(self, now_ns: int) -> None:
        s, p = self.s, self.s.profile
        self._no_input += 1
        s._log("info", "call.no_user_input", count=self._no_input, action=p.no_user_input)
        if p.no_user_input == "hangup" or (p.no_user_input == "prompt" and self._no_input >= p.no_user_input_max):
            self._queue(After("hangup", "no-user-input", f"{self._no_input} noUserInput events", now_ns))
            self.check(now_ns)
        elif (p.no_user_input == "prompt" and s.up_ready and s.active_response is None
              and not self._requested and not self._hanging_up()):
            s.to_openai.append(rt.response_create(self._text(p.no_user_input_prompt)))
            self._requested = True

    def _transfer_status(self, value: Any, now_ns: int) -> None:
        s = self.s
        v = value if isinstance(value, dict) else {}
        status = clip(str(v.get("status") or ""), ID_CHARS)
        code = clip(str(v.get("reasonCode") or ""), ID_CHARS)
        reason = clip(str(v.get("reason") or ""), 200)
        target, self._transfer_target = self._transfer_target, ""
        s._log("warning" if status == "failed" else "info", "call.transfer_status", status=status,
               reason_code=code, reason=reason, target=target)
        if status != "failed":
            return
        s.transfer_failed(now_ns)
        if s.up_ready and s.is_active():
            s.to_openai.append(rt.system_note(
                f"The transfer to {target or 'the requested target'} failed ({code or 'no reason'}: "
                f"{reason}). Tell the caller and offer another way to help."))
            self._want_response = True
            self.check(now_ns)

    # ---------------------------------------------------------------- time and playout
    def timer(self, now_ns: int) -> None:
        s = self.s
        if self._dtmf_deadline and now_ns >= self._dtmf_deadline:
            self._dtmf_deadline = 0
            if self._dtmf:
                self._keypad(self._dtmf)
                self._dtmf = ""
        if self._limit_hard and now_ns >= self._limit_hard:
            self._limit_at = self._limit_hard = 0
            s.hang_up_now("max-duration", "closing turn did not finish within closing_grace_s", now_ns)
            return
        if self._limit_at and now_ns >= self._limit_at and self._hanging_up():
            self._limit_at = 0           # the call is being hung up already: no closing turn
        if self._limit_at and now_ns >= self._limit_at:
            if s.active_response is None and not self._requested and s.up_ready:
                self._limit_at = 0
                s._log("info", "call.max_duration", max_duration_s=s.profile.max_duration_s)
                s.to_openai.append(rt.response_create(self._text(s.profile.closing_instructions)))
                self._requested = True
                self._closing = "asked"
            elif not s.up_ready:
                self._limit_at = 0
                s.hang_up_now("max-duration", "max_duration_s reached (no model to say goodbye)", now_ns)
                return
            else:
                self._limit_at = now_ns + NS // 4     # a response is active: look again soon
        for call_id, (d, name) in list(self._tool_deadline.items()):
            if now_ns >= d:
                del self._tool_deadline[call_id]
                self._output(call_id, {"error": f"{name} did not answer in time"})
                self._count(name, "timeout")
                s._log("warning", "call.tool_failed", tool=name, function_call_id=call_id, error="timeout")
                self._want_response = True
        self.check(now_ns)

    def stream_stopped(self, now_ns: int) -> None:
        """Our clock says a play stream has been played out and stopped."""
        self._stream_done_ns = now_ns
        self._unreported += 1

    def check(self, now_ns: int) -> None:
        """Run what waits for the playout, then the response owed, if their moment has come."""
        s = self.s
        if not s.is_active():
            return
        while self._after and self._played(now_ns):
            a = self._after.popleft()
            if a.kind == "hangup":
                self._after.clear()
                s.hang_up_now(a.value, a.detail, now_ns)
                return
            if a.kind == "transfer":
                s._log("info", "call.transfer", target=self._transfer_target, uri=a.value,
                       reason=a.detail, waited_ms=round((now_ns - a.since_ns) / 1e6, 1))
                s.proto.request_transfer(a.value, a.detail)
            elif a.kind == "dtmf":
                s._log("info", "call.send_dtmf", digits_n=len(a.value))
                s.proto.send_dtmf(a.value)
                self._want_response = True
        if (self._want_response and not self._after and not self._tool_deadline
                and not self._mcp_running and s.up_ready
                and s.active_response is None and not self._requested):
            self._want_response = False
            self._requested = True
            s.to_openai.append(rt.response_retry())

    def _played(self, now_ns: int) -> bool:
        """Everything sent to VAIC has been heard (and VAIC said so, if it reports playFinished)."""
        s = self.s
        po = s.playout
        if s.active_response is not None or po.pending or po.open_item is not None:
            return False
        if po.play_end_t * NS > now_ns:
            return False
        if s.profile.play_finished and self._unreported:
            if now_ns < self._stream_done_ns + PLAY_FINISHED_WAIT_NS:
                return False
            self._unreported = 0         # those reports are not coming: do not wait for them again
        return True

    def session_lost(self) -> None:
        """The OpenAI session was replaced: its pending calls and the response owed go with it."""
        self._calls.clear()
        self._args.clear()
        self._tool_deadline.clear()
        self._mcp_running.clear()
        self._mcp_owed = False
        self._requested = False
        self._want_response = False      # what it was owed for is gone with that session
        if self._closing:                # the closing turn is asked again in the new session
            self._closing = ""
            if not self._limit_at and self._limit_hard:
                self._limit_at = self._limit_hard - int(self.s.profile.closing_grace_s * NS)

    def caller_spoke(self) -> None:
        """The caller said something: VAIC's noUserInput count starts again."""
        self._no_input = 0

    def _hanging_up(self) -> bool:
        return any(a.kind == "hangup" for a in self._after)

    # ---------------------------------------------------------------- helpers
    def _queue(self, a: After) -> bool:
        """Queue an after-play action; False if refused: nothing goes after a hang-up, and at
        most MAX_AFTER others wait. A hang-up is always taken (one)."""
        if any(x.kind == "hangup" for x in self._after):
            return a.kind == "hangup"
        if a.kind != "hangup" and len(self._after) >= MAX_AFTER:
            return False
        self._after.append(a)
        return True

    def _refused(self, call_id: str, name: str) -> None:
        self._output(call_id, {"error": "not done: the call is ending, or too many actions are waiting"})
        self._count(name, "refused")
        self._want_response = True

    def _output(self, call_id: str, output: Any) -> None:
        s = self.s
        if s.up_ready:
            s.to_openai.append(rt.function_output(call_id, output))

    def _count(self, tool: str, outcome: str) -> None:
        if outcome == "unknown":
            tool = "unknown_tool"        # a name the model made up is no metric label
        self.s.stats.count_tool(tool, outcome)

    def _text(self, template: str) -> str:
        return self.s.render(template)

    def _add_usage(self, u: rt.Usage) -> None:
        t = self.tokens
        i, o = u.input_token_details, u.output_token_details
        if i is not None:
            t[0] += i.audio_tokens
            t[1] += i.text_tokens
            t[2] += i.cached_tokens
        else:
            t[1] += u.input_tokens
        if o is not None:
            t[3] += o.audio_tokens
            t[4] += o.text_tokens
        else:
            t[4] += u.output_tokens
        self.s.stats.count_tokens(self.s.profile.name, u)
