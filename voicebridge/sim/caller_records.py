"""Configuration and result records of a simulated VAIC call, and the readable call timeline.

:class:`CallerConfig` (one call), :class:`CallResult` with its :class:`Event`, :class:`Turn`,
:class:`BotActivity` and :class:`SentActivity` entries, and :func:`format_timeline`.
Re-exported by :mod:`voicebridge.sim.caller`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from voicebridge.sim.caller_script import ScriptItem, default_script
from voicebridge.sim.playout_model import PlayedStream, StopPolicy


TransferResult = Literal["transferred", "failed"]
TRANSFER_RESULTS: tuple[TransferResult, ...] = ("transferred", "failed")


@dataclass
class CallerConfig:
    """One simulated call. ``formats`` is the ordered ``supportedMediaFormats`` offer; unknown
    strings may be offered (negative tests) but at least one must be a format this simulator can
    generate. ``call_timeout_s=None`` derives a bound from the script and ``accept_timeout_s``.
    ``record_audio=False`` skips keeping bot audio (``heard_bytes`` stays empty) for load tests.

    ``play_finished``: send VAIC's ``playFinished`` event once per bot play stream when its
    audio finished playing (stopped, and played out or flushed, per the playout model), as seen
    in a real call: ``{"type": "event", "name": "playFinished", "value": {"playedDurationMS":
    <ms of that stream actually played, rounded>, "status": "finished"}}``. The status is always
    ``"finished"`` (the only value seen; what VAIC reports for an interrupted prompt is unknown).

    Transfers: on a bot ``transfer`` (or ``handover``) activity, ``transfer_result`` decides
    what VAIC does: ``"transferred"`` (default) sends ``session.end`` ``transferred`` and ends
    the call; ``"failed"`` (bot-regains-control configured) keeps the call and, after
    ``transfer_status_delay_ms``, sends ``{"type": "event", "name": "transferStatus", "value":
    {"status": "failed", "reasonCode": transfer_fail_reason_code, "reason":
    transfer_fail_reason}}``; the script goes on and bot audio keeps playing. A sequence gives
    the outcome per transfer in order (its last entry repeats): ``["failed", "transferred"]``.
    """

    url: str
    token: str | None = None
    formats: list[str] = field(default_factory=lambda: ["raw/lpcm16_24", "raw/mulaw"])
    conversation_id: str | None = None
    caller: str = "+15550100"
    callee: str = "+15550199"
    bot_name: str = "voicebridge"
    frame_ms: int = 20
    script: list[ScriptItem] = field(default_factory=default_script)
    stop_policy: StopPolicy = "flush"
    play_finished: bool = False
    accept_timeout_s: float = 5.0
    send_start_activity: bool = True
    hangup: Literal["caller", "drop"] = "caller"
    record_audio: bool = True
    call_timeout_s: float | None = None
    transfer_result: TransferResult | Sequence[TransferResult] = "transferred"
    transfer_status_delay_ms: int = 100
    transfer_fail_reason_code: str = "declined"
    transfer_fail_reason: str = "SIP ;cause=603"

    def transfer_outcome(self, n: int) -> TransferResult:
        """What VAIC does with the ``n``-th transfer of the call (from 0)."""
        if isinstance(self.transfer_result, str):
            return self.transfer_result
        results = list(self.transfer_result)
        return results[min(n, len(results) - 1)]


Direction = Literal["in", "out", "sim"]
EndReason = Literal[
    "caller-hangup",
    "caller-drop",
    "bot-hangup",
    "transfer",
    "session.error",
    "socket-closed",
    "timeout",
    "connect-failed",
]


@dataclass
class Event:
    """One timeline entry: ``t_ms`` since call start; ``in`` = bot→caller, ``out`` = caller→bot,
    ``sim`` = the simulator's own observation (script steps, playout, timeouts)."""

    t_ms: float
    direction: Direction
    type: str
    detail: str = ""


@dataclass
class Turn:
    """One caller utterance (Speak or BargeIn): ``speech_end_ms`` = its last frame was sent;
    ``first_audio_ms`` = first chunk of the first play stream whose first chunk came after that."""

    speech_end_ms: float
    first_audio_ms: float | None
    latency_ms: float | None


