"""The playout clock: pacing of assistant audio towards VAIC, and what the caller has heard.

Sans-I/O: every method takes `now` (monotonic seconds) from the caller; nothing here sleeps.

Model (the contract with VAIC, see ../shared/protocols/audiocodes-bot-api.md §3-4): VAIC plays a
play stream in real time from the first chunk it receives, without gaps while it has audio.
So after sending chunks we know `play_end_t`, the instant VAIC will have played everything we
sent; `heard_ms(now) = sent_ms - max(0, play_end_t - now)`.

Pacing: a chunk of the open stream may go out when VAIC holds less than `lead_ms` of unplayed
audio (`play_end_t - now < lead_ms`), so after a barge-in VAIC never has more than the lead (plus
one chunk) buffered, whatever `playStream.stop` does to buffered audio (undocumented). A stream
is stopped only once its audio has been played out (`play_end_t` plus `stop_margin_ms` for the
network delay by which VAIC runs behind our clock), so a stop never cuts a tail even if VAIC
flushes on stop; the next item's stream starts after that.

Memory: pending audio is bounded by `max_pending_ms`; beyond it chunks are refused (counted).
"""

from __future__ import annotations

from collections import deque
from typing import NamedTuple

CHUNK = 0
END = 1


class Entry(NamedTuple):
    kind: int          # CHUNK or END
    item_id: str
    payload: str       # base64 audio in the AudioCodes format ("" for END)
    ms: float          # audio duration of payload


class Taken(NamedTuple):
    """What the call must send for one step, in this order."""
    stop_first: bool   # playStream.stop for the stream that is open
    start: bool        # playStream.start for entry.item_id
    entry: Entry       # CHUNK: send it; END: stop_first already covers the stop


class Interruption(NamedTuple):
    stream_open: bool       # a play stream is open at VAIC: send playStream.stop now
    item_id: str | None     # assistant item that was being played
    heard_ms: float         # what the caller has heard (per stop policy), clamped to sent_ms
    sent_ms: float          # what VAIC received of the item
    still_playing: bool     # False: playout had finished, no truncate is due


class Playout:
    __slots__ = ("lead_s", "stop_margin_s", "max_pending_ms", "drain_on_stop", "pending", "pending_ms",
                 "open_item", "play_end_t", "sent_ms", "refused_chunks", "dropped_ms")

    def __init__(self, lead_ms: float, max_pending_ms: float, stop_policy: str = "flush",
                 stop_margin_ms: float = 0.0) -> None:
        self.lead_s = lead_ms / 1000.0
        self.stop_margin_s = stop_margin_ms / 1000.0
        self.max_pending_ms = max_pending_ms
        self.drain_on_stop = stop_policy == "drain"
        self.pending: deque[Entry] = deque()
        self.pending_ms = 0.0
        self.open_item: str | None = None   # item whose play stream is open at VAIC
        self.play_end_t = 0.0               # when VAIC will have played all we sent
        self.sent_ms = 0.0                  # ms of the open item sent to VAIC
        self.refused_chunks = 0
        self.dropped_ms = 0.0               # ms discarded by barge-ins (never sent)

    # -- queueing
    def push_chunk(self, item_id: str, payload: str, ms: float) -> bool:
        if self.pending_ms + ms > self.max_pending_ms:
            self.refused_chunks += 1
            return False
        self.pending.append(Entry(CHUNK, item_id, payload, ms))
        self.pending_ms += ms
        return True

    def push_end(self, item_id: str) -> None:
        self.pending.append(Entry(END, item_id, "", 0.0))

    # -- pacing
    def due(self, now: float) -> float | None:
        """When the head entry may be taken (<= now: at once); None when nothing is pending."""
        if not self.pending:
            return None
        head = self.pending[0]
        if self.open_item is None:
            # a new stream; after a barge-in under the 'drain' policy VAIC may still be playing
            # out the old one: the lead bounds what it holds in all (flush: play_end_t <= now)
            return max(now, self.play_end_t - self.lead_s)
        if head.kind == END or head.item_id != self.open_item:
            # let the open stream finish playing first; the margin covers the network delay
            # by which VAIC's playout runs behind our clock
            return self.play_end_t + self.stop_margin_s
        return self.play_end_t - self.lead_s

    def take(self, now: float) -> Taken:
        """Remove the head entry and account for it as sent at `now`."""
        e = self.pending.popleft()
        if e.kind == END:
            stop = self.open_item is not None and self.open_item == e.item_id
            if stop:
                self.open_item = None
            return Taken(stop, False, e)
        self.pending_ms -= e.ms
        stop_first = start = False
        if self.open_item != e.item_id:
            stop_first = self.open_item is not None
            self.open_item = e.item_id
            self.sent_ms = 0.0
            start = True
        if self.play_end_t < now:
            self.play_end_t = now
        self.play_end_t += e.ms / 1000.0
        self.sent_ms += e.ms
        return Taken(stop_first, start, e)

    # -- what the caller heard
    def heard_ms(self, now: float) -> float:
        if self.open_item is None:
            return 0.0
        left = self.play_end_t - now
        return self.sent_ms - left * 1000.0 if left > 0 else self.sent_ms

    def interrupt(self, now: float) -> Interruption:
        """Barge-in: drop everything pending and close the open stream.

        heard_ms follows the assumed VAIC stop policy: with 'flush' VAIC discards what it holds
        at playStream.stop, so the caller heard `heard_ms(now)`; with 'drain' it plays out what
        it holds, so the caller hears everything sent."""
        queued_for_open = any(e.kind == CHUNK and e.item_id == self.open_item for e in self.pending)
        for e in self.pending:
            self.dropped_ms += e.ms
        first_pending_item = next((e.item_id for e in self.pending if e.kind == CHUNK), None)
        self.pending.clear()
        self.pending_ms = 0.0
        item = self.open_item
        if item is None:
            # nothing reached VAIC yet; audio of `first_pending_item` was never heard
            return Interruption(False, first_pending_item, 0.0, 0.0, first_pending_item is not None)
        still = self.play_end_t > now or queued_for_open
        heard = self.sent_ms if self.drain_on_stop else min(self.heard_ms(now), self.sent_ms)
        sent = self.sent_ms
        self.open_item = None
        if self.play_end_t > now and not self.drain_on_stop:
            self.play_end_t = now
        return Interruption(True, item, max(0.0, heard), sent, still)


def split_b64(payload: str, max_chars: int) -> list[str]:
    """Split base64 text into pieces of at most `max_chars` characters without decoding.

    `max_chars` must be a multiple of 8: 8 base64 characters are 6 bytes, a whole number of
    8-bit and of 16-bit samples, so every piece but the last decodes to whole samples."""
    if len(payload) <= max_chars:
        return [payload]
    return [payload[i:i + max_chars] for i in range(0, len(payload), max_chars)]


def piece_chars(max_chunk_ms: float, bytes_per_ms: int) -> int:
    """Largest multiple of 8 base64 characters carrying at most `max_chunk_ms` of audio."""
    return max(8, int(max_chunk_ms * bytes_per_ms // 6) * 8)
