"""Shared fixtures: a fake OpenAI server and a bridge on 127.0.0.1, on uvloop like production."""

from __future__ import annotations

import asyncio
import contextvars
import io
import json
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest
import uvloop

from voicebridge.config import Config, Secrets, load_config
from voicebridge.log import setup
from voicebridge.server import Bridge
from voicebridge.sim.fake_openai import FakeOpenAIConfig, FakeRealtimeServer
from voicebridge.transport import TRANSPORTS

API_KEY = "sk-test-not-a-real-key"
# which socket layer the bridge under test uses (server.transport); e2e modules run each
TRANSPORT: contextvars.ContextVar[str] = contextvars.ContextVar("transport", default="picows")
TOKEN = "vaic-test-token"


def pytest_asyncio_loop_factories(config, item):
    """Run every async test on uvloop, like the daemon."""
    return {"uvloop": uvloop.new_event_loop}


class LogCapture(io.StringIO):
    def events(self, name: str | None = None) -> list[dict[str, Any]]:
        out = [json.loads(line) for line in self.getvalue().splitlines() if line.startswith("{")]
        return [e for e in out if name is None or e.get("event") == name]


@pytest.fixture
def logs() -> LogCapture:
    cap = LogCapture()
    setup("debug", stream=cap)
    return cap


def bridge_config(fake: FakeRealtimeServer, **sections: dict[str, Any]) -> Config:
    over: dict[str, dict[str, Any]] = {
        "server": {"host": "127.0.0.1", "port": 0, "admin_port": 0, "transport": TRANSPORT.get()},
        "openai": {"url": f"ws://127.0.0.1:{fake.port}/v1/realtime", "connect_timeout_s": 3.0,
                   "connect_budget_s": 3.0},
        # a dropped socket ends its call at once, as before session.resume existed; the resume
        # tests set a grace themselves
        "call": {"hangup_grace_s": 2.0, "resume_grace_s": 0},
    }
    for name, values in sections.items():
        over.setdefault(name, {}).update(values)
    cfg, _ = load_config(None, env={"VOICEBRIDGE_TOKEN": TOKEN}, overrides=over)
    return cfg


SECRETS = Secrets(token=TOKEN, openai_api_key=API_KEY)


@asynccontextmanager
async def running(fake_cfg: FakeOpenAIConfig | None = None,
                  **sections: dict[str, Any]) -> AsyncIterator[tuple[FakeRealtimeServer, Bridge]]:
    """A fake OpenAI server and a bridge wired to it; both stopped afterwards."""
    fake = FakeRealtimeServer(fake_cfg or fast_fake())
    await fake.start()
    try:
        bridge = Bridge(bridge_config(fake, **sections), SECRETS)
        await bridge.start()
        try:
            yield fake, bridge
        finally:
            await bridge.stop()
        # every client event the bridge sent in any e2e test must be valid per the openai SDK
        validate_all_sent(fake)
    finally:
        await fake.stop()


def validate_all_sent(fake: FakeRealtimeServer) -> int:
    from tests.sdk_check import validate_client_event
    n = 0
    for session in fake.sessions:
        for _, event in session.received:
            validate_client_event(event)
            n += 1
    return n


def fast_fake(**kw: Any) -> FakeOpenAIConfig:
    base: dict[str, Any] = dict(api_key=API_KEY, think_ms=40, delta_audio_ms=100,
                                delta_interval_ms=10, reply_ms=[600], greeting_ms=600)
    base.update(kw)
    return FakeOpenAIConfig(**base)


def vaic_url(bridge: Bridge) -> str:
    return f"ws://127.0.0.1:{bridge.port}{bridge.cfg.server.path}"


async def wait_for(pred, timeout: float = 5.0, step: float = 0.01) -> bool:
    """Poll `pred` until true or `timeout` (bounded); returns the final value."""
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while loop.time() < end:
        if pred():
            return True
        await asyncio.sleep(step)
    return bool(pred())


def assert_events_valid(fake: FakeRealtimeServer) -> int:
    """Every client event the bridge sent is valid GA per the openai SDK, and the fake server
    sent no error other than benign or injected ones (e.g. no rejected truncate)."""
    n = validate_all_sent(fake)
    for session in fake.sessions:
        assert not any(e.get("error", {}).get("code") not in
                       ("conversation_already_has_active_response", "response_cancel_not_active",
                        "input_audio_buffer_commit_empty", None)
                       for e in session.errors_sent if e.get("injected") is None), session.errors_sent
    return n


@pytest.fixture(params=list(TRANSPORTS))
def both_transports(request):
    """Run a test once per registered socket layer (today: the lean Sans-I/O one, "fast",
    websockets' asyncio one, and picows' Cython codec, "picows")."""
    token = TRANSPORT.set(request.param)
    yield request.param
    TRANSPORT.reset(token)
