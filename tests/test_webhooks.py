"""WebhookRunner against a local HTTP server on 127.0.0.1: answers, errors, bounds, headers."""

from __future__ import annotations

import asyncio
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Iterator

import pytest

from voicebridge.control import RunTool
from voicebridge.profiles import WebhookTool
from voicebridge.webhooks import WebhookRunner


class _Hook(BaseHTTPRequestHandler):
    seen: list[dict[str, Any]] = []
    gate = threading.Event()

    def log_message(self, *a: Any) -> None:
        pass

    def do_POST(self) -> None:  # noqa: N802 (http.server's name)
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        _Hook.seen.append({"path": self.path, "headers": dict(self.headers), "body": body})
        if self.path == "/slow":
            _Hook.gate.wait(5)
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/elsewhere")
            self.end_headers()
            return
        status, out = {"/ok": (200, json.dumps({"echo": json.loads(body or b"{}")}).encode()),
                       "/slow": (200, b'{"slow": true}'),
                       "/500": (500, b'{"error": "boom"}'),
                       "/html": (200, b"<html>not json</html>"),
                       "/big": (200, b'"' + b"x" * 5000 + b'"')}.get(self.path, (404, b"{}"))
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out)


@pytest.fixture
def server() -> Iterator[str]:
    _Hook.seen = []
    _Hook.gate.clear()
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    th = threading.Thread(target=srv.serve_forever, daemon=True)
    th.start()
    yield f"http://127.0.0.1:{srv.server_address[1]}"
    _Hook.gate.set()
    srv.shutdown()
    srv.server_close()


def tool(url: str, timeout_s: float = 2.0) -> RunTool:
    w = WebhookTool(url=url, description="d", timeout_s=timeout_s, max_response_bytes=1024)
    return RunTool("call_1", "lookup", '{"order": 42}', w,
                   {"X-Voicebridge-Conversation": "c1", "Authorization": "Bearer s3"})


async def run(r: WebhookRunner, eff: RunTool) -> tuple[str, str, bool]:
    got: list[tuple[str, str, bool]] = []
    await r.run(eff, lambda *a: got.append(a))
    assert len(got) == 1          # exactly one answer per call
    return got[0]


async def test_answer_arguments_and_headers(server: str) -> None:
    r = WebhookRunner()
    call_id, out, ok = await run(r, tool(server + "/ok"))
    assert (call_id, ok) == ("call_1", True) and json.loads(out) == {"echo": {"order": 42}}
    h = _Hook.seen[0]["headers"]
    assert h["Authorization"] == "Bearer s3" and h["X-Voicebridge-Conversation"] == "c1"
    assert h["Content-Type"] == "application/json"
    await r.aclose()


@pytest.mark.parametrize("path, words", [("/500", "HTTP 500"), ("/html", "JSON"),
                                         ("/big", "larger than"), ("/redirect", "HTTP 302")])
async def test_bad_answers_become_clear_errors(server: str, path: str, words: str) -> None:
    r = WebhookRunner()
    _, out, ok = await run(r, tool(server + path))
    assert not ok and words in json.loads(out)["error"]
    assert len(_Hook.seen) == 1        # a redirect is not followed
    await r.aclose()


async def test_unreachable_and_timeout(server: str) -> None:
    r = WebhookRunner()
    _, out, ok = await run(r, tool("http://127.0.0.1:1/x"))
    assert not ok and "unreachable" in json.loads(out)["error"]
    _, out, ok = await run(r, tool(server + "/slow", timeout_s=0.3))
    assert not ok and "did not answer within 0.3 s" in json.loads(out)["error"]
    await r.aclose()


async def test_concurrency_is_bounded(server: str) -> None:
    r = WebhookRunner(max_concurrent=2)
    tasks = [asyncio.create_task(run(r, tool(server + "/slow", timeout_s=3))) for _ in range(4)]
    for _ in range(200):
        if len(_Hook.seen) >= 2:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert len(_Hook.seen) == 2        # two in flight, two waiting for a slot
    _Hook.gate.set()
    results = await asyncio.gather(*tasks)
    assert all(ok for _, _, ok in results) and len(_Hook.seen) == 4
    await r.aclose()
