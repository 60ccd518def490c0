"""Call logic with in-memory endpoints: races and failure paths that sockets make hard to hit."""

from __future__ import annotations

import asyncio
import base64
import json
import time

from voicebridge.call import Call
from voicebridge.config import Secrets, load_config
from voicebridge.transport import EndpointClosed

SECRETS = Secrets(token="t", openai_api_key="k")


class MemEnd:
    """An Endpoint whose peer is the test: `feed()` what the bridge will receive, read `sent`."""

    def __init__(self) -> None:
        self.inbox: asyncio.Queue[object] = asyncio.Queue()
        self.sent: list[tuple[float, dict]] = []
        self.code: int | None = None
        self.t0 = time.monotonic()

    def feed(self, obj: dict | str) -> None:
        self.inbox.put_nowait(obj if isinstance(obj, str) else json.dumps(obj))

    async def recv(self) -> str:
        item = await self.inbox.get()
        if isinstance(item, Exception):
            raise item
        return item  # type: ignore[return-value]

    async def send(self, frame: str) -> None:
        self.send_nowait(frame)

    def send_nowait(self, frame: str) -> None:
        if self.code is not None:
            raise EndpointClosed(self.code, "")
        self.sent.append((time.monotonic() - self.t0, json.loads(frame)))

    async def close(self, code: int = 1000, reason: str = "") -> None:
        if self.code is None:
            self.code = code
            self.inbox.put_nowait(EndpointClosed(code, reason))

    def abort(self) -> None:
        if self.code is None:
            self.code = 1006
            self.inbox.put_nowait(EndpointClosed(1006, ""))

    @property
    def close_code(self) -> int | None:
        return self.code

    def types(self) -> list[str]:
        return [m["type"] for _, m in self.sent]


def config(**sections: dict):
    over: dict = {"call": {"hangup_grace_s": 1.0, "resume_grace_s": 0}}
    for k, v in sections.items():
        over.setdefault(k, {}).update(v)
    return load_config(None, env={"VOICEBRIDGE_TOKEN": "t"}, overrides=over)[0]


def initiate(fmt: str = "raw/lpcm16_24") -> dict:
    return {"type": "session.initiate", "conversationId": "c1", "expectAudioMessages": True,
            "supportedMediaFormats": [fmt]}


def delta(ms: int, rid: str = "r1", item: str = "i1") -> dict:
    return {"type": "response.output_audio.delta", "response_id": rid, "item_id": item,
            "content_index": 0, "delta": base64.b64encode(bytes(ms * 48)).decode()}


async def test_paced_chunk_goes_out_when_due_although_the_model_stalls():
    vaic, up = MemEnd(), MemEnd()

    async def dialer(*a, **kw):
        return up

    call = Call(vaic, config(audio={"playout_lead_ms": 200}), SECRETS, dialer=dialer)
    vaic.feed(initiate())
    task = asyncio.create_task(call.run())
    await asyncio.sleep(0.05)
    up.feed({"type": "response.created", "response": {"id": "r1"}})
    for _ in range(4):                      # 400 ms of audio at once, then nothing for a while
        up.feed(delta(100))
    await asyncio.sleep(0.6)
    chunks = [t for t, m in vaic.sent if m["type"] == "playStream.chunk"]
    vaic.feed({"type": "session.end", "conversationId": "c1"})
    await asyncio.wait_for(task, 5)
    assert len(chunks) == 4                 # the 4th went out on the pacer's timer
    assert chunks[3] - chunks[0] < 0.5      # ~0.1 s after the first, not after the stall


async def test_upstream_dialled_while_the_call_ends_is_not_left_open():
    vaic, up = MemEnd(), MemEnd()
    release = asyncio.Event()

    async def slow_dialer(*a, **kw):
        try:
            await release.wait()
        except asyncio.CancelledError:
            pass  # like wait_for on 3.11 when the inner dial has just finished: the cancel is lost
        return up

    call = Call(vaic, config(), SECRETS, dialer=slow_dialer)
    vaic.feed(initiate())
    task = asyncio.create_task(call.run())
    await asyncio.sleep(0.05)
    vaic.feed({"type": "session.end", "conversationId": "c1"})
    await asyncio.wait_for(task, 5)         # the dial "completes" as the call is torn down
    assert up.code is not None              # closed or aborted, never left open


