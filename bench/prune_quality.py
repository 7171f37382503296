"""Pruning quality on the real stories260K model: importance-based vs random masks.

For each width fraction, each importance method and each seed: calibrate on text sampled from
the model (seeded), prune heads and FFN neurons, and measure on held-out sampled text
  * KL(original || pruned) of the next-token distributions, averaged over tokens, and
  * the pruned model's perplexity.
No training happens: this isolates the choice of what to keep.

    python bench/prune_quality.py --seeds 0 1 2 --out /tmp/prune_quality
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data" / "models" / "stories260K"

from megatron_prune.data.calibration import calibration_batches, load_tokenizer  # noqa: E402
from megatron_prune.checkpoint.convert import open_source  # noqa: E402
from megatron_prune.checkpoint.hf_model import load_hf_model  # noqa: E402
from megatron_prune.prune.importance_hf import compute_importance  # noqa: E402
from megatron_prune.checkpoint.llama2c import import_llama2c  # noqa: E402
from megatron_prune.prune.plan import PruneTarget, make_plan  # noqa: E402
from megatron_prune.prune.apply import prune_hf  # noqa: E402
from megatron_prune.prune.scores import magnitude_scores, random_scores  # noqa: E402

# 8 heads / 4 KV groups, FFN 172: "25%" and "50%" of heads + FFN neurons removed
TARGETS = {
    "25%": PruneTarget(num_attention_heads=6, num_query_groups=3, ffn_hidden_size=129),
    "50%": PruneTarget(num_attention_heads=4, num_query_groups=4, ffn_hidden_size=86),
}


def sample_text(model, tokenizer, n: int, length: int, seed: int) -> list:
    """n texts of `length` tokens sampled from the model (temperature 1, seeded)."""
    torch.manual_seed(seed)
    bos = torch.full((n, 1), tokenizer.bos_token_id, dtype=torch.long)
    with torch.no_grad():
        ids = model.generate(bos, attention_mask=torch.ones_like(bos), do_sample=True, top_k=0, top_p=1.0, temperature=1.0,
                             max_new_tokens=length, min_new_tokens=length,
                             pad_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row[1:], skip_special_tokens=True) for row in ids]


def kl_and_ppl(ref, model, batches: torch.Tensor) -> tuple:
    with torch.no_grad():
        p = torch.log_softmax(ref(input_ids=batches).logits.double(), -1)
        q = torch.log_softmax(model(input_ids=batches).logits.double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)[:, :-1].mean().item()
    nll = -q[:, :-1].gather(-1, batches[:, 1:, None]).mean().item()
    return kl, float(torch.exp(torch.tensor(nll)))


def run(out: Path, seeds, methods, samples: int = 64, seq: int = 128) -> list:
    from transformers import AutoModelForCausalLM
    hf = out / "stories260K"
    if not hf.exists():
        import_llama2c(DATA / "stories260K.bin", DATA / "tok512.bin", hf)
    tok = load_tokenizer(hf)
    ref = AutoModelForCausalLM.from_pretrained(hf, dtype=torch.float32).eval()
    heldout_file = out / "heldout.txt"
    heldout_file.write_text("\n\n".join(sample_text(ref, tok, 48, 200, seed=10_000)))
    heldout = calibration_batches(tok, [heldout_file], samples=32, seq_length=seq)
    kl0, ppl0 = kl_and_ppl(ref, ref, heldout)
    source = open_source(hf)
    rows = [dict(target="none", method="unpruned", seed="-", kl=kl0, ppl=ppl0)]
    for seed in seeds:
        calib_file = out / f"calib{seed}.txt"
        calib_file.write_text("\n\n".join(sample_text(ref, tok, 96, 200, seed=seed)))
        calib = calibration_batches(tok, [calib_file], samples=samples, seq_length=seq)
        torch.manual_seed(seed)
        scores = {
            "random": random_scores(source.config, seed),
            "magnitude": magnitude_scores(source, source.config),
            "activation": compute_importance(source, "activation", calib, 16, device="cpu"),
            "taylor": compute_importance(source, "taylor", calib, 16, device="cpu"),
        }
        for name, target in TARGETS.items():
            for method in methods:
                plan = make_plan(source.config, target, scores[method], "balance", seed=seed)
                with tempfile.TemporaryDirectory() as td:
                    plan.save(Path(td) / "plan.json")
                    prune_hf(hf, Path(td) / "p", plan_file=Path(td) / "plan.json")
                    pruned = load_hf_model(Path(td) / "p")  # 6 heads, hidden 64: see hf_model.py
                    kl, ppl = kl_and_ppl(ref, pruned, heldout)
                rows.append(dict(target=name, method=method, seed=seed, kl=kl, ppl=ppl,
                                 params=plan.target_config.num_params()))
                print(f"{name} {method:<10} seed {seed}: KL {kl:.4f}  ppl {ppl:.3f}", flush=True)
    return rows


def markdown(rows, argv) -> str:
    lines = [f"`python bench/prune_quality.py {' '.join(argv)}` — {platform.node()} "
             f"({os.cpu_count()} cores, CPU), {date.today()}", "",
             "| removed (heads+FFN) | importance | KL(orig‖pruned) per seed | mean KL | "
             "perplexity per seed | mean ppl |", "|---|---|---|---|---|---|"]
    base = rows[0]
    lines.append(f"| none | unpruned | — | {base['kl']:.4f} | — | {base['ppl']:.3f} |")
    groups = {}
    for r in rows[1:]:
        groups.setdefault((r["target"], r["method"]), []).append(r)
    for (t, m), rs in groups.items():
        kls = [r["kl"] for r in rs]
        ppls = [r["ppl"] for r in rs]
        lines.append(f"| {t} | {m} | {', '.join(f'{k:.3f}' for k in kls)} | "
                     f"{sum(kls) / len(kls):.3f} | {', '.join(f'{p:.2f}' for p in ppls)} | "
                     f"{sum(ppls) / len(ppls):.2f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=["random", "magnitude", "activation", "taylor"])
    ap.add_argument("--out", default="/tmp/megatron-prune-prune-quality")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = run(out, args.seeds, args.methods)
    print()
    print(markdown(rows, sys.argv[1:]))
    (out / "rows.json").write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
