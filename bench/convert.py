"""Benchmark: conversion wall time and peak RSS next to a plain `cp -r` of the same bytes.

Creates random bf16 HF checkpoints of real shapes without instantiating a model (tensors are
written one at a time), then runs, each in a fresh process so its peak RSS is its own:
hf-to-megatron at TP4 and at TP2·PP2, megatron-to-hf from TP2·PP2, reshard TP4 -> TP2·PP2, and
`cp -r` of the HF directory. Every timing includes a final `sync`, so page-cache write-back is
paid by all sides alike. Outputs are deleted after each step to bound disk use.

    python bench/convert.py --shapes llama3.2-1b llama2-7b --workdir /tmp/convbench
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_prune import layout  # noqa: E402
from megatron_prune.config import ModelConfig  # noqa: E402
from megatron_prune.hf_checkpoint import write_hf_checkpoint  # noqa: E402
from megatron_prune.scores import random_scores  # noqa: E402

SHAPES = {
    "llama3.2-1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192,
                        num_attention_heads=32, num_query_groups=8, head_dim=64,
                        vocab_size=128256, tie_embeddings=True, rotary_base=500000.0,
                        max_position_embeddings=131072),
    "llama2-7b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                      num_attention_heads=32, num_query_groups=32, head_dim=128,
                      vocab_size=32000, tie_embeddings=False, max_position_embeddings=4096),
}


def make_random_hf(cfg: ModelConfig, out: Path, seed: int = 0) -> None:
    out.mkdir(parents=True)
    gen = torch.Generator().manual_seed(seed)

    def produce(group):
        spec = layout.SPECS_BY_KEY[group[0]]
        return {n: (torch.randn(layout.hf_shape(spec, j, cfg), generator=gen) * 0.02)
                .to(torch.bfloat16) for j, n in enumerate(spec.hf_names(group[1]))}

    write_hf_checkpoint(out, cfg, layout.hf_plan(cfg), produce, torch.bfloat16, max_shard_bytes=5 * 10**9)


def dir_bytes(p: Path) -> int:
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())


def largest_file(p: Path) -> int:
    return max(f.stat().st_size for f in p.rglob("*") if f.is_file())


RUNNER = r"""
import resource, sys, time, os, runpy
t0 = time.perf_counter()
sys.argv = sys.argv[1:]
if sys.argv[0] == "cp":
    import subprocess; subprocess.run(["cp", "-r", sys.argv[1], sys.argv[2]], check=True)
    rss = 0
