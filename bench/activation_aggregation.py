"""How activation statistics are aggregated into hidden-channel and head scores, judged by the
calibration loss of the pruned model (issue 31; never by an evaluation set).

Minitron-style activation importance takes, per channel, the mean of |x| over each sequence and
the L2 norm of that over the calibration samples. What differs between implementations is how
those per-norm (hidden) and per-channel (head) vectors are combined. This script captures them
once on the teacher (plain forward hooks) and rebuilds prune_peers.py's W and WD plans with each
variant swapped in (everything else of the plan kept; norms rescaled for the kept hidden
channels as `prune` does), printing the calibration loss of each pruned model:

hidden  L2 over norms x samples (ours before 0cefb8b) | sum over norms of each norm's L2
        (ModelOpt 0.35.1's mcore_minitron) | each norm's L2 divided by its mean, summed (ours now)
        | the same without layer 0's input norm (the one that sees the token embeddings;
        bench/hidden_votes.py found it decides where ours and ModelOpt's rankings differ)
heads   mean over tokens of each head's norm (ours before) | L2 over the head's channels of the
        per-channel statistic (ModelOpt's, ours now)

Two calibration losses: on the scored rows (those the statistics come from) and on the 16
held-out rows `auto` judges its choices on (the auto scores' meta["calibration"]). The plans
keep the kept o_proj / down_proj columns as they are (no refit), so only the ranking differs.

    python bench/activation_aggregation.py --bench /tmp/peers     # prune_peers.py's --out
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_prune.checkpoint.convert import HFSource  # noqa: E402
from megatron_prune.checkpoint.hf import HFCheckpoint  # noqa: E402
from megatron_prune.checkpoint.hf_model import load_hf_model  # noqa: E402
from megatron_prune.prune.apply import _calibration_loss  # noqa: E402
from megatron_prune.prune.plan import PrunePlan, norm_scales  # noqa: E402
from megatron_prune.prune.scores import ImportanceScores  # noqa: E402

PLANS = {"H": "ours-activation", "W": "ours-activation", "WD": "ours-activation-block-influence"}
HEADS_AT = ("W", "WD")  # H keeps every head


def capture(teacher: Path, calib: torch.Tensor, micro_batch: int = 4) -> dict:
    """Sums over samples of (sequence mean of |x|)^2: per norm [2L, hidden], per channel of
    o_proj's input [L, heads * head_dim]; and per head of (sequence mean of its norm)^2."""
    model = load_hf_model(str(teacher), device="cpu").eval()
    cfg = model.config
    L, d = cfg.num_hidden_layers, cfg.hidden_size // cfg.num_attention_heads
    d = getattr(cfg, "head_dim", None) or d
    out = {"norms": torch.zeros(2 * L, cfg.hidden_size, dtype=torch.float64),
           "channels": torch.zeros(L, cfg.num_attention_heads * d, dtype=torch.float64),
           "head_norms": torch.zeros(L, cfg.num_attention_heads, dtype=torch.float64)}

    def add(t, row, x):  # x: [batch, seq, n]
        t[row] += (x.abs().double().mean(1) ** 2).sum(0)

    hooks = []
    for i, layer in enumerate(model.model.layers):
        for j, norm in enumerate((layer.input_layernorm, layer.post_attention_layernorm)):
            hooks.append(norm.register_forward_hook(
                lambda m, a, o, r=2 * i + j: add(out["norms"], r, o)))

        def attn(m, a, i=i):
            add(out["channels"], i, a[0])
            add(out["head_norms"], i, a[0].unflatten(-1, (-1, d)).norm(dim=-1))
        hooks.append(layer.self_attn.o_proj.register_forward_pre_hook(attn))
    with torch.no_grad():
        for s in range(0, len(calib), micro_batch):
            model.model(input_ids=calib[s:s + micro_batch])
    for h in hooks:
        h.remove()
    out["head_dim"] = d
    return out


def variants(c: dict) -> tuple:
    l2 = c["norms"].sqrt()
    hidden = {"L2 over norms x samples (ours before)": c["norms"].sum(0).sqrt(),
              "sum over norms of each norm's L2 (Minitron)": l2.sum(0),
              "each norm's L2 / its mean, summed (ours now)":
                  (l2 / l2.mean(1, keepdim=True)).sum(0),
              "the same without layer 0's input norm":
                  (l2 / l2.mean(1, keepdim=True))[1:].sum(0)}
    heads = {"mean over tokens of each head's norm (ours before)": c["head_norms"].sqrt(),
             "L2 over channels of the channel statistic (Minitron, ours now)":
                 c["channels"].sqrt().unflatten(-1, (-1, c["head_dim"])).norm(dim=-1)}
    return hidden, heads


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--bench", type=Path, required=True, help="prune_peers.py's --out")
    args = p.parse_args(argv)
    calib = torch.load(args.bench / "data" / "calib.pt")
    held = torch.as_tensor(ImportanceScores.load(args.bench / "scores" / "auto-layer-loss.pt")
                           .meta["calibration"]).long()
    hidden, heads = variants(capture(args.bench / "teacher", calib))
    energy = torch.as_tensor(ImportanceScores.load(args.bench / "scores" / "activation.pt")
                             .meta["norm_energy"])  # the same for every aggregation
    source = HFSource(HFCheckpoint(args.bench / "teacher"))
    losses = [_calibration_loss(source, rows, 4) for rows in (calib, held)]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        def score(plan: dict) -> tuple:
            f = Path(tmp) / "plan.json"
            f.write_text(json.dumps(plan))
            return tuple(loss(PrunePlan.load(f)) for loss in losses)
        for target, system in PLANS.items():
            base = json.loads((args.bench / "models" / target / system / "prune_plan.json")
                              .read_text())
            keep = len(base["keep_hidden"])
            for name, v in hidden.items():
                plan = copy.deepcopy(base)
                plan["keep_hidden"] = sorted(v.topk(keep).indices.tolist())
                plan["norm_scale"] = norm_scales(energy, plan["keep_hidden"], plan["keep_layers"])
                rows.append((target, "hidden", name, score(plan)))
                print(rows[-1], flush=True)
            if target not in HEADS_AT:
                continue
            per_group = len(base["keep_heads"][0][0])
            for name, v in heads.items():
                plan = copy.deepcopy(base)
                n_groups = base["source"]["num_query_groups"]
                plan["keep_heads"] = [
                    [sorted(v[layer].reshape(n_groups, -1)[g].topk(per_group).indices.tolist())
                     for g in groups]
                    for layer, groups in zip(base["keep_layers"], base["keep_groups"])]
                rows.append((target, "heads", name, score(plan)))
                print(rows[-1], flush=True)
    lines = ["| target | scores | aggregation | calibration loss (scored rows) | "
             "calibration loss (held-out rows) |", "|---|---|---|---|---|"]
    lines += [f"| {t} | {k} | {n} | {v[0]:.4f} | {v[1]:.4f} |" for t, k, n, v in rows]
    print("\n".join(lines))
    (args.bench / "aggregation.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
