"""Benchmark: vocabulary pruning on the Gutenberg corpus, and frequency-counting throughput.

For each tokenizer (Llama-2 SentencePiece, Llama-3 tiktoken from ../shared/data):

1. throughput: `count_frequencies` over the books with 1 worker (in-process: read, encode,
   bincount), with W workers, and plain `encode` of the same blocks in this process (no
   counting), side by side in this one run, interleaved in rotating order so that load from
   other processes hits all alike; the best of `--repeats` each is reported. Goal: W workers
   >= 0.8 * W * the faster single-process figure.
2. coverage: the pruned vocabulary at 99.9% and 99.99% token coverage of the corpus (the kept
   set of `prune-vocab`: required tokens and merge trees included), and the parameters saved at
   the Llama-3.2-1B shape (hidden 2048, tied) and the Llama-2-7B shape (hidden 4096, untied).
3. cost: tokens per text with the pruned tokenizer on out-of-domain web text (the C4 sample).

    python bench/vocab.py --workdir /tmp/vocabbench [--books 101] [--workers 2] [--repeats 2]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import sys
import time
from datetime import date
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"

from megatron_prune.vocab.corpus import iter_gutenberg  # noqa: E402
from megatron_prune.vocab.freq import count_frequencies, make_tasks  # noqa: E402
from megatron_prune.vocab.select import select_tokens  # noqa: E402
from megatron_prune.vocab.load import load_vocabulary
from megatron_prune.checkpoint.config import ModelConfig  # noqa: E402

TOKENIZERS = {
    "Llama-2 (SentencePiece)": DATA / "tokenizers" / "llama2" / "tokenizer.model",
    "Llama-3 (tiktoken)": DATA / "tokenizers" / "llama3" / "tokenizer.model",
}
SHAPES = {  # the model shapes the parameter saving is computed for
    "1B": dict(num_layers=16, hidden_size=2048, ffn_hidden_size=8192, num_attention_heads=32,
               num_query_groups=8, head_dim=64, tie_embeddings=True),   # Llama-3.2-1B
    "7B": dict(num_layers=32, hidden_size=4096, ffn_hidden_size=11008, num_attention_heads=32,
               num_query_groups=32, head_dim=128, tie_embeddings=False),  # Llama-2-7B
}
COVERAGES = (0.999, 0.9999)


def machine() -> str:
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo")
                if l.startswith("model name")), platform.processor())
    load = os.getloadavg()
    return (f"{platform.node()}: {cpu}, {os.cpu_count()} cores (shared), Python "
            f"{platform.python_version()}, load average at start {load[0]:.2f}")


def extract(work: Path, n_books: int) -> tuple:
    books = work / "books"
    if books.exists():
        shutil.rmtree(books)
    books.mkdir(parents=True)
    files = []
    for name, text in iter_gutenberg(DATA / "corpus" / "gutenberg_en.tar.xz", limit=n_books):
        (books / name).write_text(text, encoding="utf-8", newline="")
        files.append(books / name)
    return files, sum(f.stat().st_size for f in files)


def plain_encode_seconds(vocab, files) -> tuple:
    """Single-process reference: read each block and encode it, nothing else."""
    tasks, _, _ = make_tasks(files)
    t0 = time.perf_counter()
    n = 0
    for _, path, lo, hi, _ in tasks:
        with open(path, "rb") as f:
            f.seek(lo)
            n += len(vocab.encode(f.read(hi - lo).decode("utf-8", errors="replace")))
    return time.perf_counter() - t0, n


def cpu_seconds() -> float:
    """CPU time of this process and its reaped children (the pool's workers)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def throughput(vocab, files, nbytes, workers, repeats) -> dict:
    """Best of `repeats` for plain encode, counting with 1 worker and with W workers; the three
    are interleaved, in a rotating order, so load from other processes hits them alike."""
    best = {"encode": None, 1: None, workers: None}
    cpu = dict(best)
    freq = None
    runs = ["encode", 1, workers]
    for k in range(repeats):
        for what in runs[k % 3:] + runs[:k % 3]:
            c0 = cpu_seconds()
            if what == "encode":
                secs, n = plain_encode_seconds(vocab, files)
            else:
                f = count_frequencies(vocab, files, workers=what, progress=False)
                secs, n, freq = f.seconds, f.tokens, f
            c = cpu_seconds() - c0
            best[what] = secs if best[what] is None else min(best[what], secs)
            cpu[what] = c if cpu[what] is None else min(cpu[what], c)
    assert n == freq.tokens
    mb = nbytes / 1e6
    r = dict(tokens=freq.tokens, mb=mb, encode_s=best["encode"], one_s=best[1],
             w_s=best[workers], workers=workers, repeats=repeats)
    r["encode_mbs"] = mb / best["encode"]
    r["one_mbs"] = mb / best[1]
    r["w_mbs"] = mb / best[workers]
    # against the faster single-process figure (plain encode or 1-worker counting)
    r["speedup"] = r["w_mbs"] / max(r["encode_mbs"], r["one_mbs"])
    r["efficiency"] = r["speedup"] / workers
    # CPU seconds per MB: how much more work W processes do per byte than one (pool overhead,
    # shared caches), apart from whether W cores were free to run them.
    r["cpu_per_mb_1"] = cpu[1] / mb
    r["cpu_per_mb_w"] = cpu[workers] / mb
    return r, freq


def coverage_rows(vocab, counts) -> list:
    rows = []
    order = np.sort(counts[counts > 0])[::-1]
    cum = np.cumsum(order) / counts.sum()
    for c in COVERAGES:
        t = time.perf_counter()
        sel = select_tokens(vocab, counts, coverage=c)
        by_freq = int(np.searchsorted(cum, c - 1e-12) + 1)
        row = dict(coverage=c, by_frequency=by_freq, kept=len(sel.kept), required=sel.required,
                   for_merges=sel.added_for_merges, seconds=time.perf_counter() - t,
                   old=vocab.size, kept_ids=sel.kept)
        for shape, kw in SHAPES.items():
            before = ModelConfig(vocab_size=vocab.size, **kw).num_params()
            after = ModelConfig(vocab_size=len(sel.kept), **kw).num_params()
            row[shape] = (before - after, (before - after) / before, before)
        rows.append(row)
    return rows


def c4_cost(vocab, kept: list, tmp: Path) -> float:
    """Tokens on the C4 sample with the pruned tokenizer / with the original, minus 1."""
    texts = [json.loads(l)["text"] for f in sorted((DATA / "corpus" / "c4_sample").glob("*.jsonl"))
             for l in open(f, encoding="utf-8")]
    out = tmp / "pruned"
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    vocab.write_pruned(out, kept)
    new = load_vocabulary(out)
    before = sum(len(vocab.encode(t)) for t in texts)
    after = sum(len(new.encode(t)) for t in texts)
    shutil.rmtree(out)
    return after / before - 1


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/megatron-prune-vocabbench")
    ap.add_argument("--books", type=int, default=None, help="first N books (default: all 101)")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--tokenizers", nargs="+", default=list(TOKENIZERS), choices=list(TOKENIZERS))
    ap.add_argument("--throughput-only", action="store_true",
                    help="skip the coverage table and the C4 cost (e.g. to repeat the timing)")
    ap.add_argument("--json", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    work = Path(args.workdir)
    header = machine()
    files, nbytes = extract(work, args.books)
    print(f"{len(files)} books, {nbytes / 1e6:.1f} MB of text; {header}", flush=True)
    results = {}
    for name in args.tokenizers:
        vocab = load_vocabulary(TOKENIZERS[name])
        tp, freq = throughput(vocab, files, nbytes, args.workers, args.repeats)
        print(f"[{name}] {tp['tokens']:,} tokens; plain encode {tp['encode_mbs']:.2f} MB/s, "
              f"1 worker {tp['one_mbs']:.2f} MB/s, {args.workers} workers {tp['w_mbs']:.2f} MB/s "
              f"= {tp['speedup']:.2f}x ({tp['efficiency']:.2f} of linear); CPU s/MB "
              f"{tp['cpu_per_mb_1']:.3f} vs {tp['cpu_per_mb_w']:.3f}; load {os.getloadavg()[0]:.2f}",
              flush=True)
        if args.throughput_only:
            results[name] = dict(throughput=tp, coverage=[], c4_cost_999=None)
            continue
        cov = coverage_rows(vocab, freq.counts)
        cost = c4_cost(vocab, cov[0]["kept_ids"], work)
        for r in cov:
            r.pop("kept_ids")
            print(f"[{name}] coverage {r['coverage']}: {r['kept']:,} of {r['old']:,} tokens "
                  f"({r['by_frequency']:,} by frequency alone), selected in {r['seconds']:.1f} s",
                  flush=True)
        results[name] = dict(throughput=tp, coverage=cov, c4_cost_999=cost)
    shutil.rmtree(work / "books")
    print()
    print(markdown(results, header, nbytes, len(files), sys.argv[1:]))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


def markdown(results, header, nbytes, n_books, argv) -> str:
    out = [f"`python bench/vocab.py {' '.join(argv)}` — {date.today()}, {header}; corpus: "
           f"{n_books} Gutenberg books, {nbytes / 1e6:.1f} MB after stripping headers."]
    if any(r["coverage"] for r in results.values()):
        out += ["", "| tokenizer | coverage | vocab kept | by frequency alone | required + merge "
                "trees | 1B shape: params saved | 7B shape: params saved |",
                "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        for c in r["coverage"]:
            cells = [f"{c['1B'][0] / 1e6:.1f} M ({100 * c['1B'][1]:.1f}% of {c['1B'][2] / 1e9:.2f} B)",
                     f"{c['7B'][0] / 1e6:.1f} M ({100 * c['7B'][1]:.1f}% of {c['7B'][2] / 1e9:.2f} B)"]
            out.append(f"| {name} | {100 * c['coverage']:.2f}% | {c['kept']:,} of {c['old']:,} | "
                       f"{c['by_frequency']:,} | {c['required']:,} + {c['for_merges']:,} | "
                       + " | ".join(cells) + " |")
    costs = [f"{n} {100 * r['c4_cost_999']:+.1f}% tokens" for n, r in results.items()
             if r["c4_cost_999"] is not None]
    if costs:
        out += ["", "Out-of-domain cost (the 1000 C4 documents, tokenizer pruned at 99.9% on the "
                "books): " + "; ".join(costs) + "."]
    out += ["",
            "| tokenizer | tokens | plain encode, 1 process | count, 1 worker | count, W workers | "
            "W | speedup vs the faster single-process figure | share of linear (goal ≥ 0.8) | CPU s/MB, 1 vs W |",
            "|---|---|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        t = r["throughput"]
        out.append(f"| {name} | {t['tokens']:,} | {t['encode_mbs']:.2f} MB/s | {t['one_mbs']:.2f} MB/s "
                   f"| {t['w_mbs']:.2f} MB/s | {t['workers']} | {t['speedup']:.2f}x | "
                   f"{t['efficiency']:.2f} | {t['cpu_per_mb_1']:.3f} vs {t['cpu_per_mb_w']:.3f} |")
    return "\n".join(out)


if __name__ == "__main__":
    main()
