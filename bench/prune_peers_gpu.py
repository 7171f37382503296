"""Evaluation and recovery of bench/prune_peers.py's models on a GPU (issue 31).

prune_peers.py prunes on the CPU, where each system's cost is measured; scoring ~30 models on
four evaluation sets takes minutes per model there, and distillation far longer. A device call
carries 64 MiB: the SmolLM2 GGUF is 94 MiB and a student ~270 MB in bf16. So no weights travel:

* `--pack` (here) writes --devdata: the GGUF in two parts (`part1/`, carried by a first call and
  left on the machine, then `part2/`), every pruned model as a prune plan of the teacher (ours
  as prune-hf saved it; a peer's found by bench/peers/as_plan.py, which checks that the plan
  rebuilds its weights exactly), the evaluation sets and the training text (xz);
* `--stage eval` (GPU) rebuilds the teacher (`import-gguf`) and every model (`prune-hf --plan`)
  and scores each with prune_peers.evaluate: calibration loss, held-out C4, WikiText-2 (the whole
  validation set), the five held-out books, LAMBADA;
* `--stage recover` (GPU) takes each system's WD model of lowest calibration loss (never an
  evaluation set), distils it from the teacher with `python -m megatron_prune.train --teacher`
  (same data, order, tokens and schedule for all), exports and scores it again.
Work goes to --work (keep it inside the repo, ignored, so a second call on the warm machine finds
it); results to gpu_eval.json and gpu_recover.json in --out and --work.

    python bench/prune_peers_gpu.py --pack --bench /work/bench_peers --devdata .devdata
    python bench/prune_peers_gpu.py --devdata .devdata --stage eval --out $OUT        # GPU
    python bench/prune_peers_gpu.py --devdata .devdata --stage recover --out $OUT     # GPU (6M tokens each)
    python bench/prune_peers_gpu.py --devdata .devdata --stage recover --seed 2 --models KEY ...

Each run also scores the choice set (`choice_set`: text that no evaluation, calibration or
training reads) as its validation data, and the report chooses ours among the distilled
candidates by it; `--seed` gives another order of the same training samples, and the report
puts the seeds side by side.
"""
from __future__ import annotations

import argparse
import json
import lzma
import math
import os
import re
import shutil
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import prune_peers as pp  # noqa: E402

PART1_BYTES = 60 << 20
TRAIN_TEXT_CHARS = 30_000_000  # ~7M tokens: C4-sample documents 200-999, then training books
BOOK_CHARS = 50_000            # each held-out book's first characters scored on the GPU
CHOICE_BOOKS, CHOICE_BOOK_SLICE = 20, (60_000, 80_000)  # ~100k tokens with the C4 half
CHOICE_EVALS, CHOICE_ITERS = 9, 2  # choice-set scorings per run; global batches each
DEFAULT_SEED = 1234
SYSTEMS = ("ours", "minitron")  # torch-pruning cannot drop layers: it has no WD model


# -------------------------------------------------------------------------------- pack (here)
def model_key(row: dict) -> str:
    return f"{row['target']}__{row['system']}"


