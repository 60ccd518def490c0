"""Review of call control (issue 9): each test shows one suspected bug, in virtual time.

They use the `Drive` helper of test_call_control (the Sans-I/O core alone, frames in and out).
A test here fails while its bug is present; /tmp/h/review_cc_fixes.diff proposes the fixes.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from test_call_control import PROFILES, Drive, make_cfg, played_until
from voicebridge.control import RunTool
from voicebridge.profiles import WebhookTool
from voicebridge.session import Phase
from voicebridge.webhooks import WebhookRunner


def _pf_cfg(**call: Any) -> Any:
    """The default profile with play_finished on (VAIC reports playFinished)."""
    return make_cfg({**PROFILES, "default": {**PROFILES["default"], "play_finished": True}},
                    call=call or {})


def _speech_started(d: Drive) -> None:
    d.oai_in({"type": "input_audio_buffer.speech_started", "audio_start_ms": 100, "item_id": "u1"})


# ----------------------------------------------------------------------------- after-play queue

def test_two_send_dtmf_calls_of_one_response_both_go_out_without_another_event() -> None:
    """The second of two after-play actions waits for a `check` that nothing schedules: the
    model asked for "123" then "#", only "123" is keyed, and no response follows (a stall
    until the caller happens to speak)."""
    d = Drive()
    d.response("r1", calls=[("a", "send_dtmf", {"digits": "123"}), ("b", "send_dtmf", {"digits": "#"})])
    d.advance(5000)                       # no other event: only the timer runs
    assert [a["activityParams"]["dtmfDigits"] for _, a in d.activities("sendDtmf")] == ["123", "#"]
    assert len(d.sent("response.create")) == 1


def test_a_queued_hang_up_is_not_dropped_by_later_after_play_actions() -> None:
    """`_after` is a deque(maxlen=4): a fifth action silently drops the oldest, here the
    hang-up the model asked for first; the caller is never hung up on (the output said ok)."""
    d = Drive()
    calls = [("e", "end_call", {})] + [(f"d{i}", "send_dtmf", {"digits": str(i)}) for i in range(4)]
    d.response("r1", audio_ms=300, calls=calls)
    assert d.outputs()["e"]["ok"] is True
    for _ in range(10):                   # events that run `check` (whatever the other bug does)
        d.advance(1000)
        d.event("playFinished", {"playedDurationMS": 0})
    assert len(d.activities("hangup")) == 1


# ----------------------------------------------------------------------------- VAIC socket swap

def test_no_timer_spin_while_vaic_is_detached_with_a_hang_up_waiting_for_play_finished() -> None:
    """`_after_deadline` (stream done + 3 s) is offered while the VAIC socket is gone, but
    `check` does nothing then: the deadline stays in the past and the shell's timer spins
    until the resume grace is over."""
    d = Drive(_pf_cfg(resume_grace_s=10))
    d.response("r1", audio_ms=300, calls=[("e", "end_call", {})])
    d.advance(1000)                       # played and stopped by our clock, no playFinished yet
    assert not d.activities("hangup")
    d.s.vaic_lost(1006, None, d.now)      # dropped without session.end: kept for a resume
    d.collect()
    assert d.s.vaic_gone and d.s.phase is Phase.ACTIVE
    spins = 0
    for _ in range(50):
        dl = d.s.next_deadline_ns()
        assert dl is not None
        if dl <= d.now:
            spins += 1
        d.now = max(d.now, dl)
        d.s.timer(d.now)
        d.collect()
        if d.s.phase is not Phase.ACTIVE:
            break
    assert spins == 0, f"{spins} timer runs at a deadline already past"


def test_a_hang_up_pending_when_vaic_detached_goes_out_soon_after_the_resume() -> None:
    """`vaic_attached` never runs call control's `check`: an end_call queued while the socket
    was gone waits for the next model event, or the idle timeout (60 s) runs it."""
    d = Drive(make_cfg(call={"resume_grace_s": 10}))
    d.response("r1", audio_ms=1000, calls=[("e", "end_call", {})])
    d.advance(200)
    d.s.vaic_lost(1006, None, d.now)
    d.collect()
    d.advance(500)
    d.s.vaic_attached(d.now)
    d.collect()
    d.advance(3000)
    (t, act), = d.activities("hangup")
    assert act["activityParams"]["hangupReason"] == "agent-hangup"


def test_a_webhook_answer_received_while_detached_gets_its_follow_up_after_the_resume() -> None:
    """The same missing `check`: the response owed for a webhook's answer that came while the
    VAIC socket was gone is not asked for after the resume."""
    d = Drive(make_cfg(call={"resume_grace_s": 10}))
    d.response("r1", calls=[("w1", "crm", {})])
    assert any(type(e) is RunTool for e in d.effects)
    d.s.vaic_lost(1006, None, d.now)
    d.collect()
    d.s.tool_result("w1", '{"name": "Ada"}', True, d.now)
    d.collect()
    d.s.vaic_attached(d.now)
    d.collect()
    d.advance(1000)
    assert len(d.sent("response.create")) == 1


# ----------------------------------------------------------------------------- playFinished

def test_a_late_play_finished_of_an_earlier_stream_does_not_release_the_goodbye_hang_up() -> None:
    """playFinished is matched to no stream in `_played`: VAIC drains an interrupted prompt
    (the Live Hub recording: it played all of it after playStream.stop), so its playFinished
    comes after the goodbye stream was stopped by our clock; that one event releases the
    hang-up although VAIC has not finished (or even begun) the goodbye."""
    d = Drive(_pf_cfg())
    d.response("r1", audio_ms=2000, done=False)
    d.advance(300)
    _speech_started(d)                    # barge-in: stream 1 stopped, VAIC keeps playing it
    d.done("r1", "cancelled")
    d.response("r2", audio_ms=300, calls=[("e", "end_call", {})])
    d.advance(800)                        # stream 2 played and stopped by our clock
    stops = [t for t, m in d.vaic if m["type"] == "playStream.stop"]
    assert len(stops) == 2
    d.event("playFinished", {"playedDurationMS": 2000})   # stream 1's, late
    assert not d.activities("hangup"), "hung up on the first stream's playFinished"
    d.event("playFinished", {"playedDurationMS": 300})    # the goodbye's
    assert len(d.activities("hangup")) == 1


# ----------------------------------------------------------------------------- MCP

def test_an_mcp_call_cut_off_by_a_barge_in_does_not_block_every_later_response() -> None:
    """`_mcp_running` only loses an item on `response.mcp_call.completed/failed`; a response
    cancelled by a barge-in while its MCP call runs may never send either. The id stays, and
    `check` then never sends a response.create again in this session: keypad entries, tool
    answers and failed transfers go unanswered. Nothing bounds it in time."""
    d = Drive()
    d.oai_in({"type": "response.created", "response": {"id": "r1"}})
    d.oai_in({"type": "response.mcp_call.in_progress", "item_id": "m1", "output_index": 0})
    _speech_started(d)
    d.oai_in({"type": "response.output_item.done", "response_id": "r1", "output_index": 0,
              "item": {"type": "mcp_call", "id": "m1", "server_label": "crm", "name": "find",
                       "arguments": "{}", "status": "incomplete"}})
    d.done("r1", "cancelled")
    d.advance(5_000)
    d.event("DTMF", "1#")
    assert len(d.sent("response.create")) == 1


# ----------------------------------------------------------------------------- bounds

def test_function_calls_of_unknown_responses_do_not_grow_the_calls_table() -> None:
    """`function_call` does `setdefault(rid, [])` before its bound check, so every call naming
    a new response id adds a key, even the ones refused: the model side grows `_calls`
    without bound when no response.done pops them."""
    d = Drive()
    for i in range(200):
        d.oai_in({"type": "response.function_call_arguments.done", "response_id": f"r{i}",
                  "item_id": f"fc{i}", "output_index": 0, "call_id": f"c{i}", "name": "crm",
                  "arguments": "{}"})
    assert len(d.s.control._calls) <= 9


# ----------------------------------------------------------------------------- responses

def test_the_greeting_is_not_a_second_response_create_while_ours_is_requested() -> None:
    """`_greet` checks `active_response` but not call control's `_requested`: a keypad turn
    asked for before the start activity (or before the start wait ran out) and the greeting
    both go out before any response.created (conversation_already_has_active_response)."""
    cfg = make_cfg({**PROFILES, "default": {**PROFILES["default"], "greeting": "Say hello."}})
    d = Drive(cfg, start=False)
    d.advance(1490)                       # no start activity yet; the start wait ends at 1500 ms
    d.event("DTMF", "1#")
    assert len(d.sent("response.create")) == 1
    d.advance(100)                        # the start wait is over (the greeting) before the
    # keypad turn's response.created came back: a race of one round trip
    creates = d.sent("response.create")
    assert len(creates) == 1, "a second response.create before the first was created"


# ----------------------------------------------------------------------------- hang-up reasons

def test_an_expired_session_without_reconnect_hangs_up_with_session_expired() -> None:
    """README: hangupReason `session-expired`. `hangup_token` maps only the reason
    "openai_session_expired", which the session never sets: an expired session (reconnect
    off) is reported as `model-unreachable`."""
    d = Drive(make_cfg(openai={"reconnect": False}))
    d.oai_in({"type": "error", "error": {"type": "invalid_request_error", "code": "session_expired",
                                         "message": "Your session hit the maximum duration"}})
    (_, act), = d.activities("hangup")
    assert act["activityParams"]["hangupReason"] == "session-expired"


# ----------------------------------------------------------------------------- webhooks

def test_a_webhook_call_with_non_ascii_metadata_still_gets_its_answer() -> None:
    """The caller/callee/conversation id come from VAIC and go into X-Voicebridge-* headers;
    httpx encodes header values as ASCII and raises UnicodeEncodeError, which `run` does not
    catch: `done` is never called (the model hears "did not answer in time" only after the
    timeout) and the task dies with an unretrieved exception (a traceback in the log)."""
    seen: list[tuple[str, str, bool]] = []
    hook = WebhookTool(url="http://127.0.0.1:9/crm", description="d", timeout_s=2.0)
    eff = RunTool("c1", "crm", "{}", hook, {"X-Voicebridge-Caller": "sip:müller@example.com"})

    async def go() -> None:
        runner = WebhookRunner()
        try:
            await runner.run(eff, lambda *a: seen.append(a))
        finally:
            await runner.aclose()

    asyncio.run(go())
    assert len(seen) == 1
    call_id, out, ok = seen[0]
    assert call_id == "c1" and not ok and "error" in json.loads(out)


def test_webhook_metadata_headers_from_vaic_are_valid_header_values() -> None:
    """The X-Voicebridge-* values are VAIC's strings as they came (clipped only): a SIP
    caller with a non-ASCII user part cannot be sent by httpx (and CR/LF would be refused)."""
    d = Drive(start=False)
    d.event("start", parameters={"callee": "+1555000", "caller": "sip:müller@example.com"})
    d.response("r1", calls=[("w1", "crm", {})])
    (run,) = [e for e in d.effects if type(e) is RunTool]
    for k, v in run.headers.items():
        assert v.isascii() and v.isprintable(), (k, v)
    assert "m%C3%BCller" in run.headers["X-Voicebridge-Caller"]


# ----------------------------------------------------------------------------- reload

def test_a_reload_adding_an_mcp_server_gives_new_calls_its_token(tmp_path: Any, monkeypatch: Any) -> None:
    """SIGHUP takes `[mcp.*]` for new calls and validates its `authorization_env` against the
    environment, but keeps the old `Secrets` (whose `mcp_tokens` lack the new label): new calls
    pass the MCP server to OpenAI without its token, though the configuration was accepted."""
    from voicebridge import profiles
    from voicebridge.config import load_config
    from voicebridge.server import Bridge

    monkeypatch.setenv("VOICEBRIDGE_TOKEN", "t")
    monkeypatch.setenv("CRM_MCP_TOKEN", "mcp-tok")
    path = tmp_path / "config.toml"
    path.write_text("[server]\nport = 0\nadmin_port = -1\n")
    cfg, secrets = load_config(path)

    async def go() -> Any:
        b = Bridge(cfg, secrets, config_path=str(path))
        path.write_text("[server]\nport = 0\nadmin_port = -1\n"
                        '[mcp.crm]\nserver_url = "https://mcp.example/crm"\n'
                        'authorization_env = "CRM_MCP_TOKEN"\n'
                        '[profiles.default]\ntools = ["crm"]\n')
        assert b._reload()               # reload() minus the systemd notification
        return b

    b = asyncio.run(go())
    prof = profiles.for_config(b.cfg)["default"]
    (tool,) = profiles.tool_definitions(prof, b.secrets.mcp_tokens)
    assert tool.get("authorization") == "mcp-tok"


# ----------------------------------------------------------------------------- sanity

def test_sanity_the_helper_still_plays_a_plain_goodbye() -> None:
    """Not a bug: the Drive pattern used above behaves as in test_call_control."""
    d = Drive()
    d.response("r1", audio_ms=500, calls=[("e", "end_call", {})])
    d.advance(2000)
    (t, _), = d.activities("hangup")
    assert t >= played_until(d)
