"""Which norms decide where two hidden-channel aggregations disagree (docs/benchmarks.md,
"Beside the peers": the 21 of 432 channels our `balanced` ranking keeps and ModelOpt's `sum`
does not, at SmolLM2-135M's WD target).

Activation scores keep each RMSNorm's L2 vector over the calibration tokens (meta["norm_l2"],
[2L, hidden]: input and post-attention norm of every layer). `balanced` ranks channels by the
sum of each vector divided by its mean (every norm an equal vote), `sum` by the raw sum (a norm
votes with its scale). For the channels only one ranking keeps, the per-norm difference of the
balanced votes (mean over the balanced-only channels minus mean over the sum-only ones) says
which norms pulled the balanced ranking its way; they add up to the total preference.

    python bench/hidden_votes.py --scores /tmp/peers/scores/activation.pt --keep 432
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prune.prune.scores import ImportanceScores  # noqa: E402


def _top(v: torch.Tensor, k: int) -> set:
    return set(torch.topk(v, k).indices.tolist())


def hidden_votes(norm_l2: torch.Tensor, keep: int) -> dict:
    """The channels each ranking alone keeps, each norm's share of the balanced preference
    for its own ones, each norm's weight under either ranking, and how many of the balanced-only
    channels stay when one norm is left out of the balanced sum."""
    n = torch.as_tensor(norm_l2).double()
    rel = n / n.mean(1, keepdim=True)
    balanced, raw = _top(rel.sum(0), keep), _top(n.sum(0), keep)
    only_b, only_s = sorted(balanced - raw), sorted(raw - balanced)
    pull = (rel[:, only_b].mean(1) - rel[:, only_s].mean(1)) if only_b else torch.zeros(len(n))
    without = [len(_top(rel.sum(0) - rel[i], keep) & set(only_b)) for i in range(len(n))]
    return {"only_balanced": only_b, "only_sum": only_s, "pull": pull.tolist(),
            "raw_share": (n.sum(1) / n.sum()).tolist(), "balanced_share": 1 / len(n),
            "kept_without": without, "mean_l2": n.mean(1).tolist()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--scores", required=True, help="activation or auto scores with norm_l2")
    p.add_argument("--keep", type=int, required=True, help="hidden channels kept")
    p.add_argument("--top", type=int, default=5, help="norms listed, by their pull")
    a = p.parse_args(argv)
    s = ImportanceScores.load(a.scores)
    if "norm_l2" not in s.meta:
        p.error(f"{a.scores} holds no per-norm statistics (re-run `importance`)")
    r = hidden_votes(s.meta["norm_l2"], a.keep)
    order = sorted(range(len(r["pull"])), key=lambda i: -abs(r["pull"][i]))
    top, means = order[0], r["mean_l2"]
    print(f"{len(r['only_balanced'])} of {a.keep} kept channels differ; balanced preference "
          f"{sum(r['pull']):.4f} in all: norm {top} {r['pull'][top]:.4f}, the other "
          f"{len(means) - 1} together {sum(r['pull']) - r['pull'][top]:.4f}; mean L2 of norm "
          f"{top} {means[top]:.3f}, of the others {min(means[:top] + means[top + 1:]):.3f} to "
          f"{max(means[:top] + means[top + 1:]):.3f}")
    print("| norm | layer | pull | mean L2 | raw weight | balanced weight "
          "| balanced-only kept without it |")
    print("|---|---|---|---|---|---|---|")
    for i in order[:a.top]:
        kind = "input" if i % 2 == 0 else "post-attention"
        print(f"| {i} | {i // 2} ({kind}) | {r['pull'][i]:.4f} | {means[i]:.3f} "
              f"| {r['raw_share'][i]:.2%} | {r['balanced_share']:.2%} "
              f"| {r['kept_without'][i]} of {len(r['only_balanced'])} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
