"""Training throughput on one GPU: our megatron-core trainer vs Hugging Face LlamaForCausalLM.

    python bench/train_throughput.py --out results/        # one command, one GPU (~5 min)

Measures, in one run on one GPU:
  1. the bf16 matmul ceiling: an 8192^3 bf16 matrix product (mean of 10 after 3 warm-ups);
  2. Hugging Face `LlamaForCausalLM` (SDPA attention, bf16 weights, fused torch AdamW, gradient
     clipping) at micro-batches 1, 2, 4, 8 (until one runs out of memory);
  3. our trainer (`python -m megatron_prune.train --init random --bf16 --mock-data`: local spec
     with SDPA core attention, fused chunked cross-entropy, megatron DDP with fp32 grads,
     megatron-core's distributed optimizer with fp32 main weights, gradient clipping) at
     micro-batches 2, 4, 8, each in a fresh process;
  4. both again at their best micro-batch with 8 micro-batches of gradient accumulation per
     optimizer step (how recovery training runs).
`--accum-only` runs step 4 alone, at every micro-batch given (for short device calls).
`--ours-variants fused,unfused` runs ours twice at each of those points: as is (`fused`: the
fused kernels of megatron_prune.train.fusions, on by default without TE/Apex) and with
`--no-fused-kernels` (`unfused`), side by side.
Shape: the issue's 1.1B Llama (16 layers, hidden 2048, 32 heads / 8 KV groups, FFN 8192,
vocab 32000, untied), seq 2048. FLOPs per token: 6 N + 12 L h s (N without the input
embedding), the same count for both. MFU = TFLOP/s / the measured matmul ceiling.
Writes results.json and results.md under --out and prints the table.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SHAPE = dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
             num_query_groups=8, vocab_size=32000, seq_length=2048)
# --smoke: the whole script on a tiny shape (CPU works too, fp32 there): checks the plumbing.
SMOKE_SHAPE = dict(num_layers=2, hidden_size=64, ffn_hidden_size=128, num_attention_heads=4,
                   num_query_groups=2, vocab_size=512, seq_length=64)


def _device():
    import torch
    return "cuda" if torch.cuda.is_available() else "cpu"


def _sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def model_config():
    from megatron_prune.checkpoint.config import ModelConfig
    return ModelConfig(num_layers=SHAPE["num_layers"], hidden_size=SHAPE["hidden_size"],
                       ffn_hidden_size=SHAPE["ffn_hidden_size"],
                       num_attention_heads=SHAPE["num_attention_heads"],
                       num_query_groups=SHAPE["num_query_groups"],
                       head_dim=SHAPE["hidden_size"] // SHAPE["num_attention_heads"],
                       vocab_size=SHAPE["vocab_size"],
                       max_position_embeddings=SHAPE["seq_length"], tie_embeddings=False)


def flops_per_token() -> float:
    from megatron_prune.train.metrics import flops_per_token as fpt
    return fpt(model_config(), SHAPE["seq_length"])


# ---------------------------------------------------------------------------- 1. ceiling
def matmul_ceiling(n: int = 8192) -> float:
    import torch
    dev = _device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    for _ in range(3):
        a @ b
    _sync()
    t0 = time.perf_counter()
    for _ in range(10):
        a @ b
    _sync()
    seconds = (time.perf_counter() - t0) / 10
    return 2 * n ** 3 / seconds / 1e12


# ---------------------------------------------------------------------------- 2. HF
def hf_worker(micro_batches, accum: int, iters: int, warmup: int) -> list:
    """Runs in its own process: HF Llama at each micro-batch, smallest first."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    cfg = LlamaConfig(vocab_size=SHAPE["vocab_size"], hidden_size=SHAPE["hidden_size"],
                      intermediate_size=SHAPE["ffn_hidden_size"],
                      num_hidden_layers=SHAPE["num_layers"],
                      num_attention_heads=SHAPE["num_attention_heads"],
                      num_key_value_heads=SHAPE["num_query_groups"],
                      max_position_embeddings=SHAPE["seq_length"], tie_word_embeddings=False,
                      attn_implementation="sdpa")
    torch.manual_seed(0)
    dev = _device()
    with torch.device(dev):
        model = LlamaForCausalLM(cfg).to(torch.bfloat16 if dev == "cuda" else torch.float32)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.01, fused=dev == "cuda")
    mem = (torch.cuda.max_memory_allocated if dev == "cuda" else lambda: 0)
    seq = SHAPE["seq_length"]
    out = []
    for mbs in micro_batches:
        if dev == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            x = torch.randint(0, SHAPE["vocab_size"], (mbs, seq), device=dev)
            times = []
            for it in range(warmup + iters):
                _sync()
                t0 = time.perf_counter()
                for _ in range(accum):
                    loss = model(input_ids=x, labels=x).loss / accum
                    loss.backward()
                torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
                opt.step()
                opt.zero_grad(set_to_none=True)
                _sync()
                if it >= warmup:
                    times.append(time.perf_counter() - t0)
            tokens = mbs * seq * accum * len(times)
            out.append({"system": "hf", "micro_batch": mbs, "accum": accum,
                        "tokens_per_s": tokens / sum(times),
                        "max_mem_gib": mem() / 2**30})
        except torch.cuda.OutOfMemoryError:
            out.append({"system": "hf", "micro_batch": mbs, "accum": accum, "oom": True})
            del x
            opt.zero_grad(set_to_none=True)
            break
        print(json.dumps(out[-1]), flush=True)
    return out


