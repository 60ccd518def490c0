"""The call as one Sans-I/O state machine: `CallSession`.

Everything a call decides lives here: both protocol state machines (`AcProtocol`, the Realtime
events), format negotiation and transcoding, the playout clock, response and item tracking,
barge-in and truncate arithmetic, the greeting and the `start` activity, error
classification, timeouts and ending. It never touches a socket, a task or a clock:

- **events in**, each with `now_ns` (the shell's `time.monotonic_ns()`): `vaic_frame`,
  `openai_connected`, `openai_connect_failed`, `openai_frame`, `openai_lost`, `vaic_lost`,
  `vaic_attached`, `timer`, `shutdown` (the daemon's drain is over: hang up politely);
- **out**: `to_vaic` and `to_openai` (frames, in order, for the shell to send and clear),
  `effects` (`Dial`, `CloseOpenAI`, `CloseVaic`, `Log`, `Finished`: what the shell must do, in
  order), `marks` (histograms to record once the frames above have been sent), and
  `next_deadline_ns()` (when to call `timer` next; None: no timer needed).

Hot path: `vaic_frame` returns the `input_audio_buffer.append` frame of a caller chunk itself
(no list, no effect); a model delta's chunks go straight into `to_vaic` through `AcProtocol`'s
template. Nothing is allocated per frame beyond decoding and the frame strings.

State: one home, transitions written down.
- `phase`: the call (`PHASE_TRANSITIONS`);
- `upstream`: the OpenAI side (`UPSTREAM_TRANSITIONS`);
- playout: `playout_state()` derives IDLE / PLAYING / STOPPING from the playout clock, whose
  open item always equals `AcProtocol.stream_id` being set (asserted by the simulation tests);
- the response in flight: `active_response` (id or None) and `cancelled` (ids whose late deltas
  are dropped).
An event that is not allowed in the current state (a transition missing from the tables) is an
internal error: the call ends cleanly, with a hang-up and a log line, never a hang.

Sockets can be swapped without losing the call: `openai_swap` + `openai_connected` on the new
socket re-sends `session.update` (and the instructions once the `start` activity was seen;
caller audio meanwhile is buffered, bounded, and flushed in order); `vaic_detached` +
`vaic_attached` keep the call and its OpenAI session and reset the play state (an interrupted
prompt is truncated at what was heard, pending audio dropped, nothing is sent meanwhile).
"""

from __future__ import annotations

import enum
import math
from collections import deque
from typing import Any, Callable, NamedTuple

import msgspec

from . import audiocodes as ac
from . import profiles as pf
from . import realtime as rt
from .audio import (WAV_HEADER_ON_PLAY_START, NoCommonFormat, Negotiated, Transcoder, b64_decoded_len,
                    make_transcoder, ms_of_b64, negotiate, wav_header)
from .bounds import ID_CHARS, OnceKeys, clip, clip_list, is_b64
from .config import Config, Secrets
from .control import CallControl, RunTool
from .playout import CHUNK, Playout, Taken, piece_chars, split_b64
from .stats import TOKEN_KINDS, Histogram, Stats

_LOG_FIRST_N = 5                 # per call, for repeated bad-input log lines
MAX_RECONNECTS = 10              # per call: a session that keeps dying ends the call
MAX_TURNS = 40                   # transcripts kept to re-seed a new session (each clipped)
TURN_CHARS = 2000
ROTATE_RECHECK_NS = 250_000_000  # rotation is due but no pause yet: look again this often
TRANSFER_WAIT_S = 30.0           # a fallback transfer: VAIC's session.end or transferStatus within this
_DECLINE_CLOSE_NS = 2_000_000_000  # after session.error, VAIC closes; if not, we do after this
NS = 1_000_000_000

# ------------------------------------------------------------------------------------ effects


class Dial(NamedTuple):
    """Open the OpenAI socket; report `openai_connected` or `openai_connect_failed`."""
    url: str
    headers: dict[str, str]


class CloseOpenAI(NamedTuple):
    """Close the OpenAI socket (within `openai.close_timeout_s`, then abort)."""
    code: int
    reason: str


class CloseVaic(NamedTuple):
    """Close the VAIC socket."""
    code: int
    reason: str


class Log(NamedTuple):
    level: str
    event: str
    fields: dict[str, Any]


class Finished(NamedTuple):
    """The call is over: close whatever is still open, then stop."""
    reason: str


class Resume(NamedTuple):
    """This socket asks to continue `conversation_id`: hand it to that call if one is waiting
    for it (`CallSession.vaic_attached` there), else call `resume_refused` here."""
    conversation_id: str


class Transcript(NamedTuple):
    """What was said: `role` "caller" or "agent", `at_ms` since the call began."""
    role: str
    text: str
    at_ms: int


Effect = Dial | CloseOpenAI | CloseVaic | Log | Finished | Resume | RunTool | Transcript


def hangup_token(reason: str) -> str:
    """The `hangupReason` VAIC gets (it ends up in the SIP Reason header and call records):
    a short token; the detail stays in our log."""
    if reason.startswith("openai_"):   # an expired session passes its own token (_on_error)
        return "model-unreachable"
    return reason.replace("_", "-")[:40]

BACKOFF_NS = (250_000_000, 500_000_000, 1_000_000_000, 2_000_000_000)  # then 2 s each

def _bounded_add(items: set[str], item: str, max_items: int = 32) -> None:
    """Add to a set that only the last few items matter in (cleared when full)."""
    if len(items) >= max_items:
        items.clear()
    items.add(item)


# ------------------------------------------------------------------------------------ state


class Phase(enum.Enum):
    INITIATING = "initiating"   # socket open, waiting for session.initiate
    ACTIVE = "active"           # session.accepted sent
    ENDING = "ending"           # we asked VAIC to hang up (or declined): waiting for it
    ENDED = "ended"             # nothing more happens


# Python 3.11's EnumType defines __getattr__, so every `Phase.ACTIVE` read is an unspecialized
# attribute lookup through a slot wrapper (~850 instructions, ~0.1 µs): the per-frame and
# per-timer paths compare with this module constant instead (a plain global read).
_ACTIVE = Phase.ACTIVE


class Upstream(enum.Enum):
    IDLE = "idle"               # not dialled yet
    DIALLING = "dialling"
    BACKOFF = "backoff"         # a dial failed in a way worth retrying: waiting to dial again
    CONFIGURING = "configuring"  # socket open, session.update sent: audio flows
    READY = "ready"             # session.created and session.updated received
    LOST = "lost"               # the socket is gone (or closed by us)


class PlayState(enum.Enum):
    IDLE = "idle"               # no play stream open at VAIC
    PLAYING = "playing"         # a stream is open, audio for it may be pending
    STOPPING = "stopping"       # its audio is all sent; the stop waits for the clock


# (state, event) -> next state. Anything else is an IllegalTransition.
PHASE_TRANSITIONS: dict[tuple[Phase, str], Phase] = {
    (Phase.INITIATING, "accept"): Phase.ACTIVE,
    (Phase.INITIATING, "decline"): Phase.ENDING,
    (Phase.INITIATING, "vaic_lost"): Phase.ENDED,
    (Phase.INITIATING, "timeout"): Phase.ENDED,
    (Phase.ACTIVE, "hangup"): Phase.ENDING,
    (Phase.ACTIVE, "session_end"): Phase.ENDED,
    (Phase.ACTIVE, "vaic_lost"): Phase.ENDED,
    (Phase.ACTIVE, "grace_expired"): Phase.ENDED,     # a dropped VAIC never resumed
    (Phase.ENDING, "session_end"): Phase.ENDED,
    (Phase.ENDING, "vaic_lost"): Phase.ENDED,
    (Phase.ENDING, "timeout"): Phase.ENDED,
}
UPSTREAM_TRANSITIONS: dict[tuple[Upstream, str], Upstream] = {
    (Upstream.IDLE, "dial"): Upstream.DIALLING,
    (Upstream.LOST, "dial"): Upstream.DIALLING,       # a new socket for the same call
    (Upstream.DIALLING, "connected"): Upstream.CONFIGURING,
    (Upstream.DIALLING, "failed"): Upstream.LOST,
    (Upstream.DIALLING, "retry"): Upstream.BACKOFF,   # a retryable failure: wait, dial again
    (Upstream.BACKOFF, "dial"): Upstream.DIALLING,
    (Upstream.BACKOFF, "lost"): Upstream.LOST,        # the call ended while waiting
    (Upstream.CONFIGURING, "session_ready"): Upstream.READY,
    (Upstream.CONFIGURING, "lost"): Upstream.LOST,
    (Upstream.READY, "lost"): Upstream.LOST,
    (Upstream.DIALLING, "lost"): Upstream.LOST,       # the call ended while dialling
}


