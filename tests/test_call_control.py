"""Call control in the Sans-I/O core, in virtual time: tools, keypad, VAIC events, time limit,
profiles. Every frame the bridge sends to OpenAI is validated against the openai SDK's types."""

from __future__ import annotations

import base64
import json
from typing import Any

import pytest

from sdk_check import validate_client_event
from voicebridge.config import ConfigError, Secrets, load_config
from voicebridge.control import RunTool
from voicebridge.session import CallSession, Dial, Finished, Log, Phase, Transcript, hangup_token
from voicebridge.stats import Stats

MS = 1_000_000
T0 = 10_000 * MS
SECRETS = Secrets(token="t", openai_api_key="k", webhook_secret="s3cret")

PROFILES = {
    "default": {"tools": ["end_call", "transfer_call", "send_dtmf", "crm"],
                "transfer_targets": {"sales": {"uri": "tel:+4930111", "description": "sales team"},
                                     "support": {"uri": "sip:support@pbx.example"}},
                "instructions": "Default agent for {callee}."},
    "berlin": {"match_callee": ["+4930*"], "instructions": "Berlin desk for {caller} ({param.locale}).",
               "voice": "cedar", "tools": ["end_call"]},
}
WEBHOOKS = {"crm": {"url": "http://127.0.0.1:9/crm", "description": "Look up the caller in the CRM",
                    "timeout_s": 2.0}}


def make_cfg(profiles: dict | None = None, **sections: dict) -> Any:
    over: dict = {"call": {"hangup_grace_s": 1.0, "resume_grace_s": 0},
                  "profiles": PROFILES if profiles is None else profiles, "webhooks": WEBHOOKS}
    for k, v in sections.items():
        over.setdefault(k, {}).update(v) if isinstance(over.get(k), dict) else over.__setitem__(k, v)
    return load_config(None, env={"VOICEBRIDGE_TOKEN": "t"}, overrides=over)[0]


class Drive:
    """A call against the core alone: VAIC and OpenAI frames in, virtual time, frames out."""

    def __init__(self, cfg: Any = None, callee: str = "+1555000", start: bool = True) -> None:
        self.cfg = cfg if cfg is not None else make_cfg()
        self.stats = Stats()
        self.now = T0
        self.s = CallSession(self.cfg, SECRETS, self.stats, self.now, "c1")
        self.vaic: list[tuple[int, dict]] = []
        self.oai: list[tuple[int, dict]] = []
        self.logs: list[Log] = []
        self.effects: list[Any] = []
        self.vaic_in({"type": "session.initiate", "conversationId": "c1", "botName": "bot",
                      "caller": "+4917000", "expectAudioMessages": True,
                      "supportedMediaFormats": ["raw/lpcm16_24"]})
        assert any(type(e) is Dial for e in self.effects)
        self.s.openai_connected(self.now)
        self.collect()
        self.oai_in({"type": "session.created", "session": {"id": "sess_1"}})
        self.oai_in({"type": "session.updated", "session": {"audio": {"output": {"format": {"type": "audio/pcm"}}}}})
        if start:
            self.start(callee)

    # -- plumbing
    def collect(self) -> None:
        s = self.s
        for f in s.to_vaic:
            self.vaic.append((self.now, json.loads(f)))
        for f in s.to_openai:
            validate_client_event(f)
            self.oai.append((self.now, json.loads(f)))
        s.to_vaic.clear()
        s.to_openai.clear()
        s.marks.clear()
        for e in s.effects:
            (self.logs if type(e) is Log else self.effects).append(e)
        s.effects.clear()

    def vaic_in(self, msg: dict) -> None:
        self.s.vaic_frame(json.dumps(msg), self.now)
        self.collect()

    def oai_in(self, msg: dict) -> None:
        self.s.openai_frame(json.dumps(msg), self.now)
        self.collect()

    def event(self, name: str, value: Any = None, **kw: Any) -> None:
        self.vaic_in({"type": "activities", "activities": [{"type": "event", "name": name, "value": value, **kw}]})

    def start(self, callee: str) -> None:
        self.event("start", parameters={"callee": callee, "caller": "+4917000", "locale": "de"})

    def advance(self, ms: float) -> None:
        """Run the timer at every deadline up to now + ms."""
        end = self.now + int(ms * MS)
        for _ in range(100_000):
            d = self.s.next_deadline_ns()
            if d is None or d > end or self.s.phase is Phase.ENDED:
                break
            self.now = max(self.now, d)
            self.s.timer(self.now)
            self.collect()
        self.now = max(self.now, end)

    # -- the model
    def response(self, rid: str, audio_ms: int = 0, calls: list[tuple[str, str, dict]] = (),
                 status: str = "completed", done: bool = True, usage: dict | None = None) -> None:
        self.oai_in({"type": "response.created", "response": {"id": rid}})
        item = f"item_{rid}"
        sent = 0
        while sent < audio_ms:
            n = min(100, audio_ms - sent)
            self.oai_in({"type": "response.output_audio.delta", "response_id": rid, "item_id": item,
                         "content_index": 0, "delta": base64.b64encode(bytes(n * 48)).decode()})
            sent += n
        if audio_ms:
            self.oai_in({"type": "response.output_audio.done", "response_id": rid, "item_id": item})
        for call_id, name, args in calls:
            self.oai_in({"type": "response.function_call_arguments.done", "response_id": rid,
                         "item_id": f"fc_{call_id}", "output_index": 1, "call_id": call_id,
                         "name": name, "arguments": json.dumps(args)})
        if done:
            self.done(rid, status, usage)

    def done(self, rid: str, status: str = "completed", usage: dict | None = None) -> None:
        r: dict = {"id": rid, "status": status}
        if usage:
            r["usage"] = usage
        self.oai_in({"type": "response.done", "response": r})

    # -- views
    def sent(self, typ: str) -> list[tuple[int, dict]]:
        return [(t, m) for t, m in self.oai if m["type"] == typ]

    def outputs(self) -> dict[str, dict]:
        return {m["item"]["call_id"]: json.loads(m["item"]["output"]) for _, m in self.oai
                if m["type"] == "conversation.item.create" and m["item"]["type"] == "function_call_output"}

    def activities(self, name: str) -> list[tuple[int, dict]]:
        return [(t, a) for t, m in self.vaic if m["type"] == "activities"
                for a in m["activities"] if a.get("name") == name]

    def chunks(self) -> list[int]:
        return [t for t, m in self.vaic if m["type"] == "playStream.chunk"]

    def events(self, name: str) -> list[Log]:
        return [e for e in self.logs if e.event == name]


