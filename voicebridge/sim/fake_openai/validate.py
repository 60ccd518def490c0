"""Client-event validation of the fake OpenAI Realtime server (pure, no I/O).

The GA ``session.update`` validation and merge (:func:`apply_session_update`), the default
session object (:func:`default_session`), the ``error`` builders and the keys each client event
may carry. A rejected event raises :class:`_ClientError`, which the connection handler turns into
one ``error`` event. The public names are re-exported by :mod:`voicebridge.sim.fake_openai`.
"""

from __future__ import annotations

import copy
import json
import re
import time
from typing import Any

DEFAULT_INSTRUCTIONS = (
    "Your knowledge cutoff is 2023-10. You are a helpful, witty, and friendly AI. Act like a "
    "human, but remember that you aren't a human and that you can't do human things in the "
    "real world. Your voice and personality should be warm and engaging. Talk quickly. "
    "[fake OpenAI Realtime server default instructions]"
)
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")


class _ClientError(Exception):
    """A client event was rejected; becomes one ``error`` event. The socket stays open."""

    def __init__(
        self,
        code: str | None,
        message: str,
        param: str | None = None,
        err_type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.param = param
        self.err_type = err_type


def _json_kind(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int):
        return "an integer"
    if isinstance(value, float):
        return "a decimal"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "an unknown type"


def _invalid_type(param: str, expected: str, value: Any) -> _ClientError:
    return _ClientError(
        "invalid_type",
        f"Invalid type for '{param}': expected {expected}, but got {_json_kind(value)} instead.",
        param,
    )


def _invalid_value(param: str, value: Any, supported: tuple[Any, ...] | None = None) -> _ClientError:
    msg = f"Invalid value: {json.dumps(value)}."
    if supported:
        msg += " Supported values are: " + ", ".join(f"'{s}'" for s in supported) + "."
    return _ClientError("invalid_value", msg.replace('"', "'"), param)


def _missing(param: str) -> _ClientError:
    return _ClientError(
        "missing_required_parameter", f"Missing required parameter: '{param}'.", param
    )


def _check_keys(obj: dict[str, Any], allowed: frozenset[str], path: str) -> None:
    for key in obj:
        if key not in allowed:
            p = f"{path}.{key}" if path else key
            raise _ClientError("unknown_parameter", f"Unknown parameter: '{p}'.", p)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _expect(v: Any, ok: bool, param: str, expected: str) -> None:
    if not ok:
        raise _invalid_type(param, expected, v)


_SESSION_KEYS = frozenset(
    {
        "type", "model", "instructions", "output_modalities", "audio", "tools", "tool_choice",
        "max_output_tokens", "truncation", "include", "tracing", "prompt",
    }
)
_AUDIO_KEYS = frozenset({"input", "output"})
_AUDIO_INPUT_KEYS = frozenset({"format", "turn_detection", "transcription", "noise_reduction"})
_AUDIO_OUTPUT_KEYS = frozenset({"format", "voice", "speed"})
_FORMAT_TYPES = ("audio/pcm", "audio/pcmu", "audio/pcma")
_SERVER_VAD_KEYS = frozenset(
    {
        "type", "threshold", "prefix_padding_ms", "silence_duration_ms", "idle_timeout_ms",
        "create_response", "interrupt_response",
    }
)
_SEMANTIC_VAD_KEYS = frozenset({"type", "eagerness", "create_response", "interrupt_response"})
_TRANSCRIPTION_KEYS = frozenset({"model", "language", "prompt", "languages", "keywords", "delay"})
_INCLUDE_VALUES = ("item.input_audio_transcription.logprobs",)
_RESPONSE_KEYS = frozenset(
    {
        "instructions", "tools", "tool_choice", "output_modalities", "audio",
        "max_output_tokens", "conversation", "input", "metadata", "prompt",
    }
)


def _server_vad_defaults() -> dict[str, Any]:
    return {
        "type": "server_vad",
        "threshold": 0.5,
        "prefix_padding_ms": 300,
        "silence_duration_ms": 200,
        "idle_timeout_ms": None,
        "create_response": True,
        "interrupt_response": True,
    }


def _semantic_vad_defaults() -> dict[str, Any]:
    return {
        "type": "semantic_vad",
        "eagerness": "auto",
        "create_response": True,
        "interrupt_response": True,
    }


def default_session(session_id: str, model: str) -> dict[str, Any]:
    """The GA session object the fake sends in ``session.created``."""
    return {
        "type": "realtime",
        "object": "realtime.session",
        "id": session_id,
        "model": model,
        "output_modalities": ["audio"],
        "instructions": DEFAULT_INSTRUCTIONS,
        "tools": [],
        "tool_choice": "auto",
        "max_output_tokens": "inf",
        "tracing": None,
        "truncation": "auto",
        "prompt": None,
        "expires_at": int(time.time()) + 3600,
        "audio": {
            "input": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "transcription": None,
                "noise_reduction": None,
                "turn_detection": _server_vad_defaults(),
            },
            "output": {
                "format": {"type": "audio/pcm", "rate": 24000},
                "voice": "marin",
                "speed": 1.0,
            },
        },
        "include": None,
    }


