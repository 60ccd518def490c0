"""AudioCodes VoiceAI Connect Bot API (WebSocket mode), bot side: messages and state machine.

Sans-I/O: `AcProtocol.receive(frame)` takes one websocket frame exactly as received and returns
one typed event; replies the protocol itself requires (`userStream.started`, ...) are queued and
taken with `data_to_send()`. Nothing here touches a socket or the event loop.

Hot path: `receive` does one `msgspec` decode into a tagged union; a `userStream.chunk` in the
ACTIVE state returns the decoded struct immediately. Outgoing audio uses `chunk_frame`, a string
template filled with the base64 payload as is (no decode, no re-encode).

Every message VAIC sends carries `type` and `conversationId`; unknown extra keys are ignored
(the official SDK types allow them). Field-level sources: ../shared/protocols/audiocodes-bot-api.md.
"""

from __future__ import annotations

import enum
from typing import Any, Union

import msgspec

# ----------------------------------------------------------------------------- VAIC -> bot


class ConnectionValidate(msgspec.Struct, tag_field="type", tag="connection.validate"):
    conversationId: str = ""


class SessionInitiate(msgspec.Struct, tag_field="type", tag="session.initiate"):
    conversationId: str = ""
    botName: str | None = None
    caller: str | None = None
    expectAudioMessages: bool = True
    supportedMediaFormats: list[str] = []
    participant: str | None = None


class SessionResume(msgspec.Struct, tag_field="type", tag="session.resume"):
    conversationId: str = ""


class SessionEnd(msgspec.Struct, tag_field="type", tag="session.end"):
    conversationId: str = ""
    reasonCode: str | None = None
    reason: str | None = None


class UserStreamStart(msgspec.Struct, tag_field="type", tag="userStream.start"):
    conversationId: str = ""
    participant: str | None = None


class UserStreamChunk(msgspec.Struct, tag_field="type", tag="userStream.chunk"):
    audioChunk: str = ""
    conversationId: str = ""
    participant: str | None = None


class UserStreamStop(msgspec.Struct, tag_field="type", tag="userStream.stop"):
    conversationId: str = ""
    participant: str | None = None


class Activity(msgspec.Struct):
    """One activity; VAIC sends `event`s (start, DTMF, playFinished, ...)."""

    type: str = "event"
    name: str | None = None
    id: str | None = None
    timestamp: str | None = None
    language: str | None = None
    value: Any = None
    parameters: dict[str, Any] | None = None
    activityParams: dict[str, Any] | None = None


class Activities(msgspec.Struct, tag_field="type", tag="activities"):
    conversationId: str = ""
    activities: list[Activity] = []


AcInbound = Union[
    UserStreamChunk, ConnectionValidate, SessionInitiate, SessionResume, SessionEnd,
    UserStreamStart, UserStreamStop, Activities,
]
_decoder = msgspec.json.Decoder(AcInbound)


class _Envelope(msgspec.Struct):
    type: Any = None


_envelope_decoder = msgspec.json.Decoder(_Envelope)

# ----------------------------------------------------------------------------- bot -> VAIC


class _Out(msgspec.Struct, tag_field="type", omit_defaults=True):
    pass


class ConnectionValidated(_Out, tag="connection.validated"):
    success: bool  # required: omit_defaults must not drop it


class SessionAccepted(_Out, tag="session.accepted"):
    mediaFormat: str | None = None


class SessionError(_Out, tag="session.error"):
    reason: str = ""
    conversationId: str | None = None


class UserStreamStarted(_Out, tag="userStream.started"):
    participant: str | None = None


class UserStreamStopped(_Out, tag="userStream.stopped"):
    participant: str | None = None


class SpeechStarted(_Out, tag="userStream.speech.started"):
    participant: str | None = None


class SpeechStopped(_Out, tag="userStream.speech.stopped"):
    participant: str | None = None


class SpeechCommitted(_Out, tag="userStream.speech.committed"):
    participant: str | None = None


class Alternative(msgspec.Struct, omit_defaults=True):
    text: str
    confidence: float | None = None