def played_until(d: Drive) -> int:
    """When the caller has heard the last chunk: our clock's end of playout."""
    return int(d.s.playout.play_end_t * 1e9)


# ----------------------------------------------------------------------------- end_call

def test_end_call_hangs_up_only_after_the_goodbye_was_played() -> None:
    d = Drive()
    d.response("r1", audio_ms=1500, calls=[("call_1", "end_call", {"reason": "done"})])
    assert d.outputs() == {"call_1": {"ok": True, "note": "the line closes once the caller heard you"}}
    assert not d.activities("hangup")               # the goodbye is still playing
    assert not d.sent("response.create")            # end_call asks for no further response
    d.advance(5000)
    (t_hang, act), = d.activities("hangup")
    assert act["activityParams"]["hangupReason"] == "agent-hangup"
    assert len(d.chunks()) == 15 and t_hang >= played_until(d)   # every chunk sent, all heard
    stops = [t for t, m in d.vaic if m["type"] == "playStream.stop"]
    assert stops and stops[-1] <= t_hang            # the stream closed before the hang-up
    assert d.s.end_reason == "agent_hangup"


def test_end_call_waits_for_vaic_play_finished_when_the_profile_says_vaic_sends_it() -> None:
    d = Drive(make_cfg({**PROFILES, "default": {**PROFILES["default"], "play_finished": True}}))
    d.response("r1", audio_ms=600, calls=[("call_1", "end_call", {})])
    d.advance(1000)                                  # our clock: played and stopped
    assert not d.activities("hangup")
    d.event("playFinished", {"playedDurationMS": 600, "status": "finished"})
    assert len(d.activities("hangup")) == 1
    assert d.stats.play_clock_diff.count == 1 and d.stats.play_clock_diff.max <= 1000


def test_end_call_goes_ahead_when_play_finished_never_comes() -> None:
    d = Drive(make_cfg({**PROFILES, "default": {**PROFILES["default"], "play_finished": True}}))
    d.response("r1", audio_ms=300, calls=[("call_1", "end_call", {})])
    d.advance(1000)
    assert not d.activities("hangup")
    d.advance(3500)
    assert len(d.activities("hangup")) == 1


