"""End to end, call control: the fake model calls tools, the simulated VAIC plays, presses keys
and reports transfers, over real sockets on 127.0.0.1. Each tool's VAIC activity must come after
what the model said before it was played, and nothing may be cut."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import msgspec
import pytest

import tests.conftest as conftest
from tests.conftest import TOKEN, fast_fake, running, vaic_url, wait_for
from voicebridge.sim.caller import (CallerConfig, Dtmf, NoUserInput, Silence, Speak, WaitForActivity,
                                    WaitForBot, run_call)

TARGETS = {"sales": {"uri": "sip:sales@pbx.example", "description": "the sales team"}}


def profiles(**default: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"tools": ["end_call", "transfer_call", "send_dtmf"], "transfer_targets": TARGETS,
                            "greeting": ""}
    base.update(default)
    return {"default": base}


def caller(bridge: Any, script: list, **kw: Any) -> CallerConfig:
    return CallerConfig(url=vaic_url(bridge), token=TOKEN, script=script, stop_policy="drain", **kw)


def no_cut(res: Any, name: str) -> Any:
    """The one `name` activity, asserted to arrive with nothing left to play and nothing cut."""
    (act,) = res.activities_named(name)
    assert act.unplayed_ms == 0 and act.open_stream is None and not act.streams_cut, act
    assert res.cut_ms == 0 and all(s.flushed_ms == 0 for s in res.streams), res.streams
    return act


def only_session(fake: Any) -> Any:
    (s,) = fake.sessions
    assert not s.violations, s.violations
    assert not s.unanswered_calls(), s.unanswered_calls()
    return s


async def test_end_call_after_the_goodbye_was_heard(logs):
    fake = fast_fake(replies=['Goodbye, and thanks for calling! @@end_call {"reason": "caller is done"}'],
                     reply_ms=[1500])
    async with running(fake, profiles=profiles(play_finished=True)) as (fk, bridge):
        res = await run_call(caller(bridge, [Speak(700), WaitForActivity("hangup", 8000), Silence(200)],
                                    play_finished=True))
        assert await wait_for(lambda: logs.events("call.end"), 5)
    assert res.end_reason == "bot-hangup", (res.end_reason, res.violations)
    assert not res.violations
    act = no_cut(res, "hangup")
    assert act.activity["activityParams"] == {"hangupReason": "agent-hangup"}
    heard = sum(s.received_ms for s in res.streams)
    assert heard >= 1500 - 5                         # the whole goodbye reached the caller
    finished = res.sent_named("playFinished")
    assert finished and finished[-1].t_ms <= act.t_ms      # VAIC said it played it, then the hang-up
    s = only_session(fk)
    assert [c.name for c in s.function_calls] == ["end_call"]
    assert json.loads(s.function_outputs[s.function_calls[0].call_id])["ok"] is True
    assert not [r for r in s.client_responses if r.reason == "function_call_output"]  # no more turns
    (end,) = logs.events("call.end")
    assert end["reason"] == "agent_hangup" and end["tool_calls"] == 1 and end["play_clock_checks"] >= 1
    (tc,) = logs.events("call.tool_call")          # the call's id stays the conversation's
    assert tc["call_id"] == end["call_id"] and tc["function_call_id"] == s.function_calls[0].call_id


async def test_transfer_fails_then_the_model_says_so_then_succeeds(logs):
    fake = fast_fake(replies=['One moment, I will connect you. @@transfer_call {"target": "sales", "reason": "quote"}',
                              'Sorry, sales is busy. Let me try once more. @@transfer_call {"target": "sales"}'],
                     reply_ms=[900])
    async with running(fake, profiles=profiles()) as (fk, bridge):
        res = await run_call(caller(bridge, [Speak(700), WaitForActivity("transfer", 8000), WaitForBot(8000),
                                             WaitForActivity("transfer", 8000), Silence(300)],
                                    transfer_result=["failed", "transferred"]))
        assert await wait_for(lambda: logs.events("call.end"), 5)
    assert res.end_reason == "transfer" and not res.violations, (res.end_reason, res.violations)
    first, second = res.activities_named("transfer")
    for act in (first, second):
        assert act.unplayed_ms == 0 and act.open_stream is None and not act.streams_cut, act
        assert act.activity["activityParams"]["transferTarget"] == "sip:sales@pbx.example"
    assert first.activity["activityParams"]["handoverReason"] == "quote"
    s = only_session(fk)
    notes = [i for i in s.client_items if i.role == "system"]
    assert len(notes) == 1 and "failed" in notes[0].text and "declined" in notes[0].text
    assert len(s.function_calls) == 2
    (end,) = logs.events("call.end")
    assert end["reason"] == "transferred"
    assert logs.events("call.transfer_status")[0]["status"] == "failed"


async def test_send_dtmf_and_keypad_input(logs):
    fake = fast_fake(replies=['Pressing one for you. @@send_dtmf {"digits": "1#"}', "Done.", "Got your number."],
                     reply_ms=[600])
    async with running(fake, profiles=profiles()) as (fk, bridge):
        res = await run_call(caller(bridge, [Speak(700), WaitForActivity("sendDtmf", 8000), WaitForBot(8000),
                                             Dtmf("42#", per_digit=True, gap_ms=100), WaitForBot(8000)]))
    assert res.end_reason == "caller-hangup" and not res.violations, (res.end_reason, res.violations)
    assert res.dtmf_received == ["1#"]
    no_cut_act = res.activities_named("sendDtmf")[0]
    assert no_cut_act.unplayed_ms == 0 and no_cut_act.open_stream is None
    s = only_session(fk)
    keypad = [i.text for i in s.client_items if i.role == "user"]
    assert keypad == ["(keypad) 42#"]
    assert not [r for r in s.client_responses if r.rejected]


class _Hook(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []

    def log_message(self, *a: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))) or b"{}")
        _Hook.seen.append({"headers": dict(self.headers), "body": body})
        if self.path == "/slow":
            time.sleep(3)
        out = json.dumps({"order": body.get("order"), "status": "shipped"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        pass        # the bridge gave up on a slow answer: the broken pipe is expected


@pytest.fixture
def webhook() -> Iterator[str]:
    _Hook.seen = []
    srv = _QuietServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=srv.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    srv.shutdown()
    srv.server_close()


async def test_webhook_tool_answers_the_model(logs, webhook, monkeypatch):
    monkeypatch.setattr(conftest, "SECRETS", msgspec.structs.replace(conftest.SECRETS, webhook_secret="hook-s3cret"))
    fake = fast_fake(replies=['Let me check. @@order_status {"order": "A42"}', "Your order has shipped."],
                     reply_ms=[600])
    hooks = {"order_status": {"url": webhook + "/hook", "description": "Order status by number", "timeout_s": 2.0,
                              "parameters": {"type": "object", "properties": {"order": {"type": "string"}}}}}
    async with running(fake, profiles=profiles(tools=["order_status"]), webhooks=hooks) as (fk, bridge):
        res = await run_call(caller(bridge, [Speak(700), WaitForBot(8000), WaitForBot(8000), Silence(200)]))
    assert res.end_reason == "caller-hangup" and not res.violations
    (seen,) = _Hook.seen
    assert seen["body"] == {"order": "A42"}
    assert seen["headers"]["Authorization"] == "Bearer hook-s3cret"
    assert seen["headers"]["X-Voicebridge-Caller"] and seen["headers"]["X-Voicebridge-Conversation"]
    s = only_session(fk)
    (call,) = s.function_calls
    assert json.loads(s.function_outputs[call.call_id]) == {"order": "A42", "status": "shipped"}
    follow = [r for r in s.client_responses if r.reason == "function_call_output"]
    assert len(follow) == 1 and not follow[0].rejected
    assert len(res.streams) >= 2                       # the answer after the tool was played
    assert "hook-s3cret" not in json.dumps(logs.events())


async def test_a_slow_webhook_gets_an_error_and_audio_keeps_flowing(logs, webhook):
    fake = fast_fake(replies=["Let me check. @@order_status {}", "Sorry, the system is slow today."],
                     reply_ms=[600])
    hooks = {"order_status": {"url": webhook + "/slow", "description": "Order status", "timeout_s": 0.5}}
    async with running(fake, profiles=profiles(tools=["order_status"]), webhooks=hooks) as (fk, bridge):
        res = await run_call(caller(bridge, [Speak(700), WaitForBot(8000), WaitForBot(8000), Silence(200)]))
    assert res.end_reason == "caller-hangup" and not res.violations
    s = only_session(fk)
    (call,) = s.function_calls
    assert "did not answer" in json.loads(s.function_outputs[call.call_id])["error"]
    assert logs.events("call.tool_failed")
    # the caller's audio was forwarded all along: every chunk reached the model
    assert len(s.received_of("input_audio_buffer.append")) == res.chunks_sent


async def test_profile_by_callee_and_max_duration(logs, tmp_path):
    fake = fast_fake(replies=["Hello Berlin.", "Our time is up, goodbye!"], reply_ms=[700])
    profs = {**profiles(), "berlin": {"match_callee": ["+4930*"], "instructions": "Berlin desk for {caller}.",
                                      "max_duration_s": 3, "closing_grace_s": 8, "transcripts": True,
                                      "transcription_model": "gpt-4o-mini-transcribe"}}
    async with running(fake, profiles=profs, transcripts={"dir": str(tmp_path / "tx")}) as (fk, bridge):
        res = await run_call(caller(bridge, [Speak(700), WaitForActivity("hangup", 12000), Silence(200)],
                                    callee="+49301234567"))
        assert await wait_for(lambda: logs.events("call.end"), 5)
    assert res.end_reason == "bot-hangup" and not res.violations
    act = no_cut(res, "hangup")
    assert act.activity["activityParams"]["hangupReason"] == "max-duration"
    s = only_session(fk)
    updates = s.received_of("session.update")
    assert updates[-1]["session"]["instructions"].startswith("Berlin desk for ")
    closing = [r for r in s.client_responses if r.instructions and "maximum call time" in r.instructions]
    assert len(closing) == 1
    (end,) = logs.events("call.end")
    assert end["profile"] == "berlin" and end["reason"] == "max_duration"
    assert end["usage_output_audio"] > 0
    assert logs.events("call.transcript")
    (tx,) = (tmp_path / "tx").iterdir()
    lines = [json.loads(x) for x in tx.read_text().splitlines()]
    assert lines[0]["profile"] == "berlin" and any(x.get("role") == "agent" for x in lines[1:])
    text = bridge.metrics_text().decode()
    assert 'voicebridge_tokens_total{kind="output_audio",profile="berlin"}' in text


async def test_no_user_input_prompt_then_hangup(logs):
    fake = fast_fake(replies=["Are you still there?", "Are you still there?"], reply_ms=[500])
    async with running(fake, profiles=profiles(no_user_input="prompt", no_user_input_max=2)) as (fk, bridge):
        res = await run_call(caller(bridge, [Silence(500), NoUserInput(1), WaitForBot(8000), NoUserInput(2),
                                             WaitForActivity("hangup", 8000), Silence(200)]))
    assert res.end_reason == "bot-hangup"
    act = no_cut(res, "hangup")
    assert act.activity["activityParams"]["hangupReason"] == "no-user-input"


async def test_reload_takes_new_profiles_for_new_calls(tmp_path):
    """SIGHUP's reload path (Bridge.reload) with a changed profile: the next call runs with it."""
    from tests.daemon_harness import ROOT, running_fake, start_daemon
    from tests.daemon_harness import TOKEN as DAEMON_TOKEN
    cfg = tmp_path / "c.toml"
    base = (ROOT / "config.toml").read_text()
    cfg.write_text(base + '\n[profiles.default]\ninstructions = "Version one for {caller}."\n')
    async with running_fake() as fk:
        d = await start_daemon(fk, tmp_path, name="reload_profiles", config_path=cfg,
                               VOICEBRIDGE_OPENAI_INSTRUCTIONS="")
        try:
            r1 = await run_call(CallerConfig(url=d.url, token=DAEMON_TOKEN, caller="+1555000001", script=[Speak(300), Silence(300)]))
            cfg.write_text(base + '\n[profiles.default]\ninstructions = "Version two for {caller}."\n')
            import signal as _signal
            d.signal(_signal.SIGHUP)
            assert await d.wait_event("server.reloaded", 5)
            r2 = await run_call(CallerConfig(url=d.url, token=DAEMON_TOKEN, caller="+1555000002", script=[Speak(300), Silence(300)]))
        finally:
            await d.stop()
            d.kill()
    assert r1.end_reason == r2.end_reason == "caller-hangup"
    seen = [u["session"].get("instructions") for s in fk.sessions for u in s.received_of("session.update")]
    assert "Version one for +1555000001." in seen and "Version two for +1555000002." in seen
    changed = d.events("server.reloaded")[0]["changed"]
    assert any(k.startswith("profiles") for k in changed), changed


async def test_mcp_tool_is_offered_its_call_logged_and_continued(logs):
    fake = fast_fake(replies=['Let me look you up. @@mcp:crm:find_customer {"phone": "+1555"}', "Found you, Ada."],
                     reply_ms=[600], mcp_call_ms=150)
    mcp = {"crm": {"server_url": "https://mcp.example.com/crm", "allowed_tools": ["find_customer"]}}
    async with running(fake, profiles=profiles(tools=["crm"]), mcp=mcp) as (fk, bridge):
        res = await run_call(caller(bridge, [Speak(700), WaitForBot(8000), WaitForBot(8000), Silence(200)]))
    assert res.end_reason == "caller-hangup" and not res.violations
    s = only_session(fk)
    assert "mcp:crm" in s.tools_offered
    (call,) = s.mcp_calls
    assert call.offered and call.status == "completed"
    (ev,) = logs.events("call.mcp_call")
    assert ev["server"] == "crm" and ev["tool"] == "find_customer" and ev["ok"] is True
    follow = [r for r in s.client_responses if not r.rejected]
    assert len(follow) == 1                      # the one follow-up after the MCP call ended
    assert len(res.streams) >= 2
