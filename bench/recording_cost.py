"""What wire recording costs: `python -m bench.recording_cost [--rounds N] [--base DIR]`.

1. The recorder's hot-path calls alone (timeit, best of 5, loop overhead subtracted): what the
   shell pays per frame when the call is recorded (`vaic_in`, `openai_in`, `openai_out`, `sent`
   of one frame), and the check it pays when it is not (`rec = self.rec; if rec is not None`).
2. The writer thread's work per frame (`Encoder.record`: audio taken out of its base64, the
   forwarded copy found in the recent audio, the record packed), by frame kind, and the bytes a
   frame costs in the file.
3. The call path in process (`bench.path_cost`'s driver: 20 000 caller frames, 4 000 model
   deltas), process CPU per frame (writer thread included) with recording off and on, each in a
   fresh process, alternating; with `--base DIR` also a checkout without the recorder hooks
   (the difference off vs base is what the hooks cost a call that is not recorded).
A measurement, not a test: numbers vary with the machine.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
from types import SimpleNamespace

FRAME = base64.b64encode(os.urandom(960)).decode()          # 20 ms of 24 kHz PCM16
DELTA_AUDIO = os.urandom(4800)                               # 100 ms
CHUNK_IN = '{"type":"userStream.chunk","conversationId":"c","audioChunk":"' + FRAME + '"}'
APPEND = '{"type":"input_audio_buffer.append","audio":"' + FRAME + '"}'
DELTA = ('{"type":"response.output_audio.delta","event_id":"e","response_id":"r","item_id":"i",'
         '"output_index":0,"content_index":0,"delta":"' + base64.b64encode(DELTA_AUDIO).decode() + '"}')
PLAY = '{"type":"playStream.chunk","streamId":"1","audioChunk":"' + base64.b64encode(DELTA_AUDIO).decode() + '"}'


def hot_path_ns(n: int = 200_000) -> dict[str, float]:
    from voicebridge.config import RecordingConfig
    from voicebridge.recording import CallRecorder, RecordingService

    d = tempfile.mkdtemp(prefix="vb-reccost-")
    svc = RecordingService()
    rc = RecordingConfig(dir=d, record_all=True)
    svc.configure(rc)
    svc.submit = lambda item, nbytes=0: True    # type: ignore[method-assign]  # the loop thread alone
    owner = SimpleNamespace(rec=None)
    sess = SimpleNamespace(profile=None, profile_final=True, call_id="bench")
    rec = CallRecorder(owner, rc, sess, svc, time.monotonic_ns())
    owner.rec = rec
    rec._decide()
    off = SimpleNamespace(rec=None)
    batch = [PLAY]
    env = {"rec": rec, "f": CHUNK_IN, "a": APPEND, "d": DELTA, "b": batch, "t": time.monotonic_ns(),
           "owner": owner, "off": off}
    out: dict[str, float] = {}
    nop = min(timeit.repeat("pass", number=n, repeat=5, globals=env))
    for name, stmt in (("vaic_in", "rec.vaic_in(f, t)"), ("openai_in", "rec.openai_in(d, t)"),
                       ("openai_out", "rec.openai_out(a, t)"), ("sent (1 frame)", "rec.sent(b, True)"),
                       ("off: rec = x.rec; if rec is not None", "r = off.rec\nif r is not None: pass")):
        best = min(timeit.repeat(stmt, number=n, repeat=5, globals=env))
        out[name] = (best - nop) / n * 1e9
        rec._frames.clear()
        del rec._meta[:]
        rec._n = 0
    rec.close("bench")
    svc.drain_sync(30)
    import shutil
    shutil.rmtree(d, ignore_errors=True)
    return out


def writer_us() -> dict[str, tuple[float, float]]:
    """µs per frame and file bytes per frame, by kind, in pass-through order."""
    from voicebridge.recording import OPENAI_IN, OPENAI_OUT, VAIC_IN, VAIC_OUT, Encoder

    def run(kind: int, frame: str, n: int, prime: tuple[int, str] | None = None) -> tuple[float, float]:
        enc = Encoder()
        if prime is not None:
            for _ in range(8):
                enc.record(prime[0], 0, prime[1])
        size = len(enc.record(kind, 0, frame))
        best = min(timeit.repeat(lambda: enc.record(kind, 0, frame), number=n, repeat=5))
        return best / n * 1e6, float(size)

    return {
        "vaic_in userStream.chunk 20 ms": run(VAIC_IN, CHUNK_IN, 20_000),
        "openai_out append (same audio: a reference)": run(OPENAI_OUT, APPEND, 20_000, (VAIC_IN, CHUNK_IN)),
        "openai_in delta 100 ms": run(OPENAI_IN, DELTA, 5_000),
        "vaic_out playStream.chunk 100 ms (a reference)": run(VAIC_OUT, PLAY, 5_000, (OPENAI_IN, DELTA)),
        "control frame (JSON, no audio)": run(VAIC_OUT, '{"type":"playStream.start","streamId":"1",'
                                                        '"mediaFormat":"raw/lpcm16_24"}', 50_000),
    }


def child(src: str, mode: str, n_up: int, n_down: int) -> dict[str, float]:
    sys.path.insert(0, src)
    for name in [m for m in sys.modules if m == "voicebridge" or m.startswith("voicebridge.")]:
        del sys.modules[name]
    import uvloop

    import voicebridge.config as c
    d = tempfile.mkdtemp(prefix="vb-reccost-")
    orig = c.load_config

    def patched(path: object, env: object = None, overrides: dict | None = None) -> object:
        # the driver sends no `start` activity: the profile is final at once (every tree alike)
        over = {**(overrides or {}), "call": {"start_wait_ms": 0}}
        if mode == "on":
            over["recording"] = {"dir": d, "record_all": True}
        return orig(path, env=env, overrides=over)   # type: ignore[arg-type]
    c.load_config = patched   # type: ignore[assignment]
    from voicebridge import recording
    recording.MAX_INFLIGHT_BYTES = 1 << 31   # this driver outruns any disk: record it all anyway
    from bench.path_cost import measure
    t0 = time.process_time()
    res = uvloop.run(measure(n_up, n_down))
    if mode == "on":
        recording.service().drain_sync(60)
        res["file_bytes"] = float(sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)))
    res["total_cpu_s"] = time.process_time() - t0
    import shutil
    shutil.rmtree(d, ignore_errors=True)
    return res


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.recording_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--up", type=int, default=20000)
    ap.add_argument("--down", type=int, default=4000)
    ap.add_argument("--base", help="a checkout without the recorder hooks, measured alongside")
    ap.add_argument("--skip-path", action="store_true", help="only the micro-benchmarks")
    ap.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child[0], a.child[1], a.up, a.down)))
        return 0
    print("1. recorder hot path (ns per call, best of 5):")
    for k, v in hot_path_ns().items():
        print(f"   {k:<40} {v:8.0f} ns")
    print("2. writer thread per frame (µs, file bytes):")
    for k, (us, size) in writer_us().items():
        print(f"   {k:<48} {us:7.2f} µs {size:7.0f} B")
    if a.skip_path:
        return 0
    runs = [(".", "off"), (".", "on")] + ([(a.base, "off")] if a.base else [])
    res: dict[tuple[str, str], list[dict[str, float]]] = {r: [] for r in runs}
    for _ in range(a.rounds):
        for src, mode in runs:
            out = subprocess.run([sys.executable, "-m", "bench.recording_cost", "--child", src, mode,
                                  "--up", str(a.up), "--down", str(a.down)],
                                 capture_output=True, text=True, timeout=600)
            if out.returncode != 0:
                print(f"{src} {mode}: failed: {out.stderr[-800:]}")
                return 1
            res[(src, mode)].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"3. call path, process CPU (median of {a.rounds}, min):")
    print(f"   {'tree':<28} {'recording':<10} {'up µs/frame':>18} {'down µs/delta':>20} {'whole run CPU s':>16}")
    for (src, mode), rows in res.items():
        up = [r["up_us_per_frame"] for r in rows]
        down = [r["down_us_per_delta"] for r in rows]
        extra = ""
        if mode == "on":
            extra = f"   file {statistics.median(r['file_bytes'] for r in rows) / 1e6:.1f} MB"
        print(f"   {src:<28} {mode:<10} {statistics.median(up):>10.2f} {min(up):>7.2f} "
              f"{statistics.median(down):>12.2f} {min(down):>7.2f} "
              f"{statistics.median(r['total_cpu_s'] for r in rows):>16.2f}{extra}")
    print("   (up/down: the measured windows, the writer thread's overlap included; whole run: "
          "start to the last byte on disk)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
