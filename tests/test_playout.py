"""The playout clock: pacing and heard-ms arithmetic, with explicit times (no sleeping)."""

from __future__ import annotations

import base64

from hypothesis import given, strategies as st

from voicebridge.playout import CHUNK, END, Playout, piece_chars, split_b64


def feed(p: Playout, item: str, n: int, ms: float = 20.0) -> None:
    for _ in range(n):
        assert p.push_chunk(item, "AAAA", ms)


def drain(p: Playout, now: float) -> list:
    out = []
    while (d := p.due(now)) is not None and d <= now:
        out.append(p.take(now))
    return out


def test_lead_limits_what_is_sent_at_once():
    p = Playout(lead_ms=100, max_pending_ms=60_000)
    feed(p, "A", 50)                      # 1 s of audio arrives at once
    sent = drain(p, 0.0)
    assert sent[0].start and not sent[0].stop_first
    # sends while VAIC holds < 100 ms: 6 chunks (0,20,...,100 ms buffered before the 6th)
    assert len(sent) == 6
    assert p.due(0.0) == p.play_end_t - 0.1
    for t in (0.03, 0.061, 0.5, 0.517):   # later: refill to the lead, never beyond lead + 1 chunk
        drain(p, t)
        assert 0.1 <= p.play_end_t - t <= 0.12 + 1e-9


def test_heard_ms_follows_real_time_and_clamps():
    p = Playout(lead_ms=200, max_pending_ms=60_000)
    feed(p, "A", 5)
    drain(p, 10.0)
    assert abs(p.heard_ms(10.0)) < 1e-6
    assert abs(p.heard_ms(10.05) - 50.0) < 1e-6
    assert p.heard_ms(11.0) == 100.0      # never more than was sent


def test_underrun_restarts_clock():
    p = Playout(lead_ms=200, max_pending_ms=60_000)
    feed(p, "A", 1)
    drain(p, 0.0)
    feed(p, "A", 1)
    drain(p, 1.0)                          # arrives after a 980 ms gap
    assert abs(p.heard_ms(1.01) - 30.0) < 1e-6


def test_interrupt_flush_reports_heard_and_drops_pending():
    p = Playout(lead_ms=100, max_pending_ms=60_000)
    feed(p, "A", 50)
    drain(p, 0.0)
    intr = p.interrupt(0.055)
    assert intr.stream_open and intr.item_id == "A" and intr.still_playing
    assert abs(intr.heard_ms - 55.0) < 1e-6 and intr.sent_ms == 120.0
    assert p.due(0.1) is None and p.open_item is None and p.dropped_ms == 880.0


def test_interrupt_drain_policy_reports_everything_sent():
    p = Playout(lead_ms=100, max_pending_ms=60_000, stop_policy="drain")
    feed(p, "A", 50)
    drain(p, 0.0)
    assert p.interrupt(0.055).heard_ms == 120.0


def test_interrupt_after_playout_finished_is_not_playing():
    p = Playout(lead_ms=100, max_pending_ms=60_000)
    feed(p, "A", 2)
    drain(p, 0.0)
    intr = p.interrupt(5.0)
    assert intr.stream_open and not intr.still_playing and intr.heard_ms == 40.0


def test_interrupt_before_anything_sent():
    p = Playout(lead_ms=100, max_pending_ms=60_000)
    intr = p.interrupt(0.0)
    assert not intr.stream_open and intr.item_id is None and not intr.still_playing


def test_stream_stops_only_after_played_and_next_item_waits():
    p = Playout(lead_ms=100, max_pending_ms=60_000)
    feed(p, "A", 2)
    p.push_end("A")
    feed(p, "B", 2)
    first = drain(p, 0.0)
    assert [t.entry.kind for t in first] == [CHUNK, CHUNK]
    assert p.due(0.0) == p.play_end_t == 0.04       # END waits until A played out
    end, *nxt = drain(p, 0.04)
    assert end.entry.kind == END and end.stop_first
    assert nxt[0].start and nxt[0].entry.item_id == "B" and not nxt[0].stop_first


def test_pending_is_bounded():
    p = Playout(lead_ms=100, max_pending_ms=100)
    feed(p, "A", 5)
    assert not p.push_chunk("A", "AAAA", 20.0)
    assert p.refused_chunks == 1


@given(st.binary(min_size=0, max_size=3000), st.integers(10, 300), st.sampled_from([8, 48, 32, 16]))
def test_split_b64_pieces_decode_to_whole_samples(data, max_ms, bpm):
    s = base64.b64encode(data).decode()
    n = piece_chars(max_ms, bpm)
    assert n % 8 == 0
    pieces = split_b64(s, n)
    assert "".join(pieces) == s
    decoded = [base64.b64decode(x) for x in pieces]
    assert b"".join(decoded) == data
    for d in decoded[:-1]:
        assert len(d) % 2 == 0 and len(d) <= max(6, max_ms * bpm)
