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

    Reply scripting: the first response of a session that comes from ``response.create`` before
    any caller turn speaks ``greeting_text`` (``greeting_ms``); every other response (VAD turn,
    or ``response.create`` after a tool output, a DTMF item, ...) takes the next of ``replies``,
    per session in order (cycling). A reply may end with tool calls, each introduced by ``@@``:
    the text before the first marker is spoken (an audio message item), then each call follows
    as its own output item of the same response, in order:

    * ``"@@name {json-args}"``: a ``function_call`` item ``name`` (GA shape: ``call_id``,
      ``arguments``; events ``response.output_item.added``, ``conversation.item.added``,
      ``response.function_call_arguments.delta`` and ``.done`` with ``call_id``/``name``/
      ``arguments``/``item_id``/``response_id``/``output_index``, ``response.output_item.done``,
      ``conversation.item.done``); ``response.done`` lists every item in ``response.output``.
      The arguments text is sent as written (no JSON check: a test may script bad arguments).
      E.g. ``"Goodbye! @@end_call {\"reason\": \"done\"}"``, or
      ``"One moment. @@transfer_call {\"target\": \"sales\"}"`` followed in ``replies`` by
      ``"Sorry, the transfer failed."`` (spoken by the response the client creates after it
      told the model the outcome).
    * ``"@@mcp:LABEL:TOOL {json-args}"``: a server-side ``mcp_call`` item on the MCP server
      ``LABEL`` (see MCP below).

    Each call is recorded in ``FakeSession.function_calls`` / ``mcp_calls`` with ``offered``:
    whether the session's (or the response's) ``tools`` held that function name / MCP label; the
    fake calls it either way. A response cancelled during its message makes no calls.

    Tool-call checks on the client (recorded in ``FakeSession.violations``, never an error
    except where the live API sends one):

    * a ``function_call_output`` whose ``call_id`` this session's model never issued (an MCP
      call's id included: MCP calls are run by the server), or a second output for a call_id;
    * ``response.create`` while a response is active: also answered with the live API's
      ``conversation_already_has_active_response`` error;
    * ``response.create`` while an MCP call of an earlier response is still running.
    ``FakeSession.unanswered_calls()`` lists the function calls that got no output.

    MCP: when a ``session.update`` brings an ``mcp`` tool whose ``server_label`` was not listed
    yet, the fake sends ``conversation.item.added`` (an ``mcp_list_tools`` item),
    ``mcp_list_tools.in_progress``, then ``mcp_list_tools.completed`` and
    ``conversation.item.done`` with the tool list (``mcp_server_tools[label]``, else the tool's
    ``allowed_tools`` names, else none); for a label in ``mcp_list_fail``:
    ``mcp_list_tools.failed`` and an empty list. A scripted MCP call sends
    ``response.output_item.added`` (item ``{id, type: "mcp_call", server_label, name,
    arguments: "", approval_request_id: null, error: null, output: null}``),
    ``conversation.item.added``, ``response.mcp_call_arguments.delta`` and ``.done``,
    ``response.mcp_call.in_progress``; the tool then runs ``mcp_call_ms``. It ends with
    ``response.mcp_call.completed`` (``output`` = ``mcp_outputs["LABEL:TOOL"]``, else
    ``mcp_outputs["TOOL"]``, else ``{"ok": true}``) or, when ``mcp_failures`` has the key
    ``"LABEL:TOOL"`` or ``"TOOL"``, ``response.mcp_call.failed`` (``error``
    ``{"type": "tool_execution_error", "message": <that value>}``), then
    ``response.output_item.done`` and ``conversation.item.done`` with the final item. With
    ``mcp_call_ms > 0`` the response's ``response.done`` comes first (the item in its output
    still has ``output: null``) and the completion follows after it, as the live API documents
    ("response.done may arrive before its MCP calls complete"); with 0 the completion comes
    before ``response.done``. As on the live API, the server never starts a follow-up
    response by itself: the client sends ``response.create`` once the call ended. Approval
    requests are not simulated (every call runs as with ``require_approval: "never"``).

    Usage: ``response.done`` carries a ``usage`` object computed by
    :mod:`voicebridge.sim.fake_openai.usage` from what was said and heard (also kept in
    ``FakeResponse.usage``), so a test can sum it and compare with the bridge's counters.

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
    mcp_call_ms: float = 100.0
    mcp_outputs: dict[str, str] = field(default_factory=dict)
    mcp_failures: dict[str, str] = field(default_factory=dict)
    mcp_server_tools: dict[str, list[str]] = field(default_factory=dict)
    mcp_list_fail: list[str] = field(default_factory=list)