@dataclass
class BotActivity:
    """One activity the bot sent, with the caller's playout at its arrival (ms since call start).

    ``name``: the event's ``name`` (``hangup``, ``transfer``, ``sendDtmf``, ...), None for a
    non-event activity (``type`` then says what it is); ``activity``: the whole object as
    received. ``unplayed_ms``: bot audio queued in the playout buffer but not yet played at
    ``t_ms`` (0: everything received so far had been played); ``playout_end_ms``: when the
    queued audio ends playing (None: no bot audio yet); ``open_stream``: the id of a play stream
    started and not yet stopped at ``t_ms`` (the bot may still be sending audio), else None.
    ``ends_call``: this activity ended the call (``hangup``, a ``transfer`` VAIC carried out);
    then ``cut_ms`` = ``unplayed_ms`` (never heard: the call is gone) and ``streams_cut`` the ids
    of the streams that still had audio to play, else ``cut_ms`` 0 and ``streams_cut`` empty.
    So "the hang-up came after the last goodbye frame was played and no frame is cut" is
    ``act.unplayed_ms == 0 and act.open_stream is None and not act.streams_cut``.
    """

    t_ms: float
    name: str | None
    type: str | None
    activity: dict[str, Any]
    unplayed_ms: float
    playout_end_ms: float | None
    open_stream: str | None
    ends_call: bool = False
    cut_ms: float = 0.0
    streams_cut: list[str] = field(default_factory=list)


@dataclass
class SentActivity:
    """One activity event this simulated VAIC sent (``start``, ``DTMF``, ``noUserInput``,
    ``playFinished``, ``transferStatus``): ``t_ms`` since call start, the event ``name``, its
    ``value`` (None if it has none) and, for ``playFinished``, the ``stream_id`` it reports."""

    t_ms: float
    name: str
    value: Any = None
    stream_id: str | None = None


ResumeOutcome = Literal["accepted", "error", "connect-failed", "timeout"]


@dataclass
class Resume:
    """One :class:`~voicebridge.sim.caller_script.DropAndResume`: ``drop_ms`` the old socket was
    aborted; ``connected_ms`` the new one was open (None: connect failed); ``reply_ms`` the bot's
    answer to ``session.resume`` arrived; ``outcome`` ``accepted`` (``detail``: its mediaFormat),
    ``error`` (``detail``: the session.error reason), ``connect-failed`` or ``timeout``."""

    drop_ms: float
    connected_ms: float | None = None
    reply_ms: float | None = None
    outcome: ResumeOutcome | None = None
    detail: str = ""


@dataclass
class CallResult:
    """Everything observed during one call. Times are ms since call start (just before dialing).

    ``events`` holds control messages and simulator notes in the order recorded (chunks are only
    counted, except the first of each stream); ``playout.*`` notes carry their exact analytic time,
    which may precede entries recorded before them, so sort by ``t_ms`` for a strict timeline (as
    :func:`format_timeline` does). ``streams`` are final when the result is returned.
    ``end_reason`` adds ``"caller-drop"`` (``hangup="drop"``) and ``"connect-failed"`` (see
    ``connect_error``) to the reasons of the call contract. ``started_at`` is t = 0 on
    ``time.monotonic()`` (to line the call up with other records, e.g. the fake OpenAI server's).
    ``resumes``: one :class:`Resume` per ``DropAndResume`` run.
    ``bot_activities``: every activity from the bot with its arrival time and the playout then
    (:class:`BotActivity`; ``received_activities`` keeps the bare objects);
    ``dtmf_received``: the ``dtmfDigits`` of every bot ``sendDtmf``, in order (digits outside
    0-9 * # or longer than 20 are also a violation); ``sent_activities``: every activity event
    the caller sent (:class:`SentActivity`).
    """

    url: str
    conversation_id: str
    events: list[Event] = field(default_factory=list)
    chunks_sent: int = 0
    chunks_received: int = 0
    accepted_format: str | None = None
    session_error: str | None = None
    streams: list[PlayedStream] = field(default_factory=list)
    turns: list[Turn] = field(default_factory=list)
    speech_started_from_bot: list[float] = field(default_factory=list)
    violations: list[str] = field(default_factory=list)
    violations_suppressed: int = 0
    end_reason: EndReason | None = None
    close_code: int | None = None
    received_activities: list[dict[str, Any]] = field(default_factory=list)
    unknown_messages: list[str] = field(default_factory=list)
    script_timeouts: int = 0
    connect_error: str | None = None
    duration_ms: float = 0.0
    started_at: float = 0.0
    resumes: list[Resume] = field(default_factory=list)
    bot_activities: list[BotActivity] = field(default_factory=list)
    dtmf_received: list[str] = field(default_factory=list)
    sent_activities: list[SentActivity] = field(default_factory=list)

    def activities_named(self, name: str) -> list[BotActivity]:
        """The bot's activities whose event name is ``name`` (case insensitive), in order."""
        low = name.lower()
        return [a for a in self.bot_activities if a.name is not None and a.name.lower() == low]

    def sent_named(self, name: str) -> list[SentActivity]:
        """The caller's activity events named ``name``, in order."""
        return [a for a in self.sent_activities if a.name == name]

    @property
    def cut_ms(self) -> float:
        """Bot audio never heard because the call ended while it was queued (all streams)."""
        return sum(s.cut_ms for s in self.streams)

    def audible(self) -> list[tuple[float, float]]:
        """The spans (ms, merged, in time order) during which bot audio was playing: each stream
        from ``play_start_t`` until its audio ended (played, flushed or cut at call end), minus
        its underruns. The gaps between spans are the silences the caller heard."""
        spans: list[tuple[float, float]] = []
        for s in self.streams:
            if s.play_start_t is None or s.heard_ms <= 0:
                continue
            end = s.end_t if s.finished_t is None else min(s.end_t, s.finished_t)
            start = s.play_start_t
            for a, b in s.gap_spans:
                spans.append((start, a))
                start = b
            spans.append((start, end))
        out: list[tuple[float, float]] = []
        for a, b in sorted(x for x in spans if x[1] > x[0]):
            if out and a <= out[-1][1] + 1e-6:
                out[-1] = (out[-1][0], max(out[-1][1], b))
            else:
                out.append((a, b))
        return out