class SpeechHypothesis(_Out, tag="userStream.speech.hypothesis"):
    alternatives: list[Alternative] = []
    participant: str | None = None


class SpeechRecognition(_Out, tag="userStream.speech.recognition"):
    alternatives: list[Alternative] = []
    participant: str | None = None


class PlayStreamStart(_Out, tag="playStream.start"):
    streamId: str = ""
    mediaFormat: str = ""
    altText: str | None = None


class PlayStreamChunk(_Out, tag="playStream.chunk"):
    streamId: str = ""
    audioChunk: str = ""


class PlayStreamStop(_Out, tag="playStream.stop"):
    streamId: str = ""


class OutActivity(msgspec.Struct, omit_defaults=True):
    type: str  # required ("event" or "message"): omit_defaults must not drop it
    name: str | None = None
    activityParams: dict[str, Any] | None = None
    text: str | None = None


class ActivitiesOut(_Out, tag="activities"):
    activities: list[OutActivity] = []
    conversationId: str | None = None


_encoder = msgspec.json.Encoder()


def encode(msg: _Out) -> str:
    """Encode one bot -> VAIC message as the text of a websocket frame."""
    return _encoder.encode(msg).decode()


def chunk_template(stream_id: str) -> tuple[str, str]:
    """Prefix and suffix of a `playStream.chunk` frame; `prefix + b64 + suffix` is the frame.

    Base64 never needs JSON escaping, so concatenation yields valid JSON (tested against the
    encoder in tests/test_audiocodes.py)."""
    head = encode(PlayStreamChunk(streamId=stream_id, audioChunk="\x00"))
    prefix, _, suffix = head.partition("\\u0000")
    return prefix, suffix


def hangup(reason: str) -> str:
    return encode(ActivitiesOut(activities=[
        OutActivity(type="event", name="hangup", activityParams={"hangupReason": reason})]))


# ----------------------------------------------------------------------------- state machine


class AcState(enum.Enum):
    WAIT_INITIATE = "wait_initiate"   # socket open, nothing received yet
    ACTIVE = "active"                 # session.accepted sent
    ENDING = "ending"                 # we asked VAIC to hang up, or sent session.error
    ENDED = "ended"                   # session.end received (or socket gone)


# the per-frame check reads this global: an enum class attribute (`AcState.ACTIVE`) goes through
# EnumType.__getattr__ on CPython 3.11, unspecialized (~0.1 µs per read)
_ACTIVE = AcState.ACTIVE


class Malformed(msgspec.Struct):
    """A frame that could not be decoded; `reason` says why, for the log."""
    reason: str


class UnknownMessage(msgspec.Struct):
    """Valid JSON with a `type` we do not know; ignored (logged once per type and call)."""
    type: str


class Ignored(msgspec.Struct):
    """A known message that is not acceptable in the current state; ignored with a log line."""
    type: str
    reason: str


class Validate(msgspec.Struct):
    """connection.validate: answered already; the socket carries no call."""


class Rejected(msgspec.Struct):
    """A message in the WAIT_INITIATE state that cannot start a call; session.error queued."""
    reason: str


AcEvent = Union[AcInbound, Malformed, UnknownMessage, Ignored, Validate, Rejected]


