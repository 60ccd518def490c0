"""AudioCodes Bot API state machine and messages: plain function calls, no sockets."""

from __future__ import annotations

import json

from hypothesis import given, settings, strategies as st

from voicebridge import audiocodes as ac

INIT = json.dumps({"type": "session.initiate", "conversationId": "c1", "botName": "b",
                   "caller": "+1", "expectAudioMessages": True,
                   "supportedMediaFormats": ["raw/lpcm16_24", "raw/mulaw"], "extra": {"x": 1}})


def out(p: ac.AcProtocol) -> list[dict]:
    return [json.loads(f) for f in p.data_to_send()]


def active() -> ac.AcProtocol:
    p = ac.AcProtocol()
    ev = p.receive(INIT)
    assert isinstance(ev, ac.SessionInitiate)
    p.accept("raw/lpcm16_24")
    assert out(p) == [{"type": "session.accepted", "mediaFormat": "raw/lpcm16_24"}]
    return p


def test_initiate_fields_and_accept():
    p = ac.AcProtocol()
    ev = p.receive(INIT)
    assert isinstance(ev, ac.SessionInitiate)
    assert ev.conversationId == "c1" and ev.supportedMediaFormats == ["raw/lpcm16_24", "raw/mulaw"]
    assert p.state is ac.AcState.WAIT_INITIATE
    p.accept("raw/mulaw")
    assert p.state is ac.AcState.ACTIVE


def test_chunk_fast_path_returns_payload_untouched():
    p = active()
    ev = p.receive(b'{"type":"userStream.chunk","conversationId":"c1","audioChunk":"AAEC/+=="}')
    assert isinstance(ev, ac.UserStreamChunk) and ev.audioChunk == "AAEC/+=="
    assert out(p) == []


def test_user_stream_replies_echo_participant():
    p = active()
    p.receive('{"type":"userStream.start","conversationId":"c1","participant":"caller"}')
    assert out(p) == [{"type": "userStream.started", "participant": "caller"}]
    assert isinstance(p.receive('{"type":"userStream.start","conversationId":"c1"}'), ac.Ignored)
    p.receive('{"type":"userStream.stop","conversationId":"c1"}')
    assert out(p) == [{"type": "userStream.stopped"}]
    p.receive('{"type":"userStream.start","conversationId":"c1"}')   # repeated cycles are fine
    assert out(p) == [{"type": "userStream.started"}]


def test_validate_answered_in_any_state():
    p = ac.AcProtocol()
    assert isinstance(p.receive('{"type":"connection.validate"}'), ac.Validate)
    assert out(p) == [{"type": "connection.validated", "success": True}]
    p = active()
    p.receive('{"type":"connection.validate"}')
    assert out(p) == [{"type": "connection.validated", "success": True}]


def test_wrong_first_message_gets_session_error():
    p = ac.AcProtocol()
    ev = p.receive('{"type":"userStream.chunk","conversationId":"c","audioChunk":"AA=="}')
    assert isinstance(ev, ac.Rejected)
    [err] = out(p)
    assert err["type"] == "session.error" and "session.initiate" in err["reason"]
    assert p.state is ac.AcState.ENDING


def test_garbage_first_frame_gets_session_error():
    p = ac.AcProtocol()
    assert isinstance(p.receive("{nope"), ac.Rejected)
    assert out(p)[0]["type"] == "session.error"


def test_resume_unknown_conversation():
    p = ac.AcProtocol()
    ev = p.receive('{"type":"session.resume","conversationId":"zz"}')
    assert isinstance(ev, ac.SessionResume) and out(p) == []   # the call decides
    p.refuse_resume()
    assert p.state is ac.AcState.ENDING
    assert out(p) == [{"type": "session.error", "reason": "conversation not found",
                       "conversationId": "zz"}]


def test_malformed_and_unknown_during_call_do_not_change_state():
    p = active()
    assert isinstance(p.receive("not json at all"), ac.Malformed)
    assert isinstance(p.receive(b"\x00\x01binary"), ac.Malformed)
    assert isinstance(p.receive('{"type":"userStream.chunk","audioChunk":5}'), ac.Malformed)
    assert isinstance(p.receive('{"type":"brandNew.thing","conversationId":"c1"}'), ac.UnknownMessage)
    assert isinstance(p.receive('{"type":"session.initiate","conversationId":"c1"}'), ac.Ignored)
    assert p.state is ac.AcState.ACTIVE and out(p) == []


