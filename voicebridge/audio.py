"""Audio for the bridge: media-format negotiation, stateful transcoding, duration arithmetic.

Sans-I/O: plain functions and small state objects, no sockets, no event loop, no logging.

Formats
-------
AudioCodes VoiceAI Connect offers Bot API media format strings in ``session.initiate``
(``supportedMediaFormats``): ``raw/lpcm16`` (16 kHz), ``raw/lpcm16_8`` (8 kHz),
``raw/lpcm16_24`` (24 kHz), all 16-bit signed little-endian mono, ``raw/mulaw`` (G.711 μ-law,
8 kHz, 8 bit) and the ``wav/`` twin of each. OpenAI Realtime (GA) takes ``audio/pcm`` (24 kHz
int16 LE mono only), ``audio/pcmu`` (G.711 μ-law 8 kHz) or ``audio/pcma`` (A-law; AudioCodes never
offers A-law, so it is not used here).

:func:`negotiate` picks the first format of a preference list that was offered:

==================  =========================  ===========  ===================================
AudioCodes          OpenAI                     passthrough  work per chunk
==================  =========================  ===========  ===================================
raw/lpcm16_24       audio/pcm, 24 kHz          yes          none (base64 forwarded untouched)
raw/mulaw           audio/pcmu                 yes          none (base64 forwarded untouched)
wav/lpcm16_24       audio/pcm, 24 kHz          no           strip / add WAV header only
wav/mulaw           audio/pcmu                 no           strip / add WAV header only
raw|wav/lpcm16      audio/pcm, 24 kHz          no           soxr 16k<->24k (+ WAV header work)
raw|wav/lpcm16_8    audio/pcm, 24 kHz          no           soxr 8k<->24k (+ WAV header work)
==================  =========================  ===========  ===================================

Resampling
----------
One :class:`soxr.ResampleStream` per direction per call, quality :data:`RESAMPLE_QUALITY`
(``"HQ"``). Filter state is kept across chunks; chunks are never resampled independently and
nothing is padded with silence. The streams run on float32 internally (int16 samples converted
without scaling, rounded and clipped back to int16 here): measured, this makes the output
bit-identical however the input is chunked, while soxr's own int16 output path adds a TPDF dither
that makes it differ by up to 2 LSB between chunkings. Cost of that choice: about 3 µs per 20 ms
chunk. Whole ``up``/``down`` call with resampling: roughly 15-40 µs per 20 ms chunk on the dev box
(base64 decode + soxr + int16 conversion + base64 encode); header-only work is under 1 µs except on
the first chunk of a play stream (2-11 µs: decode, prefix, re-encode).

Filter delay: the resampler holds back audio. Measured with 20 ms chunks (HQ): 16 kHz side about
22 ms on average (37 ms worst), 8 kHz side about 43 ms average (73 ms worst); soxr emits output in
bursts, so ``up``/``down`` often return ``""`` for one chunk and a double portion for the next.
MQ has the same delay and cost with less stop-band rejection (-121 dB vs -140 dB), so HQ is used.
The held-back tail is only emitted by ``flush_up()`` / ``flush_down()``: call ``flush_down()`` at
the end of each assistant audio item (before ``playStream.stop``), or the last ~40-70 ms of speech
are lost; ``flush_up()`` on ``userStream.stop``; ``reset_down()`` on barge-in. Over a stream,
total output samples equal ``round(input samples × ratio)`` after a flush.

Odd byte counts: int16 paths carry a trailing odd byte to the next chunk (never dropped).

WAV framing (UNVERIFIED: AudioCodes does not document how ``wav/`` is framed in streaming mode)
------------------------------------------------------------------------------------------------
Our reading, each part a one-line change:

* Inbound (``userStream.chunk``): any chunk whose base64 starts with ``"UklGR"`` (the base64 of
  ``b"RIFF"``) and whose bytes are a RIFF/WAVE header is stripped up to the first byte of the
  ``data`` sub-chunk payload. The sub-chunk list is walked (``fmt``, ``LIST``, ``fact``, ... of any
  size), never a fixed 44 bytes. A header split across chunks is buffered (at most
  :data:`MAX_WAV_HEADER_BYTES`). This covers both "header on the first chunk of each user stream"
  and "header on every chunk". The declared ``data`` size is ignored (streams are open-ended).
  Chunks without a header are bare samples and go through untouched where possible.
* Outbound (``playStream.chunk``): if :data:`WAV_HEADER_ON_PLAY_START` is true, the first chunk of
  each play stream (``down(b64, first_of_stream=True)``) is prefixed with :func:`wav_header`: a
  44-byte canonical header whose RIFF and ``data`` size fields are ``0xFFFFFFFF``
  (:data:`WAV_STREAMING_SIZE`, the "unknown length, streaming" marker ffmpeg and sox use).

Durations
---------
:func:`ms_of_b64` computes a chunk's duration from the base64 string's length and padding only
(O(1), no decoding). A WAV header inside a chunk counts as audio there (44 bytes ≈ 0.9 ms at
48 bytes/ms); the caller may subtract it if it matters.
"""

