"""Audio of the fake OpenAI Realtime server: GA wire codecs, the test tone and the energy VAD.

Pure functions and one pure state machine (:class:`_EnergyVad`), no I/O. The public names are
re-exported by :mod:`voicebridge.sim.fake_openai`.
"""

from __future__ import annotations

import numpy as np

VAD_WINDOW_MS = 20
TONE_FREQ_HZ = 440.0
TONE_AMPLITUDE = 0.25  # of int16 full scale: clearly audible, no clipping


def _ulaw_table() -> np.ndarray:
    """G.711 μ-law code → int16 sample (256 entries)."""
    u = (~np.arange(256, dtype=np.int32)) & 0xFF
    exponent = (u >> 4) & 0x07
    mantissa = u & 0x0F
    magnitude = (((mantissa << 3) + 0x84) << exponent) - 0x84
    return np.where((u & 0x80) != 0, -magnitude, magnitude).astype(np.int16)


def _alaw_table() -> np.ndarray:
    """G.711 A-law code → int16 sample (256 entries)."""
    a = np.arange(256, dtype=np.int32) ^ 0x55
    exponent = (a >> 4) & 0x07
    mantissa = a & 0x0F
    magnitude = np.where(
        exponent == 0,
        (mantissa << 4) + 8,
        ((mantissa << 4) + 0x108) << np.maximum(exponent - 1, 0),
    )
    return np.where((a & 0x80) != 0, magnitude, -magnitude).astype(np.int16)


_DECODE_TABLES: dict[str, np.ndarray] = {"audio/pcmu": _ulaw_table(), "audio/pcma": _alaw_table()}


