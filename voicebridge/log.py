"""structlog JSON logging: one line per call event, never API keys or tokens.

Contract: `setup(level)` once at start; modules take `get_logger()`. Per-frame code never logs.
A processor redacts values of keys that look like secrets, as a second line of defence.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, MutableMapping, TextIO

import structlog

_REDACT = ("authorization", "api_key", "api-key", "token", "secret", "password")


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if any(r in key.lower() for r in _REDACT):
            event[key] = "[redacted]"
    return event


def setup(level: str = "info", stream: TextIO | None = None) -> None:
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _redact,
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(stream or sys.stdout),
        cache_logger_on_first_use=False,
    )


def get_logger(**bind: Any) -> Any:
    return structlog.get_logger("voicebridge").bind(**bind)