from __future__ import annotations

import binascii
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final, Protocol, runtime_checkable

import numpy as np
import soxr

__all__ = [
    "DEFAULT_PREFERENCE",
    "FORMATS",
    "MAX_WAV_HEADER_BYTES",
    "OPENAI_PCM_RATE_HZ",
    "RESAMPLE_QUALITY",
    "WAV_HEADER_ON_PLAY_START",
    "WAV_STREAMING_SIZE",
    "MediaFormat",
    "Negotiated",
    "NoCommonFormat",
    "StreamTranscoder",
    "Transcoder",
    "WavInfo",
    "b64_decoded_len",
    "make_transcoder",
    "ms_of_b64",
    "ms_to_bytes",
    "mulaw_decode",
    "mulaw_encode",
    "negotiate",
    "parse_wav_header",
    "strip_wav_header",
    "wav_header",
]

# --- constants -----------------------------------------------------------------------------------

OPENAI_PCM_RATE_HZ: Final = 24000
"""The only sample rate OpenAI Realtime accepts for ``audio/pcm`` (Hz)."""

RESAMPLE_QUALITY: Final = "HQ"
"""soxr quality recipe for both directions (measured: same delay and cost as "MQ", better stop band)."""

WAV_HEADER_ON_PLAY_START: bool = True
"""For ``wav/`` formats: prefix the first chunk of each play stream with :func:`wav_header`."""

WAV_STREAMING_SIZE: Final = 0xFFFFFFFF
"""Value written to the RIFF and ``data`` size fields of an outbound header (unknown length)."""

MAX_WAV_HEADER_BYTES: Final = 65536
"""Largest inbound RIFF header (bytes) buffered while looking for the ``data`` sub-chunk; past
this the buffered bytes are treated as audio (a click rather than lost audio)."""

WAVE_FORMAT_PCM: Final = 1
WAVE_FORMAT_MULAW: Final = 7

_RIFF_B64_PREFIX: Final = "UklGR"  # base64 of b"RIFF" + anything: the first 5 chars are fixed


# --- formats and negotiation ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MediaFormat:
    """One AudioCodes Bot API media format. Audio is always mono; PCM is little-endian.

    ``rate_hz`` is the sample rate in Hz; ``bytes_per_ms`` the bytes of bare audio per
    millisecond (exact, every rate is a multiple of 1 kHz).
    """

    name: str  # AudioCodes string, e.g. "raw/lpcm16_24"
    container: str  # "raw" | "wav"
    codec: str  # "lpcm16" | "mulaw"
    rate_hz: int  # 24000 | 16000 | 8000
    bytes_per_ms: int  # 48 | 32 | 16 | 8

    @property
    def sample_width(self) -> int:
        """Bytes per sample: 2 for lpcm16, 1 for μ-law."""
        return 2 if self.codec == "lpcm16" else 1

    @property
    def is_wav(self) -> bool:
        """True for the ``wav/`` container (header handling needed)."""
        return self.container == "wav"


