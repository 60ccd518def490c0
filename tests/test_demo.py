"""`make demo` itself: the whole short conversation runs and judges itself OK."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_demo_runs_the_conversation_and_says_ok() -> None:
    out = subprocess.run([sys.executable, "-m", "voicebridge.demo"], cwd=ROOT, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    assert "-> OK" in out.stdout and "reason agent-hangup" in out.stdout
    assert "Traceback" not in out.stdout + out.stderr
