"""What happened in a recorded call, as a timeline: turns, barge-ins, truncates, tools, play
streams, VAIC activities, the end. Pure functions over a `recording.Recording` (no I/O, no clock).

- `timeline(rec)`: `Event`s in time order. Sources: the VAIC frames both ways (what a caller-side
  capture also has) and, when the recording has them, the OpenAI frames (responses, truncates,
  tool calls, model errors). `vaic_only=True` uses the VAIC frames only, so a recording and a
  caller-side capture of a replay can be compared like for like.
- `summarize(events)`: the counts compared between a recording and its replay (`COUNTS`).
- `side_by_side(a, b)`: the two timelines aligned (same event kinds on the same line, by a
  longest-matching alignment of their keys), with times in ms and the replay's offset.
- `fake_config_for(rec, ...)`: settings for the fake model that make it answer as the recorded
  model did (answer lengths, the greeting, the tool calls, think time), for `replay`.

Event keys: `call.initiate`, `call.accepted`, `call.declined`, `vaic.<activity>` (start, dtmf,
playFinished, ... sent by VAIC), `caller.speech` (the bridge told VAIC the caller started
speaking, `userStream.speech.started`, while nothing played), `barge-in` (the same while a play
stream was open), `play.start` / `play.stop` (with the audio ms the stream carried),
`bot.hangup` / `bot.transfer` / `bot.sendDtmf` (activities the bridge sent), `model.response`
(`response.done`: status and audio ms), `truncate` (`conversation.item.truncate`: audio_end_ms),
`tool.call` / `tool.output` (function calls of the model and the bridge's outputs), `mcp.call`,
`model.error`, `vaic.closed` / `vaic.resumed` / `openai.closed` (socket events), `call.end`
(VAIC's session.end) and `recording.end` / `recording.stopped`.
"""

from __future__ import annotations

import difflib
import statistics
from dataclasses import dataclass
from typing import Any, Iterable

from .audio import FORMATS
from .bounds import clip
from .profiles import CALL_TOOLS
from .recording import NOTE, OPENAI_IN, OPENAI_OUT, VAIC_IN, VAIC_OUT, Record, Recording

# the counts a replay is compared on; the second set needs the OpenAI frames
VAIC_COUNTS = ("caller_turns", "barge_ins", "play_streams", "bot_activities")
OPENAI_COUNTS = ("responses", "responses_cancelled", "truncates", "tool_calls")
COUNTS = VAIC_COUNTS + OPENAI_COUNTS
_BOT_ACTIVITIES = ("hangup", "transfer", "sendDtmf")


@dataclass(frozen=True)
class Event:
    t_ms: float
    key: str
    detail: str = ""

    def line(self) -> str:
        return f"{self.t_ms:8.0f} ms  {self.key}" + (f"  {self.detail}" if self.detail else "")


def _type_of(r: Record) -> tuple[str, Any]:
    """(frame type, decoded frame or None). Audio chunks are not decoded (the hot loop here)."""
    text = r.text
    if r.audio is not None and text.startswith(b'{"type":"'):
        end = text.find(b'"', 9)
        return text[9:end].decode("ascii", "replace"), None
    msg = r.json()
    if isinstance(msg, dict):
        return str(msg.get("type") or msg.get("event") or ""), msg
    return "", None


def _audio_ms(audio: bytes | None, bytes_per_ms: float, first: bool) -> float:
    if not audio:
        return 0.0
    n = len(audio)
    if first and audio[:4] == b"RIFF":       # a wav/ stream's header
        n = max(0, n - 44)
    return n / bytes_per_ms


def _openai_bytes_per_ms(session: Any) -> float | None:
    try:
        fmt = session["audio"]["output"]["format"]
    except (KeyError, TypeError):
        return None
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "audio/pcm":
        return 2 * int(fmt.get("rate") or 24000) / 1000
    if fmt.get("type") in ("audio/pcmu", "audio/pcma"):
        return 8.0
    return None