def _build_formats() -> dict[str, MediaFormat]:
    codecs = (
        ("lpcm16_24", "lpcm16", 24000),
        ("lpcm16", "lpcm16", 16000),
        ("lpcm16_8", "lpcm16", 8000),
        ("mulaw", "mulaw", 8000),
    )
    table: dict[str, MediaFormat] = {}
    for container in ("raw", "wav"):
        for suffix, codec, rate in codecs:
            width = 2 if codec == "lpcm16" else 1
            name = f"{container}/{suffix}"
            table[name] = MediaFormat(name, container, codec, rate, rate // 1000 * width)
    return table


FORMATS: dict[str, MediaFormat] = _build_formats()
"""Every AudioCodes format we support, keyed by its (case-sensitive) Bot API string."""

DEFAULT_PREFERENCE: tuple[str, ...] = (
    "raw/lpcm16_24",
    "raw/mulaw",
    "wav/lpcm16_24",
    "wav/mulaw",
    "raw/lpcm16",
    "wav/lpcm16",
    "raw/lpcm16_8",
    "wav/lpcm16_8",
)
"""Pass-through formats first, then header-only work, then resampling (16 kHz before 8 kHz)."""


class NoCommonFormat(ValueError):
    """No offered media format is both supported and in the preference list.

    The message names what was offered and what we support, suitable for ``session.error``.
    """


@dataclass(frozen=True, slots=True)
class Negotiated:
    """Outcome of :func:`negotiate` for one call.

    ``openai_bytes_per_ms`` is the byte rate (bytes per millisecond) of the OpenAI side: 48 for
    ``audio/pcm`` 24 kHz, 8 for ``audio/pcmu``. ``openai_format`` is a fresh dict per call, ready
    for ``session.update`` ``audio.input.format`` / ``audio.output.format``.
    """

    ac: MediaFormat  # what we answer in session.accepted
    openai_format: dict[str, Any] = field(hash=False)
    openai_bytes_per_ms: int  # 48 or 8
    passthrough: bool  # True: base64 payloads forwarded untouched both ways

    @property
    def resampling(self) -> bool:
        """True when audio is resampled (AudioCodes side at 16 or 8 kHz PCM)."""
        return self.ac.codec == "lpcm16" and self.ac.rate_hz != OPENAI_PCM_RATE_HZ


def negotiate(offered: Sequence[str], preference: Sequence[str] = DEFAULT_PREFERENCE) -> Negotiated:
    """Pick the media format for a call.

    Returns the first entry of ``preference`` that appears in ``offered`` and that we support.
    Unknown strings in either list are ignored; matching is exact and case-sensitive. A bare
    string ``offered`` is taken as a one-element offer; non-string entries are ignored.

    Raises :class:`NoCommonFormat` (a ``ValueError``) if the offer is empty or nothing matches.
    """
    if isinstance(offered, str):
        offered = (offered,)
    offered_list = [o for o in offered if isinstance(o, str)] if offered else []
    offered_set = set(offered_list)
    usable = [p for p in preference if p in FORMATS]
    for name in usable:
        if name in offered_set:
            return _negotiated_for(FORMATS[name])
    if not offered_list:
        reason = "AudioCodes offered no media formats (supportedMediaFormats empty or missing)"
    else:
        reason = f"no common media format: offered {offered_list!r}"
    if usable:
        reason += f"; we accept (in preference order) {usable!r}"
    else:
        reason += (
            f"; the configured preference {list(preference)!r} names no supported format"
            f" (supported: {list(FORMATS)!r})"
        )
    raise NoCommonFormat(reason)


def _negotiated_for(fmt: MediaFormat) -> Negotiated:
    if fmt.codec == "mulaw":
        return Negotiated(fmt, {"type": "audio/pcmu"}, 8, passthrough=not fmt.is_wav)
    openai_fmt = {"type": "audio/pcm", "rate": OPENAI_PCM_RATE_HZ}
    passthrough = fmt.rate_hz == OPENAI_PCM_RATE_HZ and not fmt.is_wav
    return Negotiated(fmt, openai_fmt, 48, passthrough=passthrough)


# --- durations (hot path: O(1), no decoding) -----------------------------------------------------


def b64_decoded_len(s: str) -> int:
    """Number of bytes that base64 string ``s`` decodes to, from its length and padding only.

    Handles padded and unpadded base64; assumes no whitespace. O(1).
    """
    n = len(s)
    if n == 0:
        return 0
    pad = 0
    if s[-1] == "=":
        pad = 2 if n > 1 and s[-2] == "=" else 1
    return (n * 3) // 4 - pad


def ms_of_b64(s: str, bytes_per_ms: int) -> float:
    """Duration in milliseconds of the audio in base64 string ``s`` at ``bytes_per_ms``.

    O(1): uses only the string length and ``=`` padding, never decodes.
    """
    return b64_decoded_len(s) / bytes_per_ms


def ms_to_bytes(ms: float, bytes_per_ms: int, sample_width: int = 1) -> int:
    """Bytes of audio in ``ms`` milliseconds, rounded down to a whole sample of ``sample_width``
    bytes (pass 2 for int16 PCM, ``MediaFormat.sample_width`` in general).

    A 1e-9 byte tolerance keeps values like ``20.000000000000004 ms`` from losing a sample to
    floating point. Raises ``ValueError`` for negative ``ms``.
    """
    if ms < 0:
        raise ValueError(f"negative duration: {ms} ms")
    n = int(ms * bytes_per_ms + 1e-9)
    return n - n % sample_width


# --- G.711 μ-law ---------------------------------------------------------------------------------

_MULAW_BIAS: Final = 0x84
_MULAW_CLIP: Final = 32635


def _build_mulaw_tables() -> tuple[np.ndarray, np.ndarray]:
    # Encoder for every int16 value, indexed by the value's uint16 bit pattern.
    x = np.arange(-32768, 32768, dtype=np.int32)
    sign = np.where(x < 0, 0x80, 0x00)
    mag = np.minimum(np.abs(x), _MULAW_CLIP) + _MULAW_BIAS  # 132 .. 32767
    exponent = np.zeros_like(mag)
    for e in range(1, 8):
        exponent[mag >= (0x80 << e)] = e  # floor(log2(mag >> 7))
    mantissa = (mag >> (exponent + 3)) & 0x0F
    code = (~(sign | (exponent << 4) | mantissa)) & 0xFF
    enc = np.empty(65536, dtype=np.uint8)
    enc[x.astype(np.int16).view(np.uint16)] = code.astype(np.uint8)
    # Decoder for every byte.
    u = (~np.arange(256, dtype=np.int32)) & 0xFF
    ex = (u >> 4) & 0x07
    m = u & 0x0F
    lin = (((m << 3) + _MULAW_BIAS) << ex) - _MULAW_BIAS
    dec = np.where(u & 0x80, -lin, lin).astype(np.int16)
    return enc, dec


_LIN_TO_MULAW, _MULAW_TO_LIN = _build_mulaw_tables()


def mulaw_decode(data: bytes | bytearray | memoryview) -> np.ndarray:
    """Decode G.711 μ-law bytes (8 kHz, 1 byte per sample) to int16 samples (table lookup)."""
    return _MULAW_TO_LIN[np.frombuffer(data, dtype=np.uint8)]


def mulaw_encode(samples: np.ndarray | bytes | bytearray | memoryview) -> bytes:
    """Encode int16 samples to G.711 μ-law bytes (bias 0x84, magnitude clipped at 32635).

    ``samples``: an integer array (values outside int16 are clipped to it) or bytes-like
    int16 little-endian PCM. Table lookup; ``0`` encodes to ``0xFF``. This is the classic 16-bit
    formulation (sign + magnitude, bias, segment search); CPython's ``audioop.lin2ulaw`` truncates
    to 14 bits first and differs by one code at segment edges of 381 negative inputs. Decoding is
    identical to ``audioop.ulaw2lin``.
    """
    if isinstance(samples, (bytes, bytearray, memoryview)):
        arr = np.frombuffer(samples, dtype="<i2")
    else:
        arr = np.asarray(samples)
        if arr.dtype != np.int16:
            arr = np.clip(arr, -32768, 32767).astype(np.int16)
    return _LIN_TO_MULAW[arr.view(np.uint16)].tobytes()


# --- WAV -----------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WavInfo:
    """What an inbound RIFF/WAVE header said.

    ``data_offset``: bytes from the start of the buffer to the first audio byte.
    ``data_size``: the declared ``data`` size in bytes (``0xFFFFFFFF`` or 0 when streaming).
    Format fields are ``None`` if no ``fmt`` sub-chunk preceded ``data``; ``rate_hz`` in Hz.
    """

    data_offset: int
    data_size: int
    format_tag: int | None
    channels: int | None
    rate_hz: int | None
    bits_per_sample: int | None


class _NeedMore:
    """Marker: the buffer starts like a RIFF/WAVE header but the ``data`` sub-chunk is not in it."""


_NEED_MORE: Final = _NeedMore()


def _scan_wav(buf: bytes) -> WavInfo | _NeedMore | None:
    """Walk a RIFF/WAVE header at the start of ``buf``.

    Returns :class:`WavInfo` once the ``data`` sub-chunk header is found, ``_NEED_MORE`` if
    ``buf`` is a valid but incomplete header, ``None`` if ``buf`` is not a RIFF/WAVE header.
    """
    n = len(buf)
    if n < 12:
        plausible = buf[:4] == b"RIFF"[: min(n, 4)] and b"WAVE".startswith(buf[8:])
        return _NEED_MORE if plausible else None
    if buf[:4] != b"RIFF" or buf[8:12] != b"WAVE":
        return None
    tag = channels = rate = bits = None
    pos = 12
    while True:
        if pos + 8 > n:
            return _NEED_MORE
        cid = buf[pos : pos + 4]
        if not all(0x20 <= c < 0x7F for c in cid):
            return None  # not a chunk id: garbage, not a header
        (size,) = struct.unpack_from("<I", buf, pos + 4)
        if cid == b"data":
            return WavInfo(pos + 8, size, tag, channels, rate, bits)
        if cid == b"fmt " and size >= 16:
            if pos + 8 + 16 > n:
                return _NEED_MORE
            tag, channels, rate, _byte_rate, _align, bits = struct.unpack_from("<HHIIHH", buf, pos + 8)
        pos += 8 + size + (size & 1)  # sub-chunks are padded to even length


def parse_wav_header(data: bytes) -> WavInfo | None:
    """Parse a RIFF/WAVE header at the start of ``data`` (any sub-chunks, any ``fmt`` size).

    Returns ``None`` if ``data`` does not start with a complete header up to the ``data``
    sub-chunk's 8-byte header.
    """
    res = _scan_wav(bytes(data))
    return res if isinstance(res, WavInfo) else None


def strip_wav_header(data: bytes) -> bytes:
    """``data`` without a leading RIFF/WAVE header (unchanged if it has no complete header)."""
    info = parse_wav_header(data)
    return data[info.data_offset :] if info is not None else data


def wav_header(fmt: MediaFormat) -> bytes:
    """44-byte canonical RIFF/WAVE header for ``fmt`` (mono), for streaming.

    PCM: format tag 1, 16 bits per sample. μ-law: format tag 7 (WAVE_FORMAT_MULAW), 8 bits per
    sample, with a 16-byte ``fmt`` chunk (no ``cbSize``, no ``fact`` chunk) so the header stays
    44 bytes. Both the RIFF size and the ``data`` size are :data:`WAV_STREAMING_SIZE`
    (``0xFFFFFFFF``): the length is unknown when the header is sent.
    """
    tag = WAVE_FORMAT_MULAW if fmt.codec == "mulaw" else WAVE_FORMAT_PCM
    width = fmt.sample_width
    return (
        b"RIFF"
        + struct.pack("<I", WAV_STREAMING_SIZE)
        + b"WAVE"
        + b"fmt "
        + struct.pack("<IHHIIHH", 16, tag, 1, fmt.rate_hz, fmt.rate_hz * width, width, 8 * width)
        + b"data"
        + struct.pack("<I", WAV_STREAMING_SIZE)
    )


# --- transcoding ---------------------------------------------------------------------------------


@runtime_checkable
class Transcoder(Protocol):
    """Per-call converter between the AudioCodes format and the OpenAI format.

    All chunks are base64 strings; a returned ``""`` means "nothing to send yet" (filter delay,
    a held-back odd byte, a header still being buffered). Methods raise ``binascii.Error`` (a
    ``ValueError``) on malformed base64 when they have to decode.
    """

    def up(self, b64_chunk: str) -> str:
        """AudioCodes ``userStream.chunk`` payload → OpenAI ``input_audio_buffer.append`` audio."""
        ...

    def down(self, b64_chunk: str, first_of_stream: bool = False) -> str:
        """OpenAI ``response.output_audio.delta`` → AudioCodes ``playStream.chunk`` payload.

        ``first_of_stream=True`` for the first chunk after ``playStream.start``: drops any
        leftover downstream state and, for ``wav/``, prefixes the WAV header.
        """
        ...

    def flush_up(self) -> str:
        """Emit the upstream filter tail (end of a user stream) and reset upstream state."""
        ...

    def flush_down(self) -> str:
        """Emit the downstream filter tail (end of an assistant item, before ``playStream.stop``)
        and reset downstream state."""
        ...

    def reset_up(self) -> None:
        """Drop upstream state without emitting it."""
        ...

    def reset_down(self) -> None:
        """Drop downstream state (new play stream / barge-in flush) without emitting it."""
        ...


_EMPTY_F32: Final = np.zeros(0, dtype=np.float32)
_EMPTY_I16: Final = np.zeros(0, dtype="<i2")


class _Resampler:
    """One direction of stateful int16 mono resampling over a float32 soxr stream."""

    __slots__ = ("_rs", "_dirty")

    def __init__(self, in_rate_hz: int, out_rate_hz: int, quality: str) -> None:
        self._rs = soxr.ResampleStream(in_rate_hz, out_rate_hz, 1, dtype="float32", quality=quality)
        self._dirty = False  # True once samples went in since the last clear

    @staticmethod
    def _to_int16(y: np.ndarray) -> np.ndarray:
        # In place on soxr's fresh output; ufuncs, because np.clip's wrapper costs ~5 µs.
        np.rint(y, out=y)
        np.minimum(y, 32767.0, out=y)
        np.maximum(y, -32768.0, out=y)
        return y.astype("<i2")

    def process(self, x: np.ndarray) -> np.ndarray:
        """Feed int16 samples; return the int16 samples that are ready (maybe none)."""
        if x.size == 0:
            return _EMPTY_I16
        self._dirty = True
        return self._to_int16(self._rs.resample_chunk(x.astype(np.float32)))

    def flush(self) -> np.ndarray:
        """Return the held-back tail (int16) and make the stream ready for a new signal."""
        if not self._dirty:
            return _EMPTY_I16
        y = self._rs.resample_chunk(_EMPTY_F32, last=True)
        self._rs.clear()
        self._dirty = False
        return self._to_int16(y)

    def reset(self) -> None:
        """Discard state (about 45 µs when there is state, free otherwise)."""
        if self._dirty:
            self._rs.clear()
            self._dirty = False


def _b64(data: bytes) -> str:
    return binascii.b2a_base64(data, newline=False).decode("ascii") if data else ""


def _b64decode(s: str) -> bytes:
    # Strict mode is twice as fast on well-formed input; anything else (line breaks, missing
    # padding) falls back to the lenient decoder, which raises binascii.Error only if hopeless.
    try:
        return binascii.a2b_base64(s, strict_mode=True)
    except binascii.Error:
        t = "".join(s.split())
        return binascii.a2b_base64(t + "=" * (-len(t) % 4))


class StreamTranscoder:
    """The :class:`Transcoder` for every non-passthrough negotiation (see the module docstring).

    ``up``: strip inbound WAV headers (``wav/``), carry odd bytes (PCM), resample to 24 kHz
    (16/8 kHz PCM). ``down``: carry odd bytes (PCM), resample from 24 kHz, prefix the WAV header
    on the first chunk of a play stream (``wav/``, if ``wav_header_on_play_start``).
    """

    def __init__(
        self,
        neg: Negotiated,
        *,
        wav_header_on_play_start: bool = True,
        quality: str = RESAMPLE_QUALITY,
    ) -> None:
        fmt = neg.ac
        self.fmt = fmt
        self._wav = fmt.is_wav
        self._pcm = fmt.codec == "lpcm16"
        self._header = wav_header(fmt) if self._wav and wav_header_on_play_start else b""
        self._up_rs: _Resampler | None = None
        self._down_rs: _Resampler | None = None
        if neg.resampling:
            self._up_rs = _Resampler(fmt.rate_hz, OPENAI_PCM_RATE_HZ, quality)
            self._down_rs = _Resampler(OPENAI_PCM_RATE_HZ, fmt.rate_hz, quality)
        self._up_carry = b""
        self._down_carry = b""
        self._hdr_pending: bytes | None = None  # start of an inbound RIFF header split over chunks
        self.inbound_wav: WavInfo | None = None
        """The last inbound WAV header seen (for diagnostics: it is not checked against ``fmt``)."""

    # -- upstream ---------------------------------------------------------------------------------

    def _strip(self, buf: bytes) -> bytes | None:
        """Strip a RIFF header off ``buf``; ``None`` while the header is still incomplete."""
        res = _scan_wav(buf)
        if isinstance(res, _NeedMore):
            if len(buf) <= MAX_WAV_HEADER_BYTES:
                self._hdr_pending = buf
                return None
            res = None  # give up: treat as audio
        self._hdr_pending = None
        if res is None:
            return buf
        self.inbound_wav = res
        return buf[res.data_offset :]

    def up(self, b64_chunk: str) -> str:
        """AudioCodes → OpenAI (base64 in, base64 out; ``""`` if nothing to emit yet)."""
        data: bytes | None = None
        if self._wav:
            if self._hdr_pending is not None:
                data = self._strip(self._hdr_pending + _b64decode(b64_chunk))
                if data is None:
                    return ""
            elif b64_chunk.startswith(_RIFF_B64_PREFIX):
                data = self._strip(_b64decode(b64_chunk))
                if data is None:
                    return ""
        if not self._pcm:  # μ-law: bytes are samples
            return b64_chunk if data is None else _b64(data)
        if data is None:
            if self._up_rs is None and not self._up_carry and b64_decoded_len(b64_chunk) % 2 == 0:
                return b64_chunk  # header-free, whole samples, no resampling: untouched
            data = _b64decode(b64_chunk)
        if self._up_carry:
            data = self._up_carry + data
        if len(data) & 1:
            self._up_carry = data[-1:]
            data = data[:-1]
        else:
            self._up_carry = b""
        if self._up_rs is None:
            return _b64(data)
        return _b64(self._up_rs.process(np.frombuffer(data, dtype="<i2")).tobytes())

    def flush_up(self) -> str:
        """End of a user stream: emit the resampler tail, drop a dangling odd byte or partial header."""
        self._up_carry = b""
        self._hdr_pending = None
        if self._up_rs is None:
            return ""
        return _b64(self._up_rs.flush().tobytes())

    def reset_up(self) -> None:
        """Drop all upstream state without emitting it."""
        self._up_carry = b""
        self._hdr_pending = None
        if self._up_rs is not None:
            self._up_rs.reset()

    # -- downstream -------------------------------------------------------------------------------

    def down(self, b64_chunk: str, first_of_stream: bool = False) -> str:
        """OpenAI → AudioCodes (base64 in, base64 out; ``""`` if nothing to emit yet).

        ``first_of_stream=True`` (first chunk after ``playStream.start``) first drops leftover
        downstream state (an un-flushed tail of the previous stream), then for ``wav/`` prefixes
        :func:`wav_header` (when enabled) even if the chunk itself yields no samples yet.
        """
        prefix = b""
        if first_of_stream:
            self.reset_down()
            prefix = self._header
        if not self._pcm:  # μ-law
            if not prefix:
                return b64_chunk
            return _b64(prefix + _b64decode(b64_chunk))
        if (
            not prefix
            and self._down_rs is None
            and not self._down_carry
            and b64_decoded_len(b64_chunk) % 2 == 0
        ):
            return b64_chunk
        data = _b64decode(b64_chunk)
        if self._down_carry:
            data = self._down_carry + data
        if len(data) & 1:
            self._down_carry = data[-1:]
            data = data[:-1]
        else:
            self._down_carry = b""
        if self._down_rs is not None:
            data = self._down_rs.process(np.frombuffer(data, dtype="<i2")).tobytes()
        return _b64(prefix + data)

    def flush_down(self) -> str:
        """End of an assistant item: emit the resampler tail and reset downstream state."""
        self._down_carry = b""
        if self._down_rs is None:
            return ""
        return _b64(self._down_rs.flush().tobytes())

    def reset_down(self) -> None:
        """Drop downstream state (barge-in flush / new play stream) without emitting it."""
        self._down_carry = b""
        if self._down_rs is not None:
            self._down_rs.reset()


def make_transcoder(neg: Negotiated) -> Transcoder | None:
    """The converter pair for a negotiated call, or ``None`` for pure passthrough.

    Reads :data:`WAV_HEADER_ON_PLAY_START` at call time.
    """
    if neg.passthrough:
        return None
    return StreamTranscoder(neg, wav_header_on_play_start=WAV_HEADER_ON_PLAY_START)