def pack(bench: Path, dev: Path) -> None:
    from megatron_prune.data.corpus import iter_gutenberg_archive, split_holdout
    rows = {model_key(r): r for f in sorted(bench.glob("results*.json"))  # one per model
            for r in json.loads(f.read_text())["rows"]}.values()
    plans = dev / "part2" / "plans"
    plans.mkdir(parents=True, exist_ok=True)
    index = []
    order = ["WD", "W", "K", "D"]  # WD first: recovery needs its evaluations
    for row in sorted(rows, key=lambda r: order.index(r["target"]) if r["target"] in order
                      else len(order)):
        if not (Path(row["dir"]) / "config.json").is_file():
            print(f"skipped {model_key(row)}: no model at {row['dir']} (being re-pruned?)")
            continue
        out = plans / f"{model_key(row)}.json"
        plan = Path(row.get("plan") or Path(row["dir"]) / "prune_plan.json")
        if plan.is_file():  # ours
            shutil.copy2(plan, out)
            if row.get("scores"):  # a refitted plan is redone from its scores' rows
                (plans.parent / "scores").mkdir(exist_ok=True)
                shutil.copy2(row["scores"], plans.parent / "scores" / Path(row["scores"]).name)
        else:
            pp.timed([sys.executable, ROOT / "bench" / "peers" / "as_plan.py", "--teacher",
                      bench / "teacher", "--student", row["dir"], "--save", out],
                     plans.parent / f"as_plan_{model_key(row)}.log")
        index.append({**{k: v for k, v in row.items() if k not in ("dir", "plan", "scores")},
                      **({"scores": Path(row["scores"]).name} if row.get("scores") else {})})
    (plans / "index.json").write_text(json.dumps(index, indent=1))
    gguf = pp.GGUF.read_bytes()
    (dev / "part1").mkdir(exist_ok=True)
    (dev / "part1" / "smollm2.gguf.1").write_bytes(gguf[:PART1_BYTES])
    (dev / "part2" / "smollm2.gguf.2").write_bytes(gguf[PART1_BYTES:])
    ev = dev / "part2" / "eval"
    ev.mkdir(exist_ok=True)
    for f in ("c4_heldout.jsonl", "calib.pt"):
        shutil.copy2(bench / "data" / f, ev / f)
    shutil.copy2(pp.DATA / "wikitext-2" / "valid.txt", ev / "valid.txt")
    shutil.copy2(pp.DATA / "eval" / "lambada_openai" / "lambada_test.jsonl", ev / "lambada.jsonl")
    books = list(iter_gutenberg_archive(pp.DATA / "corpus" / "gutenberg_en.tar.xz"))
    train_books, held = split_holdout(books, 5)  # the same five prune_peers holds out
    pp.write_jsonl(ev / "books.jsonl", [text[:BOOK_CHARS] for _, text in held])
    texts = pp.c4_docs(range(200, 1000))
    size = c4_chars = sum(map(len, texts))
    used = 0
    for _, text in train_books:
        if size >= TRAIN_TEXT_CHARS:
            break
        texts.append(text)
        size += len(text)
        used += 1
    pp.write_jsonl(ev / "choice.jsonl", choice_set(train_books[used:]))
    with lzma.open(dev / "part2" / "train.jsonl.xz", "wt", encoding="utf-8") as f:
        for t in texts:
            f.write(json.dumps({"text": t}, ensure_ascii=False) + "\n")
    print(f"packed {len(index)} models and {size / 1e6:.1f}M characters of training text "
          f"({100 * c4_chars / size:.1f}% C4-sample documents, the rest training books) "
          f"into {dev}")


def choice_set(unused_books: list) -> list:
    """Text to choose among distilled candidates by: C4-sample documents 50-99 (evaluation reads
    0-49, calibration 100-199, training 200-999) and CHOICE_BOOKS slices of training books the
    distillation text does not reach, away from their calibration excerpt. Never evaluated."""
    books = [text for _, text in unused_books if len(text) >= CHOICE_BOOK_SLICE[1]]
    return pp.c4_docs(range(50, 100)) + [t[slice(*CHOICE_BOOK_SLICE)]
                                         for t in books[:CHOICE_BOOKS]]


# -------------------------------------------------------------------------------- GPU stages
def cli(*args, log: Path) -> dict:
    return pp.timed(pp.CLI + list(args), log)


def teacher_and_data(dev: Path, work: Path) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    teacher = work / "teacher"
    if not (teacher / "config.json").is_file():
        gguf = work / "smollm2.gguf"
        gguf.write_bytes((dev / "part1" / "smollm2.gguf.1").read_bytes()
                         + (dev / "part2" / "smollm2.gguf.2").read_bytes())
        cli("import-gguf", "--gguf", gguf, "--save", teacher, "--force", log=work / "import.log")
    ev = dev / "part2" / "eval"
    return {"teacher": teacher, "calib_pt": ev / "calib.pt", "c4": ev / "c4_heldout.jsonl",
            "books": ev / "books.jsonl", "wikitext": ev / "valid.txt",
            "lambada": ev / "lambada.jsonl"}


def build(work: Path, data: dict, row: dict, plans: Path) -> Path:
    key = model_key(row)
    out = work / "models" / key
    scores = ["--scores", plans.parent / "scores" / row["scores"]] if row.get("scores") else []
    if not (out / "config.json").is_file():
        cli("prune-hf", "--hf-dir", data["teacher"], "--save", out, "--plan",
            plans / f"{key}.json", *scores, "--force", log=work / f"{key}.prune.log")
    return out


