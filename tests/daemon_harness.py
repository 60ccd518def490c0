"""The real daemon as a subprocess, for attack/regression tests over real sockets on 127.0.0.1.

`start_daemon(fake, tmp_dir, **env)` runs `python -m voicebridge --config <repo>/config.toml`
with environment overrides (token, the fake's API key, host 127.0.0.1, free public and admin
ports, the fake's URL), waits (bounded) until `/health` answers and returns a `Daemon`:
`pid`, `port`, `admin_port`, `url`, `log_path` (stdout) and `err_path` (stderr), `events()`,
`non_json_lines()`, `log_bytes()`, `wait_event()`, `rss_kib()`, `peak_rss_kib()` (VmHWM),
`fd_count()`, `cpu_s()`, `tcp_sockets(local_port=, remote_port=)` (sockets the daemon still holds,
from /proc: e.g. "is the OpenAI socket of this call closed", via `FakeSession.peer`), `signal()`,
`wait_exit()`, `http_get()` and `stop()` (SIGTERM, bounded wait, then SIGKILL); `nofile=(soft,
hard)` sets the child's RLIMIT_NOFILE. Every wait is async: the fake
OpenAI server runs on the test's event loop, so nothing here may block that loop.

`clean_call(daemon, fake)` runs one normal simulated call (speak, wait for the bot's answer, hang
up) and asserts it completed with no protocol violation and no frame lost in either direction.

`figures(test, **numbers)` appends one JSON line to the file named by `VB_HARDENING_FIGURES`
(nothing when unset).
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal as signal_mod
import socket
import subprocess
import sys
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Callable

import msgspec

from voicebridge import config as vb_config
from voicebridge.sim.caller import CallerConfig, CallResult, ScriptItem, Silence, Speak, WaitForBot, run_call
from voicebridge.sim.fake_openai import FakeOpenAIConfig, FakeRealtimeServer, FakeSession
from tests.conftest import wait_for

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "vaic-harness-token"
API_KEY = "sk-harness-not-a-real-key"
# {caller} lets a test find the fake OpenAI session of a given call (its session.update)
INSTRUCTIONS = "You are a test assistant for {caller}."
START_TIMEOUT_S = 20.0
STOP_TIMEOUT_S = 15.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def config_has(section: str, key: str) -> bool:
    """Whether the daemon's configuration (this checkout) knows `section.key`."""
    classes = {f.name: f.type for f in msgspec.structs.fields(vb_config.Config)}
    cls = classes.get(section)
    if cls is None:
        return False
    return any(f.name == key for f in msgspec.structs.fields(cls))


def fake_config(**kw: Any) -> FakeOpenAIConfig:
    """A fast fake OpenAI server config (short think time, 600 ms answers) with the harness key."""
    base: dict[str, Any] = dict(api_key=API_KEY, think_ms=40, delta_audio_ms=100,
                                delta_interval_ms=10, reply_ms=[600], greeting_ms=600)
    base.update(kw)
    return FakeOpenAIConfig(**base)


@asynccontextmanager
async def running_fake(cfg: FakeOpenAIConfig | None = None) -> AsyncIterator[FakeRealtimeServer]:
    fake = FakeRealtimeServer(cfg or fake_config())
    await fake.start()
    try:
        yield fake
    finally:
        await fake.stop(timeout=3.0)


class DaemonStartError(RuntimeError):
    pass