def _encoder_tables(table: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    order = np.argsort(table, kind="stable")
    return order.astype(np.uint8), table[order].astype(np.int32)


_ENCODE_TABLES = {fmt: _encoder_tables(t) for fmt, t in _DECODE_TABLES.items()}


def sample_rate(fmt_type: str) -> int:
    """Sample rate in Hz of a GA format type (``audio/pcm`` 24000, ``audio/pcmu|pcma`` 8000)."""
    return 24000 if fmt_type == "audio/pcm" else 8000


def bytes_per_ms(fmt_type: str) -> int:
    """Wire bytes per millisecond: 48 for ``audio/pcm`` (24 kHz int16), 8 for G.711."""
    return 48 if fmt_type == "audio/pcm" else 8


def decode_audio(data: bytes, fmt_type: str) -> np.ndarray:
    """Decode wire bytes of ``fmt_type`` to int16 samples (PCM: little-endian, even length)."""
    if fmt_type == "audio/pcm":
        return np.frombuffer(data, dtype="<i2").astype(np.int16, copy=False)
    return _DECODE_TABLES[fmt_type][np.frombuffer(data, dtype=np.uint8)]


def encode_audio(samples: np.ndarray, fmt_type: str) -> bytes:
    """Encode int16 samples to wire bytes of ``fmt_type`` (G.711: nearest code value)."""
    s = np.asarray(samples).astype(np.int32)
    if fmt_type == "audio/pcm":
        return np.clip(s, -32768, 32767).astype("<i2").tobytes()
    order, values = _ENCODE_TABLES[fmt_type]
    idx = np.clip(np.searchsorted(values, s), 1, len(values) - 1)
    lo = values[idx - 1]
    hi = values[idx]
    pick = np.where(s - lo <= hi - s, idx - 1, idx)
    return order[pick].tobytes()


def make_tone(
    ms: int, fmt_type: str, freq_hz: float = TONE_FREQ_HZ, amplitude: float = TONE_AMPLITUDE
) -> bytes:
    """``ms`` of a sine (phase 0 at start) encoded in ``fmt_type``; amplitude is a fraction of FS."""
    rate = sample_rate(fmt_type)
    n = rate * ms // 1000
    t = np.arange(n, dtype=np.float64) / rate
    samples = np.round(np.sin(2 * np.pi * freq_hz * t) * amplitude * 32767.0)
    return encode_audio(samples.astype(np.int16), fmt_type)


def _aligned_freq(chunk_ms: int) -> float:
    """A frequency near 440 Hz with a whole number of cycles per chunk (click-free joins)."""
    cycles = max(1, round(TONE_FREQ_HZ * chunk_ms / 1000))
    return cycles * 1000.0 / chunk_ms


_SQUARE_TABLES: dict[str, np.ndarray] = {
    fmt: table.astype(np.float64) ** 2 for fmt, table in _DECODE_TABLES.items()
}


def _window_mean_squares(buf: bytes, fmt_type: str, n: int, win: int) -> list[float]:
    """Mean square of each of the first ``n`` windows of ``win`` samples in ``buf``."""
    if fmt_type == "audio/pcm":
        x = np.frombuffer(buf, dtype="<i2", count=n * win).astype(np.float32)
        if n == 1:
            return [float(np.dot(x, x)) / win]
        rows = x.reshape(n, win)
        return (np.einsum("ij,ij->i", rows, rows) / win).tolist()
    sq = _SQUARE_TABLES[fmt_type].take(np.frombuffer(buf, dtype=np.uint8, count=n * win))
    if n == 1:
        return [float(sq.sum()) / win]
    return (sq.reshape(n, win).sum(axis=1) / win).tolist()


class _EnergyVad:
    """Energy VAD over 20 ms windows of wire audio. Pure state machine, no I/O.

    ``feed`` takes raw wire bytes (any length; a partial window is kept for the next call) and
    returns ``("started", audio_start_ms)`` / ``("stopped", audio_end_ms)`` events on the input
    timeline (ms of audio appended since the session started; prefix padding is subtracted
    from the start, the stop includes the trailing silence).
    """

    __slots__ = ("pos_ms", "tail", "speaking", "above_ms", "below_ms", "run_start_ms")

    def __init__(self) -> None:
        self.pos_ms = 0.0
        self.tail = b""
        self.speaking = False
        self.above_ms = 0
        self.below_ms = 0
        self.run_start_ms = 0.0

    def reset_state(self) -> None:
        """Forget speech state (after commit/clear); keep the timeline."""
        self.speaking = False
        self.above_ms = 0
        self.below_ms = 0

    def advance(self, ms: float) -> None:
        """Move the input timeline without analysing audio (VAD off)."""
        self.pos_ms += ms

    def feed(
        self,
        data: bytes,
        fmt_type: str,
        threshold_rms: float,
        min_speech_ms: int,
        silence_ms: int,
        prefix_ms: int,
    ) -> list[tuple[str, int]]:
        win = sample_rate(fmt_type) * VAD_WINDOW_MS // 1000
        win_bytes = bytes_per_ms(fmt_type) * VAD_WINDOW_MS
        if self.tail:
            data = self.tail + data
        n = len(data) // win_bytes
        self.tail = data[n * win_bytes :]
        if n == 0:
            return []
        thr_sq = threshold_rms * threshold_rms
        events: list[tuple[str, int]] = []
        for mean_sq in _window_mean_squares(data, fmt_type, n, win):
            loud = mean_sq >= thr_sq
            t0 = self.pos_ms
            self.pos_ms += VAD_WINDOW_MS
            if not self.speaking:
                if loud:
                    if self.above_ms == 0:
                        self.run_start_ms = t0
                    self.above_ms += VAD_WINDOW_MS
                    if self.above_ms >= min_speech_ms:
                        self.speaking = True
                        self.below_ms = 0
                        events.append(("started", int(max(0.0, self.run_start_ms - prefix_ms))))
                else:
                    self.above_ms = 0
            elif loud:
                self.below_ms = 0
            else:
                self.below_ms += VAD_WINDOW_MS
                if self.below_ms >= silence_ms:
                    self.speaking = False
                    self.above_ms = 0
                    events.append(("stopped", int(self.pos_ms)))
        return events