def test_a_function_call_of_a_cancelled_response_is_answered_not_run() -> None:
    d = Drive()
    d.response("r1", audio_ms=800, calls=[("call_1", "end_call", {})], done=False)
    d.oai_in({"type": "input_audio_buffer.speech_started", "audio_start_ms": 100, "item_id": "u1"})
    d.done("r1", "cancelled")
    assert "not run" in d.outputs()["call_1"]["error"]
    d.advance(3000)
    assert not d.activities("hangup") and not d.sent("response.create")


# ----------------------------------------------------------------------------- transfer

def test_transfer_to_a_named_target_after_the_handover_sentence() -> None:
    d = Drive()
    d.response("r1", audio_ms=700, calls=[("call_1", "transfer_call", {"target": "sales", "reason": "wants to buy"})])
    assert d.outputs()["call_1"] == {"ok": True, "status": "transferring"}
    assert not d.activities("transfer")
    d.advance(2000)
    (t, act), = d.activities("transfer")
    assert act["activityParams"] == {"transferTarget": "tel:+4930111", "handoverReason": "wants to buy"}
    assert t >= played_until(d)
    d.vaic_in({"type": "session.end", "reasonCode": "transferred", "reason": "ok"})
    assert d.s.end_reason == "transferred"


def test_unknown_target_is_an_error_the_model_can_correct() -> None:
    d = Drive()
    d.response("r1", calls=[("call_1", "transfer_call", {"target": "+4930999"})])
    assert "unknown target" in d.outputs()["call_1"]["error"]
    assert len(d.sent("response.create")) == 1
    assert not d.activities("transfer")


def test_a_failed_transfer_is_told_to_the_model() -> None:
    d = Drive()
    d.response("r1", audio_ms=200, calls=[("call_1", "transfer_call", {"target": "support"})])
    d.advance(1000)
    assert len(d.activities("transfer")) == 1
    d.event("transferStatus", {"status": "failed", "reasonCode": "declined", "reason": "SIP ;cause=603"})
    notes = [m for _, m in d.oai if m["type"] == "conversation.item.create"
             and m["item"]["type"] == "message" and m["item"]["role"] == "system"]
    assert len(notes) == 1 and "declined" in notes[0]["item"]["content"][0]["text"]
    assert len(d.sent("response.create")) == 1
    assert d.s.phase is Phase.ACTIVE


# ----------------------------------------------------------------------------- DTMF out

def test_send_dtmf_checks_digits_and_sends_after_playout() -> None:
    d = Drive()
    d.response("r1", calls=[("bad", "send_dtmf", {"digits": "12a"})])
    assert "digits" in d.outputs()["bad"]["error"]
    d.oai_in({"type": "response.created", "response": {"id": "r2"}})
    d.done("r2")
    d.response("r3", audio_ms=300, calls=[("good", "send_dtmf", {"digits": "1234#"})])
    assert d.outputs()["good"] == {"ok": True, "sent": "1234#"}
    d.advance(1000)
    (t, act), = d.activities("sendDtmf")
    assert act["activityParams"] == {"dtmfDigits": "1234#"}
    creates = d.sent("response.create")
    assert len(creates) == 2 and creates[-1][0] >= t


# ----------------------------------------------------------------------------- responses

def test_never_a_response_create_while_a_response_is_active() -> None:
    d = Drive()
    d.response("r1", calls=[("w1", "crm", {"q": "x"})])
    (run,) = [e for e in d.effects if type(e) is RunTool]
    assert run.headers["Authorization"] == "Bearer s3cret"
    assert run.headers["X-Voicebridge-Conversation"] == "c1" and run.arguments == '{"q": "x"}'
    d.oai_in({"type": "response.created", "response": {"id": "r2"}})   # the caller spoke meanwhile
    d.s.tool_result("w1", '{"name": "Ada"}', True, d.now)
    d.collect()
    assert d.outputs()["w1"] == {"name": "Ada"}
    assert not d.sent("response.create")            # r2 is active
    d.done("r2")
    assert len(d.sent("response.create")) == 1      # owed, sent once it may be


