"""A virtual-time driver for whole calls against `voicebridge.session.CallSession` (issue 8, item 7).

No sockets, no sleeping, no asyncio: one integer clock (ns) that jumps from one scripted event or
core deadline to the next, so a call of minutes runs in about a millisecond.

What it plays
-------------
- **VAIC** (`Vaic` script): the first frame (`session.initiate` with one offered format, or a
  validate-only / garbage / `session.resume` / declined opening, or nothing), then after
  `session.accepted`: the `start` activity, `userStream.start`, a caller chunk every `chunk_ms`
  (carrying its sequence number) while the user stream is on, `userStream.stop/start` toggles, odd
  frames (DTMF, unknown, malformed, bad audio, a second initiate), a socket swap
  (`vaic_detached` .. `vaic_attached`, with a gap), and the end: `session.end`, a socket drop (one
  without a cause may be kept for `session.resume`; VAIC then resumes after `resume_ms`, or
  never), or falling quiet (the bot's idle timeout then hangs up). VAIC answers the bot's hangup
  (and `session.error`) with `session.end`, a drop, or nothing. What the bot sends is checked
  against the protocol and played on `sim.playout_model.PlayoutModel` in real time: what the
  caller holds and has heard at every instant.
- **The model** (`Model` script): answers each `Dial` with `openai_connected` after a delay, or
  `openai_connect_failed` (401, network error, 503, two failures then success, or the connect
  timeout); sends `session.created` / `session.updated` (or not: a silent session, or one with
  another output format); then plays turns, across socket replacements: caller speech
  (`speech_started` .. `speech_stopped`, `committed`, a transcript; it cancels a running response,
  which sends a few late deltas first), responses (`response.created`, items of deltas of
  scripted sizes in bursts or slower than real time, `output_audio.done`, transcripts,
  `response.done` completed or failed with a transient or fatal code), error events (benign,
  unknown, fatal), a lost socket, garbage. It answers `response.create` (a response, or
  `conversation_already_has_active_response`), `response.cancel`, `conversation.item.truncate`
  and `session.update` as the Realtime API does.
- **The shell** (`voicebridge.call.Call`): feeds frames with `now`, sends `to_vaic` / `to_openai`,
  records `marks`, carries out effects (`Dial`, `CloseOpenAI`, `CloseVaic`, `Log`, `Finished`,
  `Resume`), swaps the OpenAI socket (`openai_swap` + `openai_connected`), hands a resuming
  socket to the waiting call (`vaic_attached`), calls `timer(now)` when the clock reaches
  `next_deadline_ns()` (late by scripted jitter if asked), and after `CloseOpenAI` still delivers
  the model frames already in flight (`close_window_ms`), as its receive pump does while the close
  handshake runs. A timer that leaves the deadline in the past is re-run as the shell would
  (`timer_spin` when time passing does not clear it: a busy loop).

What it checks (violation codes)
--------------------------------
- truncates: `truncate_beyond_produced`, `truncate_beyond_sent` (to VAIC, of that item),
  `truncate_beyond_heard`, `truncate_after_playout`, `truncate_unknown_item` (not in that session);
- VAIC: `vaic_holds_too_much` (> playout lead + one chunk unplayed), `chunk_outside_stream`,
  `start_in_stream`, `stop_without_start`, `stream_id_reused`, `start_stop_count` /
  `stream_never_stopped` (one stop per start unless VAIC ended the call), `stop_cuts_tail`,
  `played_after_barge_in` (an item with audio before a barge-in / detach, or of a response running
  then), `played_after_truncate`, `chunk_of_other_item`, `hangup_with_open_stream`,
  `to_vaic_after_hangup`, `to_vaic_after_end`, `to_vaic_while_detached`, `resume_not_accepted`;
- OpenAI: `response_create_while_active` (a response.created delivered, its response.done not),
  `to_openai_without_socket`, `append_before_session_update`, `reseed_order`, `second_dial`,
  caller audio `caller_audio_order` / `_invented` / `_gap` (pass-through formats);
- the end: `finished_count` (exactly one Finished), `phase_not_ended`, `openai_left_open` /
  `upstream_not_closed`, `finished_without_close_vaic`, `effect_after_finished`;
- always: `core_raised`, `internal_error` (a Log), `vaic_frame_not_json` / `openai_frame_not_json`
  / `*_unknown`, `stream_id_vs_open_item` (`AcProtocol.stream_id` set iff the playout clock has an
  open item), `upstream_vs_socket`, `mark_from_future`, `timer_spin`, `hang`, `bound_events`,
  `bound_time`.
and, with the 'flush' stop policy, `model_item_longer_than_heard` (after a barge-in the model's
item keeps audio the caller never heard: every item of a cancelled response must be truncated
to what was heard, 0 for one never heard). Findings (not failures): `timer_noop_at_deadline`
(`timer(next_deadline_ns())` found nothing due), `truncate_twice`. Each is a `Violation(code, t_ms, detail)` in `sim.violations` /
`sim.findings`. Every run is bounded (`max_events`, `max_ms` of virtual time).
"""

from __future__ import annotations

import base64
import heapq
import inspect
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, NamedTuple

import msgspec

from voicebridge import session as S
from voicebridge.audio import FORMATS, b64_decoded_len
from voicebridge.config import CallConfig, Config, OpenAIConfig, Secrets, load_config
from voicebridge.sim.playout_model import PlayedStream, PlayoutModel
from voicebridge.stats import Stats

NS = 1_000_000_000
MS = 1_000_000
T0 = 1_000 * NS                    # the virtual monotonic clock starts here (ns)
SECRETS = Secrets(token="t", openai_api_key="sk-sim")
PASSTHROUGH = ("raw/lpcm16_24", "raw/mulaw")
EPS_MS = 1e-6

BENIGN_CODES = ("conversation_already_has_active_response", "response_cancel_not_active",
                "input_audio_buffer_commit_empty")
FATAL_CODES = ("session_expired", "invalid_api_key", "insufficient_quota", "session_not_found")
OTHER_CODES = ("invalid_value", "rate_limit_exceeded", "server_error")

# --------------------------------------------------------------------------------- the scripts


@dataclass(frozen=True)
class Knobs:
    """Configuration varied per timeline (the rest is `config.toml`'s defaults)."""
    fmt: str = "raw/lpcm16_24"
    greeting: bool = False
    lead_ms: int = 200
    max_chunk_ms: int = 100
    stop_margin_ms: int = 60
    stop_policy: str = "flush"
    interrupt_response: bool = True
    early_audio_max_ms: int = 10_000
    personalised: bool = False        # instructions with {caller}/{callee}: an update after `start`
    # newer core features, applied when the configuration has them (off: the call ends instead)
    reconnect: bool = False           # openai.reconnect: a lost OpenAI socket is replaced
    resume_grace_s: float = 0.0       # call.resume_grace_s: a dropped VAIC may session.resume
    rotate_after_s: float = 0.0       # openai.rotate_after_s (0: the default)


@dataclass(frozen=True)
class Reply:
    """One response: items, each a tuple of deltas (size in 1/8 ms units, gap in ms before it)."""
    items: tuple[tuple[tuple[int, int], ...], ...] = (((8 * 400, 0),),)
    think_ms: int = 60
    status: str = "completed"         # completed | failed (server_error) | failed_fatal (quota)


@dataclass(frozen=True)
class Turn:
    """One step of the model's script, `after_ms` after the previous step began (the first:
    after session.updated was sent)."""
    after_ms: int
    kind: str = "speech"              # speech | reply | error | lost | garbage
    speech_ms: int = 400              # speech: speech_started .. speech_stopped
    reply: Reply | None = None        # speech / reply: the response that follows
    code: str = ""                    # error: its code


