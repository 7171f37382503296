"""bench/train_throughput.py's plumbing on its tiny --smoke shape (the CPU; its numbers mean
nothing): the accumulation round alone runs ours and HF and reports both."""
from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("megatron.core")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow  # a GPU benchmark's CPU smoke run (suite time)
def test_accum_only_smoke(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "bench" / "train_throughput.py"), "--smoke", "--accum-only",
         "--out", str(tmp_path), "--ours-micro-batches", "2", "--hf-micro-batches", "2",
         "--accum", "2", "--iters", "2"],
        capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [(r["system"], r["micro_batch"], r["accum"]) for r in rows] == [("ours", 2, 2),
                                                                          ("hf", 2, 2)]
    for r in rows:
        assert r["tokens_per_s"] > 0 and 0 < r["mfu"] < 1
    assert math.isfinite(rows[0]["first_loss"]) and math.isfinite(rows[0]["last_loss"])
    assert "accumulation 2: ours" in (tmp_path / "results.md").read_text()
