"""Validate client events against the `openai` SDK's own realtime event types (test-only).

The SDK's pydantic models accept unknown keys silently (extra="allow"), so after validating we
walk the model and fail on any key the SDK does not declare: that catches beta-era fields
(`input_audio_format`, ...) and typos, which the real server rejects with `unknown_parameter`.
"""

from __future__ import annotations

import json
from typing import Any

from openai.types.realtime import RealtimeClientEvent
from pydantic import BaseModel, TypeAdapter

_adapter: TypeAdapter[Any] = TypeAdapter(RealtimeClientEvent)


def _no_extras(obj: Any, path: str) -> None:
    if isinstance(obj, BaseModel):
        extra = obj.model_extra or {}
        if extra:
            raise AssertionError(f"{path}: keys unknown to the openai SDK: {sorted(extra)}")
        for name in type(obj).model_fields:
            _no_extras(getattr(obj, name), f"{path}.{name}")
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            _no_extras(v, f"{path}[{i}]")


def validate_client_event(frame: str | bytes | dict[str, Any]) -> Any:
    """Parse (if needed) and validate one client event; returns the SDK model."""
    obj = json.loads(frame) if isinstance(frame, (str, bytes)) else frame
    model = _adapter.validate_python(obj)
    _no_extras(model, obj.get("type", "?"))
    return model
