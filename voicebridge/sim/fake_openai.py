"""Fake OpenAI Realtime GA server for end-to-end tests, ``make demo`` and the load benchmark.

It speaks the GA WebSocket protocol as described in
``/work/shared/protocols/openai-realtime.md`` (§2, §3.1, §4.3–4.5, §6): handshake and auth,
``session.created`` / ``session.update`` validation, ``input_audio_buffer.*`` with an energy
VAD, scripted audio responses, barge-in, truncation, the benign error codes, a session time
limit and fault knobs.

Contracts
---------
* Binds wherever :class:`FakeOpenAIConfig` says; the default host is ``127.0.0.1`` and port ``0``
  (ephemeral, read :attr:`FakeRealtimeServer.port` after :meth:`FakeRealtimeServer.start`).
* Every wait is bounded: handshake ``open_timeout`` 5 s, close handshake 2 s, server stop
  ``timeout`` (default 5 s), response pacing by the configured intervals.
* Per connection: exactly one reader coroutine (the ``websockets`` handler) and at most one
  response task at a time. No task and no log line per frame; audio deltas are built from a
  pre-encoded tone and a string template.
* Recording (``FakeSession.received`` / ``sent`` / ``errors_sent`` / ``truncations`` /
  ``responses``) is append-only and unbounded; set ``FakeOpenAIConfig.record = False`` to keep
  those lists empty (the per-connection :class:`FakeSession` object and its counters remain).
* The config object is read live: a test may change e.g. ``server.config.close_after_deltas``
  between sessions.
* All times in records are ``time.monotonic()`` seconds; all audio durations are milliseconds.

Choices where the spec is silent are marked ``[fake]`` in comments and docstrings.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import copy
import http
import json
import logging
import math
import secrets
import struct
import sys
import time
from dataclasses import dataclass, field, replace
from typing import Any, Awaitable, Callable
from urllib.parse import parse_qs, urlsplit

import msgspec
import numpy as np
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response
from websockets.protocol import State

__all__ = [
    "AZURE_PATH",
    "BETA_CLOSE_REASON",
    "FakeOpenAIConfig",
    "FakeRealtimeServer",
    "FakeResponse",
    "FakeSession",
    "OPENAI_PATH",
    "apply_session_update",
    "bytes_per_ms",
    "decode_audio",
    "default_session",
    "encode_audio",
    "main",
    "make_tone",
    "sample_rate",
]

log = logging.getLogger("voicebridge.sim.fake_openai")

OPENAI_PATH = "/v1/realtime"
AZURE_PATH = "/openai/v1/realtime"
MAX_SIZE_BYTES = 16 * 2**20
OPEN_TIMEOUT_S = 5.0
CLOSE_TIMEOUT_S = 2.0
BETA_CLOSE_CODE = 4000
BETA_CLOSE_REASON = (
    "The Realtime Beta API is no longer supported. Please use /v1/realtime for the GA API."
)
SESSION_EXPIRED_CLOSE_CODE = 1001
MIN_COMMIT_MS = 100
VAD_WINDOW_MS = 20
TONE_FREQ_HZ = 440.0
TONE_AMPLITUDE = 0.25  # of int16 full scale: clearly audible, no clipping
DEFAULT_INSTRUCTIONS = (
    "Your knowledge cutoff is 2023-10. You are a helpful, witty, and friendly AI. Act like a "
    "human, but remember that you aren't a human and that you can't do human things in the "
    "real world. Your voice and personality should be warm and engaging. Talk quickly. "
    "[fake OpenAI Realtime server default instructions]"
)
DEFAULT_REPLIES = [
    "Hello, how can I help you?",
    "Sure, I can help with that. Could you tell me a little more?",
    "Thanks. Is there anything else I can do for you today?",
]
DEFAULT_GREETING = "Hello, thanks for calling. How can I help you today?"
VOICES = ("alloy", "ash", "ballad", "coral", "echo", "sage", "shimmer", "verse", "marin", "cedar")
FUNCTION_CALL_MARKER = "@@"


# ----------------------------------------------------------------------------------------------
# Configuration and records
# ----------------------------------------------------------------------------------------------


@dataclass
class FakeOpenAIConfig:
    """Behaviour of a :class:`FakeRealtimeServer`. Times in ms unless the name says ``_s``.

    Fields read per session (at connect) or per event, so changing them on a running server
    affects later sessions/events.

    Reply scripting: ``replies`` are used per session in turn order (cycling). A reply may end
    with ``"@@name {json-args}"``: the text before the marker is spoken, then a
    ``function_call`` output item ``name`` with those arguments follows in the same response
    ``[fake]`` (e.g. ``"Goodbye! @@hang_up {}"``).
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
    close_after_deltas: int | None = None
    inject_errors: list[str] = field(default_factory=list)
    record: bool = True
    stamp_deltas: bool = False


