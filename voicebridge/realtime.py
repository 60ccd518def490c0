"""OpenAI Realtime API, GA interface: the events the bridge sends and the ones it reads.

Sans-I/O. `decode_server(frame)` does one `msgspec` decode into a tagged union of the server
events the bridge acts on; any other server event type decodes into `OtherEvent` without
raising. Client events are built here; `append_template()` gives the prefix/suffix of an
`input_audio_buffer.append` frame so the caller's base64 audio is forwarded as is.

Shapes follow ../shared/protocols/openai-realtime.md (GA: `session.type = "realtime"`,
`audio.input/output.format`, `response.output_audio.delta`, ...); tests validate every event the
bridge sends against the `openai` SDK's own types.
"""

from __future__ import annotations

from typing import Any, Union
from urllib.parse import quote

import msgspec

from .config import OpenAIConfig, Secrets

# ----------------------------------------------------------------------------- server -> client


class _Ev(msgspec.Struct, tag_field="type"):
    pass


class ErrorDetail(msgspec.Struct):
    type: str | None = None
    code: str | None = None
    message: str | None = None
    param: str | None = None
    event_id: str | None = None


class ErrorEvent(_Ev, tag="error"):
    error: ErrorDetail = msgspec.field(default_factory=ErrorDetail)


class SessionCreated(_Ev, tag="session.created"):
    session: dict[str, Any] = {}


class SessionUpdated(_Ev, tag="session.updated"):
    session: dict[str, Any] = {}


class SpeechStartedEv(_Ev, tag="input_audio_buffer.speech_started"):
    audio_start_ms: int = 0
    item_id: str = ""


class SpeechStoppedEv(_Ev, tag="input_audio_buffer.speech_stopped"):
    audio_end_ms: int = 0
    item_id: str = ""


class Committed(_Ev, tag="input_audio_buffer.committed"):
    item_id: str = ""


class TokenDetails(msgspec.Struct):
    text_tokens: int = 0
    audio_tokens: int = 0
    cached_tokens: int = 0


class Usage(msgspec.Struct):
    """`response.done`'s `usage`: what the response cost."""
    input_tokens: int = 0
    output_tokens: int = 0
    input_token_details: TokenDetails | None = None
    output_token_details: TokenDetails | None = None


class ResponseRef(msgspec.Struct):
    id: str = ""
    status: str | None = None
    status_details: dict[str, Any] | None = None
    usage: Usage | None = None


class ResponseCreated(_Ev, tag="response.created"):
    response: ResponseRef = msgspec.field(default_factory=ResponseRef)


class ResponseDone(_Ev, tag="response.done"):
    response: ResponseRef = msgspec.field(default_factory=ResponseRef)


class AudioDelta(_Ev, tag="response.output_audio.delta"):
    delta: str = ""
    response_id: str = ""
    item_id: str = ""
    content_index: int = 0


class AudioDone(_Ev, tag="response.output_audio.done"):
    response_id: str = ""
    item_id: str = ""


class TranscriptDone(_Ev, tag="response.output_audio_transcript.done"):
    response_id: str = ""
    item_id: str = ""
    transcript: str = ""


class InputTranscriptCompleted(_Ev, tag="conversation.item.input_audio_transcription.completed"):
    item_id: str = ""
    transcript: str = ""


class FunctionCallDone(_Ev, tag="response.function_call_arguments.done"):
    """The model calls a function tool: `arguments` is JSON text (the model's, unchecked)."""
    response_id: str = ""
    item_id: str = ""
    call_id: str = ""
    name: str = ""
    arguments: str = ""


class OutputItemDone(_Ev, tag="response.output_item.done"):
    """Read for server-side MCP calls (`item.type == "mcp_call"`: name, server_label, error)."""
    response_id: str = ""
    item: dict[str, Any] = {}


class McpCallFailed(_Ev, tag="response.mcp_call.failed"):
    item_id: str = ""


class McpCallInProgress(_Ev, tag="response.mcp_call.in_progress"):
    item_id: str = ""


class McpCallCompleted(_Ev, tag="response.mcp_call.completed"):
    item_id: str = ""


class McpListToolsFailed(_Ev, tag="mcp_list_tools.failed"):
    item_id: str = ""


class Truncated(_Ev, tag="conversation.item.truncated"):
    item_id: str = ""
    audio_end_ms: int = 0