else:
    from megatron_prune.cli import main
    assert main(sys.argv) == 0
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over from the parent across fork+exec.
    rss = [int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")][0]
os.sync()
print("RESULT", time.perf_counter() - t0, rss * 1024)
"""


def drop_caches() -> bool:
    """Start every operation from a cold page cache, so cp and ours read the same way."""
    os.sync()
    try:
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        return True
    except OSError:
        return False


def timed(argv: list) -> tuple:
    drop_caches()
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=str(ROOT))
    r = subprocess.run([sys.executable, "-c", RUNNER] + argv, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{argv} failed:\n{r.stderr[-3000:]}")
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")][-1]
    _, secs, rss = line.split()
    return float(secs), int(rss)


def bench_shape(name: str, work: Path) -> list:
    cfg = ModelConfig(**SHAPES[name])
    hf = work / f"{name}-hf"
    if hf.exists():
        shutil.rmtree(hf)
    t = time.perf_counter()
    make_random_hf(cfg, hf)
    os.sync()
    print(f"[{name}] random HF checkpoint: {dir_bytes(hf) / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s",
          flush=True)
    rows = []

    def run(label, argv, out, keep=False):
        secs, rss = timed(argv)
        row = dict(shape=name, op=label, seconds=secs, peak_rss=rss, out_bytes=dir_bytes(out),
                   largest_out_file=largest_file(out))
        rows.append(row)
        print(f"[{name}] {label:<28} {secs:7.1f} s  peak RSS {rss / 2**30:5.2f} GiB  "
              f"largest output file {row['largest_out_file'] / 2**30:5.2f} GiB", flush=True)
        if not keep:
            shutil.rmtree(out)

    copy = work / f"{name}-copy"
    run("cp -r (baseline)", ["cp", str(hf), str(copy)], copy)
    tp4, tp2pp2 = work / f"{name}-tp4", work / f"{name}-tp2pp2"
    run("hf-to-megatron TP4", ["hf-to-megatron", "--hf-dir", str(hf), "--save", str(tp4),
                               "--tensor-model-parallel-size", "4"], tp4, keep=True)
    run("reshard TP4 -> TP2·PP2", ["reshard", "--load", str(tp4), "--save", str(tp2pp2),
                                   "--tensor-model-parallel-size", "2",
                                   "--pipeline-model-parallel-size", "2"], tp2pp2)
    # Prune on the TP4 shards with given scores: heads, KV groups (GQA) / heads (MHA) and FFN
    # to 3/4, one layer dropped. The copy baseline for it is cp of the TP4 input.
    scores = work / f"{name}-scores.pt"
    random_scores(cfg, 0).save(scores)
    heads = cfg.num_attention_heads * 3 // 4
    pruned = work / f"{name}-pruned"
    run("prune TP4 (scores given)", ["prune", "--load", str(tp4), "--save", str(pruned),
                                     "--num-attention-heads-remain", str(heads),
                                     "--num-query-groups-remain",
                                     str(heads if cfg.num_query_groups == cfg.num_attention_heads
                                         else cfg.num_query_groups),
                                     "--ffn-hidden-size-remain",
                                     str(cfg.ffn_hidden_size * 3 // 4 // 128 * 128),
                                     "--drop-layers", "1", "--scores", str(scores)], pruned)
    copy4 = work / f"{name}-tp4-copy"
    run("cp -r of the TP4 input", ["cp", str(tp4), str(copy4)], copy4)
    scores.unlink()
    shutil.rmtree(tp4)
    run("hf-to-megatron TP2·PP2", ["hf-to-megatron", "--hf-dir", str(hf), "--save", str(tp2pp2),
                                   "--tensor-model-parallel-size", "2",
                                   "--pipeline-model-parallel-size", "2"], tp2pp2, keep=True)
    back = work / f"{name}-back"
    run("megatron-to-hf from TP2·PP2", ["megatron-to-hf", "--load", str(tp2pp2), "--save", str(back)],
        back)
    shutil.rmtree(tp2pp2)
    shutil.rmtree(hf)
    base = rows[0]["seconds"]
    tp4_copy = next(r["seconds"] for r in rows if r["op"] == "cp -r of the TP4 input")
    for r in rows:
        r["x_copy"] = r["seconds"] / (tp4_copy if r["op"].startswith("prune") else base)
        r["rss_goal"] = r["largest_out_file"] + 2**30
    return rows


def markdown(rows, argv) -> str:
    cold = "page cache dropped before each operation" if drop_caches() else \
        "page cache NOT dropped (not root): later operations may read from cache"
    lines = [f"`python bench/convert.py {' '.join(argv)}` — {platform.node()} "
             f"({os.cpu_count()} cores), {date.today()}; {cold}", "",
             "| shape | operation | time (s) | × cp | peak RSS (GiB) | largest output file (GiB) | RSS goal met |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        cp = r["op"].startswith("cp")
        ok = "—" if cp else ("yes" if r["peak_rss"] <= r["rss_goal"] else "no")
        rss = "—" if cp else f"{r['peak_rss'] / 2**30:.2f}"
        lines.append(f"| {r['shape']} | {r['op']} | {r['seconds']:.1f} | {r['x_copy']:.2f} | "
                     f"{rss} | {r['largest_out_file'] / 2**30:.2f} | {ok} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    ap.add_argument("--workdir", default="/tmp/megatron-prune-convbench")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in args.shapes:
        rows += bench_shape(s, work)
    print()
    print(markdown(rows, sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
