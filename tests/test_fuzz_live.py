"""Live fuzzing (issue 7, item 8): >= 100 000 generated or mutated frames through the RUNNING
daemon over real sockets on 127.0.0.1, while one clean call runs beside them. Once per transport
(`server.transport` fast, websockets and picows), about 12 s each.

What it sends, over a few hundred raw websocket connections, 40 at a time (each begins with the
HTTP upgrade, `tests/rawws.py`; frames are built here so that RSV bits, unmasked frames and lying
length fields are possible):
- generated and mutated VAIC messages: bit flips, truncation, removed/added/duplicated keys,
  field type swaps, huge strings, tokens JSON forbids (NaN, 1e999, lone surrogates), binary
  frames (the bridge decodes those as JSON too), unknown types, start activities whose
  parameters try to forge log fields;
- `audioChunk` payloads: valid audio in every format (the raw/lpcm16 and raw/lpcm16_8 resampling
  paths and the wav/ header stripping included), odd byte counts, bad padding, `"` and `\\`
  (JSON injection attempts), whitespace, non-ASCII, broken RIFF headers, huge (up to ~900 KB);
- JSON nested 1 000 to ~1 000 000 levels, in every place of a message;
- messages in every wrong state: before `session.initiate`, after a rejected first message,
  after `session.end`, a second initiate, `session.resume`, stream start/stop out of order;
- fragment floods (thousands of empty CONT frames), ping and pong floods (answers read; one
  connection never reads), oversized frames (real and lying lengths), protocol violations
  (reserved opcodes and bits, unmasked, invalid UTF-8, fragmented or long control frames) as the
  last frame of a connection, frames dribbled in 1-64-byte TCP segments, frames pipelined with
  the upgrade request;
- paced connections that speak and fall silent, so the fake model answers and is barged in
  while the fuzz goes on (the down path and barge-in under bad input).
Most connections start with a valid `session.initiate` and wait until the OpenAI session is up,
so the fuzz hits a call in the ACTIVE state and reaches the forwarding path. Their
conversationId is `fz<n>-<kind>`: a daemon log line names the connection kind that caused it.
What the daemon sends is read and discarded (except on the connection that tests not reading).

Reproducible: each connection's frames come from `random.Random(seed)` (generated in connection
order); the seed is printed and `VB_FUZZ_SEED=<seed>` replays it (`VB_FUZZ_FRAMES`: frame target).

Asserts (all checked, then reported together): the daemon is alive and `/health` answers; every
log line is JSON; no `error`/`critical` line and no `call.internal_error`; peak RSS (VmHWM) at
most start + 150 MiB; the clean call completes and loses no frame (`daemon_harness.clean_call`);
after the fuzzing every call ends (`active_calls` 0 within 20 s) and the fake OpenAI server has no
session left open; no fuzz connection stalls; no log line over 16 KiB (peer strings are clipped);
oversized frames and fragment floods are closed with 1009; nothing reaches OpenAI but strict
base64 appends and SDK-valid events, and the fake sends no error; no call ends for an OpenAI
reason (the fake never fails, so such a reason is misattributed).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import pytest

from tests.daemon_harness import TOKEN, clean_call, config_has, figures, running_daemon, running_fake
from tests.rawws import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, frame, upgrade_request
from tests.sdk_check import validate_client_event
from voicebridge.realtime import BENIGN_ERROR_CODES
from voicebridge.sim.caller import Silence, Speak, WaitForBot
from voicebridge.sim.fake_openai import FakeRealtimeServer

FRAMES_TARGET = int(os.environ.get("VB_FUZZ_FRAMES", "100000"))
CONCURRENCY = 40                 # fuzz connections open at once
FUZZ_DEADLINE_S = 45.0           # hard stop for the fuzz phase (the target is reached well before)
RSS_BOUND_KIB = 150 * 1024       # peak RSS may grow this much over the start figure
END_WAIT_S = 20.0                # after the fuzzing: every call must have ended within this
MAX_LOG_LINE = 16 * 1024         # peer strings are clipped to 200 chars in logs (spec), so lines stay short
DRAIN_TIMEOUT_S = 8.0            # a fuzz write the daemon does not take within this counts as a stall
PACED_BATCH = 12                 # paced connections: frames per batch
SETTLE_S = 0.3                   # after session.accepted: time for the daemon's OpenAI dial
CONN_TIMEOUT_S = 30.0            # one fuzz connection, from connect to its end
LINGER_S = 3.5                   # a connection's end: longest wait for the daemon to close it
BIG_BYTES_BUDGET = 48 << 20      # huge frames (nesting, huge base64, oversize) in all, per run

# error/critical lines that are acceptable (event name -> why). Empty: none is acceptable so far.
JUSTIFIED_ERRORS: dict[str, str] = {}

FORMATS = ["raw/lpcm16_24", "raw/mulaw", "raw/lpcm16", "raw/lpcm16_8",
           "wav/lpcm16_24", "wav/mulaw", "wav/lpcm16", "wav/lpcm16_8"]
PREFERENCE = ["raw/lpcm16_24", "raw/mulaw", "raw/lpcm16", "raw/lpcm16_8",
              "wav/lpcm16_24", "wav/mulaw", "wav/lpcm16", "wav/lpcm16_8"]   # audio.format_preference
BYTES_PER_MS = {"lpcm16_24": 48, "mulaw": 8, "lpcm16": 32, "lpcm16_8": 16}
KNOWN_TYPES = ["session.initiate", "session.resume", "session.end", "userStream.start",
               "userStream.chunk", "userStream.stop", "activities", "connection.validate"]
MAX_MESSAGE = 1 << 20            # frames are kept under the daemon's smallest default (1 MiB)


# ============================================================================ websocket frames


def wsframe(op: int, payload: bytes = b"", *, fin: bool = True, rsv: int = 0, mask: bool = True,
            key: bytes | None = None, length: int | None = None) -> bytes:
    """`rawws.frame`, with an all-zero mask key unless one is given (cheap for big payloads)."""
    return frame(op, payload, fin=fin, mask=mask, rsv=rsv, key=b"\0\0\0\0" if key is None else key,
                 length=length)


def close_payload(code: int | None, reason: bytes = b"") -> bytes:
    return b"" if code is None else struct.pack("!H", code) + reason


# ============================================================================ generators


@dataclass
class Budget:
    """Shared, deterministic accounting of huge payloads (they cost the most wall time)."""
    big_bytes: int = BIG_BYTES_BUDGET
    mega_nest: int = 4          # ~1M-level nestings
    real_oversize: int = 2      # oversized frames whose payload is really sent

    def take(self, n: int) -> bool:
        if n <= self.big_bytes:
            self.big_bytes -= n
            return True
        return False


RAW_TOKENS = ["NaN", "Infinity", "-Infinity", "1e999", "-1e999", "00", "01", "1.", ".5", "+1",
              "0x10", "'x'", "undefined", "True", "nul", "tru", '"\\ud800"', '"\\udfff\\ud800"',
              '"\\u0000"', '"\\x41"', '"\\q"', '"\t"', '"\x01"', "[,]", "{,}", "[1,]", '{"a":1,}',
              "123456789012345678901234567890123456789", "-0", "1E+400", "[]]", "{}}", '"' + "\\" * 3 + '"']


class Gen:
    """Frames for one connection: deterministic from its seed."""

    def __init__(self, seed: int, cid: str, budget: Budget) -> None:
        self.r = random.Random(seed)
        self.cid = cid
        self.budget = budget
        self.fmt = "raw/lpcm16_24"
        self._corpus: list[dict[str, Any]] | None = None
        self.may_end = True    # False: the corpus holds no session.end (the call must outlive the frames)

    # ---------------------------------------------------------------- framing helpers
    def key(self, n: int = 0) -> bytes:
        """Masking key: random for small frames, zero (cheap to apply) for big ones."""
        r = self.r
        return b"\0\0\0\0" if n > 4096 or r.random() < 0.5 else r.randbytes(4)

    def msg_frame(self, payload: bytes, *, allow_binary: bool = True) -> bytes:
        """A complete data message: TEXT if valid UTF-8 (sometimes BINARY), BINARY otherwise;
        sometimes split into fragments with pings between them (legal websocket)."""
        r = self.r
        try:
            payload.decode("utf-8")
            op = OP_BINARY if allow_binary and r.random() < 0.1 else OP_TEXT
        except UnicodeDecodeError:
            op = OP_BINARY
        if len(payload) > 8 and r.random() < 0.08:
            cuts = sorted(r.sample(range(1, len(payload)), min(len(payload) - 1, r.randint(1, 6))))
            parts = [payload[i:j] for i, j in zip([0] + cuts, cuts + [len(payload)])]
            out = [wsframe(op, parts[0], fin=False, key=self.key(len(parts[0])))]
            for k, p in enumerate(parts[1:], 1):
                if r.random() < 0.3:
                    out.append(wsframe(OP_PING, r.randbytes(r.randint(0, 16)), key=self.key()))
                out.append(wsframe(OP_CONT, p, fin=k == len(parts) - 1, key=self.key(len(p))))
            return b"".join(out)
        return wsframe(op, payload, key=self.key(len(payload)))

    def js(self, obj: Any) -> bytes:
        return json.dumps(obj, ensure_ascii=self.r.random() < 0.5, separators=(",", ":")).encode()

    # ---------------------------------------------------------------- valid messages
    def initiate(self, formats: list[str] | None = None, *, set_fmt: bool = True, **extra: Any) -> dict[str, Any]:
        """A valid session.initiate; `set_fmt`: it starts this connection's call (its format is
        then the one the audio is generated in)."""
        r = self.r
        if formats is None:
            formats = r.sample(FORMATS, r.randint(1, 3))
        offered = [f for f in PREFERENCE if isinstance(formats, list) and f in formats]
        if offered and set_fmt:
            self.fmt = offered[0]      # the format the daemon picks (its default preference order)
        msg = {"type": "session.initiate", "conversationId": self.cid, "botName": "fuzz",
               "caller": "+1555" + str(r.randint(1000000, 9999999)), "expectAudioMessages": True,
               "supportedMediaFormats": formats}
        msg.update(extra)
        return msg

    def start_activity(self) -> dict[str, Any]:
        """The `start` event; sometimes with parameters that try to forge log fields or are not
        strings (the daemon logs caller and callee)."""
        r = self.r
        params: dict[str, Any] = {"caller": "+1555", "callee": "+1666"}
        if r.random() < 0.15:
            params.update(r.choice([
                {"level": "critical", "event": "call.internal_error", "call_id": "forged", "timestamp": 0},
                {"callee": {"level": "error", "event": "x"}, "caller": ["a"] * 50},
                {"callee": "x" * 5000, "caller": "\n{\"level\": \"error\"}\n"},
                {"callee": None, "caller": 12345678901234567890},
            ]))
        return {"type": "activities", "conversationId": self.cid, "activities": [
            {"type": "event", "name": "start", "id": str(r.random()), "timestamp": "2026-01-01T00:00:00Z",
             "language": "en-US", "parameters": params}]}

    def simple(self, t: str, **kw: Any) -> dict[str, Any]:
        return {"type": t, "conversationId": self.cid, **kw}

    def audio_bytes(self, ms: int | None = None, odd: bool = False) -> bytes:
        r = self.r
        ms = ms if ms is not None else r.choice([10, 20, 20, 20, 40, 60])
        enc = self.fmt.split("/")[1]
        n = ms * BYTES_PER_MS[enc]
        if odd:
            n += r.choice([-1, 1, 3])
        kind = r.random()
        if kind < 0.4:
            return bytes(max(n, 0))                              # silence
        if kind < 0.8:
            return r.randbytes(max(n, 0))                        # noise: the fake's VAD hears speech
        # clipped square wave, full scale
        return (b"\xff\x7f\x00\x80" * (n // 4 + 1))[:max(n, 0)]

    def turn_audio(self, ms: int, speech: bool) -> bytes:
        """Real silence (mu-law silence is 0xFF) or loud noise, in the call's format."""
        enc = self.fmt.split("/")[1]
        n = ms * BYTES_PER_MS[enc]
        if speech:
            return self.r.randbytes(n)
        return (b"\xff" if enc == "mulaw" else b"\x00") * n

    def riff(self, broken: bool = False) -> bytes:
        r = self.r
        enc = self.fmt.split("/")[1]
        rate = {"lpcm16_24": 24000, "lpcm16": 16000, "lpcm16_8": 8000, "mulaw": 8000}[enc]
        fmt_tag, bits = (7, 8) if enc == "mulaw" else (1, 16)
        fmt_body = struct.pack("<HHIIHH", fmt_tag, 1, rate, rate * bits // 8, bits // 8, bits)
        chunks = [b"fmt " + struct.pack("<I", len(fmt_body)) + fmt_body]
        if r.random() < 0.3:
            extra = r.randbytes(r.randint(0, 40))
            chunks.insert(r.randint(0, 1), b"LIST" + struct.pack("<I", len(extra)) + extra)
        data = b"data" + struct.pack("<I", 0xFFFFFFFF)
        hdr = b"RIFF" + struct.pack("<I", 0xFFFFFFFF) + b"WAVE" + b"".join(chunks) + data
        if broken:
            how = r.randrange(6)
            if how == 0:
                hdr = hdr[:r.randint(4, len(hdr) - 1)]                  # truncated
            elif how == 1:                                              # enormous sub-chunk size
                size = struct.pack("<I", r.choice([2**31, 2**32 - 1, 10**9]))
                hdr = b"RIFF\xff\xff\xff\xffWAVEfmt " + size + fmt_body
            elif how == 2:
                hdr = b"RIFF\x00\x00\x00\x00WAVX" + r.randbytes(40)      # not WAVE
            elif how == 3:                                              # sub-chunk loop without data
                hdr = b"RIFF\xff\xff\xff\xffWAVE" + (b"JUNK\x00\x00\x00\x00" * r.randint(1, 2000))
            elif how == 4:
                hdr = b"RIFF" + r.randbytes(r.randint(0, 60))
            else:
                hdr = b"RIFF\xff\xff\xff\xffWAVEfmt \x02\x00\x00\x00\x01"  # odd size, cut
        return hdr

    def b64_audio(self) -> str:
        """audioChunk content: mostly valid audio of the call's format, often broken."""
        r = self.r
        k = r.random()
        if k < 0.55:
            raw = self.audio_bytes()
            if self.fmt.startswith("wav/") and r.random() < 0.1:
                raw = self.riff() + raw
            return base64.b64encode(raw).decode()
        if k < 0.62:
            return base64.b64encode(self.audio_bytes(odd=True)).decode()
        if k < 0.67:
            return base64.b64encode(self.riff(broken=r.random() < 0.7) + self.audio_bytes()).decode()
        good = base64.b64encode(self.audio_bytes()).decode()
        pos = r.randint(0, len(good))
        bad = r.choice([
            '"', "\\", '","x":"y', '"}', '"},{"type":"activities","activities":[{"name":"hangup"}]}',
            '\\"', "\\u0022", "\\\\", "=", "==", "===", "A", "AB", "ABC", " ", "\n", "\r\n", "\t",
            "-_", "+/", "\x00", "é", "\u2028", "\U0001F600", "%%", "*", "\ud7ff", "@", "=A=",
        ])
        s = good[:pos] + bad + good[pos:]
        if r.random() < 0.15:
            s = s.rstrip("=")
        if r.random() < 0.05:
            s = ""
        return s

    def huge_b64(self) -> str:
        """A huge audioChunk (valid, or with a bad character far inside), up to ~900 KB."""
        r = self.r
        n = r.choice([64_000, 200_000, 500_000, 900_000])
        if not self.budget.take(n):
            n = 4_000
        raw_len = n * 3 // 4
        raw = bytes(raw_len) if r.random() < 0.5 else r.randbytes(raw_len)
        s = base64.b64encode(raw).decode()
        if r.random() < 0.4:
            pos = r.randint(0, len(s))
            s = s[:pos] + r.choice(['"', "\\", "!", " ", "é"]) + s[pos:]
        return s

    # ---------------------------------------------------------------- random values and mutations
    def rstr(self, n: int | None = None) -> str:
        r = self.r
        n = n if n is not None else r.choice([0, 1, 5, 20, 64, 65, 200, 201, 1000])
        alphabet = r.choice(["abc", "0123456789", "\"\\/\b\f\n\r\t", "\x00\x01\x1f\x7f", "éü€漢字",
                             "\U0001F600\U0010FFFF", "{}[]:,", "A=+/", "\u2028\u2029\ufeff"])
        base = "".join(r.choices(alphabet, k=min(n, 64)))
        return base if n <= 64 else (base * (n // 64 + 1))[:n]

    def huge_str(self) -> str:
        r = self.r
        n = r.choice([10_000, 100_000, 300_000])
        if not self.budget.take(n):
            n = 2_000
        return (r.choice("xyz\u00e9") + str(r.random())) * (n // 20 + 1)

    def rvalue(self, depth: int = 0) -> Any:
        r = self.r
        k = r.randrange(12 if depth < 3 else 8)
        if k == 0:
            return None
        if k == 1:
            return r.choice([True, False])
        if k == 2:
            return r.choice([0, -1, 1, 2**31, -2**31 - 1, 2**53 + 1, 2**63, 2**64 + 7, -2**63 - 1])
        if k == 3:
            return r.choice([0.0, -0.0, 1e308, -1e-320, 3.14159, 1e-7])
        if k in (4, 5, 6):
            return self.rstr()
        if k == 7:
            return r.choice(KNOWN_TYPES + FORMATS + ["", "event", "start", "hangup"])
        if k in (8, 9):
            return [self.rvalue(depth + 1) for _ in range(r.randint(0, 4))]
        return {self.rstr(r.randint(0, 10)): self.rvalue(depth + 1) for _ in range(r.randint(0, 4))}

    def mutate_obj(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Structure-level mutations of a message (keys removed/added, values of another type...)."""
        r = self.r
        obj = json.loads(json.dumps(obj))
        for _ in range(r.randint(1, 3)):
            target = obj
            # descend sometimes into activities[0] / parameters
            if isinstance(obj.get("activities"), list) and obj["activities"] and r.random() < 0.5:
                if isinstance(obj["activities"][0], dict):
                    target = obj["activities"][0]
            k = r.randrange(8)
            keys = list(target)
            if k == 0 and keys:
                del target[r.choice(keys)]                                  # remove a key
            elif k == 1:
                target[r.choice([self.rstr(r.randint(1, 12)), "type", "audioChunk", "activities",
                                 "name", "value", "parameters", "participant", "mediaFormat"])] = self.rvalue()
            elif k == 2 and keys:
                target[r.choice(keys)] = self.rvalue()                      # value of another type
            elif k == 3 and keys:
                target[r.choice(keys)] = self.huge_str() if r.random() < 0.2 else self.rstr(r.randint(200, 3000))
            elif k == 4:
                target["type"] = r.choice([self.rvalue(), r.choice(KNOWN_TYPES), "userStream.chunk",
                                           "playStream.chunk", "session.accepted", "x" * r.randint(1, 300)])
            elif k == 5 and keys:                                           # wrap in a list
                kk = r.choice(keys)
                target[kk] = [target[kk]]
            elif k == 6:
                for kk in list(target):
                    if r.random() < 0.3 and kk != "type":
                        target[kk] = None
            else:
                target[self.rstr(r.randint(1, 8))] = [self.rvalue() for _ in range(r.randint(15, 40))]
        return obj

    def mutate_bytes(self, data: bytes) -> bytes:
        """Byte-level mutations: bit flips, truncation, insertions, raw tokens JSON forbids."""
        r = self.r
        b = bytearray(data)
        for _ in range(r.randint(1, 3)):
            k = r.randrange(8)
            if not b:
                b += b"{"
            if k == 0:
                for _ in range(r.randint(1, 8)):                           # bit flips
                    i = r.randrange(len(b))
                    b[i] ^= 1 << r.randrange(8)
            elif k == 1:
                del b[r.randint(0, len(b) - 1):]                           # truncated JSON
            elif k == 2:
                i = r.randint(0, len(b))
                b[i:i] = r.choice([b"{", b"}", b"[", b"]", b'"', b"\\", b",", b":", b"\x00", b"\xff",
                                   b"\xc3", b"\xed\xa0\x80", b"\xf4\x90\x80\x80", b" " * 100])
            elif k == 3:
                i = r.randint(0, len(b))
                j = min(len(b), i + r.randint(1, 20))
                del b[i:j]
            elif k == 4:                                                   # duplicate a range
                i = r.randint(0, len(b))
                j = min(len(b), i + r.randint(1, 60))
                b[j:j] = b[i:j]
            elif k == 5:                                                   # a value -> raw token
                s = bytes(b)
                starts = [i + 1 for i, c in enumerate(s) if c == ord(":")]
                if starts:
                    i = r.choice(starts)
                    j = i
                    while j < len(b) and b[j] not in b",}":
                        j += 1
                    b[i:j] = r.choice(RAW_TOKENS).encode()
            elif k == 6:                                                   # duplicate key
                if b.startswith(b"{") and len(b) > 2:
                    b[1:1] = b'"type":' + self.js(r.choice(KNOWN_TYPES)) + b","
            else:
                b = bytearray(r.randbytes(r.randint(0, 64)))               # plain garbage
        return bytes(b)

    def nested(self, depth: int, closed: bool) -> bytes:
        """`depth` levels of nesting somewhere in a message (never over MAX_MESSAGE)."""
        r = self.r
        o, c = r.choice([(b"[", b"]"), (b'{"a":', b"}"), (b"[{\"b\":", b"}]")])
        per = len(o) + (len(c) if closed else 0)
        depth = min(depth, (MAX_MESSAGE - 200) // per)
        core = o * depth + (b"1" + c * depth if closed else b"")
        where = r.randrange(7)
        if where == 0:
            return core                                                    # top level
        if where == 1:
            return (b'{"type":"activities","conversationId":"x","activities":[{"type":"event","name":"dtmf",'
                    b'"value":' + core + b"}]}")
        if where == 2:
            return b'{"type":"activities","activities":[{"name":"start","parameters":{"callee":' + core + b"}}]}"
        if where == 3:
            return b'{"type":"userStream.chunk","audioChunk":"AAAA","zz":' + core + b"}"
        if where == 4:
            return b'{"type":' + core + b"}"
        if where == 5:
            return b'{"unknown.' + str(r.random()).encode() + b'":1,"type":"weird","x":' + core + b"}"
        return b'{"type":"session.initiate","supportedMediaFormats":' + core + b"}"

    def deep(self) -> bytes:
        r = self.r
        depth = r.choice([1000, 1001, 5000, 100_000, 500_000, 1_000_000])
        if depth >= 500_000 and not (self.budget.mega_nest > 0 and self.budget.take(1 << 20)):
            depth = 20_000
        elif depth >= 500_000:
            self.budget.mega_nest -= 1
        return self.nested(depth, closed=r.random() < 0.6)

    # ---------------------------------------------------------------- one frame of the ACTIVE mix
    def active_frame(self, audio: bool = True) -> bytes:
        """One data message (maybe fragmented) or control frame for a call in the ACTIVE state;
        `audio=False`: no valid-looking audio chunk (keeps a caller's silence silent)."""
        r = self.r
        k = r.random() if audio else 0.55 + 0.45 * r.random()
        if k < 0.40:                                            # audio, mostly valid
            return self.msg_frame(self.js(self.simple("userStream.chunk", audioChunk=self.b64_audio())))
        if k < 0.55:                                            # structure mutation of a real message
            base = r.choice(self.corpus())
            return self.msg_frame(self.js(self.mutate_obj(base)))
        if k < 0.70:                                            # byte-level mutation
            base = r.choice(self.corpus())
            return self.msg_frame(self.mutate_bytes(self.js(base)))
        if k < 0.78:                                            # message in the wrong state
            return self.msg_frame(self.js(self.wrong_state_active()))
        if k < 0.83:                                            # binary frame
            if r.random() < 0.5:
                return wsframe(OP_BINARY, r.randbytes(r.randint(0, 300)), key=self.key())
            return wsframe(OP_BINARY, self.js(self.simple("userStream.chunk", audioChunk=self.b64_audio())),
                           key=self.key())
        if k < 0.88:                                            # activities, odd ones
            return self.msg_frame(self.js(self.odd_activities()))
        if k < 0.92:                                            # control frames, legal
            if r.random() < 0.7:
                return wsframe(OP_PING, r.randbytes(r.randint(0, 125)), key=self.key())
            return wsframe(OP_PONG, r.randbytes(r.randint(0, 125)), key=self.key())
        if k < 0.95:                                            # raw garbage / truncations
            return self.msg_frame(self.mutate_bytes(b'{"type":"userStream.chunk","audioChunk":"'))
        if k < 0.965:                                           # unknown types, duplicate keys
            t = r.choice(["weird." + self.rstr(r.randint(0, 30)), "playStream.start", "", "USERSTREAM.CHUNK"])
            return self.msg_frame(self.js({"type": t, "conversationId": self.cid}))
        if k < 0.975:
            return self.msg_frame(b'{"type":"userStream.chunk","audioChunk":"AAAA","audioChunk":'
                                  + self.js(self.b64_audio()) + b"}")
        if k < 0.985:                                           # deep nesting (mostly modest)
            depth = r.choice([1000, 3000, 20_000])
            return self.msg_frame(self.nested(depth, closed=r.random() < 0.5), allow_binary=False)
        if k < 0.993:                                           # huge strings in known fields
            field_ = r.choice(["conversationId", "participant", "reason", "reasonCode", "audioChunk"])
            t = r.choice(["userStream.start", "userStream.stop", "userStream.chunk", "activities"])
            return self.msg_frame(self.js({"type": t, field_: self.huge_str()}))
        # huge base64 (the 16 kHz / 8 kHz formats decode and resample it)
        return self.msg_frame(self.js(self.simple("userStream.chunk", audioChunk=self.huge_b64())))

    def corpus(self) -> list[dict[str, Any]]:
        """Real VAIC messages to mutate (rebuilt now and then)."""
        if self._corpus is None or self.r.random() < 0.05:
            self._corpus = self._make_corpus()
        return self._corpus

    def _make_corpus(self) -> list[dict[str, Any]]:
        r = self.r
        return [
            self.initiate(r.sample(FORMATS, r.randint(1, 3)), set_fmt=False) if r.random() < 0.1 else
            {"type": "session.initiate", "conversationId": self.cid, "supportedMediaFormats": [self.fmt],
             "expectAudioMessages": True},
            self.simple("userStream.start"), self.simple("userStream.stop"),
            self.simple("userStream.chunk", audioChunk=base64.b64encode(self.audio_bytes(20)).decode()),
            *([self.simple("session.end", reasonCode="client-disconnected", reason="Client Side")]
              if self.may_end else []),
            self.simple("session.resume"), {"type": "connection.validate"},
            self.start_activity(), self.odd_activities(),
        ]

    def wrong_state_active(self) -> dict[str, Any]:
        r = self.r
        return r.choice([
            self.initiate(r.sample(FORMATS, r.randint(1, 2)), set_fmt=False),   # second initiate
            self.simple("session.resume"),
            self.simple("userStream.start"), self.simple("userStream.start"),
            self.simple("userStream.stop"),
            {"type": "connection.validate"},
            self.start_activity(),
        ])

    def odd_activities(self) -> dict[str, Any]:
        r = self.r
        acts = []
        for _ in range(r.choice([0, 1, 1, 2, 3, 17]) if r.random() < 0.98 else 200):
            name = r.choice(["start", "dtmf", "playFinished", "noUserInput", "hangup", "transfer",
                             None, "", self.rstr(r.randint(1, 80)), "Start", "DTMF"])
            a: dict[str, Any] = {"type": r.choice(["event", "message", 7, None]), "name": name}
            if r.random() < 0.5:
                a["value"] = self.rvalue()
            if r.random() < 0.3:
                a["parameters"] = {self.rstr(5): self.rvalue() for _ in range(r.randint(0, 5))}
            if r.random() < 0.2:
                a["activityParams"] = self.rvalue()
            acts.append(a)
        if r.random() < 0.05 and self.budget.take(100_000):
            acts.append({"type": "event", "name": "n" + str(r.random()) + "x" * 100_000})  # log amplifier
        return self.simple("activities", activities=acts)

    def first_wrong(self) -> bytes:
        """A first message that is not a valid session.initiate (WAIT_INITIATE state)."""
        r = self.r
        k = r.randrange(10)
        if k == 0:
            return self.js(self.simple(r.choice(["userStream.chunk", "userStream.start", "userStream.stop",
                                                 "session.end", "activities"]),
                                       audioChunk="AAAA"))
        if k == 1:
            return self.js(self.simple("session.resume"))
        if k == 2:
            return self.js(self.mutate_obj(self.initiate()))
        if k == 3:
            return self.mutate_bytes(self.js(self.initiate()))
        if k == 4:
            return self.js(self.initiate(r.choice([[], ["raw/opus"], ["raw/alaw", "wav/opus"],
                                                   [self.rstr(30)] * 20])))
        if k == 5:
            return self.js(self.initiate(expectAudioMessages=False))
        if k == 6:
            return self.deep()
        if k == 7:
            return r.randbytes(r.randint(0, 100))
        if k == 8:
            return self.js(self.rvalue())
        return self.js(self.initiate(supportedMediaFormats=r.choice(["raw/mulaw", 5, None, {"a": 1}])))

    # ---------------------------------------------------------------- terminal frames
    def terminal(self) -> bytes:
        """A frame that ends the connection (protocol violation, oversize, close variants)."""
        r = self.r
        k = r.randrange(15)
        if k == 0:
            return wsframe(r.choice([3, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF]), b"x", key=self.key())
        if k == 1:
            return wsframe(OP_TEXT, b'{"type":"x"}', rsv=r.choice([0x40, 0x20, 0x10, 0x70]), key=self.key())
        if k == 2:
            return wsframe(OP_TEXT, b'{"type":"userStream.stop"}', mask=False)
        if k == 3:
            bad_utf8 = r.choice([b"\xff\xfe", b'{"type":"\xc3"}', b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80"])
            return wsframe(OP_TEXT, bad_utf8, key=self.key())
        if k == 4:
            return wsframe(OP_PING, r.randbytes(r.randint(126, 300)), key=self.key())   # control > 125
        if k == 5:
            return wsframe(OP_PING, b"ab", fin=False, key=self.key())                # fragmented control
        if k == 6:
            return wsframe(OP_CONT, b"}", key=self.key())                            # CONT w/o start
        if k == 7:
            return wsframe(OP_TEXT, b'{"ty', fin=False, key=self.key()) + wsframe(OP_TEXT, b"{}", key=self.key())
        if k == 8:                                            # lying length: 2^40, few bytes follow
            return wsframe(OP_TEXT, b'{"type":"', length=r.choice([2**40, 2**63 - 1, (1 << 20) + 1, 5 << 20]),
                           key=self.key())
        if k == 9:                                            # length with the top bit set (invalid)
            return bytes([0x81, 0xFF]) + struct.pack("!Q", 2**63 + 5) + b"\0\0\0\0abc"
        if k == 10:
            code = r.choice([None, 1000, 1001, 1005, 1006, 999, 1004, 1015, 2999, 3000, 4999, 5000, 65535])
            reason = r.choice([b"", b"bye", b"\xff\xfe", "é".encode() * 61])
            return wsframe(OP_CLOSE, close_payload(code, reason) if code is not None else r.choice([b"", b"\x03"]),
                           key=self.key())
        if k == 11:                                           # non-minimal length encoding
            return bytes([0x81, 0x80 | 126]) + struct.pack("!H", 5) + b"\0\0\0\0hello"
        if k == 12:
            return wsframe(OP_TEXT, b'{"type":"session.end"}', key=self.key())[:-5]   # cut mid-frame
        if k == 13:
            return b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"                                 # HTTP as frames
        return r.randbytes(r.randint(1, 200))                                          # raw noise


# ============================================================================ connection plans


@dataclass
class Plan:
    kind: str
    pre: list[bytes] = field(default_factory=list)     # sent with the upgrade request (pipelined)
    body: list[bytes] = field(default_factory=list)    # sent after the 101 (batched)
    ending: str = "close"                              # close | abort | eof | linger | none
    read: bool = True                                  # read and discard what the daemon sends
    small_rcvbuf: bool = False
    second_upgrade: bool = False
    settle_at: int = -1        # after body[:settle_at]: wait for session.accepted + the OpenAI dial
    dribble: bool = False      # write the body in random 1..64-byte pieces
    pace_s: float = 0.0        # > 0: batches of PACED_BATCH frames this far apart (responses overlap)

    @property
    def frames(self) -> int:
        return len(self.pre) + len(self.body)


def _activate(g: Gen, plan: Plan, formats: list[str] | None = None) -> None:
    """A valid session.initiate (+ start activity, userStream.start). Mostly the rest waits
    until the OpenAI session is up, so the fuzz reaches the forwarding path; else it races it."""
    r = g.r
    plan.body.append(g.msg_frame(g.js(g.initiate(formats)), allow_binary=False))
    if r.random() < 0.7:
        plan.body.append(g.msg_frame(g.js(g.start_activity())))
    if r.random() < 0.9:
        plan.body.append(g.msg_frame(g.js(g.simple("userStream.start"))))
    if r.random() < 0.75:
        plan.settle_at = len(plan.body)


def _ending(g: Gen, plan: Plan) -> None:
    r = g.r
    k = r.random()
    if k < 0.35:
        plan.body.append(g.msg_frame(g.js(g.simple("session.end", reasonCode="client-disconnected"))))
        plan.ending = "close"
    elif k < 0.55:
        plan.ending = "close"
    elif k < 0.70:
        plan.ending = "abort"
    elif k < 0.78:
        plan.ending = "eof"
    else:
        plan.body.append(g.terminal())
        plan.ending = "linger"


def plan_active(g: Gen, n: int, formats: list[str] | None = None, kind: str = "active") -> Plan:
    plan = Plan(kind)
    _activate(g, plan, formats)
    plan.body += [g.active_frame() for _ in range(n)]
    _ending(g, plan)
    return plan


def make_plan(kind: str, g: Gen) -> Plan:
    r = g.r
    if kind == "active":
        return plan_active(g, r.randint(150, 700))
    if kind == "active_resample":                  # the 16 / 8 kHz resampling paths
        fmt = r.choice(["raw/lpcm16", "raw/lpcm16_8", "wav/lpcm16", "wav/lpcm16_8"])
        plan = plan_active(g, r.randint(150, 500), [fmt], kind)
        return plan
    if kind == "active_paced":                     # turns: the model answers and is barged in, under fuzz
        plan = Plan(kind, pace_s=0.04)
        _activate(g, plan)
        plan.settle_at = len(plan.body)
        for _ in range(r.randint(2, 3)):
            for speech, frames in ((True, r.randint(15, 30)), (False, r.randint(25, 40))):
                for _ in range(frames):
                    chunk = base64.b64encode(g.turn_audio(20, speech)).decode()
                    plan.body.append(g.msg_frame(g.js(g.simple("userStream.chunk", audioChunk=chunk))))
                    plan.body += [g.active_frame(audio=speech) for _ in range(r.randint(0, 3))]
        _ending(g, plan)
        return plan
    if kind == "dribble":                          # frames split over many tiny TCP segments
        plan = plan_active(g, r.randint(40, 120), kind=kind)
        plan.dribble = True
        return plan
    if kind == "huge_b64":
        plan = Plan(kind)
        _activate(g, plan, [r.choice(["raw/lpcm16", "raw/lpcm16_8", "raw/lpcm16_24", "raw/mulaw"])])
        for _ in range(r.randint(1, 3)):
            plan.body.append(g.msg_frame(g.js(g.simple("userStream.chunk", audioChunk=g.huge_b64())),
                                         allow_binary=False))
            plan.body += [g.active_frame() for _ in range(r.randint(5, 40))]
        _ending(g, plan)
        return plan
    if kind == "wait_state":                       # wrong first message, more after it
        plan = Plan(kind)
        if r.random() < 0.2:
            plan.body.append(g.msg_frame(g.js({"type": "connection.validate"})))
        plan.body.append(g.msg_frame(g.first_wrong()))
        plan.body += [g.active_frame() for _ in range(r.randint(0, 60))]
        plan.ending = r.choice(["close", "abort", "linger"])
        return plan
    if kind == "validate":
        plan = Plan(kind)
        for _ in range(r.randint(5, 100)):
            plan.body.append(g.msg_frame(g.js(r.choice([{"type": "connection.validate"},
                                                        g.mutate_obj({"type": "connection.validate"})]))))
        plan.ending = r.choice(["close", "abort"])
        return plan
    if kind == "after_end":                        # everything after session.end
        plan = Plan(kind)
        _activate(g, plan)
        plan.body += [g.active_frame() for _ in range(r.randint(0, 30))]
        plan.body.append(g.msg_frame(g.js(g.simple("session.end", reasonCode="client-disconnected"))))
        plan.body += [g.msg_frame(g.js(g.initiate(set_fmt=False)))] if r.random() < 0.5 else []
        plan.body += [g.active_frame() for _ in range(r.randint(20, 200))]
        plan.ending = r.choice(["close", "abort", "linger"])
        return plan
    if kind in ("fragment_flood", "fragment_flood_open"):   # TEXT fin=0, thousands of empty CONT
        plan = Plan(kind)
        if r.random() < 0.8:
            _activate(g, plan)
        msg = g.js(g.simple("userStream.chunk", audioChunk=base64.b64encode(g.audio_bytes(20)).decode()))
        cut = r.randint(1, len(msg) - 1)
        plan.body.append(wsframe(r.choice([OP_TEXT, OP_BINARY]), msg[:cut], fin=False, key=g.key()))
        empty = wsframe(OP_CONT, b"", fin=False)
        n = r.randint(2000, 12000) if kind == "fragment_flood" else r.randint(1000, 3000)
        for _ in range(n):
            plan.body.append(empty)
            if r.random() < 0.002:
                plan.body.append(wsframe(OP_PING, b"p", key=g.key()))
        if kind == "fragment_flood":                           # finished; _open: never finished
            plan.body.append(wsframe(OP_CONT, msg[cut:], fin=True, key=g.key()))
            plan.body += [g.active_frame() for _ in range(r.randint(0, 20))]
        plan.ending = "linger"    # wait for the daemon's close (1009 expected), then answer it
        return plan
    if kind == "ping_flood":
        plan = Plan(kind)
        if r.random() < 0.6:
            _activate(g, plan)
        n = r.randint(1500, 6000)
        payload = r.randbytes(125)
        ping = wsframe(r.choice([OP_PING, OP_PING, OP_PONG]), payload)   # unsolicited pongs too
        plan.body += [ping if r.random() < 0.9 else wsframe(OP_PING, r.randbytes(r.randint(0, 125)), key=g.key())
                      for _ in range(n)]
        plan.ending = r.choice(["close", "abort"])
        return plan
    if kind == "ping_flood_noread":                # pongs never read (small receive buffer)
        plan = Plan(kind, read=False, small_rcvbuf=True)
        _activate(g, plan)
        ping = wsframe(OP_PING, r.randbytes(125))
        plan.body += [ping] * r.randint(4000, 8000)
        plan.ending = "abort"
        return plan
    if kind == "oversize":
        plan = Plan(kind)
        if r.random() < 0.7:
            _activate(g, plan)
        # the frames before the big one must not end the call (a mutated real session.end did,
        # so the daemon rightly closed with 1000 before it read the oversized frame)
        g.may_end, g._corpus = False, None
        plan.body += [g.active_frame() for _ in range(r.randint(0, 10))]
        if g.budget.real_oversize > 0 and g.budget.take(5 << 20):
            g.budget.real_oversize -= 1
            size = r.choice([(4 << 20) + 1, (1 << 20) + 1 + (3 << 20)])
            plan.body.append(wsframe(OP_TEXT, b'{"type":"userStream.chunk","audioChunk":"' + b"A" * size + b'"}'))
        else:
            plan.body.append(wsframe(OP_TEXT, b'{"type":"', length=r.choice([2**40, 2**62, (4 << 20) + 1]),
                                     key=g.key()) + r.randbytes(r.randint(0, 1000)))
        plan.ending = "linger"
        return plan
    if kind == "deep_nest":
        plan = Plan(kind)
        if r.random() < 0.6:
            _activate(g, plan)
        for _ in range(r.randint(1, 4)):
            plan.body.append(g.msg_frame(g.deep(), allow_binary=False))
            plan.body += [g.active_frame() for _ in range(r.randint(0, 10))]
        _ending(g, plan)
        return plan
    if kind == "pipelined":                        # frames in the same segment as the upgrade
        plan = Plan(kind)
        if r.random() < 0.3:
            plan.second_upgrade = True
        plan.pre.append(g.msg_frame(g.js(g.initiate()), allow_binary=False))
        plan.pre += [g.active_frame() for _ in range(r.randint(0, 30))]
        plan.body += [g.active_frame() for _ in range(r.randint(0, 100))]
        _ending(g, plan)
        return plan
    if kind == "terminal":                         # a short call ended by a protocol violation
        plan = Plan(kind)
        if r.random() < 0.6:
            _activate(g, plan)
        plan.body += [g.active_frame() for _ in range(r.randint(0, 40))]
        plan.body.append(g.terminal())
        plan.body += [g.active_frame() for _ in range(r.randint(0, 5))]
        plan.ending = "linger"
        return plan
    raise ValueError(kind)


# kind -> weight (connections). Floods are few but carry many frames each.
KINDS: dict[str, float] = {
    "active": 30, "active_resample": 14, "active_paced": 8, "huge_b64": 3, "wait_state": 20, "validate": 3,
    "after_end": 8, "fragment_flood": 0.7, "fragment_flood_open": 0.5, "ping_flood": 1.2, "ping_flood_noread": 0.0,
    "oversize": 2, "deep_nest": 4,
    "pipelined": 2, "terminal": 8, "dribble": 3,
}


# ============================================================================ the fuzz driver


@dataclass
class ConnStats:
    kind: str
    cid: str = ""
    status: int | None = None
    frames: int = 0
    bytes_out: int = 0
    bytes_in: int = 0
    ops_in: Counter = field(default_factory=Counter)
    close_code: int | None = None
    peer_closed: bool = False
    stalled: bool = False


async def _discard(reader: asyncio.StreamReader, st: ConnStats) -> None:
    """Read everything the daemon sends, counting frames by opcode; payloads are skipped."""
    buf = bytearray()
    skip = 0
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                break
            st.bytes_in += len(data)
            if skip:
                if len(data) <= skip:
                    skip -= len(data)
                    continue
                data = data[skip:]
                skip = 0
            buf += data
            while len(buf) >= 2:
                op, n, i = buf[0] & 0x0F, buf[1] & 0x7F, 2
                if n == 126:
                    if len(buf) < 4:
                        break
                    n, i = struct.unpack_from("!H", buf, 2)[0], 4
                elif n == 127:
                    if len(buf) < 10:
                        break
                    n, i = struct.unpack_from("!Q", buf, 2)[0], 10
                if op == OP_CLOSE:
                    if len(buf) < i + n:
                        break
                    st.close_code = struct.unpack_from("!H", buf, i)[0] if n >= 2 else 1005
                st.ops_in[op] += 1
                if len(buf) >= i + n:
                    del buf[:i + n]
                else:
                    skip = i + n - len(buf)
                    buf.clear()
                    break
    except (ConnectionError, OSError):
        pass
    st.peer_closed = True


class Fuzzer:
    def __init__(self, seed: int, port: int, path: str, target: int) -> None:
        self.master = random.Random(seed)
        self.port = port
        self.path = path
        self.target = target
        self.budget = Budget()
        self.frames = 0
        self.bytes_out = 0
        self.conns: list[ConnStats] = []
        self.upgrade_failures: Counter = Counter()
        self.conn_timeouts: list[str] = []    # connections the daemon kept from finishing in time
        self.next_index = 0
        # every kind once first (coverage), then by weight; noread exactly once
        first = [k for k in KINDS if k != "ping_flood_noread"]
        self.master.shuffle(first)
        self.queue = first[:3] + ["ping_flood_noread"] + first[3:]
        self.deadline = 0.0

    def _next(self) -> tuple[int, str, int] | None:
        if self.frames >= self.target or time.monotonic() > self.deadline:
            return None
        idx = self.next_index
        self.next_index += 1
        if self.queue:
            kind = self.queue.pop(0)
        else:
            kinds = [k for k, w in KINDS.items() if w > 0]
            kind = self.master.choices(kinds, [KINDS[k] for k in kinds])[0]
        return idx, kind, self.master.getrandbits(64)

    async def _conn(self, idx: int, kind: str, seed: int) -> None:
        g = Gen(seed, f"fz{idx}-{kind}", self.budget)
        plan = make_plan(kind, g)
        st = ConnStats(kind, g.cid)
        self.conns.append(st)
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection("127.0.0.1", self.port, limit=1 << 16), 5)
        except (OSError, asyncio.TimeoutError, TimeoutError) as e:
            self.upgrade_failures[f"connect:{type(e).__name__}"] += 1
            return
        sock = writer.get_extra_info("socket")
        if plan.small_rcvbuf and sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        reader_task: asyncio.Task[None] | None = None
        try:
            host = f"127.0.0.1:{self.port}"
            first = upgrade_request(self.path, host, TOKEN)
            if plan.second_upgrade:
                first += upgrade_request(self.path, host, TOKEN)
            first += b"".join(plan.pre)
            writer.write(first)
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
                st.status = int(head.split(b" ", 2)[1])
            except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError,
                    asyncio.TimeoutError, TimeoutError, ValueError, IndexError) as e:
                self.upgrade_failures[f"{kind}:{type(e).__name__}"] += 1
                return
            if st.status != 101:
                self.upgrade_failures[f"{kind}:http {st.status}"] += 1
                return
            st.frames += len(plan.pre)        # pipelined frames count once the upgrade succeeded
            self.frames += len(plan.pre)
            if plan.read:
                reader_task = asyncio.create_task(_discard(reader, st))
            await self._send_body(writer, plan, st, reader_task)
            await self._finish(writer, plan, st, reader_task)
        finally:
            if reader_task is not None and not reader_task.done():
                reader_task.cancel()
            if not writer.transport.is_closing():
                writer.transport.abort()

    async def _send_body(self, writer: asyncio.StreamWriter, plan: Plan, st: ConnStats,
                         reader_task: asyncio.Task[None] | None) -> None:
        if plan.dribble:
            await self._dribble(writer, plan, st, reader_task)
            return
        batch: list[bytes] = []
        size = 0
        body = plan.body
        for i, fr in enumerate(body):
            batch.append(fr)
            size += len(fr)
            settle = i == plan.settle_at - 1
            full = len(batch) >= (PACED_BATCH if plan.pace_s and i >= plan.settle_at else 512)
            if size >= (1 << 17) or full or i == len(body) - 1 or settle:
                if writer.transport.is_closing() or (reader_task is not None and reader_task.done()):
                    return
                writer.write(b"".join(batch))
                st.frames += len(batch)
                st.bytes_out += size
                self.frames += len(batch)
                self.bytes_out += size
                batch, size = [], 0
                if plan.read:
                    try:
                        await asyncio.wait_for(writer.drain(), DRAIN_TIMEOUT_S)
                    except (asyncio.TimeoutError, TimeoutError):
                        st.stalled = True
                        return
                    except (ConnectionError, OSError):
                        return
                else:
                    await asyncio.sleep(0)
                    if writer.transport.get_write_buffer_size() > (4 << 20):
                        return   # the daemon stopped reading us (it must not buffer our pongs)
                if plan.pace_s and i >= plan.settle_at:
                    await asyncio.sleep(plan.pace_s)
                if settle and reader_task is not None:
                    end = time.monotonic() + 3.0
                    while not st.ops_in[OP_TEXT] and not reader_task.done() and time.monotonic() < end:
                        await asyncio.sleep(0.01)
                    await asyncio.sleep(SETTLE_S)

    async def _dribble(self, writer: asyncio.StreamWriter, plan: Plan, st: ConnStats,
                       reader_task: asyncio.Task[None] | None) -> None:
        r = random.Random(len(plan.body))
        data = b"".join(plan.body)
        i = 0
        while i < len(data):
            if writer.transport.is_closing() or (reader_task is not None and reader_task.done()):
                break
            n = r.randint(1, 64) if len(data) - i < 4096 or r.random() < 0.9 else r.randint(1000, 20000)
            writer.write(data[i:i + n])
            i += n
            await asyncio.sleep(0.002 if r.random() < 0.05 else 0)
        sent = len(plan.body) * min(i, len(data)) // max(len(data), 1)   # frames written (approx.)
        st.frames += sent
        st.bytes_out += min(i, len(data))
        self.frames += sent
        self.bytes_out += min(i, len(data))

    async def _finish(self, writer: asyncio.StreamWriter, plan: Plan, st: ConnStats,
                      reader_task: asyncio.Task[None] | None) -> None:
        r = random.Random(st.frames)
        try:
            if plan.ending == "close" and not writer.transport.is_closing():
                writer.write(wsframe(OP_CLOSE, close_payload(r.choice([1000, 1001, 4000]), b"fuzz done")))
            elif plan.ending == "eof" and writer.can_write_eof() and not writer.transport.is_closing():
                writer.write_eof()
            elif plan.ending == "abort":
                writer.transport.abort()
                return
        except (ConnectionError, OSError, RuntimeError):
            return
        if reader_task is None:
            writer.transport.abort()
            return
        end = time.monotonic() + LINGER_S
        while not reader_task.done() and st.close_code is None and time.monotonic() < end:
            await asyncio.sleep(0.02)
        if st.close_code is not None and plan.ending == "linger" and not writer.transport.is_closing():
            try:   # the daemon closed: answer its close like a client should, then wait for EOF
                writer.write(wsframe(OP_CLOSE, close_payload(st.close_code if st.close_code != 1005 else None)))
            except (ConnectionError, OSError, RuntimeError):
                pass
        try:
            await asyncio.wait_for(asyncio.shield(reader_task), max(0.0, end - time.monotonic()))
        except (asyncio.TimeoutError, TimeoutError):
            pass
        writer.transport.abort()

    async def _worker(self) -> None:
        while True:
            nxt = self._next()
            if nxt is None:
                return
            try:
                await asyncio.wait_for(self._conn(*nxt), CONN_TIMEOUT_S)
            except (asyncio.TimeoutError, TimeoutError):
                self.conn_timeouts.append(f"fz{nxt[0]}-{nxt[1]}")

    async def run(self, deadline_s: float) -> float:
        self.deadline = time.monotonic() + deadline_s
        t0 = time.monotonic()
        await asyncio.gather(*(self._worker() for _ in range(CONCURRENCY)))
        return time.monotonic() - t0

    def table(self) -> str:
        by: dict[str, list[ConnStats]] = {}
        for c in self.conns:
            by.setdefault(c.kind, []).append(c)
        lines = [f"{'kind':<19} {'conns':>5} {'frames':>7} {'MB out':>7} {'in:text':>7} close codes from daemon"]
        for kind, cs in sorted(by.items()):
            codes = Counter(c.close_code for c in cs if c.close_code is not None)
            lines.append(f"{kind:<19} {len(cs):>5} {sum(c.frames for c in cs):>7} "
                         f"{sum(c.bytes_out for c in cs) / 1e6:>7.1f} {sum(c.ops_in[OP_TEXT] for c in cs):>7} "
                         f"{dict(sorted(codes.items()))} stalled={sum(c.stalled for c in cs)}")
        return "\n".join(lines)


# ============================================================================ the test


_STRICT_B64 = re.compile(r"(?:[A-Za-z0-9+/]{4})*(?:[A-Za-z0-9+/]{2}==|[A-Za-z0-9+/]{3}=)?")


def openai_side_problems(fake: FakeRealtimeServer) -> tuple[list[str], int]:
    """What the fake OpenAI server (no fault knobs set) saw: every append carries strict base64
    and no other key (nothing injected through an audioChunk), every other client event is
    valid per the openai SDK, and the fake sent no non-benign error. Also returns the number of
    empty appends (an empty audioChunk forwarded as is: valid base64 of nothing, only noted)."""
    out: list[str] = []
    empty = 0
    bad_appends: list[str] = []
    invalid: list[str] = []
    errors: list[dict[str, Any]] = []
    for s in fake.sessions:
        for _, ev in s.received:
            if ev.get("type") == "input_audio_buffer.append":
                audio = ev.get("audio")
                if audio == "" and set(ev) <= {"type", "audio", "event_id"}:
                    empty += 1
                elif (set(ev) - {"type", "audio", "event_id"} or not isinstance(audio, str)
                        or not _STRICT_B64.fullmatch(audio)):
                    bad_appends.append(json.dumps(ev)[:300])
                continue
            try:
                validate_client_event(ev)
            except Exception as e:  # noqa: BLE001  pydantic / AssertionError, reported
                invalid.append(f"{json.dumps(ev)[:200]}: {str(e)[:200]}")
        errors += [e for e in s.errors_sent if not e.get("injected")
                   and (e.get("error") or {}).get("code") not in BENIGN_ERROR_CODES]
    if bad_appends:
        out.append(f"{len(bad_appends)} input_audio_buffer.append with extra keys or non-strict base64 reached "
                   f"OpenAI, first: {bad_appends[:3]}")
    if invalid:
        out.append(f"{len(invalid)} client events invalid per the openai SDK, first: {invalid[:3]}")
    if errors:
        out.append(f"the fake OpenAI server sent {len(errors)} errors, first: "
                   f"{[json.dumps(e)[:300] for e in errors[:3]]}")
    return out, empty


def close_code_problems(fz: "Fuzzer") -> list[str]:
    """Connections that must have been closed by the daemon with 1009: oversized frames
    (real or lying length), and fragment floods past `server.max_fragments`."""
    out: list[str] = []
    max_frag = 128 if config_has("server", "max_fragments") else None
    for c in fz.conns:
        if c.status != 101:
            continue
        must = c.kind == "oversize" or (c.kind.startswith("fragment_flood") and max_frag is not None
                                         and c.frames > max_frag + 20)
        if must and c.close_code != 1009:
            out.append(f"{c.cid} ({c.frames} frames): daemon close code {c.close_code}, expected 1009")
    return [f"{len(out)} connections not closed with 1009: {out[:6]}"] if out else []


def _daemon_env(transport: str) -> dict[str, str]:
    """Limits roomy enough that the daemon never refuses a fuzz connection (only keys this
    checkout's configuration knows: an unknown key would stop the daemon at start)."""
    wanted = {("server", "transport"): transport, ("server", "max_calls"): "1000",
              ("server", "max_pending_handshakes"): "512", ("log", "level"): "info"}
    return {f"VOICEBRIDGE_{s.upper()}_{k.upper()}": v for (s, k), v in wanted.items() if config_has(s, k)}


@pytest.mark.parametrize("transport", ["fast", "websockets", "picows"])
async def test_live_fuzz(tmp_path, transport):
    """>= FRAMES_TARGET fuzz frames through the running daemon (server.transport = `transport`)
    beside one clean call; every check is made and all failures reported together."""
    seed = int(os.environ.get("VB_FUZZ_SEED") or random.SystemRandom().getrandbits(32))
    print(f"\nlive fuzz [{transport}]: seed {seed} (replay with VB_FUZZ_SEED={seed}), "
          f"target {FRAMES_TARGET} frames")
    problems: list[str] = []
    async with running_fake() as fake:
        async with running_daemon(fake, tmp_path, name="fuzz", **_daemon_env(transport)) as d:
            hwm0 = d.peak_rss_kib()
            fz = Fuzzer(seed, d.port, d.path, FRAMES_TARGET)
            t0 = time.monotonic()
            fuzz = asyncio.create_task(fz.run(FUZZ_DEADLINE_S))
            await asyncio.sleep(0.3)   # the clean call starts once the fuzzing is under way
            clean = asyncio.create_task(clean_call(d, fake, script=[   # three turns, ~9 s: most of the fuzzing
                Speak(600), WaitForBot(8000), Silence(1500), Speak(600), WaitForBot(8000), Silence(1500),
                Speak(600), WaitForBot(8000), Silence(200)]))
            fuzz_s = await fuzz
            clean_exc: BaseException | None = None
            try:
                outcome = await asyncio.wait_for(clean, 40)
                clean_s = outcome.seconds
            except BaseException as e:  # noqa: BLE001  reported with the rest
                clean_exc, clean_s = e, float("nan")
            # after the fuzzing: every call ends, no OpenAI session left open
            t_end = time.monotonic()
            health: dict[str, Any] = {}
            while time.monotonic() - t_end < END_WAIT_S:
                try:
                    health = await d.health(timeout_s=5)
                except (AssertionError, OSError, asyncio.TimeoutError, TimeoutError, ValueError) as e:
                    health = {"error": repr(e)}
                    break
                if health.get("active_calls") == 0:
                    break
                await asyncio.sleep(0.2)
            drain_s = time.monotonic() - t_end
            fake_closed = await fake.wait_closed_all(5.0)
            alive = d.alive()
            hwm = d.peak_rss_kib() if alive else -1
            total_s = time.monotonic() - t0
            events = d.events()
            non_json = d.non_json_lines()
            log_bytes = d.log_bytes()
            long_lines = [ln for ln in d.log_text().splitlines() if len(ln) > MAX_LOG_LINE]

            print(fz.table())
            if fz.upgrade_failures:
                print(f"upgrade failures: {dict(fz.upgrade_failures)}")
            ends = Counter(e.get("reason") for e in events if e.get("event") == "call.end")
            print(f"call.end reasons: {dict(ends.most_common())}")
            print(f"event counts: {dict(Counter(e.get('event') for e in events).most_common(25))}")
            log_lines = len(events) + len(non_json)
            print(f"LIVE FUZZ [{transport}]: {fz.frames} frames ({fz.bytes_out / 1e6:.1f} MB) over "
                  f"{len(fz.conns)} connections in {fuzz_s:.1f} s (total {total_s:.1f} s, calls drained in "
                  f"{drain_s:.1f} s); peak RSS {hwm / 1024:.1f} MiB (start {hwm0 / 1024:.1f} MiB, "
                  f"+{(hwm - hwm0) / 1024:.1f}); clean call {clean_s:.1f} s; log {log_lines} lines, "
                  f"{log_bytes / 1e6:.2f} MB; seed {seed}")
            figures(f"live_fuzz_{transport}", seed=seed, frames=fz.frames, connections=len(fz.conns),
                    fuzz_s=round(fuzz_s, 1), peak_rss_kib=hwm, start_rss_kib=hwm0, log_lines=log_lines,
                    log_bytes=log_bytes)

            if not alive:
                problems.append(f"daemon died, exit status {d.proc.poll()}")
            if "error" in health or health.get("status") not in ("ok",):
                problems.append(f"/health after fuzzing: {health}")
            elif health.get("active_calls") != 0:
                problems.append(f"active_calls still {health.get('active_calls')} {END_WAIT_S} s after fuzzing")
            if not fake_closed:
                problems.append(f"fake OpenAI: {fake.open_sessions()} session(s) still open after all calls ended")
            if fz.conn_timeouts:
                problems.append(f"{len(fz.conn_timeouts)} fuzz connections did not finish within "
                                f"{CONN_TIMEOUT_S} s (daemon not reading?): {fz.conn_timeouts[:6]}")
            stalled = [c.cid for c in fz.conns if c.stalled]
            if stalled:
                problems.append(f"{len(stalled)} fuzz connections stalled (a write not taken within "
                                f"{DRAIN_TIMEOUT_S} s): {stalled[:6]}")
            if fz.frames < FRAMES_TARGET:
                problems.append(f"only {fz.frames} of {FRAMES_TARGET} frames sent within {FUZZ_DEADLINE_S} s")
            if clean_exc is not None:
                problems.append(f"clean call failed: {type(clean_exc).__name__}: {str(clean_exc)[:600]}")
            if non_json:
                problems.append(f"{len(non_json)} non-JSON log lines, first: {non_json[:5]}")
            bad_levels = [e for e in events
                          if str(e.get("level", "")).lower() in ("error", "critical", "exception")
                          and e.get("event") not in JUSTIFIED_ERRORS]
            if bad_levels:
                kinds = Counter(e.get("event") for e in bad_levels)
                problems.append(f"{len(bad_levels)} error/critical log lines {dict(kinds)}, first: "
                                f"{[_clip(e) for e in bad_levels[:3]]}")
            internal = [e for e in events if e.get("event") == "call.internal_error"
                        or e.get("reason") == "internal_error"]
            if internal:
                problems.append(f"{len(internal)} internal errors, first: {[_clip(e) for e in internal[:3]]}")
            if alive and hwm - hwm0 > RSS_BOUND_KIB:
                problems.append(f"peak RSS grew {(hwm - hwm0) / 1024:.0f} MiB (> {RSS_BOUND_KIB // 1024} MiB)")
            if long_lines:
                problems.append(f"{len(long_lines)} log lines longer than {MAX_LOG_LINE} bytes (peer strings not "
                                f"clipped), longest {max(map(len, long_lines))}; first starts: "
                                f"{[ln[:300] for ln in long_lines[:2]]}")
            problems += close_code_problems(fz)
            oai_problems, empty_appends = openai_side_problems(fake)
            problems += oai_problems
            if empty_appends:
                print(f"note: {empty_appends} empty input_audio_buffer.append forwarded (caller audioChunk \"\")")
            reasons = [e for e in events if e.get("event") == "call.end"
                       and str(e.get("reason", "")).startswith("openai_")]
            if reasons:  # the fake has no fault knob set: an OpenAI-side end is misattributed or provoked
                first = [(e.get("call_id"), e.get("reason"), e.get("detail")) for e in reasons[:4]]
                problems.append(f"{len(reasons)} calls ended for an OpenAI reason although the fake OpenAI "
                                f"server never fails: {first}")
    assert not problems, "live fuzz [%s] (seed %d):\n- %s" % (transport, seed, "\n- ".join(problems))


def _clip(ev: dict[str, Any]) -> dict[str, Any]:
    return {k: (v[:300] if isinstance(v, str) else v) for k, v in ev.items()}