class AcProtocol:
    """State of one VAIC websocket, h11-style: everything that moves `state` lives here.

    Transitions:
        WAIT_INITIATE --session.initiate--> (caller decides: accept() -> ACTIVE | reject() -> ENDING)
        WAIT_INITIATE --session.resume-->    (caller decides: the call it names takes this socket
                                             over, or refuse_resume() -> ENDING with session.error)
        ACTIVE        --resumed()-->         ACTIVE on a new socket (session.accepted again)
        WAIT_INITIATE --other-->             ENDING (session.error: expected session.initiate)
        ACTIVE        --session.end-->       ENDED
        ACTIVE        --request_hangup()-->  ENDING
        ENDING        --session.end-->       ENDED
    connection.validate is answered in any state.
    """

    __slots__ = ("state", "conversation_id", "participant", "user_streaming", "_out",
                 "stream_seq", "media_format", "stream_id", "_chunk_prefix", "_chunk_suffix")

    def __init__(self, out: list[str] | None = None) -> None:
        """`out`: the list frames to VAIC are appended to (a call shares its own); default a new one."""
        self.state = AcState.WAIT_INITIATE
        self.conversation_id = ""
        self.participant: str | None = None
        self.user_streaming = False
        self._out: list[str] = out if out is not None else []
        self.stream_seq = 0
        self.media_format = ""
        self.stream_id: str | None = None       # the play stream open at VAIC, if any
        self._chunk_prefix = self._chunk_suffix = ""

    # -- input
    def receive(self, frame: str | bytes) -> AcEvent:
        """Decode one frame and apply it. Never raises for bad input (deep nesting included:
        msgspec raises RecursionError for it, which becomes a Malformed/Rejected here)."""
        try:
            msg = _decoder.decode(frame)
        except msgspec.DecodeError as e:
            return self._bad_frame(frame, str(e))
        except RecursionError:
            return self._malformed("JSON nested too deeply")
        if type(msg) is UserStreamChunk and self.state is _ACTIVE:
            return msg
        return self._control(msg)

    def _malformed(self, reason: str) -> AcEvent:
        return self._reject_first(reason) if self.state is AcState.WAIT_INITIATE else Malformed(reason)

    def _bad_frame(self, frame: str | bytes, err: str) -> AcEvent:
        try:
            env = _envelope_decoder.decode(frame)
        except msgspec.DecodeError:
            return self._malformed(f"not a JSON object: {err[:120]}")
        except RecursionError:
            return self._malformed("JSON nested too deeply")
        if not isinstance(env.type, str):
            return self._malformed("message has no string 'type'")
        if env.type in _KNOWN_TYPES:
            return self._malformed(f"bad fields in {env.type}: {err[:160]}")
        return UnknownMessage(env.type[:64])

    def _reject_first(self, reason: str) -> Rejected:
        self._out.append(encode(SessionError(reason=reason)))
        self.state = AcState.ENDING
        return Rejected(reason)

    def _control(self, msg: AcInbound) -> AcEvent:
        t = type(msg)
        st = self.state
        if t is ConnectionValidate:
            self._out.append(encode(ConnectionValidated(success=True)))
            return Validate()
        if st is AcState.ENDED:
            return Ignored(msg.__struct_config__.tag, "after session.end")  # type: ignore[arg-type]
        if st is AcState.WAIT_INITIATE:
            if isinstance(msg, SessionInitiate):
                self.conversation_id = msg.conversationId
                self.participant = msg.participant
                return msg
            if isinstance(msg, SessionResume):
                self.conversation_id = msg.conversationId
                return msg
            return self._reject_first(
                f"expected session.initiate first, got {msg.__struct_config__.tag}")
        if t is SessionEnd:
            self.state = AcState.ENDED
            return msg
        if t is SessionInitiate or t is SessionResume:
            return Ignored(msg.__struct_config__.tag, "session already initiated")  # type: ignore[arg-type]
        if t is UserStreamStart:
            if self.user_streaming:
                return Ignored("userStream.start", "user stream already started")
            self.user_streaming = True
            self._out.append(encode(UserStreamStarted(participant=msg.participant)))  # type: ignore[union-attr]
            return msg
        if t is UserStreamStop:
            self.user_streaming = False
            self._out.append(encode(UserStreamStopped(participant=msg.participant)))  # type: ignore[union-attr]
            return msg
        if t is UserStreamChunk:  # ENDING: audio after we asked to hang up is of no use
            return Ignored("userStream.chunk", "call is ending")
        return msg  # Activities

    # -- decisions taken by the call
    def accept(self, media_format: str) -> None:
        if self.state is not AcState.WAIT_INITIATE:
            raise RuntimeError(f"accept() in state {self.state.value}")
        self.state = AcState.ACTIVE
        self.media_format = media_format
        self._out.append(encode(SessionAccepted(mediaFormat=media_format)))

    def refuse_resume(self) -> None:
        """session.resume for a conversation this bridge does not hold (or no longer)."""
        self.reject("conversation not found")

    def resumed(self) -> None:
        """This call's conversation continues on a new VAIC socket: accept it again. The new
        socket has no play stream and no user stream yet."""
        if self.state is not AcState.ACTIVE:
            raise RuntimeError(f"resumed() in state {self.state.value}")
        self.stream_id = None
        self.user_streaming = False
        self._out.append(encode(SessionAccepted(mediaFormat=self.media_format)))

    def reject(self, reason: str) -> None:
        self._out.append(encode(SessionError(reason=reason, conversationId=self.conversation_id or None)))
        self.state = AcState.ENDING

    def request_transfer(self, target: str, reason: str) -> None:
        """Hand the call over (transfer activity): VAIC ends the session (`transferred`), or,
        with bot-regains-control, reports a failed attempt as a `transferStatus` event and the
        call goes on: the state stays ACTIVE."""
        if self.state is AcState.ACTIVE:
            self.stop_play()
            params: dict[str, Any] = {"transferTarget": target}
            if reason:
                params["handoverReason"] = reason
            self._out.append(encode(ActivitiesOut(activities=[
                OutActivity(type="event", name="transfer", activityParams=params)])))

    def send_dtmf(self, digits: str) -> None:
        """Keypad tones on the line (`sendDtmf`, digits already checked: 0-9 * #, at most 20)."""
        if self.state is AcState.ACTIVE:
            self._out.append(encode(ActivitiesOut(activities=[
                OutActivity(type="event", name="sendDtmf", activityParams={"dtmfDigits": digits})])))

    def request_hangup(self, reason: str) -> None:
        """Ask VAIC to end the call (hangup activity, after stopping an open play stream);
        VAIC answers with session.end."""
        if self.state is AcState.ACTIVE:
            self.stop_play()
            self._out.append(hangup(reason))
            self.state = AcState.ENDING

    # -- the bot's audio: one play stream at a time, chunks only inside one
    def start_play(self) -> str:
        """playStream.start of a new stream in the accepted format; returns its id."""
        if self.stream_id is not None or self.state is not AcState.ACTIVE:
            raise RuntimeError(f"start_play() with stream {self.stream_id} in state {self.state.value}")
        self.stream_seq += 1
        sid = self.stream_id = str(self.stream_seq)
        self._chunk_prefix, self._chunk_suffix = chunk_template(sid)
        self._out.append(encode(PlayStreamStart(streamId=sid, mediaFormat=self.media_format)))
        return sid

    def play_chunk(self, b64: str) -> None:
        """playStream.chunk of the open stream (hot path: a template, `b64` is strict base64)."""
        self._out.append(self._chunk_prefix + b64 + self._chunk_suffix)

    def stop_play(self) -> bool:
        """playStream.stop of the open stream; False when none is open."""
        sid = self.stream_id
        if sid is None:
            return False
        self.stream_id = None
        self._out.append(encode(PlayStreamStop(streamId=sid)))
        return True

    # -- speech reports (VAIC relies on speech.started for its own barge-in)
    def speech_started(self) -> None:
        self._out.append(encode(SpeechStarted(participant=self.participant)))

    def speech_hypothesis(self) -> None:
        """An empty-text hypothesis at speech start, for VAIC setups whose barge-in reacts to
        hypotheses rather than speech.started (`call.send_speech_hypothesis`)."""
        self._out.append(encode(SpeechHypothesis(alternatives=[Alternative(text="")],
                                                 participant=self.participant)))

    def speech_stopped(self) -> None:
        self._out.append(encode(SpeechStopped(participant=self.participant)))

    def speech_committed(self) -> None:
        self._out.append(encode(SpeechCommitted(participant=self.participant)))

    def recognition(self, text: str) -> None:
        self._out.append(encode(SpeechRecognition(alternatives=[Alternative(text=text)],
                                                  participant=self.participant)))

    # -- output
    def data_to_send(self) -> list[str]:
        """Frames queued by the state machine, in order; the queue is emptied."""
        out = list(self._out)
        self._out.clear()
        return out


_KNOWN_TYPES = frozenset(
    cls.__struct_config__.tag for cls in AcInbound.__args__  # type: ignore[attr-defined]
)