# Server events the bridge reads but does not act on: decoded to an empty struct (no raise).
_PASSIVE = (
    "rate_limits.updated", "conversation.item.added", "conversation.item.done",
    "conversation.item.created", "response.output_item.added",
    "response.content_part.added", "response.content_part.done",
    "response.mcp_call_arguments.delta", "response.mcp_call_arguments.done",
    "mcp_list_tools.in_progress", "mcp_list_tools.completed",
    "response.output_audio_transcript.delta", "response.output_text.delta",
    "response.output_text.done", "response.function_call_arguments.delta",
    "input_audio_buffer.cleared",
    "conversation.item.input_audio_transcription.delta",
    "conversation.item.input_audio_transcription.failed", "conversation.item.deleted",
    "conversation.item.retrieved", "input_audio_buffer.timeout_triggered",
)
_passive_structs = tuple(
    msgspec.defstruct(f"Passive{i}", [], bases=(_Ev,), tag=name) for i, name in enumerate(_PASSIVE)
)

_ACTED_ON: tuple[type, ...] = (AudioDelta, SpeechStartedEv, SpeechStoppedEv, Committed,
                               ResponseCreated, ResponseDone, AudioDone, TranscriptDone,
                               InputTranscriptCompleted, Truncated, ErrorEvent, SessionCreated,
                               SessionUpdated, FunctionCallDone, OutputItemDone, McpCallFailed,
                               McpListToolsFailed, McpCallInProgress, McpCallCompleted)
ServerEvent: Any = Union[_ACTED_ON + _passive_structs]  # a runtime union msgspec decodes into
_decoder = msgspec.json.Decoder(ServerEvent)


class OtherEvent(msgspec.Struct):
    """A server event type this bridge does not know (new API versions add them)."""
    type: Any = None


class BadEvent(msgspec.Struct):
    reason: str


_other_decoder = msgspec.json.Decoder(OtherEvent)


def decode_server(frame: str | bytes) -> Any:
    """One server frame -> one event struct; OtherEvent / BadEvent instead of raising."""
    try:
        return _decoder.decode(frame)
    except msgspec.DecodeError as e:
        try:
            return _other_decoder.decode(frame)
        except msgspec.DecodeError:
            return BadEvent(str(e)[:160])
        except RecursionError:
            return BadEvent("JSON nested too deeply")
    except RecursionError:
        return BadEvent("JSON nested too deeply")


# ----------------------------------------------------------------------------- errors

BENIGN_ERROR_CODES = frozenset({
    "conversation_already_has_active_response",
    "response_cancel_not_active",
    "input_audio_buffer_commit_empty",
})
FATAL_ERROR_CODES = frozenset({
    "session_expired", "invalid_api_key", "insufficient_quota", "invalid_intent",
    "model_not_found", "session_not_found",
})
# fatal for the session, not for the call: a new session continues the conversation
SESSION_ENDING_CODES = frozenset({"session_expired", "session_not_found"})


def classify_error(code: str | None) -> str:
    """'benign' (log, go on), 'fatal' (end the call) or 'warning' (log loudly, go on).

    The Realtime API keeps the session open after most errors, so unknown codes are not fatal;
    a really fatal condition is followed by the server closing the socket, which ends the call."""
    if code in BENIGN_ERROR_CODES:
        return "benign"
    if code in FATAL_ERROR_CODES:
        return "fatal"
    return "warning"


# ----------------------------------------------------------------------------- client events

_encoder = msgspec.json.Encoder()


def append_template() -> tuple[str, str]:
    """Prefix/suffix of `{"type":"input_audio_buffer.append","audio":"<b64>"}`."""
    return '{"type":"input_audio_buffer.append","audio":"', '"}'


def _turn_detection(o: OpenAIConfig) -> dict[str, Any] | None:
    vad = o.vad
    turn: dict[str, Any] | None
    if vad.type == "none":
        turn = None
    elif vad.type == "server_vad":
        turn = {"type": "server_vad", "threshold": vad.threshold,
                "prefix_padding_ms": vad.prefix_padding_ms,
                "silence_duration_ms": vad.silence_duration_ms,
                "create_response": vad.create_response,
                "interrupt_response": vad.interrupt_response}
    else:
        turn = {"type": "semantic_vad", "eagerness": vad.eagerness,
                "create_response": vad.create_response,
                "interrupt_response": vad.interrupt_response}
    return turn