def test_session_end_then_everything_ignored():
    p = active()
    ev = p.receive('{"type":"session.end","conversationId":"c1","reasonCode":"client-disconnected",'
                   '"reason":"Client Side"}')
    assert isinstance(ev, ac.SessionEnd) and ev.reasonCode == "client-disconnected"
    assert p.state is ac.AcState.ENDED
    assert isinstance(p.receive('{"type":"userStream.chunk","audioChunk":"AA=="}'), ac.Ignored)


def test_activities_start_event():
    p = active()
    ev = p.receive(json.dumps({"type": "activities", "conversationId": "c1", "activities": [
        {"id": "x", "timestamp": "t", "language": "en-US", "type": "event", "name": "start",
         "parameters": {"callee": "+4930", "caller": "+4916"}}]}))
    assert isinstance(ev, ac.Activities) and ev.activities[0].parameters["callee"] == "+4930"


def test_hangup_and_chunks_after_it():
    p = active()
    p.request_hangup("openai_closed")
    [m] = out(p)
    assert m == {"type": "activities", "activities": [
        {"type": "event", "name": "hangup", "activityParams": {"hangupReason": "openai_closed"}}]}
    assert p.state is ac.AcState.ENDING
    assert isinstance(p.receive('{"type":"userStream.chunk","audioChunk":"AA=="}'), ac.Ignored)
    assert isinstance(p.receive('{"type":"session.end"}'), ac.SessionEnd)


def test_chunk_template_matches_encoder():
    prefix, suffix = ac.chunk_template("7")
    b64 = "AAEC/+/9Zz=="
    assert json.loads(prefix + b64 + suffix) == json.loads(
        ac.encode(ac.PlayStreamChunk(streamId="7", audioChunk=b64)))


def test_outgoing_shapes():
    assert json.loads(ac.encode(ac.PlayStreamStart(streamId="1", mediaFormat="raw/mulaw"))) == {
        "type": "playStream.start", "streamId": "1", "mediaFormat": "raw/mulaw"}
    assert json.loads(ac.encode(ac.SpeechStarted())) == {"type": "userStream.speech.started"}
    rec = json.loads(ac.encode(ac.SpeechRecognition(alternatives=[ac.Alternative("hi", 0.9)])))
    assert rec == {"type": "userStream.speech.recognition",
                   "alternatives": [{"text": "hi", "confidence": 0.9}]}


# ------------------------------------------------------------------ fuzz
_types = st.sampled_from(["session.initiate", "session.resume", "session.end", "activities",
                          "userStream.start", "userStream.chunk", "userStream.stop",
                          "connection.validate", "playStream.start", "bogus", ""])
_values = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                       lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                       max_leaves=8)
_messages = st.builds(lambda t, extra: {"type": t, **extra}, _types,
                      st.dictionaries(st.sampled_from(["conversationId", "audioChunk", "activities",
                                                       "supportedMediaFormats", "reasonCode",
                                                       "participant", "caller"]), _values, max_size=4))


def _mutate(data: bytes, cut: int, flip: int) -> bytes:
    b = bytearray(data)
    if b:
        b[flip % len(b)] ^= 0x5A
    return bytes(b[: max(0, len(b) - cut)])


@settings(max_examples=400, deadline=None)
@given(st.lists(st.one_of(
    _messages.map(lambda m: json.dumps(m)),
    st.binary(max_size=64),
    st.text(max_size=64),
    st.tuples(_messages, st.integers(0, 10), st.integers(0, 200)).map(
        lambda t: _mutate(json.dumps(t[0]).encode(), t[1], t[2])),
), max_size=25), st.booleans())
def test_fuzz_state_machine_never_raises(frames, accept_first):
    p = ac.AcProtocol()
    if accept_first:
        p.receive(INIT)
        p.accept("raw/mulaw")
    for f in frames:
        ev = p.receive(f)
        assert ev is not None
        for frame in p.data_to_send():  # whatever we queue is valid JSON with a type
            assert isinstance(json.loads(frame)["type"], str)
        if p.state is ac.AcState.WAIT_INITIATE and isinstance(ev, ac.SessionInitiate):
            p.accept("raw/mulaw")
    assert p.state in ac.AcState