@dataclass(eq=False)
class FakeFunctionCall:
    """One ``function_call`` the fake model made (see ``FakeOpenAIConfig``, reply scripting).

    ``outputs``: the ``output`` of every ``function_call_output`` the client sent for
    ``call_id``, in order (exactly one is correct); ``output_at``: when the first arrived.
    ``offered``: the session's (or the response's) ``tools`` held a function of this name.
    ``at``: when ``response.function_call_arguments.done`` was sent.
    """

    name: str
    arguments: str
    call_id: str
    item_id: str
    response_id: str
    output_index: int
    offered: bool
    at: float
    outputs: list[str] = field(default_factory=list)
    output_at: float | None = None


@dataclass(eq=False)
class FakeMcpCall:
    """One server-side ``mcp_call`` (see ``FakeOpenAIConfig``, MCP).

    ``status``: ``in_progress`` → ``completed`` | ``failed``; ``output`` / ``error`` as sent in
    the final item; ``done_at`` when ``response.mcp_call.completed``/``.failed`` was sent.
    ``offered``: an ``mcp`` tool with this ``server_label`` was in the session's (or the
    response's) tools.
    """

    server_label: str
    name: str
    arguments: str
    item_id: str
    response_id: str
    output_index: int
    offered: bool
    at: float
    status: str = "in_progress"
    output: str | None = None
    error: dict[str, Any] | None = None
    done_at: float | None = None


@dataclass(eq=False)
class FakeClientItem:
    """One ``conversation.item.create`` the client sent and the fake accepted.

    ``type``: ``message`` | ``function_call_output`` | ``function_call``; ``role``: the message
    role (``user`` | ``system`` | ``assistant``), ``None`` for other types; ``text``: the
    message's text parts joined with a space, or the function output; ``call_id`` for
    function items.
    """

    at: float
    item_id: str
    type: str
    role: str | None
    text: str
    call_id: str | None = None


@dataclass(eq=False)
class FakeClientResponse:
    """One ``response.create`` the client sent.

    ``reason``: why the client asked, read from the items it created since its previous
    ``response.create`` (``items``): ``function_call_output`` if one of them was a tool output,
    else ``message:<role>`` of the last message item, else ``bare`` (e.g. the greeting).
    ``rejected``: the error code it got (``conversation_already_has_active_response``...),
    else None and ``response_id`` is the response it started. ``instructions``: the
    response-level override, if any.
    """

    at: float
    reason: str
    items: list[FakeClientItem]
    instructions: str | None = None
    response_id: str | None = None
    rejected: str | None = None


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
    function_call: tuple[str, str] | None = None  # first scripted call: (name, arguments) [fake]
    calls: list[tuple[str, str]] = field(default_factory=list)  # every scripted (name, arguments)
    tool_calls: list[FakeFunctionCall | FakeMcpCall] = field(default_factory=list)  # as made
    usage: dict[str, Any] | None = None  # the ``usage`` sent in ``response.done``
    client_request: FakeClientResponse | None = None  # the response.create that started it
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

    Tool and client records (see ``FakeOpenAIConfig``): ``tools_offered`` the names of the
    tools of the effective session (function name, or ``"mcp:<server_label>"``), as of the last
    ``session.update``; ``tools_history`` that list after every ``session.update`` that carried
    ``tools``; ``function_calls`` / ``mcp_calls`` the calls the model made; ``function_outputs``
    call_id → the first ``function_call_output`` text received for it; ``client_items`` every
    accepted ``conversation.item.create``; ``client_responses`` every ``response.create``
    (accepted or not); ``violations`` what the client did wrong with tools and responses (one
    readable line each).
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
    tools_offered: list[str] = field(default_factory=list)
    tools_history: list[list[str]] = field(default_factory=list)
    function_calls: list[FakeFunctionCall] = field(default_factory=list)
    function_outputs: dict[str, str] = field(default_factory=dict)
    mcp_calls: list[FakeMcpCall] = field(default_factory=list)
    client_items: list[FakeClientItem] = field(default_factory=list)
    client_responses: list[FakeClientResponse] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)

    def unanswered_calls(self) -> list[FakeFunctionCall]:
        """Function calls of this session that got no ``function_call_output``."""
        return [c for c in self.function_calls if not c.outputs]

    def usage_total(self, key: str = "total_tokens") -> int:
        """Sum of ``usage[key]`` over this session's responses (``None`` usage counts 0)."""
        return sum(int(r.usage.get(key, 0)) for r in self.responses if r.usage)

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
    audio_ms: int = 0  # audio ms in the item: assistant (sent, minus truncation), user speech
    truncated: bool = False
    response: FakeResponse | None = None
    has_audio: bool = False  # the item holds audio (caller speech, assistant audio)


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(10)