class IllegalTransition(RuntimeError):
    """An event the state tables do not allow: a bug, ends the call as internal_error."""


class CallCounters(msgspec.Struct):
    frames_up: int = 0            # userStream.chunk received from VAIC
    frames_down: int = 0          # playStream.chunk sent to VAIC
    deltas: int = 0               # response.output_audio.delta received from OpenAI
    early_buffered: int = 0       # caller frames held until the OpenAI session was ready
    early_dropped: int = 0        # ... dropped because that buffer was full
    late_deltas_dropped: int = 0  # deltas of a response cancelled by barge-in
    playout_refused: int = 0      # chunks refused by the full playout queue
    barge_ins: int = 0
    truncates: int = 0
    openai_errors: int = 0
    bad_frames_in: int = 0
    play_streams: int = 0


# VAIC socket ended, by EndpointClosed.cause (None: VAIC closed it) -> call.end reason
VAIC_END_REASONS = {None: "vaic_closed", "closed": "vaic_closed",
                    "frame_too_big": "vaic_frame_too_big", "protocol_error": "vaic_protocol_error",
                    "keepalive_timeout": "vaic_keepalive_timeout", "shutdown": "server_shutdown",
                    "send_buffer_full": "vaic_not_reading", "send_timeout": "vaic_not_reading"}

# VAIC socket losses after which VAIC may come back with session.resume: it closed or dropped
# the connection, or it went silent (no pong, not reading): a network blip looks like these
RESUMABLE_CAUSES = (None, "keepalive_timeout", "send_timeout", "send_buffer_full")

# what openai_frame() reports to the shell (for the forward-latency histogram)
FORWARDED = 1      # a delta whose audio all went to VAIC at once (nothing left pending)


