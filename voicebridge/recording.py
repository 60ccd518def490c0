"""Wire-level call recording: every frame of a call, both directions, both sockets, with its time.

Opt-in. `[recording] dir` turns the recorder on; which calls are recorded is the call's profile's
`record` setting (`CallSession.profile.record`), or every call with `[recording] record_all`.
Audio is personal data: see the README ("Call recording") for consent, retention and access.

## What is recorded

Per call, one file holding, in order, every websocket frame:
- `vaic_in`: what VAIC sent us (session.initiate, activities, userStream.*, audio chunks);
- `vaic_out`: what we sent VAIC (session.accepted, playStream.*, activities, ...);
- `openai_in`: what the Realtime API sent us; `openai_out`: what we sent it;
- `note`: a few shell events that are no frame (a socket closed, a VAIC socket re-attached by
  session.resume, the end of the recording with the call's end reason).
Each with its time in ns since the call started (the shell's `monotonic_ns()`: a received frame
when it was read, a sent frame when it was handed to the transport). Nothing of the HTTP
handshakes is recorded: not VAIC's `Authorization` header, not the OpenAI dial URL or headers
(the API key). As a second line of defence, a control frame with a key that looks like a secret
(`authorization`, `*token`, `*secret`, `api_key`, `password`, ...) has those values replaced by
`"[redacted]"` before it is written (flag `REDACTED`); none of the frames the bridge handles today
carries one.

## File format (version 1), little-endian

    magic    8 bytes   b"VBREC1\\r\\n"
    header   u32 n, then n bytes of JSON: {"format": 1, "call_id", "started_at" (UTC ISO 8601,
             ms), "started_unix_ns", "bridge" (version), "profile" (name or null), "reason"
             ("profile" | "record_all")}
    records  until the end of the file, each:
             u32 body length, u8 kind, u8 flags, u64 t_ns, body

`kind`: 0 vaic_in, 1 vaic_out, 2 openai_in, 3 openai_out, 4 note (body: one JSON object with
an "event" key). `flags`: 1 `BYTES` (the frame was read as bytes, not str: text either way),
2 `AUDIO` (the base64 audio value was taken out: body = u32 offset, u32 text length, the frame's
UTF-8 text without the base64 characters, then the decoded audio; the frame is `text[:offset] +
base64(audio) + text[offset:]`, byte for byte), 8 `AUDIO_REF` (with `AUDIO`: the audio is not
stored but is a slice of a recent audio of the frame's source socket, body = u32 offset, u32 text
length, u32 back, u32 start, u32 length, text: the slice `[start:start+length]` of the `back`-th
newest audio (0 = newest) of kind `vaic_in` (for `openai_out`) or `openai_in` (for `vaic_out`);
in pass-through the caller's audio is the same bytes on both sockets and the bot's chunks are
pieces of the model's deltas, so each is stored once; the writer finds the copy by its base64
text, at a 4-character boundary, without decoding it), 4 `REDACTED`.
The writer and the reader keep the same `AUDIO_RING` most recent source audios per socket.
Audio is taken out only where it round-trips exactly (canonical base64), so `read_recording`
gives back every frame as it was on the wire. A file cut short (a crash) reads
up to its last whole record (`Recording.complete` is False).
About 14 bytes per record plus the frame; audio costs its PCM/µ-law bytes once.

## Cost and bounds

Hot path (the shell, per frame, recording on): two list/array appends and an addition, about
0.15-0.3 µs (`python -m bench.recording_cost`). Recording off, or this call not recorded: one
attribute load and one `is not None` test per frame in `call.py` (about 20 ns). Encoding and
writing happen in one writer thread per process (4-8 µs per 20 ms caller frame, whose base64 is
decoded; 2-3 µs for a forwarded copy found in the ring; 15-27 µs per 100 ms model delta).
Each call's frames are handed over in batches (every `FLUSH_BYTES` of frames or
`FLUSH_INTERVAL_S`, and at the call's end). Bounds:
- per call in memory: `FLUSH_BYTES` plus one frame once recording; `PREBUFFER_BYTES` while the
  call's profile is not final yet (the callee arrives with the `start` activity): the early
  frames wait in memory; once `profile_final`, they are written (profile records) or dropped. A
  pre-buffer that fills up before that ends the recording of that call (`recording.stopped`);
- handed to the writer and not written yet, all calls: `MAX_INFLIGHT_BYTES`; past it the call
  whose batch does not fit stops being recorded (a disk that cannot keep up never grows memory);
- per file: `max_bytes_per_call`; the file is closed at that size with a `note`
  (`recording.stopped`, reason `max_bytes_per_call`) and one log line;
- retention: files older than `retention_days` are deleted at start and then every
  `SWEEP_INTERVAL_S`, by the writer thread.
Files are created with mode 0600 (`O_EXCL`, `O_NOFOLLOW`), the directory with 0700 if missing;
an existing directory readable by group or others is logged as a warning.

## Contract with the shell (`call.py`)

`for_call(owner, cfg, session)` -> a `CallRecorder` or None (recording off). The shell keeps it
as `owner.rec` and, per frame, calls `vaic_in(frame, now_ns)`, `openai_in(frame, now_ns)`,
`openai_out(frame, now_ns)`, `sent(frames, vaic)`; `note(event, **fields)` for shell events;
`close(end_reason)` once at the end. The recorder sets `owner.rec = None` itself as soon as it
stops (this call is not recorded, a bound was reached, closed), so a call that is not recorded
costs nothing after its profile is final.
"""