def test_every_call_of_a_batch_gets_one_output_and_the_batch_one_response() -> None:
    d = Drive()
    d.response("r1", calls=[("a", "crm", {}), ("b", "nope", {}), ("c", "send_dtmf", {"digits": "x"})])
    assert set(d.outputs()) == {"b", "c"}
    assert not d.sent("response.create")            # the webhook is still running
    d.s.tool_result("a", '{"ok": true}', True, d.now)
    d.collect()
    assert set(d.outputs()) == {"a", "b", "c"}
    assert len(d.sent("response.create")) == 1
    d.s.tool_result("a", '{"again": true}', True, d.now)   # a second answer is ignored
    d.collect()
    assert len([1 for _, m in d.oai if m["type"] == "conversation.item.create"]) == 3


def test_a_webhook_that_does_not_answer_gets_an_error_in_time() -> None:
    d = Drive()
    d.response("r1", calls=[("w1", "crm", {})])
    d.advance(2100)
    assert "did not answer" in d.outputs()["w1"]["error"]
    assert len(d.sent("response.create")) == 1
    d.s.tool_result("w1", '{"late": true}', True, d.now)
    d.collect()
    assert d.outputs()["w1"] == {"error": "crm did not answer in time"}
    assert d.stats.tools == {"crm|timeout": 1}


# ----------------------------------------------------------------------------- DTMF in, events

def test_keypad_digits_collected_until_the_terminator() -> None:
    d = Drive()
    for c in "12":
        d.event("DTMF", c)
    assert not d.sent("conversation.item.create")
    d.event("DTMF", "#")
    (_, item), = d.sent("conversation.item.create")
    assert item["item"]["content"][0]["text"] == "(keypad) 12#"
    assert len(d.sent("response.create")) == 1


def test_keypad_digits_sent_after_a_pause() -> None:
    d = Drive()
    d.event("DTMF", "42")
    d.advance(2500)
    (_, item), = d.sent("conversation.item.create")
    assert item["item"]["content"][0]["text"] == "(keypad) 42"


def test_keypad_per_digit_mode() -> None:
    d = Drive(make_cfg({**PROFILES, "default": {**PROFILES["default"], "dtmf": {"mode": "digit"}}}))
    d.event("DTMF", "7")
    d.event("DTMF", "8")
    texts = [m["item"]["content"][0]["text"] for _, m in d.sent("conversation.item.create")]
    assert texts == ["(keypad) 7", "(keypad) 8"]
    assert len(d.sent("response.create")) == 1       # the second waits for the first's response


def test_no_user_input_prompts_then_hangs_up() -> None:
    cfg = make_cfg({**PROFILES, "default": {**PROFILES["default"], "no_user_input": "prompt",
                                            "no_user_input_max": 2}})
    d = Drive(cfg)
    d.event("noUserInput", 1)
    (_, rc), = d.sent("response.create")
    assert "silent" in rc["response"]["instructions"]
    d.oai_in({"type": "response.created", "response": {"id": "r1"}})
    d.done("r1")
    d.event("noUserInput", 2)
    d.advance(100)
    (_, act), = d.activities("hangup")
    assert act["activityParams"]["hangupReason"] == "no-user-input"


def test_barge_in_disabled_at_vaic_is_detected_once() -> None:
    d = Drive()
    d.response("r1", audio_ms=2000)
    d.advance(300)
    d.vaic_in({"type": "userStream.stop"})
    assert not d.events("call.vaic_barge_in_off")     # maybe the caller hanging up
    d.vaic_in({"type": "userStream.start"})          # reopened: VAIC's barge-in is off
    d.vaic_in({"type": "userStream.stop"})
    d.vaic_in({"type": "userStream.start"})
    assert len(d.events("call.vaic_barge_in_off")) == 1
    assert d.stats.vaic_barge_in_off == 1


def test_a_caller_hanging_up_while_the_bot_plays_is_not_taken_for_barge_in_off() -> None:
    d = Drive()
    d.response("r1", audio_ms=2000)
    d.advance(300)
    d.vaic_in({"type": "userStream.stop"})
    d.vaic_in({"type": "session.end", "reasonCode": "client-disconnected"})
    assert not d.events("call.vaic_barge_in_off") and d.stats.vaic_barge_in_off == 0


# ----------------------------------------------------------------------------- time limit

