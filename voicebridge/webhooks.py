"""HTTP webhook tools: the shell's side of `control.RunTool`.

One `WebhookRunner` per process: an `httpx.AsyncClient` (connection pool, no redirects) and a
semaphore bounding how many webhook requests run at once daemon-wide (`MAX_CONCURRENT`; a call
waiting for a slot waits within its tool's timeout). A request is `POST <url>` with the model's
JSON arguments as the body, the call's metadata in `X-Voicebridge-*` headers and
`Authorization: Bearer $VOICEBRIDGE_WEBHOOK_SECRET` when set. The answer must be JSON (any
value), at most `max_response_bytes`; anything else becomes an error object for the model.
Nothing here touches the audio path: each call runs as its own task, so a slow webhook never
stalls a pump, and the call core holds the deadline too (a late answer is dropped).
"""

from __future__ import annotations

import asyncio
import json
from typing import Callable

import httpx

from .control import RunTool

MAX_CONCURRENT = 32


class WebhookRunner:
    def __init__(self, max_concurrent: int = MAX_CONCURRENT) -> None:
        self._client: httpx.AsyncClient | None = None
        self._slots = asyncio.Semaphore(max_concurrent)

    def _http(self) -> httpx.AsyncClient:
        if self._client is None:
            self._client = httpx.AsyncClient(follow_redirects=False, trust_env=False,
                                             limits=httpx.Limits(max_connections=MAX_CONCURRENT))
        return self._client

    async def run(self, eff: RunTool, done: Callable[[str, str, bool], None]) -> None:
        """Run one tool call; `done(call_id, output_json_text, ok)` is called exactly once
        (not at all if the task is cancelled: the call ended)."""
        w = eff.webhook
        try:
            async with asyncio.timeout(w.timeout_s):
                async with self._slots:
                    output = await self._post(eff)
            done(eff.call_id, output, True)
        except TimeoutError:
            done(eff.call_id, json.dumps({"error": f"{eff.name} did not answer within {w.timeout_s:g} s"}), False)
        except _ToolError as e:
            done(eff.call_id, json.dumps({"error": str(e)}), False)
        except httpx.HTTPError as e:
            done(eff.call_id, json.dumps({"error": f"{eff.name} is unreachable ({type(e).__name__})"}), False)
        except Exception as e:    # anything else (a header httpx refuses, ...): still one answer
            done(eff.call_id, json.dumps({"error": f"{eff.name} could not be called ({type(e).__name__})"}), False)

    async def _post(self, eff: RunTool) -> str:
        w = eff.webhook
        headers = {"Content-Type": "application/json", "Accept": "application/json", **eff.headers}
        async with self._http().stream("POST", w.url, content=eff.arguments.encode(),
                                       headers=headers) as resp:
            if resp.status_code // 100 != 2:
                raise _ToolError(f"{eff.name} answered HTTP {resp.status_code}")
            body = bytearray()
            async for piece in resp.aiter_bytes():
                body += piece
                if len(body) > w.max_response_bytes:
                    raise _ToolError(f"{eff.name}'s answer is larger than {w.max_response_bytes} bytes")
        try:
            json.loads(body)
        except (ValueError, RecursionError):
            raise _ToolError(f"{eff.name} did not answer with JSON") from None
        return body.decode("utf-8", "replace")

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None


class _ToolError(Exception):
    """A webhook answered, but not usefully: the message goes to the model."""


_default: WebhookRunner | None = None


def default_runner() -> WebhookRunner:
    """The process's runner (created on first use, on the running loop)."""
    global _default
    if _default is None:
        _default = WebhookRunner()
    return _default


async def aclose_default() -> None:
    """Close the process's runner's connections (the daemon is stopping)."""
    global _default
    runner, _default = _default, None
    if runner is not None:
        await runner.aclose()
