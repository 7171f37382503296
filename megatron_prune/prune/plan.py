"""What a prune keeps: decided once from scores and a target shape, saved as JSON, applied anywhere.

A plan lists, in output order, the source indices that survive: hidden channels, and per kept
layer its KV groups, the query heads kept inside each group, and its FFN neurons. Applying it is
index selection on HF-form tensors (`index_for`), so the same plan gives the same weights on an HF
checkpoint, a TP=1 Megatron checkpoint, or directly on TP/PP shards.

`balance` chooses, for every tensor-parallel rank, the best among that rank's own groups/neurons
(equal counts per rank). `global` chooses the best overall; the kept items are then dealt out
evenly in index order, so the output is balanced too and loads at the same TP. Heads always stay
with their KV group and every group keeps the same number of heads, as Megatron requires.
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import torch

from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.prune.scores import ImportanceScores

PRUNE_TYPES = ("balance", "global")
# hidden channels from activation scores: each norm's L2 vector over its mean, summed (balanced),
# or the raw L2 vectors summed (sum: ModelOpt's mcore_minitron ranking; with_hidden_aggregation)
HIDDEN_AGGREGATIONS = ("balanced", "sum")
LAYER_METHODS = ("block-influence", "contiguous", "perplexity", "iterative")
# "auto": chosen by calibration loss with auto scores (prune/choose.py), else block-influence
AUTO_LAYER_METHOD = "auto"


@dataclass
class PruneTarget:
    hidden_size: Optional[int] = None
    num_attention_heads: Optional[int] = None
    num_query_groups: Optional[int] = None
    ffn_hidden_size: Optional[int] = None
    drop_layers: Optional[list] = None
    num_layers: Optional[int] = None
    layer_method: str = "block-influence"  # or AUTO_LAYER_METHOD
    # rescale the kept norms when hidden channels go (needs scores with meta["norm_energy"])
    rescale_norms: bool = True
    hidden_aggregation: str = "balanced"  # one of HIDDEN_AGGREGATIONS
    # refit o_proj / down_proj on the kept inputs (prune/reconstruct.py; needs scores with rows)
    reconstruct: bool = True
    # with auto scores: width dimensions whose criterion is given, not chosen by calibration
    # loss, e.g. {"heads": "activation"} (prune/choose.py)
    criteria: Optional[dict] = None


@dataclass
class PrunePlan:
    source: dict                 # ModelConfig fields of the source model
    target: dict                 # ModelConfig fields of the pruned model
    keep_layers: list            # source layer of each output layer
    keep_hidden: list
    keep_groups: list            # [output layer][output group] -> source group
    keep_heads: list             # [output layer][output group][head] -> head index within group
    keep_ffn: list               # [output layer][neuron] -> source neuron
    method: str = "random"
    prune_type: str = "balance"
    tensor_parallel: int = 1
    seed: Optional[int] = None
    meta: dict = field(default_factory=dict)
    # what chose keep_layers: a --layer-method (with --num-layers-remain), "drop-layers" (the
    # list given) or "none" (every layer kept); None in plans written before it was recorded
    layer_method: Optional[str] = None
    # factors on the kept norm weights: {"layers": [[input, post-attention] per output layer],
    # "final": f}; None: norms copied as they are (no hidden pruning, or no norm energy)
    norm_scale: Optional[dict] = None

    @property
    def source_config(self) -> ModelConfig:
        return ModelConfig(**self.source)

    @property
    def target_config(self) -> ModelConfig:
        return ModelConfig(**self.target)

    def save(self, path) -> None:
        Path(path).write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, path) -> "PrunePlan":
        try:
            return cls(**json.loads(Path(path).read_text()))
        except (OSError, json.JSONDecodeError, TypeError) as e:
            raise ConfigError(f"{path}: not a prune plan ({e})") from e

    def check_source(self, cfg: ModelConfig) -> None:
        src = self.source_config
        for k in ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                  "num_query_groups", "head_dim", "vocab_size"):
            if getattr(src, k) != getattr(cfg, k):
                raise ConfigError(f"prune plan is for another model: {k} {getattr(src, k)} "
                                  f"(plan) != {getattr(cfg, k)} (checkpoint)")

    # ------------------------------------------------------------------ index selection
    def head_order(self, layer: int) -> list:
        """Source query-head indices of output layer `layer`, in output order."""
        hpg = self.source["num_attention_heads"] // self.source["num_query_groups"]
        return [g * hpg + h for g, hs in zip(self.keep_groups[layer], self.keep_heads[layer])
                for h in hs]

    def index_for(self, key: str, j: int, layer: Optional[int]):
        """(row index, column index) selecting an HF tensor of spec `key` (j-th of the spec);
        None keeps the whole dimension."""
        d = self.source["head_dim"]
        hidden = None if len(self.keep_hidden) == self.source["hidden_size"] else \
            torch.tensor(self.keep_hidden, dtype=torch.long)

        def blocks(units):
            return torch.tensor([u * d + i for u in units for i in range(d)], dtype=torch.long)
        if key in ("embedding", "output"):
            return None, hidden
        if key in ("input_norm", "mlp_norm", "final_norm"):
            return hidden, None
        if key == "qkv":
            units = self.head_order(layer) if j == 0 else self.keep_groups[layer]
            return blocks(units), hidden
        if key == "proj":
            return hidden, blocks(self.head_order(layer))
        ffn = torch.tensor(self.keep_ffn[layer], dtype=torch.long)
        if key == "fc1":
            return ffn, hidden
        if key == "fc2":
            return hidden, ffn
        raise KeyError(key)


# ---------------------------------------------------------------------------- planning
def _top(scores: torch.Tensor, k: int, candidates=None) -> list:
    """Indices of the k highest scores (among candidates), returned in ascending index order.
    Ties break towards the lower index so plans are reproducible."""
    cand = torch.arange(len(scores)) if candidates is None else torch.as_tensor(candidates)
    s = scores[cand].double()
    order = sorted(range(len(cand)), key=lambda i: (-float(s[i]), int(cand[i])))
    return sorted(int(cand[i]) for i in order[:k])


def _select(scores: torch.Tensor, k: int, tp: int, prune_type: str) -> list:
    n = len(scores)
    if prune_type == "global" or k == n:
        return _top(scores, k)
    per, step = k // tp, n // tp
    return [i for r in range(tp) for i in _top(scores, per, range(r * step, (r + 1) * step))]


def resolve_target(cfg: ModelConfig, t: PruneTarget, tp: int) -> dict:
    """The target shape, validated (every problem is reported before anything is written)."""
    h = t.hidden_size or cfg.hidden_size
    heads = t.num_attention_heads or cfg.num_attention_heads
    mha = cfg.num_query_groups == cfg.num_attention_heads
    groups = t.num_query_groups or (heads if mha else cfg.num_query_groups)
    ffn = t.ffn_hidden_size or cfg.ffn_hidden_size
    for name, new, old in (("hidden size", h, cfg.hidden_size), ("attention heads", heads,
                           cfg.num_attention_heads), ("KV groups", groups, cfg.num_query_groups),
                           ("FFN size", ffn, cfg.ffn_hidden_size)):
        if new > old:
            raise ConfigError(f"target {name} {new} is larger than the source's {old}")
        if new < 1:
            raise ConfigError(f"target {name} must be positive, got {new}")
    if heads % groups:
        raise ConfigError(f"target attention heads {heads} is not a multiple of KV groups {groups}")
    if heads // groups > cfg.heads_per_group:
        raise ConfigError(
            f"target has {heads // groups} heads per KV group, the source only "
            f"{cfg.heads_per_group}: heads can be removed from groups, not added")
    for name, value in (("attention heads", heads), ("KV groups", groups), ("FFN size", ffn)):
        if value % tp:
            raise ConfigError(f"target {name} {value} is not divisible by "
                              f"tensor-model-parallel-size {tp}")
    L = cfg.num_layers
    if t.drop_layers is not None and t.num_layers is not None:
        raise ConfigError("give either --drop-layers or --num-layers-remain, not both")
    if t.drop_layers:
        drop = list(t.drop_layers)
        bad = [i for i in drop if not 0 <= i < L]
        if bad:
            raise ConfigError(f"--drop-layers {bad} out of range: the model has layers 0..{L - 1}")
        if len(set(drop)) != len(drop):
            raise ConfigError(f"--drop-layers lists a layer twice: {drop}")
        if len(drop) >= L:
            raise ConfigError("--drop-layers would remove every layer")
    if t.num_layers is not None and not 1 <= t.num_layers <= L:
        raise ConfigError(f"--num-layers-remain {t.num_layers} must be in 1..{L}")
    return dict(hidden_size=h, num_attention_heads=heads, num_query_groups=groups,
                ffn_hidden_size=ffn)


def layers_chosen_by(cfg: ModelConfig, t: PruneTarget) -> str:
    """What chooses the kept layers, as the plan records it."""
    if t.drop_layers:
        return "drop-layers"
    if t.num_layers is None or t.num_layers == cfg.num_layers:
        return "none"
    return t.layer_method


def _keep_layers(cfg: ModelConfig, t: PruneTarget, scores: ImportanceScores) -> list:
    L = cfg.num_layers
    if t.layer_method not in LAYER_METHODS:  # a prune config JSON is not checked by argparse
        raise ConfigError(f"layer method must be one of {LAYER_METHODS}, got {t.layer_method!r}")
    how = layers_chosen_by(cfg, t)
    if how == "drop-layers":
        return [i for i in range(L) if i not in set(t.drop_layers)]
    if how == "none":
        return list(range(L))
    n = t.num_layers
    if t.layer_method == "contiguous":
        ang = scores.meta.get("angular")
        if ang is None:
            raise ConfigError("--layer-method contiguous needs activation scores (angular "
                              "distances between layers): run `megatron-prune importance`")
        ang = torch.as_tensor(ang)
        k = L - n  # drop the block [i, i+k) whose input and output are closest
        i = min(range(L - k + 1), key=lambda i: (float(ang[i, i + k]), i))
        return [j for j in range(L) if not i <= j < i + k]
    if t.layer_method == "perplexity":
        loss = scores.meta.get("layer_loss")
        if loss is None:
            raise ConfigError("--layer-method perplexity needs the calibration loss with each "
                              "layer skipped: run `megatron-prune importance --layer-loss`")
        return _top(torch.as_tensor(loss, dtype=torch.float64), n)  # keep the costliest to skip
    if t.layer_method == "iterative":
        drop = set(removal_order(scores, L - n))
        return [i for i in range(L) if i not in drop]
    if scores.layers is None:
        raise ConfigError(f"--num-layers-remain needs layer scores, which '{scores.method}' "
                          "importance does not give: use activation/taylor/random, or --drop-layers")
    return _top(scores.layers, n)


def removal_order(scores: ImportanceScores, k: int) -> list:
    """The first k layers of the scores' greedy removal order (importance --iterative-layers)."""
    order = scores.meta.get("layer_removal_order")
    if order is None:
        raise ConfigError("--layer-method iterative needs the greedy removal order: run "
                          f"`megatron-prune importance --iterative-layers {k}` (or more)")
    if k > len(order):
        raise ConfigError(f"--layer-method iterative drops {k} layers, but the scores hold the "
                          f"removal order of {len(order)}: run importance with "
                          f"--iterative-layers {k} (or more)")
    return list(order[:k])


