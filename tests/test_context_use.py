"""bench/context_use.py: the loss by position averages to the calibration loss prune uses, and its
table's context gain is the first bucket minus the second half, on the real stories260K model."""
from __future__ import annotations

import sys
from pathlib import Path

import torch

from megatron_prune.checkpoint.hf_model import load_hf_model
from megatron_prune.prune.importance_hf import mean_loss

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import context_use  # noqa: E402


def test_loss_by_position_is_the_calibration_loss_spread_out(stories260k_hf):
    model = load_hf_model(stories260k_hf)
    rows = torch.randint(0, 512, (6, 33), generator=torch.Generator().manual_seed(0))
    ce = context_use.loss_by_position(model, rows)
    assert ce.shape == (32,)
    assert abs(float(ce.mean()) - mean_loss(model, rows, 4)) < 1e-5
    line = context_use.table({"m": lambda: model}, rows, 8).splitlines()[2]
    cells = [float(c) for c in line.strip("|").split("|")[1:]]
    assert cells[:4] == [round(float(ce[a:a + 8].mean()), 3) for a in range(0, 32, 8)]
    assert abs(cells[4] - (float(ce[:8].mean()) - float(ce[16:].mean()))) < 1e-3
