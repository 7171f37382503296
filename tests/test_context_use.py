"""bench/context_use.py: the loss by position averages to the calibration loss prune uses, and its
table's context gain is the first bucket minus the second half, and its repeated-bigram column
averages exactly the predictions a copy from context gets right, on the real stories260K model."""
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
    g = torch.Generator().manual_seed(0)  # half the rows from 12 tokens: repeated bigrams
    rows = torch.cat([torch.randint(0, 512, (3, 33), generator=g),
                      torch.randint(40, 52, (3, 33), generator=g)])
    losses = context_use.token_losses(model, rows)
    ce = losses.mean(0)
    assert ce.shape == (32,)
    assert abs(float(ce.mean()) - mean_loss(model, rows, 4)) < 1e-5
    line = context_use.table({"m": lambda: model}, rows, 8).splitlines()[2]
    cells = [float(c) for c in line.strip("|").split("|")[1:]]
    assert cells[:4] == [round(float(ce[a:a + 8].mean()), 3) for a in range(0, 32, 8)]
    assert abs(cells[4] - (float(ce[:8].mean()) - float(ce[16:].mean()))) < 1e-3
    copy = context_use.repeated_bigrams(rows)
    assert 0 < int(copy.sum()) < copy.numel()
    assert abs(cells[5] - float(losses[copy].mean())) < 1e-3
    assert abs(cells[6] - float(losses[~copy].mean())) < 1e-3


def test_repeated_bigrams_marks_what_a_copy_predicts():
    rows = torch.tensor([[5, 6, 7, 5, 6, 8, 5, 6, 7]])
    # predictions of positions 1..8: 6 7 5 6 8 5 6 7 -- a copy is right where (cur, next) repeats
    assert context_use.repeated_bigrams(rows).tolist() == [
        [False, False, False, True, False, False, True, True]]
