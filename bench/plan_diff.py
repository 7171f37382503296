"""What two prune plans of the same model keep differently (docs/benchmarks.md, TP=3 `balance`
against `global`): for each kept dimension whether the plans agree, and how many kept FFN
neurons differ, in all and at most in one layer.

    python bench/plan_diff.py /tmp/peers/models/W/ours-activation-tp3-balance/prune_plan.json \\
        /tmp/peers/models/W/ours-activation/prune_plan.json
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prune.prune.plan import PrunePlan  # noqa: E402


def plan_diff(a: PrunePlan, b: PrunePlan) -> dict:
    """Per field: equal or not; for keep_ffn the neurons one plan keeps and the other does not."""
    out = {f: getattr(a, f) == getattr(b, f)
           for f in ("keep_layers", "keep_hidden", "keep_groups", "keep_heads")}
    moved = [len(set(x) - set(y)) for x, y in zip(a.keep_ffn, b.keep_ffn)]
    kept = sum(map(len, a.keep_ffn))
    out.update(ffn_differ=sum(moved), ffn_kept=kept, ffn_max_in_a_layer=max(moved),
               layers_differ=sum(m > 0 for m in moved))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args(argv)
    d = plan_diff(PrunePlan.load(args.a), PrunePlan.load(args.b))
    print(" ".join(f"{k}={v}" for k, v in d.items()))
    print(f"FFN neurons kept by one plan only: {d['ffn_differ']} of {d['ffn_kept']} "
          f"({100 * d['ffn_differ'] / d['ffn_kept']:.1f}%)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