def timeline(rec: Recording, vaic_only: bool = False) -> list[Event]:
    """The events of `rec` in time order (see the module docstring for the keys)."""
    out: list[Event] = []
    vaic_bpm = 48.0
    oai_bpm = 48.0
    play: dict[str, Any] | None = None       # the open play stream: id, start ms, audio ms
    resp_audio: dict[str, float] = {}        # response id -> audio ms of its deltas
    kinds = (VAIC_IN, VAIC_OUT) if vaic_only else (VAIC_IN, VAIC_OUT, OPENAI_IN, OPENAI_OUT, NOTE)
    for r in rec.records:
        if r.kind not in kinds:
            continue
        t = r.t_ns / 1e6
        typ, msg = _type_of(r)

        def add(key: str, detail: str = "", t: float = t) -> None:
            out.append(Event(t, key, detail))

        if r.kind == VAIC_IN:
            if typ == "userStream.chunk":
                continue
            if typ == "session.initiate" and msg is not None:
                add("call.initiate", "offer " + ",".join(map(str, msg.get("supportedMediaFormats") or []))[:120])
            elif typ == "session.resume":
                add("vaic.resume")
            elif typ == "activities" and msg is not None:
                for act in msg.get("activities") or []:
                    if not isinstance(act, dict):
                        continue
                    name = str(act.get("name") or act.get("type") or "?")
                    value = act.get("value")
                    add(f"vaic.{clip(name, 40)}", clip(value, 60) if value not in (None, "") else "")
            elif typ == "session.end" and msg is not None:
                add("call.end", clip(msg.get("reasonCode") or msg.get("reason") or "", 60))
            elif typ in ("userStream.start", "userStream.stop"):
                add("caller." + typ.split(".", 1)[1])
            elif typ:
                add(f"vaic.{clip(typ, 40)}")
        elif r.kind == VAIC_OUT:
            if typ == "playStream.chunk":
                if play is not None:
                    play["ms"] += _audio_ms(r.audio, vaic_bpm, play["ms"] == 0.0)
                continue
            if typ == "session.accepted" and msg is not None:
                fmt = FORMATS.get(str(msg.get("mediaFormat")))
                if fmt is not None:
                    vaic_bpm = float(fmt.bytes_per_ms)
                add("call.accepted", str(msg.get("mediaFormat") or ""))
            elif typ == "session.error" and msg is not None:
                add("call.declined", clip(msg.get("reason"), 80))
            elif typ == "playStream.start" and msg is not None:
                play = {"id": str(msg.get("streamId")), "t": t, "ms": 0.0}
                add("play.start", f"#{play['id']}")
            elif typ == "playStream.stop" and msg is not None:
                if play is not None:
                    add("play.stop", f"#{play['id']} {play['ms']:.0f} ms audio, open {t - play['t']:.0f} ms")
                play = None
            elif typ == "userStream.speech.started":
                if play is not None:
                    add("barge-in", f"during play #{play['id']} ({play['ms']:.0f} ms sent)")
                else:
                    add("caller.speech")
            elif typ == "activities" and msg is not None:
                for act in msg.get("activities") or []:
                    if isinstance(act, dict):
                        name = str(act.get("name") or "?")
                        params = act.get("activityParams") or {}
                        detail = " ".join(f"{clip(k, 30)}={clip(v, 60)}" for k, v in params.items()) \
                            if isinstance(params, dict) else clip(params, 80)
                        add(f"bot.{clip(name, 40)}", detail)
        elif r.kind == OPENAI_IN:
            if typ == "response.output_audio.delta":
                if r.audio is not None and r.text:
                    rid = _field(r.text, b'"response_id":"')
                    resp_audio[rid] = resp_audio.get(rid, 0.0) + len(r.audio) / oai_bpm
                continue
            if msg is None:
                continue
            if typ in ("session.created", "session.updated"):
                bpm = _openai_bytes_per_ms(msg.get("session"))
                if bpm:
                    oai_bpm = bpm
            elif typ == "response.done":
                resp = msg.get("response") or {}
                rid = str(resp.get("id") or "")
                outs = [o.get("type") for o in resp.get("output") or [] if isinstance(o, dict)]
                short = {"message": "msg", "function_call": "call", "mcp_call": "mcp"}
                add("model.response", f"{resp.get('status')} {resp_audio.get(rid, 0.0):.0f} ms audio"
                    + (f" [{','.join(short.get(str(o), str(o)) for o in outs)}]" if outs else ""))
            elif typ == "response.output_item.done":
                item = msg.get("item") or {}
                if item.get("type") == "function_call":
                    add("tool.call", f"{clip(item.get('name'), 40)} {clip(item.get('arguments'), 60)}")
                elif item.get("type") == "mcp_call":
                    add("mcp.call", f"{clip(item.get('server_label'), 30)}:{clip(item.get('name'), 30)}")
            elif typ == "error":
                err = msg.get("error") or {}
                add("model.error", clip(err.get("code") or err.get("type"), 60))
        elif r.kind == OPENAI_OUT:
            if typ == "input_audio_buffer.append" or msg is None:
                continue
            if typ == "session.update":
                bpm = _openai_bytes_per_ms(msg.get("session"))
                if bpm:
                    oai_bpm = bpm
            elif typ == "conversation.item.truncate":
                add("truncate", f"audio_end_ms={msg.get('audio_end_ms')}")
            elif typ == "conversation.item.create":
                item = msg.get("item") or {}
                if item.get("type") == "function_call_output":
                    add("tool.output", clip(item.get("output"), 60))
        elif r.kind == NOTE and msg is not None:
            ev = str(msg.get("event") or "")
            if ev == "vaic_closed":
                add("vaic.closed", f"code {msg.get('code')}")
            elif ev == "vaic_attached":
                add("vaic.resumed")
            elif ev == "openai_closed":
                add("openai.closed", f"code {msg.get('code')}")
            elif ev in ("recording.end", "recording.stopped"):
                add(ev, clip(msg.get("reason"), 60))
    out.sort(key=lambda e: e.t_ms)
    return out


