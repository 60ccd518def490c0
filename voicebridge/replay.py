"""Replay the caller side of a recorded call through a bridge and compare the two timelines.

    python -m voicebridge.replay FILE [--bridge ws://127.0.0.1:PORT/path] [--token T] [--speed 1.0]
                                      [--config config.toml] [--save PATH] [--all-tools] [--json]

What it does:
1. reads FILE (a `.vbrec` from `[recording] dir`, see `voicebridge.recording`);
2. without `--bridge`: starts, in this process on 127.0.0.1, the fake OpenAI Realtime server and
   a bridge: the settings of `--config` if given, else the defaults with what the recording shows
   of the recorded bridge's (turn detection, greeting, the call tools its profile offered:
   `timeline.bridge_overrides_for`); always with its own token, the fake's URL, recording on
   into a private temporary directory, and no transcripts, OAuth or workers. The fake answers as
   the recorded model did (`timeline.fake_config_for`: the greeting's and each answer's length,
   transcripts, tool calls, think time);
   with `--bridge`: uses that running bridge (which must talk to a fake model: a replay against
   the real API would cost money and hear someone's voice again);
3. dials the bridge as VAIC and sends the recorded VAIC frames (session.initiate, activities,
   userStream.*, every audio chunk) at their recorded times (divided by `--speed`), under a new
   conversationId. It waits for the bridge's answers a real VAIC waits for (session.accepted,
   userStream.started/stopped; and a session.end VAIC sent after the bot's hangup or transfer
   waits for the replayed bridge's hangup or transfer, at most 5 s) and shifts the rest of the
   schedule by any extra delay, so a slower bridge never receives frames too early. A VAIC socket lost in the recording (and a
   session.resume after it) is lost (and resumed) at the same time;
4. prints the recorded timeline and the replayed one side by side (times in ms since the call
   started, aligned on event kinds, with the replay's offset), then the counts compared: caller
   turns, barge-ins, play streams, bot activities (hangup, transfer, sendDtmf) and, when the
   replay's own bridge recorded the OpenAI side too, responses, cancelled responses, truncates
   and tool calls. With `--bridge` only what the caller sees is compared.

Exit status: 0 the counts agree, 1 they differ, 2 an error (unreadable file, no connection).

Not reproduced: what the caller did in reaction to the bot is replayed at its recorded time, not
in reaction to the replayed bot (e.g. `playFinished`, or a caller who waited for the answer to
end before speaking); a real model's answers are stood in for by tones of the same length.
Function calls other than the call tools (`end_call`, `transfer_call`, `send_dtmf`) and MCP calls
are left out unless `--all-tools`: with `--config`, a webhook tool would run against its real URL.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from typing import Any

import uvloop
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus

from . import recording
from .recording import NOTE, VAIC_IN, VAIC_OUT, Record, Recording, RecordingError, read_recording
from .timeline import (COUNTS, OPENAI_COUNTS, VAIC_COUNTS, Event, bridge_overrides_for, differences,
                       fake_config_for, side_by_side, summarize, timeline)

ACCEPT_TIMEOUT_S = 5.0      # a reply VAIC waits for (session.accepted, userStream.started, ...)
END_TIMEOUT_S = 5.0         # after the last frame: the bridge's close
MAX_SIZE = 16 * 1024 * 1024
# request -> the replies VAIC waits for
_GATES = {"session.initiate": ("session.accepted", "session.error"),
          "session.resume": ("session.accepted", "session.error"),
          "userStream.start": ("userStream.started",),
          "userStream.stop": ("userStream.stopped",)}


class ReplayError(RuntimeError):
    """The replay could not run (connection refused, HTTP 401, ...)."""


@dataclass
class Step:
    t_ns: int                        # recorded time
    what: str                        # "send" | "drop" | "resume"
    text: str = ""
    gate: tuple[str, ...] = ()       # replies to wait for before a later step ...
    gate_t_ns: int | None = None     # ... recorded at this time
    after: tuple[str, int] | None = None   # VAIC's reaction to this bot activity, recorded then


@dataclass
class Capture:
    """What the replaying caller sent and received, as a `Recording` of VAIC frames."""
    records: list[Record] = field(default_factory=list)
    conversation_id: str = ""
    connect_error: str = ""
    gate_timeouts: int = 0
    shift_ms: float = 0.0            # how much later than recorded the schedule ended up

    def recording(self) -> Recording:
        return Recording("(caller-side capture)", {"format": recording.FORMAT_VERSION}, self.records)


def _msg_type(text: str) -> str:
    if text.startswith('{"type":"'):
        return text[9:text.find('"', 9)]
    try:
        msg = json.loads(text)
    except ValueError:
        return ""
    return str(msg.get("type") or "") if isinstance(msg, dict) else ""


def plan(rec: Recording, conversation_id: str | None) -> tuple[list[Step], str]:
    """The caller's steps from `rec`, with the conversationId replaced (None: kept)."""
    old = str(rec.header.get("call_id") or "")
    for r in rec.records:
        if r.kind == VAIC_IN and _msg_type(r.text.decode("utf-8", "replace")) == "session.initiate":
            msg = r.json()
            if isinstance(msg, dict) and msg.get("conversationId"):
                old = str(msg["conversationId"])
            break
    new = conversation_id if conversation_id is not None else old
    old_q, new_q = json.dumps(old), json.dumps(new)
    replies = [(r.t_ns, _msg_type(r.frame()) if r.audio is None else "") for r in rec.records if r.kind == VAIC_OUT]
    ending = [(r.t_ns, name) for r in rec.records if r.kind == VAIC_OUT and r.audio is None
              for name in _activity_names(r.text) if name in ("hangup", "transfer")]
    steps: list[Step] = []
    for r in rec.records:
        if r.kind == VAIC_IN:
            text = r.frame()
            if old and old_q in text:
                text = text.replace(old_q, new_q)
            typ = _msg_type(text) if r.audio is None else "userStream.chunk"
            step = Step(r.t_ns, "send", text)
            if typ == "session.end":      # after the bot's hangup / transfer: VAIC's answer to it
                before = [(t, name) for t, name in ending if t <= r.t_ns]
                if before:
                    step.after = (f"activity:{before[-1][1]}", before[-1][0])
            if typ in _GATES:
                step.gate = _GATES[typ]
                step.gate_t_ns = next((t for t, ty in replies if t >= r.t_ns and ty in step.gate), None)
            steps.append(step)
        elif r.kind == NOTE:
            ev = (r.json() or {}).get("event")
            if ev == "vaic_closed":
                steps.append(Step(r.t_ns, "drop"))
            elif ev == "vaic_attached":
                step = Step(r.t_ns, "resume", json.dumps({"type": "session.resume", "conversationId": new}),
                            gate=_GATES["session.resume"])
                step.gate_t_ns = next((t for t, ty in replies if t >= r.t_ns and ty == "session.accepted"), None)
                steps.append(step)
    return steps, new


