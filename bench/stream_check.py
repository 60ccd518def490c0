"""Exactly-once, in-order, byte-exact accounting of one stamped stream (one call, one direction).

The sender numbers frames 0, 1, 2, ... and calls `sent(seq)` for each frame that must arrive,
or `forbid(seq)` for a frame that must NOT arrive (a delta sent after a barge-in). The receiver
calls `received(seq)` for each frame whose payload checked byte-exact, or `corrupt()`.
`finish()` turns whatever never arrived into `lost`. Counters, all 0 on a clean run:
    lost       sent, never received
    dup        received more than once
    reordered  received after a later frame
    corrupt    payload not byte-exact (or stamp unreadable / of another call)
    leaked     a forbidden frame arrived, or a settled-as-dropped one arrived after all
    unexpected a frame that was never sent arrived (seq beyond the sender's)
and, not a violation by itself:
    dropped    declared by `settle(lo, hi)`: frames of [lo, hi] that had not arrived when the
               receiver learnt they never will (a barge-in: the bridge drops audio it still
               holds for pacing, and its playStream.stop follows every chunk it did forward)
"""

from __future__ import annotations

_MAX_MISSING = 100_000   # bound on the gap set (a broken run must not eat the memory)


class StreamCheck:
    __slots__ = ("n_sent", "last_sent", "next", "ok", "dup", "reordered", "corrupt", "leaked",
                 "unexpected", "lost", "dropped", "missing", "forbidden", "settled", "finished")

    def __init__(self) -> None:
        self.n_sent = 0          # frames that must arrive
        self.last_sent = -1      # highest seq handed to the network (sent or forbidden)
        self.next = 0            # lowest seq not yet accounted for in order
        self.ok = 0              # unique, byte-exact arrivals of frames that must arrive
        self.dup = self.reordered = self.corrupt = self.leaked = self.unexpected = 0
        self.lost = 0
        self.dropped = 0
        self.missing: set[int] = set()     # seqs skipped over by a later arrival
        self.forbidden: set[int] = set()
        self.settled: set[int] = set()     # declared dropped by settle()
        self.finished = False

    # -- sender side
    def sent(self, seq: int) -> None:
        self.n_sent += 1
        if seq > self.last_sent:
            self.last_sent = seq

    def forbid(self, seq: int) -> None:
        self.forbidden.add(seq)
        if seq > self.last_sent:
            self.last_sent = seq

    # -- receiver side
    def received(self, seq: int) -> None:
        if seq in self.forbidden or seq in self.settled:
            self.leaked += 1
            return
        if seq > self.last_sent:
            self.unexpected += 1
            return
        nxt = self.next
        if seq == nxt:
            self.ok += 1
            self.next = nxt + 1
            return
        if seq > nxt:      # a gap: everything in [next, seq) not forbidden is missing for now
            self.ok += 1
            if len(self.missing) < _MAX_MISSING:
                fb = self.forbidden
                self.missing.update(s for s in range(nxt, seq) if s not in fb)
            self.next = seq + 1
            return
        if seq in self.missing:  # arrived late, after a later frame
            self.missing.discard(seq)
            self.reordered += 1
            self.ok += 1
        else:
            self.dup += 1

    def settle(self, lo: int, hi: int) -> int:
        """Frames lo..hi that have not arrived never will: count them as dropped; returns how many."""
        n = 0
        fb = self.forbidden
        for s in range(max(lo, 0), hi + 1):
            if s in fb:
                continue
            if s >= self.next or s in self.missing:
                self.missing.discard(s)
                self.settled.add(s)
                n += 1
        if hi >= self.next:
            self.next = hi + 1
        self.dropped += n
        return n

    def corrupted(self) -> None:
        self.corrupt += 1

    def outstanding(self) -> int:
        """Frames that must still arrive (for the drain)."""
        return self.n_sent - self.ok - self.dropped

    def finish(self) -> "StreamCheck":
        """Whatever must have arrived and did not is lost (call once, after the drain)."""
        if not self.finished:
            self.finished = True
            self.lost = max(0, self.n_sent - self.ok - self.dropped)
        return self

    def counts(self) -> dict[str, int]:
        return {"sent": self.n_sent, "received": self.ok, "dropped": self.dropped,
                "lost": self.lost, "dup": self.dup,
                "reordered": self.reordered, "corrupt": self.corrupt, "leaked": self.leaked,
                "unexpected": self.unexpected}


VIOLATION_KEYS = ("lost", "dup", "reordered", "corrupt", "leaked", "unexpected")


def merge(checks: list[StreamCheck]) -> dict[str, int]:
    total = {k: 0 for k in ("sent", "received", "dropped", *VIOLATION_KEYS)}
    for c in checks:
        for k, v in c.finish().counts().items():
            total[k] += v
    return total