def make_plan(cfg: ModelConfig, target: PruneTarget, scores: ImportanceScores,
              prune_type: str = "balance", tp: int = 1, seed: Optional[int] = None) -> PrunePlan:
    if prune_type not in PRUNE_TYPES:
        raise ConfigError(f"--prune-type must be one of {PRUNE_TYPES}, got {prune_type!r}")
    scores.check(cfg)
    scores = with_hidden_aggregation(scores, target.hidden_aggregation)
    if target.layer_method == AUTO_LAYER_METHOD:  # not chosen by prune/choose.py: the default
        target = dataclasses.replace(target, layer_method="block-influence")
    shape = resolve_target(cfg, target, tp)
    keep_layers = _keep_layers(cfg, target, scores)
    hpg_new = shape["num_attention_heads"] // shape["num_query_groups"]
    hpg = cfg.heads_per_group
    keep_hidden = _top(scores.hidden, shape["hidden_size"])
    keep_groups, keep_heads, keep_ffn = [], [], []
    for layer in keep_layers:
        groups = _select(scores.groups[layer], shape["num_query_groups"], tp, prune_type)
        head_scores = scores.heads[layer].reshape(cfg.num_query_groups, hpg)
        keep_groups.append(groups)
        keep_heads.append([_top(head_scores[g], hpg_new) for g in groups])
        keep_ffn.append(_select(scores.ffn[layer], shape["ffn_hidden_size"], tp, prune_type))
    src = cfg
    tgt = cfg.replace(num_layers=len(keep_layers), **shape)
    energy = scores.meta.get("norm_energy")
    scale = norm_scales(torch.as_tensor(energy), keep_hidden, keep_layers) \
        if target.rescale_norms and energy is not None and len(keep_hidden) < cfg.hidden_size \
        else None
    return PrunePlan(source=_cfg_dict(src), target=_cfg_dict(tgt), keep_layers=keep_layers,
                     keep_hidden=keep_hidden, keep_groups=keep_groups, keep_heads=keep_heads,
                     keep_ffn=keep_ffn, method=scores.method, prune_type=prune_type,
                     tensor_parallel=tp, seed=seed,
                     layer_method=layers_chosen_by(cfg, target), norm_scale=scale,
                     meta={"hidden_aggregation": target.hidden_aggregation}
                     if target.hidden_aggregation != "balanced" else {})