from __future__ import annotations

import asyncio
import atexit
import base64
import binascii
import os
import queue
import re
import secrets
import stat
import struct
import threading
import time
from array import array
from collections import deque
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from time import monotonic_ns
from typing import Any, BinaryIO, Iterator, NamedTuple

import msgspec

from . import __version__
from .bounds import ID_CHARS, clip
from .config import Config, RecordingConfig
from .log import exc_fields, get_logger

MAGIC = b"VBREC1\r\n"
FORMAT_VERSION = 1
SUFFIX = ".vbrec"

VAIC_IN, VAIC_OUT, OPENAI_IN, OPENAI_OUT, NOTE = 0, 1, 2, 3, 4
KIND_NAMES = ("vaic_in", "vaic_out", "openai_in", "openai_out", "note")
BYTES, AUDIO, REDACTED, AUDIO_REF = 1, 2, 4, 8

FLUSH_BYTES = 64 * 1024            # a call's frames are handed to the writer past this ...
FLUSH_INTERVAL_S = 1.0             # ... or this often
PREBUFFER_BYTES = 2 * 1024 * 1024  # frames held while the profile is not final
MAX_INFLIGHT_BYTES = 64 * 1024 * 1024   # handed to the writer, not yet written (all calls)
SWEEP_INTERVAL_S = 3600.0          # retention check
NOTE_RESERVE_BYTES = 512           # kept free under max_bytes_per_call for the closing note
AUDIO_RING = 32                    # recent source audios a forwarded frame's audio is looked up in
RING_GIVE_UP = 64                  # misses in a row with no hit: stop looking (transcoded call)
DIR_RETRY_S = 60.0                 # a directory that could not be set up is tried again after this

_HEAD = struct.Struct("<IBBQ")     # body length, kind, flags, t_ns
_SPLIT = struct.Struct("<II")      # offset, text length
_REF = struct.Struct("<IIIII")     # offset, text length, back, start, length
_U32 = struct.Struct("<I")

# (frame type marker, key of its base64 value) for the four audio frames
_AUDIO_FIELDS = ((b'"userStream.chunk"', b'"audioChunk":"'),
                 (b'"playStream.chunk"', b'"audioChunk":"'),
                 (b'"input_audio_buffer.append"', b'"audio":"'),
                 (b'"response.output_audio.delta"', b'"delta":"'))
_SECRET_KEY_RE = rb'"[A-Za-z0-9_\-]*(?:secret|password|passwd|api[_-]?key|authorization|bearer|token)"\s*:'
_SECRET_KEY = re.compile(_SECRET_KEY_RE, re.IGNORECASE)
_SECRET_NAME = re.compile(r"^[A-Za-z0-9_\-]*(?:secret|password|passwd|api[_-]?key|authorization|bearer|token)$",
                          re.IGNORECASE)
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_json = msgspec.json.Encoder()


class RecordingError(ValueError):
    """A file that is not a recording, or of an unknown format version."""


# ------------------------------------------------------------------------------------ encoding


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: ("[redacted]" if isinstance(k, str) and _SECRET_NAME.match(k) else _redact(v))
                for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


_SECRET_WORDS = (b"secret", b"passw", b"api_key", b"api-key", b"apikey", b"authorization", b"bearer", b"token")


