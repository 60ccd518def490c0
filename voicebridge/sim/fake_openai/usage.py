"""Token usage of the fake OpenAI Realtime server: the ``usage`` object of ``response.done``.

Pure functions, no I/O. The counts follow OpenAI's published Realtime billing rules where they
exist and a fixed estimate where they do not, so a test can recompute them exactly:

* user (input) audio: 1 token per 100 ms of committed speech, rounded up [doc: realtime-costs];
* assistant audio: 1 token per 50 ms, rounded up, both as output of the response that generated
  it and as input of every later response while the item is in the conversation (its truncated
  length once truncated) [doc];
* text: ``ceil(len(text) / 4)`` tokens [fake: a rough tokenizer stand-in, no per-item overhead];
* every response's input is the whole conversation at ``response.created`` (the session's or the
  response's instructions, the tools offered, then every remembered item), so later turns cost
  more [doc];
* ``cached_tokens``: the previous response's input total, if at least 1024, rounded down to a
  multiple of 64 and capped at this input [fake: the real cache is a prefix cache with these
  increments; truncation or deletion invalidating it is not modelled]. ``cached_tokens_details``
  splits it text first, then audio.

A response that failed (``fail_responses`` knob) carries ``usage: null`` [fake].
"""

from __future__ import annotations

import json
import math
from typing import Any

USER_AUDIO_MS_PER_TOKEN = 100
ASSISTANT_AUDIO_MS_PER_TOKEN = 50
CHARS_PER_TEXT_TOKEN = 4
CACHE_MIN_TOKENS = 1024
CACHE_STEP_TOKENS = 64


def text_tokens(text: str) -> int:
    """Estimated text tokens of ``text``: ``ceil(len / 4)`` (0 for the empty string)."""
    return math.ceil(len(text) / CHARS_PER_TEXT_TOKEN)


def user_audio_tokens(ms: float) -> int:
    """Tokens of ``ms`` of caller audio (1 per 100 ms, rounded up)."""
    return math.ceil(max(0.0, ms) / USER_AUDIO_MS_PER_TOKEN)


def assistant_audio_tokens(ms: float) -> int:
    """Tokens of ``ms`` of assistant audio (1 per 50 ms, rounded up)."""
    return math.ceil(max(0.0, ms) / ASSISTANT_AUDIO_MS_PER_TOKEN)


def _parts_text(content: Any) -> str:
    if not isinstance(content, list):
        return ""
    texts = []
    for part in content:
        if isinstance(part, dict):
            for key in ("text", "transcript"):
                value = part.get(key)
                if isinstance(value, str):
                    texts.append(value)
    return " ".join(texts)


def item_tokens(item: dict[str, Any], audio_ms: float, has_audio: bool) -> tuple[int, int]:
    """(text tokens, audio tokens) one conversation item adds to a response's input.

    ``audio_ms``/``has_audio``: the item's audio as the server holds it (caller speech of a user
    item, assistant audio after truncation). An assistant audio item counts its audio only, not
    its transcript; text parts count as text.
    """
    kind = item.get("type")
    role = item.get("role")
    if kind == "message":
        if has_audio and role == "assistant":
            return 0, assistant_audio_tokens(audio_ms)
        text = text_tokens(_parts_text(item.get("content")))
        audio = user_audio_tokens(audio_ms) if has_audio else 0
        return text, audio
    if kind == "function_call":
        return text_tokens(str(item.get("name", "")) + str(item.get("arguments", ""))), 0
    if kind == "function_call_output":
        return text_tokens(str(item.get("output", ""))), 0
    if kind == "mcp_call":
        return text_tokens(str(item.get("arguments", "")) + str(item.get("output") or "")), 0
    if kind == "mcp_list_tools":
        return text_tokens(json.dumps(item.get("tools", []))), 0
    return 0, 0


def input_usage(instructions: str, tools: list[Any], items: list[tuple[int, int]],
                previous_input_tokens: int) -> dict[str, Any]:
    """``input_tokens`` and ``input_token_details`` of a response (see the module doc)."""
    text = text_tokens(instructions) + (text_tokens(json.dumps(tools)) if tools else 0)
    audio = 0
    for t, a in items:
        text += t
        audio += a
    total = text + audio
    cached = 0
    if previous_input_tokens >= CACHE_MIN_TOKENS:
        cached = min(total, previous_input_tokens) // CACHE_STEP_TOKENS * CACHE_STEP_TOKENS
    cached_text = min(cached, text)
    return {
        "input_tokens": total,
        "input_token_details": {
            "text_tokens": text,
            "audio_tokens": audio,
            "image_tokens": 0,
            "cached_tokens": cached,
            "cached_tokens_details": {"text_tokens": cached_text,
                                      "audio_tokens": cached - cached_text,
                                      "image_tokens": 0},
        },
    }


def response_usage(input_part: dict[str, Any], transcript: str, audio_ms: float,
                   call_texts: list[str]) -> dict[str, Any]:
    """The whole ``usage`` object: ``input_part`` from :func:`input_usage`, output from what the
    response generated (its transcript or text, ``audio_ms`` of audio, each tool call's
    name + arguments as text)."""
    out_text = text_tokens(transcript) + sum(text_tokens(t) for t in call_texts)
    out_audio = assistant_audio_tokens(audio_ms)
    output = out_text + out_audio
    return {
        "total_tokens": input_part["input_tokens"] + output,
        "input_tokens": input_part["input_tokens"],
        "output_tokens": output,
        "input_token_details": input_part["input_token_details"],
        "output_token_details": {"text_tokens": out_text, "audio_tokens": out_audio},
    }
