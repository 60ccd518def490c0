"""Tests for voicebridge.audio: negotiation, durations, μ-law, streaming resampling, WAV framing."""

from __future__ import annotations

import base64
import io
import struct
import time
import wave
from collections.abc import Callable, Iterator

import numpy as np
import pytest
import soxr
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from voicebridge import audio
from voicebridge.audio import (
    DEFAULT_PREFERENCE,
    FORMATS,
    MediaFormat,
    Negotiated,
    NoCommonFormat,
    StreamTranscoder,
    Transcoder,
    b64_decoded_len,
    make_transcoder,
    ms_of_b64,
    ms_to_bytes,
    mulaw_decode,
    mulaw_encode,
    negotiate,
    parse_wav_header,
    strip_wav_header,
    wav_header,
)

# --- helpers -------------------------------------------------------------------------------------


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def unb64(s: str) -> bytes:
    return base64.b64decode(s)


def sine(rate_hz: int, n: int, freq_hz: float = 440.0, amp: float = 10000.0, phase: float = 0.0) -> np.ndarray:
    """``n`` int16 samples of a sine at ``freq_hz`` sampled at ``rate_hz``."""
    t = np.arange(n) / rate_hz
    return np.round(amp * np.sin(2 * np.pi * freq_hz * t + phase)).astype("<i2")


def split(data: bytes, sizes: list[int]) -> Iterator[bytes]:
    """Cut ``data`` into pieces of the given sizes (cycled), last piece is the remainder."""
    pos, i = 0, 0
    while pos < len(data):
        k = sizes[i % len(sizes)]
        yield data[pos : pos + k]
        pos += k
        i += 1


def run_stream(fn: Callable[[str], str], flush: Callable[[], str], pieces: Iterator[bytes]) -> bytes:
    """Feed base64 pieces through ``fn``, flush, and return all decoded output bytes."""
    out = [unb64(fn(b64(p))) for p in pieces]
    out.append(unb64(flush()))
    return b"".join(out)


def reference_resample(x: np.ndarray, in_hz: int, out_hz: int) -> np.ndarray:
    """One-shot soxr of the whole signal, rounded to int16: what streaming must reproduce."""
    y = soxr.resample(x.astype(np.float32), in_hz, out_hz, quality=audio.RESAMPLE_QUALITY)
    return np.clip(np.rint(y), -32768, 32767).astype("<i2")


def transcoder(name: str) -> StreamTranscoder:
    t = make_transcoder(negotiate([name]))
    assert isinstance(t, StreamTranscoder)
    return t


