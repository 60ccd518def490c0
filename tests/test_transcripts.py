"""Transcript files: mode 0600, one JSON line per turn, bounded, retention."""

from __future__ import annotations

import json
import os
import stat
import time
from pathlib import Path

from voicebridge import transcripts
from voicebridge.transcripts import TranscriptFile, sweep


def test_file_is_private_and_one_line_per_turn(tmp_path: Path) -> None:
    d = tmp_path / "t"
    f = TranscriptFile(str(d), "conv/../1", "sales")
    f.add(120, "caller", "Hello")
    f.add(900, "agent", 'Hi "there"')
    f.close()
    (p,) = d.iterdir()
    assert stat.S_IMODE(p.stat().st_mode) == 0o600 and stat.S_IMODE(d.stat().st_mode) == 0o700
    assert "/" not in p.name[:-len(transcripts.SUFFIX)] and ".." not in p.name
    lines = [json.loads(x) for x in p.read_text().splitlines()]
    assert lines[0]["conversation_id"] == "conv/../1" and lines[0]["profile"] == "sales"
    assert lines[1:] == [{"t_ms": 120, "role": "caller", "text": "Hello"},
                         {"t_ms": 900, "role": "agent", "text": 'Hi "there"'}]


def test_file_size_is_bounded(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(transcripts, "MAX_FILE_BYTES", 300)
    f = TranscriptFile(str(tmp_path), "c", "p")
    for i in range(50):
        f.add(i, "agent", "x" * 40)
    f.close()
    (p,) = tmp_path.iterdir()
    assert p.stat().st_size <= 300


def test_retention_deletes_only_old_transcripts(tmp_path: Path) -> None:
    old, new, other = (tmp_path / ("a" + transcripts.SUFFIX), tmp_path / ("b" + transcripts.SUFFIX),
                       tmp_path / "keep.txt")
    for p in (old, new, other):
        p.write_text("{}\n")
    ten_days = time.time() - 10 * 86400
    os.utime(old, (ten_days, ten_days))
    os.utime(other, (ten_days, ten_days))
    assert sweep(str(tmp_path), 7) == 1
    assert not old.exists() and new.exists() and other.exists()


def test_same_call_id_in_the_same_second_gets_its_own_file(tmp_path: Path) -> None:
    d = tmp_path / "t"
    d.mkdir(mode=0o755)
    a, b = TranscriptFile(str(d), "c1", "p"), TranscriptFile(str(d), "c1", "p")
    a.close()
    b.close()
    assert a.path != b.path and len(list(d.iterdir())) == 2
    assert stat.S_IMODE(d.stat().st_mode) == 0o700