def stage_eval(args) -> None:
    work, plans = Path(args.work), args.devdata / "part2" / "plans"
    data = teacher_and_data(args.devdata, work)
    start = time.perf_counter()
    res = {"device": _device(), "commit": os.environ.get("BENCH_COMMIT", "unknown"),
           "teacher": pp.evaluate(str(data["teacher"]), data, args), "rows": []}
    for row in json.loads((plans / "index.json").read_text()):
        if time.perf_counter() - start > args.budget_s:
            res["unfinished"] = True  # the next call goes on (evaluations are cached)
            break
        res["rows"].append({**row, "eval": pp.evaluate(str(build(work, data, row, plans)),
                                                       data, args)})
        _write(res, "gpu_eval.json", args)
        print(model_key(row), json.dumps(res["rows"][-1]["eval"]), flush=True)
    _write(res, "gpu_eval.json", args)


def stage_recover(args) -> None:
    work, plans = Path(args.work), args.devdata / "part2" / "plans"
    data = teacher_and_data(args.devdata, work)
    if not (work / "train_text_document.idx").is_file():
        with lzma.open(args.devdata / "part2" / "train.jsonl.xz", "rb") as src, \
                open(work / "train.jsonl", "wb") as dst:
            shutil.copyfileobj(src, dst)
        cli("preprocess", "--input", work / "train.jsonl", "--output-prefix", work / "train",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", data["teacher"],
            "--append-eod", "--workers", min(8, os.cpu_count() or 1), log=work / "preprocess.log")
    choice = args.devdata / "part2" / "eval" / "choice.jsonl"
    if choice.is_file() and not (work / "choice_text_document.idx").is_file():
        cli("preprocess", "--input", choice, "--output-prefix", work / "choice",
            "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", data["teacher"],
            "--append-eod", log=work / "preprocess_choice.log")
    if not (work / "teacher_meg" / "latest_checkpointed_iteration.txt").is_file():
        cli("hf-to-megatron", "--hf-dir", data["teacher"], "--save", work / "teacher_meg",
            "--force", log=work / "teacher_meg.log")
    # every packed WD model, evaluated here (cached beside it) unless the eval stage did
    rows = {model_key(r): r for r in json.loads((plans / "index.json").read_text())
            if r["target"] == "WD" and "tp3" not in r["system"]
            and (not args.models or model_key(r) in args.models)}
    for key, row in rows.items():
        row["eval"] = pp.evaluate(str(build(work, data, row, plans)), data, args)
    settings = {k: getattr(args, k) for k in ("train_tokens", "seq_length", "micro_batch",
                                              "global_batch", "lr")}
    if args.seed != DEFAULT_SEED:  # (results of the default seed predate the key)
        settings["seed"] = args.seed
    res = {"device": _device(), "commit": os.environ.get("BENCH_COMMIT", "unknown"),
           "settings": settings, "rows": []}
    done = Path(args.work, recover_file(args.seed))  # an earlier call's systems, same settings
    if done.is_file() and json.loads(done.read_text())["settings"] == settings:
        res["rows"] = json.loads(done.read_text())["rows"]
    for system in args.models or args.systems:
        if args.models:  # a named model (a diagnosis beside the systems' own)
            key, system = system, system.split("__")[1]
        else:  # the WD model of lowest calibration loss, per system
            key = min((k for k in rows if k.startswith(f"WD__{system}")),
                      key=lambda k: rows[k]["eval"]["calib_loss"])
        res["rows"] = [r for r in res["rows"] if r["system"] != system] + [
            {"system": system, "model": key, "commit": res["commit"], "before": rows[key]["eval"],
             **distill(work, data, key, build(work, data, rows[key], plans), args)}]
        _write(res, recover_file(args.seed), args)
        print(json.dumps(res["rows"][-1]), flush=True)