@dataclass(frozen=True)
class Model:
    connect: str = "ok"               # ok | fail (401) | refused (network) | http_503 | flaky | timeout
    connect_ms: int = 30
    session: str = "ok"               # ok | silent | no_created | no_updated | wrong_format
    created_ms: int = 3
    updated_ms: int = 15
    late_deltas: int = 0              # deltas still sent after a response is cancelled
    late_ms: int = 2                  # ... within this long
    cancel_audio_done: bool = False   # output_audio.done for the item a cancel cut
    close_window_ms: int = 0          # frames in flight still delivered after CloseOpenAI
    greeting: Reply = Reply()         # the answer to response.create
    turns: tuple[Turn, ...] = ()


@dataclass(frozen=True)
class Vaic:
    first: str = "initiate"           # initiate|validate|garbage|resume|no_audio|bad_format|none
    initiate_ms: int = 5
    start_ms: int | None = 10         # `start` activity, after session.accepted
    stream_ms: int | None = 20        # userStream.start, after session.accepted
    chunk_ms: int = 20
    toggles_ms: tuple[int, ...] = ()  # userStream.stop, .start, .stop, ... (after accepted)
    end: str = "session_end"          # session_end | drop | quiet
    end_ms: int = 3000                # after session.accepted
    drop_cause: str | None = None     # EndpointClosed.cause of a drop
    hangup_reply: str = "session_end"  # our hangup / session.error -> session_end | drop | never
    reply_ms: int = 40
    resume_ms: int | None = None      # after a drop the bot keeps for a resume: VAIC resumes then
    swaps: tuple[tuple[int, int], ...] = ()   # (at_ms after accepted, gap_ms): detach .. attach
    extras: tuple[tuple[int, str], ...] = ()  # (at_ms, kind): dtmf|unknown|malformed|bad_audio|start


@dataclass(frozen=True)
class Timeline:
    knobs: Knobs = Knobs()
    vaic: Vaic = Vaic()
    model: Model = Model()
    timer_late_us: tuple[int, ...] = (0,)     # cycled: how late each timer fires
    openai_swaps: tuple[tuple[int, int], ...] = ()  # (ms after accepted, reconnect gap ms): the
    #                                                   shell swaps the OpenAI socket


@lru_cache(maxsize=256)
def config_for(k: Knobs) -> Config:
    instructions = ("You help {caller}, calling {callee}." if k.personalised
                    else "You are a helpful phone assistant.")
    over: dict[str, dict[str, Any]] = {
        "openai": {"greeting": "Greet the caller." if k.greeting else "",
                   "instructions": instructions,
                   "vad": {"interrupt_response": k.interrupt_response}},
        "audio": {"format_preference": [k.fmt], "playout_lead_ms": k.lead_ms,
                  "max_chunk_ms": k.max_chunk_ms, "stop_margin_ms": k.stop_margin_ms,
                  "vaic_stop_policy": k.stop_policy, "early_audio_max_ms": k.early_audio_max_ms},
    }
    have = {f.name for sec in (OpenAIConfig, CallConfig) for f in msgspec.structs.fields(sec)}
    if "reconnect" in have:
        over["openai"]["reconnect"] = k.reconnect
    if "resume_grace_s" in have:
        over["call"] = {"resume_grace_s": k.resume_grace_s}
    if "rotate_after_s" in have and k.rotate_after_s:
        over["openai"]["rotate_after_s"] = k.rotate_after_s
    return load_config(None, env={"VOICEBRIDGE_TOKEN": "t"}, overrides=over)[0]


# does this core's openai_connect_failed take the HTTP status (retries)?
_FAILED_TAKES_STATUS = "status" in inspect.signature(S.CallSession.openai_connect_failed).parameters


# --------------------------------------------------------------------------------- bookkeeping


class Violation(NamedTuple):
    code: str
    t_ms: float
    detail: str


@dataclass(eq=False)
class Item:
    iid: str
    resp: "Resp"
    tag: int
    sock: "Sock"
    delivered_ms: float = 0.0         # model audio of this item delivered to the core
    delivered_bytes: int = 0
    audio_done: bool = False          # output_audio.done delivered
    truncate_ms: int | None = None


@dataclass(eq=False)
class Resp:
    rid: str
    sock: "Sock"
    items: list[Item] = field(default_factory=list)
    plan: list[tuple[int, Item, int]] = field(default_factory=list)  # (t, item, units) deltas
    start_t: int = 0                  # response.created (model side)
    end_t: int = 0                    # response.done (model side)
    cancel_t: int | None = None
    created_delivered: bool = False
    done_delivered: bool = False


@dataclass(eq=False)
class Sock:
    n: int
    connected_t: int
    open: bool = True                 # False once closed by us or lost
    closed_t: int | None = None       # CloseOpenAI
    lost: bool = False                # dropped by the model side
    fmt_type: str = ""
    items: dict[str, Item] = field(default_factory=dict)
    resps: list[Resp] = field(default_factory=list)
    appended: list[int] = field(default_factory=list)   # caller chunk seqs (pass-through)
    appended_ms: float = 0.0
    updates: int = 0
    seeded: int = 0
    notes: int = 0                 # call-control items (keypad digits, system notes)
    audio_seen: bool = False
    events: list[str] = field(default_factory=list)      # client event types but appends, in order
    truncates: list[tuple[str, int]] = field(default_factory=list)


@dataclass(eq=False)
class Stream:
    sid: str
    played: PlayedStream
    item: str | None = None
    sent_ms: float = 0.0
    sent_bytes: int = 0
    stopped_normally: bool = False


_FILL: dict[tuple[int, int], str] = {}


def _b64_fill(tag: int, n: int) -> str:
    """base64 of `n` bytes of value `tag` (cached: the same sizes recur)."""
    key = (tag, n)
    s = _FILL.get(key)
    if s is None:
        if len(_FILL) > 4096:
            _FILL.clear()
        s = _FILL[key] = base64.b64encode(bytes([tag]) * n).decode()
    return s


_APPEND_PREFIX = '{"type":"input_audio_buffer.append","audio":"'
_dec = msgspec.json.Decoder()
_enc = msgspec.json.Encoder()

VAIC_TYPES = {"session.accepted", "session.error", "connection.validated", "userStream.started",
              "userStream.stopped", "userStream.speech.started", "userStream.speech.stopped",
              "userStream.speech.committed", "userStream.speech.recognition", "playStream.start",
              "playStream.chunk", "playStream.stop", "activities"}
REPLIES = {"connection.validated", "userStream.started", "userStream.stopped"}  # protocol answers


# --------------------------------------------------------------------------------- the driver


