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
                           "--out", str(tmp_path), "--workers", "2", "--data", str(DATA),
                           "--recover-fraction", "1/6",
                           "--variant", "activation_kd@logits=--kd-hidden-weight 0"],
                          capture_output=True, text=True, timeout=1500, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((tmp_path / "results.json").read_text())
    ev = res["eval"]
    methods = ("random", "magnitude", "activation", "taylor")
    assert set(ev) == {"teacher", "scratch", "activation_kd@logits"} | {
        f"{m}_{k}" for m in methods for k in ("pruned", "lm", "kd")}
    t = ev["teacher"]
    for m in methods:  # pruning removed parameters; training helped every pruned model
        assert ev[f"{m}_pruned"]["params"] < t["params"]
        assert ev[f"{m}_lm"]["books"] < ev[f"{m}_pruned"]["books"]
    assert ev["activation_kd"]["books"] < ev["scratch"]["books"]
    assert len(res["goals"]) == 7
    # the recovery budget: the most whole iterations within 1/6 of the teacher's tokens
    p = res["protocol"]
    per_iter = p["recover_global_batch"] * p["seq_length"]
    assert p["recover_iters"] * per_iter <= res["teacher"]["tokens"] / 6
    assert (p["recover_iters"] + 1) * per_iter > res["teacher"]["tokens"] / 6
    assert "hidden states of student layers" in (tmp_path / "run.log").read_text()
    for f in ("results.md", "recover_curves.png", "teacher_curve.png", "run.log"):
        assert (tmp_path / f).stat().st_size > 0


def test_recover_fraction_flag():
    sys.path.insert(0, str(ROOT / "bench"))
    import prune_recover as pr
    p = pr.Protocol(recover_fraction="1/6")
    assert pr.recovery_iterations(p, 48_824_320) == 993  # 8.14 M tokens / (8 x 1024)
    assert pr.parse_args(["--out", "x", "--recover-fraction", "1/6"]).recover_fraction == "1/6"
    for bad in ("0", "7/6", "x"):
        with pytest.raises(SystemExit):
            pr.parse_args(["--out", "x", "--recover-fraction", bad])


def test_batch_size_variant_keeps_the_tokens():
    sys.path.insert(0, str(ROOT / "bench"))
    import prune_recover as pr
    p = pr.Protocol(recover_iters=960, recover_global_batch=8)
    flags = pr._same_tokens(p, ["--micro-batch-size", "4", "--global-batch-size", "4"])
    assert pr._flag(flags, "--train-iters", 0) * 4 == 960 * 8  # twice the iterations of 8
    assert pr._flag(flags, "--lr-warmup-iters", 0) == 96  # 5% of them, as the base run
    # other flags, or an explicit length, are left as given
    assert pr._same_tokens(p, ["--lr", "2e-3"]) == ["--lr", "2e-3"]
    both = ["--global-batch-size", "16", "--train-iters", "10"]
    assert pr._same_tokens(p, both) == both
    with pytest.raises(SystemExit, match="multiple of the micro-batch"):
        pr.main(["--out", "x", "--variant", "activation_kd@b4=--global-batch-size 4"])