def test_max_duration_closing_turn_then_hang_up_after_it_was_heard() -> None:
    d = Drive(make_cfg({**PROFILES, "default": {**PROFILES["default"], "max_duration_s": 30}}))
    d.advance(29_000)
    assert not d.sent("response.create")
    d.advance(1_500)
    (_, rc), = d.sent("response.create")
    assert "maximum call time" in rc["response"]["instructions"]
    d.response("r9", audio_ms=900)
    assert not d.activities("hangup")
    d.advance(2000)
    (t, act), = d.activities("hangup")
    assert act["activityParams"]["hangupReason"] == "max-duration" and t >= played_until(d)


def test_max_duration_hard_stop_when_the_closing_turn_never_ends() -> None:
    d = Drive(make_cfg({**PROFILES, "default": {**PROFILES["default"], "max_duration_s": 10,
                                                "closing_grace_s": 5}}))
    d.advance(10_100)
    assert d.sent("response.create")
    d.advance(6_000)
    assert len(d.activities("hangup")) == 1


# ----------------------------------------------------------------------------- profiles

def test_the_callee_selects_the_profile_and_a_second_session_update_applies_it() -> None:
    d = Drive(callee="+4930123456")
    ups = d.sent("session.update")
    assert len(ups) == 2
    first, second = ups[0][1]["session"], ups[1][1]["session"]
    assert [t["name"] for t in first["tools"]] == ["end_call", "transfer_call", "send_dtmf", "crm"]
    assert second["instructions"] == "Berlin desk for +4917000 (de)."
    assert [t["name"] for t in second["tools"]] == ["end_call"]
    assert second["audio"]["output"] == {"voice": "cedar"}     # no audio yet: the voice may change
    assert d.s.profile.name == "berlin" and d.s.profile_final


def test_same_profile_after_start_needs_only_the_placeholders_filled() -> None:
    d = Drive(callee="+1555000")
    ups = d.sent("session.update")
    assert ups[-1][1]["session"]["instructions"] == "Default agent for +1555000."
    assert d.s.profile.name == "default"


def test_voice_is_not_changed_once_audio_was_produced() -> None:
    d = Drive(start=False)
    d.response("r1", audio_ms=100)
    d.start("+4930999")
    assert "output" not in d.sent("session.update")[-1][1]["session"]["audio"]


def test_profile_errors_name_the_profile_and_key() -> None:
    with pytest.raises(ConfigError, match=r"profiles\.x\.transfer_targets"):
        make_cfg({"x": {"match_bot": ["b"], "tools": ["transfer_call"]}})
    with pytest.raises(ConfigError, match=r"profiles\.x\.fallback"):
        make_cfg({"x": {"match_bot": ["b"], "fallback": "transfer:nowhere"}})
    with pytest.raises(ConfigError, match=r"profiles\.x\.match_callee"):
        make_cfg({"x": {"match_callee": ["re:("]}})
    with pytest.raises(ConfigError, match=r"profiles\.default\.instructions"):
        make_cfg({"default": {"instructions": "hi {name}"}})


# ----------------------------------------------------------------------------- ends, tokens, words

def test_hangup_reasons_are_short_tokens() -> None:
    assert hangup_token("openai_connect_failed") == "model-unreachable"
    assert hangup_token("idle_timeout") == "idle-timeout"
    d = Drive()
    d.s.openai_lost(1011, None, "gone", d.now)     # reconnect on: a new dial, not an end
    d.s.openai_connect_failed("refused", d.now, status=401)
    d.collect()
    (_, act), = d.activities("hangup")
    assert act["activityParams"] == {"hangupReason": "model-unreachable"}


def test_fallback_transfer_when_the_model_is_unreachable() -> None:
    cfg = make_cfg({**PROFILES, "default": {**PROFILES["default"], "fallback": "transfer:support"}})
    d = Drive(cfg)
    d.s.openai_lost(1011, None, "gone", d.now)
    d.s.openai_connect_failed("refused", d.now, status=401)
    d.collect()
    (_, act), = d.activities("transfer")
    assert act["activityParams"]["transferTarget"] == "sip:support@pbx.example"
    assert not d.activities("hangup")
    d.event("transferStatus", {"status": "failed", "reasonCode": "busy"})
    (_, act), = d.activities("hangup")
    assert act["activityParams"]["hangupReason"] == "model-unreachable"