def _check_format(fmt: Any, path: str) -> dict[str, Any]:
    _expect(fmt, isinstance(fmt, dict), path, "an object")
    if "type" not in fmt:
        raise _missing(f"{path}.type")
    ftype = fmt["type"]
    if ftype not in _FORMAT_TYPES:
        raise _invalid_value(f"{path}.type", ftype, _FORMAT_TYPES)
    if ftype == "audio/pcm":
        _check_keys(fmt, frozenset({"type", "rate"}), path)
        rate = fmt.get("rate", 24000)
        if rate != 24000:
            raise _invalid_value(f"{path}.rate", rate, (24000,))
        return {"type": ftype, "rate": 24000}
    _check_keys(fmt, frozenset({"type"}), path)  # [fake] G.711 formats take no rate field
    return {"type": ftype}


def _check_turn_detection(td: Any, current: Any, path: str) -> dict[str, Any] | None:
    """Validate ``turn_detection``; same type merges onto current, a new type onto defaults."""
    if td is None:
        return None
    _expect(td, isinstance(td, dict), path, "an object")
    if "type" not in td:
        raise _missing(f"{path}.type")
    kind = td["type"]
    if kind == "server_vad":
        _check_keys(td, _SERVER_VAD_KEYS, path)
        base = _server_vad_defaults()
    elif kind == "semantic_vad":
        _check_keys(td, _SEMANTIC_VAD_KEYS, path)
        base = _semantic_vad_defaults()
    else:
        raise _invalid_value(f"{path}.type", kind, ("server_vad", "semantic_vad"))
    if isinstance(current, dict) and current.get("type") == kind:
        base = dict(current)
    for key, val in td.items():
        p = f"{path}.{key}"
        if key == "threshold":
            _expect(val, _is_num(val), p, "a decimal")
            if not 0.0 <= val <= 1.0:
                raise _ClientError("decimal_above_max_value" if val > 1 else "decimal_below_min_value",
                                   f"Invalid '{p}': expected a value between 0 and 1.", p)
        elif key in ("prefix_padding_ms", "silence_duration_ms"):
            _expect(val, _is_int(val), p, "an integer")
            if val < 0:
                raise _invalid_value(p, val)
        elif key == "idle_timeout_ms":
            _expect(val, val is None or _is_int(val), p, "an integer")
            if val is not None and val < 0:
                raise _invalid_value(p, val)
        elif key in ("create_response", "interrupt_response"):
            _expect(val, isinstance(val, bool), p, "a boolean")
        elif key == "eagerness":
            if val not in ("low", "medium", "high", "auto"):
                raise _invalid_value(p, val, ("low", "medium", "high", "auto"))
        base[key] = val
    return base