def _field(text: bytes, key: bytes) -> str:
    i = text.find(key)
    if i < 0:
        return ""
    start = i + len(key)
    return text[start:text.find(b'"', start)].decode("ascii", "replace")


def summarize(events: Iterable[Event]) -> dict[str, float]:
    """The counts of `COUNTS`, plus `play_audio_ms` and `duration_ms`."""
    c = {k: 0.0 for k in COUNTS}
    c["play_audio_ms"] = 0.0
    last = 0.0
    for e in events:
        last = max(last, e.t_ms)
        k = e.key
        if k in ("caller.speech", "barge-in"):
            c["caller_turns"] += 1
        if k == "barge-in":
            c["barge_ins"] += 1
        elif k == "play.start":
            c["play_streams"] += 1
        elif k == "play.stop":
            try:
                c["play_audio_ms"] += float(e.detail.split()[1])
            except (IndexError, ValueError):
                pass
        elif k.startswith("bot.") and k[4:] in _BOT_ACTIVITIES:
            c["bot_activities"] += 1
        elif k == "model.response":
            c["responses"] += 1
            if e.detail.startswith("cancelled"):
                c["responses_cancelled"] += 1
        elif k == "truncate":
            c["truncates"] += 1
        elif k in ("tool.call", "mcp.call"):
            c["tool_calls"] += 1
    c["duration_ms"] = last
    return c


def differences(a: dict[str, float], b: dict[str, float], keys: Iterable[str] = COUNTS) -> list[str]:
    """The counts that differ, as `name: a -> b`."""
    return [f"{k}: {a.get(k, 0):.0f} -> {b.get(k, 0):.0f}" for k in keys if a.get(k, 0) != b.get(k, 0)]