def run_hf(out_dir: Path, micro_batches, accum, iters, warmup) -> list:
    res = out_dir / f"hf_accum{accum}.json"
    cmd = [sys.executable, __file__, *(["--smoke"] if SHAPE is SMOKE_SHAPE else []),
           "--worker", "hf", "--micro-batches",
           ",".join(map(str, micro_batches)), "--accum", str(accum), "--iters", str(iters),
           "--warmup", str(warmup), "--out", str(res)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0 or not res.is_file():
        print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return [{"system": "hf", "accum": accum, "error": proc.stderr[-400:]}]
    return json.loads(res.read_text())


# ---------------------------------------------------------------------------- 3. ours
OURS_VARIANTS = {"fused": [], "unfused": ["--no-fused-kernels"]}


def run_ours(out_dir: Path, mbs: int, accum: int, iters: int, warmup: int,
             extra=()) -> dict:
    tag = "".join("_" + str(f).strip("-") for f in extra)
    log = out_dir / f"ours_mbs{mbs}_accum{accum}{tag}.jsonl"
    log.unlink(missing_ok=True)
    flags = ["--init", "random", "--num-layers", SHAPE["num_layers"],
             "--hidden-size", SHAPE["hidden_size"], "--ffn-hidden-size", SHAPE["ffn_hidden_size"],
             "--num-attention-heads", SHAPE["num_attention_heads"],
             "--num-query-groups", SHAPE["num_query_groups"], "--vocab-size", SHAPE["vocab_size"],
             "--untie-embeddings-and-output-weights", "--seq-length", SHAPE["seq_length"],
             "--mock-data", *(["--bf16"] if _device() == "cuda" else []),
             "--micro-batch-size", mbs,
             "--global-batch-size", mbs * accum, "--train-iters", warmup + iters,
             "--lr", 1e-4, "--lr-warmup-iters", 1, "--weight-decay", 0.01, "--clip-grad", 1.0,
             "--log-interval", 1, "--log-json", log, *extra]
    cmd = [sys.executable, "-m", "megatron_prune.train", *map(str, flags)]
    env = dict(os.environ, CUDA_DEVICE_MAX_CONNECTIONS="1")
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900, cwd=ROOT, env=env)
    row = {"system": "ours", "micro_batch": mbs, "accum": accum, "flags": " ".join(map(str, extra))}
    if proc.returncode != 0 or not log.is_file():
        oom = "OutOfMemory" in proc.stderr or "out of memory" in proc.stderr
        row.update({"oom": True} if oom else {"error": proc.stderr[-1500:]})
        if not oom:
            print(proc.stdout[-2000:], proc.stderr[-4000:], file=sys.stderr)
        return row
    recs = [json.loads(line) for line in log.read_text().splitlines()]
    timed = [r for r in recs if r["iteration"] > warmup]
    tokens = mbs * accum * SHAPE["seq_length"] * len(timed)
    row.update(tokens_per_s=tokens / sum(r["seconds"] for r in timed),
               max_mem_gib=max(r["max_mem_gib"] or 0 for r in recs),
               first_loss=recs[0]["loss"], last_loss=recs[-1]["loss"])
    print(json.dumps(row), flush=True)
    return row


