"""systemd integration: the sd_notify `Notifier` and `Heartbeat` against real unix datagram sockets,
journald priority prefixes, the real daemon under a test NOTIFY_SOCKET (READY, WATCHDOG, STATUS with
the call count, STOPPING), the unit file through `systemd-analyze verify`, and the daemon with
W^X memory enforced (what `MemoryDenyWriteExecute=yes` asks for)."""

from __future__ import annotations

import asyncio
import ctypes
import io
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Callable, Iterator

import pytest

from tests.daemon_harness import ROOT, clean_call, running_fake, start_daemon
from voicebridge.log import connected_to_journal, get_logger, setup
from voicebridge.sim.caller import Silence, Speak, WaitForBot
from voicebridge.systemd import STATUS_CHARS, Heartbeat, Notifier

UNIT = ROOT / "deploy" / "voicebridge.service"
MAX_DATAGRAMS = 10_000     # a receiver never holds more


class Receiver:
    """The systemd side of NOTIFY_SOCKET: a bound, non-blocking unix datagram socket."""

    def __init__(self, address: str) -> None:
        """`address`: a path, or `@name` for an abstract socket (as in NOTIFY_SOCKET)."""
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind("\0" + address[1:] if address.startswith("@") else address)
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        """Read every datagram waiting; each becomes {KEY: VALUE}. Returns the new ones."""
        new: list[dict[str, str]] = []
        while len(self.messages) + len(new) < MAX_DATAGRAMS:
            try:
                data = self.sock.recv(4096)
            except BlockingIOError:
                break
            new.append(dict(line.split("=", 1) for line in data.decode().split("\n")))
        self.messages += new
        return new

    def with_key(self, key: str) -> list[dict[str, str]]:
        return [m for m in self.messages if key in m]

    async def wait(self, pred: Callable[[], bool], timeout_s: float = 10.0) -> bool:
        """Drain until `pred()` holds or `timeout_s` passed (bounded)."""
        end = time.monotonic() + timeout_s
        while True:
            self.drain()
            if pred():
                return True
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.02)

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def short_dir() -> Iterator[Path]:
    """A directory with a short path: a unix socket path must fit in 108 bytes."""
    d = Path(tempfile.mkdtemp(prefix="vbsd-", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@pytest.fixture
def path_receiver(short_dir: Path) -> Iterator[Receiver]:
    r = Receiver(str(short_dir / "notify"))
    yield r
    r.close()


@pytest.fixture
def abstract_receiver() -> Iterator[Receiver]:
    r = Receiver(f"@vb-test-{uuid.uuid4().hex}")
    yield r
    r.close()


# ------------------------------------------------------------------------------ Notifier


@pytest.mark.parametrize("kind", ["path", "abstract"])
def test_notifier_sends_each_message(kind: str, path_receiver: Receiver, abstract_receiver: Receiver) -> None:
    rx = path_receiver if kind == "path" else abstract_receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": rx.address})
    assert n.enabled
    assert n.ready("listening on 127.0.0.1:1, 0 calls")
    assert n.ready()
    assert n.status("3 calls")
    assert n.watchdog()
    before_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.reloading()
    after_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert n.stopping()
    got = rx.drain()
    n.close()
    assert got[:4] == [{"READY": "1", "STATUS": "listening on 127.0.0.1:1, 0 calls"}, {"READY": "1"},
                       {"STATUS": "3 calls"}, {"WATCHDOG": "1"}]
    assert got[4]["RELOADING"] == "1" and set(got[4]) == {"RELOADING", "MONOTONIC_USEC"}
    assert before_us <= int(got[4]["MONOTONIC_USEC"]) <= after_us
    assert got[5:] == [{"STOPPING": "1"}]
    assert n.sent == 6 and n.failures == 0


def test_notifier_status_is_one_bounded_line(path_receiver: Receiver) -> None:
    n = Notifier.from_env({"NOTIFY_SOCKET": path_receiver.address})
    n.status("two\nlines\nREADY=1 " + "x" * 1000)   # a newline would start a new assignment
    (got,) = path_receiver.drain()
    n.close()
    assert list(got) == ["STATUS"]
    assert got["STATUS"].startswith("two lines READY=1 x") and len(got["STATUS"]) == STATUS_CHARS


def test_notifier_without_notify_socket_is_a_noop() -> None:
    n = Notifier.from_env({"WATCHDOG_USEC": "400000"})
    assert not n.enabled
    assert not any([n.ready("x"), n.status("x"), n.stopping(), n.reloading(), n.watchdog()])
    assert n.watchdog_interval_s() is None
    assert n._sock is None and n.sent == 0 and n.failures == 0   # no socket was even opened
    assert not Notifier.from_env({"NOTIFY_SOCKET": ""}).enabled


def test_notifier_failed_send_never_raises_and_logs_once(short_dir: Path) -> None:
    out = io.StringIO()
    setup("debug", stream=out)
    n = Notifier.from_env({"NOTIFY_SOCKET": str(short_dir / "nobody-listens")})
    results = [n.ready("x"), n.watchdog(), n.status("y"), n.stopping()]
    n.close()
    assert results == [False] * 4 and n.failures == 4 and n.sent == 0
    lines = [json.loads(line) for line in out.getvalue().splitlines()]
    failed = [e for e in lines if e["event"] == "systemd.notify_failed"]
    assert len(failed) == 1, lines
    assert failed[0]["level"] == "warning" and failed[0]["error_type"] == "FileNotFoundError"
    assert failed[0]["message"] == "READY"


def test_watchdog_interval_is_half_of_watchdog_usec() -> None:
    base = {"NOTIFY_SOCKET": "@vb-unused"}
    assert Notifier.from_env({**base, "WATCHDOG_USEC": "400000"}).watchdog_interval_s() == 0.2
    assert Notifier.from_env({**base, "WATCHDOG_USEC": "20000000",
                              "WATCHDOG_PID": str(os.getpid())}).watchdog_interval_s() == 10.0
    # the pings are meant for another process (e.g. we are a child of the service's main process)
    assert Notifier.from_env({**base, "WATCHDOG_USEC": "400000",
                              "WATCHDOG_PID": str(os.getpid() + 1)}).watchdog_interval_s() is None
    for bad in ("", "0", "-5", "abc", "1.5"):
        assert Notifier.from_env({**base, "WATCHDOG_USEC": bad}).watchdog_interval_s() is None, bad
    assert Notifier.from_env(base).watchdog_interval_s() is None


# ------------------------------------------------------------------------------ Heartbeat


async def test_heartbeat_pings_from_loop_timers_and_sends_status_only_on_change(path_receiver: Receiver) -> None:
    rx = path_receiver
    n = Notifier.from_env({"NOTIFY_SOCKET": rx.address, "WATCHDOG_USEC": "40000"})   # ping every 20 ms
    count = {"calls": 0}
    texts: list[str] = []

    def status() -> str:
        texts.append(f"{count['calls']} calls")
        return texts[-1]

    hb = Heartbeat(n, asyncio.get_running_loop(), status, status_interval_s=0.02)
    hb.start("0 calls")
    try:
        assert await rx.wait(lambda: len(rx.with_key("WATCHDOG")) >= 3 and len(texts) >= 3)
        assert rx.with_key("STATUS") == []             # "0 calls" was already sent with READY
        count["calls"] = 2
        assert await rx.wait(lambda: rx.with_key("STATUS") != [])
        seen = len(texts)
        assert await rx.wait(lambda: len(texts) >= seen + 3)
        assert rx.with_key("STATUS") == [{"STATUS": "2 calls"}]   # once, though asked again
        # a blocked event loop sends nothing: the pings are loop timers, not a thread
        rx.drain()
        before = len(rx.messages)
        time.sleep(0.3)          # blocks the loop for 15 ping intervals
        rx.drain()
        assert len(rx.messages) == before
        pings = len(rx.with_key("WATCHDOG"))
        assert await rx.wait(lambda: len(rx.with_key("WATCHDOG")) >= pings + 2)   # resumed with the loop
    finally:
        hb.stop()
    rx.drain()
    after_stop = len(rx.messages)
    await asyncio.sleep(0.1)
    rx.drain()
    assert len(rx.messages) == after_stop               # stop() ends both chains
    n.close()


async def test_heartbeat_is_inert_without_notify_socket() -> None:
    called: list[int] = []
    hb = Heartbeat(Notifier.from_env({}), asyncio.get_running_loop(), lambda: str(called.append(1)),
                   status_interval_s=0.01)
    hb.start()
    await asyncio.sleep(0.05)
    hb.stop()
    assert called == [] and hb._status_handle is None and hb._watchdog_handle is None


# ------------------------------------------------------------------------------ journald


def _file_stream(path: Path) -> io.TextIOWrapper:
    return open(path, "w", buffering=1, encoding="utf-8")


def _lines_of(stream: io.TextIOWrapper, path: Path) -> list[str]:
    stream.flush()
    return path.read_text().splitlines()


def test_connected_to_journal_compares_device_and_inode(tmp_path: Path) -> None:
    path = tmp_path / "out"
    with _file_stream(path) as f, open(tmp_path / "other", "w") as other:
        st, ot = os.fstat(f.fileno()), os.fstat(other.fileno())
        assert connected_to_journal(f, {"JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"})
        assert not connected_to_journal(f, {"JOURNAL_STREAM": f"{ot.st_dev}:{ot.st_ino}"})
        for bad in ("", "garbage", "1:", ":2", "a:b", f"{st.st_dev}"):
            assert not connected_to_journal(f, {"JOURNAL_STREAM": bad}), bad
        assert not connected_to_journal(f, {})
    assert not connected_to_journal(io.StringIO(), {"JOURNAL_STREAM": "1:2"})   # no descriptor


def _log_every_level() -> None:
    log = get_logger()
    log.debug("t.debug")
    log.info("t.info", n=1)
    log.warning("t.warning")
    log.error("t.error")
    log.critical("t.critical")
    logging.getLogger("websockets.test").warning("library %s", "record")   # the stdlib path


def test_journal_prefix_on_when_stdout_is_the_journal(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out"
    with _file_stream(path) as f:
        st = os.fstat(f.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        setup("debug", stream=f)
        _log_every_level()
        lines = _lines_of(f, path)
    monkeypatch.delenv("JOURNAL_STREAM")
    setup("info")
    prefixes = []
    for line in lines:
        m = re.fullmatch(r"<(\d)>(\{.*\})", line)
        assert m, line
        body = json.loads(m.group(2))
        assert m.group(2) == json.dumps(body)           # the JSON itself is unchanged
        prefixes.append((body["event"], int(m.group(1))))
    assert prefixes == [("t.debug", 7), ("t.info", 6), ("t.warning", 4), ("t.error", 3),
                        ("t.critical", 2), ("library record", 4)]


def test_journal_prefix_off_otherwise(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "out"
    with _file_stream(path) as f, open(tmp_path / "elsewhere", "w") as other:
        ot = os.fstat(other.fileno())
        # inherited from a parent whose journal stream is not our stdout: no prefix
        monkeypatch.setenv("JOURNAL_STREAM", f"{ot.st_dev}:{ot.st_ino}")
        setup("debug", stream=f)
        _log_every_level()
        monkeypatch.delenv("JOURNAL_STREAM")
        setup("debug", stream=f)
        _log_every_level()
        lines = _lines_of(f, path)
    setup("info")
    assert len(lines) == 12
    for line in lines:
        assert line.startswith("{") and line == json.dumps(json.loads(line)), line


def test_journal_prefix_forced_by_setup_argument() -> None:
    out = io.StringIO()
    setup("info", stream=out, journal=True)
    get_logger().warning("t.forced")
    setup("info", stream=out, journal=False)
    get_logger().warning("t.plain")
    setup("info")
    first, second = out.getvalue().splitlines()
    assert first.startswith('<4>{') and json.loads(first[3:])["event"] == "t.forced"
    assert json.loads(second)["event"] == "t.plain"


@pytest.mark.parametrize("journal", [True, False])
def test_cli_detects_the_journal_stream(tmp_path: Path, journal: bool) -> None:
    """The real CLI with stdout a file that JOURNAL_STREAM does or does not name; its port is
    taken, so it logs `server.nofile` (info) and `server.start_failed` (error) and exits 1."""
    path = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOICEBRIDGE_") and k != "JOURNAL_STREAM"}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        env.update(VOICEBRIDGE_TOKEN="t", OPENAI_API_KEY="sk-test", VOICEBRIDGE_SERVER_HOST="127.0.0.1",
                   VOICEBRIDGE_SERVER_PORT=str(taken.getsockname()[1]), VOICEBRIDGE_SERVER_ADMIN_PORT="-1")
        with open(path, "wb") as out:
            if journal:
                st = os.fstat(out.fileno())
                env["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
            r = subprocess.run([sys.executable, "-m", "voicebridge", "--config", str(ROOT / "config.toml")],
                               env=env, stdout=out, stderr=subprocess.PIPE, timeout=60, cwd=ROOT)
    assert r.returncode == 1, r.stderr
    lines = path.read_text().splitlines()
    assert lines, r.stderr
    seen = {}
    for line in lines:
        m = re.fullmatch(r"<(\d)>(\{.*\})", line) if journal else re.fullmatch(r"()(\{.*\})", line)
        assert m, line
        seen[json.loads(m.group(2))["event"]] = m.group(1)
    assert seen.get("server.nofile") == ("6" if journal else "")
    assert seen.get("server.start_failed") == ("3" if journal else ""), seen


# ------------------------------------------------------------------------------ the real daemon


async def test_daemon_notifies_ready_watchdog_status_stopping(tmp_path: Path, path_receiver: Receiver) -> None:
    rx = path_receiver
    async with running_fake() as fake:
        d = await start_daemon(fake, tmp_path, NOTIFY_SOCKET=rx.address, WATCHDOG_USEC="400000")
        try:
            assert await rx.wait(lambda: rx.with_key("READY") != []), rx.messages
            ready = rx.with_key("READY")[0]
            # the status was made from the bound listener: READY=1 comes after listening
            assert ready == {"READY": "1", "STATUS": f"listening on 127.0.0.1:{d.port}, 0 calls"}
            assert d.events("server.listening")
            assert await rx.wait(lambda: len(rx.with_key("WATCHDOG")) >= 3), rx.messages
            assert all(m == {"WATCHDOG": "1"} for m in rx.with_key("WATCHDOG"))
            # a call of several seconds: the once-a-second STATUS= shows it, then its end
            call = asyncio.ensure_future(clean_call(d, fake, script=[Speak(2000), WaitForBot(6000), Silence(500)]))
            one = f"listening on 127.0.0.1:{d.port}, 1 call"
            assert await rx.wait(lambda: {"STATUS": one} in rx.messages, 15.0), rx.messages
            assert await rx.wait(call.done, 30.0)   # reading on: the socket queues only ~10 datagrams
            call.result()
            assert await rx.wait(lambda: rx.with_key("STATUS")[-1]["STATUS"].endswith(", 0 calls")), rx.messages
            pings = len(rx.with_key("WATCHDOG"))
            assert await rx.wait(lambda: len(rx.with_key("WATCHDOG")) > pings)   # still pinging after the call
            assert not rx.with_key("STOPPING")
            d.signal(signal.SIGTERM)
            assert await d.wait_exit(20.0) == 0
            rx.drain()
            assert rx.with_key("STOPPING") == [{"STOPPING": "1"}]
            assert rx.messages.index({"STOPPING": "1"}) > rx.messages.index(ready)
            assert not d.events("systemd.notify_failed") and d.non_json_lines() == []
        finally:
            await d.stop()
            d.kill()


async def test_daemon_without_notify_socket_notifies_nothing(tmp_path: Path, path_receiver: Receiver) -> None:
    """The same daemon with WATCHDOG_USEC but no NOTIFY_SOCKET: nothing is sent anywhere, nothing logged."""
    async with running_fake() as fake:
        d = await start_daemon(fake, tmp_path, WATCHDOG_USEC="400000")
        try:
            await clean_call(d, fake)
            assert await d.stop() == 0
            assert not d.events("systemd.notify_failed") and d.non_json_lines() == []
            assert path_receiver.drain() == []
        finally:
            d.kill()


# ------------------------------------------------------------------------------ W^X (MemoryDenyWriteExecute)

PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _refuse_wx() -> None:
    """In the child before exec: no memory may ever be writable and executable (Linux >= 6.3)."""
    if _libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def _mdwe_works() -> bool:
    code = ("import mmap\ntry:\n    mmap.mmap(-1, 4096, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)\n"
            "    print('mapped')\nexcept PermissionError:\n    print('refused')\n")
    try:
        r = subprocess.run([sys.executable, "-c", code], preexec_fn=_refuse_wx, capture_output=True,
                           text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return False
    return r.stdout.strip() == "refused"


async def test_daemon_runs_a_call_with_write_xor_execute_enforced(tmp_path: Path) -> None:
    """What MemoryDenyWriteExecute=yes in deploy/voicebridge.service relies on: CPython, uvloop,
    numpy, soxr and msgspec never need writable+executable memory."""
    if not _mdwe_works():
        pytest.skip("prctl(PR_SET_MDWE) not available (Linux < 6.3)")
    async with running_fake() as fake:
        d = await start_daemon(fake, tmp_path, preexec=_refuse_wx)
        try:
            await clean_call(d, fake)
            await clean_call(d, fake, formats=["raw/mulaw"])    # the resampling and µ-law paths too
            assert await d.stop() == 0
            assert d.non_json_lines() == []
        finally:
            d.kill()


# ------------------------------------------------------------------------------ the unit file


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze not installed")
def test_unit_file_verifies_clean(tmp_path: Path) -> None:
    text = UNIT.read_text()
    exe = Path(sys.executable).parent / "voicebridge"
    assert exe.exists(), exe
    assert "\nExecStart=/opt/voicebridge/.venv/bin/voicebridge --config /etc/voicebridge/config.toml\n" in text
    local = tmp_path / "voicebridge.service"
    local.write_text(text.replace("ExecStart=/opt/voicebridge/.venv/bin/voicebridge", f"ExecStart={exe}"))
    r = subprocess.run(["systemd-analyze", "verify", str(local)], capture_output=True, text=True, timeout=60)
    ours = [line for line in (r.stdout + r.stderr).splitlines()
            if "voicebridge" in line or str(tmp_path) in line]
    assert r.returncode == 0 and ours == [], r.stdout + r.stderr
    # the check can fail: a typo in our unit is reported
    (tmp_path / "typo.service").write_text(local.read_text().replace("Type=notify", "Type=notfy"))
    r = subprocess.run(["systemd-analyze", "verify", str(tmp_path / "typo.service")],
                       capture_output=True, text=True, timeout=60)
    assert "notfy" in r.stdout + r.stderr


def test_unit_file_settings() -> None:
    """What the README promises about the unit (and what systemd-analyze cannot judge)."""
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            k, v = line.split("=", 1)
            keys.setdefault(k, []).append(v)
    one = {k: v[-1] for k, v in keys.items()}
    assert one["Type"] == "notify" and one["NotifyAccess"] == "main"
    assert one["ExecReload"] == "/bin/kill -HUP $MAINPID"
    assert one["WatchdogSec"] == "20s" and one["Restart"] == "on-failure"
    assert one["TimeoutStopSec"] == "90s" and one["KillMode"] in ("mixed", "main")
    assert one["EnvironmentFile"] == "/etc/voicebridge/voicebridge.env"
    assert one["CapabilityBoundingSet"] == "" and one["LimitNOFILE"] == "65536"
    assert one["RestrictAddressFamilies"].split() == ["AF_INET", "AF_INET6", "AF_UNIX"]
    for k in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "PrivateDevices", "ProtectKernelTunables",
              "ProtectKernelModules", "ProtectKernelLogs", "LockPersonality", "MemoryDenyWriteExecute",
              "DynamicUser"):
        assert one[k] == "yes", k
    assert one["ProtectSystem"] == "strict"
    env_names = [line.split("=", 1)[0] for line in (ROOT / "deploy" / "voicebridge.env.example").read_text().splitlines()
                 if line and not line.startswith("#")]
    assert env_names == ["VOICEBRIDGE_TOKEN", "VOICEBRIDGE_ADMIN_TOKEN", "OPENAI_API_KEY", "AZURE_OPENAI_API_KEY"]
    assert all(line.endswith("=") for line in (ROOT / "deploy" / "voicebridge.env.example").read_text().splitlines()
               if line and not line.startswith("#"))   # names only, never a value
