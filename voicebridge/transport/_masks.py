"""Client frame masks from a pooled CSPRNG read, for websockets' frame codec.

RFC 6455 §5.3: a client masks every frame with a fresh key that must be unpredictable, taken
from a strong source of entropy. websockets calls `secrets.token_bytes(4)` per frame: one
`getrandom` system call for every frame the bridge sends to OpenAI. `install()` hands
websockets' `frames` module a stand-in whose `token_bytes(4)` slices the keys out of one
`os.urandom(POOL_BYTES)` read instead (1 024 keys per call): the same generator, so the keys are
as unpredictable, only fetched in bulk. A forked child drops the pool it inherited
(`os.register_at_fork`), so no two processes ever hand out the same keys. Any other length goes
to `secrets` unchanged.
"""

from __future__ import annotations

import os
import secrets

POOL_BYTES = 4096


class PooledSecrets:
    """What websockets' `frames` module uses of `secrets` (`token_bytes`), pooled for 4 bytes."""

    __slots__ = ("_buf", "_pos")

    def __init__(self) -> None:
        self._buf = b""
        self._pos = 0

    def token_bytes(self, nbytes: int | None = None) -> bytes:
        if nbytes != 4:
            return secrets.token_bytes(nbytes)
        pos = self._pos
        if pos + 4 > len(self._buf):
            self._buf, pos = os.urandom(POOL_BYTES), 0
        self._pos = pos + 4
        return self._buf[pos:pos + 4]

    def drop(self) -> None:
        """Forget the pool (a forked child must not reuse its parent's keys)."""
        self._buf, self._pos = b"", 0


_POOLED = PooledSecrets()
os.register_at_fork(after_in_child=_POOLED.drop)


def install() -> None:
    """Make websockets' frame codec take its masks from the pool (idempotent)."""
    from websockets import frames
    frames.secrets = _POOLED  # type: ignore[assignment]