# ---------------------------------------------------------------------------- loss piece
LOSS_VARIANTS = ("full", "fused", "fused-eager", "liger")


def _loss_fn(variant: str, v: int, chunk: int):
    """f(hidden, weight, labels, mask) -> summed loss, for one way of computing the output layer
    + cross-entropy: full logits (what megatron-core's GPTModel does), ours with the compiled
    passes (the trainer on a GPU) or eager, or Liger-Kernel's fused linear cross-entropy (one
    GPU's whole vocab: it has no vocab-parallel form; None where it is not installed)."""
    import torch
    from megatron_prune.train.loss import LossSpec, fused_output_loss, reference_loss
    if variant in ("fused", "fused-eager"):
        spec = LossSpec(vocab_start=0, real_rows=v, chunk_tokens=chunk,
                        compiled=variant == "fused")
        return lambda h, w, y, m: fused_output_loss(h, w, y, m, spec)[0]
    if variant == "full":
        return lambda h, w, y, m: reference_loss(h @ w.t(), y, m)[0]
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
    except ImportError:
        return None
    flce = LigerFusedLinearCrossEntropyLoss(reduction="sum", accum_dtype=torch.float32)
    return lambda h, w, y, m: flce(w, h, torch.where(m > 0, y, -100))


def loss_piece_worker(variant: str, tokens: int, chunk: int, iters: int = 10) -> dict:
    """Forward + backward of the output layer + cross-entropy for `tokens` tokens at the 1.1B
    shape: the median time of `iters` warm calls (after 3 warm-up calls: compiling, cuBLAS
    autotuning and lazy kernel loading are not what a training step pays) and the peak memory
    above the inputs; the loss and gradients, to compare the variants."""
    import resource
    import statistics
    import torch
    dev = _device()
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    h, v = SHAPE["hidden_size"], SHAPE["vocab_size"]
    fn = _loss_fn(variant, v, chunk)
    if fn is None:
        return {"variant": variant, "missing": True}
    g = torch.Generator(device=dev).manual_seed(0)
    hidden = (torch.randn(tokens, h, device=dev, generator=g) * 0.5).to(dtype).requires_grad_()
    weight = (torch.randn(v, h, device=dev, generator=g) * 0.02).to(dtype).requires_grad_()
    labels = torch.randint(0, v, (tokens,), device=dev, generator=g)
    mask = (torch.rand(tokens, device=dev, generator=g) > 0.1).float()

    def step():
        hidden.grad = weight.grad = None
        loss = fn(hidden, weight, labels, mask)
        loss.backward()
        return loss

    for _ in range(3):
        step()
    _sync()
    if dev == "cuda":
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        loss = step()
        _sync()
        times.append(time.perf_counter() - t0)
    if dev == "cuda":
        extra = torch.cuda.max_memory_allocated() - base
    else:
        extra = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    return {"variant": variant, "tokens": tokens, "chunk": chunk, "device": dev,
            "extra_peak_gib": extra / 2**30, "seconds": statistics.median(times),
            "loss": loss.item(), "grad_hidden_norm": hidden.grad.float().norm().item(),
            "grad_weight_norm": weight.grad.float().norm().item()}


def loss_piece(tokens: int, chunk: int, variants=LOSS_VARIANTS) -> list:
    rows = []
    for variant in variants:
        cmd = [sys.executable, __file__, "--worker", "loss", "--variant", variant,
               "--tokens", str(tokens), "--chunk", str(chunk), "--out", "-"]
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
        if proc.returncode:
            print(proc.stderr[-3000:], file=sys.stderr)
            continue
        row = json.loads(proc.stdout.strip().splitlines()[-1])
        if not row.get("missing"):
            rows.append(row)
            print(json.dumps(row), flush=True)
    return rows