def _activity_names(text: bytes) -> list[str]:
    if b'"activities"' not in text[:40]:
        return []
    try:
        msg = json.loads(text)
    except ValueError:
        return []
    acts = msg.get("activities") if isinstance(msg, dict) else None
    return [str(a.get("name")) for a in acts or [] if isinstance(a, dict)]


class _Caller:
    def __init__(self, url: str, token: str | None, speed: float, cap: Capture) -> None:
        self.url, self.token, self.speed, self.cap = url, token, speed, cap
        self.ws: ClientConnection | None = None
        self.t0 = time.monotonic_ns()
        self.got: dict[str, asyncio.Event] = {}
        self.closed = asyncio.Event()
        self.ended = False                     # session.error, or the bridge closed the call
        self.readers: set[asyncio.Task[None]] = set()

    def _now(self) -> int:
        return time.monotonic_ns() - self.t0

    async def _connect(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"} if self.token else None
        try:
            self.ws = await connect(self.url, additional_headers=headers, compression=None,
                                    max_size=MAX_SIZE, open_timeout=ACCEPT_TIMEOUT_S, proxy=None)
        except InvalidStatus as e:
            raise ReplayError(f"{self.url}: HTTP {e.response.status_code}") from None
        except (OSError, InvalidHandshake, TimeoutError) as e:
            raise ReplayError(f"{self.url}: {type(e).__name__}: {e}") from None
        self.closed.clear()
        task = asyncio.get_running_loop().create_task(self._read(self.ws))
        self.readers.add(task)
        task.add_done_callback(self.readers.discard)

    async def _read(self, ws: ClientConnection) -> None:
        try:
            async for frame in ws:
                text = frame if isinstance(frame, str) else frame.decode("utf-8", "replace")
                now = self._now()
                data = text.encode()
                split = recording.split_audio(data) if text.startswith('{"type":"playStream.chunk"') else None
                if split is not None:
                    self.cap.records.append(Record(VAIC_OUT, now, recording.AUDIO, split[0], split[2], split[1]))
                    continue
                self.cap.records.append(Record(VAIC_OUT, now, 0, data))
                typ = _msg_type(text)
                for key in [typ] + [f"activity:{n}" for n in _activity_names(data)]:
                    ev = self.got.get(key)
                    if ev is not None:
                        ev.set()
                if typ == "session.error":
                    self.ended = True
        except ConnectionClosed:
            pass
        finally:
            if ws is self.ws:
                self.closed.set()

    def _event(self, typ: str) -> asyncio.Event:
        ev = self.got[typ] = asyncio.Event()
        return ev

    async def run(self, steps: list[Step]) -> None:
        for name in ("hangup", "transfer"):
            self._event(f"activity:{name}")
        await self._connect()
        self.t0 = time.monotonic_ns()
        shift_ns = 0
        gate: tuple[list[asyncio.Event], int] | None = None
        for step in steps:
            if gate is not None and step.t_ns >= gate[1]:
                waits, recorded = gate
                gate = None
                deadline = time.monotonic() + ACCEPT_TIMEOUT_S
                while not any(e.is_set() for e in waits) and not self.closed.is_set():
                    if time.monotonic() >= deadline:
                        self.cap.gate_timeouts += 1
                        break
                    await asyncio.sleep(0.002)
                late = self._now() - (int(recorded / self.speed) + shift_ns)
                if late > 0:
                    shift_ns += late
            if step.after is not None:    # VAIC answered the bot's activity: wait for it here too
                ev = self.got[step.after[0]]
                try:
                    await asyncio.wait_for(ev.wait(), END_TIMEOUT_S)
                except (asyncio.TimeoutError, TimeoutError):
                    self.cap.gate_timeouts += 1
                else:
                    late = self._now() - (int(step.after[1] / self.speed) + shift_ns)
                    if late > 0:
                        shift_ns += late
            delay = (self.t0 + int(step.t_ns / self.speed) + shift_ns - time.monotonic_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            if self.ended:
                break
            if step.what == "drop":
                if self.ws is not None:
                    self.ws.transport.abort()
                    self.cap.records.append(Record(NOTE, self._now(), 0, b'{"event":"vaic_closed"}'))
                continue
            if step.what == "resume":
                await self._connect()
                self.cap.records.append(Record(NOTE, self._now(), 0, b'{"event":"vaic_attached"}'))
            if self.ws is None or self.closed.is_set():
                break
            waits = [self._event(t) for t in step.gate]
            try:
                await self.ws.send(step.text)
            except ConnectionClosed:
                break
            self._capture_sent(step.text)
            if waits and step.gate_t_ns is not None:
                gate = (waits, step.gate_t_ns)
        self.cap.shift_ms = shift_ns / 1e6
        try:
            await asyncio.wait_for(self.closed.wait(), END_TIMEOUT_S)
        except (asyncio.TimeoutError, TimeoutError):
            pass
        if self.ws is not None:
            await self.ws.close()
        for task in list(self.readers):
            task.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)

    def _capture_sent(self, text: str) -> None:
        data = text.encode()
        split = recording.split_audio(data) if '"userStream.chunk"' in text[:40] else None
        if split is not None:
            self.cap.records.append(Record(VAIC_IN, self._now(), recording.AUDIO, split[0], split[2], split[1]))
        else:
            self.cap.records.append(Record(VAIC_IN, self._now(), 0, data))


async def replay_caller(rec: Recording, url: str, token: str | None, speed: float = 1.0,
                        conversation_id: str | None = None) -> Capture:
    """Send the caller side of `rec` to the bridge at `url`; what came back, as a `Capture`.
    Raises `ReplayError` when the bridge cannot be reached or refuses the connection."""
    if speed <= 0:
        raise ValueError("speed must be > 0")
    steps, cid = plan(rec, conversation_id)
    cap = Capture(conversation_id=cid)
    await _Caller(url, token, speed, cap).run(steps)
    return cap


@dataclass
class Outcome:
    recorded: list[Event]
    replayed: list[Event]
    compared: tuple[str, ...]
    recorded_counts: dict[str, float]
    replayed_counts: dict[str, float]
    diffs: list[str]
    mode: str
    capture: Capture
    replayed_path: str | None = None
    notes: list[str] = field(default_factory=list)
    bridge_log: str = ""


def _env_overrides() -> dict[str, str]:
    """The environment's VOICEBRIDGE_* overrides, minus the secrets (the replay has its own)."""
    from .config import SECRET_ENV
    return {k: v for k, v in os.environ.items() if k.startswith("VOICEBRIDGE_") and k not in SECRET_ENV
            and not k.startswith(("VOICEBRIDGE_RECORDING_", "VOICEBRIDGE_TRANSCRIPTS_", "VOICEBRIDGE_OAUTH_"))}


async def replay_own(rec: Recording, *, config_path: str | None = None, speed: float = 1.0,
                     save: str | None = None, all_tools: bool = False,
                     stop_policy: str | None = None) -> Outcome:
    """The replay against a bridge and a fake model started here (see the module docstring)."""
    from .config import load_config
    from .log import setup
    from .server import Bridge
    from .sim.fake_openai import FakeOpenAIConfig, FakeRealtimeServer

    key, token = "sk-replay-" + secrets.token_hex(8), "replay-" + secrets.token_hex(12)
    fp = fake_config_for(rec, all_tools=all_tools)
    fake = FakeRealtimeServer(FakeOpenAIConfig(api_key=key, **fp.config))
    logbuf = io.StringIO()
    setup("info", stream=logbuf)
    tmp = tempfile.mkdtemp(prefix="vb-replay-")        # 0700
    await fake.start()
    bridge = None
    try:
        over: dict[str, Any] = {
            "server": {"host": "127.0.0.1", "port": 0, "admin_port": -1, "workers": 1},
            "openai": {"provider": "openai", "url": f"ws://127.0.0.1:{fake.port}/v1/realtime"},
            "oauth": {"enabled": False},
            "transcripts": {"dir": ""},
            "recording": {"dir": tmp, "record_all": True, "retention_days": 1},
        }
        if config_path is None:        # the recorded bridge's VAD and greeting
            for section, values in bridge_overrides_for(rec).items():
                over.setdefault(section, {}).update(values)
        if stop_policy:
            over["audio"] = {"vaic_stop_policy": stop_policy}
        env = {**_env_overrides(), "VOICEBRIDGE_TOKEN": token, "OPENAI_API_KEY": key}
        cfg, sec = load_config(config_path, env=env, overrides=over)
        bridge = Bridge(cfg, sec)
        await bridge.start()
        url = f"ws://127.0.0.1:{bridge.port}{cfg.server.path}"
        cap = await replay_caller(rec, url, token, speed, "replay-" + uuid.uuid4().hex[:12])
        await fake.wait_closed_all(3.0)
    finally:
        if bridge is not None:
            await bridge.stop()
        await fake.stop()
    await recording.drain(5.0)
    files = sorted(os.path.join(tmp, f) for f in os.listdir(tmp) if f.endswith(recording.SUFFIX))
    notes = []
    if fp.skipped_calls:
        notes.append(f"left out {len(fp.skipped_calls)} recorded function call(s) that are no call tool "
                     f"({', '.join(sorted(set(fp.skipped_calls)))[:120]}): --all-tools replays them")
    try:
        if files:
            replayed_rec = read_recording(files[-1])
            saved = None
            if save:
                shutil.copyfile(files[-1], save)
                os.chmod(save, 0o600)
                saved = save
            out = _compare(rec, replayed_rec, "own bridge + fake model", cap, full=True)
            out.replayed_path = saved
        else:
            notes.append("the replay bridge wrote no recording: compared on the caller's side only")
            out = _compare(rec, cap.recording(), "own bridge + fake model (caller side)", cap, full=False)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    out.notes += notes
    out.bridge_log = logbuf.getvalue()
    return out


def _compare(rec: Recording, replayed: Recording, mode: str, cap: Capture, full: bool) -> Outcome:
    a = timeline(rec, vaic_only=not full)
    b = timeline(replayed, vaic_only=not full)
    compared = COUNTS if full else VAIC_COUNTS
    ca, cb = summarize(a), summarize(b)
    return Outcome(a, b, compared, ca, cb, differences(ca, cb, compared), mode, cap)


def report(rec: Recording, out: Outcome) -> str:
    h = rec.header
    lines = [f"recording: {rec.path}",
             f"  call {h.get('call_id')} started {h.get('started_at')}, {len(rec.records)} frames"
             + ("" if rec.complete else " (file cut short: read up to its last whole record)"),
             f"replay: {out.mode}, conversationId {out.capture.conversation_id}, "
             f"schedule {out.capture.shift_ms:.0f} ms behind the recording at the end"
             + (f", {out.capture.gate_timeouts} awaited answer(s) of the bridge did not come within "
                f"{ACCEPT_TIMEOUT_S:.0f} s" if out.capture.gate_timeouts else ""),
             ""]
    lines.append(side_by_side(out.recorded, out.replayed))
    lines += ["", f"{'count':<22} {'recorded':>9} {'replayed':>9}"]
    for k in (*COUNTS, "play_audio_ms", "duration_ms"):
        if k in OPENAI_COUNTS and k not in out.compared:
            lines.append(f"{k:<22} {out.recorded_counts[k]:>9.0f} {'n/a':>9}")
            continue
        mark = "" if k not in out.compared or out.recorded_counts[k] == out.replayed_counts[k] else "  <- differs"
        lines.append(f"{k:<22} {out.recorded_counts[k]:>9.0f} {out.replayed_counts[k]:>9.0f}{mark}")
    lines.append("")
    lines.append("same counts" if not out.diffs else "differences: " + "; ".join(out.diffs))
    lines += [f"note: {n}" for n in out.notes]
    if out.replayed_path:
        lines.append(f"replayed recording saved to {out.replayed_path}")
    return "\n".join(lines)


def _as_json(out: Outcome) -> str:
    return json.dumps({"mode": out.mode, "compared": list(out.compared), "differences": out.diffs,
                       "recorded": out.recorded_counts, "replayed": out.replayed_counts,
                       "recorded_timeline": [e.__dict__ for e in out.recorded],
                       "replayed_timeline": [e.__dict__ for e in out.replayed],
                       "notes": out.notes, "replayed_path": out.replayed_path}, indent=1)


async def _main(a: argparse.Namespace) -> int:
    try:
        rec = read_recording(a.file)
    except (OSError, RecordingError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        if a.bridge:
            token = a.token if a.token is not None else os.environ.get("VOICEBRIDGE_TOKEN")
            cap = await replay_caller(rec, a.bridge, token, a.speed,
                                      None if a.keep_id else "replay-" + uuid.uuid4().hex[:12])
            if not any(r.kind == VAIC_OUT for r in cap.records):
                print("error: the bridge answered nothing", file=sys.stderr)
                return 2
            out = _compare(rec, cap.recording(), f"running bridge {a.bridge} (caller side)", cap, full=False)
        else:
            out = await replay_own(rec, config_path=a.config, speed=a.speed, save=a.save,
                                   all_tools=a.all_tools, stop_policy=a.stop_policy)
    except ReplayError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except Exception as e:        # ConfigError and the like: one line, no traceback
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 2
    print(_as_json(out) if a.json else report(rec, out))
    return 1 if out.diffs else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m voicebridge.replay", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("file", help="a .vbrec recording")
    ap.add_argument("--bridge", help="a running bridge, e.g. ws://127.0.0.1:8080/voicebridge "
                    "(default: start one here, with the fake model)")
    ap.add_argument("--token", default=None, help="bearer token for --bridge (default: $VOICEBRIDGE_TOKEN)")
    ap.add_argument("--speed", type=float, default=1.0, help="time factor: 2 replays twice as fast (default 1)")
    ap.add_argument("--config", help="the bridge settings to replay with (without --bridge), e.g. the "
                    "production config.toml; listeners, OpenAI URL, OAuth, transcripts and recording are replaced")
    ap.add_argument("--stop-policy", choices=("flush", "drain"), help="audio.vaic_stop_policy of the replay bridge")
    ap.add_argument("--save", help="keep the replay bridge's own recording at this path (mode 0600)")
    ap.add_argument("--all-tools", action="store_true",
                    help="also replay function calls that are no call tool (webhooks would run for real)")
    ap.add_argument("--keep-id", action="store_true", help="with --bridge: keep the recorded conversationId")
    ap.add_argument("--json", action="store_true", help="machine-readable output")
    a = ap.parse_args(argv)
    if a.speed <= 0 or a.speed > 100:
        ap.error("--speed must be within (0, 100]")
    return uvloop.run(_main(a))


if __name__ == "__main__":
    sys.exit(main())