def distill(work: Path, data: dict, key: str, hf: Path, args) -> dict:
    meg, kd = work / f"{key}_meg", work / f"{key}_kd"
    cli("hf-to-megatron", "--hf-dir", hf, "--save", meg, "--force", log=work / f"{key}_meg.log")
    cmd = [sys.executable, "-m", "megatron_prune.train", "--pretrained-checkpoint", meg,
           "--teacher", work / "teacher_meg", "--train-data-path", work / "train_text_document",
           "--tokenizer-type", "HuggingFaceTokenizer", "--tokenizer-model", data["teacher"],
           "--seq-length", args.seq_length, "--micro-batch-size", args.micro_batch,
           "--global-batch-size", args.global_batch, "--train-tokens", int(args.train_tokens),
           "--lr", args.lr, "--min-lr", args.lr / 10, "--lr-warmup-iters", 20,
           "--weight-decay", 0.1, "--clip-grad", 1.0, "--seed", args.seed,
           "--save", kd, "--log-json", work / f"{key}_kd.jsonl", *choice_flags(work, args)]
    if torch.cuda.is_available():
        cmd.append("--bf16")
    shutil.rmtree(kd, ignore_errors=True)
    (work / f"{key}_kd.jsonl").unlink(missing_ok=True)  # the trainer appends to --log-json
    cost = pp.timed(cmd, work / f"{key}_kd.log")
    log = Path(args.out) / f"{key}{seed_suffix(args.seed)}_kd.jsonl"
    shutil.copy2(work / f"{key}_kd.jsonl", log)  # for the report
    cli("megatron-to-hf", "--load", kd, "--save", work / f"{key}_kd_hf", "--force",
        log=work / f"{key}_export.log")
    return {"train": cost, "choice": choice_losses(log),
            "after": pp.evaluate(str(work / f"{key}_kd_hf"), data, args)}


def choice_flags(work: Path, args) -> list:
    """The choice set as the run's validation data, scored CHOICE_EVALS times (the last at the
    end) on CHOICE_ITERS global batches: the loss a user may pick a candidate by, at any point
    of its distillation. Validation runs forward only; the training is unchanged by it."""
    if not (work / "choice_text_document.idx").is_file():
        return ["--eval-iters", 0]
    iters = math.ceil(args.train_tokens / (args.seq_length * args.global_batch))
    return ["--valid-data-path", work / "choice_text_document",
            "--eval-interval", math.ceil(iters / CHOICE_EVALS), "--eval-iters", CHOICE_ITERS]


def choice_losses(log: Path) -> list:
    """[(iteration, choice-set LM loss of the student)] from a run's --log-json."""
    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return last_run([(r["iteration"], r["lm_loss"]) for r in recs if r.get("eval") == "validation"])


def last_run(points: list) -> list:
    """The points after the last restart (an iteration not above the one before it): a log
    that a run cut off by a call's time limit began, and the next call's run appended to."""
    start = 0
    for i in range(1, len(points)):
        if points[i][0] <= points[i - 1][0]:
            start = i
    return points[start:]


def recover_file(seed: int) -> str:
    return f"gpu_recover{seed_suffix(seed)}.json"


def seed_suffix(seed: int) -> str:
    return "" if seed == DEFAULT_SEED else f"_seed{seed}"


# -------------------------------------------------------------------------------- report
def _cells(e: dict) -> str:
    return (f"{e['calib_loss']:.3f} | {e['c4']['ppl']:.2f} | {e['wikitext']['word_ppl']:.2f} | "
            f"{e['wikitext']['bpb']:.3f} | {e['books']['ppl']:.2f} | {e['lambada']:.3f}")


EVAL_HEAD = "calib loss | C4 ppl | WikiText-2 word ppl | WikiText-2 bpb | books ppl | LAMBADA acc"


def report(gpu: Path) -> str:
    """Markdown tables of gpu_eval.json (with the CPU costs it carries) and of each seed's
    gpu_recover*.json, then the seeds side by side."""
    lines = []
    if (gpu / "gpu_eval.json").is_file():
        lines += _eval_tables(json.loads((gpu / "gpu_eval.json").read_text()))
    runs = recover_runs(gpu)
    for seed, rc in runs.items():
        lines += _recovery_table(gpu, seed, rc)
    if len(runs) > 1:
        lines += _seed_table(runs)
    return "\n".join(lines) + "\n"