def with_hidden_aggregation(scores: ImportanceScores, aggregation: str) -> ImportanceScores:
    """The scores with their hidden field ranking channels as `aggregation` says. `balanced`:
    as computed (for activation scores, each norm's L2 vector divided by its mean, summed:
    importance_hf.hidden_from_norms). `sum`: the norms' raw L2 vectors summed, as ModelOpt's
    Minitron ranks them, from the per-norm vectors activation and auto scores keep
    (meta["norm_l2"]). The result records it in meta, so that a later swap of the hidden field
    (auto's Taylor trial, choose.with_choice) is left alone. On SmolLM2-135M the balanced ranking
    gives the lower calibration loss as pruned, while after distillation Minitron's model (the
    sum) beat ours on LAMBADA where the two differ only in 21 of 432 hidden channels
    (docs/benchmarks.md, "Beside the peers")."""
    if aggregation not in HIDDEN_AGGREGATIONS:
        raise ConfigError(f"--hidden-aggregation must be one of {HIDDEN_AGGREGATIONS}, "
                          f"got {aggregation!r}")
    if aggregation == "balanced" or scores.meta.get("hidden_aggregation") == aggregation:
        return scores
    norms = scores.meta.get("norm_l2")
    if norms is None:
        raise ConfigError(f"--hidden-aggregation sum needs activation or auto scores from "
                          f"importance at this version (per-norm statistics); these are "
                          f"{scores.method} scores without them")
    hidden = torch.as_tensor(norms).double().sum(0).to(scores.hidden.dtype)
    return dataclasses.replace(scores, hidden=hidden,
                               meta={**scores.meta, "hidden_aggregation": aggregation})


