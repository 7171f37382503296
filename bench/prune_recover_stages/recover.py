"""Stage 4, recover: every pruned model trained on the same tokens (LM loss, distillation, LoRA)."""
from __future__ import annotations


import fractions
from typing import Dict, List, Optional


from prune_recover_stages.protocol import Protocol, _global_batch
from prune_recover_stages.prune import _method
from prune_recover_stages.runner import Runner, TRAIN, _log, _slug
from prune_recover_stages.teacher import _data_flags


# ---------------------------------------------------------------------------- 4. recover
def run_names(methods: List[str], kd_methods: List[str]) -> List[str]:
    """The base recovery runs of these methods, or pruned models' keys (METHOD:TAG for a
    --prune-variant): what --variant and --skip may name."""
    return [f"{m}_{k}" for m in methods for k in ("lm", "kd")
            if k == "lm" or _method(m) in kd_methods] + ["scratch"]


def recovery_jobs(r: Runner, p: Protocol, data: dict, pruned: dict, kd_methods: List[str],
                  variants: Optional[Dict[str, List[str]]] = None, skip: tuple = ()):
    """The recovery runs, in the order they start, and the names of the optional ones.
    `variants` maps BASE@TAG to extra trainer flags appended to run BASE's (the last of a
    repeated flag wins: a recipe sweep on the same teacher and pruned models; `main` has
    applied `_same_tokens` to them). `skip` leaves base runs out."""
    def flags(name: str, lr: float) -> list:
        return ["--seq-length", p.seq_length, "--micro-batch-size", p.recover_micro_batch,
                "--global-batch-size", p.recover_global_batch,
                *_schedule_flags(p, p.recover_iters), "--lr", lr,
                "--min-lr", lr * p.recover_min_lr, "--lr-decay-style", p.recover_decay_style,
                "--weight-decay", 0.1, "--clip-grad", 1.0, *_optimizer_flags(p),
                "--seed", 4321, "--eval-interval", p.eval_interval, "--eval-iters", p.eval_iters,
                "--save", r.work / "recovered" / _slug(name), "--log-json", _log(r, name),
                *_data_flags(data), *(["--bf16"] if p.bf16 else [])]

    jobs = {}
    for m, path in pruned.items():
        jobs[f"{m}_lm"] = TRAIN + ["--pretrained-checkpoint", path] + flags(f"{m}_lm", p.recover_lr)
        if _method(m) in kd_methods:
            hidden = ["--kd-hidden-weight", p.kd_hidden_weight] if p.kd_hidden_weight else []
            jobs[f"{m}_kd"] = TRAIN + ["--pretrained-checkpoint", path, "--teacher",
                                       r.work / "teacher", "--kd-temperature", p.kd_temperature,
                                       "--kd-alpha", p.kd_alpha, *hidden] + \
                flags(f"{m}_kd", p.recover_lr)
    shape_from = next(iter(pruned.values()))
    jobs["scratch"] = TRAIN + ["--init", "random", "--pretrained-checkpoint", shape_from] + \
        flags("scratch", p.scratch_lr)
    for name, extra in (variants or {}).items():
        base = name.split("@")[0]
        argv = list(jobs[base])
        argv[argv.index("--save") + 1] = r.work / "recovered" / _slug(name)
        argv[argv.index("--log-json") + 1] = _log(r, name)
        jobs[name] = argv + list(extra)
    for name in skip:
        jobs.pop(name, None)
    # the runs the goals compare first (distillation first: it carries the teacher's forward
    # pass), then the variants, then the rest, which a time budget may skip
    first = ["activation_kd", "random_kd", "activation_lm", "random_lm", "scratch"]
    order = [n for n in first if n in jobs] + [n for n in jobs if "@" in n] + sorted(
        (n for n in jobs if n not in first and "@" not in n),
        key=lambda n: (n.endswith("_kd"), n))
    return {n: jobs[n] for n in order}, [n for n in order if n not in first]


def _optimizer_label(p: Protocol) -> str:
    return ("Muon (nesterov) for the weight matrices, AdamW for the rest"
            if p.recover_optimizer == "muon" else "AdamW")


def _optimizer_flags(p: Protocol) -> list:
    return ["--optimizer", p.recover_optimizer] + (
        ["--muon-use-nesterov"] if p.recover_optimizer == "muon" else [])


def _schedule_flags(p: Protocol, iters: int) -> list:
    """The flags that follow from a run's length: iterations, warmup, log interval."""
    return ["--train-iters", iters, "--lr-warmup-iters", max(1, int(iters * p.recover_warmup)),
            "--log-interval", max(1, iters // 40)]


# the runs the "60% below random init at equal tokens" goal compares: --budget-sweep reruns them
BUDGET_RUNS = ("activation_kd", "scratch")


def budget_variants(p: Protocol, budgets: List[str]) -> Dict[str, list]:
    """--budget-sweep: BUDGET_RUNS again on each fraction of the recovery's iterations, each a
    whole schedule of its own (warmup, then decay to its own end), as RUN@tokensF."""
    out = {}
    for f in budgets:
        iters = max(1, round(p.recover_iters * fractions.Fraction(f)))
        for run in BUDGET_RUNS:
            out[f"{run}@tokens{f}"] = _schedule_flags(p, iters)
    return out


def _same_tokens(p: Protocol, extra: list) -> list:
    """A variant's flags, plus the schedule that keeps the recovery's tokens when they change
    the global batch without saying how long to train (a batch-size sweep at equal tokens:
    --global-batch-size 4 trains twice the iterations of 8)."""
    if "--global-batch-size" not in extra or "--train-iters" in extra:
        return extra
    iters = p.recover_iters * p.recover_global_batch // _global_batch(extra, p)
    return extra + _schedule_flags(p, iters)
