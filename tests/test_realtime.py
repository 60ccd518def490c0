"""Realtime GA event building/decoding, checked against the openai SDK's types."""

from __future__ import annotations

import json

import pytest

from voicebridge import realtime as rt
from voicebridge.config import load_config
from tests.sdk_check import validate_client_event


def cfg_with(**openai: object):
    cfg, _ = load_config(None, env={}, overrides={"server": {"allow_unauthenticated": True},
                                                   "openai": dict(openai)})
    return cfg


@pytest.mark.parametrize("fmt", [{"type": "audio/pcm", "rate": 24000}, {"type": "audio/pcmu"}])
@pytest.mark.parametrize("vad", ["server_vad", "semantic_vad", "none"])
def test_session_update_is_valid_ga(fmt, vad):
    cfg = cfg_with(vad={"type": vad}, transcription_model="gpt-4o-mini-transcribe",
                   noise_reduction="near_field")
    frame = rt.session_update(cfg.openai, fmt, fmt, "be brief")
    model = validate_client_event(frame)
    obj = json.loads(frame)
    assert obj["session"]["type"] == "realtime"
    assert obj["session"]["audio"]["input"]["format"] == fmt
    assert model.session.audio.output.voice == "marin"
    if vad == "none":
        assert obj["session"]["audio"]["input"]["turn_detection"] is None
    else:
        assert obj["session"]["audio"]["input"]["turn_detection"]["type"] == vad


def test_sdk_check_catches_beta_fields():
    with pytest.raises(AssertionError, match="input_audio_format"):
        validate_client_event({"type": "session.update",
                               "session": {"type": "realtime", "input_audio_format": "g711_ulaw"}})


def test_other_client_events_valid():
    p, s = rt.append_template()
    validate_client_event(p + "AAAA" + s)
    validate_client_event(rt.truncate("item_1", 1234))
    validate_client_event(rt.response_create("Greet the caller"))
    validate_client_event(rt.response_cancel())
    validate_client_event(rt.instructions_update("x"))
    assert json.loads(p + "AAAA" + s) == {"type": "input_audio_buffer.append", "audio": "AAAA"}


def test_decode_server_events():
    ev = rt.decode_server(json.dumps({"type": "response.output_audio.delta", "event_id": "e",
                                      "response_id": "r", "item_id": "i", "output_index": 0,
                                      "content_index": 0, "delta": "AAAA"}))
    assert isinstance(ev, rt.AudioDelta) and ev.delta == "AAAA" and ev.item_id == "i"
    ev = rt.decode_server('{"type":"rate_limits.updated","rate_limits":[]}')
    assert type(ev).__name__.startswith("Passive")
    ev = rt.decode_server('{"type":"brand.new.event","x":1}')
    assert isinstance(ev, rt.OtherEvent) and ev.type == "brand.new.event"
    assert isinstance(rt.decode_server("not json"), rt.BadEvent)
    ev = rt.decode_server('{"type":"error","error":{"type":"invalid_request_error",'
                          '"code":"response_cancel_not_active","message":"m","param":null,"event_id":null}}')
    assert isinstance(ev, rt.ErrorEvent) and ev.error.code == "response_cancel_not_active"


def test_error_classification():
    for code in ("conversation_already_has_active_response", "response_cancel_not_active",
                 "input_audio_buffer_commit_empty"):
        assert rt.classify_error(code) == "benign"
    assert rt.classify_error("session_expired") == "fatal"
    assert rt.classify_error("something_new") == "warning"
    assert rt.classify_error(None) == "warning"


def test_target_openai_and_azure():
    cfg = cfg_with(model="gpt-realtime")
    from voicebridge.config import Secrets
    url, headers = rt.target(cfg.openai, Secrets(openai_api_key="sk-x"))
    assert url == "wss://api.openai.com/v1/realtime?model=gpt-realtime"
    assert headers == {"Authorization": "Bearer sk-x"}
    assert not any(k.lower() == "openai-beta" for k in headers)
    cfg = cfg_with(provider="azure", azure_endpoint="wss://res.openai.azure.com/",
                   azure_deployment="my-rt")
    url, headers = rt.target(cfg.openai, Secrets(azure_api_key="az"))
    assert url == "wss://res.openai.azure.com/openai/v1/realtime?model=my-rt"
    assert headers == {"api-key": "az"} and "api-version" not in url
