"""Prune to a size on a real pretrained model (issue 32): SmolLM2-135M-Instruct at 50% and 70% of
its parameters, the shape `prune-hf --target-params` searches beside hand-picked shapes of the
same budget, every one pruned from the same activation scores and scored the same way.

    python bench/prune_to_size.py --out /tmp/prune_to_size            # about 15 min on 2 cores

1. teacher      `import-gguf` of ../shared/data's SmolLM2 GGUF (fp32, the dequantized weights).
2. calibration  C4-sample documents 100-199: `importance --importance activation` on 16 x 256
                tokens; the search scores its candidates' loss on 8 x 256 tokens of the same
                documents. No evaluation document is seen before evaluation.
3. shapes       per budget: the search's winner (`--target-params`, limits 50% width / 50%
                depth, tolerance 1%), and by rule, each the largest of its family within the
                budget: width-only (30 layers, 9 heads / 3 groups, hidden and FFN shrunk by one
                ratio), depth-only (full width, layers dropped by Block Influence), and mixed
                (6 heads over 3 groups, hidden and FFN shrunk by one ratio, the same share of
                layers dropped).
4. evaluation   held-out perplexity (`eval --task ppl`, window 512) on C4-sample documents 0-49,
                each cut to its first 2000 characters; search and prune wall times.
5. distillation (`--distill-iters N`) the search's two best candidates, each distilled from the
                teacher by `python -m megatron_prune.train --teacher` for the same N iterations
                of 8 x 256 tokens of C4-sample documents 200-999 (AdamW, LR 1e-4 cosine to
                1e-5), exported to HF and evaluated as above: does the ordering hold?
Results: results.json and results.md in --out.
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import re
import subprocess
import sys
import time
from contextlib import redirect_stdout
from datetime import date
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DATA = ROOT.parent / "shared" / "data"
GGUF = DATA / "models" / "smollm2-135m-instruct" / "SmolLM2-135M-Instruct.Q4_1.gguf"
C4 = DATA / "corpus" / "c4_sample" / "c4_en_train-00000-of-01024_first1000.jsonl"

from megatron_prune.checkpoint.config import ModelConfig  # noqa: E402
from megatron_prune.cli import main as cli  # noqa: E402

BUDGETS = {"50%": 0.5, "70%": 0.7}


def run(*argv) -> str:
    """One megatron-prune command in this process; its stdout (it must succeed)."""
    out = io.StringIO()
    with redirect_stdout(out):
        rc = cli([str(a) for a in argv])
    if rc != 0:
        raise SystemExit(f"megatron-prune {argv[0]} failed ({rc}):\n{out.getvalue()}")
    return out.getvalue()


def write_docs(path: Path, rows: range, chars: int = 0) -> Path:
    lines = C4.read_text().splitlines()
    with open(path, "w") as f:
        for i in rows:
            text = json.loads(lines[i])["text"]
            f.write(json.dumps({"text": text[:chars] if chars else text}) + "\n")
    return path


def largest(cfg: ModelConfig, budget: int, shapes) -> ModelConfig:
    """The largest shape of a family that fits the budget."""
    fits = [c for c in shapes if c.num_params() <= budget]
    return max(fits, key=lambda c: c.num_params())


def scaled(cfg: ModelConfig, r: float, heads: int, groups: int, layers: int) -> ModelConfig:
    """hidden and FFN x r (hidden a multiple of the head count, FFN of 64)."""
    h = max(heads, int(cfg.hidden_size * r) // heads * heads)
    f = max(64, int(cfg.ffn_hidden_size * r) // 64 * 64)
    return cfg.replace(hidden_size=h, ffn_hidden_size=f, num_attention_heads=heads,
                       num_query_groups=groups, num_layers=layers)


def hand_picked(cfg: ModelConfig, budget: int) -> dict:
    ratios = [i / 100 for i in range(50, 101)]
    return {
        "width-only": largest(cfg, budget, [scaled(cfg, r, 9, 3, cfg.num_layers)
                                            for r in ratios]),
        "depth-only": largest(cfg, budget, [cfg.replace(num_layers=n)
                                            for n in range(1, cfg.num_layers + 1)]),
        "mixed": largest(cfg, budget, [scaled(cfg, r, 6, 3, max(1, round(cfg.num_layers * r)))
                                       for r in ratios]),
    }


def shape_flags(c: ModelConfig) -> list:
    return ["--hidden-size-remain", c.hidden_size, "--num-attention-heads-remain",
            c.num_attention_heads, "--num-query-groups-remain", c.num_query_groups,
            "--ffn-hidden-size-remain", c.ffn_hidden_size, "--num-layers-remain", c.num_layers]


def perplexity(model: Path, data: Path) -> dict:
    out = run("eval", "--hf-dir", model, "--task", "ppl", "--data", data, "--window", "512",
              "--batch-size", "4")
    ppl = [float(x) for x in re.findall(r"ppl: perplexity = (\S+)", out)]
    if not ppl:
        raise SystemExit(f"no perplexity in:\n{out}")
    return {"token_ppl": ppl[0], "log": out.strip().splitlines()[-3:]}


def distill(out: Path, teacher: Path, name: str, cands: list, iters: int,
            held_out: Path) -> list:
    """The two best candidates distilled from the teacher for the same tokens, then evaluated."""
    data = out / "train_text_document"
    if not Path(f"{data}.idx").is_file():
        write_docs(out / "train.jsonl", range(200, 1000))
        run("preprocess", "--input", out / "train.jsonl", "--output-prefix", out / "train",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", teacher,
            "--append-eod", "--workers", 2)
    if not (out / "teacher_meg" / "latest_checkpointed_iteration.txt").is_file():
        run("hf-to-megatron", "--hf-dir", teacher, "--save", out / "teacher_meg")
    rows = []
    for i, c in enumerate(cands[:2]):
        shape = ModelConfig.from_hf(json.loads((teacher / "config.json").read_text())).replace(
            num_layers=c["num_layers"], hidden_size=c["hidden_size"],
            num_attention_heads=c["num_attention_heads"],
            num_query_groups=c["num_query_groups"], ffn_hidden_size=c["ffn_hidden_size"])
        tag = f"cand{i}_{name}"
        run("prune", "--load", out / "teacher_meg", "--save", out / f"{tag}_meg", "--force",
            "--importance", "activation", "--scores", out / "scores.pt", *shape_flags(shape))
        t = time.perf_counter()
        cmd = [sys.executable, "-m", "megatron_prune.train", "--pretrained-checkpoint",
               out / f"{tag}_meg", "--teacher", out / "teacher_meg", "--train-data-path", data,
               "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", teacher,
               "--seq-length", 256, "--micro-batch-size", 4, "--global-batch-size", 8,
               "--train-iters", iters, "--lr", 1e-4, "--min-lr", 1e-5, "--lr-warmup-iters", 2,
               "--weight-decay", 0.1, "--clip-grad", 1.0, "--eval-iters", 0,
               "--save", out / f"{tag}_kd", "--log-json", out / f"{tag}_kd.jsonl"]
        proc = subprocess.run([str(x) for x in cmd], capture_output=True, text=True)
        if proc.returncode:
            raise SystemExit(f"distillation of {tag} failed:\n{proc.stderr[-3000:]}")
        seconds = time.perf_counter() - t
        run("megatron-to-hf", "--load", out / f"{tag}_kd", "--save", out / f"{tag}_kd_hf",
            "--force")
        rows.append({**describe(shape), "rank": i, "calib_loss": c["loss"], "seconds": seconds,
                     "tokens": iters * 8 * 256, **perplexity(out / f"{tag}_kd_hf", held_out)})
    return rows


def describe(c: ModelConfig) -> dict:
    return {"layers": c.num_layers, "hidden": c.hidden_size, "heads": c.num_attention_heads,
            "groups": c.num_query_groups, "ffn": c.ffn_hidden_size, "params": c.num_params()}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budgets", nargs="+", default=list(BUDGETS), choices=list(BUDGETS))
    p.add_argument("--distill-iters", type=int, default=0,
                   help="distil the two best candidates this many iterations each (0: skip)")
    p.add_argument("--distill-only", action="store_true",
                   help="only the distillation, on the searches of an earlier run in --out")
    a = p.parse_args(argv)
    out = a.out
    out.mkdir(parents=True, exist_ok=True)
    if a.distill_only:
        return distill_only(a)
    t0 = time.perf_counter()
    teacher = out / "teacher"
    if not (teacher / "config.json").is_file():
        run("import-gguf", "--gguf", GGUF, "--save", teacher)
    calib = write_docs(out / "calib.jsonl", range(100, 200))
    held_out = write_docs(out / "heldout.jsonl", range(0, 50), chars=2000)
    scores = out / "scores.pt"
    t = time.perf_counter()
    if not scores.is_file():
        run("importance", "--hf-dir", teacher, "--data", calib, "--importance", "activation",
            "--samples", 16, "--seq-length", 256, "--save", scores)
    importance_s = time.perf_counter() - t
    cfg = ModelConfig.from_hf(json.loads((teacher / "config.json").read_text()))
    results = {"teacher": {**describe(cfg), **perplexity(teacher, held_out)},
               "importance_seconds": importance_s, "budgets": {}}
    for name in a.budgets:
        budget = int(cfg.num_params() * BUDGETS[name])
        rows = {}
        t = time.perf_counter()
        run("prune-hf", "--hf-dir", teacher, "--save", out / f"searched_{name}", "--force",
            "--target-params", budget, "--importance", "activation", "--scores", scores,
            "--search-data", calib, "--search-samples", 8, "--search-seq-length", 256)
        search_and_prune_s = time.perf_counter() - t
        t = time.perf_counter()  # the same plan re-applied: the prune alone
        run("prune-hf", "--hf-dir", teacher, "--save", out / f"reapplied_{name}", "--force",
            "--plan", out / f"searched_{name}" / "prune_plan.json")
        prune_s = time.perf_counter() - t
        plan = json.loads((out / f"searched_{name}" / "prune_plan.json").read_text())
        searched = ModelConfig(**plan["target"])
        rows["searched"] = {**describe(searched), **perplexity(out / f"searched_{name}", held_out),
                            "search": plan["meta"]["search"]}
        for family, c in hand_picked(cfg, budget).items():
            t = time.perf_counter()
            run("prune-hf", "--hf-dir", teacher, "--save", out / f"{family}_{name}", "--force",
                "--importance", "activation", "--scores", scores, *shape_flags(c))
            rows[family] = {**describe(c), "prune_seconds": time.perf_counter() - t,
                            **perplexity(out / f"{family}_{name}", held_out)}
        results["budgets"][name] = {"budget": budget, "prune_seconds": prune_s,
                                    "search_seconds": search_and_prune_s - prune_s,
                                    "rows": rows}
        if a.distill_iters:
            results["budgets"][name]["distilled"] = distill(
                out, teacher, name, plan["meta"]["search"]["candidates"], a.distill_iters,
                held_out)
        (out / "results.json").write_text(json.dumps(results, indent=1))
    results["meta"] = meta(time.perf_counter() - t0)
    (out / "results.json").write_text(json.dumps(results, indent=1))
    (out / "results.md").write_text(report(results))
    print(report(results))
    return 0


def distill_only(a) -> int:
    """Stage 5 alone, on the searches an earlier run of this script left in --out."""
    t0 = time.perf_counter()
    results = json.loads((a.out / "results.json").read_text())
    for name in a.budgets:
        plan = json.loads((a.out / f"searched_{name}" / "prune_plan.json").read_text())
        results["budgets"][name]["distilled"] = distill(
            a.out, a.out / "teacher", name, plan["meta"]["search"]["candidates"],
            a.distill_iters, a.out / "heldout.jsonl")
        (a.out / "results.json").write_text(json.dumps(results, indent=1))
    results["meta_distill"] = meta(time.perf_counter() - t0)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    (a.out / "results.md").write_text(report(results))
    print(report(results))
    return 0


def meta(seconds: float) -> dict:
    import os
    commit = os.environ.get("BENCH_COMMIT") or subprocess.run(
        ["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True,
        text=True).stdout.strip()
    return {"date": str(date.today()), "commit": commit, "seconds": round(seconds),
            "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "command": "python bench/prune_to_size.py " + " ".join(sys.argv[1:])}


def report(r: dict) -> str:
    t = r["teacher"]
    lines = [f"teacher: {t['params'] / 1e6:.2f}M parameters, held-out C4 perplexity "
             f"{t['token_ppl']:.2f}", ""]
    for name, b in r["budgets"].items():
        best = min(v["token_ppl"] for k, v in b["rows"].items() if k != "searched")
        lines += [f"budget {name}: {b['budget'] / 1e6:.2f}M parameters (search "
                  f"{b['search_seconds']:.0f} s, prune {b['prune_seconds']:.0f} s)", "",
                  "| shape | layers | hidden | heads / groups | FFN | params | held-out ppl |",
                  "|---|---|---|---|---|---|---|"]
        for k, v in b["rows"].items():
            lines.append(f"| {k} | {v['layers']} | {v['hidden']} | {v['heads']} / {v['groups']} "
                         f"| {v['ffn']} | {v['params'] / 1e6:.2f}M ({v['params'] / t['params']:.1%})"
                         f" | {v['token_ppl']:.2f} |")
        s = b["rows"]["searched"]["token_ppl"]
        lines += ["", f"searched {s:.2f} vs best hand-picked {best:.2f}: "
                  f"{'at or below' if s <= best else 'ABOVE'} ({s / best - 1:+.1%})", ""]
        if b.get("distilled"):
            lines += ["| search rank | shape (layers / hidden / heads / groups / FFN) | calib "
                      "loss | distilled tokens | held-out ppl after |", "|---|---|---|---|---|"]
            for d in b["distilled"]:
                lines.append(f"| {d['rank'] + 1} | {d['layers']} / {d['hidden']} / {d['heads']} "
                             f"/ {d['groups']} / {d['ffn']} | {d['calib_loss']:.4f} | "
                             f"{d['tokens']:,} | {d['token_ppl']:.2f} |")
            lines.append("")
    for key in ("meta", "meta_distill"):
        m = r.get(key)
        if m:
            lines.append(f"{m['command']}; {m['machine']}; commit {m['commit']}; {m['date']}; "
                         f"{m['seconds']} s")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
