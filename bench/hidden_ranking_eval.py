"""The evaluation sets on plans whose hidden channels are ranked without layer 0's input norm
(docs/benchmarks.md, "Beside the peers": `bench/activation_aggregation.py` finds that ranking
lowest in held-out calibration loss at H, W and WD; this shows what it does on the evaluation
sets, after that choice, and chooses nothing).

Each plan is a table model's prune_plan.json (prune_peers.py's --out) with `keep_hidden`
replaced (and its norm rescale recomputed for the new channels, as `prune` computes it),
written by `prune-hf --plan` with the same scores file (so a refitted plan is refitted again),
then scored by prune_peers.evaluate beside the table model's own cached evaluation.

    python bench/hidden_ranking_eval.py --bench /tmp/peers --wikitext-tokens 10000 --lambada 200
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import prune_peers as pp  # noqa: E402
from megatron_prune.prune.plan import norm_scales  # noqa: E402
from megatron_prune.prune.scores import ImportanceScores  # noqa: E402

MODELS = (("H", "ours-activation"), ("W", "ours-activation"),
          ("WD", "ours-activation-no-reconstruct-block-influence"))


def without_embedding_norm(norm_l2: torch.Tensor) -> torch.Tensor:
    """Each norm's L2 vector over its mean, summed over every norm but layer 0's input norm."""
    n = torch.as_tensor(norm_l2).double()
    return (n / n.mean(1, keepdim=True))[1:].sum(0)


def replan(plan: dict, hidden: torch.Tensor, energy: torch.Tensor) -> dict:
    plan = dict(plan, keep_hidden=sorted(hidden.topk(len(plan["keep_hidden"])).indices.tolist()))
    if plan.get("norm_scale"):
        plan["norm_scale"] = norm_scales(energy, plan["keep_hidden"], plan["keep_layers"])
    return plan


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--bench", type=Path, required=True, help="prune_peers.py's --out")
    p.add_argument("--wikitext-tokens", type=int, default=10000)
    p.add_argument("--lambada", type=int, default=200)
    a = p.parse_args(argv)
    scores_file = a.bench / "scores" / "activation.pt"
    s = ImportanceScores.load(scores_file)
    hidden = without_embedding_norm(s.meta["norm_l2"])
    energy = torch.as_tensor(s.meta["norm_energy"])
    data = pp.prepare(a.bench)
    out_dir = a.bench / "hidden_ranking"
    out_dir.mkdir(exist_ok=True)
    print("| target | model | calib loss | C4 ppl | WikiText-2 word ppl | books ppl | LAMBADA |")
    print("|---|---|---|---|---|---|---|")
    for target, system in MODELS:
        table_model = a.bench / "models" / target / system
        plan = replan(json.loads((table_model / "prune_plan.json").read_text()), hidden, energy)
        plan_file = out_dir / f"{target}__{system}.json"
        plan_file.write_text(json.dumps(plan))
        model = out_dir / f"{target}__{system}"
        if not (model / "config.json").is_file():
            subprocess.run([str(c) for c in pp.CLI + [
                "prune-hf", "--hf-dir", data["teacher"], "--save", model, "--plan", plan_file,
                "--scores", scores_file, "--force"]], check=True, capture_output=True)
        for name, path in (("as in the table", table_model),
                           ("without layer 0's input norm", model)):
            r = pp.evaluate(str(path), data, a)
            print(f"| {target} | {system}, {name} | {r['calib_loss']:.3f} | {r['c4']['ppl']:.2f} "
                  f"| {r['wikitext']['word_ppl']:.2f} | {r['books']['ppl']:.2f} "
                  f"| {r['lambada']:.3f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
