"""Per-call transcript files: one JSONL file per call in `[transcripts] dir` (mode 0600).

Each line: `{"t_ms": <since the call began>, "role": "caller"|"agent", "text": ...}`; the first
line is a header (`conversation_id`, `profile`, `started` wall-clock ISO time). Lines are
small and few (one per turn), so they are appended with one `os.write` each on an
`O_APPEND` descriptor: no buffering to lose, no task. `sweep(dir, retention_days)` deletes files
older than the retention; it runs when a call opens its file, at most once an hour
(`SWEEP_INTERVAL_S`), so no timer is needed and an idle daemon writes nothing.
"""

from __future__ import annotations

import os
import re
import threading
import time
from datetime import datetime, timezone
from pathlib import Path

import msgspec

_SAFE = re.compile(r"[^A-Za-z0-9_-]")
_enc = msgspec.json.Encoder()
SUFFIX = ".transcript.jsonl"
MAX_FILE_BYTES = 4 * 1024 * 1024      # a runaway call cannot fill the disk
SWEEP_INTERVAL_S = 3600.0
_last_sweep: dict[str, float] = {}


class TranscriptFile:
    def __init__(self, directory: str, conversation_id: str, profile: str,
                 retention_days: float = 30.0) -> None:
        d = Path(directory)
        d.mkdir(mode=0o700, parents=True, exist_ok=True)
        if d.stat().st_uid == os.geteuid():
            os.chmod(d, 0o700)           # an existing directory is made private too
        now = time.monotonic()
        if now - _last_sweep.get(directory, -SWEEP_INTERVAL_S) >= SWEEP_INTERVAL_S:
            _last_sweep[directory] = now  # in a thread: a large directory must not stall calls
            threading.Thread(target=sweep, args=(directory, retention_days), daemon=True,
                             name="transcripts-sweep").start()
        stamp = datetime.now(timezone.utc)
        base = f"{stamp:%Y%m%dT%H%M%SZ}-{_SAFE.sub('_', conversation_id)[:80] or 'call'}"
        for n in range(100):             # the same call id in the same second: a new file
            self.path = d / (base + (f"-{n}" if n else "") + SUFFIX)
            try:
                self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
                                   | os.O_CLOEXEC, 0o600)
                break
            except FileExistsError:
                continue
        else:
            raise FileExistsError(f"{base}: too many transcripts with this name")
        self._bytes = 0
        self._write({"conversation_id": conversation_id, "profile": profile,
                     "started": stamp.isoformat(timespec="milliseconds")})

    def _write(self, obj: object) -> None:
        if self._fd < 0:
            return
        line = _enc.encode(obj) + b"\n"
        if self._bytes + len(line) > MAX_FILE_BYTES:
            return
        os.write(self._fd, line)
        self._bytes += len(line)

    def add(self, t_ms: int, role: str, text: str) -> None:
        self._write({"t_ms": t_ms, "role": role, "text": text})

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def sweep(directory: str, retention_days: float, now: float | None = None) -> int:
    """Delete transcript files older than `retention_days`; returns how many."""
    if not directory or not os.path.isdir(directory):
        return 0
    cutoff = (time.time() if now is None else now) - retention_days * 86400
    n = 0
    for p in Path(directory).glob("*" + SUFFIX):
        try:
            if p.stat().st_mtime < cutoff:
                p.unlink()
                n += 1
        except OSError:
            continue
    return n