def loss_table(rows) -> str:
    full = next((r for r in rows if r["variant"] == "full"), None)
    lines = [f"output layer + cross-entropy, forward + backward, {rows[0]['tokens']} tokens x "
             f"vocab {SHAPE['vocab_size']} (hidden {SHAPE['hidden_size']}), chunk "
             f"{rows[0]['chunk']}, median of 10 warm calls:", "",
             "| variant | ms | × full logits | extra peak GiB | loss | |grad h| | |grad W| |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        ratio = f"{r['seconds'] / full['seconds']:.2f}" if full else "—"
        lines.append(f"| {r['variant']} | {1000 * r['seconds']:.1f} | {ratio} | "
                     f"{r['extra_peak_gib']:.2f} | {r['loss']:.6g} | "
                     f"{r['grad_hidden_norm']:.6g} | {r['grad_weight_norm']:.6g} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- report
def finish(rows, ceiling: float, fpt: float) -> list:
    for r in rows:
        if "tokens_per_s" in r:
            r["tflops"] = r["tokens_per_s"] * fpt / 1e12
            r["mfu"] = r["tflops"] / ceiling
    return rows


def table(rows, ceiling, device, fpt) -> str:
    lines = [f"device: {device}; bf16 matmul ceiling (8192^3): {ceiling:.3g} TFLOP/s; "
             f"{fpt / 1e9:.3f} GFLOP per token",
             "",
             "| system | micro-batch | accumulation | tokens/s | TFLOP/s | MFU | peak GiB |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        name = {"hf": "HF LlamaForCausalLM (SDPA)", "ours": "ours (megatron-core)"}[r["system"]]
        if r.get("flags"):
            name += f" `{r['flags']}`"
        if "tokens_per_s" in r:
            lines.append(f"| {name} | {r['micro_batch']} | {r['accum']} | "
                         f"{r['tokens_per_s']:,.0f} | {r['tflops']:.3g} | {100 * r['mfu']:.1f}% | "
                         f"{r['max_mem_gib']:.1f} |")
        else:
            what = "out of memory" if r.get("oom") else "failed"
            lines.append(f"| {name} | {r.get('micro_batch', '-')} | {r['accum']} | {what} "
                         "| | | |")
    return "\n".join(lines)


def best(rows, system, accum, flags=""):
    ok = [r for r in rows if r["system"] == system and r["accum"] == accum
          and "tokens_per_s" in r and r.get("flags", "") == flags]
    return max(ok, key=lambda r: r["tokens_per_s"]) if ok else None


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="results.json and results.md go here")
    p.add_argument("--raw-dir", default=None,
                   help="per-run logs (default: OUT/raw)")
    p.add_argument("--hf-micro-batches", default="1,2,4,8")
    p.add_argument("--ours-micro-batches", default="2,4,8")
    p.add_argument("--ours-variants", default="fused",
                   help="comma-separated, each run at every point: fused (as is), unfused "
                        "(--no-fused-kernels)")
    p.add_argument("--accum", type=int, default=8, help="accumulation of the second round")
    p.add_argument("--iters", type=int, default=6)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--smoke", action="store_true",
                   help="tiny shape, to check the script itself (CPU works)")
    p.add_argument("--loss-only", action="store_true",
                   help="only time the output layer + loss: full logits, ours (compiled and "
                        "eager), Liger-Kernel's fused linear cross-entropy where installed")
    p.add_argument("--accum-only", action="store_true",
                   help="only the accumulation round, at every --ours-micro-batches and "
                        "--hf-micro-batches (ours first; no loss-piece check): the goal's rows "
                        "when device time is short")
    p.add_argument("--tokens", type=int, default=8192, help="tokens of the loss-piece check")
    p.add_argument("--chunk", type=int, default=2048, help="--loss-chunk-tokens of that check")
    p.add_argument("--worker", choices=("hf", "loss"), help=argparse.SUPPRESS)
    p.add_argument("--variant", help=argparse.SUPPRESS)
    p.add_argument("--micro-batches", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    global SHAPE
    if a.smoke:
        SHAPE = SMOKE_SHAPE
    if a.worker == "loss":
        print(json.dumps(loss_piece_worker(a.variant, a.tokens, a.chunk)))
        return 0
    if a.loss_only:
        print(loss_table(loss_piece(a.tokens, a.chunk)))
        return 0
    if a.worker == "hf":
        rows = hf_worker([int(x) for x in a.micro_batches.split(",")], a.accum, a.iters,
                         a.warmup)
        Path(a.out).write_text(json.dumps(rows))
        return 0

    import torch
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    raw = Path(a.raw_dir) if a.raw_dir else out / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    device = torch.cuda.get_device_name() if _device() == "cuda" else "cpu"
    ceiling = matmul_ceiling(512 if a.smoke else 8192)
    print(f"matmul ceiling: {ceiling:.3g} TFLOP/s on {device}", flush=True)
    fpt = flops_per_token()
    rows, mem_rows = [], []

    def report():  # after every stage, so a run cut short still leaves its results
        finish(rows, ceiling, fpt)
        text = table(rows, ceiling, device, fpt)
        if mem_rows:
            text += "\n\n" + loss_table(mem_rows)
        summary = []
        for accum in sorted({r["accum"] for r in rows}):
            h, o = best(rows, "hf", accum), best(rows, "ours", accum)
            if h and o:
                summary.append(
                    f"accumulation {accum}: ours {100 * o['mfu']:.1f}% MFU at micro-batch "
                    f"{o['micro_batch']} vs HF {100 * h['mfu']:.1f}% at micro-batch "
                    f"{h['micro_batch']}: {o['tokens_per_s'] / h['tokens_per_s']:.2f}x")
            u = best(rows, "ours", accum, " ".join(OURS_VARIANTS["unfused"]))
            if o and u:
                summary.append(
                    f"accumulation {accum}: ours fused {100 * o['mfu']:.1f}% MFU (micro-batch "
                    f"{o['micro_batch']}) vs --no-fused-kernels {100 * u['mfu']:.1f}% (micro-"
                    f"batch {u['micro_batch']}): {o['tokens_per_s'] / u['tokens_per_s']:.2f}x")
        text += "\n\n" + "\n".join(summary)
        (out / "results.md").write_text(text + "\n")
        (out / "results.json").write_text(json.dumps(
            {"device": device, "ceiling_tflops": ceiling, "flops_per_token": fpt, "rows": rows,
             "loss_memory": mem_rows}, indent=1))
        return text

    variants = [OURS_VARIANTS[v] for v in a.ours_variants.split(",")]
    if a.accum_only:
        for mbs in [int(x) for x in a.ours_micro_batches.split(",")]:
            for extra in variants:
                rows.append(run_ours(raw, mbs, a.accum, max(2, a.iters // 2), 1, extra))
                report()
        rows += run_hf(raw, [int(x) for x in a.hf_micro_batches.split(",")], a.accum,
                       max(2, a.iters // 2), 1)
        print(report(), flush=True)
        return 0
    for mbs in [int(x) for x in a.ours_micro_batches.split(",")]:
        for extra in variants:
            rows.append(run_ours(raw, mbs, 1, a.iters, a.warmup, extra))
            report()
        if any(r.get("oom") or r.get("error") for r in rows[-len(variants):]):
            break
    rows += run_hf(raw, [int(x) for x in a.hf_micro_batches.split(",")], 1, a.iters, a.warmup)
    report()
    if a.accum > 1:
        ours_best = best(rows, "ours", 1, " ".join(variants[0]))
        hf_best = best(rows, "hf", 1)
        if ours_best:
            for extra in variants:
                rows.append(run_ours(raw, ours_best["micro_batch"], a.accum,
                                     max(2, a.iters // 2), 1, extra))
                report()
        if hf_best:
            rows += run_hf(raw, [hf_best["micro_batch"]], a.accum, max(2, a.iters // 2), 1)
            report()
    mem_rows += loss_piece(a.tokens, a.chunk)
    print(report(), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
