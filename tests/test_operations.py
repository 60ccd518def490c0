"""Operations against the real daemon process: the drain on SIGTERM, reload on SIGHUP, readiness,
`--check`, and the log polish (masked numbers, the OpenAI session id in call.end, a
connectivity check that is no call). Every wait is bounded; lower bounds on elapsed time only
where the feature is a wait ("no call is cut before the drain timeout")."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

from tests.conftest import wait_for
from tests.daemon_harness import (ROOT, TOKEN, clean_call, figures, free_port, new_caller, running_daemon,
                                  running_fake, start_daemon)
from tests.rawws import RawWs
from voicebridge.sim.caller import CallerConfig, Silence, Speak, WaitForBot, run_call

DRAIN_S = 8.0     # the short calls (~3.3 s) must end within it even on a loaded CI machine


def spawn(coro):
    return asyncio.ensure_future(coro)


def voices(fake, caller: str) -> list[str]:
    """The voice of every session.update that set one for `caller`'s sessions, in order (the
    update after the start activity carries only the instructions)."""
    out = []
    for s in fake.sessions:
        for ev in s.received_of("session.update"):
            sess = ev.get("session") or {}
            voice = ((sess.get("audio") or {}).get("output") or {}).get("voice")
            if caller in (sess.get("instructions") or "") and voice is not None:
                out.append(voice)
    return out


async def test_drain_on_sigterm(tmp_path):
    """SIGTERM: new calls get 503 (Retry-After), /health and /ready answer 503 "draining"; the
    calls in flight go on and end on their own; the one still open at server.drain_timeout_s is
    hung up politely (hangup activity, reason server_shutdown) and its OpenAI socket closed; the
    process exits 0 and the log counts drained and timed-out calls."""
    async with running_fake() as fake:
        d = await start_daemon(fake, tmp_path, name="drain", **{
            "VOICEBRIDGE_SERVER_DRAIN_TIMEOUT_S": str(DRAIN_S),
            "VOICEBRIDGE_SERVER_SHUTDOWN_TIMEOUT_S": "5"})
        try:
            script = [Speak(600), WaitForBot(6000), Silence(1500)]   # ~3 s: ends within the drain
            short = [spawn(clean_call(d, fake, script=script)) for _ in range(2)]
            long_caller = new_caller()
            long_cid = "long-" + uuid.uuid4().hex[:8]
            long_call = spawn(run_call(CallerConfig(url=d.url, token=TOKEN, caller=long_caller,
                                                    conversation_id=long_cid, script=[Silence(60_000)])))
            assert await wait_for(lambda: len(d.events("call.start")) >= 3, 5), d.events("call.start")
            t0 = time.monotonic()
            d.signal(signal.SIGTERM)
            assert await d.wait_event("server.draining", 3), "no server.draining"
            status, hdrs, body = await d.http_get("/health")
            assert status == 503 and json.loads(body)["status"] == "draining", (status, body)
            status, _, body = await d.http_get("/ready")
            assert status == 503 and json.loads(body)["why"] == "draining", (status, body)
            status, _, body = await d.http_get("/live")       # liveness: the drain is no failure
            assert status == 200 and json.loads(body)["status"] == "draining", (status, body)
            ws = await RawWs.open("127.0.0.1", d.port, d.path, TOKEN, timeout_s=5)
            ws.abort()
            assert ws.status == 503 and b"retry-after: 5" in ws.head.lower(), ws.head
            outs = await asyncio.wait_for(asyncio.gather(*short), 20)   # complete, nothing lost
            short_done_s = time.monotonic() - t0
            res = await asyncio.wait_for(long_call, DRAIN_S + 15)
            rc = await d.wait_exit(15)
            hang = [a for a in res.received_activities if a.get("name") == "hangup"]
            assert res.end_reason == "bot-hangup" and hang, (res.end_reason, res.received_activities)
            assert hang[0]["activityParams"]["hangupReason"] == "server-shutdown", hang
            assert all(o.end is not None and o.end["reason"] == "vaic_session_end" for o in outs)
            drained = d.events("server.drained")
            assert drained, "no server.drained"
            figures("drain", **{k: drained[0].get(k) for k in ("calls_at_signal", "drained",
                                                                "ended_by_timeout", "drain_s")},
                    short_calls_done_s=round(short_done_s, 2), exit_s=round(time.monotonic() - t0, 2))
            assert drained[0]["calls_at_signal"] == 3, drained
            assert drained[0]["drained"] == 2 and drained[0]["ended_by_timeout"] == 1, drained
            assert drained[0]["drain_s"] >= DRAIN_S - 0.05, drained     # not cut before the timeout
            assert short_done_s < drained[0]["drain_s"], (short_done_s, drained)
            end = d.events("call.end", call_id=long_cid)
            assert end and end[0]["reason"] == "server_shutdown", end
            assert rc == 0 and d.events("server.stopped"), rc
            assert await wait_for(lambda: all(s.closed_at is not None for s in fake.sessions), 5)
            assert not d.non_json_lines()
        finally:
            await d.stop()
            d.kill()


async def test_a_socket_upgraded_before_the_drain_still_gets_its_call(tmp_path):
    """The upgrade came before SIGTERM, session.initiate after it: that call was already being
    set up (VAIC has no reason to retry elsewhere), so it is accepted and drained like the rest;
    an upgrade after the signal gets 503."""
    from tests.rawws import text
    async with running_fake() as fake:
        d = await start_daemon(fake, tmp_path, name="drain_setup", **{
            "VOICEBRIDGE_SERVER_DRAIN_TIMEOUT_S": "3", "VOICEBRIDGE_SERVER_SHUTDOWN_TIMEOUT_S": "3"})
        try:
            ws = await RawWs.open("127.0.0.1", d.port, d.path, TOKEN, timeout_s=5)
            assert ws.status == 101, ws.head
            d.signal(signal.SIGTERM)
            assert await d.wait_event("server.draining", 3)
            ws.send(text(json.dumps({"type": "session.initiate", "conversationId": "late-" + uuid.uuid4().hex[:6],
                                     "expectAudioMessages": True, "caller": "+1555",
                                     "supportedMediaFormats": ["raw/lpcm16_24"]})))
            frames = await ws.read_frames(3.0)
            types = [json.loads(p).get("type") for op, p in frames if op == 1]
            assert "session.accepted" in types, types
            ws.abort()
            assert await d.wait_exit(15) == 0
        finally:
            await d.stop()
            d.kill()


async def test_second_sigterm_during_drain_ends_at_once(tmp_path):
    async with running_fake() as fake:
        d = await start_daemon(fake, tmp_path, name="drain2", **{
            "VOICEBRIDGE_SERVER_DRAIN_TIMEOUT_S": "120"})
        try:
            cid = "held-" + uuid.uuid4().hex[:8]
            held = spawn(run_call(CallerConfig(url=d.url, token=TOKEN, conversation_id=cid,
                                               script=[Silence(60_000)])))
            assert await wait_for(lambda: d.events("call.start", call_id=cid), 5)
            d.signal(signal.SIGTERM)
            assert await d.wait_event("server.draining", 3)
            await asyncio.sleep(0.3)
            assert d.alive(), "the drain ended although a call was in progress"
            d.signal(signal.SIGTERM)
            rc = await d.wait_exit(5)
            assert rc is not None, "a second SIGTERM did not end the drain"
            forced = d.events("server.shutdown_forced")
            assert forced and forced[0]["why"] == "second signal", forced
            res = await asyncio.wait_for(held, 10)
            assert res.end_reason != "caller-hangup", res.end_reason
            assert await wait_for(lambda: all(s.closed_at is not None for s in fake.sessions), 5)
        finally:
            await d.stop()
            d.kill()


async def test_reload_on_sighup(tmp_path):
    """SIGHUP re-reads config.toml: new calls get the new settings, a call in progress keeps its
    own (seen when its OpenAI session is replaced after the reload: the new session.update still
    carries the old voice); an invalid file keeps the previous configuration; a listener key is
    reported as needing a restart. The process never ends."""
    cfg = tmp_path / "config.toml"
    base = (ROOT / "config.toml").read_text()
    assert 'voice = "marin"' in base
    cfg.write_text(base)
    async with running_fake() as fake:
        d = await start_daemon(fake, tmp_path, name="reload", config_path=cfg)
        try:
            a_caller = new_caller()
            fake.config.drop_after_s = 2.5          # call A's first session drops after the reload
            a_call = spawn(run_call(CallerConfig(url=d.url, token=TOKEN, caller=a_caller,
                                                 script=[Silence(4500), Speak(600), WaitForBot(6000)])))
            assert await wait_for(lambda: voices(fake, a_caller), 5)
            fake.config.drop_after_s = None
            cfg.write_text(base.replace('voice = "marin"', 'voice = "cedar"'))
            d.signal(signal.SIGHUP)
            ev = await d.wait_event("server.reloaded", 3)
            assert ev and ev["changed"] == ["openai.voice"] and ev["restart_needed"] == [], ev
            b = await clean_call(d, fake)
            assert voices(fake, b.caller) == ["cedar"], voices(fake, b.caller)
            res = await asyncio.wait_for(a_call, 20)
            assert res.end_reason == "caller-hangup", res.end_reason
            assert voices(fake, a_caller) == ["marin", "marin"], voices(fake, a_caller)   # reconnected

            cfg.write_text(base + "\n[audio]\nplayout_lead_ms = 5\n")   # invalid (and a duplicate table)
            d.signal(signal.SIGHUP)
            bad = await d.wait_event("server.reload_failed", 3)
            assert bad and bad["path"] == str(cfg), bad
            cfg.write_text(base.replace('voice = "marin"', 'voice = "cedar"').replace(
                "playout_lead_ms = 200", "playout_lead_ms = 5"))
            d.signal(signal.SIGHUP)
            assert await wait_for(lambda: len(d.events("server.reload_failed")) >= 2, 3)
            assert "audio.playout_lead_ms" in d.events("server.reload_failed")[1]["error"]
            c = await clean_call(d, fake)
            assert voices(fake, c.caller) == ["cedar"]          # the last good configuration
            assert d.alive()

            cfg.write_bytes(b"\xff\xfe not UTF-8")
            d.signal(signal.SIGHUP)
            assert await wait_for(lambda: len(d.events("server.reload_failed")) >= 3, 3)
            assert "not UTF-8" in d.events("server.reload_failed")[2]["error"]
            assert d.alive()

            cfg.write_text(base.replace('voice = "marin"', 'voice = "cedar"').replace(
                "max_calls = 400", "max_calls = 1"))
            d.signal(signal.SIGHUP)
            assert await wait_for(lambda: len(d.events("server.reloaded")) >= 2, 3)
            assert d.events("server.reloaded")[1]["changed"] == ["server.max_calls"]
            held = spawn(run_call(CallerConfig(url=d.url, token=TOKEN, script=[Silence(1500)])))
            assert await wait_for(lambda: len(d.events("call.start")) >= 4, 5)
            ws = await RawWs.open("127.0.0.1", d.port, d.path, TOKEN, timeout_s=5)
            ws.abort()
            assert ws.status == 503, ws.head          # the reloaded max_calls is the one enforced
            await asyncio.wait_for(held, 10)

            cfg.write_text(base.replace('voice = "marin"', 'voice = "cedar"').replace(
                "backlog = 1024", "backlog = 77"))
            d.signal(signal.SIGHUP)
            assert await wait_for(lambda: len(d.events("server.reloaded")) >= 3, 3)
            ev = d.events("server.reloaded")[2]
            assert ev["restart_needed"] == ["server.backlog"] and ev["changed"] == ["server.max_calls"], ev
            assert not d.non_json_lines()
        finally:
            await d.stop()
            d.kill()


async def test_ready_when_openai_unreachable(tmp_path):
    """/ready is 503 once every OpenAI dial has failed for server.ready_dial_fail_s; /health
    (liveness) stays 200."""
    dead_port = free_port()          # nothing listens there
    d = await start_daemon(dead_port, tmp_path, name="unready", **{
        "VOICEBRIDGE_SERVER_READY_DIAL_FAIL_S": "0.4"})
    try:
        status, _, body = await d.http_get("/ready")
        assert status == 200 and json.loads(body)["ready"] is True, body
        call = spawn(run_call(CallerConfig(url=d.url, token=TOKEN, script=[Silence(3000)])))

        async def unready() -> bool:
            st, _, b = await d.http_get("/ready")
            return st == 503 and json.loads(b)["why"] == "openai_unreachable"

        deadline = time.monotonic() + 8
        seen = False
        while time.monotonic() < deadline and not seen:
            seen = await unready()
            await asyncio.sleep(0.1)
        assert seen, "/ready never reported the unreachable OpenAI endpoint"
        assert (await d.http_get("/health"))[0] == 200
        await asyncio.wait_for(call, 15)
        # no dial since (the call is over): after ready_dial_fail_s the instance is let back in,
        # or, out of rotation, it would never get the call whose dial could prove it well
        ok = False
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and not ok:
            st, _, b = await d.http_get("/ready")
            ok = st == 200
            await asyncio.sleep(0.1)
        assert ok, "/ready stayed 503 with no dial failing any more"
    finally:
        await d.stop()
        d.kill()


def test_check_fails_without_the_api_key(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEBRIDGE_")
           and k not in ("OPENAI_API_KEY", "AZURE_OPENAI_API_KEY")}
    env["VOICEBRIDGE_TOKEN"] = "t"
    r = subprocess.run([sys.executable, "-m", "voicebridge", "--config", str(ROOT / "config.toml"), "--check"],
                       env=env, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 2 and "OPENAI_API_KEY" in r.stderr and "Traceback" not in r.stderr, r
    r = subprocess.run([sys.executable, "-m", "voicebridge", "--config", str(ROOT / "config.toml"), "--check"],
                       env={**env, "OPENAI_API_KEY": "sk-x"}, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 0 and "configuration OK" in r.stdout, r


async def test_port_in_use_is_one_clear_line(tmp_path):
    import socket
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEBRIDGE_")}
        env.update(VOICEBRIDGE_TOKEN="t", OPENAI_API_KEY="sk-x", VOICEBRIDGE_SERVER_HOST="127.0.0.1",
                   VOICEBRIDGE_SERVER_PORT=str(port), VOICEBRIDGE_SERVER_ADMIN_PORT="-1")
        r = subprocess.run([sys.executable, "-m", "voicebridge", "--config", str(ROOT / "config.toml")],
                           env=env, capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert r.returncode == 1 and "Traceback" not in r.stdout + r.stderr, r
    lines = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    failed = [e for e in lines if e["event"] == "server.start_failed"]
    assert failed and failed[0]["port"] == port, lines


async def test_log_polish_masked_numbers_session_id_validate_listening(tmp_path):
    """log.mask_numbers hides caller numbers; call.end names the OpenAI session; a
    connection.validate socket is no call (no call.end, not counted as a call end);
    server.listening names the version and the OpenAI endpoint."""
    from voicebridge.sim.caller import validate_connection
    async with running_fake() as fake:
        async with running_daemon(fake, tmp_path, name="polish", VOICEBRIDGE_LOG_MASK_NUMBERS="true") as d:
            caller = "+15557654321"
            out = await clean_call(d, fake, caller=caller)
            start = d.events("call.start", call_id=out.conversation_id)[0]
            assert start["caller"] != caller and start["caller"].endswith("21"), start
            text = d.log_text()
            assert caller not in text
            assert out.end and out.end["openai_session_id"] == out.session.id, (out.end, out.session.id)
            assert out.end["openai_sessions"] == 1
            ends0 = len(d.events("call.end"))
            reply = await validate_connection(d.url, TOKEN)
            assert reply == {"type": "connection.validated", "success": True}
            assert await d.wait_event("call.validate", 3)
            await asyncio.sleep(0.3)
            assert len(d.events("call.end")) == ends0
            listening = d.events("server.listening")[0]
            assert listening["version"] and listening["openai_endpoint"].startswith("ws://127.0.0.1:"), listening
            status, _, body = await d.http_get("/metrics", admin=True)
            assert status == 200 and b'voicebridge_call_ends_total{reason="validate"}' not in body


def test_caller_help_url_matches_the_default_config():
    r = subprocess.run([sys.executable, "-m", "voicebridge.sim.caller", "--help"], capture_output=True,
                       text=True, timeout=30, cwd=ROOT)
    import tomllib
    path = tomllib.loads((ROOT / "config.toml").read_text())["server"]["path"]
    port = tomllib.loads((ROOT / "config.toml").read_text())["server"]["port"]
    assert f"ws://127.0.0.1:{port}{path}" in " ".join(r.stdout.split()), r.stdout


def test_unit_file_drain_timeouts_agree():
    """systemd must wait longer than the whole bounded shutdown (drain + the end)."""
    import re
    import tomllib
    unit = Path(ROOT / "deploy" / "voicebridge.service")
    server = tomllib.loads((ROOT / "config.toml").read_text())["server"]
    m = re.search(r"^TimeoutStopSec=(\d+)s?$", unit.read_text(), re.M)
    assert m, "no TimeoutStopSec"
    # the worst case: the drain, shutdown_timeout_s, then up to 2 s for the aborted sockets
    assert int(m.group(1)) > server["drain_timeout_s"] + server["shutdown_timeout_s"] + 2
