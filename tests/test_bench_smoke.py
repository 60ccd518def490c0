"""The load benchmark's own checks: stamped payloads, the loss/order/corruption checker, and one
short end-to-end run through a real bridge process (no timing thresholds)."""

from __future__ import annotations

import binascii
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # bench/ is not an installed package

from bench import orchestrate  # noqa: E402
from bench.profile import aggregate  # noqa: E402
from bench.stamp import (PAYLOAD_BYTES, PAYLOAD_CHARS, BadStamp, check_payload, payload_b64,
                         payload_parts, raw_payload, read_stamp)
from bench.stream_check import StreamCheck, merge  # noqa: E402


def _frame(call: int, seq: int, t: int = 123_456_789) -> bytes:
    return b'{"type":"userStream.chunk","audioChunk":"' + payload_b64(call, seq, t) + b'"}'


START = len(b'{"type":"userStream.chunk","audioChunk":"')


# ----------------------------------------------------------------------------- stamp / payload
def test_payload_is_20ms_of_pcm16_with_a_readable_stamp():
    p = payload_b64(7, 42, 987_654_321_000)
    assert len(p) == PAYLOAD_CHARS
    assert len(binascii.a2b_base64(p)) == PAYLOAD_BYTES == 960
    assert read_stamp(p, 0) == (7, 42, 987_654_321_000)
    stamp, tail = payload_parts(7, 42, 987_654_321_000)
    assert stamp + tail == p
    assert raw_payload(7, 42, 1)[18:] == raw_payload(7, 42, 2)[18:]       # filler: (call, seq) only
    assert raw_payload(7, 42, 1)[18:] != raw_payload(7, 43, 1)[18:]
    assert raw_payload(7, 42, 1)[18:] != raw_payload(8, 42, 1)[18:]


def test_check_payload_accepts_exact_and_rejects_everything_else():
    f = _frame(3, 9)
    assert check_payload(f, START, 3) == (True, 9, 123_456_789)
    assert check_payload(f, START, 4)[0] is False                      # another call's frame
    body = bytearray(f)
    body[START + 700] = ord("A") if body[START + 700] != ord("A") else ord("B")
    assert check_payload(bytes(body), START, 3)[0] is False            # one filler char changed
    stamp = bytearray(f)
    stamp[START + 13] = ord("A") if stamp[START + 13] != ord("A") else ord("B")
    assert check_payload(bytes(stamp), START, 3)[0] is False           # timestamp bits changed
    with pytest.raises(BadStamp):
        read_stamp(bytes(stamp), START)
    assert check_payload(f[:-3] + b'"}', START, 3)[0] is False          # truncated payload
    assert check_payload(f[:-2] + b'AAAA"}', START, 3)[0] is False      # padded payload


# ----------------------------------------------------------------------------- stream checker
def _feed(sent: list[int], received: list[int], forbid: tuple[int, ...] = ()) -> StreamCheck:
    c = StreamCheck()
    for s in sent:
        (c.forbid if s in forbid else c.sent)(s)
    for s in received:
        c.received(s)
    return c.finish()


def test_checker_clean_stream():
    c = _feed(list(range(10)), list(range(10)))
    assert c.counts() == {"sent": 10, "received": 10, "dropped": 0, "lost": 0, "dup": 0,
                          "reordered": 0, "corrupt": 0, "leaked": 0, "unexpected": 0}


def test_checker_reports_a_duplicate():
    c = _feed(list(range(5)), [0, 1, 2, 2, 3, 4])
    assert (c.dup, c.lost, c.reordered) == (1, 0, 0)


def test_checker_reports_a_gap_as_lost():
    c = _feed(list(range(6)), [0, 1, 3, 4, 5])
    assert (c.lost, c.dup, c.reordered) == (1, 0, 0)


def test_checker_reports_a_lost_tail():
    c = _feed(list(range(6)), [0, 1, 2])
    assert c.lost == 3


def test_checker_reports_a_reorder_not_a_loss():
    c = _feed(list(range(5)), [0, 2, 1, 3, 4])
    assert (c.reordered, c.lost, c.dup) == (1, 0, 0)


def test_checker_reports_corruption():
    c = StreamCheck()
    for s in range(3):
        c.sent(s)
    c.received(0)
    c.corrupted()            # seq 1 arrived, but not byte-exact
    c.received(2)
    c.finish()
    assert (c.corrupt, c.lost) == (1, 1)


def test_checker_forbidden_frames_must_not_arrive():
    c = _feed([0, 1, 2, 3], [0, 1, 3], forbid=(2,))
    assert (c.leaked, c.lost) == (0, 0)
    c = _feed([0, 1, 2, 3], [0, 1, 2, 3], forbid=(2,))
    assert c.leaked == 1


def test_checker_settle_counts_drops_and_a_later_arrival_leaks():
    c = StreamCheck()
    for s in range(6):
        c.sent(s)
    for s in (0, 1, 2):
        c.received(s)
    assert c.settle(0, 4) == 2          # 3 and 4 never came: dropped at a barge-in
    c.received(5)
    c.received(4)                       # after the stop: must not arrive any more
    c.finish()
    assert (c.dropped, c.lost, c.leaked) == (2, 0, 1)


def test_merge_sums_directions():
    total = merge([_feed([0, 1], [0, 1]), _feed([0, 1, 2], [0, 2, 2])])
    assert (total["sent"], total["lost"], total["dup"]) == (5, 1, 1)


def test_profile_aggregates_self_and_total():
    text = ("process 1:\"python\";main (a.py:1);f (a.py:5) 3\n"
            "process 1:\"python\";main (a.py:1);g (b.py:7);f (a.py:9) 1\n"
            " 2\n")
    samples, self_c, total_c = aggregate(text)
    assert samples == 6
    assert self_c["f (a.py)"] == 4 and total_c["main (a.py)"] == 4 and total_c["g (b.py)"] == 1
    assert self_c["(native: uvloop / C extensions, no Python frame)"] == 2


# ----------------------------------------------------------------------------- end to end
def test_smoke_run_through_the_bridge_loses_nothing():
    opts = orchestrate.Opts(window_s=2.0, warmup_s=0.5, turn_s=1.2, response_ms=600,
                            barge_every=2, pin=False, log=lambda s: None)
    r = orchestrate.run_level(opts, "bridge", 5)
    assert not r.get("fatal"), r
    assert r["violations"] == {}, (r["violations"], r["error_lines"], r.get("bridge_log_head"))
    for d in ("up", "down"):
        counts = r[f"{d}_counts"]
        assert counts["sent"] > 0 and counts["received"] == counts["sent"], counts
        assert all(counts[k] == 0 for k in ("lost", "dup", "reordered", "corrupt", "leaked", "unexpected"))
        assert r[f"{d}_us"]["n"] > 0
    assert r["turn_us"]["n"] > 0
    assert r["barges_sent"] > 0 and r["barges_stopped"] == r["barges_sent"]
    assert r["truncates_ok"] == r["barges_sent"]
    assert r["barge_dropped"] == 0
    assert r["bridge_cpu_pct"] is not None and r["bridge_rss_kib"] > 0