@dataclass(eq=False)
class FakeResponse:
    """One response of a session, as the fake server ran it.

    ``status``: ``in_progress`` → ``completed`` | ``cancelled``. ``reason`` is the
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

    def sent_of(self, event_type: str) -> list[dict[str, Any]]:
        """Recorded server events of ``event_type``, in send order."""
        return [ev for _, ev in self.sent if ev.get("type") == event_type]

    def received_of(self, event_type: str) -> list[dict[str, Any]]:
        """Recorded client events of ``event_type``, in receive order."""
        return [ev for _, ev in self.received if ev.get("type") == event_type]


# ----------------------------------------------------------------------------------------------
# Audio helpers (pure)
# ----------------------------------------------------------------------------------------------


def _ulaw_table() -> np.ndarray:
    """G.711 μ-law code → int16 sample (256 entries)."""
    u = (~np.arange(256, dtype=np.int32)) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where((u & 0x80) != 0, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    """G.711 A-law code → int16 sample (256 entries)."""
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    return np.where((a & 0x80) != 0, magnitude, -magnitude).astype(np.int16)


_DECODE_TABLES: dict[str, np.ndarray] = {"audio/pcmu": _ulaw_table(), "audio/pcma": _alaw_table()}


def _encoder_tables(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(table, kind="stable")
    return order.astype(np.uint8), table[order].astype(np.int32)


_ENCODE_TABLES = {fmt: _encoder_tables(t) for fmt, t in _DECODE_TABLES.items()}


def sample_rate(fmt_type: str) -> int:
    """Sample rate in Hz of a GA format type (``audio/pcm`` 24000, ``audio/pcmu|pcma`` 8000)."""
    return 24000 if fmt_type == "audio/pcm" else 8000


def bytes_per_ms(fmt_type: str) -> int:
    """Wire bytes per millisecond: 48 for ``audio/pcm`` (24 kHz int16), 8 for G.711."""
    return 48 if fmt_type == "audio/pcm" else 8


def decode_audio(data: bytes, fmt_type: str) -> np.ndarray:
    """Decode wire bytes of ``fmt_type`` to int16 samples (PCM: little-endian, even length)."""
    if fmt_type == "audio/pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.int16, copy=False)
    return _DECODE_TABLES[fmt_type][np.frombuffer(data, dtype=np.uint8)]


def encode_audio(samples: np.ndarray, fmt_type: str) -> bytes:
    """Encode int16 samples to wire bytes of ``fmt_type`` (G.711: nearest code value)."""
    s = np.asarray(samples).astype(np.int32)
    if fmt_type == "audio/pcm":
        return np.clip(s, -32768, 32767).astype("<i2").tobytes()
    order, values = _ENCODE_TABLES[fmt_type]
    idx = np.clip(np.searchsorted(values, s), 1, len(values) - 1)
    lo = values[idx - 1]
    hi = values[idx]
    pick = np.where(s - lo <= hi - s, idx - 1, idx)
    return order[pick].tobytes()


def make_tone(
    ms: int, fmt_type: str, freq_hz: float = TONE_FREQ_HZ, amplitude: float = TONE_AMPLITUDE
) -> bytes:
    """``ms`` of a sine (phase 0 at start) encoded in ``fmt_type``; amplitude is a fraction of FS."""
    rate = sample_rate(fmt_type)
    n = rate * ms // 1000
    t = np.arange(n, dtype=np.float64) / rate
    samples = np.round(np.sin(2 * np.pi * freq_hz * t) * amplitude * 32767.0)
    return encode_audio(samples.astype(np.int16), fmt_type)


def _aligned_freq(chunk_ms: int) -> float:
    """A frequency near 440 Hz with a whole number of cycles per chunk (click-free joins)."""
    cycles = max(1, round(TONE_FREQ_HZ * chunk_ms / 1000))
    return cycles * 1000.0 / chunk_ms


_SQUARE_TABLES: dict[str, np.ndarray] = {
    fmt: table.astype(np.float64) ** 2 for fmt, table in _DECODE_TABLES.items()
}


def _window_mean_squares(buf: bytes, fmt_type: str, n: int, win: int) -> list[float]:
    """Mean square of each of the first ``n`` windows of ``win`` samples in ``buf``."""
    if fmt_type == "audio/pcm":
        x = np.frombuffer(buf, dtype="<i2", count=n * win).astype(np.float32)
        if n == 1:
            return [float(np.dot(x, x)) / win]
        rows = x.reshape(n, win)
        return (np.einsum("ij,ij->i", rows, rows) / win).tolist()
    sq = _SQUARE_TABLES[fmt_type].take(np.frombuffer(buf, dtype=np.uint8, count=n * win))
    if n == 1:
        return [float(sq.sum()) / win]
    return (sq.reshape(n, win).sum(axis=1) / win).tolist()


class _EnergyVad:
    """Energy VAD over 20 ms windows of wire audio. Pure state machine, no I/O.

    ``feed`` takes raw wire bytes (any length; a partial window is kept for the next call) and
    returns ``("started", audio_start_ms)`` / ``("stopped", audio_end_ms)`` events on the input
    timeline (ms of audio appended since the session started; prefix padding is subtracted
    from the start, the stop includes the trailing silence).
    """

    __slots__ = ("pos_ms", "tail", "speaking", "above_ms", "below_ms", "run_start_ms")

    def __init__(self) -> None:
        self.pos_ms = 0.0
        self.tail = b""
        self.speaking = False
        self.above_ms = 0
        self.below_ms = 0
        self.run_start_ms = 0.0

    def reset_state(self) -> None:
        """Forget speech state (after commit/clear); keep the timeline."""
        self.speaking = False
        self.above_ms = 0
        self.below_ms = 0

    def advance(self, ms: float) -> None:
        """Move the input timeline without analysing audio (VAD off)."""
        self.pos_ms += ms

    def feed(
        self,
        data: bytes,
        fmt_type: str,
        threshold_rms: float,
        min_speech_ms: int,
        silence_ms: int,
        prefix_ms: int,
    ) -> list[tuple[str, int]]:
        win = sample_rate(fmt_type) * VAD_WINDOW_MS // 1000
        win_bytes = bytes_per_ms(fmt_type) * VAD_WINDOW_MS
        if self.tail:
            data = self.tail + data
        n = len(data) // win_bytes
        self.tail = data[n * win_bytes :]
        if n == 0:
            return []
        thr_sq = threshold_rms * threshold_rms
        events: list[tuple[str, int]] = []
        for mean_sq in _window_mean_squares(data, fmt_type, n, win):
            loud = mean_sq >= thr_sq
            t0 = self.pos_ms
            self.pos_ms += VAD_WINDOW_MS
            if not self.speaking:
                if loud:
                    if self.above_ms == 0:
                        self.run_start_ms = t0
                    self.above_ms += VAD_WINDOW_MS
                    if self.above_ms >= min_speech_ms:
                        self.speaking = True
                        self.below_ms = 0
                        events.append(("started", int(max(0.0, self.run_start_ms - prefix_ms))))
                else:
                    self.above_ms = 0
            elif loud:
                self.below_ms = 0
            else:
                self.below_ms += VAD_WINDOW_MS
                if self.below_ms >= silence_ms:
                    self.speaking = False
                    self.above_ms = 0
                    events.append(("stopped", int(self.pos_ms)))
        return events


# ----------------------------------------------------------------------------------------------
# Client errors and session validation (pure)
# ----------------------------------------------------------------------------------------------


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


def _check_tools(tools: Any, path: str) -> None:
    _expect(tools, isinstance(tools, list), path, "an array")
    for i, tool in enumerate(tools):
        p = f"{path}[{i}]"
        _expect(tool, isinstance(tool, dict), p, "an object")
        kind = tool.get("type", "function")
        if kind == "function":
            _check_keys(tool, frozenset({"type", "name", "description", "parameters"}), p)
            if "name" not in tool:
                raise _missing(f"{p}.name")
            _expect(tool["name"], isinstance(tool["name"], str), f"{p}.name", "a string")
        elif kind != "mcp":
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
# Per-connection protocol handler
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
_MAX_ITEMS = 512  # items remembered per session for truncate/retrieve/previous_item_id
_json_decode = msgspec.json.Decoder().decode
_json_encode = msgspec.json.Encoder().encode


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(10)


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


class _Aborted(Exception):
    """The response task aborted the transport on purpose (``close_after_deltas``)."""


@dataclass(eq=False)
class _Item:
    role: str  # user | assistant | system | tool
    item: dict[str, Any]
    audio_ms: int = 0  # assistant: audio ms currently in the item (sent, minus truncation)
    truncated: bool = False
    response: FakeResponse | None = None


@dataclass(eq=False)
class _Run:
    """Control block of the one active response: cancellation and wake-up of its pacing."""

    rec: FakeResponse
    task: asyncio.Task[None] | None = None
    wake: asyncio.Future[None] | None = None
    cancel_reason: str | None = None
    inflight_left: int = 0

    def cancel(self, reason: str, inflight: int) -> None:
        """Ask the response to stop after at most ``inflight`` more deltas (idempotent)."""
        if self.cancel_reason is not None:
            return
        self.cancel_reason = reason
        self.rec.cancelled_at = time.monotonic()
        self.inflight_left = inflight if self.rec.deltas_sent > 0 else 0
        if self.wake is not None:
            _resolve(self.wake)


class _Conn:
    """Protocol state of one accepted connection. Owns the reader loop and the response task."""

    def __init__(self, server: FakeRealtimeServer, ws: ServerConnection, rec: FakeSession) -> None:
        self.server = server
        self.cfg = server.config
        self.ws = ws
        self.rec = rec
        self.record = self.cfg.record
        self.loop = asyncio.get_running_loop()
        self._event_prefix = "event_" + secrets.token_hex(4)
        self._event_n = 0
        self.conversation_id = _new_id("conv_")
        self.session = default_session(rec.id, rec.model)
        rec.session = self.session
        self.in_fmt = "audio/pcm"
        self.out_fmt = "audio/pcm"
        self.vad = _EnergyVad()
        self.buffered_bytes = 0
        self.pending_user_item: str | None = None
        self.items: dict[str, _Item] = {}
        self.last_item_id: str | None = None
        self.active: _Run | None = None
        self.reply_index = 0
        self.user_turns = 0
        self.updated_once = False
        self.audio_output_started = False
        self.requests_remaining = 5000
        self.tokens_remaining = 400000
        self.expire_handle: asyncio.TimerHandle | None = None
        self.expire_task: asyncio.Task[None] | None = None
        self.handlers: dict[str, Callable[[dict[str, Any], str | None], Awaitable[None]]] = {
            "session.update": self._on_session_update,
            "input_audio_buffer.append": self._on_append,
            "input_audio_buffer.commit": self._on_commit,
            "input_audio_buffer.clear": self._on_clear,
            "conversation.item.create": self._on_item_create,
            "conversation.item.truncate": self._on_truncate,
            "conversation.item.delete": self._on_item_delete,
            "conversation.item.retrieve": self._on_item_retrieve,
            "response.create": self._on_response_create,
            "response.cancel": self._on_response_cancel,
            "output_audio_buffer.clear": self._on_output_clear,
        }

    # -- sending --------------------------------------------------------------------------

    def _eid(self) -> str:
        self._event_n += 1
        return f"{self._event_prefix}{self._event_n:06x}"

    async def send(self, type_: str, *, injected: bool = False, **fields: Any) -> dict[str, Any]:
        """Send one server event (not an audio delta); records it when recording is on.

        ``error`` events are also appended to ``errors_sent``; an ``injected`` one (fault knob)
        is recorded there as a copy carrying ``"injected": True`` (never sent on the wire).
        """
        event = {"type": type_, "event_id": self._eid(), **fields}
        if self.record:
            self.rec.sent.append((time.monotonic(), event))
            if type_ == "error":
                self.rec.errors_sent.append(dict(event, injected=True) if injected else event)
        await self.ws.send(_json_encode(event), text=True)
        return event

    async def send_error(
        self,
        code: str | None,
        message: str,
        param: str | None = None,
        event_id: str | None = None,
        err_type: str = "invalid_request_error",
        injected: bool = False,
    ) -> None:
        await self.send(
            "error",
            injected=injected,
            error={
                "type": err_type,
                "code": code,
                "message": message,
                "param": param,
                "event_id": event_id,
            },
        )

    # -- lifecycle ------------------------------------------------------------------------

    async def run(self) -> None:
        """Serve the connection until it closes. Never raises for connection errors."""
        ws, rec = self.ws, self.rec
        try:
            if "openai-beta" in rec.headers:
                rec.beta_rejected = True
                await ws.close(BETA_CLOSE_CODE, BETA_CLOSE_REASON)
                return
            intent = rec.query.get("intent")
            if intent is not None and intent != "realtime":
                # [fake] only speech-to-speech sessions are simulated; transcription is refused too.
                await self.send_error("invalid_intent", f"Invalid intent: '{intent}'.", "intent")
                await ws.close(4000, "invalid_request_error.invalid_intent")
                return
            await self.send("session.created", session=self.session)
            limit = self.cfg.session_limit_s
            if limit is not None:
                self.expire_handle = self.loop.call_later(limit, self._start_expire, limit)
            async for message in ws:
                try:
                    await self._on_message(message)
                except ConnectionClosed:
                    raise
                except Exception:  # a bug in the fake must not kill the session silently
                    log.exception("fake_openai: handler failed in session %s", rec.id)
                    await self.send_error(
                        None, "The server had an error while processing your request.",
                        err_type="server_error",
                    )
        except ConnectionClosed:
            pass
        finally:
            await self._cleanup()

    async def _cleanup(self) -> None:
        if self.expire_handle is not None:
            self.expire_handle.cancel()
        run = self.active
        if run is not None and run.task is not None and not run.task.done():
            run.task.cancel()
            await asyncio.wait({run.task}, timeout=CLOSE_TIMEOUT_S)
        if self.expire_task is not None and not self.expire_task.done():
            await asyncio.wait({self.expire_task}, timeout=CLOSE_TIMEOUT_S + 1)
        if self.ws.state is not State.CLOSED:
            try:
                async with asyncio.timeout(CLOSE_TIMEOUT_S + 1):
                    await self.ws.close()
            except (TimeoutError, ConnectionClosed):
                self.ws.transport.abort()
        self.items.clear()

    def _start_expire(self, limit_s: float) -> None:
        self.expire_task = self.loop.create_task(self._expire(limit_s))

    async def _expire(self, limit_s: float) -> None:
        minutes = limit_s / 60.0
        text = f"{minutes:g}" if minutes != int(minutes) else str(int(minutes))
        message = f"Your session hit the maximum duration of {text} minutes."
        try:
            await self.send_error("session_expired", message)
            await self.ws.close(SESSION_EXPIRED_CLOSE_CODE, message)
        except ConnectionClosed:
            pass

    # -- dispatch -------------------------------------------------------------------------

    async def _on_message(self, message: str | bytes) -> None:
        if isinstance(message, bytes):
            # [fake] behaviour of the live API for binary frames is undocumented.
            await self.send_error(
                "invalid_event",
                "Binary WebSocket frames are not supported; send each event as a JSON text frame.",
            )
            return
        try:
            event = _json_decode(message)
        except msgspec.DecodeError as exc:
            # [fake] "invalid_json" is an invented code: the live API's answer is undocumented.
            await self.send_error("invalid_json", f"The event is not valid JSON: {exc}.")
            return
        if not isinstance(event, dict):
            await self.send_error("invalid_event", "The event must be a JSON object.")
            return
        if self.record:
            self.rec.received.append((time.monotonic(), event))
        eid = event.get("event_id")
        event_id = eid if isinstance(eid, str) else None
        try:
            etype = event.get("type")
            if etype is None:
                raise _ClientError("invalid_event", "The 'type' field is missing.", "type")
            handler = self.handlers.get(etype) if isinstance(etype, str) else None
            if handler is None:
                raise _ClientError("invalid_event", f"Invalid event type: '{etype}'.", "type")
            allowed = _CLIENT_EVENT_KEYS[etype]
            for key in event:
                if key not in _ENVELOPE_KEYS and key not in allowed:
                    raise _ClientError("unknown_parameter", f"Unknown parameter: '{key}'.", key)
            await handler(event, event_id)
        except _ClientError as err:
            await self.send_error(err.code, err.message, err.param, event_id, err.err_type)

    # -- session --------------------------------------------------------------------------

    async def _on_session_update(self, event: dict[str, Any], event_id: str | None) -> None:
        if "session" not in event:
            raise _missing("session")
        new = apply_session_update(self.session, event["session"])
        if self.audio_output_started and new["audio"]["output"]["voice"] != self.session["audio"]["output"]["voice"]:
            raise _ClientError(
                "cannot_update_voice",
                "Cannot update a conversation's voice if assistant audio is present.",
                "session.audio.output.voice",
            )
        new_in = new["audio"]["input"]["format"]["type"]
        if new_in != self.in_fmt:
            self.vad.tail = b""
            self.buffered_bytes = 0
        self.in_fmt = new_in
        self.out_fmt = new["audio"]["output"]["format"]["type"]
        if new["audio"]["input"]["turn_detection"] is None:
            self.vad.reset_state()
        self.session = new
        self.rec.session = new
        await self.send("session.updated", session=new)
        if not self.updated_once:
            self.updated_once = True
            for code in list(self.cfg.inject_errors):
                if code == "server_error":
                    await self.send_error(
                        "server_error",
                        "The server had an error while processing your request. Sorry about that!",
                        err_type="server_error",
                        injected=True,
                    )
                else:
                    await self.send_error(code, f"Injected error '{code}' (fake server fault knob).",
                                          injected=True)

    # -- input audio ----------------------------------------------------------------------

    def _turn_detection(self) -> dict[str, Any] | None:
        return self.session["audio"]["input"]["turn_detection"]

    async def _on_append(self, event: dict[str, Any], event_id: str | None) -> None:
        if "audio" not in event:
            raise _missing("audio")
        audio = event["audio"]
        _expect(audio, isinstance(audio, str), "audio", "a string")
        try:
            data = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise _ClientError(
                "invalid_value", "Invalid 'audio'. Expected base64-encoded audio bytes.", "audio"
            ) from None
        if not data:
            return
        self.buffered_bytes += len(data)
        td = self._turn_detection()
        fmt = self.in_fmt
        if td is None:
            self.vad.advance(len(data) / bytes_per_ms(fmt))
            return
        # [fake] turn_detection.threshold scales the configured RMS (0.5 = vad_threshold_rms).
        threshold = float(td.get("threshold", 0.5))
        events = self.vad.feed(
            data,
            fmt,
            self.cfg.vad_threshold_rms * threshold / 0.5,
            self.cfg.vad_min_speech_ms,
            int(td.get("silence_duration_ms", 500)),
            int(td.get("prefix_padding_ms", 300)),
        )
        for kind, at_ms in events:
            if kind == "started":
                await self._speech_started(at_ms, td)
            else:
                await self._speech_stopped(at_ms, td)

    async def _speech_started(self, at_ms: int, td: dict[str, Any]) -> None:
        item_id = _new_id("item_")
        self.pending_user_item = item_id
        await self.send("input_audio_buffer.speech_started", audio_start_ms=at_ms, item_id=item_id)
        run = self.active
        if run is not None and td.get("interrupt_response", True):
            run.cancel("turn_detected", self.cfg.inflight_after_cancel)

    async def _speech_stopped(self, at_ms: int, td: dict[str, Any]) -> None:
        item_id = self.pending_user_item or _new_id("item_")
        self.pending_user_item = None
        await self.send("input_audio_buffer.speech_stopped", audio_end_ms=at_ms, item_id=item_id)
        await self._commit(item_id)
        # [fake] when a response is still active at speech stop, no second one is started.
        if td.get("create_response", True) and self.active is None:
            self._start_response("vad", None)

    async def _commit(self, item_id: str) -> None:
        """Turn the buffer into a user item: committed, conversation.item.added/done."""
        self.buffered_bytes = 0
        self.user_turns += 1
        previous = self.last_item_id
        await self.send("input_audio_buffer.committed", previous_item_id=previous, item_id=item_id)
        item = {
            "id": item_id,
            "object": "realtime.item",
            "type": "message",
            "status": "completed",
            "role": "user",
            "content": [{"type": "input_audio", "transcript": None}],
        }
        self._remember(item_id, _Item("user", item))
        await self.send("conversation.item.added", previous_item_id=previous, item=item)
        await self.send("conversation.item.done", previous_item_id=previous, item=item)

    async def _on_commit(self, event: dict[str, Any], event_id: str | None) -> None:
        ms = self.buffered_bytes / bytes_per_ms(self.in_fmt)
        if ms < MIN_COMMIT_MS:
            raise _ClientError(
                "input_audio_buffer_commit_empty",
                "Error committing input audio buffer: buffer too small. Expected at least "
                f"{MIN_COMMIT_MS}ms of audio, but buffer only has {ms:.2f}ms of audio.",
            )
        item_id = self.pending_user_item or _new_id("item_")
        self.pending_user_item = None
        self.vad.reset_state()
        await self._commit(item_id)

    async def _on_clear(self, event: dict[str, Any], event_id: str | None) -> None:
        self.buffered_bytes = 0
        self.pending_user_item = None
        self.vad.reset_state()
        await self.send("input_audio_buffer.cleared")

    async def _on_output_clear(self, event: dict[str, Any], event_id: str | None) -> None:
        raise _ClientError(
            "invalid_event",
            "output_audio_buffer.clear is only supported for WebRTC and SIP sessions.",
            "type",
        )

    # -- conversation items ---------------------------------------------------------------

    def _remember(self, item_id: str, item: _Item) -> None:
        self.items[item_id] = item
        self.last_item_id = item_id
        if len(self.items) > _MAX_ITEMS:
            del self.items[next(iter(self.items))]

    async def _on_item_create(self, event: dict[str, Any], event_id: str | None) -> None:
        if "item" not in event:
            raise _missing("item")
        item = event["item"]
        _expect(item, isinstance(item, dict), "item", "an object")
        previous = event.get("previous_item_id", self.last_item_id)
        if previous is not None and previous != "root" and previous not in self.items:
            raise _ClientError(
                "invalid_value",
                f"Previous item with id '{previous}' not found.",
                "previous_item_id",
            )
        kind = item.get("type")
        if kind == "message":
            role = item.get("role")
            allowed_parts = {
                "user": ("input_text", "input_audio"),
                "system": ("input_text",),
                "assistant": ("output_text",),
            }.get(role)  # type: ignore[arg-type]
            if allowed_parts is None:
                raise _invalid_value("item.role", role, ("user", "system", "assistant"))
            content = item.get("content")
            if "content" not in item:
                raise _missing("item.content")
            _expect(content, isinstance(content, list), "item.content", "an array")
            for i, part in enumerate(content):
                p = f"item.content[{i}]"
                _expect(part, isinstance(part, dict), p, "an object")
                if part.get("type") not in allowed_parts:
                    raise _invalid_value(f"{p}.type", part.get("type"), allowed_parts)
        elif kind == "function_call_output":
            role = "tool"
            for key in ("call_id", "output"):
                if key not in item:
                    raise _missing(f"item.{key}")
                _expect(item[key], isinstance(item[key], str), f"item.{key}", "a string")
        elif kind == "function_call":
            role = "assistant"
            for key in ("call_id", "name", "arguments"):
                if key not in item:
                    raise _missing(f"item.{key}")
        else:
            raise _invalid_value(
                "item.type", kind, ("message", "function_call", "function_call_output")
            )
        out = dict(item)
        item_id = out.get("id") if isinstance(out.get("id"), str) else _new_id("item_")
        out["id"] = item_id
        out["object"] = "realtime.item"
        out["status"] = "completed"
        self._remember(item_id, _Item(role, out))
        await self.send("conversation.item.added", previous_item_id=previous, item=out)
        await self.send("conversation.item.done", previous_item_id=previous, item=out)

    def _known_item(self, event: dict[str, Any]) -> tuple[str, _Item]:
        if "item_id" not in event:
            raise _missing("item_id")
        item_id = event["item_id"]
        _expect(item_id, isinstance(item_id, str), "item_id", "a string")
        found = self.items.get(item_id)
        if found is None:
            raise _ClientError(
                "invalid_value", f"Conversation item with item_id '{item_id}' not found.", "item_id"
            )
        return item_id, found

    async def _on_truncate(self, event: dict[str, Any], event_id: str | None) -> None:
        for key in ("content_index", "audio_end_ms"):
            if key not in event:
                raise _missing(key)
            _expect(event[key], _is_int(event[key]), key, "an integer")
        item_id, item = self._known_item(event)
        content_index, end_ms = event["content_index"], event["audio_end_ms"]
        if item.role != "assistant" or item.response is None:
            raise _ClientError(
                "invalid_value", "Only assistant messages with audio can be truncated.", "item_id"
            )
        if content_index != 0:
            raise _invalid_value("content_index", content_index, (0,))
        if end_ms < 0:
            raise _invalid_value("audio_end_ms", end_ms)
        if end_ms > item.audio_ms:
            raise _ClientError(
                "invalid_value",
                f"Audio content of {item.audio_ms}ms is already shorter than {end_ms}ms",
                "audio_end_ms",
            )
        resp = item.response
        if self.record:
            self.rec.truncations.append(
                {
                    "at": time.monotonic(),
                    "item_id": item_id,
                    "content_index": content_index,
                    "audio_end_ms": end_ms,
                    "item_audio_ms": resp.audio_ms_sent,
                    "response_id": resp.id,
                    "response_status": resp.status,
                }
            )
        item.audio_ms = end_ms
        item.truncated = True
        await self.send(
            "conversation.item.truncated",
            item_id=item_id,
            content_index=content_index,
            audio_end_ms=end_ms,
        )

    async def _on_item_delete(self, event: dict[str, Any], event_id: str | None) -> None:
        item_id, _ = self._known_item(event)
        del self.items[item_id]
        await self.send("conversation.item.deleted", item_id=item_id)

    async def _on_item_retrieve(self, event: dict[str, Any], event_id: str | None) -> None:
        _, item = self._known_item(event)
        await self.send("conversation.item.retrieved", item=item.item)

    # -- responses ------------------------------------------------------------------------

    async def _on_response_create(self, event: dict[str, Any], event_id: str | None) -> None:
        params = event.get("response")
        instructions: str | None = None
        if params is not None:
            _expect(params, isinstance(params, dict), "response", "an object")
            _check_keys(params, _RESPONSE_KEYS, "response")
            for key, val in params.items():
                if key in ("instructions", "tools", "tool_choice", "output_modalities",
                           "max_output_tokens", "prompt"):
                    _check_common(key, val, "response")
                elif key == "conversation" and val not in ("auto", "none"):
                    raise _invalid_value("response.conversation", val, ("auto", "none"))
            instructions = params.get("instructions")
        if self.active is not None:
            raise _ClientError(
                "conversation_already_has_active_response",
                f"Conversation already has an active response in progress: {self.active.rec.id}. "
                "Wait until the response is finished before creating a new one.",
            )
        self._start_response("response.create", instructions, params)

    async def _on_response_cancel(self, event: dict[str, Any], event_id: str | None) -> None:
        run = self.active
        wanted = event.get("response_id")
        if run is None or (wanted is not None and wanted != run.rec.id):
            raise _ClientError(
                "response_cancel_not_active", "Cancellation failed: no active response found"
            )
        run.cancel("client_cancelled", self.cfg.inflight_after_cancel)

    def _plan(self, trigger: str) -> tuple[str, int]:
        """Text and audio ms of the next scripted answer."""
        cfg = self.cfg
        if trigger == "response.create" and self.user_turns == 0:
            return cfg.greeting_text, cfg.greeting_ms
        replies = cfg.replies or DEFAULT_REPLIES
        i = self.reply_index % len(replies)
        self.reply_index += 1
        text = replies[i]
        if cfg.reply_ms:
            ms = cfg.reply_ms[i % len(cfg.reply_ms)]
        else:
            spoken = text.split(FUNCTION_CALL_MARKER, 1)[0].strip()
            ms = min(4000, max(800, 60 * len(spoken)))
        return text, ms

    def _start_response(
        self, trigger: str, instructions: str | None, params: dict[str, Any] | None = None
    ) -> None:
        text, ms = self._plan(trigger)
        spoken, call = text, None
        if FUNCTION_CALL_MARKER in text:
            spoken, _, call_text = text.partition(FUNCTION_CALL_MARKER)
            spoken = spoken.strip()
            name, _, args = call_text.strip().partition(" ")
            call = (name, args.strip() or "{}")
        rec = FakeResponse(
            id=_new_id("resp_"),
            item_id=_new_id("item_") if spoken else None,
            trigger=trigger,
            text=spoken,
            planned_audio_ms=ms if spoken else 0,
            scheduled_at=time.monotonic(),
            instructions=instructions,
            function_call=call,
        )
        if self.record:
            self.rec.responses.append(rec)
        run = _Run(rec)
        self.active = run
        run.task = self.loop.create_task(self._run_response(run, params or {}))

    async def _pause(self, run: _Run, seconds: float) -> None:
        """Sleep ``seconds`` unless the response is cancelled meanwhile (wakes at once)."""
        if seconds <= 0 or run.cancel_reason is not None:
            return
        fut: asyncio.Future[None] = self.loop.create_future()
        handle = self.loop.call_later(seconds, _resolve, fut)
        run.wake = fut
        try:
            await fut
        finally:
            handle.cancel()
            run.wake = None

    def _delta_audio(self, ms: int) -> tuple[str, str]:
        """(base64 of ``ms`` tone, base64 of the tone minus its first 12 bytes) for out_fmt."""
        return self.server._tone_b64(self.out_fmt, ms, self.cfg.delta_audio_ms)

    async def _run_response(self, run: _Run, params: dict[str, Any]) -> None:
        try:
            await self._stream_response(run, params)
        except (ConnectionClosed, asyncio.CancelledError, _Aborted):
            pass
        except Exception:
            log.exception("fake_openai: response task failed in session %s", self.rec.id)
        finally:
            if self.active is run:
                self.active = None

    def _response_obj(self, run: _Run, status: str, output: list[dict[str, Any]],
                      modalities: list[str], params: dict[str, Any]) -> dict[str, Any]:
        details: dict[str, Any] | None = None
        if status == "cancelled":
            details = {"type": "cancelled", "reason": run.cancel_reason}
        return {
            "object": "realtime.response",
            "id": run.rec.id,
            "status": status,
            "status_details": details,
            "output": output,
            "conversation_id": self.conversation_id,
            "output_modalities": modalities,
            "max_output_tokens": params.get("max_output_tokens", "inf"),
            "audio": {"output": {"format": self.session["audio"]["output"]["format"],
                                 "voice": self.session["audio"]["output"]["voice"]}},
            "usage": None,
            "metadata": params.get("metadata"),
        }

    async def _stream_response(self, run: _Run, params: dict[str, Any]) -> None:
        """The §2.4 script. Sends nothing after the connection task cancels it."""
        cfg, rec = self.cfg, run.rec
        modalities = params.get("output_modalities") or self.session["output_modalities"]
        text_only = modalities == ["text"]
        await self._pause(run, cfg.think_ms / 1000.0)
        rec.created_at = time.monotonic()
        await self.send("response.created",
                        response=self._response_obj(run, "in_progress", [], modalities, params))
        self.requests_remaining -= 1
        self.tokens_remaining -= 4096
        await self.send(
            "rate_limits.updated",
            rate_limits=[
                {"name": "requests", "limit": 5000, "remaining": self.requests_remaining,
                 "reset_seconds": 0.012},
                {"name": "tokens", "limit": 400000, "remaining": self.tokens_remaining,
                 "reset_seconds": 0.58},
            ],
        )
        output: list[dict[str, Any]] = []
        if rec.item_id is not None and run.cancel_reason is None:
            output.append(await self._stream_message(run, text_only))
        if rec.function_call is not None and run.cancel_reason is None:
            output.append(await self._emit_function_call(run, len(output)))
        status = "cancelled" if run.cancel_reason is not None else "completed"
        rec.status = status
        rec.reason = run.cancel_reason
        rec.done_at = time.monotonic()
        response = self._response_obj(run, status, output, modalities, params)
        words = len(rec.transcript_sent.split())
        audio_tokens = rec.audio_ms_sent // 50
        response["usage"] = {
            "total_tokens": 120 + 40 * self.user_turns + words + audio_tokens,
            "input_tokens": 120 + 40 * self.user_turns,
            "output_tokens": words + audio_tokens,
            "input_token_details": {"text_tokens": 120, "audio_tokens": 40 * self.user_turns,
                                    "image_tokens": 0, "cached_tokens": 0},
            "output_token_details": {"text_tokens": words, "audio_tokens": audio_tokens},
        }
        if self.active is run:
            self.active = None
        await self.send("response.done", response=response)

    async def _stream_message(self, run: _Run, text_only: bool) -> dict[str, Any]:
        """Assistant message item with audio (or text) deltas; returns the final item."""
        cfg, rec = self.cfg, run.rec
        item_id = rec.item_id
        assert item_id is not None
        ids = {"response_id": rec.id, "item_id": item_id, "output_index": 0, "content_index": 0}
        item = {"id": item_id, "object": "realtime.item", "type": "message",
                "status": "in_progress", "role": "assistant", "content": []}
        entry = _Item("assistant", item, response=None if text_only else rec)
        previous = self.last_item_id
        self._remember(item_id, entry)
        await self.send("response.output_item.added", response_id=rec.id, output_index=0, item=item)
        await self.send("conversation.item.added", previous_item_id=previous, item=item)
        await self.send("response.content_part.added", **ids,
                        part={"type": "text", "text": ""} if text_only
                        else {"type": "audio", "transcript": ""})
        delta_ms = max(1, int(cfg.delta_audio_ms))
        total_ms = max(delta_ms if text_only else 1, rec.planned_audio_ms)
        n = max(1, math.ceil(total_ms / delta_ms))
        words = rec.text.split()
        said = 0
        head = ('{"type":"response.output_audio.delta","event_id":"')
        mid = (f'","response_id":"{rec.id}","item_id":"{item_id}",'
               '"output_index":0,"content_index":0,"delta":"')
        await self._pause(run, cfg.first_delta_delay_ms / 1000.0)
        interval = cfg.delta_interval_ms / 1000.0
        ws = self.ws
        for i in range(n):
            if run.cancel_reason is not None:
                if run.inflight_left <= 0:
                    break
                run.inflight_left -= 1
            chunk_ms = delta_ms if i < n - 1 else total_ms - delta_ms * (n - 1)
            if not text_only:
                full, rest = self._delta_audio(chunk_ms)
                if cfg.stamp_deltas and len(rest) != len(full):
                    stamp = struct.pack(">IQ", self.rec.deltas_sent, time.monotonic_ns())
                    full = base64.b64encode(stamp).decode() + rest
                if rec.first_delta_at is None:
                    rec.first_delta_at = time.monotonic()
                self.audio_output_started = True
                await ws.send(head + self._eid() + mid + full + '"}')
                rec.deltas_sent += 1
                rec.audio_ms_sent += chunk_ms
                self.rec.deltas_sent += 1
                if not entry.truncated:
                    entry.audio_ms += chunk_ms
                limit = cfg.close_after_deltas
                if limit is not None and self.rec.deltas_sent >= limit:
                    self.rec.aborted = True
                    ws.transport.abort()  # fault knob: no close frame, the peer sees 1006
                    raise _Aborted
            target = math.ceil((i + 1) * len(words) / n)
            if target > said:
                piece = (" " if said else "") + " ".join(words[said:target])
                said = target
                rec.transcript_sent += piece
                if text_only:
                    await self.send("response.output_text.delta", **ids, delta=piece)
                else:
                    await self.send("response.output_audio_transcript.delta", **ids, delta=piece)
            if i < n - 1:
                await self._pause(run, interval)
        done_text = rec.transcript_sent
        if text_only:
            await self.send("response.output_text.done", **ids, text=done_text)
            part = {"type": "text", "text": done_text}
            content = [{"type": "output_text", "text": done_text}]
        else:
            await self.send("response.output_audio.done", **ids)
            await self.send("response.output_audio_transcript.done", **ids, transcript=done_text)
            part = {"type": "audio", "transcript": done_text}
            content = [{"type": "output_audio", "transcript": done_text}]
        await self.send("response.content_part.done", **ids, part=part)
        final = dict(item)
        final["status"] = "incomplete" if run.cancel_reason is not None else "completed"
        final["content"] = content
        entry.item = final
        await self.send("response.output_item.done", response_id=rec.id, output_index=0, item=final)
        await self.send("conversation.item.done", previous_item_id=previous, item=final)
        return final

    async def _emit_function_call(self, run: _Run, output_index: int) -> dict[str, Any]:
        """[fake] A scripted function_call output item (see ``FakeOpenAIConfig`` docstring)."""
        rec = run.rec
        assert rec.function_call is not None
        name, args = rec.function_call
        item_id, call_id = _new_id("item_"), _new_id("call_")
        item = {"id": item_id, "object": "realtime.item", "type": "function_call",
                "status": "in_progress", "name": name, "call_id": call_id, "arguments": ""}
        previous = self.last_item_id
        entry = _Item("assistant", item)
        self._remember(item_id, entry)
        await self.send("response.output_item.added", response_id=rec.id,
                        output_index=output_index, item=item)
        await self.send("conversation.item.added", previous_item_id=previous, item=item)
        ids = {"response_id": rec.id, "item_id": item_id, "output_index": output_index,
               "call_id": call_id}
        await self.send("response.function_call_arguments.delta", **ids, delta=args)
        await self.send("response.function_call_arguments.done", **ids, name=name, arguments=args)
        final = dict(item, status="completed", arguments=args)
        entry.item = final
        await self.send("response.output_item.done", response_id=rec.id,
                        output_index=output_index, item=final)
        await self.send("conversation.item.done", previous_item_id=previous, item=final)
        return final


# ----------------------------------------------------------------------------------------------
# Server
# ----------------------------------------------------------------------------------------------


class FakeRealtimeServer:
    """A fake OpenAI Realtime GA WebSocket server on ``config.host:config.port``.

    Use ``async with FakeRealtimeServer(think_ms=10) as srv:`` or ``await srv.start()`` /
    ``await srv.stop()``. Keyword overrides are applied on top of ``config``.

    Recording attributes: ``sessions`` (one :class:`FakeSession` per accepted connection, in
    accept order, kept even with ``record=False``) and ``rejected_handshakes``
    (``(http_status, reason)`` per refused handshake).
    """

    def __init__(self, config: FakeOpenAIConfig | None = None, **overrides: Any) -> None:
        base = config if config is not None else FakeOpenAIConfig()
        self.config: FakeOpenAIConfig = replace(base, **overrides) if overrides else base
        self.sessions: list[FakeSession] = []
        self.rejected_handshakes: list[tuple[int, str]] = []
        self._server: Server | None = None
        self._port: int | None = None
        self._open = 0
        self._all_closed = asyncio.Event()
        self._all_closed.set()
        self._tones: dict[tuple[str, int, int], tuple[str, str]] = {}

    # -- lifecycle ------------------------------------------------------------------------

    async def start(self) -> FakeRealtimeServer:
        """Bind and start accepting. Returns ``self``. Idempotent."""
        if self._server is not None:
            return self
        self._server = await serve(
            self._handler,
            self.config.host,
            self.config.port,
            process_request=self._process_request,
            compression=None,
            max_size=MAX_SIZE_BYTES,
            open_timeout=OPEN_TIMEOUT_S,
            close_timeout=CLOSE_TIMEOUT_S,
            logger=logging.getLogger("voicebridge.sim.fake_openai.websockets"),
        )
        self._port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self, timeout: float = 5.0) -> None:
        """Close all connections (1001) and stop listening, within ``timeout`` seconds."""
        server = self._server
        if server is None:
            return
        server.close()
        try:
            async with asyncio.timeout(timeout):
                await server.wait_closed()
        except TimeoutError:
            for conn in list(server.connections):
                conn.transport.abort()
        self._server = None

    async def __aenter__(self) -> FakeRealtimeServer:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    # -- addresses ------------------------------------------------------------------------

    @property
    def port(self) -> int:
        """The bound TCP port (valid after :meth:`start`)."""
        if self._port is None:
            raise RuntimeError("FakeRealtimeServer is not started")
        return self._port

    @property
    def url(self) -> str:
        """OpenAI-form URL, e.g. ``ws://127.0.0.1:PORT/v1/realtime?model=gpt-realtime``."""
        return f"ws://{self.config.host}:{self.port}{OPENAI_PATH}?model={self.config.model}"

    @property
    def azure_url(self) -> str:
        """Azure GA-form URL: ``ws://127.0.0.1:PORT/openai/v1/realtime?model=gpt-realtime``."""
        return f"ws://{self.config.host}:{self.port}{AZURE_PATH}?model={self.config.model}"

    # -- observation ----------------------------------------------------------------------

    def open_sessions(self) -> int:
        """Number of accepted connections whose handler has not finished yet."""
        return self._open

    async def wait_closed_all(self, timeout: float) -> bool:
        """Wait until no session is open; ``True`` if that happened within ``timeout`` s."""
        try:
            async with asyncio.timeout(timeout):
                await self._all_closed.wait()
        except TimeoutError:
            return False
        return True

    async def wait_sessions(self, count: int, timeout: float) -> bool:
        """Wait until at least ``count`` sessions were accepted; ``True`` if within ``timeout``."""
        deadline = time.monotonic() + timeout
        while len(self.sessions) < count:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    # -- internals ------------------------------------------------------------------------

    def _tone_b64(self, fmt: str, ms: int, base_ms: int) -> tuple[str, str]:
        key = (fmt, ms, base_ms)
        cached = self._tones.get(key)
        if cached is None:
            raw = make_tone(ms, fmt, freq_hz=_aligned_freq(base_ms))
            full = base64.b64encode(raw).decode()
            rest = base64.b64encode(raw[12:]).decode() if len(raw) > 12 else full
            cached = self._tones[key] = (full, rest)
        return cached

    def _reject(self, status: int, reason: str, message: str, code: str | None) -> Response:
        self.rejected_handshakes.append((status, reason))
        body = _json_encode(
            {"error": {"message": message, "type": "invalid_request_error", "code": code,
                       "param": None}}
        )
        try:
            phrase = http.HTTPStatus(status).phrase
        except ValueError:
            phrase = "Error"
        headers = Headers(
            [("Content-Type", "application/json"), ("Content-Length", str(len(body))),
             ("Connection", "close")]
        )
        return Response(status, phrase, headers, body)

    def _process_request(self, conn: ServerConnection, request: Request) -> Response | None:
        cfg = self.config
        if cfg.refuse is not None:
            return self._reject(cfg.refuse, "refused", "Refused by the fake server (fault knob).",
                                "refused")
        parts = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        if parts.path not in (OPENAI_PATH, AZURE_PATH):
            return self._reject(404, "not_found", f"Invalid URL (GET {parts.path})", None)
        azure = parts.path == AZURE_PATH
        if azure and "api-version" in query:
            return self._reject(401, "api_version_not_allowed",
                                "The GA endpoint /openai/v1/realtime does not take an api-version.",
                                "invalid_api_version")
        key: str | None = None
        auth = request.headers.get("Authorization")
        if auth is not None and auth[:7].lower() == "bearer ":
            key = auth[7:].strip() or None
        if key is None and azure:
            key = request.headers.get("api-key") or query.get("api-key") or None
        if key is None:
            return self._reject(401, "missing_api_key",
                                "You didn't provide an API key. Provide it in an Authorization "
                                "header using Bearer auth (Authorization: Bearer YOUR_KEY).", None)
        if cfg.api_key is not None and key != cfg.api_key:
            return self._reject(401, "invalid_api_key",
                                f"Incorrect API key provided: {key[:3]}***{key[-2:]}.",
                                "invalid_api_key")
        return None

    async def _handler(self, ws: ServerConnection) -> None:
        request = ws.request
        assert request is not None
        parts = urlsplit(request.path)
        query = {k: v[-1] for k, v in parse_qs(parts.query, keep_blank_values=True).items()}
        rec = FakeSession(
            id=_new_id("sess_"),
            model=query.get("model") or query.get("deployment") or "gpt-realtime",
            path=parts.path,
            query=query,
            headers=request.headers.copy(),
            opened_at=time.monotonic(),
            azure=parts.path == AZURE_PATH,
        )
        self.sessions.append(rec)
        self._open += 1
        self._all_closed.clear()
        log.info("session %s open model=%s path=%s peer=%s", rec.id, rec.model, rec.path,
                 ws.remote_address)
        try:
            await _Conn(self, ws, rec).run()
        finally:
            rec.closed_at = time.monotonic()
            rec.close_code = ws.close_code
            rec.close_reason = ws.close_reason
            self._open -= 1
            if self._open == 0:
                self._all_closed.set()
            log.info(
                "session %s closed code=%s deltas=%d responses=%d duration_s=%.1f",
                rec.id, rec.close_code, rec.deltas_sent, len(rec.responses),
                rec.closed_at - rec.opened_at,
            )