def wav_with_extras(fmt_tag: int, rate: int, bits: int, payload: bytes) -> bytes:
    """A RIFF/WAVE file that is not 44 bytes up to the data: 18-byte fmt, odd-size LIST, fact."""
    width = bits // 8
    fmt = struct.pack("<HHIIHHH", fmt_tag, 1, rate, rate * width, width, bits, 0)  # with cbSize
    info = b"INFOISFT" + struct.pack("<I", 5) + b"vbr1\x00"  # 17 bytes: odd, needs a pad byte
    chunks = (
        b"fmt " + struct.pack("<I", len(fmt)) + fmt
        + b"LIST" + struct.pack("<I", len(info)) + info + b"\x00"
        + b"fact" + struct.pack("<I", 4) + struct.pack("<I", len(payload) // width)
        + b"data" + struct.pack("<I", len(payload)) + payload
    )
    return b"RIFF" + struct.pack("<I", 4 + len(chunks)) + b"WAVE" + chunks


# --- formats and negotiation ---------------------------------------------------------------------


def test_formats_table() -> None:
    assert set(FORMATS) == {
        f"{c}/{s}" for c in ("raw", "wav") for s in ("lpcm16_24", "lpcm16", "lpcm16_8", "mulaw")
    }
    expect = {"lpcm16_24": (24000, 48), "lpcm16": (16000, 32), "lpcm16_8": (8000, 16), "mulaw": (8000, 8)}
    for name, fmt in FORMATS.items():
        container, suffix = name.split("/")
        assert fmt.name == name and fmt.container == container
        assert (fmt.rate_hz, fmt.bytes_per_ms) == expect[suffix]
        assert fmt.codec == ("mulaw" if suffix == "mulaw" else "lpcm16")
        assert fmt.bytes_per_ms == fmt.rate_hz // 1000 * fmt.sample_width
    assert set(DEFAULT_PREFERENCE) == set(FORMATS)


@pytest.mark.parametrize("name", list(FORMATS))
def test_negotiate_single_offer_mapping(name: str) -> None:
    neg = negotiate([name])
    assert neg.ac is FORMATS[name]
    if neg.ac.codec == "mulaw":
        assert neg.openai_format == {"type": "audio/pcmu"}
        assert neg.openai_bytes_per_ms == 8
    else:
        assert neg.openai_format == {"type": "audio/pcm", "rate": 24000}
        assert neg.openai_bytes_per_ms == 48
    assert neg.passthrough == (name in ("raw/lpcm16_24", "raw/mulaw"))
    assert neg.resampling == (name.split("/")[1] in ("lpcm16", "lpcm16_8"))


def test_negotiate_follows_preference_not_offer_order() -> None:
    rasa_offer = ["raw/lpcm16", "wav/lpcm16", "raw/lpcm16_24", "wav/lpcm16_24", "raw/mulaw", "wav/mulaw"]
    assert negotiate(rasa_offer).ac.name == "raw/lpcm16_24"
    assert negotiate(["raw/lpcm16", "raw/mulaw"]).ac.name == "raw/mulaw"
    assert negotiate(["wav/lpcm16_8", "raw/lpcm16_8", "wav/lpcm16"]).ac.name == "wav/lpcm16"
    assert negotiate(["wav/lpcm16_8", "raw/lpcm16_8"]).ac.name == "raw/lpcm16_8"
    # Default preference walked in order against the full offer, one removal at a time.
    offer = list(FORMATS)
    for expected in DEFAULT_PREFERENCE:
        assert negotiate(offer).ac.name == expected
        offer.remove(expected)


def test_negotiate_configurable_preference() -> None:
    offer = ["raw/lpcm16_24", "raw/mulaw", "raw/lpcm16"]
    assert negotiate(offer, ("raw/lpcm16", "raw/lpcm16_24")).ac.name == "raw/lpcm16"
    assert negotiate(offer, ["raw/mulaw"]).ac.name == "raw/mulaw"
    with pytest.raises(NoCommonFormat):
        negotiate(offer, ("wav/mulaw",))


def test_negotiate_ignores_unknown_and_is_case_sensitive() -> None:
    offer = ["raw/alaw", "RAW/LPCM16_24", "audio/pcm", "raw/lpcm16"]
    assert negotiate(offer).ac.name == "raw/lpcm16"
    assert negotiate(["raw/mulaw"], ("raw/opus", "raw/mulaw")).ac.name == "raw/mulaw"
    assert negotiate(["raw/mulaw", 7, None]).ac.name == "raw/mulaw"  # type: ignore[list-item]
    assert negotiate("raw/mulaw").ac.name == "raw/mulaw"  # a bare string is one offer


def test_no_common_format_messages() -> None:
    assert issubclass(NoCommonFormat, ValueError)
    with pytest.raises(NoCommonFormat) as e:
        negotiate([])
    assert "no media formats" in str(e.value) and "raw/lpcm16_24" in str(e.value)
    with pytest.raises(NoCommonFormat) as e:
        negotiate(["raw/alaw", "RAW/MULAW"])
    msg = str(e.value)
    assert "raw/alaw" in msg and "RAW/MULAW" in msg  # what was offered
    assert all(name in msg for name in DEFAULT_PREFERENCE)  # what we accept
    with pytest.raises(NoCommonFormat) as e:
        negotiate(["raw/mulaw"], ("raw/opus",))
    assert "raw/opus" in str(e.value) and "no supported format" in str(e.value)


def test_negotiated_openai_format_is_fresh() -> None:
    a, b = negotiate(["raw/mulaw"]), negotiate(["raw/mulaw"])
    a.openai_format["x"] = 1
    assert "x" not in b.openai_format
    assert isinstance(a, Negotiated) and isinstance(a.ac, MediaFormat)


# --- durations -----------------------------------------------------------------------------------


@given(st.binary(max_size=4000), st.sampled_from([48, 32, 16, 8]))
def test_ms_of_b64_exact(data: bytes, bytes_per_ms: int) -> None:
    s = b64(data)
    assert b64_decoded_len(s) == len(data)
    assert ms_of_b64(s, bytes_per_ms) == len(data) / bytes_per_ms
    unpadded = s.rstrip("=")
    assert b64_decoded_len(unpadded) == len(data)
    assert ms_of_b64(unpadded, bytes_per_ms) == len(data) / bytes_per_ms


def test_ms_of_b64_reference_values() -> None:
    assert ms_of_b64("", 48) == 0
    assert ms_of_b64(b64(bytes(960)), 48) == 20.0  # 1280 chars
    assert len(b64(bytes(160))) == 216 and ms_of_b64(b64(bytes(160)), 8) == 20.0


@given(st.integers(0, 10**7), st.sampled_from([(48, 2), (32, 2), (16, 2), (8, 1)]))
def test_ms_to_bytes_round_trip(n_samples: int, fmt: tuple[int, int]) -> None:
    bytes_per_ms, width = fmt
    n_bytes = n_samples * width
    assert ms_to_bytes(n_bytes / bytes_per_ms, bytes_per_ms, width) == n_bytes


def test_ms_to_bytes() -> None:
    assert ms_to_bytes(20, 48, 2) == 960
    assert ms_to_bytes(20, 8) == 160
    assert ms_to_bytes(0.03, 48, 2) == 0  # 1.44 bytes: less than one sample
    assert ms_to_bytes(1 / 48 * 3, 48, 2) == 2  # 3 bytes → 1 whole sample
    assert ms_to_bytes(0.1 * 3, 48, 2) == 14  # 14.4 bytes → 7 samples, despite 0.30000000000000004
    with pytest.raises(ValueError):
        ms_to_bytes(-1, 48)


# --- μ-law ---------------------------------------------------------------------------------------


def g711_segment(magnitude: int) -> int:
    """G.711 segment (exponent) of a magnitude before biasing."""
    return ((min(magnitude, 32635) + 0x84) >> 7).bit_length() - 1


def test_mulaw_decode_table_matches_g711() -> None:
    dec = mulaw_decode(bytes(range(256)))
    assert dec.dtype == np.int16
    for code in range(256):
        u = ~code & 0xFF
        e, m = (u >> 4) & 7, u & 0x0F
        mag = (((m << 3) + 0x84) << e) - 0x84
        assert dec[code] == (-mag if u & 0x80 else mag)
    assert dec[0xFF] == 0 and dec[0x7F] == 0 and dec[0x80] == 32124 and dec[0x00] == -32124


def test_mulaw_round_trip_error_bound() -> None:
    x = np.arange(-32768, 32768, dtype=np.int32)
    y = mulaw_decode(mulaw_encode(x.astype(np.int16))).astype(np.int32)
    mag = np.abs(x)
    seg = np.array([g711_segment(int(v)) for v in range(32769)])[mag]
    half_step = 1 << (seg + 2)  # decoder returns the midpoint of the 2**(seg+3)-wide interval
    err = np.abs(y - x)
    in_range = mag <= 32635
    assert np.all(err[in_range] <= half_step[in_range])
    assert np.all(np.sign(y[mag > 8]) == np.sign(x[mag > 8]))
    # Clipped inputs decode to the largest level.
    assert np.all(np.abs(y[~in_range]) == 32124)
    # Monotonic and idempotent.
    assert np.all(np.diff(y) >= 0)
    codes = bytes(range(256))
    re = mulaw_encode(mulaw_decode(codes))
    assert all(re[c] == c for c in range(256) if c != 0x7F) and re[0x7F] == 0xFF
    assert mulaw_encode(np.zeros(3, np.int16)) == b"\xff\xff\xff"
    # bytes-like input is int16 LE; wider ints are clipped.
    assert mulaw_encode(np.array([1000, -1000], "<i2").tobytes()) == mulaw_encode(np.array([1000, -1000]))
    assert mulaw_encode(np.array([70000, -70000])) == mulaw_encode(np.array([32767, -32768], np.int16))


def test_mulaw_against_audioop_if_available() -> None:
    audioop = pytest.importorskip("audioop")  # stdlib until 3.12, removed in 3.13
    x = np.arange(-32768, 32768, dtype=np.int16)
    assert np.array_equal(mulaw_decode(bytes(range(256))), np.frombuffer(audioop.ulaw2lin(bytes(range(256)), 2), "<i2"))
    ours = np.frombuffer(mulaw_encode(x), np.uint8).astype(int)
    theirs = np.frombuffer(audioop.lin2ulaw(x.tobytes(), 2), np.uint8).astype(int)
    # audioop truncates to 14 bits before biasing; it differs by one code only at segment edges
    # of negative inputs.
    diff = ours != theirs
    assert np.all(np.abs(ours - theirs) <= 1) and np.all(x[diff] < 0) and diff.mean() < 0.01


# --- streaming resampling ------------------------------------------------------------------------

RESAMPLING = ["raw/lpcm16", "raw/lpcm16_8"]


@pytest.mark.parametrize("name", RESAMPLING)
@pytest.mark.parametrize("direction", ["up", "down"])
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=40), phase=st.floats(0, 6.28))
def test_chunking_does_not_change_output(name: str, direction: str, sizes: list[int], phase: float) -> None:
    """Fed in random byte-sized chunks (odd sizes included) == fed in one piece == one-shot soxr."""
    ac_rate = FORMATS[name].rate_hz
    in_rate, out_rate = (ac_rate, 24000) if direction == "up" else (24000, ac_rate)
    x = sine(in_rate, in_rate // 2, freq_hz=440, phase=phase) + sine(in_rate, in_rate // 2, 1700, 3000)
    data = x.tobytes()

    def run(pieces: Iterator[bytes]) -> bytes:
        t = transcoder(name)
        if direction == "up":
            return run_stream(t.up, t.flush_up, pieces)
        return run_stream(t.down, t.flush_down, pieces)

    chunked = run(split(data, sizes))
    whole = run(iter([data]))
    assert chunked == whole
    assert whole == reference_resample(x, in_rate, out_rate).tobytes()


@pytest.mark.parametrize("name", RESAMPLING)
@pytest.mark.parametrize("direction", ["up", "down"])
def test_resampled_stream_length_frequency_and_continuity(name: str, direction: str) -> None:
    ac_rate = FORMATS[name].rate_hz
    in_rate, out_rate = (ac_rate, 24000) if direction == "up" else (24000, ac_rate)
    n_in = in_rate * 2 + 7  # not a whole number of output samples
    freq = 1000.0
    x = sine(in_rate, n_in, freq)
    t = transcoder(name)
    fn, flush = (t.up, t.flush_up) if direction == "up" else (t.down, t.flush_down)
    frame = in_rate // 50 * 2  # 20 ms
    data = x.tobytes()
    parts = [unb64(fn(b64(data[i : i + frame]))) for i in range(0, len(data), frame)]
    before_flush = sum(len(p) for p in parts) // 2
    parts.append(unb64(flush()))
    y = np.frombuffer(b"".join(parts), "<i2")
    ratio = out_rate / in_rate
    # Length: the whole stream comes out after the flush; the flush holds at most the filter delay.
    assert abs(len(y) - n_in * ratio) <= 0.5
    assert len(y) - before_flush <= 0.1 * out_rate  # tail < 100 ms
    # Frequency preserved.
    spec = np.abs(np.fft.rfft(y * np.hanning(len(y))))
    peak_hz = np.argmax(spec) * out_rate / len(y)
    assert abs(peak_hz - freq) <= out_rate / len(y)
    # No clicks: sample-to-sample steps bounded by the ideal sine's largest step (+ ringing margin).
    ideal_step = 2 * np.pi * freq * 10000 / out_rate
    steps = np.abs(np.diff(y[out_rate // 10 : -out_rate // 10].astype(np.int32)))
    assert steps.max() <= ideal_step * 1.02 + 2
    # Amplitude preserved (pass band).
    mid = y[out_rate // 10 : -out_rate // 10]
    assert abs(np.abs(mid).max() - 10000) < 100


def test_continuity_check_catches_stateless_resampling() -> None:
    """The click check above has teeth: per-chunk independent resampling fails it."""
    x = sine(16000, 16000, 1000.0)
    y = np.concatenate([reference_resample(x[i : i + 320], 16000, 24000) for i in range(0, len(x), 320)])
    steps = np.abs(np.diff(y[2400:-2400].astype(np.int32)))
    assert steps.max() > 2 * np.pi * 1000 * 10000 / 24000 * 1.02 + 2


def test_odd_byte_carry_up_and_down() -> None:
    t = transcoder("raw/lpcm16")
    x = sine(16000, 3200)
    data = x.tobytes()
    out_odd = run_stream(t.up, t.flush_up, iter([data[:1], data[1:4], data[4:641], data[641:]]))
    t2 = transcoder("raw/lpcm16")
    assert out_odd == run_stream(t2.up, t2.flush_up, iter([data]))
    assert t.up(b64(b"\x01")) == ""  # one byte: nothing yet, carried
    # A lone byte left at the end of a stream is dropped by the flush, not carried into the next.
    t.flush_up()
    assert t._up_carry == b""
    # Header-only PCM format: outputs are whole samples and concatenate to the input.
    h = transcoder("wav/lpcm16_24")
    pieces = [data[:3], data[3:6], data[6:7], data[7:]]
    outs = [unb64(h.up(b64(p))) for p in pieces]
    assert all(len(o) % 2 == 0 for o in outs) and b"".join(outs) == data
    outs = [unb64(h.down(b64(p))) for p in pieces]
    assert all(len(o) % 2 == 0 for o in outs) and b"".join(outs) == data


def test_reset_and_flush_down_restart_cleanly() -> None:
    x = sine(24000, 4800).tobytes()
    fresh = transcoder("raw/lpcm16")
    expected = run_stream(fresh.down, fresh.flush_down, iter([x]))
    t = transcoder("raw/lpcm16")
    t.down(b64(sine(24000, 2400, 300).tobytes()))  # an interrupted stream
    t.reset_down()
    assert run_stream(t.down, t.flush_down, iter([x])) == expected
    # first_of_stream drops an un-flushed tail of the previous stream.
    t.down(b64(sine(24000, 2400, 300).tobytes()))
    first = unb64(t.down(b64(x), first_of_stream=True))
    assert first + unb64(t.flush_down()) == expected
    # After a flush, a new stream is independent of the old one.
    assert run_stream(t.down, t.flush_down, iter([x])) == expected
    # Flushing an idle transcoder emits nothing.
    assert t.flush_down() == "" and t.flush_up() == ""


# --- WAV -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["wav/lpcm16_24", "wav/lpcm16", "wav/lpcm16_8"])
def test_wav_header_parses_with_stdlib_wave(name: str) -> None:
    fmt = FORMATS[name]
    h = wav_header(fmt)
    assert len(h) == 44 and h[:4] == b"RIFF" and h[8:12] == b"WAVE"
    payload = sine(fmt.rate_hz, 100).tobytes()
    with wave.open(io.BytesIO(h + payload)) as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate()) == (1, 2, fmt.rate_hz)
        assert w.readframes(1000) == payload
    assert struct.unpack_from("<I", h, 4)[0] == 0xFFFFFFFF
    assert struct.unpack_from("<I", h, 40)[0] == 0xFFFFFFFF


def test_wav_header_mulaw() -> None:
    h = wav_header(FORMATS["wav/mulaw"])
    assert len(h) == 44
    info = parse_wav_header(h)
    assert info is not None
    assert (info.format_tag, info.channels, info.rate_hz, info.bits_per_sample) == (7, 1, 8000, 8)
    assert info.data_offset == 44 and info.data_size == 0xFFFFFFFF
    tag, ch, rate, byte_rate, align, bits = struct.unpack_from("<HHIIHH", h, 20)
    assert (byte_rate, align) == (8000, 1)
    with pytest.raises(wave.Error):  # the stdlib reads PCM only; tag 7 is what we mean to send
        wave.open(io.BytesIO(h + b"\xff" * 10))


def test_parse_and_strip_non_44_byte_headers() -> None:
    payload = sine(16000, 50).tobytes()
    f = wav_with_extras(1, 16000, 16, payload)
    info = parse_wav_header(f)
    assert info is not None and info.data_offset == len(f) - len(payload) != 44
    assert (info.format_tag, info.rate_hz, info.bits_per_sample, info.data_size) == (1, 16000, 16, len(payload))
    assert strip_wav_header(f) == payload
    # A file written by the stdlib.
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(8000)
        w.writeframes(payload)
    assert strip_wav_header(buf.getvalue()) == payload
    # Not headers.
    assert parse_wav_header(payload) is None
    assert parse_wav_header(b"RIFF\x00\x00\x00\x00AVI LIST") is None
    assert parse_wav_header(f[:30]) is None  # incomplete
    assert strip_wav_header(payload) == payload


@pytest.mark.parametrize("name", ["wav/lpcm16_24", "wav/lpcm16", "wav/mulaw"])
def test_up_strips_inbound_wav_headers(name: str) -> None:
    fmt = FORMATS[name]
    if fmt.codec == "mulaw":
        payload = mulaw_encode(sine(8000, 800))
        tag, bits = 7, 8
    else:
        payload = sine(fmt.rate_hz, fmt.rate_hz // 10).tobytes()
        tag, bits = 1, 16
    f = wav_with_extras(tag, fmt.rate_hz, bits, payload[:321])  # odd-length first payload
    rest = payload[321:]
    raw_twin = FORMATS[name.replace("wav/", "raw/")]

    def expected() -> bytes:
        if raw_twin.rate_hz == 24000 or fmt.codec == "mulaw":
            return payload
        r = transcoder(raw_twin.name)
        return run_stream(r.up, r.flush_up, iter([payload]))

    # Header on the first chunk only.
    t = transcoder(name)
    assert run_stream(t.up, t.flush_up, iter([f, rest])) == expected()
    assert t.inbound_wav is not None and t.inbound_wav.rate_hz == fmt.rate_hz
    # Header split across chunks (21 bytes, then the rest).
    t = transcoder(name)
    assert t.up(b64(f[:21])) == ""
    assert run_stream(t.up, t.flush_up, iter([f[21:], rest])) == expected()
    # Header on every chunk.
    t = transcoder(name)
    chunks = [wav_header(fmt) + payload[i : i + 400] for i in range(0, len(payload), 400)]
    assert run_stream(t.up, t.flush_up, iter(chunks)) == expected()


def test_up_wav_passes_header_free_chunks_untouched() -> None:
    for name in ("wav/lpcm16_24", "wav/mulaw"):
        t = transcoder(name)
        s = b64(bytes(range(200)))
        assert t.up(s) is s
        assert t.down(s) is s
    # A chunk that looks like "RIFF" but is not a WAVE header is audio.
    t = transcoder("wav/mulaw")
    odd = b"RIFF\x10\x00\x00\x00AVI data" + bytes(20)
    assert unb64(t.up(b64(odd))) == odd


@pytest.mark.parametrize("name", ["wav/lpcm16_24", "wav/mulaw", "wav/lpcm16", "wav/lpcm16_8"])
def test_down_prefixes_header_on_first_chunk(name: str) -> None:
    fmt = FORMATS[name]
    t = transcoder(name)
    if fmt.codec == "mulaw":
        src = mulaw_encode(sine(8000, 1600))
    else:
        src = sine(24000, 4800).tobytes()
    frame = 960 if fmt.codec == "lpcm16" else 160
    pieces = list(split(src, [frame]))
    out = [unb64(t.down(b64(pieces[0]), first_of_stream=True))]
    out += [unb64(t.down(b64(p))) for p in pieces[1:]]
    out.append(unb64(t.flush_down()))
    assert out[0][:44] == wav_header(fmt)
    assert all(not o.startswith(b"RIFF") for o in out[1:])
    body = b"".join(out)[44:]
    if fmt.rate_hz == 24000 or fmt.codec == "mulaw":
        assert body == src
    else:
        r = transcoder(name.replace("wav/", "raw/"))
        assert body == run_stream(r.down, r.flush_down, iter([src]))
    if fmt.codec == "lpcm16":
        with wave.open(io.BytesIO(b"".join(out))) as w:
            assert w.getframerate() == fmt.rate_hz
            assert w.readframes(10**6) == body
    # The next play stream gets its own header.
    assert unb64(t.down(b64(pieces[0]), first_of_stream=True)).startswith(wav_header(fmt))


def test_wav_header_on_play_start_switch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(audio, "WAV_HEADER_ON_PLAY_START", False)
    t = transcoder("wav/mulaw")
    s = b64(bytes(160))
    assert t.down(s, first_of_stream=True) == s


def test_make_transcoder_none_for_passthrough() -> None:
    assert make_transcoder(negotiate(["raw/lpcm16_24"])) is None
    assert make_transcoder(negotiate(["raw/mulaw"])) is None
    for name in FORMATS:
        neg = negotiate([name])
        t = make_transcoder(neg)
        assert (t is None) == neg.passthrough
        if t is not None:
            assert isinstance(t, Transcoder)


# --- cost (printed, not asserted) ----------------------------------------------------------------


def test_print_per_chunk_cost(capsys: pytest.CaptureFixture[str]) -> None:
    rng = np.random.default_rng(0)
    rows = []
    for name in ("raw/lpcm16", "raw/lpcm16_8", "wav/lpcm16", "wav/lpcm16_24", "wav/mulaw"):
        fmt = FORMATS[name]
        t = transcoder(name)
        if fmt.codec == "mulaw":
            up_chunk = b64(mulaw_encode(rng.normal(0, 3000, 160).astype(np.int16)))
            down_chunk = up_chunk
        else:
            up_chunk = b64(rng.normal(0, 3000, fmt.rate_hz // 50).astype("<i2").tobytes())
            down_chunk = b64(rng.normal(0, 3000, 480).astype("<i2").tobytes())
        for fn, chunk, label in ((t.up, up_chunk, "up"), (t.down, down_chunk, "down")):
            rows.append((name, label, per_call_us(lambda: fn(chunk))))  # noqa: B023 (called at once)
        # Includes dropping the previous stream's filter state: once per play stream.
        rows.append((name, "down first_of_stream", per_call_us(lambda: t.down(down_chunk, True))))  # noqa: B023
    s = b64(bytes(960))
    rows.append(("-", "ms_of_b64", per_call_us(lambda: ms_of_b64(s, 48))))
    with capsys.disabled():
        print("\nper-20-ms-chunk cost, µs (best of 7 batches; soxr works every 2nd-4th chunk):")
        for name, label, us in rows:
            print(f"  {name:14} {label:22} {us:8.2f}")


def per_call_us(fn: Callable[[], object], n_iter: int = 400, repeats: int = 7) -> float:
    """Best-of-``repeats`` mean cost of ``fn()`` in µs over batches of ``n_iter`` calls
    (a multiple of 4 chunks, so soxr's block work is counted in proportion)."""
    for _ in range(100):
        fn()
    best = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(n_iter):
            fn()
        best = min(best, time.perf_counter() - t0)
    return best / n_iter * 1e6


def test_lenient_base64_input() -> None:
    """Line breaks or missing padding in a chunk are tolerated where we have to decode."""
    data = sine(16000, 321).tobytes()[:641]  # odd length → padded base64
    s = b64(data)
    assert s.endswith("=")
    a, b = transcoder("raw/lpcm16"), transcoder("raw/lpcm16")
    wrapped = "\n".join(s[i : i + 76] for i in range(0, len(s), 76))
    assert run_stream(a.up, a.flush_up, iter([data])) == b"".join(
        [unb64(b.up(wrapped.rstrip("="))), unb64(b.flush_up())]
    )
    with pytest.raises(ValueError):
        transcoder("raw/lpcm16").up("A")
