"""HTTP before the upgrade, for the transports built on `websockets`' Sans-I/O types: one
translation between its `Request`/`Response` and `base.HttpRequest`/`HttpResponse`."""

from __future__ import annotations

from typing import Any

from websockets.datastructures import Headers
from websockets.http11 import Request, Response

from .base import HttpRequest, HttpResponse, ProcessRequest, peer_name


def answer(process_request: ProcessRequest, request: Request, conn: Any,
           remote_address: Any) -> Response | None:
    """`process_request` on the library's request; its answer as the library's response
    (None: go on with the upgrade)."""
    r = process_request(HttpRequest(request.path, request.headers, peer_name(remote_address), conn))
    return None if r is None else response(r)


def response(r: HttpResponse) -> Response:
    return Response(r.status, r.reason, Headers(r.headers), r.body)
