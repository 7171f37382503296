"""The prune -> recover quality benchmark (issue 7), through the project's own commands.

One run, on one GPU machine (571 s on an H200 for the runs the goals compare), or on the CPU
with `--smoke`:

1. data      the Gutenberg books of ../shared/data (header/footer stripped), the last 5 by file
             name held out; both tokenized with the Llama-2 tokenizer (`megatron-prune
             preprocess`); calibration text drawn from the training books.
2. teacher   a Llama model (12 layers, hidden 768, 12 heads / 4 KV groups, FFN 2048, untied,
             seq 1024) trained from random init by `python -m megatron_prune.train` for a fixed
             wall time (`--teacher-seconds`; a short probe run of the same recipe, after
             tokenization, sets the iteration count so the cosine schedule ends on time),
             validated on the held-out books.
3. prune     importance (`megatron-prune importance`: activation, taylor, each with the loss
             of every layer skipped, `--layer-loss`, which a prune variant may choose layers
             by; magnitude and random need no data) and `megatron-prune prune` of the
             teacher's Megatron checkpoint to 9 layers, hidden 512, 8 heads / 4 groups,
             FFN 1024 (about 54M parameters).
4. recover   every pruned model with the same token budget (1/6 of the teacher's tokens,
             `--recover-fraction`; Muon for the weight matrices, `--recover-optimizer`; LR
             decayed linearly to 0), with the LM loss and with
             distillation from the teacher (`--teacher`: logits with 30% LM loss, hidden
             states through the prune plan), and a random-init model of the pruned shape on
             the same tokens; `--jobs` runs share a GPU, and on a machine of several GPUs they
             spread over all of them (`--gpus`).
5. evaluate  perplexity on the held-out books and WikiText-2 validation (windows of the
             sequence length, tokenized by SentencePiece as the training data), right after
             pruning and after recovery -> results.md/.json, recover_curves.png,
             teacher_curve.png in --out.

usage: python bench/prune_recover.py --out results/ --time-budget 500   # late runs left out
       python bench/prune_recover.py --smoke --out /tmp/pr_smoke        # CPU, minutes
A sweep on one teacher adds runs with trainer flags (--variant RUN@TAG=FLAGS) or pruned models
with prune flags (--prune-variant METHOD:TAG=FLAGS) appended, or reruns the second goal's pair
on smaller token budgets (--budget-sweep 1/2,1/4); docs/benchmarks.md has examples.
"""
from __future__ import annotations


import argparse
import datetime
import fractions
import os
import shlex
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Dict, List


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import token_efficiency  # noqa: E402  (bench/, beside this file)
from prune_recover_stages.data import prepare_data  # noqa: E402
from prune_recover_stages.evaluate import evaluate_all  # noqa: E402
from prune_recover_stages.protocol import METHODS, Protocol, _flag, _global_batch, smoke_protocol  # noqa: E402
from prune_recover_stages.prune import finished_runs, prune_all  # noqa: E402
from prune_recover_stages.recover import _same_tokens, _schedule_flags, budget_variants, recovery_jobs, run_names  # noqa: E402
from prune_recover_stages.report import write_report  # noqa: E402
from prune_recover_stages.runner import Runner, _cuda, _default_jobs, _gpu_count, _log, _slug  # noqa: E402
from prune_recover_stages.teacher import train_teacher  # noqa: E402


def _meta(args, data: dict, stages: dict) -> dict:
    import torch
    commit = os.environ.get("BENCH_COMMIT")  # a copy of the tree without .git names it
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                    capture_output=True, text=True).stdout.strip() or "?"
        except OSError:
            commit = "?"
    device = (torch.cuda.get_device_name(0) if torch.cuda.is_available()
              else f"CPU ({os.cpu_count()} cores)")
    return {"date": datetime.date.today().isoformat(), "device": device,
            "torch": torch.__version__, "commit": commit,
            "command": "python bench/prune_recover.py " + " ".join(sys.argv[1:]),
            "train_books": data["train_books"], "valid_books": data["valid_books"],
            "stages": stages}


# ---------------------------------------------------------------------------- main
OVERRIDES = ("teacher_seconds", "teacher_lr", "recover_iters", "recover_micro_batch",
             "recover_global_batch", "recover_lr", "recover_warmup", "recover_decay_style",
             "recover_min_lr", "scratch_lr", "recover_optimizer",
             "kd_temperature", "kd_alpha", "kd_hidden_weight", "calib_samples", "eval_tokens")