def scrub(data: bytes) -> tuple[bytes, int]:
    """`data` with the values of secret-looking keys replaced, and `REDACTED` (or 0 when none)."""
    low = data.lower()
    for w in _SECRET_WORDS:
        if w in low:
            break
    else:
        return data, 0
    if _SECRET_KEY.search(data) is None:
        return data, 0
    try:
        return _json.encode(_redact(msgspec.json.decode(data))), REDACTED
    except (msgspec.DecodeError, msgspec.EncodeError, RecursionError):
        return b'{"type":"[redacted]","detail":"not JSON, with a secret-looking key"}', REDACTED


_AUDIO_KEY_OF = {marker[1:-1]: key for marker, key in _AUDIO_FIELDS}
# any other JSON layout (spaces, the type later): the type as a value, then its key
_AUDIO_SLOW = [(re.compile(re.escape(marker) + rb"\s*[,}]"), re.compile(re.escape(key[:-3]) + rb'"\s*:\s*"'))
               for marker, key in _AUDIO_FIELDS]


def audio_span(data: bytes) -> tuple[int, int] | None:
    """Where the base64 value of an audio frame (the four kinds with audio) is, else None."""
    if data.startswith(b'{"type":"'):        # the usual layout: the type first
        key = _AUDIO_KEY_OF.get(data[9:data.find(b'"', 9)])
        if key is None:
            return None
        i = data.find(key)
        if i < 0:
            return None
        start = i + len(key)
        end = data.find(b'"', start)
        return (start, end) if end > start else None
    for marker_re, key_re in _AUDIO_SLOW:
        if marker_re.search(data) is not None:
            m = key_re.search(data)
            if m is None:
                return None
            start = m.end()
            end = data.find(b'"', start)
            return (start, end) if end > start else None
    return None


def decode_exact(b64: bytes) -> bytes | None:
    """The bytes of strict, canonical base64 (re-encoding gives `b64` back), else None."""
    try:
        audio = binascii.a2b_base64(b64, strict_mode=True)
    except (binascii.Error, ValueError):
        return None
    # strict decoding leaves only the pad bits of the last quantum to check
    if not audio or binascii.b2a_base64(audio[-(len(audio) % 3 or 3):], newline=False) != b64[-4:]:
        return None
    return audio


def split_audio(data: bytes) -> tuple[bytes, int, bytes] | None:
    """(text without the base64 value, its offset, the decoded audio) for an audio frame whose
    base64 round-trips exactly; None for any other frame."""
    span = audio_span(data)
    if span is None:
        return None
    start, end = span
    audio = decode_exact(data[start:end])
    return None if audio is None else (data[:start] + data[end:], start, audio)


class _Ring:
    """The last `AUDIO_RING` (base64, audio) of one source socket. The reader keeps the audios
    of the same records, so (back, start, length) names the same bytes on both sides."""

    __slots__ = ("items", "misses", "hits")

    def __init__(self) -> None:
        self.items: deque[tuple[bytes, bytes]] = deque(maxlen=AUDIO_RING)
        self.misses = 0
        self.hits = 0

    def find(self, b64: bytes) -> tuple[int, int, int] | None:
        """(back, byte start, byte length) of a recent audio whose base64 holds `b64` at a
        quantum boundary (so its bytes are a slice of that audio), else None. Gives up on a
        socket pair that never matched (a transcoded call)."""
        if len(b64) % 4 or (self.hits == 0 and self.misses >= RING_GIVE_UP):
            return None
        n = len(b64) // 4 * 3 - (b64[-2:].count(b"="))
        for back, (src, _) in enumerate(reversed(self.items)):
            if src == b64:
                self.hits += 1
                self.misses = 0
                return back, 0, n
            pos = src.find(b64)
            while pos >= 0 and pos % 4:
                pos = src.find(b64, pos + 1)
            if pos >= 0:
                self.hits += 1
                self.misses = 0
                return back, pos // 4 * 3, n
        self.misses += 1
        return None


# the source socket whose audio a frame of each kind forwards (pass-through)
_SOURCE = {OPENAI_OUT: VAIC_IN, VAIC_OUT: OPENAI_IN}