class CallSession:
    """One call's logic. See the module docstring for the contract."""

    def __init__(self, cfg: Config, secrets: Secrets, stats: Stats, now_ns: int,
                 call_id: str = "", admit: Callable[[], bool] | None = None) -> None:
        """`admit()`, asked at `session.initiate`, says whether the daemon has room for one more
        call (calls waiting for a resume included); False declines it before any dial."""
        self.cfg = cfg
        self.secrets = secrets
        self.stats = stats
        self._admit = admit
        self.call_id = call_id
        self.to_vaic: list[str] = []
        self.to_openai: list[str] = []
        self.effects: list[Effect] = []
        self.marks: list[tuple[Histogram, int]] = []
        self.proto = ac.AcProtocol(self.to_vaic)
        self.counters = CallCounters()
        # the profile: chosen by bot name at session.initiate, final at the `start` activity
        self.profiles = pf.for_config(cfg)
        self.profile = self.profiles["default"]
        self.profile_final = False
        self.oai = cfg.openai            # the call's OpenAI settings (profiles.openai_settings)
        self.control = CallControl(self)
        self._bot = ""
        self._start_params: dict[str, Any] = {}
        self._profile_sent = ""          # the profile whose settings the OpenAI session has
        self._audio_out = False          # the current OpenAI session has produced audio
        self.stream_reports: deque[float] = deque(maxlen=8)  # ms heard per stopped stream
        self.play_clock_diffs = 0
        self._stream_ms = 0.0
        self._barge_in_off_seen = False
        self._stopped_while_playing = False
        self._fallback_transfer = False
        self.phase = Phase.INITIATING
        self.upstream = Upstream.IDLE
        # audio may go to OpenAI (upstream CONFIGURING or READY): kept by `_up`, read per frame
        self.up_ready = False
        self._idle_ns = int(cfg.call.idle_timeout_s * NS)
        self.started_ns = now_ns
        self.end_reason = ""
        self.end_detail = ""
        self.format = ""
        self.caller = ""
        self.callee = ""
        self.openai_session_id = ""     # the current one (session.created), for call.end
        self.openai_sessions = 0        # sessions created for this call (reconnects, rotations)
        self.last_truncate: tuple[str, int] | None = None
        self.openai_connect_ms: float | None = None
        self.active_response: str | None = None
        self.cancelled: set[str] = set()
        self.playout = Playout(cfg.audio.playout_lead_ms, cfg.audio.max_pending_audio_ms,
                               cfg.audio.vaic_stop_policy, cfg.audio.stop_margin_ms)
        self._neg: Negotiated | None = None
        self._tc: Transcoder | None = None
        self._app_prefix, self._app_suffix = rt.append_template()
        self._early: deque[str] = deque()
        self._early_ms = 0.0
        self._start_seen = False
        self._greeted = False
        self._session_seen = 0          # bits: 1 session.created, 2 session.updated
        self._logged = OnceKeys()
        self._item_oai_ms: dict[str, float] = {}
        # after a barge-in the model's items must keep only what the caller heard: items whose
        # audio is complete (audio.done), and items already truncated (each once), both bounded
        self._items_done: set[str] = set()
        self._items_truncated: set[str] = set()
        self._last_pushed_item = ""
        self._piece_chars = 0
        self._max_frame_chars = 0
        self._wav_header_ms = 0.0
        self._last_response = ""
        self._t_speech_stop_ns = 0
        self._t_first_delta_ns = 0
        self._t_dial_ns = 0
        self._last_audio_ns = now_ns
        # deadlines (ns; 0 = none)
        self._initiate_deadline = now_ns + int(cfg.call.initiate_timeout_s * NS)
        self._greet_deadline = 0
        self._session_deadline = 0
        self._close_deadline = 0       # ENDING: give VAIC this long, then close it ourselves
        self.vaic_gone = False         # between vaic_detached and vaic_attached
        self._resume_deadline = 0      # a dropped VAIC socket may resume until then
        self._detached_ns = 0
        # the OpenAI side across sockets: retries, reconnects, rotation, re-seeding
        self._dial_attempt = 0
        self._dial_budget_end = 0
        self._redial_at = 0
        self._reconnects = 0
        self._replacing = ""           # why the session is being replaced ("" for the first)
        self._lost_ns = 0
        self._rotate_at = 0
        self._speaking = False
        self._turns: deque[tuple[str, str]] = deque(maxlen=MAX_TURNS)
        self._retried_turn = False

    # ================================================================== small helpers
    def _log(self, level: str, event: str, **fields: Any) -> None:
        self.effects.append(Log(level, event, fields))

    def _log_once(self, key: str, event: str, **kw: Any) -> None:
        if self._logged.hit(key) == 1:
            self._log("info", event, **kw)

    def _log_first_n(self, key: str, event: str, level: str = "warning", **kw: Any) -> None:
        """The first `_LOG_FIRST_N` occurrences per key and call (bad input can repeat per frame);
        the keys are bounded (`bounds.OnceKeys`)."""
        n = self._logged.hit(key)
        if 0 < n <= _LOG_FIRST_N:
            self._log(level, event, nth=n, **kw)

    def _set_end(self, reason: str, detail: str = "") -> None:
        if not self.end_reason:
            self.end_reason, self.end_detail = reason, detail

    def _go(self, event: str) -> None:
        nxt = PHASE_TRANSITIONS.get((self.phase, event))
        if nxt is None:
            raise IllegalTransition(f"call phase {self.phase.value} has no '{event}'")
        self.phase = nxt

    def _up(self, event: str) -> None:
        nxt = UPSTREAM_TRANSITIONS.get((self.upstream, event))
        if nxt is None:
            raise IllegalTransition(f"upstream {self.upstream.value} has no '{event}'")
        self.upstream = nxt
        self.up_ready = nxt is Upstream.CONFIGURING or nxt is Upstream.READY

    @property
    def _vaic_ok(self) -> bool:
        """Frames for VAIC make sense: the call is active and has a VAIC socket."""
        return self.phase is Phase.ACTIVE and not self.vaic_gone

    def playout_state(self) -> PlayState:
        po = self.playout
        if po.open_item is None:
            return PlayState.IDLE
        if any(e.kind == CHUNK and e.item_id == po.open_item for e in po.pending):
            return PlayState.PLAYING
        return PlayState.STOPPING if po.play_end_t > 0 else PlayState.PLAYING

    def abandon(self, reason: str, detail: str) -> None:
        """The shell stops without the call having ended (a bug in the shell): end it now."""
        if self.phase is not Phase.ENDED:
            self._set_end(reason, detail)
            self.phase = Phase.ENDED      # the escape hatch; not a table transition
            self._end_now()

    def shutdown(self, now_ns: int) -> None:
        """The daemon is stopping and the drain is over: hang up politely (VAIC gets a hangup
        activity, the OpenAI socket is closed); a call not yet initiated just ends."""
        try:
            if self.phase is Phase.ACTIVE:
                self._set_end("server_shutdown", "the bridge is stopping (drain over)")
                self._log("info", "call.shutdown_hangup")
                self._hang_up("server_shutdown", "the bridge is stopping", now_ns)
            elif self.phase is Phase.INITIATING:
                self._set_end("server_shutdown", "the bridge is stopping")
                self._go("timeout")
                self._end_now()
        except Exception as e:
            self._internal_error(e, now_ns)

    def internal_error(self, e: Exception, now_ns: int) -> None:
        """A bug (in the shell or here): log it, hang up with a reason, end the call."""
        self._internal_error(e, now_ns)

    def _internal_error(self, e: Exception, now_ns: int) -> None:
        self._log("error", "call.internal_error", error_type=type(e).__name__, error=clip(str(e)))
        if self.phase is Phase.ENDED:
            return
        self._set_end("internal_error", clip(f"{type(e).__name__}: {e}"))
        try:
            self._hang_up("internal_error", self.end_detail, now_ns)
        except Exception:      # the state itself is broken: just stop
            self.phase = Phase.ENDED
            self._finish()
        if self.phase is Phase.INITIATING:
            self.phase = Phase.ENDED
            self._finish()

    # ================================================================== VAIC side
    def vaic_frame(self, frame: str | bytes, now_ns: int) -> str | None:
        """One frame from VAIC. Returns the OpenAI frame of a caller chunk to send at once (the
        hot path); everything else goes to `to_vaic` / `to_openai` / `effects`."""
        try:
            ev = self.proto.receive(frame)
            if type(ev) is ac.UserStreamChunk:
                return self._caller_audio(ev.audioChunk, now_ns)
            self._vaic_control(ev, now_ns)
        except Exception as e:   # a bug must end the call cleanly, never hang it
            self._internal_error(e, now_ns)
        return None

    def _caller_audio(self, payload: str, now_ns: int) -> str | None:
        c = self.counters
        c.frames_up += 1
        if not payload:          # nothing to forward (an empty append is of no use)
            return None
        if not is_b64(payload):  # never into the JSON template: no injection upstream
            self._bad_audio("audioChunk is not base64")
            return None
        if len(payload) > self._max_frame_chars:  # bounded decoding cost per frame
            self._bad_audio(f"audioChunk longer than audio.max_frame_ms "
                            f"({self.cfg.audio.max_frame_ms} ms)")
            return None
        self._last_audio_ns = now_ns
        tc = self._tc
        if tc is not None:
            try:
                payload = tc.up(payload)
            except ValueError as e:  # binascii.Error: not decodable
                self._bad_audio(clip(f"audioChunk does not decode: {e}", 120))
                return None
            if not payload:
                return None
        if self.up_ready:
            st = self.stats
            st.frames_up += 1
            st.bytes_up += b64_decoded_len(payload)
            return self._app_prefix + payload + self._app_suffix
        self._buffer_early(payload)
        return None

    def caller_audio_unsent(self, frame: str) -> None:
        """The OpenAI socket refused the append `vaic_frame` returned (it is closing): keep the
        audio for the next session, in order, as during any gap."""
        payload = frame[len(self._app_prefix):len(frame) - len(self._app_suffix)]
        self.stats.frames_up -= 1
        self.stats.bytes_up -= b64_decoded_len(payload)
        if self.oai.reconnect and self.phase is Phase.ACTIVE and self._neg is not None:
            self._buffer_early(payload)

    def _bad_audio(self, reason: str) -> None:
        self.counters.bad_frames_in += 1
        self._log_first_n("bad_audio", "call.bad_audio_chunk", reason=reason)

    def _buffer_early(self, payload: str) -> None:
        assert self._neg is not None
        bpm = self._neg.openai_bytes_per_ms
        self._early.append(payload)
        self._early_ms += ms_of_b64(payload, bpm)
        self.counters.early_buffered += 1
        while self._early_ms > self.cfg.audio.early_audio_max_ms and len(self._early) > 1:
            self._early_ms -= ms_of_b64(self._early.popleft(), bpm)
            self.counters.early_dropped += 1

    def _vaic_control(self, ev: Any, now_ns: int) -> None:
        t = type(ev)
        if t is ac.SessionInitiate:
            self._begin(ev, now_ns)
        elif t is ac.SessionResume:
            self.call_id = clip(ev.conversationId, ID_CHARS)
            self.effects.append(Resume(self.call_id))
        elif t is ac.Validate:   # answered by the protocol; a socket for it carries no call
            if self.phase is Phase.INITIATING:
                self._set_end("validate", "connection.validate answered")
                self._log("info", "call.validate")
        elif t is ac.Rejected:
            self._set_end("rejected", ev.reason)
            self.stats.calls_rejected += 1
            self._log("warning", "call.rejected", reason=clip(ev.reason))
            self._decline_close(now_ns)
        elif t is ac.SessionEnd:
            self._set_end("transferred" if ev.reasonCode == "transferred" else "vaic_session_end",
                          f"{clip(ev.reasonCode, ID_CHARS)} {clip(ev.reason)}".strip())
            self._log("info", "call.session_end", reason_code=clip(ev.reasonCode, ID_CHARS),
                      reason=clip(ev.reason))
            self._go("session_end")
            self._end_now()
        elif t is ac.Activities:
            for act in ev.activities:
                self._activity(act, now_ns)
        elif t is ac.UserStreamStop:
            if self.playout.open_item is not None:
                self._stopped_while_playing = True   # barge-in off, or the caller hanging up
            if self._tc is not None and self.up_ready:
                tail = self._tc.flush_up()  # the resampler's tail of the caller's last words
                if tail:
                    self.to_openai.append(self._app_prefix + tail + self._app_suffix)
        elif t is ac.UserStreamStart:
            # stopped while the bot played, reopened after it: VAIC's barge-in is off (a
            # caller hanging up also stops the stream, but never reopens it)
            if self._stopped_while_playing and not self._barge_in_off_seen:
                self._barge_in_off_seen = True
                self.stats.vaic_barge_in_off += 1
                self._log("warning", "call.vaic_barge_in_off",
                          hint="VAIC stopped the caller stream while the bot was playing and reopened "
                               "it afterwards: barge-in is off on the bot connection, so the model "
                               "cannot hear interruptions; enable it in VoiceAI Connect")
            self._stopped_while_playing = False
        elif t is ac.UnknownMessage:
            self._log_once(f"unknown:{ev.type}", "call.unknown_message", type=clip(ev.type, ID_CHARS))
        elif t is ac.Malformed:
            self.counters.bad_frames_in += 1
            self._log_first_n("malformed", "call.malformed_frame", reason=ev.reason)
        elif t is ac.Ignored:
            if ev.type != "userStream.chunk":  # audio while ending: expected
                self._log_first_n("ignored", "call.message_ignored", type=clip(ev.type, ID_CHARS),
                                  reason=clip(ev.reason))

    def _begin(self, init: ac.SessionInitiate, now_ns: int) -> None:
        self.call_id = self.call_id or clip(init.conversationId, ID_CHARS)
        self.caller = clip(init.caller, ID_CHARS)
        self._bot = clip(init.botName, ID_CHARS)
        self._use_profile(pf.select(self.profiles, "", self._bot))
        offered = init.supportedMediaFormats
        if not init.expectAudioMessages:
            return self._decline("expectAudioMessages is false: this bot answers with audio "
                                 "(enable directTTS on the bot in VoiceAI Connect)", offered, now_ns)
        try:
            neg = negotiate(offered, self.cfg.audio.format_preference)
        except NoCommonFormat as e:
            return self._decline(str(e), offered, now_ns)
        if self._admit is not None and not self._admit():
            self.stats.calls_refused += 1
            return self._decline("at capacity (server.max_calls)", offered, now_ns)
        a = self.cfg.audio
        self._neg = neg
        self._tc = make_transcoder(neg)
        self.format = neg.ac.name
        self._piece_chars = piece_chars(a.max_chunk_ms, neg.ac.bytes_per_ms)
        self._max_frame_chars = (a.max_frame_ms * neg.ac.bytes_per_ms + 2) // 3 * 4
        if neg.ac.container == "wav" and WAV_HEADER_ON_PLAY_START:
            self._wav_header_ms = len(wav_header(neg.ac)) / neg.ac.bytes_per_ms
        # Dial OpenAI at once, in parallel with answering VAIC.
        self._dial(now_ns)
        self.proto.accept(neg.ac.name)
        self._go("accept")
        self._last_audio_ns = now_ns
        self.marks.append((self.stats.call_setup, now_ns))   # initiate -> accepted sent
        self.stats.calls_total += 1
        self.control.started(now_ns)
        self._log("info", "call.start", conversation_id=self.call_id, caller=self._number(self.caller),
                  bot=clip(init.botName, ID_CHARS), offered=clip_list(offered), format=neg.ac.name,
                  openai_format=neg.openai_format["type"], passthrough=neg.passthrough,
                  profile=self.profile.name)
        return None

    def _use_profile(self, p: pf.CallProfile) -> None:
        self.profile = p
        self.oai = pf.openai_settings(self.cfg.openai, p, p.instructions)

    def render(self, template: str) -> str:
        """A profile text with its placeholders filled from this call."""
        return pf.render(template, {"caller": self.caller, "callee": self.callee, "bot": self._bot,
                                    "conversation_id": self.call_id, "profile": self.profile.name},
                         self._start_params)

    def is_active(self) -> bool:
        return self.phase is Phase.ACTIVE and not self.vaic_gone

    def _number(self, number: str) -> str:
        """A caller/callee number as logged: masked when `log.mask_numbers`, keeping the first
        characters (at most 5, at most a third) and the last two (at most a quarter)."""
        if not self.cfg.log.mask_numbers or not number:
            return number
        keep_head = min(5, len(number) // 3)
        keep_tail = min(2, len(number) // 4)
        return number[:keep_head] + "*" * (len(number) - keep_head - keep_tail) + number[len(number) - keep_tail:]

    def _decline(self, reason: str, offered: list[str], now_ns: int) -> None:
        self.stats.calls_rejected += 1
        self.proto.reject(clip(reason))
        self._set_end("declined", reason)
        self._log("warning", "call.declined", reason=clip(reason), offered=clip_list(offered))
        self._decline_close(now_ns)

    def _decline_close(self, now_ns: int) -> None:
        """After session.error VAIC disconnects; give it a moment, then close ourselves."""
        if self.phase is Phase.INITIATING:
            self._go("decline")
        self._close_deadline = now_ns + _DECLINE_CLOSE_NS

    def _activity(self, act: ac.Activity, now_ns: int) -> None:
        name = clip(act.name, ID_CHARS).lower()
        if name == "start":
            params = act.parameters or {}
            self.callee = clip(params.get("callee"), ID_CHARS)
            self.caller = clip(params.get("caller"), ID_CHARS) or self.caller
            self._start_params = {clip(k, ID_CHARS): v for k, v in list(params.items())[:32]
                                  if isinstance(k, str)}
            if self._start_seen:
                return
            self._start_seen = True
            was = self.profile.name
            self._use_profile(pf.select(self.profiles, self.callee, self._bot))
            self.profile_final = True
            self.control.profile_chosen()
            self._log("info", "call.start_activity", callee=self._number(self.callee),
                      caller=self._number(self.caller), profile=self.profile.name,
                      profile_changed=self.profile.name != was)
            if self.up_ready:
                self._after_start()
        elif self.control.activity(name, act.value, now_ns):
            pass
        else:
            self._log_once(f"activity:{name}", "call.activity_ignored", name=name)

    def vaic_lost(self, code: int | None, cause: str | None, now_ns: int) -> None:
        """The VAIC socket ended. Dropped by VAIC without `session.end` during a call (not by
        our own doing): the call waits `call.resume_grace_s` for a `session.resume`, keeping
        its OpenAI session. Otherwise the call ends."""
        if self.phase is Phase.ENDED:
            return
        grace_s = self.cfg.call.resume_grace_s
        if (self.phase is Phase.ACTIVE and cause in RESUMABLE_CAUSES and grace_s > 0
                and not self.vaic_gone and not self.end_reason):
            self.vaic_detached(now_ns)
            self._detached_ns = now_ns
            self._resume_deadline = now_ns + int(grace_s * NS)
            self._log("warning", "call.vaic_detached", code=code, resume_grace_s=grace_s)
            return
        self._set_end(VAIC_END_REASONS.get(cause, "vaic_closed"), f"code={code}")
        self._go("vaic_lost")
        self._end_now()

    def vaic_detached(self, now_ns: int) -> None:
        """The VAIC socket is gone but the call is kept (a new one will be attached): the prompt
        that was playing is truncated at what was heard (its response cancelled), pending audio
        dropped; nothing is produced for VAIC until `vaic_attached`."""
        self.vaic_gone = True
        if self.active_response is not None:
            self.cancelled.add(self.active_response)
            if self.up_ready:
                self.to_openai.append(rt.response_cancel())
        self._interrupt(now_ns, speech=False)
        self.to_vaic.clear()       # no socket to send them on; the stream is over

    def vaic_attached(self, now_ns: int) -> None:
        """A new VAIC socket carries this call: it is accepted again (for a `session.resume`),
        and playout starts afresh with the next item."""
        try:
            self.vaic_gone = False
            self._last_audio_ns = now_ns
            if self._resume_deadline:
                self._resume_deadline = 0
                self.proto.resumed()
                self._log("info", "call.resumed", gap_ms=round((now_ns - self._detached_ns) / 1e6, 1))
            self._pump(now_ns, False)
            self.control.check(now_ns)   # what waited for a VAIC socket (a hang-up, an owed response)
        except Exception as e:
            self._internal_error(e, now_ns)

    def resume_refused(self, now_ns: int) -> None:
        """This socket's `session.resume` names no call waiting for one."""
        self.proto.refuse_resume()
        self.stats.calls_rejected += 1
        self._set_end("rejected", "session.resume for a conversation this bridge does not hold")
        self._log("warning", "call.resume_refused", conversation_id=self.call_id)
        self._decline_close(now_ns)

    def resume_handed_over(self) -> None:
        """This socket now carries another call (its `session.resume` was accepted there):
        nothing of this session remains, and it is not a call of its own."""
        self.end_reason = "handed_over"
        self.phase = Phase.ENDED          # not a call: no table transition, no call.end
        self.effects.append(Finished("handed_over"))

    # ================================================================== OpenAI side
    def _dial(self, now_ns: int) -> None:
        """The first attempt of a (re)connect: its retries share `openai.connect_budget_s`."""
        self._dial_attempt = 0
        self._dial_budget_end = now_ns + int(self.oai.connect_budget_s * NS)
        self._dial_now(now_ns)

    def _dial_now(self, now_ns: int) -> None:
        self._up("dial")
        self._dial_attempt += 1
        self._t_dial_ns = now_ns
        url, headers = rt.target(self.oai, self.secrets)
        self.effects.append(Dial(url, headers))

    def openai_swap(self, now_ns: int) -> None:
        """The shell replaces the OpenAI socket with one it already holds: the old one counts
        as lost (without ending the call), the new one as dialled; `openai_connected` follows
        and re-seeds the conversation."""
        if self.upstream is not Upstream.LOST:
            self._up("lost")
        self._forget_session(now_ns, "swap")
        self._up("dial")          # the shell holds the new socket already: no Dial effect
        self._dial_attempt = 1
        self._t_dial_ns = now_ns

    def openai_connect_failed(self, reason: str, now_ns: int, status: int | None = None,
                              retry_after_s: float | None = None) -> None:
        """A dial failed. Network errors, 5xx and 429 are retried with back-off (a 429's
        Retry-After honoured) while `openai.connect_budget_s` lasts; 4xx others are not."""
        if self.upstream is not Upstream.DIALLING:
            return
        self.stats.note_dial(False, now_ns)
        if self.phase is Phase.ACTIVE and (status is None or status >= 500 or status == 429):
            n = self._dial_attempt
            wait = BACKOFF_NS[min(n - 1, len(BACKOFF_NS) - 1)]
            if status == 429 and retry_after_s is not None:
                wait = int(retry_after_s * NS)
            if now_ns + wait < self._dial_budget_end:
                self._up("retry")
                self._redial_at = now_ns + wait
                self._log("warning", "call.openai_retry", attempt=n, status=status,
                          wait_ms=wait // 1_000_000, reason=clip(reason))
                return
        self._up("failed")
        n = self._dial_attempt
        self._fail("openai_connect_failed", reason if n == 1 else f"{reason} (after {n} attempts)",
                   now_ns)

    def openai_connected(self, now_ns: int) -> None:
        """The OpenAI socket is open: configure it and flush what the caller said meanwhile."""
        self.stats.note_dial(True, now_ns)
        try:
            self._up("connected")
            connect_us = (now_ns - self._t_dial_ns) // 1000
            self.stats.openai_connect.record(connect_us)
            self.openai_connect_ms = round(connect_us / 1000, 1)
            self._session_seen = 0
            self._session_deadline = now_ns + int(self.oai.session_timeout_s * NS)
            self._rotate_at = now_ns + int(self.oai.rotate_after_s * NS)
            neg = self._neg
            assert neg is not None
            out = self.to_openai
            out.append(rt.session_update(self.oai, neg.openai_format, neg.openai_format,
                                         self._instructions(),
                                         pf.tool_definitions(self.profile, self.secrets.mcp_tokens)))
            self._profile_sent = self.profile.name if self._start_seen else ""
            replacing, self._replacing = self._replacing, ""
            if replacing:     # the conversation so far, as text, before any new audio
                for role, text in self._turns:
                    out.append(rt.conversation_item(role, text))
                self._log("info", "call.openai_rotated" if replacing == "rotation"
                          else "call.openai_reconnected",
                          gap_ms=round((now_ns - self._lost_ns) / 1e6, 1),
                          attempts=self._dial_attempt, reseeded_items=len(self._turns),
                          early_frames=len(self._early), why=replacing)
            prefix, suffix = self._app_prefix, self._app_suffix
            st = self.stats
            while self._early:  # forwarded in order, not timed: they waited for the connect
                payload = self._early.popleft()
                out.append(prefix + payload + suffix)
                st.frames_up += 1
                st.bytes_up += b64_decoded_len(payload)
            self._early_ms = 0.0
            if not replacing:
                self._log("info", "call.upstream_ready", connect_ms=self.openai_connect_ms,
                          early_frames=self.counters.early_buffered)
            if self._start_seen and not replacing:
                self._after_start()
            elif not self._greeted and not self._start_seen:
                self._greet_deadline = now_ns + self.cfg.call.start_wait_ms * 1_000_000
        except Exception as e:
            self._internal_error(e, now_ns)

    def openai_lost(self, code: int | None, cause: str | None, reason: str, now_ns: int) -> None:
        """The OpenAI socket ended without our asking: a new session continues the call
        (`openai.reconnect`), or the call ends."""
        was = self.upstream
        if was in (Upstream.CONFIGURING, Upstream.READY, Upstream.DIALLING):
            self._up("lost")
        if self.phase is not Phase.ACTIVE:
            return
        how = f" ({cause.replace('_', ' ')})" if cause else ""
        detail = f"code={code}{how} reason={clip(reason, ID_CHARS)}"
        if self.oai.reconnect and was in (Upstream.CONFIGURING, Upstream.READY):
            self._reconnect(now_ns, "lost", detail)
        else:
            self._fail("openai_closed", detail, now_ns)

    def _replace_session(self, now_ns: int, why: str, detail: str) -> None:
        """Close the current OpenAI socket on purpose and continue on a new one."""
        if self.upstream in (Upstream.CONFIGURING, Upstream.READY):
            self._up("lost")
            self.effects.append(CloseOpenAI(1000, why))
        self._reconnect(now_ns, why, detail)

    def _reconnect(self, now_ns: int, why: str, detail: str) -> None:
        if why != "rotation":             # planned replacements do not use up the budget
            self._reconnects += 1
            self.stats.openai_reconnects += 1
        else:
            self.stats.openai_rotations += 1
        if self._reconnects > MAX_RECONNECTS:
            self._fail("openai_closed", f"{detail} (after {MAX_RECONNECTS} reconnects)", now_ns)
            return
        if why != "rotation":
            self._log("warning", "call.openai_lost", why=why, detail=clip(detail),
                      reconnect=self._reconnects)
        self._forget_session(now_ns, why)
        self._dial(now_ns)

    def _forget_session(self, now_ns: int, why: str) -> None:
        """What belonged to the OpenAI session being replaced: its response, its items."""
        self._replacing = why
        self._lost_ns = now_ns
        self.active_response = None      # that session's response is gone with it
        self.cancelled.clear()
        item = self._last_pushed_item or self.playout.open_item
        if item:   # its audio.done will never come: end the item after what was received
            if self._tc is not None:
                self._push_audio(item, self._tc.flush_down(), False)
            self.playout.push_end(item)
            self._last_pushed_item = ""
        self._session_deadline = self._rotate_at = 0
        self._audio_out = False
        self._profile_sent = ""
        self.control.session_lost()
        self._item_oai_ms.clear()        # its items cannot be truncated in the new session
        self._items_done.clear()
        self._items_truncated.clear()

    def _instructions(self) -> str:
        return self.render(self.profile.instructions)

    def _after_start(self) -> None:
        """The `start` activity chose the final profile: if the session was configured for
        another one, or before the callee was known, send its settings before any response."""
        if self._profile_sent != self.profile.name:
            self.to_openai.append(rt.profile_update(
                self.oai, self._instructions(), pf.tool_definitions(self.profile, self.secrets.mcp_tokens),
                voice=not self._audio_out))
            self._profile_sent = self.profile.name
        self._greet()

    def _greet(self) -> None:
        self._greet_deadline = 0
        self.profile_final = True          # start seen, or the wait for it is over
        greeting = self.profile.greeting
        if self._greeted or not greeting or not self.up_ready:
            return
        self._greeted = True
        if self.active_response is not None or self.control.response_requested:
            return                             # the caller spoke (or keyed) first: being answered
        self.to_openai.append(rt.response_create(self.render(greeting)))
        self.control.requested()

    def openai_frame(self, frame: str | bytes, now_ns: int) -> int:
        """One frame from OpenAI. Returns FORWARDED for a delta whose audio all went to VAIC
        at once (the shell then records the down forward latency), else 0. A FORWARDED delta
        never moves `next_deadline_ns()` earlier: nothing is pending, and the idle deadline only
        moves later; so a shell whose timer is armed may skip re-arming it, when the delta
        queued nothing but `to_vaic` (tests/sim_driver.py checks this on every timeline)."""
        try:
            ev = rt.decode_server(frame)
            if type(ev) is rt.AudioDelta:
                self._audio_out = True
                if ev.response_id != self._last_response:
                    self._first_delta_of_response(ev.response_id, now_ns)
                if self._on_delta(ev):
                    self._pump(now_ns, False)
                    if not self.playout.pending:
                        return FORWARDED
                return 0
            self._openai_event(ev, now_ns)
        except Exception as e:
            self._internal_error(e, now_ns)
        return 0

    def _first_delta_of_response(self, response_id: str, now_ns: int) -> None:
        self._last_response = response_id
        self._t_first_delta_ns = now_ns
        if self._t_speech_stop_ns:
            self.stats.model_ttfa.record((now_ns - self._t_speech_stop_ns) // 1000)
            self._t_speech_stop_ns = 0

    def _on_delta(self, ev: rt.AudioDelta) -> bool:
        """Queue one delta's audio for playout; False when nothing was queued (dropped)."""
        c = self.counters
        c.deltas += 1
        if ev.response_id in self.cancelled or self.phase is not _ACTIVE:
            c.late_deltas_dropped += 1
            if self.phase is _ACTIVE:   # a late item the caller never heard a bit of
                self._truncate_unheard(clip(ev.item_id, ID_CHARS))
            return False
        neg = self._neg
        assert neg is not None
        if not is_b64(ev.delta):  # never into the chunk template: no injection towards VAIC
            self._log_first_n("oai_bad_audio", "call.openai_bad_audio", reason="delta is not base64")
            return False
        delta_ms = ms_of_b64(ev.delta, neg.openai_bytes_per_ms)
        if delta_ms > self.cfg.audio.max_delta_ms:
            self._log_first_n("oai_bad_audio", "call.openai_bad_audio",
                              reason=f"delta longer than audio.max_delta_ms ({self.cfg.audio.max_delta_ms} ms)")
            return False
        item = clip(ev.item_id, ID_CHARS)
        oai_ms = self._item_oai_ms
        if item not in oai_ms and len(oai_ms) >= 8:
            oai_ms.clear()  # bounded: only the last few items can still be truncated
        oai_ms[item] = oai_ms.get(item, 0.0) + delta_ms
        first = item != self._last_pushed_item
        self._last_pushed_item = item
        payload = ev.delta
        if self._tc is not None:
            try:
                payload = self._tc.down(payload, first_of_stream=first)
            except ValueError as e:
                self._log_first_n("oai_bad_audio", "call.openai_bad_audio", reason=clip(str(e), 120))
                return False
        return self._push_audio(item, payload, first)

    def _push_audio(self, item: str, payload: str, first: bool) -> bool:
        """Queue AudioCodes-format audio for playout, in pieces of at most `max_chunk_ms`."""
        if not payload:
            return False
        neg = self._neg
        assert neg is not None
        bpm = neg.ac.bytes_per_ms
        header_ms = self._wav_header_ms if first else 0.0
        for piece in split_b64(payload, self._piece_chars):
            if not self.playout.push_chunk(item, piece, ms_of_b64(piece, bpm) - header_ms):
                self.counters.playout_refused += 1
            header_ms = 0.0
        return True

    def _openai_event(self, ev: Any, now_ns: int) -> None:
        t = type(ev)
        if t is rt.SpeechStartedEv:
            self._speaking = True
            self.control.caller_spoke()
            self._barge_in(now_ns)
        elif t is rt.AudioDone:
            if ev.response_id not in self.cancelled and self.phase is Phase.ACTIVE:
                item = clip(ev.item_id, ID_CHARS)
                if self._tc is not None:  # the resampler's tail belongs to this item
                    self._push_audio(item, self._tc.flush_down(), False)
                self.playout.push_end(item)
                _bounded_add(self._items_done, item)
                self._pump(now_ns, False)
        elif t is rt.ResponseCreated:
            self.active_response = clip(ev.response.id, ID_CHARS)
            self.control.response_created(self.active_response)
        elif t is rt.ResponseDone:
            rid = clip(ev.response.id, ID_CHARS)
            if rid == self.active_response:
                self.active_response = None
            was_cancelled = rid in self.cancelled
            self.cancelled.discard(rid)
            status = ev.response.status
            if status == "failed":
                self._response_failed(rid, ev.response.status_details, now_ns)
            elif status == "completed":
                self._retried_turn = False
            if self.phase is Phase.ACTIVE:
                self.control.response_done(rid, "cancelled" if was_cancelled else status,
                                           ev.response.usage, now_ns)
        elif t is rt.FunctionCallDone:
            if self.phase is Phase.ACTIVE:
                self.control.function_call(ev, now_ns)
        elif t is rt.OutputItemDone:
            item = ev.item
            if item.get("type") == "mcp_call":
                err = item.get("error")
                server = clip(item.get("server_label"), ID_CHARS)
                self._log("warning" if err else "info", "call.mcp_call", server=server,
                          tool=clip(item.get("name"), ID_CHARS), ok=not err,
                          error=clip(str(err), 200) if err else None)
                self.stats.count_tool(f"mcp:{server}", "error" if err else "ok")
                if self.phase is Phase.ACTIVE:   # done, whatever its status: no longer running
                    self.control.mcp_ended(clip(item.get("id"), ID_CHARS), now_ns)
        elif t is rt.McpCallInProgress:
            self.control.mcp_started(clip(ev.item_id, ID_CHARS))
        elif t is rt.McpCallCompleted:
            if self.phase is Phase.ACTIVE:
                self.control.mcp_ended(clip(ev.item_id, ID_CHARS), now_ns)
        elif t is rt.McpCallFailed or t is rt.McpListToolsFailed:
            self._log("warning", "call.mcp_failed", what=ev.__struct_config__.tag,
                      item_id=clip(ev.item_id, ID_CHARS))
            if t is rt.McpCallFailed and self.phase is Phase.ACTIVE:
                self.control.mcp_ended(clip(ev.item_id, ID_CHARS), now_ns)
        elif t is rt.SpeechStoppedEv:
            self._speaking = False
            self._retried_turn = False
            self._t_speech_stop_ns = now_ns
            if self._vaic_ok:
                self.proto.speech_stopped()
        elif t is rt.Committed:
            if self._vaic_ok:
                self.proto.speech_committed()
        elif t is rt.InputTranscriptCompleted:
            if ev.transcript and self.phase is Phase.ACTIVE:
                text = clip(ev.transcript, TURN_CHARS)
                if self._vaic_ok:
                    self.proto.recognition(text)
                self._turns.append(("user", text))
                self.effects.append(Transcript("caller", text, (now_ns - self.started_ns) // 1_000_000))
        elif t is rt.ErrorEvent:
            self._on_error(ev.error, now_ns)
        elif t is rt.SessionCreated:
            sid = ev.session.get("id")
            if isinstance(sid, str) and sid:
                self.openai_session_id = clip(sid, ID_CHARS)
                self.openai_sessions += 1
            self._session_event(1)
        elif t is rt.SessionUpdated:
            self._session_event(2)
            self._check_session(ev.session, now_ns)
        elif t is rt.Truncated:
            self._log("debug", "call.truncated", item_id=clip(ev.item_id, ID_CHARS),
                      audio_end_ms=ev.audio_end_ms)
        elif t is rt.TranscriptDone:
            self._log("debug", "call.assistant_said", item_id=clip(ev.item_id, ID_CHARS),
                      transcript=clip(ev.transcript))
            if ev.transcript and self.phase is Phase.ACTIVE:
                text = clip(ev.transcript, TURN_CHARS)
                self._turns.append(("assistant", text))
                self.effects.append(Transcript("agent", text, (now_ns - self.started_ns) // 1_000_000))
        elif t is rt.OtherEvent:
            self._log_once(f"oai:{clip(ev.type, ID_CHARS)}", "call.openai_unknown_event",
                           type=clip(ev.type, ID_CHARS))
        elif t is rt.BadEvent:
            self._log_first_n("oai_bad", "call.openai_bad_frame", reason=ev.reason)

    def _session_event(self, bit: int) -> None:
        self._session_seen |= bit
        if self._session_seen == 3 and self.upstream is Upstream.CONFIGURING:
            self._up("session_ready")
            self._session_deadline = 0

    def _on_error(self, err: rt.ErrorDetail, now_ns: int) -> None:
        self.counters.openai_errors += 1
        code = clip(err.code or "none", ID_CHARS)
        self.stats.count_error(code)
        kind = rt.classify_error(err.code)
        fields = dict(code=code, error_type=clip(err.type, ID_CHARS), message=clip(err.message),
                      param=clip(err.param, ID_CHARS), client_event_id=clip(err.event_id, ID_CHARS))
        if (err.code in rt.SESSION_ENDING_CODES and self.oai.reconnect
                and self.phase is Phase.ACTIVE):
            self._log("warning", "call.openai_error", **fields)
            self._replace_session(now_ns, err.code or "session_expired", f"{code}: {clip(err.message, 120)}")
        elif kind == "fatal":
            self._log("error", "call.openai_error_fatal", **fields)
            self._fail("openai_error", f"{code}: {clip(err.message, 120)}", now_ns,
                       token="session-expired" if err.code in rt.SESSION_ENDING_CODES else "")
        elif kind == "benign":
            self._log_first_n(f"oai_err:{code}", "call.openai_error_benign", "info", **fields)
        else:
            self._log_first_n(f"oai_err:{code}", "call.openai_error", **fields)
        if self.phase is Phase.ACTIVE:
            self.control.error_seen(now_ns)

    def _response_failed(self, rid: str, details: Any, now_ns: int) -> None:
        """`response.done` with status failed: never a silent turn. Transient: one retry of the
        turn's response; fatal (quota, key): the call ends."""
        err = details.get("error") if isinstance(details, dict) else None
        raw = (err.get("code") or err.get("type")) if isinstance(err, dict) else None
        code = clip(raw or "unknown", ID_CHARS)
        self.stats.count_error(code)
        kind = rt.classify_error(code)
        self._log("warning", "call.response_failed", response_id=rid, code=code, kind=kind)
        if kind == "fatal":
            self._fail("openai_error", f"{code}: a response failed", now_ns)
        elif not self._retried_turn and self.up_ready and self.phase is Phase.ACTIVE:
            self._retried_turn = True
            self.to_openai.append(rt.response_retry())
            self.control.requested()
            self._log("info", "call.response_retry", code=code)
        else:
            self._fail("openai_response_failed", f"{code}: the retry failed too", now_ns)

    def _pause(self, now_ns: int) -> bool:
        """Nothing is being said either way: the moment to rotate the OpenAI session."""
        po = self.playout
        return (self.upstream is Upstream.READY and self.active_response is None
                and not self._speaking and not po.pending and po.play_end_t * NS <= now_ns)

    def _check_session(self, session: dict[str, Any], now_ns: int) -> None:
        """Refuse to play audio in a format other than the one negotiated (garbage in the ear)."""
        assert self._neg is not None
        want = self._neg.openai_format.get("type")
        try:
            got = session["audio"]["output"]["format"]["type"]
        except (KeyError, TypeError):
            return
        if got != want:
            self._fail("openai_format_mismatch", f"asked for {want}, session says {clip(got, ID_CHARS)}",
                       now_ns)

    # ================================================================== barge-in
    def _barge_in(self, now_ns: int) -> None:
        """Caller started speaking: stop playout at once, truncate to what was heard."""
        if self.phase is not Phase.ACTIVE:
            return
        if not self.vaic_gone:
            self.proto.speech_started()
            if self.cfg.call.send_speech_hypothesis:
                self.proto.speech_hypothesis()
        if self.active_response is not None:
            self.cancelled.add(self.active_response)
            if not self.oai.vad.interrupt_response and self.up_ready:
                self.to_openai.append(rt.response_cancel())
        self._interrupt(now_ns, speech=True)

    def _truncate_unheard(self, item: str) -> None:
        """`item` (of a cancelled response) never reached the caller: the model keeps none of
        it (`audio_end_ms` 0), once per item."""
        if not item or item in self._items_truncated or not self.up_ready:
            return
        _bounded_add(self._items_truncated, item)
        self.to_openai.append(rt.truncate(item, 0))
        self.counters.truncates += 1

    def _interrupt(self, now_ns: int, speech: bool) -> None:
        """Stop what plays, drop what is pending, truncate each item to what was heard: the
        playing one at the heard ms (also in an underrun, while the model still adds to it),
        the queued ones after it at 0 (late deltas of a new item: `_on_delta`)."""
        po = self.playout
        queued = [e.item_id for e in po.pending if e.kind == CHUNK and e.item_id != po.open_item]
        intr = po.interrupt(now_ns / NS)
        if self._tc is not None:
            self._tc.reset_down()
        self._last_pushed_item = ""
        if self.proto.stop_play():
            self.stream_reports.append(min(intr.heard_ms, intr.sent_ms))
            self.control.stream_stopped(now_ns)
            if speech:
                self.marks.append((self.stats.barge_in, now_ns))
        for item in dict.fromkeys(queued):      # queued behind the playing item: never heard
            if item != intr.item_id and item in self._item_oai_ms:
                self._truncate_unheard(item)
        if intr.item_id is None:
            return
        underrun = intr.stream_open and intr.item_id not in self._items_done
        if not intr.still_playing and not underrun:    # it had been played out, all of it
            return
        self.counters.barge_ins += 1
        if intr.item_id not in self._item_oai_ms:   # an item of a session since replaced
            return
        oai_ms = self._item_oai_ms[intr.item_id]
        # floored to whole ms; the 1 ns allowance absorbs float error in the clock arithmetic
        # (437 ms heard computed as 436.99999999998 must say 437)
        end_ms = int(math.floor(max(0.0, min(intr.heard_ms, intr.sent_ms if intr.stream_open
                                                 else 0.0, oai_ms)) + 1e-6))
        if self.up_ready and intr.item_id not in self._items_truncated:
            _bounded_add(self._items_truncated, intr.item_id)
            self.to_openai.append(rt.truncate(intr.item_id, end_ms))
            self.counters.truncates += 1
            self.last_truncate = (intr.item_id, end_ms)
        self._item_oai_ms.clear()
        self._log("info", "call.barge_in", item_id=intr.item_id, heard_ms=round(intr.heard_ms, 1),
                  sent_ms=round(intr.sent_ms, 1), truncate_ms=end_ms)

    # ================================================================== pacing
    def _pump(self, now_ns: int, paced: bool) -> None:
        """Send every due playout entry (the rest waits for `next_deadline_ns`)."""
        po = self.playout
        now = now_ns / NS
        pacer_late = self.stats.pacer_late
        while self.phase is _ACTIVE and not self.vaic_gone:
            due = po.due(now)
            if due is None or due > now:
                break
            if paced and po.pending[0].kind == CHUNK:  # audio only, not the delayed stops
                pacer_late.record(int((now - due) * 1_000_000))
            self._emit(po.take(now), now_ns)

    def _emit(self, tk: Taken, now_ns: int) -> None:
        proto = self.proto
        if tk.stop_first and proto.stop_play():
            self.stream_reports.append(self._stream_ms)   # played out, all of it
            self.control.stream_stopped(now_ns)
        if tk.entry.kind != CHUNK:
            return
        if tk.start:
            proto.start_play()
            self.counters.play_streams += 1
            self._stream_ms = 0.0
        self._stream_ms += tk.entry.ms
        payload = tk.entry.payload
        proto.play_chunk(payload)
        self.counters.frames_down += 1
        st = self.stats
        st.frames_down += 1
        st.bytes_down += b64_decoded_len(payload)
        if self._t_first_delta_ns:
            self.marks.append((st.turn_overhead, self._t_first_delta_ns))
            self._t_first_delta_ns = 0

    # ================================================================== time
    def next_deadline_ns(self) -> int | None:
        """When `timer` must run next (monotonic ns), or None. Only the deadlines `_timer`
        acts on in the current phase count (a stale one would make the shell spin)."""
        phase = self.phase
        if phase is not _ACTIVE:
            if phase is Phase.INITIATING:
                return self._initiate_deadline
            if phase is Phase.ENDING:
                return self._close_deadline or None
            return None          # ENDED
        best = 0
        for d in (self._greet_deadline, self._session_deadline, self._idle_deadline(),
                  self._redial_at, self._rotate_at, self._resume_deadline, self.control.deadline()):
            if d and (not best or d < best):
                best = d
        if self.playout.pending and not self.vaic_gone:   # detached: nothing can be sent
            due = self.playout.due(0.0)  # an absolute time unless the head needs no clock
            if due is not None:
                # rounded up: a timer at a deadline rounded down would find nothing due yet
                d = math.ceil(due * NS) if due > 0.0 else self.started_ns
                if not best or d < best:
                    best = d
        return best or None

    def _idle_deadline(self) -> int:
        if self.phase is not _ACTIVE or self.vaic_gone:
            return 0
        quiet_from = max(self._last_audio_ns, int(self.playout.play_end_t * NS))
        return quiet_from + self._idle_ns

    def timer(self, now_ns: int) -> None:
        """Whatever is due at `now_ns`: paced audio, delayed stops, timeouts."""
        try:
            self._timer(now_ns)
        except Exception as e:
            self._internal_error(e, now_ns)

    def _timer(self, now_ns: int) -> None:
        phase = self.phase
        if phase is not _ACTIVE:
            if phase is Phase.INITIATING:
                if now_ns >= self._initiate_deadline:
                    wait_s = self.cfg.call.initiate_timeout_s
                    self._set_end("no_initiate", f"no session.initiate within {wait_s:g} s")
                    self._go("timeout")
                    self._end_now()
            elif phase is Phase.ENDING:
                if self._close_deadline and now_ns >= self._close_deadline:
                    self._close_deadline = 0
                    self._go("timeout")
                    self._end_now()
            return
        if self._resume_deadline and now_ns >= self._resume_deadline:
            self._resume_deadline = 0
            self._set_end("resume_grace_expired",
                          f"no session.resume within {self.cfg.call.resume_grace_s:g} s")
            self._log("warning", "call.resume_grace_expired")
            self._go("grace_expired")
            self._end_now()
            return
        if self._redial_at and now_ns >= self._redial_at:
            self._redial_at = 0
            if self.upstream is Upstream.BACKOFF:
                self._dial_now(now_ns)
        if self._rotate_at and now_ns >= self._rotate_at:
            if self._pause(now_ns):
                self._log("info", "call.openai_rotating",
                          after_s=self.oai.rotate_after_s)
                self._replace_session(now_ns, "rotation", "rotate_after_s")
            else:
                self._rotate_at = now_ns + ROTATE_RECHECK_NS
        self._pump(now_ns, True)
        self.control.timer(now_ns)
        if self.phase is not Phase.ACTIVE:
            return
        if self._greet_deadline and now_ns >= self._greet_deadline:
            self._greet()
        if self._session_deadline and now_ns >= self._session_deadline:
            self._session_deadline = 0
            if self._session_seen != 3:
                missing = " and ".join(n for bit, n in ((1, "session.created"), (2, "session.updated"))
                                       if not self._session_seen & bit)
                self._fail("openai_no_session",
                           f"no {missing} within {self.oai.session_timeout_s:g} s", now_ns)
                return
        idle = self._idle_deadline()
        if idle and now_ns >= idle and not self.playout.pending:
            idle_s = self.cfg.call.idle_timeout_s
            self._fail("idle_timeout", f"no audio either way for {idle_s:g} s", now_ns,
                       "call.idle_timeout")

    # ================================================================== ending
    def _fail(self, reason: str, detail: str, now_ns: int, event: str = "call.upstream_failed",
              token: str = "") -> None:
        """The call cannot go on: never leave the caller in dead air. Hang up (with a reason);
        close the OpenAI socket at once (useless now, and billed)."""
        if self.phase is not Phase.ACTIVE:
            if self.phase is Phase.INITIATING:   # e.g. a dial failing before accept: cannot be
                self._set_end(reason, detail)
            return
        self._set_end(reason, detail)
        self._log("warning", event, reason=reason, detail=clip(detail))
        fb = self.profile.fallback
        if (reason.startswith("openai_") and fb.startswith("transfer:") and not self.vaic_gone
                and not self._fallback_transfer):
            target = self.profile.transfer_targets[fb[9:]]
            self._fallback_transfer = True
            self._log("warning", "call.fallback_transfer", target=fb[9:], uri=target.uri)
            self.playout.interrupt(now_ns / NS)
            self.proto.request_transfer(target.uri, "model-unreachable")
            self._go("hangup")
            # a transfer rings before it fails or succeeds: wait longer than for a hang-up
            wait_s = max(self.cfg.call.hangup_grace_s, TRANSFER_WAIT_S)
            self._close_deadline = now_ns + int(wait_s * NS)
            self._close_openai()
            return
        self._hang_up(reason, detail, now_ns, token)

    def hang_up_now(self, token: str, detail: str, now_ns: int) -> None:
        """Call control ends the call (end_call, max duration, no input): `token` is the
        hangupReason (and, with '_', the call.end reason)."""
        if self.phase is not Phase.ACTIVE:
            return
        self._set_end(token.replace("-", "_"), detail)
        self._log("info", "call.hangup", reason=token, detail=clip(detail))
        self._hang_up(token, detail, now_ns)

    def transfer_failed(self, now_ns: int) -> None:
        """VAIC reports a failed transfer: after a fallback transfer (the model is gone) the
        call can only be hung up."""
        if self._fallback_transfer and self.phase is Phase.ENDING:
            self.proto.request_hangup("model-unreachable")

    def tool_result(self, call_id: str, output: str, ok: bool, now_ns: int) -> None:
        """The shell's answer to a `RunTool` effect."""
        try:
            if self.phase is Phase.ACTIVE:
                self.control.tool_result(call_id, output, ok, now_ns)
        except Exception as e:
            self._internal_error(e, now_ns)

    def _hang_up(self, reason: str, detail: str, now_ns: int, token: str = "") -> None:
        self._greet_deadline = self._session_deadline = self._resume_deadline = 0
        if self.phase is Phase.ACTIVE and self.vaic_gone:   # no VAIC socket to hang up on
            self._go("vaic_lost")
            self._end_now()
            return
        if self.phase is Phase.ACTIVE:
            self.playout.interrupt(now_ns / NS)
            self.proto.request_hangup(token or hangup_token(reason))
            self._go("hangup")
            self._close_deadline = now_ns + int(self.cfg.call.hangup_grace_s * NS)
        self._close_openai()

    def _close_openai(self) -> None:
        self._redial_at = self._rotate_at = 0
        if self.upstream in (Upstream.CONFIGURING, Upstream.READY, Upstream.DIALLING,
                             Upstream.BACKOFF):
            self._up("lost")
            self.effects.append(CloseOpenAI(1000, "call ended"))

    def _end_now(self) -> None:
        """phase is ENDED: close both sides, write call.end, tell the shell to stop."""
        self._close_openai()
        self._finish()

    def _finish(self) -> None:
        c = self.counters
        st = self.stats
        reason = self.end_reason or "unknown"
        if reason != "validate":        # a connectivity check is not a call, nor a call end
            st.count_call_end(reason)
        st.truncates += c.truncates
        st.barge_ins += c.barge_ins
        st.late_deltas_dropped += c.late_deltas_dropped
        st.early_audio_dropped += c.early_dropped
        self.effects.append(CloseVaic(1000, "call ended"))
        self.effects.append(Finished(reason))

    def end_fields(self, now_ns: int) -> dict[str, Any]:
        """The fields of the `call.end` log line."""
        c = self.counters
        return dict(reason=self.end_reason or "unknown", detail=clip(self.end_detail),
                    duration_s=round((now_ns - self.started_ns) / NS, 3), format=self.format,
                    frames_up=c.frames_up, frames_down=c.frames_down, deltas=c.deltas,
                    barge_ins=c.barge_ins, truncates=c.truncates,
                    late_deltas_dropped=c.late_deltas_dropped, early_buffered=c.early_buffered,
                    early_dropped=c.early_dropped, playout_refused=c.playout_refused,
                    openai_errors=c.openai_errors, bad_frames_in=c.bad_frames_in,
                    openai_connect_ms=self.openai_connect_ms,
                    openai_session_id=self.openai_session_id, openai_sessions=self.openai_sessions,
                    profile=self.profile.name, tool_calls=self.control.tool_calls,
                    **{f"usage_{k}": n for k, n in zip(TOKEN_KINDS, self.control.tokens)},
                    play_clock_checks=self.play_clock_diffs)