def _fraction(text: str) -> str:
    try:
        f = fractions.Fraction(text)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a fraction: {text!r} (e.g. 1/6)") from None
    if not 0 < f <= 1:
        raise argparse.ArgumentTypeError(f"{text}: a fraction in (0, 1]")
    return text


def recovery_iterations(p: Protocol, teacher_tokens: int) -> int:
    """--recover-fraction: the most whole iterations within that fraction of the teacher's
    tokens."""
    budget = fractions.Fraction(p.recover_fraction) * teacher_tokens
    return max(1, int(budget // (p.recover_global_batch * p.seq_length)))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n\n", 1)[1])
    ap.add_argument("--out", required=True, help="results.md/.json and plots go here")
    ap.add_argument("--work", default=None, help="checkpoints and logs (default: OUT/work)")
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data"),
                    help="the shared data folder (Gutenberg, Llama-2 tokenizer, WikiText-2)")
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, CPU-sized: minutes")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--kd-methods", default=",".join(METHODS),
                    help="methods recovered with distillation too (default: all)")
    ap.add_argument("--jobs", type=int, default=None,
                    help="recovery runs at once on each GPU (default on CUDA: 3, with "
                         "--efficiency all of them; 1 on CPU)")
    ap.add_argument("--gpus", type=int, default=None,
                    help="GPUs to spread importance and recovery runs over, one job list per "
                         "GPU (default: all the machine has); the teacher trains on one")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                    help="tokenizer processes (default: one per core)")
    ap.add_argument("--time-budget", type=float, default=None,
                    help="seconds from the start by which the recoveries must end: skip the "
                         "optional ones (beyond the runs the goals compare) that would end "
                         "later; the report lists them")
    ap.add_argument("--variant", action="append", default=[], metavar="RUN@TAG=FLAGS",
                    help="also run RUN (e.g. activation_kd) with these trainer flags appended, "
                         "as RUN@TAG, e.g. --variant 'activation_kd@lr2e-3=--lr 2e-3 --min-lr "
                         "2e-4'; repeatable (a recipe sweep on one teacher)")
    ap.add_argument("--prune-variant", action="append", default=[], metavar="METHOD:TAG=FLAGS",
                    help="also prune with METHOD's scores and these `megatron-prune prune` flags "
                         "appended (a --drop-layers list replaces the method's choice of "
                         "layers), and recover it as METHOD:TAG_lm / METHOD:TAG_kd, e.g. "
                         "--prune-variant 'activation:last=--drop-layers 8,9,10'; repeatable")
    ap.add_argument("--budget-sweep", default="", metavar="F[,F...]",
                    help="also run activation + distillation and random init (the pair the "
                         "60%%-below-random-init goal compares) on these fractions of the "
                         "recovery tokens, e.g. 1/2,1/4, each with a whole schedule of its own; "
                         "the report tabulates both goals at every budget")
    ap.add_argument("--skip", default="",
                    help="comma-separated recovery runs to leave out, e.g. scratch,random_lm")
    from megatron_prune.train.config import LR_DECAY_STYLES, OPTIMIZERS
    for f in OVERRIDES:
        kind = type(getattr(Protocol(), f))
        ap.add_argument("--" + f.replace("_", "-"), type=kind, default=None,
                        **({"choices": LR_DECAY_STYLES} if f == "recover_decay_style" else
                           {"choices": OPTIMIZERS} if f == "recover_optimizer" else {}))
    ap.add_argument("--efficiency", action="store_true",
                    help="the token-efficiency sweep (issue 21) instead of the goal runs: "
                         "activation + distillation at --kd-budgets and random init at "
                         "--scratch-budgets (fractions of the teacher's tokens), and the token "
                         "ratio at equal held-out perplexity")
    ap.add_argument("--kd-budgets", default="1/384,1/192,1/96,1/48,1/24", metavar="F[,F...]",
                    help="--efficiency: distillation budgets, fractions of the teacher's tokens")
    ap.add_argument("--scratch-budgets", default="1/48,1/24,1/12,1/6,1/3", metavar="F[,F...]",
                    help="--efficiency: random-init budgets, fractions of the teacher's tokens "
                         "(up to the largest that fits; later calls with --reuse may add more)")
    ap.add_argument("--reuse", action="store_true",
                    help="keep what an earlier call left in --work (data, teacher, importance, "
                         "pruned models, finished recoveries) instead of starting afresh: a "
                         "sweep split over several calls shares one teacher")
    ap.add_argument("--lora-rank", type=int, default=None,
                    help="also recover the activation-pruned model with distillation by LoRA "
                         "of this rank (AdamW, --lora-lr) beside full recovery at equal tokens, "
                         "as activation_kd@loraR: perplexity, peak GPU memory, tokens/s")
    ap.add_argument("--lora-lr", type=float, default=1e-3)
    ap.add_argument("--recover-fraction", type=_fraction, default=None, metavar="F",
                    help="recovery tokens = at most this fraction of the teacher's (default "
                         "1/6, the most issue 7 allows); --recover-iters alone replaces it")
    return ap.parse_args(argv)


