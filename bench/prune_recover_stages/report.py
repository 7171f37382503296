"""The report: results.md/.json (tables, goals, token budgets) from the evaluations."""
from __future__ import annotations


import dataclasses
import json
from pathlib import Path
from typing import Dict, Optional


import token_efficiency  # bench/, beside this package

from prune_recover_stages.protocol import METHODS, Protocol, REFERENCE, _flag, _global_batch, _min_lr
from prune_recover_stages.recover import BUDGET_RUNS, _optimizer_label
from prune_recover_stages.runner import _jsonl


# ---------------------------------------------------------------------------- report
# A run's row of REFERENCE, where the reference has one.
RUN_REFERENCE = {"teacher": "teacher", "random_pruned": "random pruned",
                 "activation_pruned": "activation pruned", "random_lm": "random + LM",
                 "activation_lm": "activation + LM", "activation_kd": "activation + KD",
                 "scratch": "random init"}


def run_tokens(p: Protocol, teacher: dict, name: str, variants: Dict[str, list]) -> Optional[int]:
    """The tokens a model was trained on (None: pruned, not trained): the teacher's, or a
    recovery's (a variant's flags may change its iterations or batch)."""
    if name == "teacher":
        return teacher["tokens"]
    if name.endswith("_pruned"):
        return None
    flags = variants.get(name, [])
    return _flag(flags, "--train-iters", p.recover_iters) * _global_batch(flags, p) * p.seq_length


def table_cells(p: Protocol, ev: dict, teacher: dict, variants: Dict[str, list]) -> Dict[str, dict]:
    """The results table as printed, cell by cell, in row order: the one source of its rows and
    of every number the goals quote (so a verdict cannot quote what the table does not show;
    bench/verdicts.py states the rule)."""
    cells = {}
    for name, e in _ordered(ev):
        tokens = run_tokens(p, teacher, name, variants)
        ref = RUN_REFERENCE.get(name)
        cells[name] = {"model": _label(name), "params": f"{e['params'] / 1e6:.1f} M",
                       "tokens": f"{tokens / 1e6:.2f} M" if tokens else "",
                       "books": f"{e['books']:.2f}", "wikitext2": f"{e['wikitext2']:.2f}",
                       "reference": f"{REFERENCE[ref]:g}" if ref else ""}
    return cells


TABLE_COLUMNS = (("model", "model"), ("params", "parameters"), ("tokens", "training tokens"),
                 ("books", "held-out books ppl"), ("wikitext2", "WikiText-2 ppl"),
                 ("reference", "reference (plain PyTorch, issue 7)"))


def goals(p: Protocol, ev: dict, teacher: dict, cells: Dict[str, dict]) -> list:
    """(goal, measured, met) rows of issue 7: `measured` quotes `cells` (the table's own
    strings) and derives ratios in bench/verdicts.py's forms; `met` compares the unrounded
    values."""
    rows = []
    t, tc = ev["teacher"]["books"], cells["teacher"]

    def have(*names):
        return all(n in ev for n in names)

    rows.append(("teacher trained to at least the reference's quality (held-out ppl <= "
                 f"{tc['reference']}) in {p.teacher_seconds:.0f} s",
                 f"{tc['books']} vs {tc['reference']}, on {tc['tokens']} tokens",
                 t <= REFERENCE["teacher"]))
    rec_tokens = p.recover_iters * p.recover_global_batch * p.seq_length
    recovered = [n for n, c in cells.items() if n != "teacher" and "@" not in n and c["tokens"]]
    if recovered:
        rows.append(("recovery tokens <= 1/6 of the teacher's",
                     f"{cells[recovered[0]]['tokens']} vs {tc['tokens']}: "
                     f"1/{teacher['tokens'] / rec_tokens:.2f}",
                     rec_tokens <= teacher["tokens"] / 6))
    if have("activation_kd"):
        kd = ev["activation_kd"]["books"]
        rows.append(("activation + KD within 3% of the teacher",
                     f"{cells['activation_kd']['books']} vs {tc['books']}: "
                     f"{100 * (kd / t - 1):+.1f}%", kd <= 1.03 * t))
        if have("scratch"):
            s = ev["scratch"]["books"]
            rows.append(("activation + KD >= 60% below random init at equal tokens",
                         f"{cells['activation_kd']['books']} vs {cells['scratch']['books']}: "
                         f"{100 * (1 - kd / s):.0f}% below", kd <= 0.4 * s))
    if have("random_pruned", "activation_pruned"):
        a, b = ev["random_pruned"]["books"], ev["activation_pruned"]["books"]
        rows.append(("right after pruning: random masks >= 1.5x activation",
                     f"{cells['random_pruned']['books']} vs {cells['activation_pruned']['books']}: "
                     f"{a / b:.2f}×", a >= 1.5 * b))
    for kind in ("lm", "kd"):
        if have(f"random_{kind}", f"activation_{kind}"):
            a, b = ev[f"random_{kind}"]["books"], ev[f"activation_{kind}"]["books"]
            rows.append((f"after recovery ({kind.upper()}): random masks worse than activation",
                         f"{cells[f'random_{kind}']['books']} vs "
                         f"{cells[f'activation_{kind}']['books']}", a > b))
    return rows