class Encoder:
    """Frames -> records (the writer's side; state: the audio rings of one file). Audio is
    decoded once, where it enters the bridge; a forwarded copy is found by its base64 text."""

    def __init__(self) -> None:
        self.rings = {VAIC_IN: _Ring(), OPENAI_IN: _Ring()}

    def record(self, kind: int, t_ns: int, frame: str | bytes) -> bytes:
        if isinstance(frame, str):
            data, flags = frame.encode(), 0
        else:
            data, flags = bytes(frame), BYTES
        if kind == NOTE:
            return _HEAD.pack(len(data), kind, 0, t_ns) + data
        span = audio_span(data)
        if span is None:
            data, red = scrub(data)
            return _HEAD.pack(len(data), kind, flags | red, t_ns) + data
        start, end = span
        b64 = data[start:end]
        text = data[:start] + data[end:]
        ring = self.rings.get(kind)
        if ring is None:                # a forwarded frame: a slice of a recent source audio?
            hit = self.rings[_SOURCE[kind]].find(b64)
            if hit is not None:
                body = _REF.pack(start, len(text), *hit) + text
                return _HEAD.pack(len(body), kind, flags | AUDIO | AUDIO_REF, t_ns) + body
        audio = decode_exact(b64)
        if audio is None:               # not canonical base64: kept as it came
            return _HEAD.pack(len(data), kind, flags, t_ns) + data
        if ring is not None:            # a source socket: keep its audio for the other side
            ring.items.append((b64, audio))
        body = _SPLIT.pack(start, len(text)) + text + audio
        return _HEAD.pack(len(body), kind, flags | AUDIO, t_ns) + body


def encode_header(header: dict[str, Any]) -> bytes:
    body = _json.encode(header)
    return MAGIC + _U32.pack(len(body)) + body


# ------------------------------------------------------------------------------------ reading


class Record(NamedTuple):
    """One recorded frame. `text` is the frame's UTF-8 text, without its base64 audio when
    `audio` is set (then `frame()` puts it back at `offset`)."""
    kind: int
    t_ns: int
    flags: int
    text: bytes
    audio: bytes | None = None
    offset: int = 0

    @property
    def kind_name(self) -> str:
        return KIND_NAMES[self.kind] if self.kind < len(KIND_NAMES) else f"kind{self.kind}"

    def frame(self) -> str:
        """The frame's text as it was on the wire."""
        if self.audio is None:
            return self.text.decode("utf-8", "replace")
        b64 = base64.b64encode(self.audio)
        return (self.text[:self.offset] + b64 + self.text[self.offset:]).decode("utf-8", "replace")

    def json(self) -> Any:
        """The frame decoded (audio left out: its value is ""), or None if it is not JSON."""
        try:
            return msgspec.json.decode(self.text)
        except msgspec.DecodeError:
            return None


@dataclass
class Recording:
    path: str
    header: dict[str, Any]
    records: list[Record] = field(default_factory=list)
    complete: bool = True           # False: the file ends inside a record (cut short)

    def of(self, *kinds: int) -> list[Record]:
        return [r for r in self.records if r.kind in kinds]


def iter_records(f: BinaryIO) -> Iterator[Record]:
    """Records after the header; stops at the end of the file or at a cut-short record
    (raises `EOFError` there, after the last whole record)."""
    rings: dict[int, deque[bytes]] = {VAIC_IN: deque(maxlen=AUDIO_RING), OPENAI_IN: deque(maxlen=AUDIO_RING)}
    while True:
        head = f.read(_HEAD.size)
        if not head:
            return
        if len(head) < _HEAD.size:
            raise EOFError("cut short in a record head")
        n, kind, flags, t_ns = _HEAD.unpack(head)
        body = f.read(n)
        if len(body) < n:
            raise EOFError("cut short in a record body")
        if not flags & AUDIO:
            yield Record(kind, t_ns, flags, body)
            continue
        if flags & AUDIO_REF:
            offset, tlen, back, start, length = _REF.unpack_from(body)
            text = body[_REF.size:_REF.size + tlen]
            src = rings[_SOURCE[kind]]
            if back >= len(src):
                raise RecordingError(f"record at {t_ns} ns refers to audio that is not there")
            audio = src[-1 - back][start:start + length]
        else:
            offset, tlen = _SPLIT.unpack_from(body)
            text = body[_SPLIT.size:_SPLIT.size + tlen]
            audio = body[_SPLIT.size + tlen:]
            if kind in rings:
                rings[kind].append(audio)
        yield Record(kind, t_ns, flags, text, audio, offset)