def parse_prune_variants(texts: List[str], methods: List[str]) -> Dict[str, List[str]]:
    """--prune-variant METHOD:TAG=FLAGS -> {METHOD:TAG: flags}, checked before any training."""
    out = {}
    for v in texts:
        key, eq, flags = v.partition("=")
        method, colon, tag = key.partition(":")
        if not eq or not colon or not tag or any(c in tag for c in "@_:"):
            raise SystemExit(f"--prune-variant {v!r}: write METHOD:TAG=FLAGS (TAG without "
                             "'@', '_' or ':')")
        if method not in methods:
            raise SystemExit(f"--prune-variant {v!r}: {method!r} is not among --methods "
                             f"({', '.join(methods)})")
        out[key] = shlex.split(flags)
    return out


def parse_budgets(text: str, kd_methods: List[str]) -> List[str]:
    """--budget-sweep F[,F...] -> the fractions, checked before any training."""
    budgets = [f for f in text.split(",") if f]
    for f in budgets:
        try:
            _fraction(f)
        except argparse.ArgumentTypeError as e:
            raise SystemExit(f"--budget-sweep: {e}") from None
        if fractions.Fraction(f) == 1:
            raise SystemExit("--budget-sweep: 1 is the recovery budget itself; give fractions "
                             "below 1")
    if budgets and "activation" not in kd_methods:
        raise SystemExit("--budget-sweep reruns activation + distillation: keep activation in "
                         "--methods and --kd-methods")
    return budgets