def side_by_side(a: list[Event], b: list[Event], titles: tuple[str, str] = ("recorded", "replayed"),
                 width: int = 64) -> str:
    """Both timelines, aligned on their keys; a paired line ends with the replay's offset."""
    rows: list[tuple[Event | None, Event | None]] = []
    sm = difflib.SequenceMatcher(None, [e.key for e in a], [e.key for e in b], autojunk=False)
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            rows += list(zip(a[i1:i2], b[j1:j2]))
        else:
            rows += [(e, None) for e in a[i1:i2]]
            rows += [(None, e) for e in b[j1:j2]]

    def cell(e: Event | None) -> str:
        if e is None:
            return " " * width
        s = e.line()
        return s[:width].ljust(width)

    lines = [f"{titles[0]:<{width}} | {titles[1]:<{width}} | offset", "-" * (2 * width + 13)]
    for x, y in rows:
        off = f"{round(y.t_ms - x.t_ms):+6d} ms" if x is not None and y is not None else ""
        lines.append(f"{cell(x)} | {cell(y)} | {off}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------ replay settings

_VAD_KEYS = ("type", "threshold", "prefix_padding_ms", "silence_duration_ms", "eagerness",
             "create_response", "interrupt_response")


def bridge_overrides_for(rec: Recording) -> dict[str, Any]:
    """Settings the recorded bridge evidently ran with: `[openai]` turn detection (its first
    `session.update`) and greeting (the instructions of a `response.create` sent before the caller
    spoke), and the call tools its profile offered (the last `session.update` with `tools`; a
    transfer target keeps its name, its URI becomes `sip:<name>@replay.invalid`). What a replay
    without `--config` runs with, so that the bridge behaves as the recorded one did."""
    oai: dict[str, Any] = {}
    spoke = False
    tools: list[Any] | None = None
    for r in rec.records:
        if r.kind == OPENAI_IN and b"input_audio_buffer.speech_started" in r.text[:60]:
            spoke = True
        if r.kind != OPENAI_OUT or r.audio is not None:
            continue
        typ, msg = _type_of(r)
        if msg is None:
            continue
        if typ == "session.update" and isinstance((msg.get("session") or {}).get("tools"), list):
            tools = msg["session"]["tools"]          # the last one: the final profile's
        if typ == "session.update" and "vad" not in oai:
            try:
                td = msg["session"]["audio"]["input"]["turn_detection"]
            except (KeyError, TypeError):
                continue
            if td is None:
                oai["vad"] = {"type": "none"}
            elif isinstance(td, dict):
                oai["vad"] = {k: td[k] for k in _VAD_KEYS if k in td}
        elif typ == "response.create" and not spoke and "greeting" not in oai:
            instructions = (msg.get("response") or {}).get("instructions")
            if isinstance(instructions, str) and instructions:
                oai["greeting"] = instructions
    out: dict[str, Any] = {"openai": oai} if oai else {}
    if tools is not None:                 # the call tools the recorded profile offered
        names = [str(t.get("name")) for t in tools if isinstance(t, dict) and t.get("name") in CALL_TOOLS]
        prof: dict[str, Any] = {"tools": names}
        for t in tools:
            if isinstance(t, dict) and t.get("name") == "transfer_call":
                try:
                    targets = t["parameters"]["properties"]["target"]["enum"]
                except (KeyError, TypeError):
                    targets = []
                prof["transfer_targets"] = {str(n): {"uri": f"sip:{n}@replay.invalid"}
                                            for n in targets if isinstance(n, str)}
        out["profiles"] = {"default": prof}
    return out


# ------------------------------------------------------------------------------------ fake model


@dataclass
class FakePlan:
    """What the fake model should say (kwargs for `FakeOpenAIConfig`) and what was left out."""
    config: dict[str, Any]
    responses: int
    skipped_calls: list[str]


def fake_config_for(rec: Recording, call_tools: Iterable[str] = ("end_call", "transfer_call", "send_dtmf"),
                    all_tools: bool = False) -> FakePlan:
    """Fake-model settings from the recorded OpenAI frames: the greeting's and each answer's
    audio length (an answer that was cut by a barge-in gets 1.5 times what was sent, at least
    1 s more, so the replayed barge-in finds it still playing), the transcripts as the spoken
    text, the function calls as `@@name args` (only `call_tools` and MCP calls unless
    `all_tools`: a webhook tool would run against its real URL), the median think time (caller's
    speech stopped -> response.created) and delta size and spacing."""
    calls_ok = set(call_tools)
    oai_bpm = 48.0
    order: list[str] = []
    info: dict[str, dict[str, Any]] = {}
    create_pending = False
    user_speech = False
    stopped_t: float | None = None
    thinks: list[float] = []
    delta_ms: list[float] = []
    gaps: list[float] = []
    last_delta_t: dict[str, float] = {}
    skipped: list[str] = []
    for r in rec.records:
        if r.kind not in (OPENAI_IN, OPENAI_OUT):
            continue
        typ, msg = _type_of(r)
        t = r.t_ns / 1e6
        if r.kind == OPENAI_OUT:
            if typ == "response.create":
                create_pending = True
            elif typ == "session.update" and msg is not None:
                oai_bpm = _openai_bytes_per_ms(msg.get("session")) or oai_bpm
            continue
        if typ == "response.output_audio.delta":
            rid = _field(r.text, b'"response_id":"')
            ms = len(r.audio or b"") / oai_bpm
            if rid in info:
                info[rid]["ms"] += ms
            delta_ms.append(ms)
            if rid in last_delta_t:
                gaps.append(t - last_delta_t[rid])
            last_delta_t[rid] = t
            continue
        if msg is None:
            continue
        if typ == "input_audio_buffer.speech_started":
            user_speech = True
        elif typ == "input_audio_buffer.speech_stopped":
            stopped_t = t
        elif typ == "response.created":
            rid = str((msg.get("response") or {}).get("id") or "")
            greeting = create_pending and not user_speech and not order
            info[rid] = {"ms": 0.0, "text": "", "calls": [], "status": "", "greeting": greeting}
            order.append(rid)
            if not create_pending and stopped_t is not None:
                thinks.append(t - stopped_t)
            create_pending, stopped_t = False, None
        elif typ == "response.output_audio_transcript.done":
            rid = str(msg.get("response_id") or "")
            if rid in info:
                info[rid]["text"] = clip(msg.get("transcript"), 200)
        elif typ == "response.output_item.done":
            rid = str(msg.get("response_id") or "")
            item = msg.get("item") or {}
            if rid not in info:
                continue
            if item.get("type") == "function_call":
                name, args = str(item.get("name") or ""), str(item.get("arguments") or "{}")
                if all_tools or name in calls_ok:
                    info[rid]["calls"].append(f"@@{name} {args.replace('@@', '@ @')}")
                else:
                    skipped.append(name)
            elif item.get("type") == "mcp_call":
                info[rid]["calls"].append(f"@@mcp:{item.get('server_label')}:{item.get('name')} "
                                          f"{str(item.get('arguments') or '{}').replace('@@', '@ @')}")
        elif typ == "response.done":
            rid = str((msg.get("response") or {}).get("id") or "")
            if rid in info:
                info[rid]["status"] = str((msg.get("response") or {}).get("status") or "")
    cfg: dict[str, Any] = {}
    replies: list[str] = []
    reply_ms: list[int] = []
    for n, rid in enumerate(order, 1):
        x = info[rid]
        if x["status"] == "failed":
            continue
        ms = x["ms"]
        if x["status"] == "cancelled":
            ms = max(ms * 1.5, ms + 1000.0)
        text = (x["text"] or (f"(recorded answer {n})" if ms >= 1 else "")).replace("@@", "@ @")
        if x["greeting"]:
            cfg["greeting_ms"] = max(0, int(ms))
            cfg["greeting_text"] = text
            continue
        replies.append(" ".join([text, *x["calls"]]))
        reply_ms.append(max(0, int(ms)))
    if replies:
        cfg["replies"] = replies
        cfg["reply_ms"] = reply_ms
    if thinks:
        cfg["think_ms"] = min(3000.0, max(0.0, statistics.median(thinks)))
    if delta_ms:
        cfg["delta_audio_ms"] = int(min(500, max(20, round(statistics.median(delta_ms) / 10) * 10)))
    if gaps:
        cfg["delta_interval_ms"] = min(200.0, max(1.0, statistics.median(gaps)))
    return FakePlan(cfg, len(order), skipped)
