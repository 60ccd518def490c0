"""bounds.py: the base64 guard of both JSON templates, clipping, bounded key sets, rate limits."""

from __future__ import annotations

import base64
import binascii
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from voicebridge.bounds import MAX_LIST_ITEMS, OnceKeys, RateLimiter, clip, clip_list, is_b64


def strict_ok(s: str) -> bool:
    try:
        binascii.a2b_base64(s.encode("utf-8", "surrogatepass"), strict_mode=True)
    except (binascii.Error, ValueError):
        return False
    return True


@given(st.binary(max_size=300))
def test_real_base64_is_accepted(data):
    assert is_b64(base64.b64encode(data).decode())


@settings(max_examples=2000)
@given(st.text(alphabet=st.sampled_from(list("AZaz09+/=\"\\ \n{}:,é\x00-_")), max_size=40))
def test_is_b64_agrees_with_strict_decoding(s):
    # strict a2b_base64 also accepts padding-only quirks we refuse; we must never accept what it refuses
    if is_b64(s):
        assert strict_ok(s) or s == ""
    if is_b64(s) and s:
        assert not set(s) - set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=")


@given(st.text(max_size=60), st.binary(max_size=60))
def test_nothing_that_can_break_a_json_string_passes(junk, data):
    b64 = base64.b64encode(data).decode()
    for s in (junk, b64 + junk, junk + b64, b64[:len(b64) // 2] + junk + b64[len(b64) // 2:]):
        if is_b64(s):   # then it is safe inside a template: the frame stays exactly one string
            frame = '{"type":"playStream.chunk","streamId":"1","audioChunk":"' + s + '"}'
            assert json.loads(frame)["audioChunk"] == s


def test_injection_attempts_are_refused():
    for s in ('AAAA","type":"activities', "AAAA\\", "AA A", "AAAA\n", "AAA=A", "A===", "AAAAA",
              "QUJD\u00e9", "QUJD\x00"):
        assert not is_b64(s), s
    assert is_b64("") and is_b64("AAAA") and is_b64("AA==") and is_b64("AAA=")


def test_clip_bounds_any_value():
    assert clip("x" * 1000, 10) == "x" * 9 + "…" and len(clip("y" * 10**6)) == 200
    assert clip(None) == "" and clip(12) == "12"
    deep: list = []
    cur = deep
    for _ in range(100_000):                   # repr() of this raises RecursionError
        nxt: list = []
        cur.append(nxt)
        cur = nxt
    assert clip(deep).startswith("<unprintable") or len(clip(deep)) <= 200
    assert len(clip_list(["a"] * 1000)) == MAX_LIST_ITEMS + 1
    assert clip_list("raw/mulaw") == ["raw/mulaw"]


def test_once_keys_hold_a_bounded_set():
    keys = OnceKeys(max_keys=3)
    assert [keys.hit("a"), keys.hit("a"), keys.hit("b"), keys.hit("c")] == [1, 2, 1, 1]
    assert keys.hit("d" * 10**6) == 0 and keys.overflow == 1     # full: new keys are not kept
    assert keys.hit("a") == 3


def test_rate_limiter_counts_what_it_suppressed():
    rl = RateLimiter(2)
    got = [rl.allow("auth", 100.0) for _ in range(5)]
    assert got == [0, 0, None, None, None]
    assert rl.allow("other", 100.0) == 0                      # per name
    assert rl.allow("auth", 100.6) == 3                       # one token back after 0.5 s
    assert rl.allow("auth", 100.6) is None
