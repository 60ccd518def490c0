"""This process's own resource figures for the admin `/health`: open descriptors, RSS, tasks.

`process_figures()` is read only when someone asks for `/health` (never per frame). It costs one
`listdir` of `/proc/self/fd` (tens of µs at a few hundred sockets) and one small read of
`/proc/self/statm`. Where `/proc` is missing (not Linux), a figure it cannot read is None.
"""

from __future__ import annotations

import asyncio
import os

__all__ = ["open_fds", "process_figures", "rss_kib"]

_PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024 if hasattr(os, "sysconf") else 4


def open_fds() -> int | None:
    """Descriptors this process holds open now (entries of /proc/self/fd), or None."""
    try:
        # listdir opens the directory itself: its own descriptor is in the listing, not counted
        return len(os.listdir("/proc/self/fd")) - 1
    except OSError:
        return None


def rss_kib() -> int | None:
    """Resident set size now, KiB (second field of /proc/self/statm, in pages), or None."""
    try:
        with open("/proc/self/statm", "rb") as f:
            fields = f.read().split()
        return int(fields[1]) * _PAGE_KIB
    except (OSError, IndexError, ValueError):
        return None


def process_figures() -> dict[str, int | None]:
    """{"open_fds", "tasks", "rss_kib"}: descriptors, asyncio tasks of the running loop (0 when
    called outside one), RSS in KiB. Reading RSS opens a file briefly: it is read after the
    descriptors, so that descriptor is not counted."""
    try:
        tasks = len(asyncio.all_tasks())
    except RuntimeError:   # no running event loop
        tasks = 0
    fds = open_fds()
    return {"open_fds": fds, "tasks": tasks, "rss_kib": rss_kib()}
