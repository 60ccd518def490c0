"""structlog JSON logging: one line per call event, never API keys or tokens, never a traceback.

Contract: `setup(level)` once at start; modules take `get_logger()`. Per-frame code never logs.
- Every line written is one JSON object, also for records of other libraries (websockets,
  asyncio) that go through the standard `logging` module, and for errors the event loop reports
  (`install_loop_handler`).
- Exceptions become three bounded fields, `error_type`, `error` and `where` (file:line of the
  innermost frame), instead of a multi-line traceback.
- A processor redacts values of keys that look like secrets, as a second line of defence.
- Noisy events not tied to one call (failed auth, refused connections, library noise) go through
  `Throttled`, which writes at most `log.rate_limit_per_s` lines per second per event name and
  reports what it dropped as `suppressed=N` on the next line it writes.
- Under systemd, when the output stream is the journal (`JOURNAL_STREAM` names its device and
  inode), each line starts with its syslog priority `<N>` (debug 7, info 6, warning 4, error 3,
  critical 2), which journald strips and stores as the priority. Otherwise lines are plain JSON.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
from typing import Any, Mapping, MutableMapping, TextIO

import structlog

from .bounds import TEXT_CHARS, RateLimiter, clip

_REDACT = ("authorization", "api_key", "api-key", "token", "secret", "password")
_rate = RateLimiter(5.0)   # shared by Throttled and the library-record filter; reset by setup()


def _redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    for key in list(event):
        if any(r in key.lower() for r in _REDACT):
            event[key] = "[redacted]"
    return event


def exc_fields(exc: BaseException) -> dict[str, str]:
    """`error_type`, `error` (bounded) and `where` for an exception."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    out = {"error_type": type(exc).__name__, "error": clip(str(exc), TEXT_CHARS)}
    if tb is not None:
        out["where"] = f"{os.path.basename(tb.tb_frame.f_code.co_filename)}:{tb.tb_lineno}"
    return out


def _compact_exc(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    info = event.pop("exc_info", None)
    if info:
        if info is True:
            info = sys.exc_info()
        exc = info if isinstance(info, BaseException) else (info[1] if isinstance(info, tuple) else None)
        if exc is not None:
            event.update(exc_fields(exc))
    event.pop("stack_info", None)
    return event


# syslog priorities journald reads from a `<N>` line prefix (SyslogLevelPrefix=yes)
_PRIORITY = {"debug": 7, "info": 6, "notice": 5, "warning": 4, "warn": 4, "error": 3,
             "exception": 3, "critical": 2, "fatal": 2}


def connected_to_journal(stream: TextIO, env: Mapping[str, str] | None = None) -> bool:
    """Whether `stream` is the journal stream systemd connected us to: `JOURNAL_STREAM` is
    `<device>:<inode>` of it (a child whose output was redirected elsewhere still inherits the
    variable, so it is compared with the stream's own descriptor)."""
    value = (os.environ if env is None else env).get("JOURNAL_STREAM", "")
    dev, sep, ino = value.partition(":")
    if not sep:
        return False
    try:
        st = os.fstat(stream.fileno())
        return (st.st_dev, st.st_ino) == (int(dev), int(ino))
    except (OSError, ValueError, AttributeError):   # no descriptor (StringIO), a bad value
        return False


class _SafeJSON:
    """JSONRenderer that cannot fail: an unrenderable event becomes a minimal one.
    `journal`: prefix each line with its syslog priority `<N>` (see the module docstring)."""

    def __init__(self, journal: bool = False) -> None:
        self._render = structlog.processors.JSONRenderer()
        self._journal = journal

    def __call__(self, logger: Any, name: str, event: MutableMapping[str, Any]) -> str:
        try:
            line = str(self._render(logger, name, event))
        except Exception as e:  # e.g. RecursionError on a deeply nested value
            line = json.dumps({"event": clip(event.get("event"), 64), "level": event.get("level"),
                               "log_error": f"{type(e).__name__}: could not render fields"})
        if self._journal:
            return f"<{_PRIORITY.get(str(event.get('level')), 6)}>{line}"
        return line


class _LibraryFilter(logging.Filter):
    """Library records are rate limited like our noisy events (per logger name and level)."""

    def filter(self, record: logging.LogRecord) -> bool:
        n = _rate.allow(f"lib:{record.name}:{record.levelno}", time.monotonic())
        if n is None:
            return False
        if n:
            record.suppressed = n
        return True


def _add_suppressed(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    record = event.get("_record")
    if record is not None and getattr(record, "suppressed", None):
        event["suppressed"] = record.suppressed
    return event


def setup(level: str = "info", stream: TextIO | None = None, rate_limit_per_s: float = 5.0,
          journal: bool | None = None) -> None:
    """Configure structlog and the root logger to write JSON lines to `stream` (stdout).
    `journal`: `<N>` priority prefixes on or off; None detects it (`connected_to_journal`)."""
    global _rate
    _rate = RateLimiter(rate_limit_per_s)
    out = stream or sys.stdout
    if journal is None:
        journal = connected_to_journal(out)
    shared: list[Any] = [structlog.processors.add_log_level,
              structlog.processors.TimeStamper(fmt="iso", utc=True), _redact, _compact_exc]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *shared, _SafeJSON(journal)],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # Records of other libraries (websockets, asyncio): the same JSON, rate limited, WARNING+.
    handler = logging.StreamHandler(out)
    handler.addFilter(_LibraryFilter())
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[structlog.stdlib.add_logger_name, _add_suppressed, *shared],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, _SafeJSON(journal)]))
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_voicebridge", False):
            root.removeHandler(h)
    handler._voicebridge = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def get_logger(**bind: Any) -> Any:
    return structlog.get_logger("voicebridge").bind(**bind)


class Throttled:
    """Rate-limited log lines for events a peer can trigger at will (see the module docstring)."""

    def __init__(self, log: Any) -> None:
        self.log = log

    def emit(self, level: str, event: str, **kw: Any) -> bool:
        n = _rate.allow(event, time.monotonic())
        if n is None:
            return False
        if n:
            kw["suppressed"] = n
        getattr(self.log, level)(event, **kw)
        return True


def install_loop_handler(loop: asyncio.AbstractEventLoop) -> None:
    """Errors the event loop reports (a failing callback, accept() out of descriptors, ...)
    become rate-limited JSON lines instead of asyncio's multi-line default output."""
    throttled = Throttled(get_logger())

    def handler(_: asyncio.AbstractEventLoop, ctx: dict[str, Any]) -> None:
        exc = ctx.get("exception")
        fields: dict[str, Any] = {"message": clip(ctx.get("message"), TEXT_CHARS)}
        if isinstance(exc, BaseException):
            fields.update(exc_fields(exc))
        throttled.emit("error", "loop.error", **fields)

    loop.set_exception_handler(handler)
