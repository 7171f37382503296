"""bench/prune_recover.py end to end on the CPU (`--smoke`: tiny shapes, the real pipeline:
Gutenberg -> preprocess -> teacher from random init -> importance -> prune -> recovery with LM
loss and distillation, random-init baseline -> evaluation -> report). Slow (about 5 minutes):
`python3 -m pytest -m slow tests/test_prune_recover.py`."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@pytest.mark.slow
def test_prune_recover_smoke(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "bench" / "prune_recover.py"), "--smoke",
                           "--out", str(tmp_path), "--workers", "2", "--data", str(DATA)],
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    ev = res["eval"]
    methods = ("random", "magnitude", "activation", "taylor")
    assert set(ev) == {"teacher", "scratch"} | {f"{m}_{k}" for m in methods
                                                for k in ("pruned", "lm", "kd")}
    t = ev["teacher"]
    for m in methods:  # pruning removed parameters; training helped every pruned model
        assert ev[f"{m}_pruned"]["params"] < t["params"]
        assert ev[f"{m}_lm"]["books"] < ev[f"{m}_pruned"]["books"]
    assert ev["activation_kd"]["books"] < ev["scratch"]["books"]
    assert len(res["goals"]) == 7
    for f in ("results.md", "recover_curves.png", "teacher_curve.png", "run.log"):
        assert (tmp_path / f).stat().st_size > 0
