"""Importance estimation throughput vs forward-only throughput of the same model, same batches.

Builds a random Llama model of a real shape (default: Llama-3.2-1B, bf16) as an HF checkpoint on
local disk, then times in one run: (a) plain forward passes over the calibration batches, (b)
`activation` importance over the same batches (hooks, statistics, layer angular distances), (c)
`taylor` importance (forward + backward). Goal: activation importance >= 80% of forward-only.

    python bench/importance_throughput.py --shape llama3.2-1b --samples 64 --seq-length 2048
"""
from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from convert import SHAPES, make_random_hf  # noqa: E402
from megatron_prune.checkpoint.config import ModelConfig  # noqa: E402
from megatron_prune.checkpoint.convert import open_source  # noqa: E402
from megatron_prune.checkpoint.hf_model import hf_model_from_source  # noqa: E402
from megatron_prune.prune.importance_hf import activation_scores, taylor_scores  # noqa: E402


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn) -> float:
    sync()
    t = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - t


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="llama3.2-1b", choices=list(SHAPES))
    ap.add_argument("--samples", type=int, default=64)
    ap.add_argument("--seq-length", type=int, default=2048)
    ap.add_argument("--micro-batch-size", type=int, default=4)
    ap.add_argument("--taylor", action="store_true", help="also time taylor importance")
    args = ap.parse_args()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg = ModelConfig(**SHAPES[args.shape])
    with tempfile.TemporaryDirectory() as td:
        make_random_hf(cfg, Path(td) / "hf")
        model = hf_model_from_source(open_source(Path(td) / "hf"), device=device, dtype=dtype)
    batches = torch.randint(0, cfg.vocab_size, (args.samples, args.seq_length))
    mb = args.micro_batch_size

    def forward():
        with torch.no_grad():
            for s in range(0, len(batches), mb):
                model.model(input_ids=batches[s:s + mb].to(device))  # no LM head: as importance

    def forward_with_head():
        with torch.no_grad():
            for s in range(0, len(batches), mb):
                model(input_ids=batches[s:s + mb].to(device))

    tokens = batches.numel()
    forward()  # warm-up
    rows = [("forward only (decoder)", timed(forward)), ("forward incl. LM head", timed(forward_with_head)),
            ("activation importance", timed(lambda: activation_scores(model, batches, cfg, mb, progress=False)))]
    if args.taylor:
        rows.append(("taylor importance (fwd+bwd)",
                     timed(lambda: taylor_scores(model, batches, cfg, mb, progress=False))))
    dev = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    print(f"`python bench/importance_throughput.py {' '.join(sys.argv[1:])}` — {dev}, {date.today()}")
    print(f"{args.shape}, {dtype}, {args.samples} x {args.seq_length} tokens, micro-batch {mb}\n")
    print("| run | seconds | tokens/s | vs forward only |\n|---|---|---|---|")
    base = rows[0][1]
    for name, secs in rows:
        print(f"| {name} | {secs:.2f} | {tokens / secs:,.0f} | {base / secs:.2f} |")


if __name__ == "__main__":
    main()