async def test_unexpected_upstream_error_hangs_up_with_a_reason():
    vaic = MemEnd()

    async def broken_dialer(*a, **kw):
        raise RuntimeError("boom")

    call = Call(vaic, config(), SECRETS, dialer=broken_dialer)
    vaic.feed(initiate())
    task = asyncio.create_task(call.run())
    await asyncio.sleep(0.1)
    hangups = [m for _, m in vaic.sent if m["type"] == "activities"]
    vaic.feed({"type": "session.end", "conversationId": "c1"})
    await asyncio.wait_for(task, 5)
    assert hangups and "internal-error" in hangups[0]["activities"][0]["activityParams"]["hangupReason"]
    assert call.end_reason == "internal_error"


async def test_undecodable_audio_is_dropped_and_the_call_goes_on():
    vaic, up = MemEnd(), MemEnd()

    async def dialer(*a, **kw):
        return up

    call = Call(vaic, config(), SECRETS, dialer=dialer)
    vaic.feed(initiate("raw/lpcm16"))
    task = asyncio.create_task(call.run())
    await asyncio.sleep(0.05)
    good = base64.b64encode(bytes(640)).decode()
    for chunk in ("@@not-base64@@", 'AA"}', good, "AA\\AA", good, good, good):
        vaic.feed({"type": "userStream.chunk", "conversationId": "c1", "audioChunk": chunk})
    await asyncio.sleep(0.05)
    vaic.feed({"type": "session.end", "conversationId": "c1"})
    await asyncio.wait_for(task, 5)
    assert call.end_reason == "vaic_session_end"
    assert call.counters.bad_frames_in == 3 and call.counters.frames_up == 7
    appends = [m for _, m in up.sent if m["type"] == "input_audio_buffer.append"]
    assert appends and all('"' not in a["audio"] for a in appends)


async def test_vaic_gone_while_a_delta_is_forwarded_is_blamed_on_vaic():
    vaic, up = MemEnd(), MemEnd()

    async def dialer(*a, **kw):
        return up

    call = Call(vaic, config(), SECRETS, dialer=dialer)
    vaic.feed(initiate())
    task = asyncio.create_task(call.run())
    await asyncio.sleep(0.05)
    vaic.code = 1006                        # the socket is gone, the reader has not noticed yet
    up.feed(delta(100))
    await asyncio.sleep(0.05)
    vaic.inbox.put_nowait(EndpointClosed(1006, ""))
    await asyncio.wait_for(task, 5)
    assert call.end_reason == "vaic_closed"
    assert up.code is not None


async def test_shell_swaps_either_socket_mid_call():
    """Call.swap_openai / swap_vaic: the call goes on over the new sockets; the new OpenAI socket
    gets session.update first and the caller audio of the swap, the old ones are closed."""
    vaic, up, up2, vaic2 = MemEnd(), MemEnd(), MemEnd(), MemEnd()

    async def dialer(*a, **kw):
        return up

    call = Call(vaic, config(), SECRETS, dialer=dialer)
    vaic.feed(initiate())
    task = asyncio.create_task(call.run())
    await asyncio.sleep(0.05)
    chunk = {"type": "userStream.chunk", "conversationId": "c1",
             "audioChunk": base64.b64encode(bytes(960)).decode()}
    vaic.feed(chunk)
    await asyncio.sleep(0.02)
    await call.swap_openai(up2)
    vaic.feed(chunk)
    await asyncio.sleep(0.02)
    assert up.code is not None                                   # the old one closed
    assert up2.types()[0] == "session.update" and up2.types()[-1] == "input_audio_buffer.append"
    call.swap_vaic(vaic2)
    vaic2.feed(chunk)
    await asyncio.sleep(0.02)
    assert vaic.code is not None and call.ac is vaic2
    assert up2.types().count("input_audio_buffer.append") == 2   # audio from the new VAIC socket
    vaic2.feed({"type": "session.end", "conversationId": "c1"})
    await asyncio.wait_for(task, 5)
    assert call.end_reason == "vaic_session_end" and up2.code is not None
