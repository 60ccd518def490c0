"""systemd integration: the sd_notify protocol (readiness, status, watchdog) with no dependency.

Contract:
- `Notifier.from_env()` reads `NOTIFY_SOCKET` (a filesystem path, or an abstract socket name when
  it starts with `@`). Without it every method is a no-op, so the daemon runs the same outside
  systemd.
- Each notification is one datagram of newline-separated `KEY=VALUE` lines on a non-blocking
  unix datagram socket opened once. Nothing here raises: a failed send returns False and is
  logged once (`systemd.notify_failed`), later failures only counted in `failures`.
- `watchdog_interval_s()` is half of `WATCHDOG_USEC` when systemd asked this process for watchdog
  pings (`WATCHDOG_PID` unset or equal to our pid), else None.
- `Heartbeat` drives the pings and `STATUS=` updates from loop timers (`loop.call_later`), never
  from a task or a thread: an event loop that is stuck stops pinging, and systemd restarts the
  service after `WatchdogSec`. `STATUS=` is sent at most once per `status_interval_s`, and only
  when the text changed.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from typing import Callable, Mapping

from .bounds import TEXT_CHARS, clip
from .log import exc_fields, get_logger

STATUS_CHARS = TEXT_CHARS   # a STATUS= text longer than this is clipped


def _one_line(text: str) -> str:
    """A value for one `KEY=VALUE` line: no newline (it would start a new assignment), bounded."""
    return clip(" ".join(str(text).split()), STATUS_CHARS)


class Notifier:
    """Sends sd_notify messages to `address` (None: a no-op notifier)."""

    def __init__(self, address: str | None, env: Mapping[str, str] | None = None) -> None:
        self.address = address or None
        self._env = os.environ if env is None else env
        self._sock: socket.socket | None = None
        self._target: str | bytes = ""
        if self.address is not None:
            # an abstract socket: '@name' in the environment, '\0name' on the wire
            self._target = b"\0" + self.address[1:].encode() if self.address.startswith("@") else self.address
        self.failures = 0
        self.sent = 0

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> "Notifier":
        """The notifier systemd set up for this process (`NOTIFY_SOCKET`), or a no-op one."""
        env = os.environ if env is None else env
        return cls(env.get("NOTIFY_SOCKET") or None, env)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    def notify(self, **fields: str) -> bool:
        """One datagram `KEY=VALUE\\n...` (keys upper-cased); True if it was sent."""
        if self.address is None:
            return False
        payload = "\n".join(f"{k.upper()}={v}" for k, v in fields.items()).encode()
        try:
            if self._sock is None:
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                sock.setblocking(False)   # a full receive queue fails the send, never blocks the loop
                self._sock = sock
            self._sock.sendto(payload, self._target)
        except (OSError, ValueError) as e:   # ValueError: an address with a NUL byte
            self.failures += 1
            if self.failures == 1:
                get_logger().warning("systemd.notify_failed", socket=clip(self.address, 108),
                                     message=clip(payload.split(b"=", 1)[0].decode(), 32),
                                     **exc_fields(e))
            return False
        self.sent += 1
        return True

    def ready(self, status: str = "") -> bool:
        """`READY=1` (start-up or a reload finished), with `STATUS=` when given."""
        return self.notify(ready="1", status=_one_line(status)) if status else self.notify(ready="1")

    def status(self, text: str) -> bool:
        return self.notify(status=_one_line(text))

    def stopping(self) -> bool:
        return self.notify(stopping="1")

    def reloading(self) -> bool:
        """`RELOADING=1` with `MONOTONIC_USEC` (CLOCK_MONOTONIC), as Type=notify-reload expects;
        send `ready()` when the reload is done."""
        usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        return self.notify(reloading="1", monotonic_usec=str(usec))

    def watchdog(self) -> bool:
        return self.notify(watchdog="1")

    def watchdog_interval_s(self) -> float | None:
        """Half of `WATCHDOG_USEC`, if systemd expects watchdog pings from this process."""
        if self.address is None:
            return None
        pid = self._env.get("WATCHDOG_PID", "")
        if pid and pid.strip() != str(os.getpid()):
            return None
        try:
            usec = int(self._env.get("WATCHDOG_USEC", ""))
        except ValueError:
            return None
        return usec / 2e6 if usec > 0 else None

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


class Heartbeat:
    """Watchdog pings and `STATUS=` updates as loop timer chains (see the module docstring).

    `status_text()` is called once per `status_interval_s`; it must be cheap (no I/O)."""

    def __init__(self, notifier: Notifier, loop: asyncio.AbstractEventLoop,
                 status_text: Callable[[], str], status_interval_s: float = 1.0) -> None:
        self.notifier = notifier
        self.loop = loop
        self.status_text = status_text
        self.status_interval_s = status_interval_s
        self.watchdog_interval_s = notifier.watchdog_interval_s()
        self._last_status: str | None = None
        self._status_failed = False
        self._watchdog_handle: asyncio.TimerHandle | None = None
        self._status_handle: asyncio.TimerHandle | None = None

    def start(self, sent_status: str | None = None) -> None:
        """Arm both timers; `sent_status` is the text already sent (with READY=1)."""
        if not self.notifier.enabled:
            return
        self._last_status = sent_status
        if self.watchdog_interval_s is not None:
            self._watchdog_handle = self.loop.call_later(self.watchdog_interval_s, self._ping)
        self._status_handle = self.loop.call_later(self.status_interval_s, self._update_status)

    def _ping(self) -> None:
        self.notifier.watchdog()
        assert self.watchdog_interval_s is not None
        self._watchdog_handle = self.loop.call_later(self.watchdog_interval_s, self._ping)

    def _update_status(self) -> None:
        try:
            text = self.status_text()
        except Exception as e:   # a broken callback must not end the chain (logged once)
            if not self._status_failed:
                self._status_failed = True
                get_logger().error("systemd.status_failed", **exc_fields(e))
            text = self._last_status or ""
        if text != self._last_status:
            self.notifier.status(text)
            self._last_status = text
        self._status_handle = self.loop.call_later(self.status_interval_s, self._update_status)

    def stop(self) -> None:
        for handle in (self._watchdog_handle, self._status_handle):
            if handle is not None:
                handle.cancel()
        self._watchdog_handle = self._status_handle = None
