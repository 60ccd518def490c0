"""Transports by name: `server.transport` picks one, `get(name)` imports it on demand.

Each entry of `TRANSPORTS` names a module that provides the interface described in `base`
(`listen`, `dial`, endpoints honouring `base.Limits`). Adding a transport: write its module, add
one line here. The library-neutral names (`Endpoint`, `EndpointClosed`, `Limits`, ...) are
re-exported from `base`; `dial` is the `websockets` transport's, as before the package existed
(the bridge itself dials with its configured transport's `dial`).
"""

from __future__ import annotations

import importlib
from typing import Any, cast

from .base import (CAUSES, MAX_QUEUED_MESSAGES, MAX_REQUEST_HEAD_BYTES, Conn, ConnectFailed,
                   Endpoint, EndpointClosed, Handler, HttpRequest, HttpResponse, Limits,
                   Listener, ListenOptions, OnRefused, ProcessRequest, ProcessResponse,
                   RequestHead, TransportModule, cause_of_code, closed_error, peer_name)

TRANSPORTS: dict[str, str] = {
    "fast": "voicebridge.transport.fast_impl",
    "websockets": "voicebridge.transport.websockets_impl",
    "picows": "voicebridge.transport.picows_impl",
}


def get(name: str) -> TransportModule:
    """The transport module registered as `name` (imported on first use)."""
    try:
        path = TRANSPORTS[name]
    except KeyError:
        raise ValueError(f"unknown transport {name!r}; known: {', '.join(sorted(TRANSPORTS))}") from None
    module = importlib.import_module(path)
    missing = [attr for attr in ("listen", "dial") if not callable(getattr(module, attr, None))]
    if missing:
        raise ImportError(f"transport {name!r} ({path}) lacks {', '.join(missing)}")
    return cast(TransportModule, module)


def __getattr__(name: str) -> Any:
    # `from voicebridge.transport import dial` without importing every transport up front
    if name == "dial":
        return get("websockets").dial
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["CAUSES", "MAX_QUEUED_MESSAGES", "MAX_REQUEST_HEAD_BYTES", "TRANSPORTS", "ConnectFailed",
           "Conn", "Endpoint", "EndpointClosed", "Handler", "HttpRequest", "HttpResponse",
           "Limits", "ListenOptions", "Listener", "OnRefused", "ProcessRequest",
           "ProcessResponse", "RequestHead", "TransportModule", "cause_of_code", "closed_error",
           "dial", "get", "peer_name"]
