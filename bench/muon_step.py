"""The optimizer step on one GPU: Muon batched by shape, Muon one matrix at a time, and AdamW.

    python bench/muon_step.py --out muon_step.json            # one GPU, about 3 minutes
    python bench/muon_step.py --smoke --out /tmp/m.json       # tiny shapes; the CPU works too
    torchrun --nproc-per-node 2 bench/muon_step.py --out m.json --only student   # over DP=2

For each shape, one rank's parameters as megatron's mixed-precision wrapper holds them (fp32
main weights, in the local layer spec's names and fused shapes, from `layout`), with random
gradients, stepped by:
  adamw     torch's AdamW (fused on CUDA), what `--optimizer adam` costs at best;
  muon_1    `MuonAdamW` orthogonalizing and applying every matrix on its own (PENDING_ELEMENTS
            = 1: the optimizer before Newton-Schulz was batched), fp32 matmuls;
  muon      `MuonAdamW` batched: matrices of one shape in one chain, at most 2^27 elements
            held at a time, fp32 matmuls (`--muon-fp32-matmul-prec highest`);
  muon_tf32 the same at `--muon-fp32-matmul-prec high` (TF32 matmuls);
  muon_bf16 the same at `--muon-fp32-matmul-prec medium` (bf16 inside fp32 matmuls: the
            trainer's default, as megatron-core's).
Every Muon kind steps the same start once, and its weights are compared with `muon_1`'s (max
abs difference; the step itself is 1e-3 x RMS 0.2). Under torchrun every rank holds the same
weights and gradients, as DP ranks do after the all-reduce, and the Muon kinds split the
Newton-Schulz work over them (one rank orthogonalizes each matrix and broadcasts the update).
Shapes: the prune -> recover student (9 layers, hidden 512, 8 heads / 4 groups, FFN 1024,
vocab 32000); the 1.1B of the training benchmarks (16 layers, hidden 2048, 32 heads / 8
groups, FFN 8192); one middle pipeline stage of Llama-2-7B at PP=4 (8 layers, hidden 4096,
32 heads, FFN 11008). Times each (median of 3 runs of N steps after 2 warm-up steps, synchronized
wall time). Writes JSON to --out and prints a table, a row per shape as it is done.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_prune.checkpoint import layout  # noqa: E402
from megatron_prune.checkpoint.config import ModelConfig  # noqa: E402
from megatron_prune.train import muon  # noqa: E402

DEV = "cuda" if torch.cuda.is_available() else "cpu"
# (label, config, pipeline stage, stages)
SHAPES = [
    ("student 54M (9 x 512)", dict(num_layers=9, hidden_size=512, ffn_hidden_size=1024,
                                   num_attention_heads=8, num_query_groups=4), 0, 1),
    ("1.1B (16 x 2048)", dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192,
                              num_attention_heads=32, num_query_groups=8), 0, 1),
    ("Llama-2-7B, PP stage 2 of 4 (8 x 4096)",
     dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
          num_query_groups=32), 1, 4),
]
SMOKE = [("tiny (2 x 64)", dict(num_layers=2, hidden_size=64, ffn_hidden_size=128,
                                num_attention_heads=4, num_query_groups=2, vocab_size=512), 0, 1)]


def sync():
    if DEV == "cuda":
        torch.cuda.synchronize()


def rank_params(cfg: ModelConfig, stage: int, stages: int) -> dict:
    """name -> fp32 parameter (with a random gradient) of one pipeline stage, TP=1."""
    ranges = layout.stage_ranges(layout.stage_layer_counts(cfg.num_layers, stages))
    g = torch.Generator(device=DEV).manual_seed(0)
    out = {}
    for e in layout.stage_entries(cfg, layout.LOCAL, stage, ranges):
        parts = [torch.empty(layout.hf_shape(e.spec, j, cfg), device="meta")
                 for j in range(len(e.spec.hf))]
        shape = layout.fuse(e.spec, parts, cfg).shape
        p = torch.nn.Parameter(torch.randn(shape, device=DEV, generator=g) * 0.02)
        p.grad = torch.randn(shape, device=DEV, generator=g)
        out[e.name] = p
    return out


def optimizer(kind: str, params: dict, cfg: ModelConfig):
    if kind == "adamw":
        return torch.optim.AdamW(list(params.values()), lr=1e-3, betas=(0.9, 0.95),
                                 weight_decay=0.1, **({"fused": True} if DEV == "cuda" else {}))
    roles = [muon.matrix_role(n) for n in params]
    return muon.MuonAdamW([{"params": list(params.values())}], [roles], cfg=cfg, lr=1e-3,
                          weight_decay=0.1, nesterov=True,
                          fp32_matmul_prec=MUON_KINDS[kind][1],
                          dp_group=dist.group.WORLD if dist.is_initialized() else None)


# kind -> (matrices orthogonalized at once: 1 or the trainer's, --muon-fp32-matmul-prec)
MUON_KINDS = {"muon_1": (1, "highest"), "muon": (None, "highest"), "muon_tf32": (None, "high"),
              "muon_bf16": (None, "medium")}


def ms_per_step(opt, steps: int) -> float:
    for _ in range(2):
        opt.step()
    runs = []
    for _ in range(3):
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            opt.step()
        sync()
        runs.append((time.perf_counter() - t0) * 1e3 / steps)
    return statistics.median(runs)


def measure(label: str, shape: dict, stage: int, stages: int, steps: int) -> dict:
    cfg = ModelConfig(**{"vocab_size": 32000, **shape},
                      head_dim=shape["hidden_size"] // shape["num_attention_heads"])
    default = muon.PENDING_ELEMENTS
    row = {"shape": label}
    after = {}
    for kind in ("adamw", *MUON_KINDS):
        params = rank_params(cfg, stage, stages)
        row["params_M"] = round(sum(p.numel() for p in params.values()) / 1e6, 1)
        muon.PENDING_ELEMENTS = MUON_KINDS.get(kind, (None,))[0] or default
        try:
            opt = optimizer(kind, params, cfg)
            if kind != "adamw":  # one step from the same start: batched must equal one by one
                opt.step()
                after[kind] = {n: p.detach().clone() for n, p in params.items()
                               if muon.matrix_role(n)}
            row[f"{kind}_ms"] = round(ms_per_step(opt, steps), 2)
        finally:
            muon.PENDING_ELEMENTS = default
        del opt, params
        if DEV == "cuda":
            torch.cuda.empty_cache()
    for kind in list(MUON_KINDS)[1:]:
        row[f"{kind}_max_abs_diff"] = max(
            (after[kind][n] - after["muon_1"][n]).abs().max().item() for n in after[kind])
    row["speedup_batched"] = round(row["muon_1_ms"] / row["muon_ms"], 2)
    row["muon_vs_adamw"] = round(row["muon_ms"] / row["adamw_ms"], 2)
    del after
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes (CPU works too)")
    ap.add_argument("--steps", type=int, default=3, help="steps per timed run")
    ap.add_argument("--only", default="", help="the shapes whose label contains this")
    a = ap.parse_args(argv)
    dp = int(os.environ.get("WORLD_SIZE", "1"))
    if dp > 1:  # under torchrun: the ranks of one DP group
        if DEV == "cuda":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group("nccl" if DEV == "cuda" else "gloo")
    quiet = dp > 1 and dist.get_rank() > 0
    device = torch.cuda.get_device_name(0) if DEV == "cuda" else "CPU"
    res = {"date": datetime.date.today().isoformat(), "device": device, "dp": dp,
           "torch": torch.__version__, "command": ("python" if dp == 1 else
                                                   f"torchrun --nproc-per-node {dp}")
           + " bench/muon_step.py " + " ".join(sys.argv[1:] if argv is None else argv),
           "rows": []}
    shapes = [x for x in (SMOKE if a.smoke else SHAPES) if a.only in x[0]]
    if not shapes:
        raise SystemExit(f"--only {a.only!r}: no shape's label contains it")
    if quiet:
        for shape in shapes:
            measure(*shape, steps=a.steps)
        return 0
    print(f"{res['command']} | {device} | DP {dp} | torch {torch.__version__}")
    print("| shape | parameters | AdamW ms | Muon, one at a time ms | Muon, batched ms | "
          "batched speed-up | Muon / AdamW | Muon, TF32 ms | Muon, bf16 ms | max abs diff from "
          "one at a time: batched, TF32, bf16 |")
    print("|---|---|---|---|---|---|---|---|---|---|", flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    for shape in shapes:
        r = measure(*shape, steps=a.steps)
        res["rows"].append(r)
        Path(a.out).write_text(json.dumps(res, indent=2))  # every row as soon as it is done
        print(f"| {r['shape']} | {r['params_M']} M | {r['adamw_ms']} | {r['muon_1_ms']} | "
              f"{r['muon_ms']} | {r['speedup_batched']}x | {r['muon_vs_adamw']}x | "
              f"{r['muon_tf32_ms']} | {r['muon_bf16_ms']} | {r['muon_max_abs_diff']:.1e}, "
              f"{r['muon_tf32_max_abs_diff']:.1e}, {r['muon_bf16_max_abs_diff']:.1e} |",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