def session_update(o: OpenAIConfig, input_format: dict[str, Any], output_format: dict[str, Any],
                   instructions: str, tools: list[dict[str, Any]] | None = None) -> str:
    """The first `session.update` of a session (a per-call profile is an `OpenAIConfig` too:
    voice, VAD, transcription come from `o`); `tools` (profiles.tool_definitions) if any."""
    audio_in: dict[str, Any] = {"format": input_format, "turn_detection": _turn_detection(o)}
    if o.transcription_model:
        audio_in["transcription"] = {"model": o.transcription_model}
    if o.noise_reduction:
        audio_in["noise_reduction"] = {"type": o.noise_reduction}
    session: dict[str, Any] = {
        "type": "realtime",
        "instructions": instructions,
        "output_modalities": ["audio"],
        "audio": {"input": audio_in, "output": {"format": output_format, "voice": o.voice}},
    }
    if tools:
        session["tools"] = tools
        session["tool_choice"] = "auto"
    return _encoder.encode({"type": "session.update", "session": session}).decode()


def profile_update(o: OpenAIConfig, instructions: str, tools: list[dict[str, Any]],
                   voice: bool) -> str:
    """The second `session.update` of a call, once the `start` activity chose its profile:
    instructions, tools, VAD and transcription; the voice only while no audio was produced
    (`voice`), since the Realtime API cannot change it after that."""
    audio_in: dict[str, Any] = {"turn_detection": _turn_detection(o),
                                "transcription": ({"model": o.transcription_model}
                                                  if o.transcription_model else None),
                                "noise_reduction": ({"type": o.noise_reduction}
                                                    if o.noise_reduction else None)}
    audio: dict[str, Any] = {"input": audio_in}
    if voice:
        audio["output"] = {"voice": o.voice}
    session: dict[str, Any] = {"type": "realtime", "instructions": instructions, "audio": audio,
                               "tools": tools, "tool_choice": "auto"}
    return _encoder.encode({"type": "session.update", "session": session}).decode()


def function_output(call_id: str, output: Any) -> str:
    """The one `function_call_output` a function call gets (`output` JSON-encoded here)."""
    text = output if isinstance(output, str) else _encoder.encode(output).decode()
    return _encoder.encode({"type": "conversation.item.create",
                            "item": {"type": "function_call_output", "call_id": call_id,
                                     "output": text}}).decode()


def system_note(text: str) -> str:
    """A system message item: something the model must know (a keypad entry, a failed
    transfer, the caller's silence) without the caller having said it."""
    return _encoder.encode({"type": "conversation.item.create",
                            "item": {"type": "message", "role": "system",
                                     "content": [{"type": "input_text", "text": text}]}}).decode()


def instructions_update(instructions: str) -> str:
    """A later session.update that only changes the instructions (after the `start` activity)."""
    return _encoder.encode({"type": "session.update",
                            "session": {"type": "realtime", "instructions": instructions}}).decode()


def response_create(instructions: str) -> str:
    return _encoder.encode({"type": "response.create",
                            "response": {"instructions": instructions}}).decode()


def response_retry() -> str:
    """A plain `response.create`: the turn's response failed, try once more."""
    return '{"type":"response.create"}'


def conversation_item(role: str, text: str) -> str:
    """`conversation.item.create` of one past turn as text (re-seeding a new session)."""
    part = {"type": "input_text" if role == "user" else "output_text", "text": text}
    return _encoder.encode({"type": "conversation.item.create",
                            "item": {"type": "message", "role": role, "content": [part]}}).decode()


def response_cancel() -> str:
    return '{"type":"response.cancel"}'


def truncate(item_id: str, audio_end_ms: int) -> str:
    return _encoder.encode({"type": "conversation.item.truncate", "item_id": item_id,
                            "content_index": 0, "audio_end_ms": audio_end_ms}).decode()


# ----------------------------------------------------------------------------- connection target


def target(o: OpenAIConfig, secrets: Secrets) -> tuple[str, dict[str, str]]:
    """URL and headers for the upstream socket. GA only: never an `OpenAI-Beta` header.

    OpenAI: `<url>?model=<model>` with `Authorization: Bearer $OPENAI_API_KEY`.
    Azure GA: `<endpoint>/openai/v1/realtime?model=<deployment>` with `api-key`
    (no api-version: the GA endpoint answers 401 to one)."""
    if o.provider == "azure":
        url = f"{o.azure_endpoint.rstrip('/')}/openai/v1/realtime?model={quote(o.azure_deployment)}"
        return url, {"api-key": secrets.azure_api_key}
    return f"{o.url}?model={quote(o.model)}", {"Authorization": f"Bearer {secrets.openai_api_key}"}
