"""The transport registry: names, config validation, the module interface, and that a new
transport needs only its module and one line in `TRANSPORTS`."""

from __future__ import annotations

import asyncio
import inspect
import json

import pytest

from voicebridge import transport
from voicebridge.config import ConfigError, load_config
from voicebridge.server import Bridge
from voicebridge.transport import TRANSPORTS

ENV = {"VOICEBRIDGE_TOKEN": "t0k"}


def test_every_registered_name_is_valid_config_and_nothing_else():
    for name in TRANSPORTS:
        cfg, _ = load_config(None, env=ENV, overrides={"server": {"transport": name}})
        assert cfg.server.transport == name
    assert set(TRANSPORTS) == {"fast", "websockets", "picows"}
    assert load_config(None, env=ENV)[0].server.transport == "picows"


def test_unknown_transport_is_a_config_error_naming_the_key():
    with pytest.raises(ConfigError) as e:
        load_config(None, env={**ENV, "VOICEBRIDGE_SERVER_TRANSPORT": "pigeon"})
    msg = str(e.value)
    assert msg.startswith("server.transport:") and "'pigeon'" in msg
    assert all(name in msg for name in TRANSPORTS)
    with pytest.raises(ValueError, match="unknown transport 'pigeon'"):
        transport.get("pigeon")


@pytest.mark.parametrize("name", sorted(TRANSPORTS))
def test_each_module_provides_the_interface(name):
    mod = transport.get(name)
    assert inspect.iscoroutinefunction(mod.listen) and inspect.iscoroutinefunction(mod.dial)
    listen = inspect.signature(mod.listen).parameters
    assert list(listen)[:4] == ["handler", "process_request", "host", "port"]
    assert {"opts", "process_response", "on_refused"} <= set(listen)
    dial = inspect.signature(mod.dial).parameters
    assert {"timeout_s", "max_size", "close_timeout_s", "ping_interval_s", "limits"} <= set(dial)


async def test_a_third_transport_needs_only_its_module_and_the_table(monkeypatch):
    """Registered under a new name (here: the fast module again), it is valid config and the
    bridge serves with it, with no other change."""
    monkeypatch.setitem(TRANSPORTS, "third", "voicebridge.transport.fast_impl")
    cfg, secrets = load_config(None, env=ENV, overrides={"server": {
        "transport": "third", "host": "127.0.0.1", "port": 0, "admin_port": -1}})
    async with Bridge(cfg, secrets) as bridge:
        assert bridge.transport is transport.get("third")
        reader, writer = await asyncio.open_connection("127.0.0.1", bridge.port)
        writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = (await asyncio.wait_for(reader.read(), 5)).partition(b"\r\n\r\n")
        writer.close()
    assert head.startswith(b"HTTP/1.1 200") and json.loads(body)["status"] == "ok"