def norm_scales(energy: torch.Tensor, keep_hidden: list, keep_layers: list) -> dict:
    """The factor on each kept RMSNorm weight that keeps its output at the unpruned scale.
    RMSNorm divides by the RMS of its input over the channels it has; with hidden channels gone
    that is the RMS of the kept ones, larger than the full RMS because the removed channels
    carried less than their share of the energy (they were chosen for being small). The ratio
    rms_kept / rms_all = sqrt((E_kept / d') / (E_all / d)), with E the sum of x^2 over the
    calibration tokens per channel of the norm's input (`energy` [2L + 1, hidden]: input and
    post-attention norm of every layer, then the final norm), restores the scale on average.
    On SmolLM2-135M at hidden 576 -> 432 the held-out C4 perplexity of the hidden-only prune
    falls from 607 to 336 (docs/benchmarks.md, ablation H)."""
    keep = torch.tensor(keep_hidden, dtype=torch.long)
    ratio = (energy[:, keep].sum(1) / len(keep_hidden)) / (energy.sum(1) / energy.shape[1])
    f = ratio.clamp_min(torch.finfo(torch.float64).tiny).sqrt().tolist()
    return {"layers": [[f[2 * i], f[2 * i + 1]] for i in keep_layers], "final": f[-1]}


def _cfg_dict(cfg: ModelConfig) -> dict:
    return asdict(cfg)
