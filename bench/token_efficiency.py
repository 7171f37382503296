"""`bench/prune_recover.py --efficiency`: how many fewer tokens prune + distil needs than random
init of the same shape, at equal held-out perplexity (issue 21), and what LoRA recovery costs
beside full recovery.

Both curves are measured, never modelled: activation + distillation at a few small budgets,
random init at budgets up to the largest run, every budget a fraction of the teacher's tokens
with a whole schedule of its own. Random init's tokens at a distilled run's perplexity are
read off its curve by piecewise-linear interpolation of log-perplexity against log-tokens
between the two runs that bracket it; beyond its largest run nothing is extrapolated (the ratio
is then a lower bound, "> N×"), below its smallest likewise (an upper bound, "< N×").

The tables are made cell by cell first and the verdict quotes those cells (bench/verdicts.py's
rule), as prune_recover's report does.
"""
from __future__ import annotations

import fractions
import math
import statistics
from typing import Dict, List, Optional, Tuple

KD_RUN, SCRATCH_RUN = "activation_kd", "scratch"
GOAL_RATIO = 30.0  # issue 21: random init needs at least 30x the distillation's tokens


def tag(fraction: str) -> str:
    return f"teacher{fraction}"


def budget_iters(fraction: str, teacher_tokens: int, tokens_per_iter: int) -> int:
    """The most whole iterations within this fraction of the teacher's tokens (at least 2: a
    schedule needs a warmup shorter than its decay; the tables give each run's real tokens)."""
    return max(2, int(fractions.Fraction(fraction) * teacher_tokens // tokens_per_iter))


def variants(kd_budgets: List[str], scratch_budgets: List[str], teacher_tokens: int,
             tokens_per_iter: int, schedule) -> Dict[str, list]:
    """RUN@teacherF -> the schedule flags (`schedule(iters)`) of each budget of each curve; a
    budget that comes to the iterations of an earlier one of its curve is left out (a small
    teacher rounds 1/96 and 1/48 to the same run)."""
    out = {}
    for run, budgets in ((KD_RUN, kd_budgets), (SCRATCH_RUN, scratch_budgets)):
        seen = set()
        for f in budgets:
            iters = budget_iters(f, teacher_tokens, tokens_per_iter)
            if iters not in seen:
                seen.add(iters)
                out[f"{run}@{tag(f)}"] = schedule(iters)
    return out


def curve(ev: dict, run: str, tokens_of) -> List[Tuple[int, float]]:
    """[(tokens, held-out books ppl)] of a curve's finished runs, fewest tokens first: its
    budgets, and the run at the recovery budget itself where it ran (the full recovery that
    LoRA is compared with is a point of the distillation curve). No budgets, no curve: the
    goal runs' report has no efficiency section."""
    budgets = [n for n in ev if n.startswith(run + "@teacher")]
    names = budgets + ([run] if budgets and run in ev else [])
    return sorted({(tokens_of(n), ev[n]["books"]) for n in names})


def tokens_at(points: List[Tuple[int, float]], ppl: float) -> Tuple[Optional[float], str]:
    """Tokens at which the curve `points` first reaches `ppl`: (tokens, "at") interpolated in
    log-log between the bracketing runs; (smallest run's tokens, "before") when its first run is
    already as good; (largest run's tokens, "after") when no run gets there."""
    if not points:
        return None, "after"
    if points[0][1] <= ppl:
        return float(points[0][0]), "before"
    for (t0, p0), (t1, p1) in zip(points, points[1:]):
        if p1 <= ppl < p0:
            x = (math.log(ppl) - math.log(p0)) / (math.log(p1) - math.log(p0))
            return math.exp(math.log(t0) + x * (math.log(t1) - math.log(t0))), "at"
    return float(points[-1][0]), "after"


def fmt_tokens(t: float) -> str:
    return f"{t / 1e6:.4g} M"


def rows(ev: dict, tokens_of) -> List[dict]:
    """One row per distilled budget: its tokens and perplexity, random init's tokens there,
    the ratio and whether it is exact or a bound. Cells are the strings the report prints."""
    kd, scratch = curve(ev, KD_RUN, tokens_of), curve(ev, SCRATCH_RUN, tokens_of)
    out = []
    for t, ppl in kd:
        st, where = tokens_at(scratch, ppl)
        if st is None:
            continue
        bound = {"at": "", "after": "> ", "before": "< "}[where]
        out.append({"kd_tokens": fmt_tokens(t), "kd_ppl": f"{ppl:.2f}",
                    "scratch_tokens": bound + fmt_tokens(st), "ratio": st / t,
                    "ratio_cell": f"{bound}{st / t:.1f}×", "where": where,
                    "kd_tokens_raw": t, "scratch_tokens_raw": st})
    return out


def lines(ev: dict, tokens_of, teacher_tokens: int) -> List[str]:
    """The report section: both curves, the ratios, and the goal row quoting them."""
    kd, scratch = curve(ev, KD_RUN, tokens_of), curve(ev, SCRATCH_RUN, tokens_of)
    if not kd or not scratch:
        return []
    out = ["", "## Token efficiency (--efficiency)", "",
           "Held-out books perplexity against training tokens; random init's tokens at each "
           "distilled perplexity interpolated (log-perplexity vs log-tokens, piecewise linear, "
           "never extrapolated: `>` where random init's largest run does not get there).", "",
           "| run | training tokens | of the teacher's | held-out books ppl |",
           "|---|---|---|---|"]
    for run, pts in (("activation + distillation", kd), ("random init, pruned shape", scratch)):
        out += [f"| {run} | {fmt_tokens(t)} | 1/{teacher_tokens / t:.0f} | {p:.2f} |"
                for t, p in pts]
    rs = rows(ev, tokens_of)
    out += ["", "| distillation tokens | its ppl | random init reaches it at | token ratio |",
            "|---|---|---|---|"]
    out += [f"| {r['kd_tokens']} | {r['kd_ppl']} | {r['scratch_tokens']} | {r['ratio_cell']} |"
            for r in rs]
    best = max((r for r in rs if r["where"] != "before"), key=lambda r: r["ratio"],
               default=None)
    if best is not None:
        met = best["ratio"] >= GOAL_RATIO
        bound = "> " if best["where"] == "after" else ""
        measured = (f"{bound}{best['scratch_tokens'].lstrip('> ')} vs {best['kd_tokens']}: "
                    f"{best['ratio']:.1f}×")
        out += ["", "| goal (issue 21) | measured | met |", "|---|---|---|",
                f"| random init needs >= {GOAL_RATIO:g}× the distillation's tokens at equal "
                f"held-out perplexity | {measured} | {'yes' if met else '**no**'} |"]
    return out


# ---------------------------------------------------------------------------- LoRA vs full
def cost(log_records: List[dict]) -> dict:
    """Peak GPU memory (GiB; None on the CPU) and median tokens/s of a run's training log
    (its first logged window, with compilation and allocator warm-up, left out)."""
    train = [r for r in log_records if "eval" not in r]
    steady = train[1:] or train
    mem = [r["max_mem_gib"] for r in train if r.get("max_mem_gib") is not None]
    return {"peak_mem_gib": max(mem) if mem else None,
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in steady)}


def cost_lines(ev: dict, costs: Dict[str, dict], labels: Dict[str, str], tokens_of) -> List[str]:
    """Full recovery beside LoRA recovery at equal tokens."""
    names = [n for n in costs if n in ev]
    if len(names) < 2:
        return []
    out = ["", "## LoRA recovery beside full recovery (equal tokens)", "",
           "| run | training tokens | held-out books ppl | WikiText-2 ppl | peak GPU memory | "
           "tokens/s |", "|---|---|---|---|---|---|"]
    for n in names:
        c = costs[n]
        mem = f"{c['peak_mem_gib']:.2f} GiB" if c["peak_mem_gib"] is not None else "- (CPU)"
        out.append(f"| {labels[n]} | {fmt_tokens(tokens_of(n))} | {ev[n]['books']:.2f} | "
                   f"{ev[n]['wikitext2']:.2f} | {mem} | {c['tokens_per_s']:,.0f} |")
    return out
