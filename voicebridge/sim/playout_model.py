"""Analytic model of VoiceAI Connect's playout of bot audio: what the caller has *heard*, and when.

This is how tests check the bridge's playout clock (barge-in truncation, hang-up after goodbye,
pacing). Pure: no I/O, no clock of its own; every method takes the current time ``t`` in
milliseconds on one caller-chosen monotonic clock (the simulator uses ms since call start).
Times passed to successive calls must never decrease.

Model
-----
One playout buffer, played at real time. ``buffer_end_t`` is the instant at which all audio queued
so far will have finished playing. A chunk of ``d`` ms arriving at ``t``: if ``buffer_end_t < t``
the buffer has run dry (idle, or an *underrun* if the same stream had already delivered audio:
a gap the caller hears as choppy audio), so ``buffer_end_t = t``; then ``buffer_end_t += d``.

Because every gap lies before the arrival of a chunk already received, the audio still to play at
``t`` is always the contiguous span ``[t, buffer_end_t)``; hence for a stream whose queued audio
ends at ``end_t``::

    heard_ms(t) = max(0, queued_ms - max(0, end_t - t))      queued_ms = received_ms - flushed_ms

Stop policy (VAIC's real behaviour is unverified, spec §4): ``"flush"`` = on ``playStream.stop``
and on the bot's ``userStream.speech.started`` the heard amount is frozen at that instant and the
rest of the buffer is discarded (``flushed_ms``); after a barge-in flush, further chunks of the
still-open stream are discarded too. ``"drain"`` = stop only marks the stream stopped and its
buffered audio plays out; ``speech.started`` does nothing to the buffer.

A stream is *finished* when it has been stopped and all of its audio has been played or flushed;
``finished_t = max(stop_t, end_t)`` exactly (not the time the model happened to be polled). Its
``heard_ms``/``heard_bytes`` are final from then on. :meth:`PlayoutModel.end_call` finishes the rest
at call end, counting audio still buffered as ``cut_ms``. Invariant for a finished stream:
``heard_ms + flushed_ms + cut_ms == received_ms``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from voicebridge.sim.caller_audio import AudioFormat

StopPolicy = Literal["flush", "drain"]
STOP_POLICIES: tuple[StopPolicy, ...] = ("flush", "drain")


@dataclass
class PlayedStream:
    """One bot play stream as the caller experienced it. All times are ms on the model's clock.

    ``heard_ms`` and ``heard_bytes`` (the exact prefix of the stream's audio, WAV headers removed,
    that was heard, cut at a whole sample) are final once ``finished_t`` is set; before that read
    :meth:`PlayoutModel.heard_ms`. ``gap_ms`` is the total length of the underruns, ``gap_spans``
    their (from, to) times. ``play_start_t``: when its first audio started playing (its first
    chunk's arrival, or later if the previous stream's audio was still playing).
    """

    stream_id: str
    media_format: str
    started_t: float
    first_chunk_t: float | None = None
    stop_t: float | None = None
    received_ms: float = 0.0
    heard_ms: float = 0.0
    heard_bytes: bytes = b""
    underruns: int = 0
    flushed_ms: float = 0.0
    cut_ms: float = 0.0
    gap_ms: float = 0.0
    finished_t: float | None = None
    chunks: int = 0
    play_start_t: float | None = None
    gap_spans: list[tuple[float, float]] = field(default_factory=list)
    end_t: float = field(default=0.0, repr=False)  # when this stream's queued audio ends playing
    muted: bool = field(default=False, repr=False)  # flushed by barge-in: later chunks discarded
    fmt: AudioFormat | None = field(default=None, repr=False)
    audio: bytearray = field(default_factory=bytearray, repr=False)


class PlayoutModel:
    """Single real-time playout buffer shared by all play streams of one call (see module doc).

    The caller validates the protocol; this class assumes valid use: :meth:`chunk` and
    :meth:`stop` only while a stream is active, :meth:`start` only when none is.
    """

    def __init__(self, stop_policy: StopPolicy = "flush", record_audio: bool = True) -> None:
        if stop_policy not in STOP_POLICIES:
            raise ValueError(f"stop_policy must be one of {STOP_POLICIES}, not {stop_policy!r}")
        self.stop_policy: StopPolicy = stop_policy
        self.record_audio = record_audio
        self.streams: list[PlayedStream] = []
        self.active: PlayedStream | None = None
        self.buffer_end_t: float = float("-inf")
        self._unfinished: list[PlayedStream] = []

    # --- events ----------------------------------------------------------------------------------

    def start(
        self, t: float, stream_id: str, media_format: str, fmt: AudioFormat | None = None
    ) -> PlayedStream:
        """Open a stream at ``t``. ``fmt`` (if known) is used to cut ``heard_bytes``."""
        assert self.active is None, "start while a stream is active"
        stream = PlayedStream(stream_id, media_format, started_t=t, end_t=t, fmt=fmt)
        self.streams.append(stream)
        self._unfinished.append(stream)
        self.active = stream
        return stream

    def chunk(self, t: float, duration_ms: float, audio: bytes = b"") -> None:
        """Queue ``duration_ms`` of the active stream's audio (bare samples ``audio``) at ``t``."""
        stream = self.active
        assert stream is not None, "chunk without an active stream"
        if stream.first_chunk_t is None:
            stream.first_chunk_t = t
            stream.play_start_t = max(t, self.buffer_end_t)
        elif self.buffer_end_t < t and not stream.muted:
            stream.underruns += 1
            stream.gap_ms += t - self.buffer_end_t
            stream.gap_spans.append((self.buffer_end_t, t))
        stream.chunks += 1
        stream.received_ms += duration_ms
        if self.record_audio:
            stream.audio += audio
        if stream.muted:
            stream.flushed_ms += duration_ms
            return
        self.buffer_end_t = max(self.buffer_end_t, t) + duration_ms
        stream.end_t = self.buffer_end_t

    def stop(self, t: float) -> PlayedStream:
        """``playStream.stop`` for the active stream at ``t``; applies the stop policy."""
        stream = self.active
        assert stream is not None, "stop without an active stream"
        stream.stop_t = t
        self.active = None
        if self.stop_policy == "flush":
            self._flush(t)
        return stream

    def barge_in(self, t: float) -> None:
        """The bot reported ``userStream.speech.started`` at ``t``: flush if the policy says so."""
        if self.stop_policy == "flush":
            self._flush(t)
            if self.active is not None:
                self.active.muted = True

    def _flush(self, t: float) -> None:
        for stream in self._unfinished:
            queued = stream.received_ms - stream.flushed_ms
            pending = min(queued, max(0.0, stream.end_t - t))
            stream.flushed_ms += pending
            stream.end_t = min(stream.end_t, t)
        self.buffer_end_t = min(self.buffer_end_t, t)

    # --- queries ---------------------------------------------------------------------------------

    def heard_ms(self, stream: PlayedStream, t: float) -> float:
        """Milliseconds of ``stream`` heard by ``t`` (final value once the stream is finished)."""
        if stream.finished_t is not None:
            return stream.heard_ms
        queued = stream.received_ms - stream.flushed_ms
        return max(0.0, queued - max(0.0, stream.end_t - t))

    def current_heard_ms(self, t: float) -> float:
        """Heard ms at ``t`` of the most recently started stream; 0.0 if there was none."""
        return self.heard_ms(self.streams[-1], t) if self.streams else 0.0

    @property
    def latest(self) -> PlayedStream | None:
        """The most recently started stream, if any."""
        return self.streams[-1] if self.streams else None

    def unplayed(self, t: float) -> list[tuple[PlayedStream, float]]:
        """The streams that still have audio queued but not yet played at ``t``, with how many
        ms each (flushed audio excluded), in start order. Empty when everything was played."""
        out: list[tuple[PlayedStream, float]] = []
        for stream in self._unfinished:
            left = (stream.received_ms - stream.flushed_ms) - self.heard_ms(stream, t)
            if left > 1e-9:
                out.append((stream, left))
        return out

    def is_idle(self, t: float) -> bool:
        """True if no stream is open and nothing is left to play at ``t``."""
        return self.active is None and self.buffer_end_t <= t

    # --- completion ------------------------------------------------------------------------------

    def poll(self, t: float) -> list[PlayedStream]:
        """Finish every stopped stream whose audio is played or flushed by ``t``; return those."""
        done = [s for s in self._unfinished if s.stop_t is not None and s.end_t <= t]
        for stream in done:
            assert stream.stop_t is not None
            self._finish(stream, max(stream.stop_t, stream.end_t), cut_at=None)
        return done

    def end_call(self, t: float) -> None:
        """The call ended at ``t``: finish every stream; audio not yet played counts as ``cut_ms``."""
        self.poll(t)
        for stream in list(self._unfinished):
            self._finish(stream, t, cut_at=t)
        self.active = None

    def _finish(self, stream: PlayedStream, finished_t: float, cut_at: float | None) -> None:
        queued = stream.received_ms - stream.flushed_ms
        if cut_at is None:
            stream.heard_ms = queued
        else:
            stream.heard_ms = max(0.0, queued - max(0.0, stream.end_t - cut_at))
            stream.cut_ms = queued - stream.heard_ms
        stream.finished_t = finished_t
        if stream.fmt is not None:
            samples = round(stream.heard_ms * stream.fmt.sample_rate_hz / 1000)
            stream.heard_bytes = bytes(stream.audio[: samples * stream.fmt.sample_width_bytes])
        stream.audio = bytearray()
        self._unfinished.remove(stream)
