"""CPU per frame of the call path alone, in-process: `python -m bench.path_cost [--src DIR ...]`.

Why: `make bench` measures the whole bridge process against real sockets, where this VM's
run-to-run spread (±20 % of CPU between identical runs) hides differences of a few percent.
This drives one `Call` of a checkout (`--src`: the directory holding its `voicebridge/`; several
are measured alternately) with in-memory endpoints and counts process CPU time only: 20 000
caller frames (20 ms, pass-through) and 4 000 model deltas (100 ms, 15 per response, sent at once
within the lead, each response ended by a barge-in), repeated `--rounds` times. The endpoints' queue costs the same for
every tree, so the differences are the call path's own.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import importlib
import json
import statistics
import subprocess
import sys
import time

FRAME_B64 = base64.b64encode(bytes(960)).decode()       # 20 ms of 24 kHz PCM16
DELTA_B64 = base64.b64encode(bytes(4800)).decode()      # 100 ms


class MemEnd:
    """An endpoint fed by a queue; sends are counted, not parsed."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue = asyncio.Queue()
        self.sent = 0
        self.close_code = None
        self.got = asyncio.Event()
        self.want = 0

    async def recv(self):
        item = await self.inbox.get()
        if isinstance(item, Exception):
            raise item
        return item

    def send_nowait(self, frame: str) -> None:
        if frame.startswith('{"type":"playStream.chunk"') or frame.startswith(
                '{"type":"input_audio_buffer.append"'):
            self.sent += 1
            if self.sent >= self.want:
                self.got.set()

    async def send(self, frame: str) -> None:
        self.send_nowait(frame)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.close_code = code

    def abort(self) -> None:
        self.close_code = 1006


async def measure(n_up: int, n_down: int) -> dict[str, float]:
    from voicebridge.call import Call
    from voicebridge.config import Secrets, load_config
    from voicebridge.log import setup
    from voicebridge.transport import EndpointClosed
    import io
    setup("error", stream=io.StringIO())
    over = {"audio": {"playout_lead_ms": 2000, "max_pending_audio_ms": 600000}}
    cfg, _ = load_config(None, env={"VOICEBRIDGE_TOKEN": "t"}, overrides=over)
    vaic, up = MemEnd(), MemEnd()

    async def dialer(*a, **kw):
        return up

    call = Call(vaic, cfg, Secrets(token="t", openai_api_key="k"), dialer=dialer)
    task = asyncio.create_task(call.run())
    vaic.inbox.put_nowait(json.dumps({"type": "session.initiate", "conversationId": "c",
                                      "expectAudioMessages": True,
                                      "supportedMediaFormats": ["raw/lpcm16_24"]}))
    await asyncio.sleep(0.05)
    for t in ("session.created", "session.updated"):
        up.inbox.put_nowait(json.dumps({"type": t, "session": {"audio": {"output": {"format": {
            "type": "audio/pcm", "rate": 24000}}}}}))
    await asyncio.sleep(0.02)
    chunk = json.dumps({"type": "userStream.chunk", "conversationId": "c", "audioChunk": FRAME_B64})
    # caller -> model
    up.want = up.sent + n_up
    up.got.clear()
    t0 = time.process_time()
    for _ in range(n_up):
        vaic.inbox.put_nowait(chunk)
    await asyncio.wait_for(up.got.wait(), 60)
    t_up = time.process_time() - t0
    # model -> caller: responses of 15 deltas (1.5 s, within the 2 s lead: sent at once), each
    # ended by a barge-in so the next one starts afresh (the same work for every checkout)
    per = 15
    frames: list[str] = []
    for b in range(n_down // per):
        frames.append(json.dumps({"type": "response.created", "response": {"id": f"r{b}"}}))
        frames += [json.dumps({"type": "response.output_audio.delta", "response_id": f"r{b}",
                               "item_id": f"i{b}", "content_index": 0, "delta": DELTA_B64})
                   for _ in range(per)]
        frames.append(json.dumps({"type": "input_audio_buffer.speech_started",
                                  "audio_start_ms": 0, "item_id": f"u{b}"}))
    n_down = n_down // per * per
    vaic.want = vaic.sent + n_down
    vaic.got.clear()
    await asyncio.sleep(0.01)
    t0 = time.process_time()
    for d in frames:
        up.inbox.put_nowait(d)
    await asyncio.wait_for(vaic.got.wait(), 60)
    t_down = time.process_time() - t0
    vaic.inbox.put_nowait(EndpointClosed(1006, ""))
    try:                 # a tree with session.resume keeps the call a while: no need to wait
        await asyncio.wait_for(task, 3)
    except (asyncio.TimeoutError, TimeoutError):
        pass
    return {"up_us_per_frame": t_up / n_up * 1e6, "down_us_per_delta": t_down / n_down * 1e6}


def child(src: str, n_up: int, n_down: int) -> dict[str, float]:
    sys.path.insert(0, src)
    for name in [m for m in sys.modules if m == "voicebridge" or m.startswith("voicebridge.")]:
        del sys.modules[name]
    importlib.import_module("voicebridge")
    import uvloop
    return uvloop.run(measure(n_up, n_down))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.path_cost", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--src", action="append", help="a checkout to measure (repeatable; default: this one)")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--up", type=int, default=20000)
    ap.add_argument("--down", type=int, default=4000)
    ap.add_argument("--child", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        print(json.dumps(child(a.child, a.up, a.down)))
        return 0
    srcs = a.src or ["."]
    res: dict[str, list[dict[str, float]]] = {s: [] for s in srcs}
    for _ in range(a.rounds):
        for s in srcs:   # each measurement in a fresh process, alternating
            out = subprocess.run([sys.executable, "-m", "bench.path_cost", "--child", s,
                                  "--up", str(a.up), "--down", str(a.down)],
                                 capture_output=True, text=True, timeout=300)
            if out.returncode != 0:
                print(f"{s}: failed: {out.stderr[-500:]}")
                return 1
            res[s].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"{'checkout':<24} {'up µs/frame (median, min)':>28} {'down µs/delta (median, min)':>30}")
    for s, rows in res.items():
        up = [r["up_us_per_frame"] for r in rows]
        down = [r["down_us_per_delta"] for r in rows]
        print(f"{s:<24} {statistics.median(up):>18.2f} {min(up):>9.2f} "
              f"{statistics.median(down):>20.2f} {min(down):>9.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
