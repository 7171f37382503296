"""Benchmark: conversion wall time and peak RSS next to a plain `cp -r` of the same bytes, and
next to Megatron-LM's own converter.

Creates random bf16 HF checkpoints of real shapes without instantiating a model (tensors are
written one at a time), then runs, each in a fresh process so its peak RSS is its own:
hf-to-megatron at TP4 and at TP2·PP2 (and TP8 at 70B width), megatron-to-hf from TP2·PP2,
reshard TP4 -> TP2·PP2, prune on the TP4 shards (scores given), and `cp -r` of the HF
directory; with `--peer`, Megatron-LM's `tools/checkpoint/convert.py --loader llama_mistral
--saver core` (../shared/peers/megatron-lm, on the CPU through tests/megatron_lm_harness) at the same
TP/PP beside ours. The page cache is dropped before every operation (as root), and every timing
includes a final `sync`, so page-cache write-back is paid by all sides alike. Peak RSS is the
process's VmHWM for ours; for Megatron-LM's converter, whose loader and saver are separate
processes, the sum over its process tree sampled every 50 ms — and the tree is killed when that
sum passes `--peer-max-rss` (the machine's memory is shared), which is recorded as such.
Outputs are deleted after each step to bound disk use.

    python bench/convert.py --shapes llama3.2-1b llama2-7b --peer --workdir /tmp/convbench
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from datetime import date
from pathlib import Path
from typing import Optional

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from megatron_prune.checkpoint import layout  # noqa: E402
from megatron_prune.checkpoint.config import ModelConfig  # noqa: E402
from megatron_prune.checkpoint.hf import write_hf_checkpoint  # noqa: E402
from megatron_prune.prune.scores import random_scores  # noqa: E402

SHAPES = {
    "llama3.2-1b": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192,
                        num_attention_heads=32, num_query_groups=8, head_dim=64,
                        vocab_size=128256, tie_embeddings=True, rotary_base=500000.0,
                        max_position_embeddings=131072),
    "llama2-7b": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                      num_attention_heads=32, num_query_groups=32, head_dim=128,
                      vocab_size=32000, tie_embeddings=False, max_position_embeddings=4096),
    "llama2-13b": dict(num_layers=40, hidden_size=5120, ffn_hidden_size=13824,
                       num_attention_heads=40, num_query_groups=40, head_dim=128,
                       vocab_size=32000, tie_embeddings=False, max_position_embeddings=4096),
    # Llama-3-70B's width with fewer layers (--70b-layers): input + output must fit the disk
    "llama3-70b-width": dict(num_layers=8, hidden_size=8192, ffn_hidden_size=28672,
                             num_attention_heads=64, num_query_groups=8, head_dim=128,
                             vocab_size=128256, tie_embeddings=False, rotary_base=500000.0,
                             max_position_embeddings=8192),
}
WIDE = "llama3-70b-width"
# not a benchmark: checks the script itself (every operation, Megatron-LM included) in seconds
SHAPES["tiny"] = dict(num_layers=4, hidden_size=256, ffn_hidden_size=512, num_attention_heads=16,
                      num_query_groups=4, head_dim=16, vocab_size=1024, tie_embeddings=False,
                      max_position_embeddings=4096)


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
    env = dict(os.environ, TQDM_DISABLE="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + [p for p in os.environ.get("PYTHONPATH", "").split(os.pathsep) if p]))
    r = subprocess.run([sys.executable, "-c", RUNNER] + argv, capture_output=True, text=True, env=env)
    if r.returncode:
        raise SystemExit(f"{argv} failed:\n{r.stderr[-3000:]}")
    line = [l for l in r.stdout.splitlines() if l.startswith("RESULT")][-1]
    _, secs, rss = line.split()
    return float(secs), int(rss)


# ---------------------------------------------------------------------------- Megatron-LM
def fake_tokenizer(hf: Path, vocab: int) -> None:
    """A fast tokenizer of exactly `vocab` ids in the HF directory: Megatron-LM's HF loader
    takes the true vocab from the tokenizer (`--tokenizer-model`), and ../shared's tokenizers
    are of other sizes than these random models."""
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0"))
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(hf)


def _tree_pss(proc) -> int:
    """Proportional set size of a process and its descendants (shared pages split among the
    processes sharing them: the loader and saver are forked from one parent)."""
    import psutil
    total = 0
    try:
        procs = [proc] + proc.children(recursive=True)
    except psutil.NoSuchProcess:
        return 0
    for p in procs:
        try:
            for line in Path(f"/proc/{p.pid}/smaps_rollup").read_text().splitlines():
                if line.startswith("Pss:"):
                    total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def timed_peer(hf: Path, out: Path, tp: int, pp: int, max_rss: int, log: Path) -> tuple:
    """(seconds, peak PSS of the tree, status) of Megatron-LM's HF -> core converter. Status:
    "ok", "over --peer-max-rss" (killed) or "failed" (its log says why)."""
    import psutil
    sys.path.insert(0, str(ROOT / "tests"))
    from megatron_lm import PEER, peer_env  # the same environment as the compat tests
    cmd = [sys.executable, str(PEER / "tools" / "checkpoint" / "convert.py"), "--model-type", "GPT",
           "--loader", "llama_mistral", "--saver", "core", "--load-dir", str(hf),
           "--save-dir", str(out), "--target-tensor-parallel-size", str(tp),
           "--target-pipeline-parallel-size", str(pp), "--checkpoint-type", "hf",
           "--model-size", "llama3", "--tokenizer-model", str(hf), "--bf16",
           "--saver-transformer-impl", "local"]
    drop_caches()
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, env=peer_env(), stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
    root, peak, status = psutil.Process(proc.pid), 0, None
    while proc.poll() is None:
        peak = max(peak, _tree_pss(root))
        if peak > max_rss:
            os.killpg(proc.pid, signal.SIGKILL)
            status = "over --peer-max-rss"
        time.sleep(0.05)
    os.sync()
    secs = time.perf_counter() - t0
    files = list(out.glob("iter_*/mp_rank_*/model_optim_rng.pt"))
    # it exits 0 even when its saver crashed: judged by the rank files it must have written
    status = status or ("ok" if len(files) == tp * pp else "failed")
    return secs, peak, status


# ---------------------------------------------------------------------------- the operations
def bench_shape(name: str, work: Path, peer: bool, max_rss: int, layers: Optional[int],
                hf_to_megatron_only: bool = False) -> list:
    kw = dict(SHAPES[name])
    if layers:
        kw["num_layers"] = layers
    cfg = ModelConfig(**kw)
    hf = work / f"{name}-hf"
    for old in work.glob(f"{name}-*"):
        shutil.rmtree(old) if old.is_dir() else old.unlink()
    t = time.perf_counter()
    make_random_hf(cfg, hf)
    if peer:
        fake_tokenizer(hf, cfg.vocab_size)
    os.sync()
    print(f"[{name}] random HF checkpoint ({cfg.num_layers} layers): "
          f"{dir_bytes(hf) / 1e9:.2f} GB in {time.perf_counter() - t:.0f} s", flush=True)
    rows = []

    def report(row):
        rows.append(row)
        rss = f"{row['peak_rss'] / 2**30:5.2f} GiB" if row["peak_rss"] else "    —    "
        print(f"[{name}] {row['op']:<36} {row['seconds']:7.1f} s  peak {rss}  largest output "
              f"file {row['largest_out_file'] / 2**30:5.2f} GiB  {row.get('status', '')}",
              flush=True)

    def run(label, argv, out, keep=False):
        secs, rss = timed(argv)
        report(dict(shape=name, op=label, seconds=secs, peak_rss=rss,
                    out_bytes=dir_bytes(out), largest_out_file=largest_file(out)))
        if not keep:
            shutil.rmtree(out)

    def run_peer(label, tp, pp):
        out = work / f"{name}-peer"
        secs, rss, status = timed_peer(hf, out, tp, pp, max_rss, work / f"{name}-peer.log")
        done = out.is_dir() and any(out.rglob("*.pt"))
        report(dict(shape=name, op=label, seconds=secs, peak_rss=rss, status=status,
                    out_bytes=dir_bytes(out) if done else 0,
                    largest_out_file=largest_file(out) if done else 0))
        shutil.rmtree(out, ignore_errors=True)

    def to_megatron(tp, pp, keep=False):
        out = work / f"{name}-tp{tp}pp{pp}"
        par = f"TP{tp}" + (f"·PP{pp}" if pp > 1 else "")
        if peer:
            run_peer(f"Megatron-LM convert.py HF -> {par}", tp, pp)
        run(f"hf-to-megatron {par}", ["hf-to-megatron", "--hf-dir", str(hf), "--save", str(out),
                                      "--tensor-model-parallel-size", str(tp),
                                      "--pipeline-model-parallel-size", str(pp)], out, keep)
        return out

    # Peak disk is about twice the model: everything that reads the HF directory first, then
    # the HF directory is replaced by megatron-to-hf's output (the same tensors, bit for bit)
    # as the input of hf-to-megatron TP4, whose shards feed reshard and prune.
    copy = work / f"{name}-copy"
    run("cp -r (baseline)", ["cp", str(hf), str(copy)], copy)
    if hf_to_megatron_only:  # the operation Megatron-LM's converter does, and nothing else
        to_megatron(4, 1)
        to_megatron(2, 2)
        shutil.rmtree(hf)
        return _ratios(rows, tp4_copy=None)
    if name == WIDE:
        to_megatron(8, 1)
    tp2pp2 = to_megatron(2, 2, keep=True)
    shutil.rmtree(hf)
    run("megatron-to-hf from TP2·PP2", ["megatron-to-hf", "--load", str(tp2pp2), "--save", str(hf)],
        hf, keep=True)
    shutil.rmtree(tp2pp2)
    if peer:
        fake_tokenizer(hf, cfg.vocab_size)
    tp4 = to_megatron(4, 1, keep=True)
    shutil.rmtree(hf)
    run("reshard TP4 -> TP2·PP2", ["reshard", "--load", str(tp4), "--save", str(tp2pp2),
                                   "--tensor-model-parallel-size", "2",
                                   "--pipeline-model-parallel-size", "2"], tp2pp2)
    # Prune on the TP4 shards with given scores: heads, KV groups (GQA) / heads (MHA) and FFN
    # to 3/4, one layer dropped. The copy baseline for it is cp of the TP4 input.
    scores = work / f"{name}-scores.pt"
    random_scores(cfg, 0).save(scores)
    # 3/4 of the heads, kept a multiple of the KV groups (GQA) and of TP (MHA: 40 -> 28 at 13B)
    step = 4 if cfg.num_query_groups == cfg.num_attention_heads else math.lcm(4, cfg.num_query_groups)
    heads = cfg.num_attention_heads * 3 // 4 // step * step
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
    return _ratios(rows, next(r["seconds"] for r in rows if r["op"] == "cp -r of the TP4 input"))


def _ratios(rows: list, tp4_copy: Optional[float]) -> list:
    """Each row's time against its copy baseline (reshard and prune: cp of the TP4 input; the
    rest: cp of the HF directory, the first row) and its peak-RSS goal."""
    base = rows[0]["seconds"]
    for r in rows:
        r["x_copy"] = r["seconds"] / (tp4_copy if r["op"].startswith(("prune", "reshard")) else base)
        r["rss_goal"] = r["largest_out_file"] + 2**30
    return rows


def markdown(rows, argv) -> str:
    cold = "page cache dropped before each operation" if drop_caches() else \
        "page cache NOT dropped (not root): later operations may read from cache"
    lines = [f"`python bench/convert.py {' '.join(argv)}` — {platform.node()} "
             f"({os.cpu_count()} cores, {_mem_gib():.0f} GiB), {date.today()}; {cold}", "",
             "| shape | operation | time (s) | × cp | Megatron-LM ÷ ours | peak RSS (GiB) | "
             "largest output file (GiB) | RSS goal met |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        cp, peer = r["op"].startswith("cp"), r["op"].startswith("Megatron-LM")
        ok = "—" if cp or peer else ("yes" if r["peak_rss"] <= r["rss_goal"] else "no")
        rss = "—" if cp else f"{r['peak_rss'] / 2**30:.2f}"
        secs = f"{r['seconds']:.1f}"
        if peer and r["status"] != "ok":
            secs, rss = f"{r['status']} after {secs}", f"> {rss}" if "rss" in r["status"] else rss
        vs = "—"
        if not cp and not peer:
            p = _peer_row(rows, r)
            if p is not None:
                vs = f"{p['seconds'] / r['seconds']:.1f}" if p["status"] == "ok" else \
                    f"> {p['seconds'] / r['seconds']:.1f} ({p['status']})"
        lines.append(f"| {r['shape']} | {r['op']} | {secs} | {r['x_copy']:.2f} | {vs} | {rss} | "
                     f"{r['largest_out_file'] / 2**30:.2f} | {ok} |")
    return "\n".join(lines)


def _peer_row(rows, ours):
    """Megatron-LM's row of the same conversion as `ours` (hf-to-megatron rows only)."""
    if not ours["op"].startswith("hf-to-megatron"):
        return None
    par = ours["op"].split()[-1]
    return next((r for r in rows if r["shape"] == ours["shape"]
                 and r["op"] == f"Megatron-LM convert.py HF -> {par}"), None)


