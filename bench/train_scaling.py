"""Multi-GPU scaling of the trainer on one machine (issue 4): data-parallel weak scaling, and
TP=2 x DP against pure DP on the same data.

    python bench/train_scaling.py --out results/            # all GPUs of the machine (4 for the goal)
    python bench/train_scaling.py --smoke --gpus 4 --out /tmp/s   # CPU, gloo, tiny shape

Measures, in one run, with `torchrun --standalone -m megatron_prune.train --init random --bf16`
on the 1.1B Llama shape of bench/train_throughput.py (megatron-core's mock data: the sample at a
global index is the same whatever the parallel layout):

1. weak scaling: DP=1 on one GPU and DP=N on N GPUs, the same micro-batch and accumulation per
   GPU (the global batch grows N-fold); efficiency = tokens/s(N) / (N x tokens/s(1)).
   Goal: >= 93% at N = 4.
2. TP=2 x DP=N/2 against DP=N for `--compare-iters` iterations on the same global batches: the
   batch checksums must be equal at every iteration and the losses agree within `--loss-rtol`
   (bf16: TP splits every matmul's reduction, so the sums differ in their last bits and the
   difference grows slowly with training).

Writes results.md and results.json under --out.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))

import train_throughput as tt  # noqa: E402  (the shapes and the FLOP count)


def _cuda() -> bool:
    import torch
    return torch.cuda.is_available()


def launch(out: Path, name: str, nproc: int, tp: int, micro: int, global_batch: int,
           iters: int) -> list:
    """One torchrun job of the trainer; its per-iteration records."""
    s = tt.SHAPE
    log = out / f"{name}.jsonl"
    log.unlink(missing_ok=True)
    flags = ["--init", "random", "--num-layers", s["num_layers"], "--hidden-size",
             s["hidden_size"], "--ffn-hidden-size", s["ffn_hidden_size"],
             "--num-attention-heads", s["num_attention_heads"], "--num-query-groups",
             s["num_query_groups"], "--vocab-size", s["vocab_size"],
             "--untie-embeddings-and-output-weights", "--seq-length", s["seq_length"],
             "--mock-data", *(["--bf16"] if _cuda() else []),
             "--tensor-model-parallel-size", tp, "--micro-batch-size", micro,
             "--global-batch-size", global_batch, "--train-iters", iters,
             "--lr", 3e-4, "--lr-warmup-iters", 2, "--weight-decay", 0.01, "--clip-grad", 1.0,
             "--seed", 1234, "--log-interval", 1, "--log-json", log]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
           f"--nproc_per_node={nproc}", "-m", "megatron_prune.train", *map(str, flags)]
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1", OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(ROOT)] + [
                   p for p in [os.environ.get("PYTHONPATH")] if p]))
    print(f"-- {name}: {nproc} processes, TP={tp}, micro-batch {micro}, global batch "
          f"{global_batch}, {iters} iterations", flush=True)
    with open(out / f"{name}.log", "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                              timeout=1800)
    if proc.returncode != 0 or not log.is_file():
        tail = (out / f"{name}.log").read_text(errors="replace")[-3000:]
        raise SystemExit(f"{name} failed (exit {proc.returncode}):\n{tail}")
    return [json.loads(line) for line in log.read_text().splitlines() if line.strip()]


def tokens_per_s(recs: list, global_batch: int, warmup: int) -> float:
    timed = [r for r in recs if "eval" not in r and r["iteration"] > warmup]
    return global_batch * tt.SHAPE["seq_length"] * len(timed) / sum(r["seconds"] for r in timed)


def weak_scaling(out: Path, n: int, micro: int, accum: int, iters: int, warmup: int) -> dict:
    one = launch(out, "dp1", 1, 1, micro, micro * accum, warmup + iters)
    many = launch(out, f"dp{n}", n, 1, micro, n * micro * accum, warmup + iters)
    t1 = tokens_per_s(one, micro * accum, warmup)
    tn = tokens_per_s(many, n * micro * accum, warmup)
    return {"gpus": n, "micro_batch": micro, "accum": accum, "tokens_per_s_1": t1,
            "tokens_per_s_n": tn, "efficiency": tn / (n * t1),
            "tflops_per_gpu_1": t1 * tt.flops_per_token() / 1e12,
            "tflops_per_gpu_n": tn * tt.flops_per_token() / 1e12 / n}


def tp_vs_dp(out: Path, n: int, micro: int, iters: int, rtol: float) -> dict:
    gbs = n * micro * 2
    dp = launch(out, f"dp{n}_compare", n, 1, micro, gbs, iters)
    tp = launch(out, f"tp2dp{n // 2}_compare", n, 2, micro, gbs, iters)
    dp = [r for r in dp if "eval" not in r]
    tp = [r for r in tp if "eval" not in r]
    same_batches = all(a["batch_checksum"] == b["batch_checksum"] for a, b in zip(dp, tp))
    rel = [abs(a["loss"] - b["loss"]) / abs(a["loss"]) for a, b in zip(dp, tp)]
    return {"gpus": n, "global_batch": gbs, "iterations": len(dp), "same_batches": same_batches,
            "max_rel_loss_diff": max(rel), "loss_rtol": rtol,
            "match": same_batches and len(dp) == len(tp) == iters and max(rel) <= rtol,
            "losses_dp": [r["loss"] for r in dp], "losses_tp2": [r["loss"] for r in tp]}


def report(out: Path, res: dict) -> str:
    w, c = res.get("weak"), res.get("tp_vs_dp")
    lines = [f"device: {res['device']} x {res['gpus']}", ""]
    if w:
        lines += ["| run | GPUs | tokens/s | TFLOP/s per GPU | efficiency |", "|---|---|---|---|---|",
                  f"| DP=1 | 1 | {w['tokens_per_s_1']:,.0f} | {w['tflops_per_gpu_1']:.0f} | 1.00 |",
                  f"| DP={w['gpus']} | {w['gpus']} | {w['tokens_per_s_n']:,.0f} | "
                  f"{w['tflops_per_gpu_n']:.0f} | {w['efficiency']:.3f} |", "",
                  f"weak scaling (micro-batch {w['micro_batch']} x {w['accum']} accumulation "
                  f"per GPU): {100 * w['efficiency']:.1f}% (goal >= 93%)", ""]
    if c:
        lines += [f"TP=2 x DP={c['gpus'] // 2} vs DP={c['gpus']}, {c['iterations']} iterations "
                  f"of global batch {c['global_batch']}: same batches {c['same_batches']}, "
                  f"largest relative loss difference {c['max_rel_loss_diff']:.2e} "
                  f"(tolerance {c['loss_rtol']:g}) -> {'match' if c['match'] else 'NO MATCH'}",
                  "", "| iteration | loss DP | loss TP=2 |", "|---|---|---|"]
        lines += [f"| {i + 1} | {a:.5f} | {b:.5f} |"
                  for i, (a, b) in enumerate(zip(c["losses_dp"], c["losses_tp2"]))]
    text = "\n".join(lines) + "\n"
    (out / "results.md").write_text(text)
    (out / "results.json").write_text(json.dumps(res, indent=1))
    return text


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True)
    ap.add_argument("--gpus", type=int, default=None,
                    help="processes of the multi-GPU runs (default: every GPU; CPU: 4)")
    ap.add_argument("--micro-batch-size", type=int, default=8)
    ap.add_argument("--accum", type=int, default=8, help="weak scaling: accumulation per GPU")
    ap.add_argument("--iters", type=int, default=6)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--compare-iters", type=int, default=20)
    ap.add_argument("--compare-micro-batch-size", type=int, default=4)
    ap.add_argument("--loss-rtol", type=float, default=None,
                    help="TP vs DP loss tolerance (default 2e-2 in bf16, 1e-5 in fp32 on CPU)")
    ap.add_argument("--skip", choices=("weak", "compare"), default=None)
    ap.add_argument("--smoke", action="store_true", help="tiny shape: checks the plumbing")
    a = ap.parse_args(argv)
    if a.smoke:
        tt.SHAPE = tt.SMOKE_SHAPE
    import torch
    n = a.gpus or (torch.cuda.device_count() if _cuda() else 4)
    if n < 2:
        raise SystemExit(f"scaling needs at least 2 GPUs; this machine has {n}")
    rtol = a.loss_rtol or (2e-2 if _cuda() else 1e-5)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    res = {"device": torch.cuda.get_device_name() if _cuda() else "cpu (gloo)", "gpus": n,
           "shape": tt.SHAPE}
    if a.skip != "weak":
        res["weak"] = weak_scaling(out, n, a.micro_batch_size, a.accum, a.iters, a.warmup)
        report(out, res)
    if a.skip != "compare":
        if n % 2:
            raise SystemExit("TP=2 x DP needs an even number of GPUs")
        res["tp_vs_dp"] = tp_vs_dp(out, n, a.compare_micro_batch_size, a.compare_iters, rtol)
    print(report(out, res), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