def read_recording(path: str | Path) -> Recording:
    """The whole file. Raises `RecordingError` (not a recording), `OSError`."""
    with open(path, "rb") as f:
        magic = f.read(len(MAGIC))
        if magic != MAGIC:
            raise RecordingError(f"{path}: not a voicebridge recording (magic {magic[:8]!r})")
        raw = f.read(4)
        if len(raw) < 4:
            raise RecordingError(f"{path}: cut short in the header")
        (n,) = _U32.unpack(raw)
        if n > 1024 * 1024:
            raise RecordingError(f"{path}: header of {n} bytes")
        try:
            header = msgspec.json.decode(f.read(n))
        except msgspec.DecodeError as e:
            raise RecordingError(f"{path}: bad header: {e}") from None
        if not isinstance(header, dict) or header.get("format") != FORMAT_VERSION:
            raise RecordingError(f"{path}: unknown format {header.get('format') if isinstance(header, dict) else header!r}")
        rec = Recording(str(path), header)
        try:
            for r in iter_records(f):
                rec.records.append(r)
        except EOFError:
            rec.complete = False
        return rec


# ------------------------------------------------------------------------------------ retention


def sweep(directory: str | Path, retention_s: float, now_s: float | None = None) -> int:
    """Delete the recordings (`*.vbrec`, regular files, not symlinks) in `directory` last
    modified more than `retention_s` ago; returns how many."""
    now_s = time.time() if now_s is None else now_s
    cutoff = now_s - retention_s
    deleted = 0
    try:
        entries = list(os.scandir(directory))
    except OSError:
        return 0
    for entry in entries:
        if not entry.name.endswith(SUFFIX):
            continue
        try:
            st = entry.stat(follow_symlinks=False)
            if stat.S_ISREG(st.st_mode) and st.st_mtime < cutoff:
                os.unlink(entry.path)
                deleted += 1
        except OSError:
            continue
    return deleted


def file_name(call_id: str, started_unix_ns: int) -> str:
    when = datetime.fromtimestamp(started_unix_ns / 1e9, timezone.utc).strftime("%Y%m%dT%H%M%SZ")
    safe = _SAFE_NAME.sub("_", call_id)[:ID_CHARS].lstrip(".") or "call"
    return f"{when}_{safe}_{secrets.token_hex(3)}{SUFFIX}"


# ------------------------------------------------------------------------------------ the writer


class _Job:
    """One file, owned by the writer thread (opened at its first batch)."""

    def __init__(self, directory: str, name: str, header: dict[str, Any], max_bytes: int,
                 recorder: "CallRecorder") -> None:
        self.path = os.path.join(directory, name)
        self.header = header
        self.max_bytes = max_bytes
        self.recorder = recorder
        self.fd = -1
        self.written = 0
        self.failed = False
        self.stopped = False        # closed by the writer (max_bytes_per_call)
        self.encoder = Encoder()

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.write(self.fd, view)
            view = view[n:]
        self.written += len(data)

    def open(self) -> None:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0)
        self.fd = os.open(self.path, flags, 0o600)
        os.fchmod(self.fd, 0o600)       # exactly 0600, whatever the umask
        self._write(encode_header(self.header))

    def batch(self, frames: list[str | bytes], meta: array[int]) -> None:
        if self.failed or self.stopped:
            return
        if self.fd < 0:
            self.open()
        limit = self.max_bytes - NOTE_RESERVE_BYTES
        out: list[bytes] = []
        size = self.written
        enc = self.encoder
        for frame, m in zip(frames, meta):
            rec = enc.record(m & 7, m >> 3, frame)
            if size + len(rec) > limit:
                self._write(b"".join(out))
                self.stopped = True
                self._write(enc.record(NOTE, m >> 3, _json.encode(
                    {"event": "recording.stopped", "reason": "max_bytes_per_call",
                     "max_bytes_per_call": self.max_bytes})))
                self.close_fd()
                self.recorder._from_writer("max_bytes_per_call", self.written)
                return
            out.append(rec)
            size += len(rec)
        self._write(b"".join(out))

    def close(self, note: bytes | None) -> None:
        if self.failed or self.stopped:
            return
        if self.fd < 0:
            self.open()
        if note is not None:
            self._write(note)
        self.close_fd()

    def close_fd(self) -> None:
        if self.fd >= 0:
            try:
                os.close(self.fd)
            finally:
                self.fd = -1


@dataclass
class _Dir:
    path: str
    retention_s: float
    ok: bool = False
    checked_at: float = 0.0       # monotonic s of the last set-up attempt
    next_sweep: float = 0.0       # monotonic s


