"""How much a pruned model still gains from context: calibration loss by token position.

LAMBADA asks for a passage's last word, which only the wider passage gives away, so a model can
be good at local next-token prediction (low perplexity) and poor on LAMBADA. This script shows
where in the sequence each model's loss lies, on the held-out calibration sequences that `auto`
judges its choices on (the scores file's meta["calibration"]; never an evaluation set): the mean
cross-entropy in buckets of positions, and the context gain: the first bucket's loss minus the
mean loss over the second half of the positions (how much the model's loss falls once it has
context; the teacher's gain is what pruning should keep), and the mean loss on the tokens a copy
from earlier in the row predicts (repeated bigrams) beside the rest. Issue 31 uses it to explain
LAMBADA at targets D and WD (docs/benchmarks.md).

    python bench/context_use.py --scores /tmp/peers/scores/auto-layer-loss.pt \\
        --models /tmp/peers/teacher /tmp/peers/models/D/ours-auto-auto /tmp/peers/models/D/minitron

With --criteria-at W --teacher DIR, it also builds prune_peers.py's target W in memory from the
auto scores with each of activation and Taylor for the heads and for the FFN (hidden channels by
activation, `global`, o_proj/down_proj refitted, as `prune-hf` writes it) and shows the same.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_prune.checkpoint.convert import open_source  # noqa: E402
from megatron_prune.checkpoint.hf_model import hf_model_from_source, load_hf_model  # noqa: E402
from megatron_prune.prune.apply import PrunedSource  # noqa: E402
from megatron_prune.prune.choose import calibration_rows, with_choice  # noqa: E402
from megatron_prune.prune.plan import PruneTarget, make_plan  # noqa: E402
from megatron_prune.prune.reconstruct import fit, fit_rows  # noqa: E402
from megatron_prune.prune.scores import ImportanceScores  # noqa: E402
from prune_peers import SHAPES  # noqa: E402


def token_losses(model, rows: torch.Tensor, micro_batch: int = 4) -> torch.Tensor:
    """Next-token cross-entropy of every row at positions 1..seq-1 (an HF causal LM)."""
    out = []
    with torch.inference_mode():
        for i in range(0, len(rows), micro_batch):
            batch = rows[i:i + micro_batch]
            logits = model(input_ids=batch).logits[:, :-1].float()
            out.append(F.cross_entropy(logits.transpose(1, 2), batch[:, 1:], reduction="none"))
    return torch.cat(out)


def repeated_bigrams(rows: torch.Tensor) -> torch.Tensor:
    """[rows, seq-1] mask of the predictions a copy from context gets right: the token to
    predict follows the current one somewhere earlier in the row (the pattern induction heads
    complete; LAMBADA's last word is often such a copy of a name seen before)."""
    mask = torch.zeros(rows.shape[0], rows.shape[1] - 1, dtype=torch.bool)
    for r, row in enumerate(rows.tolist()):
        seen = set()
        for t in range(len(row) - 1):
            mask[r, t] = (row[t], row[t + 1]) in seen
            seen.add((row[t], row[t + 1]))
    return mask


def table(models: dict, rows: torch.Tensor, bucket: int) -> str:
    """`models`: label -> a function that builds the HF model."""
    seq = rows.shape[1] - 1
    starts = list(range(0, seq, bucket))
    head = " | ".join(f"{a + 1}-{min(a + bucket, seq)}" for a in starts)
    copy = repeated_bigrams(rows)
    lines = [f"| model | {head} | context gain | repeated bigrams ({int(copy.sum())} tokens) | "
             "other tokens |", "|---" * (len(starts) + 4) + "|"]
    for label, build in models.items():
        losses = token_losses(build(), rows)
        ce = losses.mean(0)
        b = [float(ce[a:a + bucket].mean()) for a in starts]
        gain = b[0] - float(ce[seq // 2:].mean())
        lines.append(f"| {label} | " + " | ".join(f"{x:.3f}" for x in b) + f" | {gain:.3f} | "
                     f"{float(losses[copy].mean()):.3f} | {float(losses[~copy].mean()):.3f} |")
    return "\n".join(lines)


def criteria_models(teacher: str, scores: ImportanceScores, shape: str) -> dict:
    """The target built in memory with each criterion for the heads and for the FFN."""
    source = open_source(teacher)
    recon = fit(source, fit_rows(scores), progress=False)
    target = PruneTarget(**SHAPES[shape])
    out = {}
    for heads in ("activation", "taylor"):
        for ffn in ("activation", "taylor"):
            choice = {"hidden": "activation", "heads": heads, "ffn": ffn}
            plan = make_plan(source.config, target, with_choice(scores, choice),
                             prune_type="global")
            out[f"{shape}, heads {heads}, FFN {ffn}"] = (
                lambda plan=plan: hf_model_from_source(PrunedSource(source, plan, recon)))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--scores", required=True, help="auto scores (with calibration rows)")
    p.add_argument("--models", nargs="*", default=[], help="HF model directories")
    p.add_argument("--bucket", type=int, default=32, help="positions per column")
    p.add_argument("--criteria-at", choices=list(SHAPES), help="also that target with each "
                   "criterion for heads and FFN, built from --teacher (layers, where the "
                   "target drops some, by Block Influence)")
    p.add_argument("--teacher", help="the unpruned HF model the scores were measured on")
    args = p.parse_args(argv)
    if args.criteria_at and not args.teacher:
        p.error("--criteria-at needs --teacher")
    torch.manual_seed(0)
    scores = ImportanceScores.load(args.scores)
    models = {m: (lambda m=m: load_hf_model(m)) for m in args.models}
    if args.criteria_at:
        models.update(criteria_models(args.teacher, scores, args.criteria_at))
    print(table(models, calibration_rows(scores), args.bucket))
    return 0


if __name__ == "__main__":
    sys.exit(main())
