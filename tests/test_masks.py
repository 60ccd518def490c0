"""transport/_masks.py: client frame masks from a pooled CSPRNG read."""

from __future__ import annotations

import os

from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

import voicebridge.transport.fast_impl  # noqa: F401  (installs the pool, as the daemon does)
from voicebridge.transport import _masks


def test_websockets_frames_take_their_masks_from_the_pool():
    from websockets import frames
    assert frames.secrets is _masks._POOLED
    keys = [frames.secrets.token_bytes(4) for _ in range(3000)]
    assert all(len(k) == 4 for k in keys)
    assert len(set(keys)) > 2990          # 32-bit random keys: a collision or two at most


def test_a_masked_frame_still_parses_to_its_payload():
    payload = os.urandom(3000)
    data = Frame(Opcode.BINARY, payload).serialize(mask=True)
    reader = StreamReader()
    reader.feed_data(data)
    parser = Frame.parse(reader.read_exact, mask=True)
    try:
        next(parser)
    except StopIteration as e:
        frame = e.value
    assert frame.data == payload and frame.opcode is Opcode.BINARY


def test_other_lengths_go_to_secrets():
    pool = _masks.PooledSecrets()
    assert len(pool.token_bytes(16)) == 16 and len(pool.token_bytes()) == 32


def test_the_pool_is_refilled_after_it_runs_out():
    pool = _masks.PooledSecrets()
    n = _masks.POOL_BYTES // 4
    first = [pool.token_bytes(4) for _ in range(n)]
    second = [pool.token_bytes(4) for _ in range(n)]
    assert b"".join(first) != b"".join(second)


def test_a_forked_child_never_reuses_the_parents_keys():
    pool = _masks._POOLED
    pool.token_bytes(4)                    # the parent's pool is filled
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:                           # the child: its next key, then out
        try:
            os.write(w, pool.token_bytes(4))
        finally:
            os._exit(0)
    os.close(w)
    child_key = os.read(r, 4)
    os.close(r)
    os.waitpid(pid, 0)
    parent_key = pool.token_bytes(4)       # the key at the same place in the parent's pool
    assert len(child_key) == 4 and child_key != parent_key
