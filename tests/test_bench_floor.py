"""The bench's own transport floor (bench/relay_floor.py): its stamped frames survive the relay's
re-encoding, and a short run of every relay variant gives rows of the shape `make bench` reads
(bench/__main__.py's derived figures, bench/report.py's table). No timing thresholds."""

from __future__ import annotations

import binascii
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))   # bench/ is not an installed package

from bench import orchestrate, relay_floor, report  # noqa: E402
from bench.__main__ import _floor_derived  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
CALLS, SECONDS = 20, 0.5
GRACE_S = 10.0      # a loaded test machine may be slow; the run waits only until every frame is back
FRAMES_PER_CALL = int(SECONDS * 1000) // relay_floor.SLICES      # one frame per call every 20 ms steps
ROW_KEYS = {"variant", "calls", "sent", "frames", "lost", "reordered", "misrouted", "wall_s", "relay_cpu_pct",
            "gen_cpu_pct", "p50_us", "p99_us", "p999_us", "max_us", "tick_late_p99_us", "generator"}


def test_stamped_frame_is_20ms_of_pcm16_and_survives_every_hop():
    f = relay_floor.caller_frame(3, 70_000, 987_654_321_012)
    audio = json.loads(f)["audioChunk"]
    assert len(binascii.a2b_base64(audio)) == relay_floor.PCM_BYTES == 960
    assert relay_floor.read_stamp(f) == (3, 70_000, 987_654_321_012)
    relayed = relay_floor.to_caller(relay_floor.echo(relay_floor.to_upstream(f)))
    assert json.loads(relayed)["type"] == "playStream.chunk" and json.loads(relayed)["audioChunk"] == audio
    assert relay_floor.read_stamp(relayed) == (3, 70_000, 987_654_321_012)
    direct = relay_floor.echo(f)                       # no relay: the caller gets the delta itself
    assert json.loads(direct)["type"] == "response.output_audio.delta"
    assert relay_floor.read_stamp(direct) == (3, 70_000, 987_654_321_012)
    assert relay_floor.read_stamp(b'{"type":"playStream.chunk","audioChunk":"!!"}') is None
    assert relay_floor.read_stamp(b'{"type":"playStream.stop"}') is None


def test_the_bench_runs_the_floor_shipped_in_bench():
    assert orchestrate.relay_floor_path() == REPO / "bench" / "relay_floor.py"
    assert orchestrate.relay_floor_path().exists()


def _check_row(r: dict, generator: str) -> None:
    assert ROW_KEYS <= set(r), ROW_KEYS - set(r)
    assert r["calls"] == CALLS and r["generator"] == generator
    assert r["sent"] == CALLS * FRAMES_PER_CALL, r
    assert r["frames"] == r["sent"] and r["lost"] == 0 and r["reordered"] == 0 and r["misrouted"] == 0, r
    assert r["gen_cpu_pct"] >= 0 and r["wall_s"] > 0
    assert 0 < r["p50_us"] <= r["p99_us"] <= r["p999_us"] <= r["max_us"], r
    if r["variant"] == "direct":
        assert r["relay_cpu_pct"] is None
    else:
        assert r["relay_cpu_pct"] is not None and r["relay_cpu_pct"] >= 0


def test_floor_smoke_every_variant_through_the_bench():
    logged: list[str] = []
    res = orchestrate.run_relay_floor(CALLS, SECONDS, logged.append, warmup_s=0.2, grace_s=GRACE_S, pin=False,
                                      variants=("direct", "websockets", "sansio", "picows"))
    assert res["script"] == "bench/relay_floor.py" and str(orchestrate.relay_floor_path()) in res["cmd"]
    assert res["stderr"] == "", res["stderr"]
    rows = res["rows"]
    assert [r["variant"] for r in rows] == ["direct", "websockets", "sansio", "picows"], rows
    generator = "picows" if relay_floor.picows_available() else "sansio"
    for r in rows:
        if r["variant"] == "picows" and not relay_floor.picows_available():
            assert "not installed" in r["skipped"]
            continue
        _check_row(r, generator)
    _floor_derived(res)
    for r in rows:
        if r.get("relay_cpu_pct"):                      # 0.0 when the run took less than a clock tick
            d = r["_derived"]
            assert d["cpu_us_per_frame"] > 0 and d["calls_per_core"] > 0 and d["cpu_pct_per_call"] > 0
    table = report.floor_table({"floor": res})
    assert table.startswith("transport floor (bench/relay_floor.py --variants direct,websockets,sansio,picows")
    for v in ("direct", "websockets", "sansio", "picows"):
        assert f"  {v:<13}" in table, table


def test_without_picows_its_variant_is_skipped_and_the_generator_falls_back(tmp_path):
    """picows made unimportable (a module of that name that raises): the picows relay is skipped
    with a note, the generator runs on websockets' Sans-I/O, and the run succeeds."""
    (tmp_path / "picows.py").write_text('raise ImportError("picows hidden by the test")\n')
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    out = subprocess.run([sys.executable, str(orchestrate.relay_floor_path()), "--variants", "sansio,picows",
                          "--calls", str(CALLS), "--seconds", str(SECONDS), "--warmup-s", "0.2",
                          "--grace-s", str(GRACE_S), "--no-pin"],
                         capture_output=True, text=True, timeout=120, cwd=REPO, env=env, stdin=subprocess.DEVNULL)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [json.loads(ln) for ln in out.stdout.splitlines() if ln.startswith("{")]
    assert [r["variant"] for r in rows] == ["sansio", "picows"], rows
    _check_row(rows[0], "sansio")
    assert rows[1] == {"variant": "picows", "skipped": relay_floor.PICOWS_MISSING}
    assert "picows is not installed" in out.stderr
    table = report.floor_table({"floor": {"cmd": "relay_floor.py x", "rows": rows}})
    assert f"  {'picows':<13} skipped: picows is not installed" in table, table


def test_bad_arguments_are_refused_with_a_message():
    for args in (["--calls", "0"], ["--calls", "abc"], ["--seconds", "0"]):
        out = subprocess.run([sys.executable, str(orchestrate.relay_floor_path()), *args], capture_output=True,
                             text=True, timeout=60, cwd=REPO, stdin=subprocess.DEVNULL)
        assert out.returncode == 2 and "must be" in out.stderr and "Traceback" not in out.stderr, (args, out.stderr)
    out = subprocess.run([sys.executable, str(orchestrate.relay_floor_path()), "--variants", "nope", "--calls", "1",
                          "--seconds", "0.1"], capture_output=True, text=True, timeout=60, cwd=REPO,
                         stdin=subprocess.DEVNULL)
    assert out.returncode == 1 and json.loads(out.stdout.splitlines()[0])["error"].startswith("unknown variant")
