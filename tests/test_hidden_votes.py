"""bench/hidden_votes.py: where `balanced` and `sum` disagree, the norm that pulled the balanced
ranking its way is found, and the per-norm pulls add up to the whole preference. The rankings
are those of `prune --hidden-aggregation` (the scores' hidden field, with_hidden_aggregation)."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from megatron_prune.prune.plan import with_hidden_aggregation
from megatron_prune.prune.scores import ImportanceScores
from megatron_prune.prune.importance_hf import hidden_from_norms

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
import hidden_votes  # noqa: E402


def test_a_small_norm_with_an_equal_vote_decides():
    # norms 1 and 2 are large and rank channel 2 above channel 3; norm 0 is 100x smaller and
    # strongly prefers channel 3: its raw vote is negligible, its balanced vote is not
    n = torch.tensor([[.010, .010, .002, .030, .001, .001],
                      [4.0, 4.0, 2.2, 2.0, 1.0, 1.0],
                      [4.0, 4.0, 2.2, 2.0, 1.0, 1.0]])
    r = hidden_votes.hidden_votes(n, 3)
    assert r["only_balanced"] == [3] and r["only_sum"] == [2]
    assert max(range(3), key=lambda i: r["pull"][i]) == 0
    assert r["kept_without"] == [0, 1, 1]
    rel = n.double() / n.double().mean(1, keepdim=True)
    assert sum(r["pull"]) == pytest.approx(float(rel.sum(0)[3] - rel.sum(0)[2]))
    assert r["raw_share"][0] == pytest.approx(float(n[0].sum() / n.sum()))
    # the same two rankings as `prune --hidden-aggregation balanced / sum`
    z = torch.zeros(1, 1)
    s = ImportanceScores("activation", {}, hidden=hidden_from_norms(n ** 2), heads=z, ffn=z,
                         groups=z, meta={"norm_l2": n})
    assert set(torch.topk(s.hidden, 3).indices.tolist()) == {0, 1, 3}
    summed = with_hidden_aggregation(s, "sum").hidden
    assert set(torch.topk(summed, 3).indices.tolist()) == {0, 1, 2}
