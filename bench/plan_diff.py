"""What two prune plans of the same model keep differently (docs/benchmarks.md: TP=3 `balance`
against `global`, ours against Minitron's): per dimension, how many of the kept units one plan
keeps and the other does not, in all and at most in one layer.

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
    """What one plan keeps and the other does not, as sets (a peer's plan, from as_plan.py, may
    list the same channels in another order): layers, hidden channels, and per source layer
    both keep, KV groups, heads (source head indices) and FFN neurons."""
    def only_a(x, y) -> int:
        return len(set(x) - set(y))

    def by_layer(plan: PrunePlan, units) -> dict:
        return {src: units(plan, i) for i, src in enumerate(plan.keep_layers)}
    out = {"layers_differ": only_a(a.keep_layers, b.keep_layers),
           "hidden_differ": only_a(a.keep_hidden, b.keep_hidden)}
    for name, units in (("groups", lambda p, i: p.keep_groups[i]),
                        ("heads", lambda p, i: p.head_order(i)),
                        ("ffn", lambda p, i: p.keep_ffn[i])):
        ua, ub = by_layer(a, units), by_layer(b, units)
        moved = [only_a(ua[src], ub[src]) for src in ua if src in ub]
        out[f"{name}_differ"] = sum(moved)
        out[f"{name}_kept"] = sum(len(ua[src]) for src in ua if src in ub)
        out[f"{name}_max_in_a_layer"] = max(moved, default=0)
    out["hidden_kept"] = len(a.keep_hidden)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("a")
    p.add_argument("b")
    args = p.parse_args(argv)
    d = plan_diff(PrunePlan.load(args.a), PrunePlan.load(args.b))
    print(" ".join(f"{k}={v}" for k, v in d.items()))
    for name in ("hidden", "groups", "heads", "ffn"):
        print(f"{name} kept by the first plan only: {d[f'{name}_differ']} of {d[f'{name}_kept']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