def _eval_tables(ev: dict) -> list:
    lines = [f"Evaluated on {ev['device']} (commit {ev['commit']}).", "",
             f"| target | system | params | {EVAL_HEAD} | prune wall s | peak RSS MB |",
             "|---" * 11 + "|", f"| - | teacher | {ev['teacher']['params'] / 1e6:.1f}M | "
             f"{_cells(ev['teacher'])} | | |"]
    for r in ev["rows"]:
        lines.append(f"| {r['target']} | {r['system']} | {r['eval']['params'] / 1e6:.1f}M | "
                     f"{_cells(r['eval'])} | {r['wall_s']} | {r['peak_rss_mb']} |")
    return lines + [""] + pp.goal_table(ev["rows"])


def recover_runs(gpu: Path) -> dict:
    """seed -> the recover stage's results in `gpu`, the default seed first."""
    runs = {}
    for f in gpu.glob("gpu_recover*.json"):
        m = re.fullmatch(r"gpu_recover(?:_seed(\d+))?\.json", f.name)
        if m:
            runs[int(m.group(1) or DEFAULT_SEED)] = json.loads(f.read_text())
    return dict(sorted(runs.items(), key=lambda kv: (kv[0] != DEFAULT_SEED, kv[0])))


def _recovery_table(gpu: Path, seed: int, rc: dict) -> list:
    lines = ["", f"Distillation on {rc['device']}, seed {seed}: {json.dumps(rc['settings'])}", "",
             f"| system | when | {EVAL_HEAD} | train s | KD loss, last {KD_TAIL} iterations | "
             "choice-set loss | bench commit |", "|---" * 12 + "|"]
    for r in rc["rows"]:  # (rows of calls at other commits, same settings, keep their own)
        commit = r.get("commit", rc["commit"])
        kd = _kd_tail(gpu / f"{r['model']}{seed_suffix(seed)}_kd.jsonl")
        choice = f"{last_run(r['choice'])[-1][1]:.4f}" if r.get("choice") else ""
        lines.append(f"| {r['system']} | before | {_cells(r['before'])} | | | | {commit} |")
        lines.append(f"| {r['system']} | after | {_cells(r['after'])} | "
                     f"{r['train']['wall_s']} | {kd} | {choice} | {commit} |")
    lines += _choice_table(rc["rows"])
    return lines + [""] + recovery_goals(rc["rows"])


def _choice_table(rows: list) -> list:
    """The choice-set loss of each run at each scoring: whether a shorter distillation would
    have chosen the same candidate."""
    rows = [r for r in rows if r.get("choice")]
    if not rows:
        return []
    its = [i for i, _ in last_run(rows[0]["choice"])]
    lines = ["", "| choice-set loss at iteration | " + " | ".join(map(str, its)) + " |",
             "|---" * (len(its) + 1) + "|"]
    for r in rows:
        lines.append(f"| {r['system']} | "
                     + " | ".join(f"{v:.4f}" for _, v in last_run(r["choice"])) + " |")
    return lines


def _seed_table(runs: dict) -> list:
    """Each model distilled under several seeds (data orders): every seed's result, their mean,
    then the goals on the means (ours chosen by the mean choice-set loss)."""
    by_model = {}  # (a model is "ours" in a run that picked it by the calibration-loss rule)
    for seed, rc in runs.items():
        for r in rc["rows"]:
            by_model.setdefault(r["model"], {})[seed] = r
    lines = ["", "Seeds side by side (each cell: one value per seed, then their mean):", "",
             "| system | seeds | C4 ppl | WikiText-2 word ppl | books ppl | LAMBADA acc |",
             "|---" * 6 + "|"]
    means = []
    for per in by_model.values():
        if len(per) < 2:
            continue
        system = min((r["system"] for r in per.values()), key=len)  # "ours" if so named
        evals = [r["after"] for r in per.values()]
        mean = {"after": {}, "system": system}
        cells = []
        for key, field, _ in pp.SETS:
            vals = [e[key][field] for e in evals]
            mean["after"][key] = {field: sum(vals) / len(vals)}
            cells.append(_mean_cell(vals, ".2f"))
        vals = [e["lambada"] for e in evals]
        mean["after"]["lambada"] = sum(vals) / len(vals)
        cells.append(_mean_cell(vals, ".3f"))
        choice = [r["choice"][-1][1] for r in per.values() if r.get("choice")]
        if choice:
            mean["choice"] = [(None, sum(choice) / len(choice))]
        means.append(mean)
        lines.append(f"| {system} | {', '.join(map(str, per))} | " + " | ".join(cells) + " |")
    goals = recovery_goals(means, label="WD after distillation, mean of seeds")
    return lines + ([""] + goals if goals else [])


