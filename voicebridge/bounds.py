"""Bounds on what peers can make the bridge hold or write: clipped strings, capped key sets,
rate-limited log lines, and the base64 check that guards both JSON templates.

Sans-I/O: no sockets, no clock of its own (`RateLimiter` takes `now`), no logging.

Contracts:
- `clip(value, n)`: any peer value -> a `str` of at most `n` characters (`…` marks a cut), safe to
  log or to use as a dict key. Never raises (a value whose `repr` fails, or that nests deeper than
  Python can print, becomes a placeholder).
- `clip_list(values)`: at most `MAX_LIST_ITEMS` clipped entries.
- `OnceKeys`: "log this once / the first N times per key", holding at most `max_keys` keys; past
  that every new key is counted in `overflow` and reported as not-first (so nothing is logged).
- `RateLimiter`: at most `per_s` passes per second per name (token bucket, burst `per_s`); a
  refused call is counted and the count is handed to the next pass as `suppressed`.
- `is_b64(s)`: True iff `s` is syntactically strict base64 (alphabet, length a multiple of 4,
  `=` only as the last one or two characters). It is what keeps a peer's audio from carrying
  JSON into the other peer's frame template. Cost measured on the dev VM: 0.8 µs for a 20 ms
  24 kHz frame (1280 chars), 2.9 µs for a 100 ms delta (6400 chars); strict `a2b_base64` costs
  2.8 / 14 µs, a regex 2.2 / 10.5 µs.
"""

from __future__ import annotations

import string
from typing import Any, Iterable

ID_CHARS = 64          # conversation ids, event types, names
TEXT_CHARS = 200       # reasons, messages, free text
MAX_LIST_ITEMS = 16
MAX_ONCE_KEYS = 64     # distinct "log once" keys per call

_B64_ALPHABET = (string.ascii_letters + string.digits + "+/=").encode()


def clip(value: Any, n: int = TEXT_CHARS) -> str:
    """`value` as a string of at most `n` characters."""
    if isinstance(value, str):
        s = value
    elif value is None:
        return ""
    else:
        try:
            s = repr(value)
        except (RecursionError, ValueError, TypeError, MemoryError):
            s = f"<unprintable {type(value).__name__}>"
    return s if len(s) <= n else s[: max(0, n - 1)] + "…"


def clip_list(values: Iterable[Any], n: int = ID_CHARS, max_items: int = MAX_LIST_ITEMS) -> list[str]:
    out: list[str] = []
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        return [clip(values, n)]
    for i, v in enumerate(values):
        if i >= max_items:
            out.append("…")
            break
        out.append(clip(v, n))
    return out


def is_b64(s: str) -> bool:
    """Strict base64 syntax check (see the module docstring); empty is valid."""
    n = len(s)
    if n & 3 or not s.isascii():   # isascii() is O(1) on a str: non-ASCII is out at once
        return False
    if s.encode("ascii").translate(None, _B64_ALPHABET):
        return False  # a character outside the alphabet (", \, space, control, ...)
    i = s.find("=")
    return i < 0 or i >= n - 2 and (i == n - 1 or s[n - 1] == "=")


class OnceKeys:
    """Per-key occurrence counts for "log the first N" decisions, with a bounded key set."""

    __slots__ = ("max_keys", "_seen", "overflow")

    def __init__(self, max_keys: int = MAX_ONCE_KEYS) -> None:
        self.max_keys = max_keys
        self._seen: dict[str, int] = {}
        self.overflow = 0  # occurrences of keys that did not fit

    def hit(self, key: str) -> int:
        """Count one occurrence of `key`; returns its count (1 the first time), or 0 when the
        key set is full and `key` is new (the caller should then not log)."""
        key = clip(key, ID_CHARS * 2)
        n = self._seen.get(key)
        if n is None:
            if len(self._seen) >= self.max_keys:
                self.overflow += 1
                return 0
            n = 0
        self._seen[key] = n + 1
        return n + 1


class RateLimiter:
    """Token bucket per name: at most `per_s` passes per second (burst `per_s`)."""

    __slots__ = ("per_s", "_state")

    def __init__(self, per_s: float) -> None:
        self.per_s = float(per_s)
        self._state: dict[str, list[float]] = {}  # name -> [tokens, last_t, suppressed]

    def allow(self, name: str, now: float) -> int | None:
        """None: refused (counted). Otherwise the number refused since the last pass (>= 0)."""
        st = self._state.get(name)
        if st is None:
            if len(self._state) >= 256:  # names are ours, not a peer's; bound it anyway
                self._state.clear()
            st = self._state[name] = [self.per_s, now, 0.0]
        tokens = min(self.per_s, st[0] + (now - st[1]) * self.per_s)
        st[1] = now
        if tokens < 1.0:
            st[0] = tokens
            st[2] += 1
            return None
        st[0] = tokens - 1.0
        suppressed = int(st[2])
        st[2] = 0.0
        return suppressed
