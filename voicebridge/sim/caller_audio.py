"""Audio for the simulated VoiceAI Connect caller: media formats, G.711 μ-law, test tone, WAV framing.

Contracts
---------
* Formats are the Bot API media format strings (spec §3): ``raw/lpcm16`` (16 kHz), ``raw/lpcm16_8``
  (8 kHz), ``raw/lpcm16_24`` (24 kHz), all 16-bit signed little-endian mono, ``raw/mulaw`` (8 kHz
  G.711 μ-law, 8 bit) and the ``wav/`` variant of each (same audio, WAV framing, see below).
* Every sample rate used is a multiple of 1000 Hz, so any whole number of milliseconds is a whole
  number of samples: ``fmt.bytes_for_ms(ms)`` is exact.
* "Speech" is a 300 Hz sine at amplitude 8000 (int16 scale): clearly audible, trivially detectable
  by an energy VAD. It is phase-continuous across frames. "Silence" is digital silence (zero
  samples; ``0xFF`` in μ-law).
* WAV framing (VAIC's exact wav framing is UNVERIFIED, spec §3 only says "with WAV header"): the
  sender prefixes one 44-byte canonical RIFF/WAVE header to the first chunk of each user stream;
  both size fields (RIFF size and ``data`` size) are ``0xFFFFFFFF``, the usual "unknown length,
  streaming" marker. μ-law uses format tag 7 (WAVE_FORMAT_MULAW) with a 16-byte ``fmt`` chunk (no
  ``cbSize``) so the header stays 44 bytes. The receiver strips a RIFF header from any play
  chunk that starts with ``b"RIFF"`` (:func:`strip_wav_header`) and treats everything else as
  bare samples.

Nothing here does I/O; the hot path (one frame every ``frame_ms``) is slicing precomputed bytes.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Literal

import numpy as np

TONE_HZ = 300
TONE_AMPLITUDE = 8000
MULAW_SILENCE_BYTE = 0xFF
WAV_HEADER_BYTES = 44
WAV_UNKNOWN_SIZE = 0xFFFFFFFF
WAVE_FORMAT_PCM = 1
WAVE_FORMAT_MULAW = 7


@dataclass(frozen=True, slots=True)
class AudioFormat:
    """One Bot API media format.

    ``sample_width_bytes`` is 2 for the lpcm16 family and 1 for μ-law; audio is always mono.
    """

    name: str
    container: Literal["raw", "wav"]
    codec: Literal["lpcm16", "mulaw"]
    sample_rate_hz: int

    @property
    def sample_width_bytes(self) -> int:
        """Bytes per sample: 2 for 16-bit PCM, 1 for μ-law."""
        return 2 if self.codec == "lpcm16" else 1

    @property
    def bytes_per_ms(self) -> int:
        """Bytes of audio per millisecond (exact: rates are multiples of 1 kHz)."""
        return self.sample_rate_hz // 1000 * self.sample_width_bytes

    def bytes_for_ms(self, ms: int) -> int:
        """Exact byte length of ``ms`` milliseconds of audio (no header)."""
        return ms * self.bytes_per_ms

    def ms_for_bytes(self, n_bytes: int) -> float:
        """Duration in ms of ``n_bytes`` of bare audio (fractional if not a whole ms)."""
        return n_bytes / self.bytes_per_ms


def _build_formats() -> dict[str, AudioFormat]:
    table: dict[str, AudioFormat] = {}
    codecs: list[tuple[str, Literal["lpcm16", "mulaw"], int]] = [
        ("lpcm16", "lpcm16", 16000),
        ("lpcm16_8", "lpcm16", 8000),
        ("lpcm16_24", "lpcm16", 24000),
        ("mulaw", "mulaw", 8000),
    ]
    containers: tuple[Literal["raw", "wav"], ...] = ("raw", "wav")
    for container in containers:
        for suffix, codec, rate in codecs:
            name = f"{container}/{suffix}"
            table[name] = AudioFormat(name, container, codec, rate)
    return table


FORMATS: dict[str, AudioFormat] = _build_formats()
"""Every media format the simulator can send and receive, keyed by its Bot API string."""


def get_format(name: str) -> AudioFormat:
    """Return the :class:`AudioFormat` for a Bot API format string; ``ValueError`` if unknown."""
    try:
        return FORMATS[name]
    except KeyError:
        raise ValueError(f"unknown media format {name!r}; known: {', '.join(FORMATS)}") from None


# --- G.711 μ-law ---------------------------------------------------------------------------------

_MULAW_BIAS = 0x84  # 132
_MULAW_CLIP = 32635
# Segment (exponent) of a biased magnitude m, looked up by m >> 7 (1..255): floor(log2(m >> 7)).
_SEGMENT_LUT = np.zeros(256, dtype=np.int32)
for _i in range(1, 256):
    _SEGMENT_LUT[_i] = _i.bit_length() - 1
del _i


def mulaw_encode(samples: np.ndarray) -> bytes:
    """Encode int16 samples to G.711 μ-law bytes (ITU-T G.711, bias 132, clip 32635).

    Accepts any integer array; values are treated as int16 range. Output length equals input
    length. ``mulaw_encode(0)`` is ``0xFF``.
    """
    x = np.asarray(samples, dtype=np.int32)
    sign = np.where(x < 0, 0x80, 0x00).astype(np.int32)
    magnitude = np.minimum(np.abs(x), _MULAW_CLIP) + _MULAW_BIAS
    segment = _SEGMENT_LUT[magnitude >> 7]
    mantissa = (magnitude >> (segment + 3)) & 0x0F
    encoded = ~(sign | (segment << 4) | mantissa) & 0xFF
    return encoded.astype(np.uint8).tobytes()


# --- tone / silence generation -------------------------------------------------------------------


def tone_samples(sample_rate_hz: int, n_samples: int, start_sample: int = 0) -> np.ndarray:
    """``n_samples`` int16 samples of the speech tone, starting at sample index ``start_sample``."""
    t = (np.arange(n_samples, dtype=np.float64) + start_sample) / sample_rate_hz
    return np.round(TONE_AMPLITUDE * np.sin(2.0 * np.pi * TONE_HZ * t)).astype(np.int16)


def encode_samples(fmt: AudioFormat, samples: np.ndarray) -> bytes:
    """Encode int16 samples in ``fmt``'s codec (bare audio, never a header)."""
    if fmt.codec == "mulaw":
        return mulaw_encode(samples)
    return np.asarray(samples, dtype="<i2").tobytes()