class Sim:
    """One call. `Sim(timeline).run()`; then read `violations`, `findings`, `sess`, ..."""

    def __init__(self, tl: Timeline, stats: Stats | None = None, max_events: int = 20_000,
                 max_ms: int = 150_000) -> None:
        self.tl = tl
        k = tl.knobs
        self.cfg = config_for(k)
        self.fmt = FORMATS[k.fmt]
        self.ac_bpm = self.fmt.bytes_per_ms
        self.mulaw = self.fmt.codec == "mulaw"
        self.oai_bpm = 8 if self.mulaw else 48
        self.unit_bytes = 1 if self.mulaw else 6            # 1/8 ms on the OpenAI side
        self.passthrough = k.fmt in PASSTHROUGH
        self.limit_ms = k.lead_ms + k.max_chunk_ms
        self.max_events = max_events
        self.max_t = T0 + max_ms * MS
        self.now = T0
        self.heap: list[tuple[int, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = 0
        self.stats = stats if stats is not None else Stats()
        self.sess = S.CallSession(self.cfg, SECRETS, self.stats, T0, call_id="sim")
        self.violations: list[Violation] = []
        self.findings: list[Violation] = []
        self.logs: list[S.Log] = []
        self.events = 0
        self.timer_calls = 0
        self._jitter_i = 0
        self._cur_d: int | None = None
        self._cur_late = 0
        self._stale_d: int | None = None     # a deadline timer() does not clear: a busy loop
        self.finished_t: int | None = None
        self.finished_n = 0
        self.close_vaic_n = 0
        self.resumes = 0
        self.transcripts: list[tuple[str, str]] = []
        self.kept_for_resume = 0
        self.resumed = 0
        self.v_resuming = False
        self.spins = 0
        # VAIC side
        self.v_open = True                 # the socket is up
        self.v_gone = False                # detached (swap gap)
        self.v_ended = False               # session.end sent / socket dropped by VAIC
        self.v_accepted_t: int | None = None
        self.v_streaming = False
        self.v_quiet = False
        self.v_tick_gen = 0
        self.v_seq = 0
        self.v_sent_active: list[int] = []   # caller chunk seqs the core received while ACTIVE
        self.v_bad: set[int] = set()
        self.hangup_t: int | None = None
        self.error_t: int | None = None
        self.pm = PlayoutModel(k.stop_policy, record_audio=False)  # type: ignore[arg-type]
        self.v_stream: Stream | None = None
        self.streams: dict[str, Stream] = {}
        self.item_streams: dict[str, list[Stream]] = {}
        self.dead: set[str] = set()          # items that must not be played any more
        self.barge_ts: list[int] = []
        self.starts = self.stops = 0
        self.chunks_down = 0
        self.max_held_ms = 0.0
        # model side
        self.m = tl.model
        self.sock: Sock | None = None        # the current OpenAI socket
        self.socks: list[Sock] = []
        self.dialling = 0                    # dials not yet answered
        self.dials = 0
        self.m_items = 0
        self.m_resps = 0
        self.m_pending_reply = 0
        self.all_items: dict[str, Item] = {}

    # ---------------------------------------------------------------- infrastructure
    def at(self, t: int, fn: Callable[..., None], *args: Any) -> None:
        self._seq += 1
        heapq.heappush(self.heap, (t, self._seq, fn, args))

    @property
    def t_ms(self) -> float:
        return (self.now - T0) / MS

    def bad(self, code: str, detail: str = "") -> None:
        self.violations.append(Violation(code, round(self.t_ms, 3), detail))

    def odd(self, code: str, detail: str = "") -> None:
        self.findings.append(Violation(code, round(self.t_ms, 3), detail))

    def call(self, fn: Callable[..., Any], *args: Any) -> Any:
        """Call into the core: it must never raise."""
        try:
            return fn(*args)
        except Exception as e:  # noqa: BLE001 - the point is to see it
            self.bad("core_raised", f"{fn.__name__}: {type(e).__name__}: {e}")
            return None

    # ---------------------------------------------------------------- the loop
    def run(self) -> "Sim":
        tl = self.tl
        v = tl.vaic
        self._after()
        if v.first != "none":
            self.at(T0 + v.initiate_ms * MS, self._v_first)
        while self.finished_t is None:
            self.events += 1
            if self.events > self.max_events:
                self.bad("bound_events", f"more than {self.max_events} events")
                break
            d = self.sess.next_deadline_ns()
            te = self.heap[0][0] if self.heap else None
            if d is not None and d == self._stale_d and d <= self.now:
                # a known busy loop: the shell calls timer() again and again while time passes
                nxt = self.now + 10 * MS
                if te is not None and te <= nxt:
                    t, _, fn, args = heapq.heappop(self.heap)
                    self.now = max(self.now, t)
                    fn(*args)
                else:
                    self.now = nxt
                    self.spins += 1
                    self.call(self.sess.timer, self.now)
                    self._after()
            elif d is not None and (te is None or d + self._late_for(d) <= te):
                self._fire_timer(max(self.now, d + self._late_for(d)))
            elif te is not None:
                t, _, fn, args = heapq.heappop(self.heap)
                if t > self.now:
                    self.now = t
                fn(*args)
            else:
                self.bad("hang", "no deadline and nothing scheduled, the call is not over")
                break
            if self.now > self.max_t:
                self.bad("bound_time", f"still running after {self.t_ms:.0f} ms of virtual time")
                break
        if self.finished_t is not None:
            self._drain_in_flight()
        self._final_checks()
        return self

    def _late_for(self, d: int) -> int:
        """How late the timer armed for deadline `d` fires (scripted jitter, ns)."""
        if d != self._cur_d:
            lat = self.tl.timer_late_us
            self._cur_late = lat[self._jitter_i % len(lat)] * 1000 if lat else 0
            self._jitter_i += 1
            self._cur_d = d
        return self._cur_late

    def _fire_timer(self, t: int) -> None:
        self.now = t
        self._cur_d = None
        self.timer_calls += 1
        self.call(self.sess.timer, t)
        self._after()
        d2 = self.sess.next_deadline_ns()
        if d2 is not None and d2 <= t and self.finished_t is None:
            # the shell re-arms at once: harmless if a little time passing makes it due
            self.spins += 1
            if self.spins == 1:
                self.odd("timer_noop_at_deadline", f"timer({(t - T0) / MS:.6f} ms) left "
                         f"next_deadline_ns() at {(d2 - T0) / MS:.6f} ms: nothing was due yet")
            d3 = d2
            for _ in range(3):       # a rounding no-op clears within a few ns; a stale one never
                self.now += 1000
                self.call(self.sess.timer, self.now)
                self._after()
                d3 = self.sess.next_deadline_ns()
                if d3 is None or d3 > self.now or self.finished_t is not None:
                    break
            if d3 is not None and d3 <= self.now and self.finished_t is None:
                self._stale_d = d3
                te = self.heap[0][0] if self.heap else None
                self.bad("timer_spin", f"next_deadline_ns() stays at {(d3 - T0) / MS:.3f} ms <= now "
                         f"after timer(now) at {self.t_ms:.3f} ms (phase {self.sess.phase.value}"
                         f"{', VAIC detached' if self.sess.vaic_gone else ''}): "
                         f"the shell busy-loops until something changes (next event: "
                         f"{'none' if te is None else f'{(te - T0) / MS:.3f} ms'})")

    def _drain_in_flight(self) -> None:
        """After Finished: model frames already in flight when we closed its socket."""
        while self.heap:
            t, _, fn, args = heapq.heappop(self.heap)
            if getattr(fn, "__func__", None) is not Sim._m_deliver:
                continue
            sock = args[0]
            if sock.closed_t is None or t > sock.closed_t + self.m.close_window_ms * MS:
                continue
            self.now = max(self.now, t)
            fn(*args)

    # ---------------------------------------------------------------- outputs and effects
    def _after(self) -> None:
        s = self.sess
        if s.to_vaic:
            frames = list(s.to_vaic)
            s.to_vaic.clear()
            self._vaic_out(frames)
        if s.to_openai:
            frames = list(s.to_openai)
            s.to_openai.clear()
            for f in frames:
                self._oai_out(f)
        if s.marks:
            for hist, t0 in s.marks:
                if t0 > self.now:
                    self.bad("mark_from_future", f"{hist.name}: t0 {(t0 - T0) / MS:.3f} ms")
                hist.record((self.now - t0) // 1000)
            s.marks.clear()
        if s.effects:
            effects = list(s.effects)
            s.effects.clear()
            for eff in effects:
                self._effect(eff)
        self._check_state()

    def _check_state(self) -> None:
        s = self.sess
        if (s.proto.stream_id is None) != (s.playout.open_item is None):
            self.bad("stream_id_vs_open_item",
                     f"stream_id={s.proto.stream_id} open_item={s.playout.open_item}")
        sock_open = self.sock is not None and self.sock.open
        if sock_open != s.up_ready and self.finished_t is None:
            self.bad("upstream_vs_socket", f"upstream={s.upstream.value} socket_open={sock_open}")

    def _effect(self, eff: Any) -> None:
        t = type(eff)
        if self.finished_t is not None and t is not S.Log:
            self.bad("effect_after_finished", repr(eff)[:120])
        if t is S.Log:
            self.logs.append(eff)
            if eff.event == "call.internal_error":
                self.bad("internal_error", f"{eff.fields}")
        elif t is S.Dial:
            self.dials += 1
            if (self.sock is not None and self.sock.open) or self.dialling:
                self.bad("second_dial", "Dial while a socket is open or being dialled")
            self.dialling += 1
            m = self.m
            if m.connect == "ok":
                self.at(self.now + m.connect_ms * MS, self._m_connected)
            elif m.connect == "fail":      # HTTP 401: not worth a retry
                self.at(self.now + m.connect_ms * MS, self._m_connect_failed, "HTTP 401", 401)
            elif m.connect == "refused":   # a network error: a core with retries tries again
                self.at(self.now + m.connect_ms * MS, self._m_connect_failed, "refused")
            elif m.connect == "http_503":
                self.at(self.now + m.connect_ms * MS, self._m_connect_failed, "HTTP 503", 503)
            elif m.connect == "flaky" and self.dials <= 2:   # two failures, then it works
                self.at(self.now + m.connect_ms * MS, self._m_connect_failed, "HTTP 503", 503)
            elif m.connect == "flaky":
                self.at(self.now + m.connect_ms * MS, self._m_connected)
            else:
                wait = int(self.cfg.openai.connect_timeout_s * NS)
                self.at(self.now + wait, self._m_connect_failed, "timeout")
        elif t is S.CloseOpenAI:
            sk = self.sock
            if sk is not None and sk.open:
                sk.open = False
                sk.closed_t = self.now
        elif t is S.CloseVaic:
            self.close_vaic_n += 1
        elif t is S.Finished:
            self.finished_n += 1
            if self.finished_t is None:
                self.finished_t = self.now
            if not self.close_vaic_n:
                self.bad("finished_without_close_vaic")
        elif type(eff).__name__ == "Resume":
            self.resumes += 1              # no other call waits here: the shell refuses it
            self.call(self.sess.resume_refused, self.now)
        elif type(eff).__name__ == "Transcript":
            self.transcripts.append((eff.role, eff.text))
        elif type(eff).__name__ == "RunTool":   # timelines enable no webhook tool
            self.bad("unexpected_tool_run", repr(eff)[:120])
        else:
            self.bad("unknown_effect", repr(eff)[:120])

    # ================================================================ VAIC side
    def _v_send(self, obj: dict[str, Any] | str) -> None:
        if not self.v_open or self.v_gone or self.finished_t is not None:
            return
        frame = obj if isinstance(obj, str) else _enc.encode(obj).decode()
        out = self.call(self.sess.vaic_frame, frame, self.now)
        if out is not None:
            self._oai_out(out, hot=True)
        self._after()

    def _v_first(self) -> None:
        v = self.tl.vaic
        init = {"type": "session.initiate", "conversationId": "sim", "botName": "b",
                "caller": "+100", "expectAudioMessages": v.first != "no_audio",
                "supportedMediaFormats": ["raw/none"] if v.first == "bad_format" else [self.fmt.name]}
        if v.first == "validate":
            self._v_send({"type": "connection.validate", "conversationId": "sim"})
            self.at(self.now + v.reply_ms * MS, self._v_drop, None)
        elif v.first == "garbage":
            self._v_send({"type": "userStream.start", "conversationId": "sim"})
        elif v.first == "resume":
            self._v_send({"type": "session.resume", "conversationId": "elsewhere"})
        else:
            self._v_send(init)

    def _v_accepted(self) -> None:
        v = self.tl.vaic
        base = self.now
        if v.start_ms is not None:
            self.at(base + v.start_ms * MS, self._v_send, {
                "type": "activities", "conversationId": "sim", "activities": [
                    {"type": "event", "name": "start",
                     "parameters": {"caller": "+100", "callee": "+200"}}]})
        if v.stream_ms is not None:
            self.at(base + v.stream_ms * MS, self._v_stream_on)
            on = False
            for t in v.toggles_ms:
                self.at(base + (v.stream_ms + t) * MS, self._v_stream_on if on else self._v_stream_off)
                on = not on
        for t, kind in v.extras:
            self.at(base + t * MS, self._v_extra, kind)
        for t, gap in v.swaps:
            self.at(base + t * MS, self._v_detach, gap)
        for t, gap in self.tl.openai_swaps:
            self.at(base + t * MS, self._m_swap, gap)
        if v.end == "session_end":
            self.at(base + v.end_ms * MS, self._v_session_end)
        elif v.end == "drop":
            self.at(base + v.end_ms * MS, self._v_drop, v.drop_cause)
        else:
            self.at(base + v.end_ms * MS, self._v_fall_quiet)

    def _v_fall_quiet(self) -> None:
        self.v_quiet = True              # the caller says nothing more (no toggles either)
        self._v_stream_off()

    def _v_stream_on(self) -> None:
        if self.v_streaming or not self.v_open or self.v_ended or self.v_quiet:
            return
        self.v_streaming = True
        self._v_send({"type": "userStream.start", "conversationId": "sim"})
        self.v_tick_gen += 1
        self._v_tick(self.v_tick_gen)

    def _v_stream_off(self) -> None:
        if not self.v_streaming:
            return
        self.v_streaming = False
        self.v_tick_gen += 1
        self._v_send({"type": "userStream.stop", "conversationId": "sim"})

    def _v_tick(self, gen: int) -> None:
        if gen != self.v_tick_gen or not self.v_open or self.v_ended or self.finished_t is not None:
            return
        if not self.v_gone:
            self._v_chunk()
        self.at(self.now + self.tl.vaic.chunk_ms * MS, self._v_tick, gen)

    def _v_chunk(self, bad: bool = False) -> None:
        self.v_seq += 1
        seq = self.v_seq
        n = self.tl.vaic.chunk_ms * self.ac_bpm
        if bad:
            b64 = "not base64!"
            self.v_bad.add(seq)
        else:
            b64 = base64.b64encode(seq.to_bytes(6, "little")).decode() + _b64_fill(0x55, n - 6)
        if self.sess.phase is S.Phase.ACTIVE and not bad:
            self.v_sent_active.append(seq)
        self._v_send('{"type":"userStream.chunk","conversationId":"sim","audioChunk":"' + b64 + '"}')

    def _v_extra(self, kind: str) -> None:
        if kind == "dtmf":
            self._v_send({"type": "activities", "conversationId": "sim",
                          "activities": [{"type": "event", "name": "DTMF", "value": "5"}]})
        elif kind == "unknown":
            self._v_send({"type": "something.new", "conversationId": "sim"})
        elif kind == "malformed":
            self._v_send('{"type": "userStream.chunk", "audioChunk": 5}')
        elif kind == "bad_audio":
            self._v_chunk(bad=True)
        elif kind == "start":
            self._v_send({"type": "activities", "conversationId": "sim", "activities": [
                {"type": "event", "name": "start", "parameters": {"callee": "+300"}}]})
        elif kind == "initiate":
            self._v_send({"type": "session.initiate", "conversationId": "sim",
                          "supportedMediaFormats": [self.fmt.name]})

    def _v_session_end(self) -> None:
        if not self.v_open or self.v_ended:
            return
        if self.v_gone:                  # between two sockets: on the next one
            self.at(self.now + 10 * MS, self._v_session_end)
            return
        self._v_send({"type": "session.end", "conversationId": "sim", "reasonCode": "client-disconnected",
                      "reason": "caller hung up"})
        self.v_ended = True

    def _v_drop(self, cause: str | None) -> None:
        if not self.v_open or self.v_ended or self.finished_t is not None:
            return
        if self.v_gone:                  # between two sockets: the next one drops
            self.at(self.now + 10 * MS, self._v_drop, cause)
            return
        self.v_open = False
        self.v_ended = True
        self._v_socket_gone()
        dead_before = set(self.dead)
        active = self.sess.phase is S.Phase.ACTIVE
        if active:
            self._mark_dead("vaic_lost")
        self.call(self.sess.vaic_lost, 1006 if cause else 1000, cause, self.now)
        if not (self.sess.vaic_gone and self.finished_t is None):
            if active:                     # the call ended: not an interruption of the prompt
                self.dead = dead_before
                self.barge_ts.pop()
        else:                              # kept for a session.resume
            self.v_gone = True
            self.kept_for_resume += 1
            v = self.tl.vaic
            if v.resume_ms is not None:
                self.at(self.now + v.resume_ms * MS, self._v_resume)
        self._after()

    def _v_socket_gone(self) -> None:
        """The VAIC socket is gone: what it held is not played any more."""
        tms = self.t_ms
        self.pm.barge_in(tms)
        self.pm.end_call(tms)
        if self.v_stream is not None:   # the old socket took its open stream with it
            self.stops += 1
        self.v_stream = None
        self.pm = PlayoutModel(self.tl.knobs.stop_policy, record_audio=False)  # type: ignore[arg-type]

    def _v_resume(self) -> None:
        """VAIC reconnects with session.resume; the server hands the socket to this call if it
        is waiting for one (`Call.waiting_for_resume`, then `adopt_vaic`)."""
        s = self.sess
        if self.finished_t is not None or not s.vaic_gone:
            return
        self.v_open = True
        self.v_ended = False
        self.v_gone = False
        self.v_resuming = True
        self.v_streaming = False
        self.v_tick_gen += 1
        self.resumed += 1
        self.call(s.vaic_attached, self.now)
        self._after()
        if self.v_resuming:
            self.bad("resume_not_accepted", "vaic_attached sent no session.accepted")
            self.v_resuming = False
        if self.tl.vaic.stream_ms is not None and not self.v_quiet:
            self.at(self.now + 5 * MS, self._v_stream_on)
            self.at(self.now + 505 * MS, self._v_fall_quiet)   # then the script is over

    def _v_detach(self, gap_ms: int) -> None:
        if not self.v_open or self.v_ended or self.v_gone or self.finished_t is not None:
            return
        self._v_socket_gone()
        self._mark_dead("vaic_detached")
        self.call(self.sess.vaic_detached, self.now)
        self.v_gone = True
        self._after()
        self.at(self.now + gap_ms * MS, self._v_attach)

    def _v_attach(self) -> None:
        if self.finished_t is not None:
            return
        self.v_gone = False
        self.call(self.sess.vaic_attached, self.now)
        self._after()

    def _v_reply_to_end(self) -> None:
        """Our hangup or session.error reached VAIC: it answers as scripted."""
        v = self.tl.vaic
        if v.hangup_reply == "never":
            return
        if v.hangup_reply == "session_end" and self.error_t is None:
            self.at(self.now + v.reply_ms * MS, self._v_session_end)
        else:
            self.at(self.now + v.reply_ms * MS, self._v_drop, None)

    # -- frames to VAIC
    def _vaic_out(self, frames: list[str]) -> None:
        s = self.sess
        # which item a stream plays: the core's open item at the end of this batch (a batch
        # opens at most one stream, and a stream's chunks never share a batch with its stop)
        end_sid, end_item = s.proto.stream_id, s.playout.open_item
        if end_sid is not None and end_item is not None:
            st = self.streams.get(end_sid)
            if st is not None and st.item != end_item:
                self.bad("stream_changed_item", f"{st.sid}: {st.item} -> {end_item}")
        msgs = []
        for f in frames:
            try:
                m = _dec.decode(f)
            except msgspec.DecodeError as e:
                self.bad("vaic_frame_not_json", f"{e}: {f[:80]}")
                continue
            if not isinstance(m, dict) or m.get("type") not in VAIC_TYPES:
                self.bad("vaic_frame_unknown", f[:120])
                continue
            msgs.append(m)
        barge = any(m["type"] == "userStream.speech.started" for m in msgs)
        hangup = any(m["type"] == "activities" for m in msgs)
        for m in msgs:
            typ = m["type"]
            if self.v_gone:
                self.bad("to_vaic_while_detached", typ)
                continue
            if not self.v_open or self.v_ended:
                if typ not in REPLIES:
                    self.bad("to_vaic_after_end", typ)
                continue
            if (self.hangup_t is not None or self.error_t is not None) and typ not in REPLIES:
                self.bad("to_vaic_after_hangup", typ)
                continue
            if typ == "playStream.chunk":
                self._v_play_chunk(m)
            elif typ == "playStream.start":
                if self.v_stream is not None:
                    self.bad("start_in_stream", f"{m.get('streamId')} while {self.v_stream.sid} is open")
                sid = str(m.get("streamId"))
                if sid in self.streams:
                    self.bad("stream_id_reused", sid)
                if m.get("mediaFormat") != self.fmt.name:
                    self.bad("stream_format", f"{m.get('mediaFormat')} != {self.fmt.name}")
                st = Stream(sid, self.pm.start(self.t_ms, sid, self.fmt.name))
                self.streams[sid] = st
                if sid == end_sid and end_item is not None:
                    st.item = end_item
                    self.item_streams.setdefault(end_item, []).append(st)
                self.v_stream = st
                self.starts += 1
            elif typ == "playStream.stop":
                st = self.v_stream
                if st is None or m.get("streamId") != st.sid:
                    self.bad("stop_without_start", f"{m.get('streamId')} (open: {st and st.sid})")
                    continue
                if not barge and not hangup:
                    held = self.pm.buffer_end_t - self.t_ms
                    if held > EPS_MS and self.tl.knobs.stop_policy == "flush":
                        self.bad("stop_cuts_tail", f"stream {st.sid} stopped with {held:.3f} ms unplayed")
                    st.stopped_normally = True
                self.pm.stop(self.t_ms)
                self.v_stream = None
                self.stops += 1
            elif typ == "userStream.speech.started":
                self.pm.barge_in(self.t_ms)
            elif typ == "activities":
                acts = m.get("activities") or []
                if not acts or acts[0].get("name") != "hangup":
                    self.bad("vaic_activity", str(m)[:120])
                self.hangup_t = self.now
                if self.v_stream is not None:
                    self.bad("hangup_with_open_stream", self.v_stream.sid)
                self._v_reply_to_end()
            elif typ == "session.accepted" and self.v_resuming:
                self.v_resuming = False
                if m.get("mediaFormat") != self.fmt.name:
                    self.bad("accepted_format", str(m.get("mediaFormat")))
            elif typ == "session.accepted":
                if self.v_accepted_t is not None:
                    self.bad("accepted_twice")
                if m.get("mediaFormat") != self.fmt.name:
                    self.bad("accepted_format", str(m.get("mediaFormat")))
                self.v_accepted_t = self.now
                self._v_accepted()
            elif typ == "session.error":
                self.error_t = self.now
                self._v_reply_to_end()

    def _v_play_chunk(self, m: dict[str, Any]) -> None:
        st = self.v_stream
        if st is None or m.get("streamId") != st.sid:
            self.bad("chunk_outside_stream", f"{m.get('streamId')} (open: {st and st.sid})")
            return
        b64 = m.get("audioChunk")
        if not isinstance(b64, str) or not b64:
            self.bad("chunk_empty", str(m)[:80])
            return
        nbytes = b64_decoded_len(b64)
        dur = nbytes / self.ac_bpm
        tms = self.t_ms
        self.pm.chunk(tms, dur)
        st.sent_ms += dur
        st.sent_bytes += nbytes
        self.chunks_down += 1
        if not st.played.muted:
            held = self.pm.buffer_end_t - tms
            if held > self.max_held_ms:
                self.max_held_ms = held
            if held > self.limit_ms + EPS_MS:
                self.bad("vaic_holds_too_much", f"{held:.3f} ms unplayed > lead {self.tl.knobs.lead_ms} "
                         f"+ chunk {self.tl.knobs.max_chunk_ms}")
        if st.item is None:
            self.bad("chunk_unattributed", st.sid)
            return
        it = self.all_items.get(st.item)
        if st.item in self.dead:
            self.bad("played_after_barge_in", f"item {st.item} (stream {st.sid}) after a barge-in / detach")
        elif it is not None and it.truncate_ms is not None:
            self.bad("played_after_truncate", f"item {st.item} truncated at {it.truncate_ms} ms")
        if self.passthrough and it is not None and base64.b64decode(b64[:4])[0] != it.tag:
            self.bad("chunk_of_other_item", f"stream {st.sid} of {st.item} carries other audio")

    # -- barge-in bookkeeping
    def _mark_dead(self, why: str) -> None:
        """Everything the model said so far, and every response still running, is dead: none
        of it may reach VAIC from now on."""
        self.barge_ts.append(self.now)
        for it in self.all_items.values():
            if it.delivered_bytes:
                self.dead.add(it.iid)
        sk = self.sock
        if sk is not None:
            for r in sk.resps:
                if r.created_delivered and not r.done_delivered:
                    for it in r.items:
                        self.dead.add(it.iid)

    def item_sent_ms(self, iid: str) -> float:
        return sum(st.sent_ms for st in self.item_streams.get(iid, ()))

    def item_heard_ms(self, iid: str) -> float:
        """What the caller has heard of `iid` by now, or with the 'drain' stop policy (VAIC plays
        out what it holds) what it will have heard."""
        if self.tl.knobs.stop_policy == "drain":
            return sum(st.played.received_ms - st.played.flushed_ms for st in self.item_streams.get(iid, ()))
        tms = self.t_ms
        return sum(self.pm.heard_ms(st.played, tms) if st.played.finished_t is None
                   else st.played.heard_ms for st in self.item_streams.get(iid, ()))

    # ================================================================ model side
    def _m_connected(self) -> None:
        self.dialling -= 1
        s = self.sess
        if self.finished_t is not None or s.upstream is not S.Upstream.DIALLING:
            return                     # the shell aborts a socket the call no longer wants
        self._m_open_socket()

    def _m_open_socket(self) -> None:
        sk = Sock(len(self.socks) + 1, self.now)
        self.socks.append(sk)
        self.sock = sk
        m = self.m
        if m.session not in ("silent", "no_created"):
            self.at(self.now + m.created_ms * MS, self._m_deliver, sk, None, False,
                    '{"type":"session.created","event_id":"e","session":{"type":"realtime"}}')
        self.call(self.sess.openai_connected, self.now)
        self._after()
        if sk.n == 1 and m.turns and sk.updates:
            # the script begins once session.updated is out (or would be); it goes on across
            # socket swaps (each step on the socket current then)
            self.at(self.now + (m.updated_ms + m.turns[0].after_ms) * MS, self._m_turn, 0)

    def _m_connect_failed(self, reason: str, status: int | None = None) -> None:
        self.dialling -= 1
        if self.finished_t is not None:
            return
        if _FAILED_TAKES_STATUS:
            self.call(self.sess.openai_connect_failed, reason, self.now, status)
        else:
            self.call(self.sess.openai_connect_failed, reason, self.now)
        self._after()

    def _m_swap(self, gap_ms: int) -> None:
        """The shell replaces the OpenAI socket (`Call.swap_openai`; with a gap, as a reconnect
        that must dial first would): `openai_swap`, then `openai_connected` on the new one."""
        if self.finished_t is not None:
            return
        old = self.sock
        if old is not None and old.open:
            old.open = False
            old.closed_t = self.now
        self.sock = None
        self.call(self.sess.openai_swap, self.now)
        self._after()
        self.dialling += 1
        if gap_ms:
            self.at(self.now + gap_ms * MS, self._m_connected)
        else:
            self._m_connected()

    def _m_deliver(self, sk: Sock, resp: Resp | None, post_cancel: bool, frame: str,
                   item: Item | None = None, kind: str = "") -> None:
        if sk is not self.sock:
            return
        if not sk.open:
            if sk.lost or sk.closed_t is None or self.now > sk.closed_t + self.m.close_window_ms * MS:
                return
        if resp is not None and resp.cancel_t is not None and not post_cancel and self.now >= resp.cancel_t:
            return
        if kind == "delta":
            assert item is not None
            nb = b64_decoded_len(frame[frame.rindex(':"') + 2:-2])
            item.delivered_bytes += nb
            item.delivered_ms += nb / self.oai_bpm
        elif kind == "created":
            assert resp is not None
            resp.created_delivered = True
        elif kind == "done":
            assert resp is not None
            resp.done_delivered = True
        elif kind == "audio_done":
            assert item is not None
            item.audio_done = True
        elif kind == "speech_started":
            if self.sess.phase is S.Phase.ACTIVE:
                self._mark_dead("speech_started")
        elif kind == "lost":
            if sk.open:
                sk.open = False
                sk.lost = True
                self.call(self.sess.openai_lost, 1006, None, "", self.now)
                self._after()
            return
        sess = self.sess
        d0 = sess.next_deadline_ns()
        r = self.call(sess.openai_frame, frame, self.now)
        if r == S.FORWARDED and not (sess.to_openai or sess.effects or sess.marks):
            # the shell keeps its armed timer after such a delta (call.Call._pump_down)
            d1 = sess.next_deadline_ns()
            if d1 is not None and (d0 is None or d1 < d0):
                self.bad("forwarded_deadline_earlier", f"next_deadline_ns() {d0} -> {d1}")
        self._after()

    def _m_send(self, sk: Sock, t: int, frame: str, resp: Resp | None = None,
                post_cancel: bool = False, item: Item | None = None, kind: str = "") -> None:
        self.at(t, self._m_deliver, sk, resp, post_cancel, frame, item, kind)

    def _m_running(self, sk: Sock, t: int) -> Resp | None:
        """The response the model is producing at `t` (created sent, not cancelled, not done)."""
        for r in reversed(sk.resps):
            if r.start_t <= t < r.end_t and r.cancel_t is None:
                return r
        return None

    def _m_busy_until(self, sk: Sock, t: int) -> int:
        """0 when the model could start a response at `t`, else when it can (one at a time:
        a cancelled one until its response.done, a scheduled one until its end)."""
        ends = [r.end_t for r in sk.resps if r.end_t > t and (r.cancel_t is None or r.start_t <= t)]
        return max(ends) if ends else 0

    def _m_turn(self, i: int) -> None:
        turns = self.m.turns
        tu = turns[i]
        if i + 1 < len(turns):
            self.at(self.now + turns[i + 1].after_ms * MS, self._m_turn, i + 1)
        sk = self.sock
        if sk is None or not sk.open:
            return
        ok_session = self.m.session in ("ok", "wrong_format")
        now = self.now
        if tu.kind == "speech" and ok_session:
            self._m_send(sk, now, '{"type":"input_audio_buffer.speech_started","audio_start_ms":0,'
                         '"item_id":"u%d"}' % i, kind="speech_started")
            if self.tl.knobs.interrupt_response:
                for r in sk.resps:
                    if r.cancel_t is None and r.end_t > now:
                        self._m_cancel(r, now)
            end = now + tu.speech_ms * MS
            self._m_send(sk, end, '{"type":"input_audio_buffer.speech_stopped","audio_end_ms":0,'
                         '"item_id":"u%d"}' % i)
            self._m_send(sk, end, '{"type":"input_audio_buffer.committed","item_id":"u%d"}' % i)
            self._m_send(sk, end + 50 * MS, '{"type":"conversation.item.input_audio_transcription.'
                         'completed","item_id":"u%d","content_index":0,"transcript":"caller turn %d"}'
                         % (i, i))
            if tu.reply is not None:
                self.at(end + tu.reply.think_ms * MS, self._m_reply, sk, tu.reply)
        elif tu.kind == "reply" and ok_session and tu.reply is not None:
            self.at(now + tu.reply.think_ms * MS, self._m_reply, sk, tu.reply)
        elif tu.kind == "error":
            self._m_send(sk, now, _enc.encode({"type": "error", "event_id": "e", "error": {
                "type": "invalid_request_error", "code": tu.code, "message": "simulated"}}).decode())
        elif tu.kind == "lost":
            self._m_send(sk, now, "", kind="lost")
        elif tu.kind == "garbage":
            self._m_send(sk, now, '{"type": 5}')
            self._m_send(sk, now, '{"type":"response.output_audio.delta","delta":"!!","response_id":"x"}')
            self._m_send(sk, now, '{"type":"rate_limits.updated","rate_limits":[]}')

    def _m_reply(self, sk: Sock, spec: Reply) -> None:
        if sk is not self.sock or not sk.open:
            return
        busy = self._m_busy_until(sk, self.now)
        if busy:
            self.at(busy + MS, self._m_reply, sk, spec)   # one response at a time
            return
        self._m_start_response(sk, spec, self.now)

    def _m_start_response(self, sk: Sock, spec: Reply, t: int) -> Resp:
        self.m_resps += 1
        r = Resp(f"r{self.m_resps}", sk, start_t=t)
        sk.resps.append(r)
        self._m_send(sk, t, '{"type":"response.created","event_id":"e","response":{"id":"%s",'
                     '"status":"in_progress"}}' % r.rid, r, kind="created")
        tt = t
        for deltas in spec.items:
            self.m_items += 1
            it = Item(f"it{self.m_items}", r, 0x41 + self.m_items % 60, sk)
            r.items.append(it)
            sk.items[it.iid] = it
            self.all_items[it.iid] = it
            for units, gap in deltas:
                tt += gap * MS
                r.plan.append((tt, it, units))
                self._m_send(sk, tt, self._delta_frame(r, it, units), r, item=it, kind="delta")
            self._m_send(sk, tt, '{"type":"response.output_audio.done","response_id":"%s",'
                         '"item_id":"%s","output_index":0,"content_index":0}' % (r.rid, it.iid),
                         r, item=it, kind="audio_done")
            self._m_send(sk, tt, '{"type":"response.output_audio_transcript.done","response_id":'
                         '"%s","item_id":"%s","output_index":0,"content_index":0,"transcript":'
                         '"I said item %s."}' % (r.rid, it.iid, it.iid), r)
        if spec.status == "completed":
            done = '{"type":"response.done","event_id":"e","response":{"id":"%s","status":"completed"}}' % r.rid
        else:    # failed: transient (server_error) or fatal (insufficient_quota)
            code = "insufficient_quota" if spec.status == "failed_fatal" else "server_error"
            done = ('{"type":"response.done","event_id":"e","response":{"id":"%s","status":"failed",'
                    '"status_details":{"type":"failed","error":{"type":"x","code":"%s"}}}}' % (r.rid, code))
        self._m_send(sk, tt, done, r, kind="done")
        r.end_t = tt
        return r

    def _delta_frame(self, r: Resp, it: Item, units: int) -> str:
        return ('{"type":"response.output_audio.delta","response_id":"%s","item_id":"%s",'
                '"output_index":0,"content_index":0,"delta":"%s"}'
                % (r.rid, it.iid, _b64_fill(it.tag, units * self.unit_bytes)))

    def _m_cancel(self, r: Resp, c: int) -> None:
        """The server cancels `r` at `c`: a few late deltas, then response.done (cancelled)."""
        r.cancel_t = c
        sk = r.sock
        if c < r.start_t:        # not started yet: it never will
            r.end_t = c
            return
        m = self.m
        rest = [p for p in r.plan if p[0] >= c]
        late = rest[:m.late_deltas]
        step = max(1, m.late_ms * MS // (len(late) + 1))
        t = c
        cur = late[-1][1] if late else (rest[0][1] if rest else (r.items[-1] if r.items else None))
        for i, (_, it, units) in enumerate(late):
            t = c + (i + 1) * step
            self._m_send(sk, t, self._delta_frame(r, it, units), r, True, it, "delta")
        t = max(t, c + m.late_ms * MS)
        if m.cancel_audio_done and cur is not None:
            self._m_send(sk, t, '{"type":"response.output_audio.done","response_id":"%s",'
                         '"item_id":"%s","output_index":0,"content_index":0}' % (r.rid, cur.iid),
                         r, True, cur, "audio_done")
        self._m_send(sk, t + MS, '{"type":"response.done","event_id":"e","response":{"id":"%s",'
                     '"status":"cancelled"}}' % r.rid, r, True, kind="done")
        r.end_t = t + MS

    # -- frames to OpenAI
    def _oai_out(self, frame: str, hot: bool = False) -> None:
        sk = self.sock
        if sk is None or not sk.open:
            self.bad("to_openai_without_socket", frame[:80])
            return
        if hot:   # the hot path: the append template
            self._m_append(sk, frame)
            return
        try:
            m = _dec.decode(frame)
        except msgspec.DecodeError as e:
            self.bad("openai_frame_not_json", f"{e}: {frame[:80]}")
            return
        typ = m.get("type") if isinstance(m, dict) else None
        if typ != "input_audio_buffer.append":
            sk.events.append(str(typ))
        if typ == "input_audio_buffer.append":
            self._m_append(sk, frame)
        elif typ == "session.update":
            self._m_session_update(sk, m)
        elif typ == "response.create":
            act = [r.rid for r in sk.resps if r.created_delivered and not r.done_delivered]
            if act:
                self.bad("response_create_while_active", f"{act}")
            if self._m_busy_until(sk, self.now):
                self._m_send(sk, self.now + MS, _enc.encode({"type": "error", "error": {
                    "type": "invalid_request_error", "code": "conversation_already_has_active_response",
                    "message": "busy"}}).decode())
            elif self.m.session in ("ok", "wrong_format"):
                self._m_start_response(sk, self.m.greeting, self.now + self.m.greeting.think_ms * MS)
        elif typ == "response.cancel":
            run = self._m_running(sk, self.now)
            if run is not None:
                self._m_cancel(run, self.now)
            else:
                self._m_send(sk, self.now + MS, _enc.encode({"type": "error", "error": {
                    "type": "invalid_request_error", "code": "response_cancel_not_active",
                    "message": "none"}}).decode())
        elif typ == "conversation.item.truncate":
            self._m_truncate(sk, m)
        elif typ == "conversation.item.create":
            item = m.get("item") or {}
            content = item.get("content") or [{}]
            if item.get("role") == "system" or str(content[0].get("text", "")).startswith("(keypad)"):
                sk.notes += 1              # call control (keypad, events): any time, not a re-seed
                return
            sk.seeded += 1                 # a past turn as text, re-seeding a new session
            if sk.audio_seen or sk.events[0] != "session.update":
                self.bad("reseed_order", f"socket {sk.n}: {sk.events[:4]} audio_seen={sk.audio_seen}")
            item = m.get("item") or {}
            if item.get("type") != "message" or item.get("role") not in ("user", "assistant"):
                self.bad("reseed_item", frame[:120])
        else:
            self.bad("openai_frame_unknown", frame[:120])

    def _m_append(self, sk: Sock, frame: str) -> None:
        if not sk.events or sk.events[0] != "session.update":
            self.bad("append_before_session_update", f"socket {sk.n}")
        sk.audio_seen = True
        if not frame.startswith(_APPEND_PREFIX) or not frame.endswith('"}'):
            self.bad("append_frame", frame[:80])
            return
        b64 = frame[len(_APPEND_PREFIX):-2]
        sk.appended_ms += b64_decoded_len(b64) / self.oai_bpm
        if self.passthrough:
            try:
                seq = int.from_bytes(base64.b64decode(b64[:8]), "little")
            except ValueError:
                self.bad("append_undecodable", b64[:40])
                return
            sk.appended.append(seq)

    def _m_session_update(self, sk: Sock, m: dict[str, Any]) -> None:
        sk.updates += 1
        sess = m.get("session") or {}
        fmt = (((sess.get("audio") or {}).get("output") or {}).get("format") or {}).get("type")
        if sk.updates == 1:
            if fmt is None:
                self.bad("first_update_without_format", str(m)[:120])
            sk.fmt_type = fmt or ""
        if self.m.session in ("silent", "no_updated"):
            return
        out_fmt = sk.fmt_type
        if self.m.session == "wrong_format":
            out_fmt = "audio/pcma"
        self._m_send(sk, self.now + self.m.updated_ms * MS, _enc.encode({
            "type": "session.updated", "event_id": "e",
            "session": {"type": "realtime", "audio": {"output": {"format": {"type": out_fmt}}}}}).decode())

    def _m_truncate(self, sk: Sock, m: dict[str, Any]) -> None:
        iid = m.get("item_id")
        end = m.get("audio_end_ms")
        if not isinstance(end, int) or end < 0:
            self.bad("truncate_bad_value", str(m)[:120])
            return
        sk.truncates.append((str(iid), end))
        it = sk.items.get(iid)  # type: ignore[arg-type]
        if it is None:
            where = "another socket's session" if iid in self.all_items else "nowhere"
            self.bad("truncate_unknown_item", f"{iid} (produced by {where}) at {end} ms")
            return
        detail = f"{iid} at {end} ms"
        if end > it.delivered_ms + EPS_MS:
            self.bad("truncate_beyond_produced", f"{detail} > produced {it.delivered_ms:.3f} ms")
        sent = self.item_sent_ms(iid)
        if end > sent + EPS_MS:
            self.bad("truncate_beyond_sent", f"{detail} > sent to VAIC {sent:.3f} ms")
        heard = self.item_heard_ms(iid)
        if end > heard + 1.0:
            self.bad("truncate_beyond_heard", f"{detail} > heard {heard:.3f} ms")
        streams = self.item_streams.get(iid, [])
        if any(st.stopped_normally for st in streams):
            self.bad("truncate_after_playout", f"{detail}: its stream was already stopped after playout")
        elif (self.passthrough and it.audio_done and streams
              and sum(st.sent_bytes for st in streams) == it.delivered_bytes
              and all(st.played.end_t < self.t_ms - EPS_MS for st in streams)):
            self.bad("truncate_after_playout", f"{detail}: all of it had been played out")
        if it.truncate_ms is not None:
            self.odd("truncate_twice", f"{detail} (before: {it.truncate_ms} ms)")
        it.truncate_ms = end
        if end <= it.delivered_ms + EPS_MS:
            self._m_send(sk, self.now + MS, '{"type":"conversation.item.truncated","item_id":"%s",'
                         '"content_index":0,"audio_end_ms":%d}' % (iid, end))
        else:
            self._m_send(sk, self.now + MS, _enc.encode({"type": "error", "error": {
                "type": "invalid_request_error", "code": "invalid_value",
                "message": "audio_end_ms is longer than the audio"}}).decode())

    # ================================================================ the end
    def _final_checks(self) -> None:
        s = self.sess
        if self.finished_n != 1:
            self.bad("finished_count", f"{self.finished_n} Finished effects")
        if s.phase is not S.Phase.ENDED:
            self.bad("phase_not_ended", s.phase.value)
        sk = self.sock
        if sk is not None and sk.open:
            self.bad("openai_left_open", f"socket {sk.n} still open at the end (no CloseOpenAI)")
        if s.upstream not in (S.Upstream.LOST, S.Upstream.IDLE):
            self.bad("upstream_not_closed", s.upstream.value)
        if self.v_stream is not None and not self.v_ended:
            self.bad("stream_never_stopped", f"stream {self.v_stream.sid} open, the bot ended the call")
        if self.starts - self.stops not in (0, 1) or (self.starts != self.stops and not self.v_ended):
            self.bad("start_stop_count", f"{self.starts} starts, {self.stops} stops")
        self.pm.end_call(self.t_ms)      # what VAIC held when the call ended is cut
        self._check_caller_audio()
        self._check_history()

    def _check_caller_audio(self) -> None:
        """Caller audio reaches the model in order, nothing invented, no gap (pass-through
        formats, whose chunks carry their sequence number)."""
        if not self.passthrough:
            return
        got = [q for sk in self.socks for q in sk.appended]
        if any(b <= a for a, b in zip(got, got[1:])):
            self.bad("caller_audio_order", f"{got[:40]}")
        sent = set(self.v_sent_active)
        extra = [q for q in got if q not in sent]
        if extra:
            self.bad("caller_audio_invented", f"{extra[:10]}")
        if got and not self.sess.counters.early_dropped:
            have = set(got)
            missing = [q for q in self.v_sent_active if q < got[-1] and q not in have]
            if missing:
                self.bad("caller_audio_gap", f"chunks {missing[:10]} never reached the model")

    def _check_history(self) -> None:
        """The model's idea of what it said, after a barge-in, vs what the caller heard."""
        if self.tl.knobs.stop_policy != "flush" or not self.barge_ts:
            return
        tol = 2.0 if self.passthrough else 120.0
        for iid in self.dead:
            it = self.all_items.get(iid)
            if it is None or it.sock is not self.sock and len(self.socks) > 1:
                continue
            heard = sum(st.played.heard_ms for st in self.item_streams.get(iid, ()))
            kept = it.delivered_ms if it.truncate_ms is None else min(it.truncate_ms, it.delivered_ms)
            if kept > heard + tol:
                self.bad("model_item_longer_than_heard",
                         f"{iid}: the model keeps {kept:.1f} ms, the caller heard {heard:.1f} ms "
                         f"(truncate: {it.truncate_ms})")

    # ---------------------------------------------------------------- summary
    def summary(self) -> dict[str, Any]:
        s = self.sess
        return dict(reason=s.end_reason, t_ms=round(self.t_ms, 1), events=self.events,
                    timers=self.timer_calls, chunks_down=self.chunks_down, starts=self.starts,
                    truncates=s.counters.truncates, barge_ins=s.counters.barge_ins,
                    max_held_ms=round(self.max_held_ms, 2), spins=self.spins)


def run(tl: Timeline, stats: Stats | None = None) -> Sim:
    return Sim(tl, stats).run()
