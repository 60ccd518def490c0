"""CPU per paced chunk of the call path in-process: `python -m bench.paced_cost SRC CALLS SECONDS`.

SRC is a checkout holding `voicebridge/` (this tree: `.`). CALLS in-memory calls run for SECONDS
of real time, each with model responses of 20 ms deltas arriving at twice real time (so the
playout clock paces them, lead 200 ms) and a caller frame beside every delta. Prints the process
CPU per chunk sent to VAIC, as JSON. No socket is involved, so the difference between two
checkouts is their call path's own (`bench.path_cost` measures the unpaced path). Run the
checkouts alternately, several rounds: the spread between runs is a few µs.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import sys
import time
from typing import Any

DELTA_B64 = base64.b64encode(bytes(960)).decode()    # 20 ms of 24 kHz PCM16
CHUNK = json.dumps({"type": "userStream.chunk", "conversationId": "c", "audioChunk": DELTA_B64})
DELTAS_PER_RESPONSE = 50                             # 1 s of audio, sent over 0.5 s


class MemEnd:
    """An endpoint fed by a queue; playStream.chunk sends are counted."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[Any] = asyncio.Queue()
        self.chunks = 0
        self.close_code: int | None = None

    async def recv(self) -> Any:
        item = await self.inbox.get()
        if isinstance(item, Exception):
            raise item
        return item

    def send_nowait(self, frame: str) -> None:
        if frame.startswith('{"type":"playStream.chunk"'):
            self.chunks += 1

    async def send(self, frame: str) -> None:
        self.send_nowait(frame)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.close_code = code

    def abort(self) -> None:
        self.close_code = 1006


def event(kind: str, **fields: Any) -> str:
    return json.dumps({"type": kind, **fields})


async def one_call(i: int, stop_at: float, chunks: list[int]) -> None:
    from voicebridge.call import Call
    from voicebridge.config import Secrets, load_config
    from voicebridge.transport import EndpointClosed
    cfg, _ = load_config(None, env={"VOICEBRIDGE_TOKEN": "t"}, overrides={"audio": {"playout_lead_ms": 200}})
    vaic, up = MemEnd(), MemEnd()

    async def dialer(*_a: Any, **_kw: Any) -> MemEnd:
        return up

    call = Call(vaic, cfg, Secrets(token="t", openai_api_key="k"), dialer=dialer)  # type: ignore[arg-type]
    task = asyncio.create_task(call.run())
    vaic.inbox.put_nowait(event("session.initiate", conversationId=f"c{i}", expectAudioMessages=True,
                                supportedMediaFormats=["raw/lpcm16_24"]))
    await asyncio.sleep(0.05)
    fmt = {"audio": {"output": {"format": {"type": "audio/pcm", "rate": 24000}}}}
    for kind in ("session.created", "session.updated"):
        up.inbox.put_nowait(event(kind, session=fmt))
    await asyncio.sleep(0.05)
    loop = asyncio.get_running_loop()
    n = 0
    while loop.time() < stop_at:
        rid, item = f"r{n}", f"i{n}"
        n += 1
        up.inbox.put_nowait(event("response.created", response={"id": rid}))
        for _ in range(DELTAS_PER_RESPONSE):
            up.inbox.put_nowait(event("response.output_audio.delta", response_id=rid, item_id=item,
                                      content_index=0, delta=DELTA_B64))
            vaic.inbox.put_nowait(CHUNK)
            await asyncio.sleep(0.01)
        up.inbox.put_nowait(event("response.output_audio.done", response_id=rid, item_id=item,
                                  output_index=0, content_index=0))
        up.inbox.put_nowait(event("response.done", response={"id": rid, "status": "completed"}))
        await asyncio.sleep(0.5)
    chunks.append(vaic.chunks)
    vaic.inbox.put_nowait(EndpointClosed(1006, ""))
    try:
        await asyncio.wait_for(task, 3)
    except (asyncio.TimeoutError, TimeoutError):
        pass


async def measure(src: str, calls: int, seconds: float) -> dict[str, Any]:
    from voicebridge.log import setup
    setup("error", stream=io.StringIO())
    loop = asyncio.get_running_loop()
    chunks: list[int] = []
    t0 = time.process_time()
    await asyncio.gather(*(one_call(i, loop.time() + seconds, chunks) for i in range(calls)))
    cpu_s = time.process_time() - t0
    total = sum(chunks)
    import voicebridge
    return {"src": src, "voicebridge": voicebridge.__file__, "cpu_s": round(cpu_s, 3), "chunks": total,
            "us_per_chunk": round(cpu_s / max(1, total) * 1e6, 2)}


def main(argv: list[str]) -> int:
    if len(argv) != 3:
        print(__doc__.splitlines()[0], file=sys.stderr)
        return 2
    src, calls, seconds = argv[0], int(argv[1]), float(argv[2])
    sys.path.insert(0, src)     # that checkout's voicebridge, imported only from here on
    import uvloop
    print(json.dumps(uvloop.run(measure(src, calls, seconds))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