def _apply_audio(audio: dict[str, Any], upd: Any, path: str) -> None:
    """Validate ``session.audio`` and merge it into ``audio`` (a private deep copy)."""
    _expect(upd, isinstance(upd, dict), path, "an object")
    _check_keys(upd, _AUDIO_KEYS, path)
    if "input" in upd:
        inp, p = upd["input"], f"{path}.input"
        _expect(inp, isinstance(inp, dict), p, "an object")
        _check_keys(inp, _AUDIO_INPUT_KEYS, p)
        cur = audio["input"]
        if "format" in inp:
            cur["format"] = _check_format(inp["format"], f"{p}.format")
        if "turn_detection" in inp:
            cur["turn_detection"] = _check_turn_detection(
                inp["turn_detection"], cur.get("turn_detection"), f"{p}.turn_detection"
            )
        if "transcription" in inp:
            tr, tp = inp["transcription"], f"{p}.transcription"
            if tr is not None:
                _expect(tr, isinstance(tr, dict), tp, "an object")
                _check_keys(tr, _TRANSCRIPTION_KEYS, tp)
                if "model" in tr:
                    _expect(tr["model"], isinstance(tr["model"], str), f"{tp}.model", "a string")
            cur["transcription"] = tr
        if "noise_reduction" in inp:
            nr, np_ = inp["noise_reduction"], f"{p}.noise_reduction"
            if nr is not None:
                _expect(nr, isinstance(nr, dict), np_, "an object")
                _check_keys(nr, frozenset({"type"}), np_)
                if nr.get("type") not in ("near_field", "far_field"):
                    raise _invalid_value(f"{np_}.type", nr.get("type"), ("near_field", "far_field"))
            cur["noise_reduction"] = nr
    if "output" in upd:
        out, p = upd["output"], f"{path}.output"
        _expect(out, isinstance(out, dict), p, "an object")
        _check_keys(out, _AUDIO_OUTPUT_KEYS, p)
        cur = audio["output"]
        if "format" in out:
            cur["format"] = _check_format(out["format"], f"{p}.format")
        if "voice" in out:
            voice = out["voice"]
            if isinstance(voice, dict):
                _check_keys(voice, frozenset({"id"}), f"{p}.voice")
                _expect(voice.get("id"), isinstance(voice.get("id"), str), f"{p}.voice.id", "a string")
            elif voice not in VOICES:
                raise _invalid_value(f"{p}.voice", voice, VOICES)
            cur["voice"] = voice
        if "speed" in out:
            speed = out["speed"]
            _expect(speed, _is_num(speed), f"{p}.speed", "a decimal")
            if not 0.25 <= speed <= 1.5:
                raise _invalid_value(f"{p}.speed", speed)
            cur["speed"] = speed


_FUNCTION_TOOL_KEYS = frozenset({"type", "name", "description", "parameters"})
_MCP_TOOL_KEYS = frozenset(
    {
        "type", "server_label", "server_url", "connector_id", "authorization", "headers",
        "allowed_tools", "require_approval", "server_description", "allowed_callers",
        "defer_loading", "tunnel_id",
    }
)
_FUNCTION_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")


def _check_tools(tools: Any, path: str) -> None:
    """``tools``: function tools (name ``^[a-zA-Z0-9_-]{1,64}$``, unique; ``description`` a
    string; ``parameters`` an object) and MCP tools (``server_label`` and one of
    ``server_url``/``connector_id``; labels unique). Keys as in the GA SDK types."""
    _expect(tools, isinstance(tools, list), path, "an array")
    names: set[str] = set()
    labels: set[str] = set()
    for i, tool in enumerate(tools):
        p = f"{path}[{i}]"
        _expect(tool, isinstance(tool, dict), p, "an object")
        kind = tool.get("type", "function")
        if kind == "function":
            _check_keys(tool, _FUNCTION_TOOL_KEYS, p)
            if "name" not in tool:
                raise _missing(f"{p}.name")
            name = tool["name"]
            _expect(name, isinstance(name, str), f"{p}.name", "a string")
            if not _FUNCTION_NAME_RE.match(name):
                raise _ClientError(
                    "invalid_value",
                    f"Invalid '{p}.name': string does not match pattern. Expected a string that "
                    "matches the pattern '^[a-zA-Z0-9_-]+$' (at most 64 characters).",
                    f"{p}.name",
                )
            if name in names:  # [fake] the live API's answer to duplicates is undocumented
                raise _ClientError("invalid_value", f"Duplicate function name '{name}' in {path}.",
                                   f"{p}.name")
            names.add(name)
            if "description" in tool:
                _expect(tool["description"], isinstance(tool["description"], str),
                        f"{p}.description", "a string")
            if "parameters" in tool:
                _expect(tool["parameters"], isinstance(tool["parameters"], dict),
                        f"{p}.parameters", "an object")
        elif kind == "mcp":
            _check_keys(tool, _MCP_TOOL_KEYS, p)
            if "server_label" not in tool:
                raise _missing(f"{p}.server_label")
            label = tool["server_label"]
            _expect(label, isinstance(label, str), f"{p}.server_label", "a string")
            if "server_url" not in tool and "connector_id" not in tool:
                raise _ClientError("missing_required_parameter",
                                   f"Missing required parameter: '{p}.server_url' (or "
                                   f"'{p}.connector_id').", f"{p}.server_url")
            if label in labels:  # [fake]
                raise _ClientError("invalid_value", f"Duplicate MCP server_label '{label}'.",
                                   f"{p}.server_label")
            labels.add(label)
        else:
            raise _invalid_value(f"{p}.type", kind, ("function", "mcp"))


