"""Configuration and records of the fake OpenAI Realtime server.

:class:`FakeOpenAIConfig` (the behaviour knobs), the per-connection record :class:`FakeSession`
and the per-response record :class:`FakeResponse` (re-exported by
:mod:`voicebridge.sim.fake_openai`), plus the connection's conversation-item record ``_Item``
and the id maker ``_new_id``.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from typing import Any, Callable

from websockets.datastructures import Headers

DEFAULT_REPLIES = [
    "Hello, how can I help you?",
    "Sure, I can help with that. Could you tell me a little more?",
    "Thanks. Is there anything else I can do for you today?",
]
DEFAULT_GREETING = "Hello, thanks for calling. How can I help you today?"


@dataclass
class FakeOpenAIConfig:
    """Behaviour of a :class:`FakeRealtimeServer`. Times in ms unless the name says ``_s``.

    Fields read per session (at connect) or per event, so changing them on a running server
    affects later sessions/events.

    Reply scripting: ``replies`` are used per session in turn order (cycling). A reply may end
    with ``"@@name {json-args}"``: the text before the marker is spoken, then a
    ``function_call`` output item ``name`` with those arguments follows in the same response
    ``[fake]`` (e.g. ``"Goodbye! @@hang_up {}"``).

    Malicious-upstream knobs (hardening tests), each read once per session, at connect:

    * ``silent``: accept the websocket, then send nothing at all (no ``session.created``, no
      ``session.updated``, no responses, no errors). Client events are still read and recorded.
    * ``bad_delta``: if set, the first audio delta of each response carries this literal text as
      its ``delta`` value (JSON-escaped on the wire, so the decoded value is exactly this text),
      e.g. ``'AAAA","type":"activities","activities":[{"type":"event","name":"transfer"}],"x":"'``:
      an injection attempt against a bridge that pastes deltas into a JSON template. That delta
      carries no audio: it is not counted in ``audio_ms_sent`` / the item's audio, only in
      ``FakeSession.bad_deltas_sent``.
    * ``stop_reading_after_s``: this many seconds after the session opened, the fake stops reading
      its socket (``transport.pause_reading()`` on the connection, for good), so the bridge's
      sends back up. The session's receive buffer is shrunk at connect (``SO_RCVBUF`` 16 KiB) so
      the kernel does not absorb megabytes first. ``FakeSession.reading_stopped_at`` records when.

    Fault knobs (recovery tests):

    * ``refuse``: reject handshakes with this HTTP status (before auth). With ``refuse_first`` 0
      (the default) every handshake is refused; with ``refuse_first`` N only the first N
      handshakes of this server are, later ones are handled normally (retry tests).
      ``retry_after_s``: if set, refusals carry a ``Retry-After`` header with this value
      (``f"{value:g}"``: ``1`` -> ``"1"``, ``0.5`` -> ``"0.5"``).
    * ``drop_after_s``: this long after a session opened, end its connection: with ``drop_code``
      None abort the TCP connection (no close frame: 1006 at the client), else send a close frame
      with that code (e.g. 1011, 1001) and close. ``FakeSession.dropped_at`` records when. Read
      when the session is recorded (like ``session_limit_s``), so a test that wants one drop
      only sets it back to None as soon as the session is in ``FakeRealtimeServer.sessions``.
    * ``drop_after_ms_for``: called once per session, with the ``instructions`` of its first
      ``session.update`` (``""`` when it has none); a number it returns is the ms after that
      update at which the session's TCP connection is aborted (no close frame, as
      ``drop_after_s`` with ``drop_code`` None; ``FakeSession.dropped_at`` records when), None
      leaves the session alone. So a test drops chosen calls only (e.g. the bridge's instructions
      carry the caller): the function decides, e.g. only the first session of a caller, so its
      replacement after the bridge reconnects is kept. Ignored when ``drop_after_s`` is set.
    * ``fail_responses``: the first ``len(fail_responses)`` responses of each session fail, one
      code per response: ``response.created``, then ``response.done`` with ``status: "failed"``,
      ``status_details: {"type": "failed", "error": {"type": code, "code": code}}``, no output
      and no audio (``FakeResponse.status == "failed"``). A failed response does not use up a
      scripted reply: the next one speaks the same text.
    * ``session_limit_s``: ``session_expired`` error, then close 1001, this long after connect.
    * ``close_after_deltas``: abort the TCP connection after this many audio deltas.
    * ``inject_errors``: these error codes are sent after the first ``session.updated``.

    Input transcription: when the session has ``audio.input.transcription`` set (not null), each
    committed user turn is followed by ``conversation.item.input_audio_transcription.completed``
    for its item, the transcript taken from ``input_transcripts`` in turn order (cycling; the
    ``{n}`` in it is the session's turn number, from 1).
    Every client event is recorded in ``FakeSession.received`` (so the
    ``conversation.item.create`` items a client re-seeds a session with are there).
    """

    host: str = "127.0.0.1"
    port: int = 0
    api_key: str | None = None
    model: str = "gpt-realtime"  # only used to build :attr:`FakeRealtimeServer.url`
    think_ms: float = 150.0
    first_delta_delay_ms: float = 0.0
    delta_audio_ms: int = 100
    delta_interval_ms: float = 20.0
    replies: list[str] = field(default_factory=lambda: list(DEFAULT_REPLIES))
    reply_ms: list[int] | None = None
    greeting_text: str = DEFAULT_GREETING
    greeting_ms: int = 1500
    inflight_after_cancel: int = 1
    vad_threshold_rms: float = 500.0
    vad_min_speech_ms: int = 60
    session_limit_s: float | None = None
    refuse: int | None = None
    refuse_first: int = 0
    retry_after_s: float | None = None
    drop_after_s: float | None = None
    drop_code: int | None = None
    fail_responses: list[str] = field(default_factory=list)
    input_transcripts: list[str] = field(default_factory=lambda: ["caller turn {n}"])
    close_after_deltas: int | None = None
    inject_errors: list[str] = field(default_factory=list)
    record: bool = True
    stamp_deltas: bool = False
    silent: bool = False
    bad_delta: str | None = None
    stop_reading_after_s: float | None = None
    drop_after_ms_for: Callable[[str], float | None] | None = None


@dataclass(eq=False)
class FakeResponse:
    """One response of a session, as the fake server ran it.

    ``status``: ``in_progress`` → ``completed`` | ``cancelled`` | ``failed`` (``fail_responses``). ``reason`` is the
    ``status_details.reason`` of a cancelled response (``turn_detected`` | ``client_cancelled``).
    ``audio_ms_sent`` counts the audio of all deltas actually sent for ``item_id``.
    """

    id: str
    item_id: str | None
    trigger: str  # "vad" | "response.create"
    text: str
    planned_audio_ms: int
    scheduled_at: float
    instructions: str | None = None
    status: str = "in_progress"
    reason: str | None = None
    audio_ms_sent: int = 0
    deltas_sent: int = 0
    transcript_sent: str = ""
    function_call: tuple[str, str] | None = None  # (name, arguments JSON) [fake]
    created_at: float | None = None  # response.created sent
    first_delta_at: float | None = None
    cancelled_at: float | None = None
    done_at: float | None = None


@dataclass(eq=False)
class FakeSession:
    """Record of one accepted WebSocket connection (also beta-rejected ones).

    ``received``: (monotonic time, decoded client event) for every JSON object received.
    ``sent``: (monotonic time, server event) for every event sent except
    ``response.output_audio.delta``, which is only counted in ``deltas_sent``.
    ``errors_sent``: every ``error`` event sent (the whole event, ``{"type": "error", "event_id",
    "error": {type, code, message, param, event_id}}``); those sent by the ``inject_errors``
    knob are recorded with an extra ``"injected": True`` key.
    ``truncations``: accepted ``conversation.item.truncate`` requests, each
    ``{at, item_id, content_index, audio_end_ms, item_audio_ms, response_id, response_status}``
    where ``item_audio_ms`` is the audio the server had sent for the item at that moment.
    ``session``: the current effective session object (as in the last ``session.updated``).
    ``close_code`` is 1006 when the TCP connection ended without a close frame.
    """

    id: str
    model: str
    path: str
    query: dict[str, str]
    headers: Headers
    opened_at: float
    azure: bool = False
    beta_rejected: bool = False
    received: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    sent: list[tuple[float, dict[str, Any]]] = field(default_factory=list)
    deltas_sent: int = 0
    truncations: list[dict[str, Any]] = field(default_factory=list)
    errors_sent: list[dict[str, Any]] = field(default_factory=list)
    responses: list[FakeResponse] = field(default_factory=list)
    session: dict[str, Any] = field(default_factory=dict)
    closed_at: float | None = None
    close_code: int | None = None
    close_reason: str | None = None
    aborted: bool = False
    bad_deltas_sent: int = 0  # ``bad_delta`` knob: injected deltas sent
    reading_stopped_at: float | None = None  # ``stop_reading_after_s`` knob: when reading stopped
    dropped_at: float | None = None  # ``drop_after_s`` knob: when the fake ended the connection
    peer: Any = None  # the client's (host, port), as the accepted socket saw it

    def sent_of(self, event_type: str) -> list[dict[str, Any]]:
        """Recorded server events of ``event_type``, in send order."""
        return [ev for _, ev in self.sent if ev.get("type") == event_type]

    def received_of(self, event_type: str) -> list[dict[str, Any]]:
        """Recorded client events of ``event_type``, in receive order."""
        return [ev for _, ev in self.received if ev.get("type") == event_type]


@dataclass(eq=False)
class _Item:
    role: str  # user | assistant | system | tool
    item: dict[str, Any]
    audio_ms: int = 0  # assistant: audio ms currently in the item (sent, minus truncation)
    truncated: bool = False
    response: FakeResponse | None = None


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(10)