def _mem_gib() -> float:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shapes", nargs="+", default=[n for n in SHAPES if n != "tiny"],
                    choices=list(SHAPES))
    ap.add_argument("--workdir", default="/tmp/megatron-prune-convbench")
    ap.add_argument("--json", default=None, help="also write the rows as JSON here")
    ap.add_argument("--peer", action="store_true",
                    help="also run Megatron-LM's converter (../shared/peers/megatron-lm) on the "
                         "same checkpoints at the same TP/PP")
    ap.add_argument("--peer-max-rss", type=float, default=0.85 * _mem_gib(), metavar="GIB",
                    help="kill Megatron-LM's converter when its process tree passes this many "
                         "GiB (default 85%% of this machine's memory), recorded as such")
    ap.add_argument("--70b-layers", dest="wide_layers", type=int, default=None,
                    help=f"layers of {WIDE} (default {SHAPES[WIDE]['num_layers']}): about 1.7 GB "
                         "each; the run needs about twice the model free on disk")
    ap.add_argument("--hf-to-megatron-only", action="store_true",
                    help="only cp and hf-to-megatron TP4 and TP2·PP2 (with --peer, Megatron-LM's "
                         "converter beside each): the side-by-side comparison alone")
    ap.add_argument("--make-hf", metavar="DIR", default=None,
                    help="only write the random HF checkpoint of the one --shapes given into DIR "
                         "(e.g. to profile an operation on it) and exit")
    args = ap.parse_args()
    if args.make_hf:
        if len(args.shapes) != 1:
            ap.error("--make-hf takes exactly one --shapes")
        make_random_hf(ModelConfig(**SHAPES[args.shapes[0]]), Path(args.make_hf))
        return
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for s in args.shapes:
        rows += bench_shape(s, work, args.peer, int(args.peer_max_rss * 2**30),
                            args.wide_layers if s == WIDE else None, args.hf_to_megatron_only)
        if args.json:  # after every shape, so a run cut short keeps what it measured
            Path(args.json).write_text(json.dumps(rows, indent=2))
    print()
    print(markdown(rows, sys.argv[1:]))


if __name__ == "__main__":
    main()
