"""State shared by the two halves of the generator (simulated callers and fake upstream).

Both halves run in one process and one event loop, so a frame's stamp (perf_counter_ns) is
read on the same clock that stamped it, and the sender's bookkeeping (what must arrive, what
must not, when a barge-in was sent) is visible to the receiver without any message.
"""

from __future__ import annotations

import time
from array import array
from dataclasses import dataclass, field
from typing import Any

from .stream_check import StreamCheck

FRAME_MS = 20
FRAME_NS = FRAME_MS * 1_000_000
NEVER = 1 << 62
_MAX_ERROR_LINES = 40


@dataclass
class Params:
    mode: str = "bridge"            # "bridge": callers -> voicebridge -> fake; "direct": callers -> fake
    calls: int = 10
    target_port: int = 0            # where callers connect (the bridge, or the fake in direct mode)
    upstream_port: int = 0          # where the fake upstream listens
    path: str = "/voicebridge"
    token: str = "bench-token"
    bridge_pid: int = 0
    warmup_s: float = 1.0
    window_s: float = 8.0
    drain_max_s: float = 20.0
    turn_s: float = 4.0             # one model turn per call every turn_s
    think_ms: int = 100             # speech_stopped/committed -> response.created
    response_ms: int = 2000         # audio per response
    lead_ms: int = 200              # the bridge's audio.playout_lead_ms
    burst_ms: int = 100             # after the first burst: burst_ms of audio every burst_ms
    barge_every: int = 4            # every Kth turn is interrupted halfway (0: never)
    late_deltas: int = 1            # deltas sent after speech_started (must be dropped)
    connect_concurrency: int = 50


class Run:
    """Run-wide clock window, latency samples (ns) and violation counters."""

    def __init__(self, p: Params) -> None:
        self.p = p
        self.w0 = NEVER            # samples count when w0 <= send stamp < w1
        self.w1 = NEVER
        self.up_lat = array("q")
        self.down_lat = array("q")
        self.turn_lat = array("q")
        self.barge_lat = array("q")        # speech_started sent -> playStream.stop received
        self.barge_speech_lat = array("q")  # speech_started sent -> userStream.speech.started
        self.tick_late = array("q")        # generator: actual send - deadline, per 1 ms step
        self.window_up_frames = 0
        self.window_down_frames = 0
        self.late_up_frames = 0            # received by the fake > 1 frame period after deadline
        self.callers_stop = False
        self.turns_stop = False
        self.errors: dict[str, int] = {}
        self.error_lines: list[str] = []
        self.counters: dict[str, int] = {}
        self.barges_sent = 0
        self.barge_dropped = 0             # deltas the bridge still held when the barge-in came
        self.down_max_ns = 0               # over the whole run, not only the window
        self.barges_stopped = 0
        self.turns_started = 0
        self.responses_done = 0

    def in_window(self, t_ns: int) -> bool:
        return self.w0 <= t_ns < self.w1

    def error(self, kind: str, detail: str = "") -> None:
        self.errors[kind] = self.errors.get(kind, 0) + 1
        if len(self.error_lines) < _MAX_ERROR_LINES:
            self.error_lines.append(f"{kind}: {detail}"[:300])

    def count(self, key: str, n: int = 1) -> None:
        self.counters[key] = self.counters.get(key, 0) + n


@dataclass
class CallState:
    idx: int
    conv_id: str
    up: StreamCheck = field(default_factory=StreamCheck)      # caller -> fake
    down: StreamCheck = field(default_factory=StreamCheck)    # fake -> caller
    # caller side
    caller_tr: Any = None
    caller: Any = None
    up_seq: int = 0
    sched0_ns: int = 0             # deadline of up seq 0; deadline(seq) = sched0 + seq * 20 ms
    stream_open: bool = False      # bridge mode: a playStream is open towards the caller
    streams: int = 0
    caller_closed: bool = False
    ending: bool = False           # we sent session.end: a close is expected now
    # fake upstream side
    upstream_tr: Any = None
    upstream_closed: bool = False
    down_seq: int = 0
    first_seq: int = -1            # seq of the first delta of the current response
    turn_no: int = 0
    resp_active: bool = False
    item_ms: dict[str, int] = field(default_factory=dict)
    barge_ns: int = 0              # speech_started sent, stop not yet seen (0: none pending)
    barge_speech_seen: bool = True
    barge_item: str = ""
    barge_lo: int = 0              # deliverable delta seqs of the interrupted response
    barge_hi: int = -1
    barges: int = 0
    truncates_ok: int = 0
    turn_driver: Any = None
    waiters: dict[str, Any] = field(default_factory=dict)    # handshake futures by message type


def now_ns() -> int:
    return time.perf_counter_ns()