def test_token_usage_is_summed_per_call_and_profile() -> None:
    d = Drive()
    u = {"total_tokens": 30, "input_tokens": 20, "output_tokens": 10,
         "input_token_details": {"text_tokens": 5, "audio_tokens": 15, "cached_tokens": 4},
         "output_token_details": {"text_tokens": 2, "audio_tokens": 8}}
    d.response("r1", usage=u)
    d.response("r2", usage=u)
    assert d.s.control.tokens == [30, 10, 8, 16, 4]
    assert d.stats.tokens == {"default|input_audio": 30, "default|input_text": 10, "default|input_cached": 8,
                              "default|output_audio": 16, "default|output_text": 4}
    d.vaic_in({"type": "session.end", "reasonCode": "client-disconnected"})
    assert d.s.end_fields(d.now)["usage_output_audio"] == 16


def test_transcripts_come_out_as_effects_with_times() -> None:
    d = Drive()
    d.advance(1200)
    d.oai_in({"type": "conversation.item.input_audio_transcription.completed", "item_id": "u1",
              "content_index": 0, "transcript": "I need help"})
    d.oai_in({"type": "response.output_audio_transcript.done", "response_id": "r1", "item_id": "i1",
              "output_index": 0, "content_index": 0, "transcript": "Sure."})
    ts = [e for e in d.effects if type(e) is Transcript]
    assert [(t.role, t.text) for t in ts] == [("caller", "I need help"), ("agent", "Sure.")]
    assert ts[0].at_ms >= 1200


def test_mcp_tools_are_passed_through_and_their_calls_logged() -> None:
    cfg = load_config(None, env={"VOICEBRIDGE_TOKEN": "t", "CRM_MCP": "mcp-tok-7f3"}, overrides={
        "mcp": {"crm_mcp": {"server_url": "https://mcp.example/sse", "allowed_tools": ["find"],
                            "authorization_env": "CRM_MCP"}},
        "profiles": {"default": {"tools": ["crm_mcp"]}}})[0]
    secrets = load_config(None, env={"VOICEBRIDGE_TOKEN": "t", "CRM_MCP": "mcp-tok-7f3"}, overrides={
        "mcp": {"crm_mcp": {"server_url": "https://mcp.example/sse", "authorization_env": "CRM_MCP"}}})[1]
    assert secrets.mcp_tokens == {"crm_mcp": "mcp-tok-7f3"} and "mcp-tok-7f3" not in repr(secrets)
    d = Drive(cfg)
    tools = d.sent("session.update")[0][1]["session"]["tools"]
    assert tools[0]["type"] == "mcp" and tools[0]["server_label"] == "crm_mcp"
    d.oai_in({"type": "response.output_item.done", "response_id": "r1", "output_index": 0,
              "item": {"type": "mcp_call", "id": "m1", "server_label": "crm_mcp", "name": "find",
                       "arguments": "{}", "error": {"type": "http_error", "code": 500, "message": "x"}}})
    (ev,) = d.events("call.mcp_call")
    assert ev.level == "warning" and ev.fields["tool"] == "find"
    assert d.stats.tools == {"mcp:crm_mcp|error": 1}


def test_a_missing_mcp_token_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"mcp\.crm\.authorization_env"):
        load_config(None, env={"VOICEBRIDGE_TOKEN": "t"}, overrides={
            "mcp": {"crm": {"server_url": "https://mcp.example", "authorization_env": "NOPE"}}})


def test_the_call_ends_cleanly_with_everything_pending() -> None:
    d = Drive()
    d.response("r1", audio_ms=500, calls=[("w1", "crm", {}), ("e", "end_call", {})])
    d.vaic_in({"type": "session.end", "reasonCode": "client-disconnected"})
    assert d.s.phase is Phase.ENDED
    assert any(type(e) is Finished for e in d.effects)
    d.s.tool_result("w1", "{}", True, d.now)        # after the end: ignored, no frame
    d.collect()
    assert not d.activities("hangup")


def test_the_readme_example_configuration_loads() -> None:
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parent.parent / "README.md").read_text()
    section = text[text.index("### Profiles"):text.index("### The agent's call tools")]
    (block,) = re.findall(r"```toml\n(.*?)```", section, re.S)
    import tomllib
    raw = tomllib.loads(block)
    cfg, secrets = load_config(None, env={"VOICEBRIDGE_TOKEN": "t", "CRM_MCP_TOKEN": "x"}, overrides=raw)
    from voicebridge import profiles
    r = profiles.for_config(cfg)
    assert profiles.select(r, "+4930123499", "").name == "sales_de"
    assert profiles.select(r, "+4930555512", "").name == "sales_de"
    assert profiles.select(r, "+4930555", "").name == "default"
    assert profiles.select(r, "", "sales-de").name == "sales_de"
    assert r["sales_de"].vad.silence_duration_ms == 600 and r["sales_de"].max_duration_s == 900