# ----------------------------------------------------------------------------------------------
# CLI
# ----------------------------------------------------------------------------------------------


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m voicebridge.sim.fake_openai",
        description="Fake OpenAI Realtime GA server (for tests, demos and benchmarks). "
        "Runs until Ctrl-C; prints one line per session start/end.",
    )
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9099, help="TCP port (default 9099)")
    p.add_argument("--api-key", default=None, help="required bearer key (default: any non-empty)")
    p.add_argument("--think-ms", type=float, default=150.0, help="commit -> response.created")
    p.add_argument("--first-delta-delay-ms", type=float, default=0.0,
                   help="extra delay before the first audio delta of each response")
    p.add_argument("--delta-interval-ms", type=float, default=20.0, help="wall time between deltas")
    p.add_argument("--session-limit-s", type=float, default=None,
                   help="send session_expired and close 1001 after this many seconds")
    p.add_argument("--refuse", type=int, default=None, metavar="HTTP_STATUS",
                   help="reject every handshake with this HTTP status")
    p.add_argument("--close-after-deltas", type=int, default=None, metavar="N",
                   help="abort the TCP connection (no close frame) after N audio deltas")
    p.add_argument("--record", action="store_true",
                   help="keep per-event records in memory (off by default for long runs)")
    return p.parse_args(argv)


