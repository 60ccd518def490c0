"""py-spy raw (collapsed) stacks -> top functions by self time and by total time."""

from __future__ import annotations

import re
from collections import Counter
from pathlib import Path

_LINE = re.compile(r":\d+\)$")
_SITE = re.compile(r"\(.*?(site-packages|lib/python3\.\d+)/")


def _func(frame: str) -> str:
    """'send (…/site-packages/websockets/asyncio/connection.py:123)' -> 'send (websockets/asyncio/connection.py)'."""
    frame = _LINE.sub(")", frame.strip())
    frame = _SITE.sub("(", frame)
    return frame.replace(str(Path(__file__).resolve().parent.parent) + "/", "")


def aggregate(text: str) -> tuple[int, Counter, Counter]:
    """(samples, self counts, total counts) by function, from py-spy's raw output."""
    self_c: Counter = Counter()
    total_c: Counter = Counter()
    samples = 0
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if not n.isdigit():
            continue
        count = int(n)
        frames = [_func(f) for f in stack.split(";")
                  if f and not f.startswith(("process ", "thread ", '"'))]
        if not frames:   # on CPU with no Python frame: the event loop's own C code (uvloop)
            frames = ["(native: uvloop / C extensions, no Python frame)"]
        samples += count
        self_c[frames[-1]] += count
        for f in set(frames):
            total_c[f] += count
    return samples, self_c, total_c


def top(path: Path, n: int = 15) -> dict:
    samples, self_c, total_c = aggregate(path.read_text(errors="replace"))
    pct = lambda c: round(100.0 * c / samples, 1) if samples else 0.0
    return {"samples": samples, "file": str(path),
            "self": [(f, pct(c)) for f, c in self_c.most_common(n)],
            "total": [(f, pct(c)) for f, c in total_c.most_common(n)]}