_ARROWS: dict[Direction, str] = {"out": "caller → bot", "in": "caller ← bot", "sim": "  (caller)  "}


def format_timeline(result: CallResult) -> str:
    """Readable multi-line timeline of a call: messages, script steps, turns, streams, violations."""
    lines = [
        f"call {result.conversation_id} to {result.url}",
        f"  media format {result.accepted_format or '-'}; ended: {result.end_reason} "
        f"(close code {result.close_code}) after {result.duration_ms / 1000:.2f} s; "
        f"chunks sent {result.chunks_sent}, received {result.chunks_received}",
    ]
    if result.connect_error:
        lines.append(f"  connect error: {result.connect_error}")
    if result.session_error is not None:
        lines.append(f"  session.error: {result.session_error}")
    lines.append("")
    lines.append(f"{'t (ms)':>9}  {'':12}  message")
    for ev in sorted(result.events, key=lambda e: e.t_ms):
        detail = f"  {ev.detail}" if ev.detail else ""
        lines.append(f"{ev.t_ms:9.1f}  {_ARROWS[ev.direction]}  {ev.type}{detail}")
    lines.append("")
    lines.append("turns (caller speech end → first bot audio):")
    for i, turn in enumerate(result.turns, 1):
        if turn.latency_ms is None:
            lines.append(f"  #{i}: speech end {turn.speech_end_ms:.0f} ms → no bot audio")
        else:
            lines.append(
                f"  #{i}: speech end {turn.speech_end_ms:.0f} ms → first audio {turn.first_audio_ms:.0f} ms: "
                f"latency {turn.latency_ms:.0f} ms"
            )
    if not result.turns:
        lines.append("  (none)")
    lines.append("bot play streams:")
    for s in result.streams:
        lines.append(
            f"  {s.stream_id} ({s.media_format}): received {s.received_ms:.0f} ms, heard {s.heard_ms:.0f} ms, "
            f"flushed {s.flushed_ms:.0f} ms, cut by call end {s.cut_ms:.0f} ms, underruns {s.underruns}"
        )
    if not result.streams:
        lines.append("  (none)")
    if result.speech_started_from_bot:
        lines.append("bot speech.started at: " + ", ".join(f"{t:.0f} ms" for t in result.speech_started_from_bot))
    if result.bot_activities:
        lines.append(f"activities from bot: {len(result.bot_activities)}")
    for act in result.bot_activities:
        what = act.name if act.name is not None else f"({act.type})"
        extra = f", cut {act.cut_ms:.0f} ms of {','.join(act.streams_cut)}" if act.streams_cut else ""
        open_ = f", stream {act.open_stream} open" if act.open_stream else ""
        lines.append(f"  {act.t_ms:9.1f} ms {what}: unplayed {act.unplayed_ms:.0f} ms{open_}{extra}")
    if result.dtmf_received:
        lines.append("sendDtmf from bot: " + ", ".join(result.dtmf_received))
    for r in result.resumes:
        lines.append(f"resume: dropped at {r.drop_ms:.0f} ms -> {r.outcome} {r.detail}".rstrip()
                     + (f" at {r.reply_ms:.0f} ms" if r.reply_ms is not None else ""))
    if result.script_timeouts:
        lines.append(f"script waits timed out: {result.script_timeouts}")
    lines.append(f"violations: {len(result.violations) + result.violations_suppressed}")
    lines.extend(f"  - {v}" for v in result.violations)
    return "\n".join(lines)