async def _serve_until_stopped(cfg: FakeOpenAIConfig) -> None:
    import signal

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # pragma: no cover - non-Unix
            pass
    async with FakeRealtimeServer(cfg) as server:
        print(f"fake OpenAI Realtime listening on {server.url}", flush=True)
        await stop.wait()
        print("stopping", flush=True)


def main(argv: list[str] | None = None) -> int:
    """CLI entry point: serve until SIGINT/SIGTERM. Returns the process exit status."""
    args = _parse_args(argv)
    cfg = FakeOpenAIConfig(
        host=args.host,
        port=args.port,
        api_key=args.api_key,
        think_ms=args.think_ms,
        first_delta_delay_ms=args.first_delta_delay_ms,
        delta_interval_ms=args.delta_interval_ms,
        session_limit_s=args.session_limit_s,
        refuse=args.refuse,
        close_after_deltas=args.close_after_deltas,
        record=args.record,
    )
    logging.basicConfig(level=logging.WARNING, format="%(message)s", stream=sys.stdout)
    log.setLevel(logging.INFO)
    logging.getLogger(f"{log.name}.websockets").setLevel(logging.WARNING)
    try:
        import uvloop

        runner: Callable[[Any], Any] = uvloop.run
    except ImportError:  # pragma: no cover
        runner = asyncio.run
    try:
        runner(_serve_until_stopped(cfg))
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