def main(argv=None) -> int:
    # one line per model instead of progress bars; before parse_args, whose imports bring in
    # tqdm, which reads its TQDM_* variables once, when imported
    os.environ.setdefault("TQDM_DISABLE", "1")
    a = parse_args(argv)
    p = smoke_protocol() if a.smoke else Protocol()
    if not _cuda():
        p.bf16 = False
    for f in OVERRIDES + ("recover_fraction",):
        if getattr(a, f) is not None:
            setattr(p, f, getattr(a, f))
    if a.recover_iters is not None and a.recover_fraction is None:
        p.recover_fraction = None  # the iterations asked for, not the fraction's
    methods = [m for m in a.methods.split(",") if m]
    kd_methods = [m for m in a.kd_methods.split(",") if m]
    if not set(methods) <= set(METHODS) or not set(kd_methods) <= set(methods):
        raise SystemExit(f"--methods/--kd-methods: choose from {METHODS} (KD ones among "
                         "--methods)")
    variants = {}
    for v in a.variant:
        name, eq, flags = v.partition("=")
        if not eq or "@" not in name or not name.split("@", 1)[1]:
            raise SystemExit(f"--variant {v!r}: write RUN@TAG=FLAGS")
        variants[name] = shlex.split(flags)
        mbs = _flag(variants[name], "--micro-batch-size", p.recover_micro_batch)
        if _global_batch(variants[name], p) % mbs:  # the trainer would refuse it, much later
            raise SystemExit(f"--variant {v!r}: the global batch is not a multiple of the "
                             f"micro-batch ({mbs}); set --micro-batch-size too")
    budgets = parse_budgets(a.budget_sweep, kd_methods)
    kd_budgets, scratch_budgets = [], []
    if a.efficiency:
        # one pruned model, its distillation and random init: the two curves and nothing else
        methods = kd_methods = ["activation"]
        kd_budgets = parse_budgets(a.kd_budgets, kd_methods)
        scratch_budgets = parse_budgets(a.scratch_budgets, kd_methods)
        a.skip = ",".join(n for n in ("activation_lm", "activation_kd", "scratch", a.skip)
                          if n and not (n == "activation_kd" and a.lora_rank))
    prune_variants = parse_prune_variants(a.prune_variant, methods)
    runs = run_names(methods + list(prune_variants), kd_methods)
    skip = tuple(n for n in a.skip.split(",") if n)
    for name in [v.split("@")[0] for v in variants] + list(skip):
        if name not in runs:  # before the teacher trains for minutes
            raise SystemExit(f"--variant/--skip: no run {name!r} (runs: {', '.join(runs)})")
    data_dir = Path(a.data)
    if not (data_dir / "corpus" / "gutenberg_en.tar.xz").is_file():
        raise SystemExit(f"--data {data_dir}: no corpus/gutenberg_en.tar.xz")
    out = Path(a.out)
    work = Path(a.work) if a.work else out / "work"
    if work.exists() and not a.reuse:
        shutil.rmtree(work)
    (work / "logs").mkdir(parents=True, exist_ok=True)
    (work / "recovered").mkdir(exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    gpus = a.gpus if a.gpus is not None else (_gpu_count() if _cuda() else 0)
    r = Runner(work, out / "run.log", gpus, reuse=a.reuse)
    (out / "run.log").write_text("")
    t_start = time.time()
    with r.stage("data"):
        data = prepare_data(r, p, data_dir, a.workers)
    with r.stage("teacher"):
        teacher = train_teacher(r, p, data)
    r.say(f"  teacher: {teacher['iterations']} iterations, {teacher['tokens'] / 1e6:.1f} M "
          f"tokens, {teacher['train_seconds']:.0f} s of training")
    if p.recover_fraction:
        p.recover_iters = recovery_iterations(p, teacher["tokens"])
        r.say(f"  recovery: {p.recover_iters} iterations = {p.recover_fraction} of the "
              "teacher's tokens at most")
    # now that iters are known
    variants = {n: _same_tokens(p, v) for n, v in variants.items()}
    variants.update(budget_variants(p, budgets))
    variants.update(token_efficiency.variants(
        kd_budgets, scratch_budgets, teacher["tokens"], p.recover_global_batch * p.seq_length,
        lambda iters: _schedule_flags(p, iters)))
    if a.lora_rank:
        variants[f"activation_kd@lora{a.lora_rank}"] = [
            "--lora-rank", a.lora_rank, "--optimizer", "adam", "--lr", a.lora_lr,
            "--min-lr", a.lora_lr * p.recover_min_lr]
    with r.stage("importance + prune"):
        pruned = prune_all(r, p, data, methods, prune_variants)
    jobs, optional = recovery_jobs(r, p, data, pruned, kd_methods, variants, skip)
    finished = finished_runs(r, jobs)
    if finished:
        r.say(f"  reusing finished recoveries: {', '.join(finished)}")
    models = {"teacher": work / "teacher"}
    models.update({f"{m}_pruned": path for m, path in pruned.items()})
    early: dict = {}
    # the teacher and the pruned models are scored while the recoveries train
    scorer = threading.Thread(target=lambda: early.update(evaluate_all(r, p, data, models)))
    with r.stage("recover"):
        scorer.start()
        deadline = t_start + a.time_budget if a.time_budget else None
        skipped = r.run_many({n: v for n, v in jobs.items() if n not in finished},
                             parallel=a.jobs or _default_jobs(a.efficiency, len(jobs)),
                             optional=tuple(optional), deadline=deadline)
    with r.stage("evaluate"):
        scorer.join()
        if len(early) != len(models):
            raise SystemExit("scoring the teacher and the pruned models failed (see above)")
        done = {n: work / "recovered" / _slug(n) for n in jobs if n not in skipped}
        ev = {**early, **evaluate_all(r, p, data, done)}
    r.stage_seconds["total"] = time.time() - t_start
    meta = _meta(a, data, r.stage_seconds)
    meta["skipped"] = skipped
    meta["variants"] = {n: v for n, v in variants.items() if n in done}
    meta["prune_variants"] = prune_variants
    meta["lora_runs"] = ["activation_kd", f"activation_kd@lora{a.lora_rank}"] \
        if a.lora_rank else []
    write_report(out, p, meta, teacher, ev, {n: _log(r, n) for n in done})
    print((out / "results.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