def budget_rows(p: Protocol, ev: dict, variants: Dict[str, list]) -> list:
    """(tokens, activation + KD ppl, its distance from the teacher, random init ppl, how far
    below it KD is) at the full recovery budget and each --budget-sweep one both runs of
    finished, fewest tokens first."""
    per_iter = p.recover_global_batch * p.seq_length
    runs = {"": p.recover_iters}
    runs.update({n.split("@", 1)[1]: _flag(v, "--train-iters", 0)
                 for n, v in variants.items() if n.startswith(BUDGET_RUNS[0] + "@tokens")})
    rows = []
    t = ev["teacher"]["books"]
    for tag, iters in runs.items():
        kd, s = (ev.get(r + ("@" + tag if tag else "")) for r in BUDGET_RUNS)
        if kd and s:
            kd, s = kd["books"], s["books"]
            rows.append((iters * per_iter, kd, kd / t - 1, s, 1 - kd / s))
    return sorted(rows)


def _budget_lines(p: Protocol, ev: dict, teacher: dict, variants: Dict[str, list]) -> list:
    rows = budget_rows(p, ev, variants)
    if len(rows) < 2:
        return []
    lines = ["", "Token budget (--budget-sweep): activation + distillation against random init, "
             "each run with its own whole schedule", "",
             "| recovery tokens | of the teacher's | activation + KD | vs teacher | "
             "random init | KD below random init | both goals |", "|---|---|---|---|---|---|---|"]
    for tokens, kd, gap, s, below in rows:
        both = gap <= 0.03 and below >= 0.6
        lines.append(f"| {tokens / 1e6:.2f} M | 1/{teacher['tokens'] / tokens:.0f} | {kd:.2f} | "
                     f"{100 * gap:+.1f}% | {s:.2f} | {100 * below:.0f}% | "
                     f"{'yes' if both else 'no'} |")
    return lines


def _label(name: str) -> str:
    if "@" in name:  # a --variant of a run
        base, tag = name.split("@", 1)
        return f"{_label(base)} [{tag}]"
    if name in ("teacher", "scratch"):
        return {"teacher": "teacher (unpruned)", "scratch": "random init, pruned shape"}[name]
    model, kind = name.rsplit("_", 1)
    m = _model_label(model)
    return {"pruned": f"{m}: pruned, no training", "lm": f"{m} + LM loss",
            "kd": f"{m} + distillation"}[kind]


def _model_label(model: str) -> str:
    """A pruned model's key as the table names it: "activation", "activation (TAG prune)"."""
    method, _, tag = model.partition(":")
    return f"{method} ({tag} prune)" if tag else method


def _ordered(ev: dict) -> list:
    """teacher, then each method's pruned / + LM / + KD rows, then random init."""
    rank = {"teacher": (0, 0, ""), "scratch": (2, 0, "")}
    kinds = {"pruned": 0, "lm": 1, "kd": 2}

    def key(name):
        if "@" in name:
            base, tag = name.split("@", 1)
            return (*key(base), tag)
        if name in rank:
            return (*rank[name], "")
        model, kind = name.rsplit("_", 1)
        method, _, tag = model.partition(":")
        return (1, METHODS.index(method) if method in METHODS else 9, tag, kinds[kind], "")
    return sorted(ev.items(), key=lambda kv: key(kv[0]))


