"""CPU seconds and RSS of a process from /proc (Linux), like relay_floor.py."""

from __future__ import annotations

import os

_TCK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """utime + stime of `pid` in seconds (all threads)."""
    with open(f"/proc/{pid}/stat") as f:
        parts = f.read().rsplit(")", 1)[1].split()
    return (int(parts[11]) + int(parts[12])) / _TCK


def rss_kib(pid: int) -> int:
    """Resident set size (VmRSS) of `pid` in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def pin(cpu: int) -> None:
    """Pin the calling process to one CPU (no-op where affinity is unsupported)."""
    try:
        os.sched_setaffinity(0, {cpu})
    except (AttributeError, OSError):
        pass


def system_cpu() -> dict[str, float]:
    """Machine-wide CPU seconds from /proc/stat: busy (all but idle/iowait/steal), steal, and
    busy per CPU ("cpu0", "cpu1", ...)."""
    out: dict[str, float] = {}
    with open("/proc/stat") as f:
        for line in f:
            if not line.startswith("cpu"):
                break
            name, *vals = line.split()
            v = [int(x) for x in vals[:8]] + [0] * max(0, 8 - len(vals))
            user, nice, system, idle, iowait, irq, softirq, steal = v[:8]
            busy = (user + nice + system + irq + softirq) / _TCK
            if name == "cpu":
                out["busy"] = busy
                out["steal"] = steal / _TCK
            else:
                out[name] = busy
    return out