def silence_bytes(fmt: AudioFormat, ms: int) -> bytes:
    """``ms`` of digital silence in ``fmt`` (bare audio)."""
    fill = MULAW_SILENCE_BYTE if fmt.codec == "mulaw" else 0
    return bytes([fill]) * fmt.bytes_for_ms(ms)


class SpeechSource:
    """Phase-continuous source of speech-tone and silence frames in one format.

    One second of tone (an exact whole number of 300 Hz periods) is encoded once; frames are
    slices of it, so producing a frame costs one bytes slice (plus a concatenation at the wrap).
    """

    def __init__(self, fmt: AudioFormat) -> None:
        self.fmt = fmt
        self._cycle = encode_samples(fmt, tone_samples(fmt.sample_rate_hz, fmt.sample_rate_hz))
        self._pos = 0  # byte offset into the cycle where the next speech frame starts
        self._silence = silence_bytes(fmt, 1000)

    def speech(self, ms: int) -> bytes:
        """Next ``ms`` of tone (``ms`` may exceed one second)."""
        n = self.fmt.bytes_for_ms(ms)
        out = bytearray()
        while n > 0:
            take = min(n, len(self._cycle) - self._pos)
            out += self._cycle[self._pos : self._pos + take]
            self._pos = (self._pos + take) % len(self._cycle)
            n -= take
        return bytes(out)

    def silence(self, ms: int) -> bytes:
        """``ms`` of digital silence."""
        n = self.fmt.bytes_for_ms(ms)
        if n <= len(self._silence):
            return self._silence[:n]
        return silence_bytes(self.fmt, ms)


# --- WAV framing ---------------------------------------------------------------------------------


def wav_header(fmt: AudioFormat) -> bytes:
    """44-byte canonical RIFF/WAVE header for ``fmt`` with streaming sizes (``0xFFFFFFFF``).

    PCM formats use format tag 1 and 16 bits per sample; μ-law uses tag 7 and 8 bits per sample.
    """
    tag = WAVE_FORMAT_MULAW if fmt.codec == "mulaw" else WAVE_FORMAT_PCM
    width = fmt.sample_width_bytes
    return b"".join(
        (
            b"RIFF",
            struct.pack("<I", WAV_UNKNOWN_SIZE),
            b"WAVE",
            b"fmt ",
            struct.pack(
                "<IHHIIHH",
                16,  # fmt chunk size
                tag,
                1,  # channels
                fmt.sample_rate_hz,
                fmt.sample_rate_hz * width,  # byte rate
                width,  # block align
                8 * width,  # bits per sample
            ),
            b"data",
            struct.pack("<I", WAV_UNKNOWN_SIZE),
        )
    )


def strip_wav_header(data: bytes) -> bytes:
    """Return ``data`` without a leading RIFF/WAVE header; unchanged if it does not start with RIFF.

    Walks the RIFF sub-chunks up to the ``data`` chunk header and returns what follows it, so
    headers with extra chunks (``LIST``, ``fact``, 18-byte ``fmt``) are handled. If no ``data``
    chunk header is found within the bytes given, the canonical 44 bytes are dropped.
    """
    if not data.startswith(b"RIFF"):
        return data
    pos = 12  # "RIFF" size "WAVE"
    while pos + 8 <= len(data):
        chunk_id = data[pos : pos + 4]
        (size,) = struct.unpack_from("<I", data, pos + 4)
        if chunk_id == b"data":
            return data[pos + 8 :]
        pos += 8 + size + (size & 1)
    return data[WAV_HEADER_BYTES:]