def report_lines(p: Protocol, meta: dict, teacher: dict, ev: dict) -> list:
    """results.md: the setup, the results table and the goals (both from `table_cells`), the
    budget sweep and the variants."""
    rec_tokens = p.recover_iters * p.recover_global_batch * p.seq_length
    variants = meta.get("variants", {})
    cells = table_cells(p, ev, teacher, variants)
    lines = [f"# prune -> recover benchmark ({meta['date']})", "",
             f"`{meta['command']}` — {meta['device']}, torch {meta['torch']}, "
             f"commit {meta['commit']}", "",
             f"Teacher: {p.teacher.layers} layers, hidden {p.teacher.hidden}, "
             f"{p.teacher.heads} heads / {p.teacher.groups} groups, FFN {p.teacher.ffn}, "
             f"{ev['teacher']['params'] / 1e6:.1f} M parameters; {teacher['iterations']} "
             f"iterations x {p.teacher_global_batch} x {p.seq_length} = "
             f"{teacher['tokens'] / 1e6:.1f} M tokens in {teacher['train_seconds']:.0f} s of "
             f"training ({meta['train_books']} books; held out: {', '.join(meta['valid_books'])}).",
             f"Pruned shape: {p.student.layers} layers, hidden {p.student.hidden}, "
             f"{p.student.heads} heads / {p.student.groups} groups, FFN {p.student.ffn}. "
             f"Every recovery: {p.recover_iters} iterations x {p.recover_global_batch} x "
             f"{p.seq_length} = {rec_tokens / 1e6:.2f} M tokens"
             + (f" (at most {p.recover_fraction} of the teacher's)" if p.recover_fraction else "")
             + f", the same samples in the same order (LR {p.recover_lr:g}, random init "
             f"{p.scratch_lr:g}, {p.recover_decay_style} to {_min_lr(p)}, "
             f"{100 * p.recover_warmup:g}% warmup, "
             f"micro-batch {p.recover_micro_batch}, {_optimizer_label(p)}). "
             f"Distillation: T = {p.kd_temperature:g}, "
             f"{p.kd_alpha:g} x KL + {1 - p.kd_alpha:g} x LM loss, "
             + (f"logits and the hidden states after every layer (weight "
                f"{p.kd_hidden_weight:g})." if p.kd_hidden_weight else "logits only."),
             "", "| " + " | ".join(title for _, title in TABLE_COLUMNS) + " |",
             "|" + "---|" * len(TABLE_COLUMNS)]
    lines += ["| " + " | ".join(c[key] for key, _ in TABLE_COLUMNS) + " |" for c in cells.values()]
    lines += ["", "| goal (issue 7) | measured | met |", "|---|---|---|"]
    for goal, measured, met in goals(p, ev, teacher, cells):
        lines.append(f"| {goal} | {measured} | {'yes' if met else '**no**'} |")
    lines += _budget_lines(p, ev, teacher, variants)
    if variants:
        lines += ["", "Variants (the base run's flags, then these):"]
        lines += [f"- {_label(n)}: `{' '.join(map(str, v))}`" for n, v in variants.items()]
    if meta.get("prune_variants"):
        lines += ["", "Prune variants (the method's `megatron-prune prune` flags, then these):"]
        lines += [f"- {_model_label(n)}: `{' '.join(map(str, v))}`"
                  for n, v in meta["prune_variants"].items()]
    if meta.get("skipped"):
        lines += ["", "Not run (they would have ended after `--time-budget`): "
                  + ", ".join(_label(n) for n in meta["skipped"]) + "."]
    tokens_of = lambda n: run_tokens(p, teacher, n, variants)  # noqa: E731
    lines += token_efficiency.lines(ev, tokens_of, teacher["tokens"])
    lines += token_efficiency.cost_lines(ev, lora_costs(meta, ev), {n: _label(n) for n in ev},
                                         tokens_of)
    lines += ["", "Stage times (s): " + ", ".join(f"{k} {v:.0f}"
                                                 for k, v in meta["stages"].items()), ""]
    return lines