@dataclass
class Daemon:
    proc: subprocess.Popen[bytes]
    port: int
    admin_port: int | None
    log_path: Path
    err_path: Path
    env: dict[str, str]
    path: str = "/voicebridge"
    started_at: float = field(default_factory=time.monotonic)

    # ---------------------------------------------------------------- identity
    @property
    def pid(self) -> int:
        return self.proc.pid

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}{self.path}"

    def alive(self) -> bool:
        return self.proc.poll() is None

    # ---------------------------------------------------------------- logs
    def _lines(self) -> list[str]:
        out: list[str] = []
        for p in (self.log_path, self.err_path):
            try:
                out += p.read_text(errors="replace").splitlines()
            except FileNotFoundError:
                pass
        return out

    def events(self, name: str | None = None, **match: Any) -> list[dict[str, Any]]:
        """Parsed JSON log lines (stdout then stderr), optionally filtered by event name and
        by field values (e.g. `call_id=...`)."""
        out = []
        for line in self._lines():
            try:
                ev = json.loads(line)
            except ValueError:
                continue
            if not isinstance(ev, dict):
                continue
            if name is not None and ev.get("event") != name:
                continue
            if any(ev.get(k) != v for k, v in match.items()):
                continue
            out.append(ev)
        return out

    def non_json_lines(self) -> list[str]:
        """Lines on stdout/stderr that are not one JSON object (empty lines ignored)."""
        bad = []
        for line in self._lines():
            if not line.strip():
                continue
            try:
                ev = json.loads(line)
            except ValueError:
                bad.append(line)
                continue
            if not isinstance(ev, dict):
                bad.append(line)
        return bad

    def log_bytes(self) -> int:
        n = 0
        for p in (self.log_path, self.err_path):
            try:
                n += p.stat().st_size
            except FileNotFoundError:
                pass
        return n

    def log_text(self) -> str:
        return "\n".join(self._lines())

    async def wait_event(self, name: str, timeout_s: float = 5.0, **match: Any) -> dict[str, Any] | None:
        """First log event `name` (matching `match`) seen within `timeout_s`, else None."""
        end = time.monotonic() + timeout_s
        while True:
            found = self.events(name, **match)
            if found:
                return found[0]
            if time.monotonic() >= end:
                return None
            await asyncio.sleep(0.05)

    # ---------------------------------------------------------------- /proc
    def _status_kib(self, field_name: str) -> int:
        with open(f"/proc/{self.pid}/status") as f:
            for line in f:
                if line.startswith(field_name + ":"):
                    return int(line.split()[1])
        raise KeyError(field_name)

    def rss_kib(self) -> int:
        return self._status_kib("VmRSS")

    def peak_rss_kib(self) -> int:
        return self._status_kib("VmHWM")

    def fd_count(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def cpu_s(self) -> float:
        """User + system CPU seconds the daemon has used so far."""
        with open(f"/proc/{self.pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tcp_sockets(self, *, local_port: int | None = None, remote_port: int | None = None) -> list[str]:
        """TCP states (hex, e.g. '01' = ESTABLISHED) of the sockets the daemon holds open whose
        local / remote port match; [] once it has closed them (the fd is gone)."""
        inodes = set()
        fd_dir = f"/proc/{self.pid}/fd"
        for fd in os.listdir(fd_dir):
            try:
                link = os.readlink(f"{fd_dir}/{fd}")
            except OSError:
                continue
            if link.startswith("socket:["):
                inodes.add(link[8:-1])
        states = []
        for table in (f"/proc/{self.pid}/net/tcp", f"/proc/{self.pid}/net/tcp6"):
            try:
                with open(table) as f:
                    rows = f.read().splitlines()[1:]
            except OSError:
                continue
            for row in rows:
                parts = row.split()
                if len(parts) < 10 or parts[9] not in inodes:
                    continue
                lport = int(parts[1].rsplit(":", 1)[1], 16)
                rport = int(parts[2].rsplit(":", 1)[1], 16)
                if local_port is not None and lport != local_port:
                    continue
                if remote_port is not None and rport != remote_port:
                    continue
                states.append(parts[3])
        return states

    # ---------------------------------------------------------------- HTTP
    async def http_get(self, path: str, *, admin: bool = False, headers: dict[str, str] | None = None,
                       timeout_s: float = 5.0) -> tuple[int, dict[str, str], bytes]:
        """One HTTP/1.1 GET (Connection: close); (status, headers, body). Raises OSError/TimeoutError."""
        port = self.admin_port if admin else self.port
        assert port is not None, "no admin listener"
        return await http_get(port, path, headers=headers, timeout_s=timeout_s)

    async def health(self, timeout_s: float = 5.0) -> dict[str, Any]:
        status, _, body = await self.http_get("/health", timeout_s=timeout_s)
        assert status == 200, (status, body[:200])
        return json.loads(body)

    # ---------------------------------------------------------------- signals / stop
    def signal(self, sig: int) -> None:
        if self.alive():
            self.proc.send_signal(sig)

    async def wait_exit(self, timeout_s: float) -> int | None:
        """Exit status once the process ended within `timeout_s`, else None (still running)."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            rc = self.proc.poll()
            if rc is not None:
                return rc
            await asyncio.sleep(0.02)
        return self.proc.poll()

    async def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, wait up to `timeout_s`, then SIGKILL. Returns the exit status."""
        if self.alive():
            self.proc.send_signal(signal_mod.SIGTERM)
            rc = await self.wait_exit(timeout_s)
            if rc is not None:
                return rc
            self.proc.kill()
        rc = await self.wait_exit(5.0)
        return rc if rc is not None else -9

    def kill(self) -> None:
        """Synchronous last resort (fixture finalizers)."""
        if self.alive():
            self.proc.kill()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                pass


async def http_get(port: int, path: str, *, headers: dict[str, str] | None = None,
                   timeout_s: float = 5.0, host: str = "127.0.0.1") -> tuple[int, dict[str, str], bytes]:
    async def go() -> tuple[int, dict[str, str], bytes]:
        reader, writer = await asyncio.open_connection(host, port)
        try:
            lines = [f"GET {path} HTTP/1.1", f"Host: {host}:{port}", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
            head = await reader.readuntil(b"\r\n\r\n")
            first, *rest = head.decode("latin-1").split("\r\n")
            status = int(first.split(" ", 2)[1])
            hdrs: dict[str, str] = {}
            for h in rest:
                if ":" in h:
                    k, v = h.split(":", 1)
                    hdrs[k.strip().lower()] = v.strip()
            n = hdrs.get("content-length")
            body = await (reader.readexactly(int(n)) if n is not None else reader.read())
            return status, hdrs, body
        finally:
            writer.close()
    return await asyncio.wait_for(go(), timeout_s)


def daemon_env(fake_port: int, port: int, admin_port: int | None, extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if not k.startswith("VOICEBRIDGE_") and k not in vb_config.SECRET_ENV}
    env.update({
        "VOICEBRIDGE_TOKEN": TOKEN,
        "OPENAI_API_KEY": API_KEY,
        "VOICEBRIDGE_SERVER_HOST": "127.0.0.1",
        "VOICEBRIDGE_SERVER_PORT": str(port),
        "VOICEBRIDGE_OPENAI_URL": f"ws://127.0.0.1:{fake_port}/v1/realtime",
        "VOICEBRIDGE_OPENAI_CONNECT_TIMEOUT_S": "3",
        "VOICEBRIDGE_OPENAI_INSTRUCTIONS": json.dumps(INSTRUCTIONS),
        "VOICEBRIDGE_CALL_HANGUP_GRACE_S": "2",
        "VOICEBRIDGE_OPENAI_CONNECT_BUDGET_S": "3",
        "VOICEBRIDGE_CALL_RESUME_GRACE_S": "0",   # a dropped socket ends its call at once
        # SIGTERM ends calls still open at once (a test that drains sets its own)
        **({"VOICEBRIDGE_SERVER_DRAIN_TIMEOUT_S": "0"} if config_has("server", "drain_timeout_s") else {}),
        "PYTHONUNBUFFERED": "1",
    })
    if admin_port is not None:
        env["VOICEBRIDGE_SERVER_ADMIN_PORT"] = str(admin_port)
    env.update({k: str(v) for k, v in extra.items()})
    return env


async def start_daemon(fake: FakeRealtimeServer | int, tmp_dir: Path, *,
                       nofile: tuple[int, int] | None = None, name: str = "daemon",
                       preexec: Callable[[], None] | None = None, config_path: Path | None = None,
                       **extra_env: Any) -> Daemon:
    """Start the daemon wired to `fake` (a server or its port); bounded wait for `/health`.

    `extra_env`: more environment, e.g. `VOICEBRIDGE_SERVER_MAX_CALLS=20`. `nofile`: (soft, hard)
    RLIMIT_NOFILE for the child; `preexec`: called in the child before exec (e.g. a prctl). The
    admin listener gets a free port when this checkout's configuration has `server.admin_port`
    (`Daemon.admin_port` is None otherwise). `config_path`: the config file (default: the repo's
    config.toml; a test that reloads passes its own copy).
    Raises DaemonStartError (with the daemon's output) if it exits or never answers.
    """
    fake_port = fake if isinstance(fake, int) else fake.port
    port = free_port()
    admin_port = free_port() if config_has("server", "admin_port") else None
    if "VOICEBRIDGE_SERVER_ADMIN_PORT" in extra_env:
        val = int(extra_env["VOICEBRIDGE_SERVER_ADMIN_PORT"])
        admin_port = val if val > 0 else None
    env = daemon_env(fake_port, port, admin_port, extra_env)
    tmp_dir = Path(tmp_dir)
    tmp_dir.mkdir(parents=True, exist_ok=True)
    tag = f"{name}-{uuid.uuid4().hex[:6]}"
    out_path, err_path = tmp_dir / f"{tag}.out.log", tmp_dir / f"{tag}.err.log"

    def limits() -> None:
        if nofile is not None:
            import resource
            resource.setrlimit(resource.RLIMIT_NOFILE, nofile)
        if preexec is not None:
            preexec()

    with open(out_path, "wb") as out, open(err_path, "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "voicebridge", "--config",
                                 str(config_path or ROOT / "config.toml")],
                                env=env, stdout=out, stderr=err, cwd=ROOT,
                                preexec_fn=limits if nofile is not None or preexec is not None else None)
    d = Daemon(proc=proc, port=port, admin_port=admin_port, log_path=out_path, err_path=err_path, env=env)
    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if proc.poll() is not None:
            raise DaemonStartError(f"daemon exited {proc.returncode} at start:\n{d.log_text()[-3000:]}")
        try:
            status, _, _ = await http_get(port, "/health", timeout_s=2.0)
            if status == 200:
                break
        except (OSError, asyncio.TimeoutError, TimeoutError, asyncio.IncompleteReadError, ValueError):
            pass
        if time.monotonic() > deadline:
            d.kill()
            raise DaemonStartError(f"daemon did not answer /health within {START_TIMEOUT_S} s:\n"
                                   f"{d.log_text()[-3000:]}")
        await asyncio.sleep(0.05)
    return d


@asynccontextmanager
async def running_daemon(fake: FakeRealtimeServer | int, tmp_dir: Path, **kw: Any) -> AsyncIterator[Daemon]:
    d = await start_daemon(fake, tmp_dir, **kw)
    try:
        yield d
    finally:
        await d.stop()
        d.kill()


# ------------------------------------------------------------------------------------ clean call


def fake_session_of(fake: FakeRealtimeServer, caller: str) -> FakeSession | None:
    """The fake OpenAI session whose session.update instructions name `caller`."""
    for s in fake.sessions:
        for ev in s.received_of("session.update"):
            instr = (ev.get("session") or {}).get("instructions") or ""
            if caller in instr:
                return s
    return None


@dataclass
class CleanOutcome:
    result: CallResult
    conversation_id: str
    caller: str
    session: FakeSession
    end: dict[str, Any] | None
    seconds: float

    def figures(self) -> dict[str, Any]:
        return {"clean_call": "ok", "clean_call_s": round(self.seconds, 2),
                "clean_chunks_up": self.result.chunks_sent, "clean_chunks_down": self.result.chunks_received,
                "clean_bot_audio_ms": round(sum(s.received_ms for s in self.result.streams), 1)}


def new_caller() -> str:
    return "+1555" + "".join(random.choice("0123456789") for _ in range(8))


async def clean_call(daemon: Daemon, fake: FakeRealtimeServer, *, script: list[ScriptItem] | None = None,
                     formats: list[str] | None = None, check_log: bool = True,
                     accept_timeout_s: float = 5.0, caller: str | None = None,
                     conversation_id: str | None = None) -> CleanOutcome:
    """One normal call through `daemon` (speak 600 ms, wait for the answer, hang up); asserts it
    completed with no violation and no frame lost either way:
    caller chunks sent == `input_audio_buffer.append` the fake received for that session, and bot
    audio the caller received == audio the fake sent for the responses not barged in."""
    cid = conversation_id or "clean-" + uuid.uuid4().hex[:12]
    caller = caller or new_caller()
    t0 = time.monotonic()
    res = await run_call(CallerConfig(
        url=daemon.url, token=TOKEN, conversation_id=cid, caller=caller,
        formats=formats or ["raw/lpcm16_24"], accept_timeout_s=accept_timeout_s,
        script=script or [Speak(600), WaitForBot(6000), Silence(100)]))
    seconds = time.monotonic() - t0
    what = f"clean call {cid}: end={res.end_reason} connect_error={res.connect_error} " \
           f"session_error={res.session_error} violations={res.violations[:5]}"
    assert res.end_reason == "caller-hangup", what
    assert res.violations == [] and res.violations_suppressed == 0, what
    assert res.script_timeouts == 0, what
    assert res.streams, what
    assert not any(a.get("name") in ("hangup", "transfer") for a in res.received_activities), \
        (what, res.received_activities)
    # the fake's side of this call, once its socket is closed (all appends received)
    session: FakeSession | None = None
    end = time.monotonic() + 5.0
    while time.monotonic() < end:
        session = fake_session_of(fake, caller)
        if session is not None and session.closed_at is not None:
            break
        await asyncio.sleep(0.02)
    assert session is not None, f"{what}: no fake OpenAI session for caller {caller}"
    assert session.closed_at is not None, f"{what}: OpenAI socket still open 5 s after the call"
    appended = len(session.received_of("input_audio_buffer.append"))
    assert appended == res.chunks_sent, f"{what}: caller sent {res.chunks_sent} chunks, fake got {appended}"
    sent_ms = sum(r.audio_ms_sent for r in session.responses if r.status == "completed")
    got_ms = sum(s.received_ms for s in res.streams)
    assert session.responses and all(r.status == "completed" for r in session.responses), \
        f"{what}: responses {[(r.id, r.status) for r in session.responses]}"
    assert abs(sent_ms - got_ms) <= 2 * len(res.streams), f"{what}: fake sent {sent_ms} ms, caller got {got_ms} ms"
    end_ev = None
    if check_log:
        end_ev = await daemon.wait_event("call.end", 5.0, call_id=cid)
        assert end_ev is not None, f"{what}: no call.end logged"
        assert end_ev["reason"] == "vaic_session_end", end_ev
        assert end_ev["frames_up"] == res.chunks_sent and end_ev["frames_down"] == res.chunks_received, end_ev
    return CleanOutcome(res, cid, caller, session, end_ev, seconds)


# ------------------------------------------------------------------------------------ measuring


class RssSampler:
    """Samples the daemon's RSS every `interval_s` in the background; `.max_kib`, `.baseline_kib`."""

    def __init__(self, daemon: Daemon, interval_s: float = 0.05) -> None:
        self.daemon = daemon
        self.interval_s = interval_s
        self.baseline_kib = daemon.rss_kib()
        self.max_kib = self.baseline_kib
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            try:
                self.max_kib = max(self.max_kib, self.daemon.rss_kib())
            except (OSError, KeyError):
                return
            await asyncio.sleep(self.interval_s)

    def __enter__(self) -> "RssSampler":
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
        try:
            self.max_kib = max(self.max_kib, self.daemon.rss_kib())
        except (OSError, KeyError):
            pass

    @property
    def growth_kib(self) -> int:
        return self.max_kib - self.baseline_kib


def figures(test: str, **numbers: Any) -> None:
    """Append one JSON line {test, ...numbers} to $VB_HARDENING_FIGURES (no effect when unset)."""
    path = os.environ.get("VB_HARDENING_FIGURES")
    if not path:
        return
    with open(path, "a") as f:
        f.write(json.dumps({"test": test, **numbers}, default=str) + "\n")


async def gather_bounded(timeout_s: float, *aws: Any) -> list[Any]:
    return await asyncio.wait_for(asyncio.gather(*aws), timeout_s)


Predicate = Callable[[], bool]


async def wait_until(pred: Predicate, timeout_s: float, step_s: float = 0.02) -> bool:
    """`conftest.wait_for` with the harness's default step."""
    return await wait_for(pred, timeout_s, step_s)
