"""`auto` importance: each pruned dimension's criterion chosen by the calibration loss.

No single criterion ranks every dimension best. On SmolLM2-135M (docs/benchmarks.md, "Beside the
peers") activation norms rank hidden channels far better than Taylor scores (held-out C4
perplexity 336 vs 2,227 at hidden 576 -> 432, ablation H), while `auto` picks Taylor for the
heads inside KV groups at both targets that thin them (W, WD). `auto` scores keep both sets, and
the prune decides per target:

* scores: activation's fields and meta (layer scores, angular distances, norm energy), taylor's
  hidden/heads/groups/ffn in meta["taylor"], and CALIB_ROWS calibration sequences in
  meta["calibration"] (so a prune on the shards needs no tokenizer or data). `importance`
  stores the CALIB_ROWS sequences that follow the scored ones: Taylor scores and layer losses
  are fitted to the scored sequences, and judged on those same sequences they would have an
  in-sample advantage over activation scores. (On SmolLM2 every choice came out the same
  either way, docs/benchmarks.md.) `combine` alone, from the API, keeps the first scored ones.
* `choose`: start from activation everywhere (or the criterion `--auto-criteria` pins for a
  dimension); for each other dimension the target shrinks (hidden, KV groups, heads within
  groups, FFN), then for the layer method when layers go, try the other candidates in turn and
  keep a change that lowers the calibration loss of the pruned model (streamed one pruned
  layer at a time, prune/stream.py, with o_proj / down_proj refitted as the written model will
  be, prune/reconstruct.py). That is 1 + (dimensions) + (other layer methods) loss evaluations.
"""
from __future__ import annotations

import dataclasses
import logging
from typing import Callable, Tuple

import torch
from tqdm.auto import tqdm

from megatron_prune.checkpoint.config import ModelConfig
from megatron_prune.prune.plan import LAYER_METHODS, PrunePlan, PruneTarget, make_plan
from megatron_prune.prune.scores import ImportanceScores

log = logging.getLogger(__name__)
CALIB_ROWS = 16
WIDTH_AXES = ("hidden", "groups", "heads", "ffn")
CRITERIA = ("activation", "taylor")


def combine(act: ImportanceScores, tay: ImportanceScores, batches: torch.Tensor) -> ImportanceScores:
    """`auto` scores from activation and taylor scores of the same model and data."""
    meta = dict(act.meta)
    meta["taylor"] = {k: getattr(tay, k) for k in WIDTH_AXES}
    meta["calibration"] = batches[:CALIB_ROWS].to(torch.int32).clone()
    return ImportanceScores("auto", act.shape, hidden=act.hidden, heads=act.heads,
                            groups=act.groups, ffn=act.ffn, layers=act.layers, meta=meta)


def calibration_rows(scores: ImportanceScores) -> torch.Tensor:
    return torch.as_tensor(scores.meta["calibration"]).long()


def with_choice(scores: ImportanceScores, choice: dict) -> ImportanceScores:
    """The scores with each dimension taken from the criterion `choice` names."""
    fields = {axis: scores.meta["taylor"][axis] if choice.get(axis) == "taylor"
              else getattr(scores, axis) for axis in WIDTH_AXES}
    return dataclasses.replace(scores, **fields)


def parse_criteria(text: str) -> dict:
    """`heads=activation,ffn=taylor` -> {"heads": "activation", "ffn": "taylor"}."""
    out = {}
    for item in filter(None, text.replace(" ", "").split(",")):
        axis, _, crit = item.partition("=")
        if axis not in WIDTH_AXES or crit not in CRITERIA:
            raise ValueError(f"expected DIMENSION=CRITERION with DIMENSION in {WIDTH_AXES} and "
                             f"CRITERION in {CRITERIA}, got {item!r}")
        out[axis] = crit
    return out


def shrunk_axes(cfg: ModelConfig, t: PruneTarget) -> list:
    """The width dimensions the target makes smaller, in the order they are decided."""
    heads = t.num_attention_heads or cfg.num_attention_heads
    groups = t.num_query_groups or cfg.num_query_groups
    small = {"hidden": (t.hidden_size or cfg.hidden_size) < cfg.hidden_size,
             "groups": groups < cfg.num_query_groups,
             "heads": heads // groups < cfg.heads_per_group,
             "ffn": (t.ffn_hidden_size or cfg.ffn_hidden_size) < cfg.ffn_hidden_size}
    return [a for a in WIDTH_AXES if small[a]]


def layer_methods(cfg: ModelConfig, t: PruneTarget, scores: ImportanceScores) -> list:
    """The layer methods to try: none unless layers are dropped by a method; the one named,
    or with "auto" every one the scores allow (perplexity needs importance --layer-loss,
    iterative --iterative-layers of at least the layers dropped)."""
    if t.drop_layers or t.num_layers is None or t.num_layers == cfg.num_layers:
        return []
    if t.layer_method != "auto":
        return [t.layer_method]
    allowed = {"perplexity": "layer_loss" in scores.meta,
               "iterative": len(scores.meta.get("layer_removal_order", ()))
               >= cfg.num_layers - t.num_layers}
    return [m for m in LAYER_METHODS if allowed.get(m, True)]


def choose(cfg: ModelConfig, target: PruneTarget, scores: ImportanceScores,
           loss_of: Callable[[PrunePlan], float], progress: bool = True,
           **plan_kw) -> Tuple[PrunePlan, dict]:
    """The plan of the best criteria found for `target` (auto scores), and the record of every
    trial: {"choice": {dimension: criterion, "layers": method}, "trials": [[what, loss]]}."""
    pinned = target.criteria or {}
    choice = {axis: pinned.get(axis, "activation") for axis in shrunk_axes(cfg, target)}
    free = [axis for axis in choice if axis not in pinned]
    methods = layer_methods(cfg, target, scores)
    how = dataclasses.replace(target, layer_method=methods[0] if methods else "block-influence")

    bar = tqdm(total=1 + len(free) * (len(CRITERIA) - 1) + max(0, len(methods) - 1),
               desc="auto importance: calibration loss", unit="trial", disable=not progress)

    def trial(ch: dict, t: PruneTarget) -> Tuple[PrunePlan, float]:
        plan = make_plan(cfg, t, with_choice(scores, ch), **plan_kw)
        loss = loss_of(plan)
        bar.update()
        return plan, loss
    best_plan, best = trial(choice, how)
    start = ", ".join(f"{a}: {c}" for a, c in pinned.items() if a in choice) or "activation"
    trials = [[start + (f", layers {how.layer_method}" if methods else ""), best]]
    for axis in free:
        for crit in CRITERIA[1:]:
            plan, loss = trial({**choice, axis: crit}, how)
            trials.append([f"{axis}: {crit}", loss])
            if loss < best:
                choice, best_plan, best = {**choice, axis: crit}, plan, loss
    for m in methods[1:]:
        t = dataclasses.replace(how, layer_method=m)
        plan, loss = trial(choice, t)
        trials.append([f"layers: {m}", loss])
        if loss < best:
            how, best_plan, best = t, plan, loss
    bar.close()
    if methods:
        choice["layers"] = how.layer_method
    record = {"choice": choice, "loss": best, "trials": trials,
              **({"pinned": dict(pinned)} if pinned else {})}
    log.info("auto importance chose %s (calibration loss %.4f)", choice, best)
    best_plan.method = "auto"
    best_plan.meta["auto"] = record
    return best_plan, record