def _mean_cell(vals: list, fmt: str) -> str:
    mean = format(sum(vals) / len(vals), fmt)
    return " / ".join(format(v, fmt) for v in vals) + f" → **{mean}**"


KD_TAIL = 16  # iterations: the distillation loss on the training text at the end


def _kd_tail(log: Path) -> str:
    """The mean distillation loss of a run's last KD_TAIL iterations (its --log-json, which the
    recover stage copies beside gpu_recover.json); blank without the log."""
    if not log.is_file():
        return ""
    recs = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    kd = [r["kd_loss"] for r in recs if "eval" not in r][-KD_TAIL:]  # training iterations
    return f"{sum(kd) / len(kd):.3f}"


def recovery_goals(rows: list, label: str = "WD after distillation") -> list:
    """After equal-token distillation at WD: ours (each system's model of lowest calibration
    loss) at or below the best peer on every set; ours chosen among the distilled candidates by
    the choice-set loss at the end of their runs (never an evaluation set); then each named
    model of ours (a diagnosis, `--models`) against the same peers, labelled with its name."""
    after = {r["system"]: r["after"] for r in rows}
    peers = {s: e for s, e in after.items() if not s.startswith("ours")}
    if not peers:
        return []
    out = ["| goal | measured | met |", "|---|---|---|"]
    if "ours" in after:
        out += pp.beside_best_peer(f"{label}: ours", after["ours"], peers)
    chosen = chosen_by_choice_set(rows)
    if chosen:
        out += pp.beside_best_peer(f"{label}: ours chosen by choice-set loss ({chosen})",
                                   after[chosen], peers)
    for s in sorted(s for s in after if s.startswith("ours-")):
        out += pp.beside_best_peer(f"{label}: {s} (diagnosis)", after[s], peers)
    return out if len(out) > 2 else []


def chosen_by_choice_set(rows: list):
    """The model of ours whose distillation ended at the lowest choice-set loss, or None."""
    ours = [r for r in rows if r["system"].startswith("ours") and r.get("choice")]
    return min(ours, key=lambda r: r["choice"][-1][1])["system"] if ours else None


def _write(res: dict, name: str, args) -> None:
    """To --out (what comes back) and --work (what the next call on the machine reads)."""
    for d in (args.out, args.work):
        Path(d, name).write_text(json.dumps(res, indent=1))


def _device() -> str:
    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--devdata", type=Path, required=True)
    p.add_argument("--pack", action="store_true", help="write --devdata from --bench")
    p.add_argument("--bench", type=Path, help="prune_peers.py's --out")
    p.add_argument("--stage", choices=("eval", "recover", "report"),
                   help="report: markdown tables of --out's gpu_eval.json / gpu_recover.json")
    p.add_argument("--out", default=".")
    p.add_argument("--work", default=".devwork")
    p.add_argument("--budget-s", type=float, default=420, help="eval: start no model after")
    p.add_argument("--train-tokens", type=float, default=6e6)
    p.add_argument("--seq-length", type=int, default=1024)
    p.add_argument("--micro-batch", type=int, default=16)
    p.add_argument("--global-batch", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help="recover: the data order (results of another seed go to "
                        "gpu_recover_seedN.json)")
    p.add_argument("--wikitext-tokens", type=int, default=None, help="default: all")
    p.add_argument("--lambada", type=int, default=1000)
    p.add_argument("--systems", nargs="+", default=list(SYSTEMS), choices=SYSTEMS,
                   help="recover: these systems in this call (the others' earlier results of "
                        "the same settings are kept)")
    p.add_argument("--models", nargs="+", metavar="KEY",
                   help="recover: these packed WD models (e.g. WD__ours-activation-block-"
                        "influence) instead of each system's lowest calibration loss")
    args = p.parse_args(argv)
    if args.pack:
        pack(args.bench, args.devdata)
    elif args.stage == "eval":
        stage_eval(args)
    elif args.stage == "recover":
        stage_recover(args)
    elif args.stage == "report":
        print(report(Path(args.out)), end="")
    else:
        p.error("give --pack or --stage")
    return 0


if __name__ == "__main__":
    sys.exit(main())