def _check_common(key: str, val: Any, path: str) -> None:
    """Fields shared by ``session`` and ``response`` overrides."""
    p = f"{path}.{key}"
    if key in ("model", "instructions"):
        _expect(val, isinstance(val, str), p, "a string")
    elif key == "output_modalities":
        _expect(val, isinstance(val, list), p, "an array")
        if val not in (["audio"], ["text"]):
            raise _invalid_value(p, val, ("audio", "text"))
    elif key == "tools":
        _check_tools(val, p)
    elif key == "tool_choice":
        if isinstance(val, dict):
            if val.get("type") not in ("function", "mcp"):
                raise _invalid_value(f"{p}.type", val.get("type"), ("function", "mcp"))
        elif val not in ("auto", "none", "required"):
            raise _invalid_value(p, val, ("auto", "none", "required"))
    elif key == "max_output_tokens":
        if val != "inf":
            _expect(val, _is_int(val), p, "an integer")
            if not 1 <= val <= 4096:
                raise _invalid_value(p, val)
    elif key == "truncation":
        if isinstance(val, dict):
            if val.get("type") != "retention_ratio":
                raise _invalid_value(f"{p}.type", val.get("type"), ("retention_ratio",))
        elif val not in ("auto", "disabled"):
            raise _invalid_value(p, val, ("auto", "disabled"))
    elif key == "include":
        _expect(val, val is None or isinstance(val, list), p, "an array")
        for v in val or ():
            if v not in _INCLUDE_VALUES:
                raise _invalid_value(p, v, _INCLUDE_VALUES)
    elif key == "tracing":
        if not (val is None or val == "auto" or isinstance(val, dict)):
            raise _invalid_value(p, val, ("auto",))
    elif key == "prompt":
        _expect(val, val is None or isinstance(val, dict), p, "an object")


def apply_session_update(current: dict[str, Any], upd: Any) -> dict[str, Any]:
    """Validate a GA ``session.update`` payload and return the merged effective session.

    ``current`` is never mutated; the result is a fresh deep copy. Raises ``_ClientError`` on the
    first problem: unknown keys (``unknown_parameter``) are checked before the required
    ``type`` (``missing_required_parameter``), so a beta-shaped update gets ``unknown_parameter``
    as reported for the live API.
    """
    _expect(upd, isinstance(upd, dict), "session", "an object")
    _check_keys(upd, _SESSION_KEYS, "session")
    if "type" not in upd:
        raise _missing("session.type")
    if upd["type"] != "realtime":  # [fake] transcription sessions are not simulated
        raise _invalid_value("session.type", upd["type"], ("realtime",))
    new = copy.deepcopy(current)
    for key, val in upd.items():
        if key == "type":
            continue
        if key == "audio":
            _apply_audio(new["audio"], val, "session.audio")
            continue
        _check_common(key, val, "session")
        new[key] = copy.deepcopy(val)
    return new


# ----------------------------------------------------------------------------------------------
# Client event envelope
# ----------------------------------------------------------------------------------------------

_CLIENT_EVENT_KEYS: dict[str, frozenset[str]] = {
    "session.update": frozenset({"session"}),
    "input_audio_buffer.append": frozenset({"audio"}),
    "input_audio_buffer.commit": frozenset(),
    "input_audio_buffer.clear": frozenset(),
    "conversation.item.create": frozenset({"previous_item_id", "item"}),
    "conversation.item.truncate": frozenset({"item_id", "content_index", "audio_end_ms"}),
    "conversation.item.delete": frozenset({"item_id"}),
    "conversation.item.retrieve": frozenset({"item_id"}),
    "response.create": frozenset({"response"}),
    "response.cancel": frozenset({"response_id"}),
    "output_audio_buffer.clear": frozenset({"response_id"}),
}
_ENVELOPE_KEYS = frozenset({"type", "event_id"})
