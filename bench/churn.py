"""Call churn for `python -m bench --churn`: `rate` new calls per second for `seconds`, each a
short real call against a running bridge (upgrade, session.initiate, session.accepted, the
`start` activity, userStream.start, held for `hold_s`, userStream.stop, session.end, close).
No audio: the bench's fake upstream answers only stamped audio, and the point is the cost of
setting calls up and tearing them down while other calls stream. Prints one JSON line:
started, ok, failed (by error type), setup p50 / p99 / max in ms. Every call and the whole run
are bounded in time; at most `MAX_OPEN` churn calls are open at once.

    python -m bench.churn PORT RATE SECONDS [HOLD_S] [DELAY_S] [TOKEN]
"""

from __future__ import annotations

import asyncio
import json
import sys
import time
import uuid
from typing import Any

from websockets.asyncio.client import connect

MAX_OPEN = 1000
CALL_TIMEOUT_S = 15.0


async def _call(url: str, token: str, hold_s: float, st: dict[str, Any]) -> None:
    cid = "churn-" + uuid.uuid4().hex[:10]
    t0 = time.monotonic()
    try:
        async with asyncio.timeout(CALL_TIMEOUT_S):
            async with connect(url, additional_headers={"Authorization": f"Bearer {token}"},
                               compression=None, ping_interval=None, close_timeout=2,
                               proxy=None) as ws:
                async def send(m: dict[str, Any]) -> None:
                    await ws.send(json.dumps({"conversationId": cid, **m}))

                async def until(kind: str) -> None:
                    while json.loads(await ws.recv()).get("type") != kind:
                        pass
                await send({"type": "session.initiate", "botName": "churn", "caller": "+15550000000",
                            "expectAudioMessages": True, "supportedMediaFormats": ["raw/lpcm16_24"]})
                await until("session.accepted")
                st["setup_ms"].append((time.monotonic() - t0) * 1000)
                await send({"type": "activities", "activities": [{
                    "id": uuid.uuid4().hex, "type": "event", "name": "start",
                    "parameters": {"caller": "+15550000000", "callee": "+15550199"}}]})
                await send({"type": "userStream.start"})
                await until("userStream.started")
                await asyncio.sleep(hold_s)
                await send({"type": "userStream.stop"})
                await until("userStream.stopped")
                await send({"type": "session.end", "reasonCode": "client-disconnected", "reason": "churn"})
                try:
                    while True:
                        await ws.recv()
                except Exception:
                    pass
        st["ok"] += 1
    except Exception as e:
        st["failed"] += 1
        st["errors"][type(e).__name__] = st["errors"].get(type(e).__name__, 0) + 1


async def run(port: int, rate: float, seconds: float, hold_s: float, delay_s: float,
              token: str) -> dict[str, Any]:
    await asyncio.sleep(delay_s)
    url = f"ws://127.0.0.1:{port}/voicebridge"
    st: dict[str, Any] = {"ok": 0, "failed": 0, "errors": {}, "setup_ms": []}
    tasks: set[asyncio.Task[None]] = set()
    t0 = time.monotonic()
    n = 0
    while time.monotonic() - t0 < seconds:
        wait = t0 + n / rate - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        if len(tasks) < MAX_OPEN:
            t = asyncio.ensure_future(_call(url, token, hold_s, st))
            tasks.add(t)
            t.add_done_callback(tasks.discard)
        n += 1
    if tasks:
        await asyncio.wait(tasks, timeout=CALL_TIMEOUT_S + 5)
    s = sorted(st["setup_ms"])

    def pct(p: float) -> float | None:
        return round(s[min(len(s) - 1, int(p * len(s)))], 2) if s else None
    return {"started": n, "ok": st["ok"], "failed": st["failed"], "errors": st["errors"],
            "rate_per_s": rate, "seconds": seconds, "setup_ms_p50": pct(0.5), "setup_ms_p99": pct(0.99),
            "setup_ms_max": round(s[-1], 2) if s else None}


def main(argv: list[str]) -> int:
    if len(argv) < 3:
        print(__doc__, file=sys.stderr)
        return 2
    port, rate, seconds = int(argv[0]), float(argv[1]), float(argv[2])
    hold_s = float(argv[3]) if len(argv) > 3 else 1.0
    delay_s = float(argv[4]) if len(argv) > 4 else 0.0
    token = argv[5] if len(argv) > 5 else "bench-token"
    print(json.dumps(asyncio.run(run(port, rate, seconds, hold_s, delay_s, token))), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
