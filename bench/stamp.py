"""Stamped audio payloads: encode, decode and byte-exact check, without JSON-decoding frames.

Every 20 ms payload is 960 bytes of "24 kHz PCM16":
    bytes 0..17   stamp = call u32, seq u32, send time u64 (perf_counter_ns), crc16 of those 16
    bytes 18..959 filler = FILLER[off+18 : off+960], off = f(call, seq), a multiple of 3
Because 18 and `off` are multiples of 3, the base64 text of the payload is
    b64(stamp) (24 chars) + FILLER_B64[off/3*4 + 24 : off/3*4 + 1280]
so a sender builds a frame from a 24-char encode plus a slice, and a receiver decodes only the
first 24 characters and compares the remaining 1256 with the slice it expects (memcmp).
"""

from __future__ import annotations

import binascii
import random
import struct
import zlib

PAYLOAD_BYTES = 960                 # 20 ms of 24 kHz PCM16
PAYLOAD_CHARS = PAYLOAD_BYTES // 3 * 4   # 1280 base64 characters
STAMP_BYTES = 18
STAMP_CHARS = 24
_STAMP = struct.Struct("<IIQ")
_STAMP4 = struct.Struct("<IIQH")     # the stamp with its crc16
_b2a, _a2b, _crc = binascii.b2a_base64, binascii.a2b_base64, zlib.crc32
_N_OFFSETS = 21_845                 # offsets 0, 3, ..., 65532 into the filler
FILLER = random.Random(20240601).randbytes(_N_OFFSETS * 3 + PAYLOAD_BYTES)
FILLER_B64 = binascii.b2a_base64(FILLER, newline=False)   # len(FILLER) is a multiple of 3


def _offset4(call: int, seq: int) -> int:
    """Character offset into FILLER_B64 of the payload of (call, seq)."""
    return ((call * 2_654_435_761 + seq * 40_503 + 7) % _N_OFFSETS) * 4


def stamp_b64(call: int, seq: int, t_ns: int) -> bytes:
    return _b2a(_STAMP4.pack(call, seq, t_ns, _crc(_STAMP.pack(call, seq, t_ns)) & 0xFFFF), newline=False)


def payload_parts(call: int, seq: int, t_ns: int) -> tuple[bytes, bytes]:
    """(stamp, tail) of the payload: frame = prefix + stamp + tail + suffix (hot path, inlined)."""
    o = ((call * 2_654_435_761 + seq * 40_503 + 7) % _N_OFFSETS) * 4
    return (_b2a(_STAMP4.pack(call, seq, t_ns, _crc(_STAMP.pack(call, seq, t_ns)) & 0xFFFF), newline=False),
            FILLER_B64[o + STAMP_CHARS:o + PAYLOAD_CHARS])


def payload_b64(call: int, seq: int, t_ns: int) -> bytes:
    """The whole base64 payload (1280 ASCII bytes) for (call, seq) sent at t_ns."""
    stamp, tail = payload_parts(call, seq, t_ns)
    return stamp + tail


def raw_payload(call: int, seq: int, t_ns: int) -> bytes:
    """The decoded 960 bytes (tests only)."""
    return binascii.a2b_base64(payload_b64(call, seq, t_ns))


class BadStamp(Exception):
    """The payload's stamp does not decode or its checksum is wrong."""


def read_stamp(buf: bytes, start: int) -> tuple[int, int, int]:
    """(call, seq, t_ns) from the 24 base64 chars at buf[start:]; BadStamp if corrupt."""
    try:
        call, seq, t, chk = _STAMP4.unpack(_a2b(buf[start:start + STAMP_CHARS]))
    except (binascii.Error, struct.error) as e:
        raise BadStamp(str(e)) from None
    if chk != _crc(_STAMP.pack(call, seq, t)) & 0xFFFF:
        raise BadStamp("stamp checksum")
    return call, seq, t


def body_ok(buf: bytes, start: int, call: int, seq: int) -> bool:
    """True when the payload at buf[start:] is byte-exact for (call, seq) and ends with '"'."""
    o = _offset4(call, seq)
    end = start + PAYLOAD_CHARS
    return (buf[start + STAMP_CHARS:end] == FILLER_B64[o + STAMP_CHARS:o + PAYLOAD_CHARS]
            and buf[end:end + 1] == b'"')


def check_payload(buf: bytes, start: int, call: int) -> tuple[bool, int, int]:
    """(ok, seq, t_ns) of the payload at buf[start:] (start = first base64 char).

    ok is False when the stamp is corrupt, names another call, or the body is not byte-exact;
    seq/t_ns are -1 when the stamp itself is unreadable. (Hot path: inlined.)"""
    try:
        c, seq, t, chk = _STAMP4.unpack(_a2b(buf[start:start + STAMP_CHARS]))
    except (binascii.Error, struct.error):
        return False, -1, -1
    if c != call or chk != _crc(_STAMP.pack(c, seq, t)) & 0xFFFF:
        return False, seq, t
    o = ((call * 2_654_435_761 + seq * 40_503 + 7) % _N_OFFSETS) * 4
    end = start + PAYLOAD_CHARS
    return (buf[start + STAMP_CHARS:end] == FILLER_B64[o + STAMP_CHARS:o + PAYLOAD_CHARS]
            and buf[end:end + 1] == b'"'), seq, t