class RecordingService:
    """The writer thread and the directories it writes to: one per process (`service()`)."""

    def __init__(self) -> None:
        self._q: queue.SimpleQueue[tuple[Any, ...]] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._dirs: dict[str, _Dir] = {}
        self.queued_bytes = 0        # handed to the writer (loop thread only)
        self.written_bytes = 0       # of those, done (writer thread only)
        self.log = get_logger()

    # -- loop thread
    def configure(self, rc: RecordingConfig) -> bool:
        """Set up `rc.dir` (created 0700 if missing) and check its retention now. False (and
        one log line) when the directory cannot be used; calls are then not recorded."""
        if not rc.dir:
            return False
        d = self._dirs.get(rc.dir)
        now = time.monotonic()
        if d is not None and (d.ok or now - d.checked_at < DIR_RETRY_S):
            d.retention_s = rc.retention_days * 86400.0
            return d.ok
        d = self._dirs[rc.dir] = _Dir(rc.dir, rc.retention_days * 86400.0, checked_at=now)
        try:
            os.makedirs(rc.dir, mode=0o700, exist_ok=True)
            st = os.stat(rc.dir)
            if not stat.S_ISDIR(st.st_mode):
                raise NotADirectoryError(f"{rc.dir} is not a directory")
            if not os.access(rc.dir, os.W_OK | os.X_OK):
                raise PermissionError(f"{rc.dir} is not writable")
        except OSError as e:
            self.log.error("recording.dir_failed", dir=clip(rc.dir), **exc_fields(e),
                           detail="calls are not recorded until this is fixed")
            return False
        if st.st_mode & 0o077:
            self.log.warning("recording.dir_permissions", dir=clip(rc.dir), mode=oct(st.st_mode & 0o777),
                             detail="recordings hold personal data: make the directory 0700")
        d.ok = True
        self._start()
        self._q.put(("sweep", d))
        self.log.info("recording.enabled", dir=clip(rc.dir), retention_days=rc.retention_days,
                      max_bytes_per_call=rc.max_bytes_per_call, record_all=rc.record_all)
        return True

    def _start(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._thread = threading.Thread(target=self._run, name="voicebridge-recording", daemon=True)
                self._thread.start()

    def submit(self, item: tuple[Any, ...], nbytes: int = 0) -> bool:
        """Hand `item` to the writer; False (nothing queued) when `nbytes` would take the
        writer's backlog past `MAX_INFLIGHT_BYTES`."""
        if nbytes and self.queued_bytes + nbytes - self.written_bytes > MAX_INFLIGHT_BYTES:
            return False
        self.queued_bytes += nbytes
        self._q.put(item)
        return True

    async def drain(self, timeout_s: float = 5.0) -> bool:
        """Wait (bounded) until everything handed over so far is written and closed."""
        if self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._q.put(("barrier", done))
        end = time.monotonic() + timeout_s
        while not done.is_set():
            if time.monotonic() >= end:
                return False
            await asyncio.sleep(0.01)
        return True

    def drain_sync(self, timeout_s: float = 5.0) -> bool:
        if self._thread is None or not self._thread.is_alive():
            return True
        done = threading.Event()
        self._q.put(("barrier", done))
        return done.wait(timeout_s)

    # -- writer thread
    def _run(self) -> None:
        while True:
            try:
                item = self._q.get(timeout=60.0)
            except queue.Empty:
                item = ("tick",)
            try:
                self._handle(item)
            except Exception as e:   # never kill the writer
                self._report(None, "error", "recording.writer_error", **exc_fields(e))
            now = time.monotonic()
            for d in list(self._dirs.values()):
                if d.ok and now >= d.next_sweep:
                    self._sweep(d)

    def _handle(self, item: tuple[Any, ...]) -> None:
        what = item[0]
        if what == "data":
            _, job, frames, meta, nbytes = item
            try:
                job.batch(frames, meta)
            except OSError as e:
                self._failed(job, e)
            finally:
                self.written_bytes += nbytes
        elif what == "close":
            _, job, note = item
            try:
                job.close(note)
            except OSError as e:
                self._failed(job, e)
        elif what == "sweep":
            self._sweep(item[1])
        elif what == "barrier":
            item[1].set()

    def _failed(self, job: _Job, e: OSError) -> None:
        if not job.failed:
            job.failed = True
            job.close_fd()
            self._report(job.recorder, "error", "recording.write_failed", path=clip(job.path), **exc_fields(e))
            job.recorder._from_writer("write_failed", job.written, log=False)

    def _sweep(self, d: _Dir) -> None:
        d.next_sweep = time.monotonic() + SWEEP_INTERVAL_S
        n = sweep(d.path, d.retention_s)
        if n:
            self._report(None, "info", "recording.retention", dir=clip(d.path), deleted=n,
                         retention_days=round(d.retention_s / 86400.0, 3))

    def _report(self, recorder: "CallRecorder | None", level: str, event: str, **fields: Any) -> None:
        """A log line from the writer thread, written by the event loop when there is one."""
        loop = recorder._loop if recorder is not None else None
        log = recorder.log if recorder is not None else self.log
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(lambda: getattr(log, level)(event, **fields))
                return
            except RuntimeError:
                pass
        getattr(log, level)(event, **fields)


_service: RecordingService | None = None


def service() -> RecordingService:
    global _service
    if _service is None:
        _service = RecordingService()
        atexit.register(_service.drain_sync, 5.0)
    return _service


def configure(rc: RecordingConfig) -> bool:
    """At start (and reload): set up `rc.dir` and run the retention check. No-op when off."""
    return service().configure(rc) if rc.dir else False


async def drain(timeout_s: float = 5.0) -> bool:
    """Wait (bounded) until every recording handed over so far is on disk."""
    return await service().drain(timeout_s) if _service is not None else True


# ------------------------------------------------------------------------------------ per call

PENDING, RECORDING, STOPPED = 0, 1, 2


class CallRecorder:
    """The recorder of one call (loop thread). See the module docstring for the contract."""

    __slots__ = ("_owner", "_session", "_rc", "_svc", "_t0", "_wall_ns", "_frames", "_meta", "_n",
                 "_limit", "state", "_job", "_loop", "_timer", "log", "frames", "bytes", "stop_reason")

    def __init__(self, owner: Any, rc: RecordingConfig, session: Any, svc: RecordingService,
                 start_ns: int, log: Any = None) -> None:
        self._owner = owner
        self._session = session
        self._rc = rc
        self._svc = svc
        self._t0 = start_ns
        self._wall_ns = time.time_ns() - (monotonic_ns() - start_ns)
        self._frames: list[str | bytes] = []
        self._meta: array[int] = array("q")
        self._n = 0                     # bytes of the frames buffered here
        self._limit = PREBUFFER_BYTES   # past this: _spill
        self.state = PENDING
        self._job: _Job | None = None
        self.log = log if log is not None else get_logger()
        self.frames = 0                 # handed to the writer
        self.bytes = 0
        self.stop_reason = ""
        try:
            self._loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            self._loop = None
        self._timer: asyncio.TimerHandle | None = None
        self._arm()

    # -- hot path
    def vaic_in(self, frame: str | bytes, now_ns: int) -> None:
        self._frames.append(frame)
        self._meta.append((now_ns - self._t0) << 3)
        self._n += len(frame)
        if self._n > self._limit:
            self._spill()

    def openai_in(self, frame: str | bytes, now_ns: int) -> None:
        self._frames.append(frame)
        self._meta.append((now_ns - self._t0) << 3 | OPENAI_IN)
        self._n += len(frame)
        if self._n > self._limit:
            self._spill()

    def openai_out(self, frame: str, now_ns: int) -> None:
        self._frames.append(frame)
        self._meta.append((now_ns - self._t0) << 3 | OPENAI_OUT)
        self._n += len(frame)
        if self._n > self._limit:
            self._spill()

    def sent(self, frames: list[str], vaic: bool) -> None:
        """Frames handed to one socket's transport now (`vaic`: the VAIC socket)."""
        m = (monotonic_ns() - self._t0) << 3 | (VAIC_OUT if vaic else OPENAI_OUT)
        self._frames.extend(frames)
        for f in frames:
            self._meta.append(m)
            self._n += len(f)
        if self._n > self._limit:
            self._spill()

    def note(self, event: str, **fields: Any) -> None:
        """A shell event that is no frame (kept in order with the frames)."""
        if self.state == STOPPED:
            return
        self._frames.append(_json.encode({"event": event, **fields}))
        self._meta.append((monotonic_ns() - self._t0) << 3 | NOTE)

    # -- decisions and hand-over
    def _decide(self, closing: bool = False) -> bool:
        """PENDING -> RECORDING or STOPPED once the profile is final (or at the end); True
        when a decision was taken."""
        sess = self._session
        if not closing and not getattr(sess, "profile_final", True):
            return False
        profile = getattr(sess, "profile", None)
        record = self._rc.record_all or bool(getattr(profile, "record", False))
        if not record or (closing and getattr(sess, "end_reason", "") in ("validate", "handed_over")):
            self._stop("", log=False)      # not recorded: drop the pre-buffer
            return True
        call_id = clip(getattr(sess, "call_id", "") or "", ID_CHARS)
        header = {"format": FORMAT_VERSION, "call_id": call_id,
                  "started_at": datetime.fromtimestamp(self._wall_ns / 1e9, timezone.utc)
                  .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
                  "started_unix_ns": self._wall_ns, "bridge": __version__,
                  "profile": clip(getattr(profile, "name", None), ID_CHARS) or None,
                  "reason": "record_all" if self._rc.record_all else "profile"}
        self._job = _Job(self._rc.dir, file_name(call_id, self._wall_ns), header,
                         self._rc.max_bytes_per_call, self)
        self.state = RECORDING
        self._limit = FLUSH_BYTES
        return True

    def _spill(self) -> None:
        if self.state == PENDING and not self._decide():
            self._stop("prebuffer_full")
            return
        if self.state == RECORDING:
            self._flush()
        else:                                # STOPPED: a sent() batch after the stop
            self._frames.clear()
            del self._meta[:]
            self._n = 0

    def _flush(self) -> None:
        if not self._frames or self._job is None:
            return
        frames, meta, n = self._frames, self._meta, self._n
        self._frames, self._meta, self._n = [], array("q"), 0
        nbytes = n + 16 * len(meta)
        if not self._svc.submit(("data", self._job, frames, meta, nbytes), nbytes):
            self._stop("writer_behind")
            return
        self.frames += len(meta)
        self.bytes += nbytes

    def _arm(self) -> None:
        if self._loop is not None and self.state != STOPPED:
            self._timer = self._loop.call_later(FLUSH_INTERVAL_S, self._tick)

    def _tick(self) -> None:
        self._timer = None
        if self.state == PENDING:
            self._decide()
        if self.state == RECORDING:
            self._flush()
        self._arm()

    def _detach(self) -> None:
        owner = self._owner
        if owner is not None and getattr(owner, "rec", None) is self:
            owner.rec = None
        self._owner = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _stop(self, reason: str, log: bool = True) -> None:
        """Stop recording this call (reason "" = not recorded at all)."""
        if self.state == STOPPED:
            return
        was = self.state
        self.state = STOPPED
        self.stop_reason = reason
        self._frames, self._meta, self._n = [], array("q"), 0
        self._detach()
        if was == RECORDING and self._job is not None:
            note = Encoder().record(NOTE, monotonic_ns() - self._t0, _json.encode(
                {"event": "recording.stopped", "reason": reason}))
            self._svc.submit(("close", self._job, note))
        if log and reason:
            self.log.warning("recording.stopped", reason=reason, frames=self.frames, bytes=self.bytes,
                             path=clip(self._job.path) if self._job is not None else None)

    def _from_writer(self, reason: str, written: int, log: bool = True) -> None:
        """The writer closed this call's file (writer thread): stop on the loop."""
        def stop() -> None:
            if self.state != STOPPED:
                self.state = STOPPED
                self.stop_reason = reason
                self._frames, self._meta, self._n = [], array("q"), 0
                self._detach()
                if log:
                    self.log.warning("recording.stopped", reason=reason, bytes_written=written,
                                     max_bytes_per_call=self._rc.max_bytes_per_call,
                                     path=clip(self._job.path) if self._job is not None else None)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            try:
                loop.call_soon_threadsafe(stop)
                return
            except RuntimeError:
                pass
        stop()

    def close(self, end_reason: str = "") -> None:
        """The call is over: decide if still pending, write the rest and close the file."""
        if self.state == PENDING:
            self._decide(closing=True)
        if self.state != RECORDING or self._job is None:
            self._detach()
            return
        self.note("recording.end", reason=clip(end_reason, ID_CHARS))
        self._flush()
        if self.state == RECORDING:
            self._svc.submit(("close", self._job, None))
            self.state = STOPPED
            self.stop_reason = "closed"
        self._detach()

    @property
    def path(self) -> str | None:
        return self._job.path if self._job is not None else None


def for_call(owner: Any, cfg: Config, session: Any) -> CallRecorder | None:
    """The recorder of a new call, or None when `[recording]` is off or its directory unusable."""
    rc = getattr(cfg, "recording", None)
    if rc is None or not rc.dir:
        return None
    svc = service()
    if not svc.configure(rc):
        return None
    return CallRecorder(owner, rc, session, svc, getattr(session, "started_ns", monotonic_ns()),
                        getattr(owner, "log", None))