def lora_costs(meta: dict, ev: dict) -> Dict[str, dict]:
    """Peak memory and tokens/s of full and LoRA recovery, from their training logs."""
    return {n: token_efficiency.cost(_jsonl(meta["logs"][n])) for n in meta.get("lora_runs", [])
            if n in ev and n in meta.get("logs", {})}


def write_report(out: Path, p: Protocol, meta: dict, teacher: dict, ev: dict,
                 logs: Dict[str, Path]) -> None:
    variants = meta.get("variants", {})
    meta["logs"] = {n: str(v) for n, v in logs.items()}
    (out / "results.md").write_text("\n".join(report_lines(p, meta, teacher, ev)) + "\n")
    cells = table_cells(p, ev, teacher, variants)
    (out / "results.json").write_text(json.dumps(
        {"protocol": dataclasses.asdict(p), "meta": meta, "teacher": {
            k: v for k, v in teacher.items() if k != "log"}, "eval": ev,
         "budgets": [dict(tokens=n, kd=kd, kd_vs_teacher=g, scratch=s, kd_below_scratch=b)
                     for n, kd, g, s, b in budget_rows(p, ev, variants)],
         "efficiency": [{k: v for k, v in row.items() if not k.endswith("_cell")}
                        for row in token_efficiency.rows(
                            ev, lambda n: run_tokens(p, teacher, n, variants))],
         "lora_cost": lora_costs(meta, ev),
         "goals": [dict(goal=g, measured=m, met=ok) for g, m, ok in goals(p, ev, teacher, cells)]},
        indent=2, default=str))
    _plot(out, logs, teacher["log"], p, {n: _global_batch(v, p) for n, v in variants.items()})


# ---------------------------------------------------------------------------- figures
def _plot(out: Path, logs: Dict[str, Path], teacher_log: Path, p: Protocol,
          global_batch: Optional[Dict[str, int]] = None) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
    except ImportError:
        return
    plot_recovery(out / "recover_curves.png", logs, p, global_batch)
    plot_teacher(out / "teacher_curve.png", teacher_log, p)


def plot_recovery(png: Path, logs: Dict[str, Path], p: Protocol,
                  global_batch: Optional[Dict[str, int]] = None) -> None:
    """Training LM loss and validation perplexity of each recovery run's --log-json."""
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for name, path in logs.items():
        recs = _jsonl(path)
        train = [x for x in recs if "eval" not in x]
        val = [x for x in recs if x.get("eval") == "validation"]
        tok = (global_batch or {}).get(name, p.recover_global_batch) * p.seq_length / 1e6
        base = name.split("@")[0]
        style = "--" if base.endswith("_lm") else "-" if base.endswith("_kd") else ":"
        axes[0].plot([x["iteration"] * tok for x in train], [x["lm_loss"] for x in train],
                     style, label=_label(name), lw=1)
        axes[1].plot([x["iteration"] * tok for x in val], [x["ppl"] for x in val], style,
                     marker="o", ms=3, label=_label(name), lw=1)
    axes[0].set(xlabel="tokens (M)", ylabel="training LM loss", title="recovery: training")
    axes[1].set(xlabel="tokens (M)", ylabel="held-out books perplexity", yscale="log",
                title="recovery: validation")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)


def plot_teacher(png: Path, teacher_log: Path, p: Protocol) -> None:
    import matplotlib.pyplot as plt
    recs = _jsonl(teacher_log)
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    tok = p.teacher_global_batch * p.seq_length / 1e6
    train = [x for x in recs if "eval" not in x]
    val = [x for x in recs if x.get("eval") == "validation"]
    ax.plot([x["iteration"] * tok for x in train], [x["lm_loss"] for x in train], label="train")
    ax.plot([x["iteration"] * tok for x in val], [x["lm_loss"] for x in val], "o-",
            label="held-out books")
    ax.set(xlabel="tokens (M)", ylabel="LM loss", title="teacher pretraining")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
