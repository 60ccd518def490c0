"""transport/fast_impl.py: what keeps the per-frame path of the `fast` transport cheap.

- `FastEndpoint` has slots, no instance dict: on CPython 3.11 an instance with 30 or more
  attributes loses the key-shared dict layout, and then no method lookup on it (`ep.recv()`,
  `self._flush()`, ...) is specialized any more (issue 8: the hardening's four attributes took
  the endpoint from 27 to 31 and cost ~1 % of the bridge's CPU).
- a read that fits one slice is parsed at once, without pausing the socket; a longer one is
  still parsed in slices (`base.READ_SLICE_BYTES`) with the socket paused meanwhile.
"""

from __future__ import annotations

import asyncio
import dis
import sys

import pytest
from websockets.frames import Frame, Opcode
from websockets.protocol import State
from websockets.server import ServerProtocol

from voicebridge.transport.base import READ_SLICE_BYTES
from voicebridge.transport.fast_impl import _CLOSED, _OPEN, FastEndpoint


class _Transport:
    """Records pause/resume of reading; writes go nowhere."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def write(self, data: bytes) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def can_write_eof(self) -> bool:
        return False

    def pause_reading(self) -> None:
        self.calls.append("pause")

    def resume_reading(self) -> None:
        self.calls.append("resume")

    def is_closing(self) -> bool:
        return False

    def abort(self) -> None:
        self.calls.append("abort")


def _endpoint() -> tuple[FastEndpoint, _Transport]:
    ep = FastEndpoint(ServerProtocol(state=State.OPEN), close_timeout_s=1, ping_interval_s=None)
    tr = _Transport()
    ep.connection_made(tr)  # type: ignore[arg-type]
    return ep, tr


def _frames(n: int, size: int) -> bytes:
    """n masked client text frames of `size` bytes each (what a peer sends to the server)."""
    return b"".join(Frame(Opcode.TEXT, b"%0*d" % (size, i)).serialize(mask=True) for i in range(n))


async def test_an_endpoint_has_no_instance_dict():
    ep, _ = _endpoint()
    assert not hasattr(ep, "__dict__")
    with pytest.raises(AttributeError):
        ep.not_an_attribute = 1  # type: ignore[attr-defined]


@pytest.mark.skipif(sys.version_info[:2] != (3, 11), reason="3.11's specializing interpreter")
async def test_method_lookups_on_endpoints_specialize():
    eps = [_endpoint()[0] for _ in range(20)]

    def site(objs: list[FastEndpoint]) -> None:
        for o in objs:
            o._wake()

    for _ in range(3):       # warm up past the adaptive counters, over many instances
        site(eps * 10)
    ops = [i.opname for i in dis.get_instructions(site, adaptive=True) if "METHOD" in i.opname]
    assert ops == ["LOAD_METHOD_NO_DICT"], ops


def test_the_state_constants_are_the_enum_members():
    assert _OPEN is State.OPEN and _CLOSED is State.CLOSED


async def test_a_read_within_one_slice_is_parsed_at_once():
    ep, tr = _endpoint()
    data = _frames(5, 1000)
    assert len(data) <= READ_SLICE_BYTES
    ep.data_received(data)
    assert [await asyncio.wait_for(ep.recv(), 1) for _ in range(5)] == [b"%01000d" % i for i in range(5)]
    assert tr.calls == []                 # never paused: nothing was held back


async def test_a_longer_read_is_still_parsed_in_slices():
    ep, tr = _endpoint()
    data = _frames(40, 1000)              # ~40 KB: five slices or more
    assert len(data) > 4 * READ_SLICE_BYTES
    ep.data_received(data)
    assert tr.calls == ["pause"]          # the rest waits, the socket is not read meanwhile
    got = [await asyncio.wait_for(ep.recv(), 1) for _ in range(40)]
    assert got == [b"%01000d" % i for i in range(40)]
    assert tr.calls == ["pause", "resume"]