def test_a_refused_response_create_does_not_block_later_ones() -> None:
    d = Drive()
    d.event("DTMF", "1#")
    assert len(d.sent("response.create")) == 1
    d.oai_in({"type": "error", "error": {"type": "invalid_request_error",
                                         "code": "conversation_already_has_active_response"}})
    d.event("DTMF", "2#")
    assert len(d.sent("response.create")) == 2


def test_an_mcp_call_that_outlives_its_response_gets_one_follow_up() -> None:
    d = Drive()
    d.oai_in({"type": "response.created", "response": {"id": "r1"}})
    d.oai_in({"type": "response.mcp_call.in_progress", "item_id": "m1", "output_index": 0})
    d.done("r1")
    assert not d.sent("response.create")              # the call still runs at OpenAI
    d.oai_in({"type": "response.mcp_call.completed", "item_id": "m1", "output_index": 0})
    assert len(d.sent("response.create")) == 1
    # one that ends inside its response: the model went on there, nothing to ask for
    d.oai_in({"type": "response.created", "response": {"id": "r2"}})
    d.oai_in({"type": "response.mcp_call.in_progress", "item_id": "m2", "output_index": 0})
    d.oai_in({"type": "response.mcp_call.completed", "item_id": "m2", "output_index": 0})
    d.done("r2")
    assert len(d.sent("response.create")) == 1


def test_the_time_limit_of_the_profile_chosen_at_start_applies() -> None:
    profs = {**PROFILES, "berlin": {**PROFILES["berlin"], "max_duration_s": 20}}
    d = Drive(make_cfg(profs), start=False)
    d.advance(5000)
    d.start("+4930111")
    d.advance(14_000)
    assert not d.sent("response.create")
    d.advance(1_500)                        # 20 s after the accept, not after the start
    assert len(d.sent("response.create")) == 1


def test_speech_hypothesis_at_speech_start_when_configured() -> None:
    for on in (False, True):
        d = Drive(make_cfg(call={"send_speech_hypothesis": on}))
        d.oai_in({"type": "input_audio_buffer.speech_started", "audio_start_ms": 10, "item_id": "u1"})
        types = [m["type"] for _, m in d.vaic]
        assert "userStream.speech.started" in types
        assert ("userStream.speech.hypothesis" in types) is on


def test_dtmf_settings_merge_over_the_inherited_ones_and_are_checked() -> None:
    profs = {"default": {"dtmf": {"mode": "digit", "pause_ms": 900}},
             "x": {"match_bot": ["b"], "dtmf": {"pause_ms": 3000}}}
    from voicebridge import profiles as pf
    r = pf.for_config(make_cfg(profs))
    assert (r["x"].dtmf.mode, r["x"].dtmf.pause_ms) == ("digit", 3000)
    with pytest.raises(ConfigError, match=r"profiles\.x\.dtmf"):
        make_cfg({"x": {"match_bot": ["b"], "dtmf": {"mode": "loud"}}})


def test_keypad_digits_never_reach_the_log_and_no_input_resets_on_speech() -> None:
    d = Drive(make_cfg({**PROFILES, "default": {**PROFILES["default"], "no_user_input": "prompt",
                                                "no_user_input_max": 2}}))
    d.event("DTMF", "4711#")
    assert "4711" not in repr(d.logs)
    d.event("noUserInput", 1)
    d.oai_in({"type": "response.created", "response": {"id": "r1"}})
    d.done("r1")
    d.oai_in({"type": "input_audio_buffer.speech_started", "audio_start_ms": 10, "item_id": "u1"})
    d.event("noUserInput", 1)                   # counted from 1 again: a prompt, not the hang-up
    d.advance(100)
    assert not d.activities("hangup")


def test_record_and_transcripts_need_their_directory() -> None:
    with pytest.raises(ConfigError, match=r"profiles\.default\.record: needs \[recording\] dir"):
        make_cfg({"default": {"record": True}})
    with pytest.raises(ConfigError, match=r"profiles\.x\.transcripts: needs \[transcripts\] dir"):
        make_cfg({"x": {"match_bot": ["b"], "transcripts": True}})
