"""Prune to a size: the shapes that fit a budget, ranked by the importance they keep, the best few
scored on calibration data, the winner pruned.

Users think in sizes ("this 8B as a 4B", "fits in 6 GiB"), not in five dimensions at once.
`search` lists every shape (hidden size, heads per KV group, KV groups, FFN size, layers) that

* fits the budget: parameters within [budget x (1 - tolerance), budget], or bf16 weights plus the
  KV cache of `kv_batch` sequences of `kv_seq_length` tokens within a memory budget;
* loads at the checkpoint's TP/PP: whole heads per KV group, KV groups and FFN divisible by TP,
  layers divisible by PP; and, unless `hf_loadable` is off, hidden divisible by the head count
  (transformers >= 5 refuses other Llama configs even with head_dim given);
* shrinks no width dimension by more than `max_width_prune` and depth by no more than
  `max_depth_prune` (Minitron's search keeps to 40% width and 20% depth by default).

Every candidate gets a cheap proxy from the importance scores already computed: the log of the
share of importance each dimension keeps (hidden channels, KV groups, heads inside groups, FFN
neurons, layers), summed. The `keep` best by proxy are then pruned (one layer at a time,
prune/stream.py) and scored by their calibration loss on a few batches; the lowest loss wins.
Nothing here writes; `plan_for_budget` returns the winner's plan with the whole search recorded
in `plan.meta["search"]`.
"""
from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import asdict, dataclass, field
from typing import Callable, List, Optional

import torch
from tqdm.auto import tqdm

from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.prune.plan import PrunePlan, PruneTarget, make_plan
from megatron_prune.prune.scores import ImportanceScores

_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kKmMbBgGtT]?)\s*$")
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9, "t": 10**12}


def parse_size(text) -> int:
    """A parameter count as users write it: 70M, 4B, 1.5e9, 135_000_000."""
    m = _SIZE.match(str(text).replace("_", ""))
    if not m:
        raise ConfigError(f"not a size: {text!r} (write e.g. 70M, 4B or 1.5e9)")
    return int(round(float(m.group(1)) * _UNITS[m.group(2).lower()]))


@dataclass
class Budget:
    """What the pruned model must fit: a parameter count, or a memory size in bytes for bf16
    weights plus the KV cache of `kv_batch` sequences of `kv_seq_length` tokens."""
    params: Optional[int] = None
    memory_bytes: Optional[int] = None
    kv_seq_length: int = 4096
    kv_batch: int = 1
    tolerance: float = 0.01  # parameter budgets: candidates within this share below it

    def cost(self, cfg: ModelConfig) -> int:
        if self.params is not None:
            return cfg.num_params()
        kv = 2 * cfg.num_layers * cfg.num_query_groups * cfg.head_dim
        return 2 * cfg.num_params() + 2 * kv * self.kv_seq_length * self.kv_batch

    @property
    def limit(self) -> int:
        return self.params if self.params is not None else self.memory_bytes

    def describe(self, value: int) -> str:
        return f"{value / 1e6:.2f}M parameters" if self.params is not None else \
            f"{value / 2**30:.3f} GiB"


@dataclass
class SearchLimits:
    max_width_prune: float = 0.5   # each width dimension keeps at least (1 - this) of itself
    max_depth_prune: float = 0.5
    hidden_step: Optional[int] = None  # hidden sizes tried: multiples of this (None: auto)
    ffn_step: Optional[int] = None     # FFN sizes tried: multiples of this x TP (None: auto)
    hf_loadable: bool = True       # hidden divisible by the head count
    keep: int = 8                  # candidates scored on calibration data

    def steps(self, cfg: ModelConfig) -> tuple:
        """(hidden step, FFN step): given, or powers of two giving at most 64 sizes over the
        whole dimension (at least 16 for hidden, 64 for the FFN)."""
        return (self.hidden_step or _pow2_step(cfg.hidden_size, 16),
                self.ffn_step or _pow2_step(cfg.ffn_hidden_size, 64))


def _pow2_step(n: int, least: int) -> int:
    return max(least, 1 << max(0, (n // 64).bit_length() - 1))


def _kept(n: int, prune: float, step: int = 1) -> list:
    """Sizes from the smallest allowed (n x (1 - prune), rounded up to `step`) to n by `step`,
    and n itself."""
    low = max(step, math.ceil(n * (1 - prune) / step - 1e-9) * step)
    return sorted(set(range(low, n + 1, step)) | {n})


def enumerate_shapes(cfg: ModelConfig, budget: Budget, limits: SearchLimits, tp: int = 1,
                     pp: int = 1) -> List[ModelConfig]:
    """Every shape within the limits that fits the budget and loads at TP/PP, largest first.

    The cost is linear in the FFN size, so for each (layers, hidden, groups, heads) the FFN
    sizes that fit are solved for, not tried one by one (70B-sized searches stay fast)."""
    w = limits.max_width_prune
    h_step, f_step = limits.steps(cfg)
    f_step *= tp
    ffn_all = [f for f in _kept(cfg.ffn_hidden_size, w, f_step) if f % tp == 0]
    out = []
    for g in [g for g in _kept(cfg.num_query_groups, w) if g % tp == 0]:
        for hpg in _kept(cfg.heads_per_group, w):
            for h in _kept(cfg.hidden_size, w, h_step):
                if limits.hf_loadable and h % (g * hpg):
                    continue
                for n in [n for n in _kept(cfg.num_layers, limits.max_depth_prune) if n % pp == 0]:
                    out += _fitting_ffn(cfg, budget, ffn_all, num_layers=n, hidden_size=h,
                                        num_query_groups=g, num_attention_heads=g * hpg)
    return sorted(out, key=lambda c: (-budget.cost(c), _key(c)))


def _fitting_ffn(cfg: ModelConfig, budget: Budget, ffn: list, **shape) -> list:
    """The shapes of this (layers, hidden, groups, heads) over the FFN sizes that fit."""
    c1, c2 = cfg.replace(ffn_hidden_size=1, **shape), cfg.replace(ffn_hidden_size=2, **shape)
    slope = budget.cost(c2) - budget.cost(c1)
    base = budget.cost(c1) - slope
    lo, hi = (1 - budget.tolerance) * budget.limit, budget.limit
    return [cfg.replace(ffn_hidden_size=f, **shape) for f in ffn if lo <= base + slope * f <= hi]


def _key(c: ModelConfig) -> tuple:
    return (c.num_layers, c.hidden_size, c.num_query_groups, c.num_attention_heads,
            c.ffn_hidden_size)


def check_budget(cfg: ModelConfig, budget: Budget, limits: SearchLimits, tp: int, pp: int,
                 shapes: list) -> None:
    """Refuse a budget the model already meets, or one no allowed shape can meet."""
    if budget.cost(cfg) <= budget.limit:
        raise ConfigError(f"the model is already within the budget "
                          f"({budget.describe(budget.cost(cfg))} <= "
                          f"{budget.describe(budget.limit)}): nothing to prune")
    if shapes:
        return
    smallest = enumerate_shapes(cfg, Budget(params=10**18, tolerance=1.0), limits, tp, pp) \
        if budget.params is not None else []
    low = min((budget.cost(c) for c in smallest), default=None)
    reach = f"; the smallest allowed shape has {budget.describe(low)}" if low else ""
    raise ConfigError(
        f"no shape within --max-width-prune {limits.max_width_prune} / --max-depth-prune "
        f"{limits.max_depth_prune} (TP={tp}, PP={pp}) fits {budget.describe(budget.limit)} "
        f"within {budget.tolerance:.0%}{reach}: raise the limits or the budget")


def _share(scores: torch.Tensor, k: int) -> float:
    """The share of (non-negative) importance the k highest scores hold."""
    s = scores.double().clamp_min(0).flatten()
    total = float(s.sum())
    return float(s.topk(k).values.sum()) / total if total > 0 else k / len(s)


def _head_share(heads: torch.Tensor, groups: torch.Tensor, g: int, hpg: int) -> float:
    """The share of a layer's head importance kept by its g best groups with their hpg best
    heads each (as make_plan keeps them)."""
    h = heads.double().clamp_min(0).reshape(len(groups), -1)
    total = float(h.sum())
    if total <= 0:
        return g * hpg / h.numel()
    best = groups.double().topk(g).indices
    return float(h[best].topk(hpg, dim=1).values.sum()) / total


def proxy(cfg: ModelConfig, c: ModelConfig, scores: ImportanceScores) -> float:
    """Sum over dimensions of the log share of importance the shape keeps (0 = keeps all); the
    per-layer dimensions (heads, FFN) are averaged over the layers it keeps."""
    if scores.layers is not None:
        layers = scores.layers.double().topk(c.num_layers).indices.tolist()
        total = math.log(max(_share(scores.layers, c.num_layers), 1e-300))
    else:
        layers, total = range(c.num_layers), 0.0
    total += math.log(max(_share(scores.hidden, c.hidden_size), 1e-300))
    hpg = c.num_attention_heads // c.num_query_groups
    for i in layers:
        kept = (_head_share(scores.heads[i], scores.groups[i], c.num_query_groups, hpg),
                _share(scores.ffn[i], c.ffn_hidden_size))
        total += sum(math.log(max(p, 1e-300)) for p in kept) / len(layers)
    return total


@dataclass
class Candidate:
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_query_groups: int
    ffn_hidden_size: int
    params: int
    cost: int
    proxy: float
    loss: Optional[float] = None

    def target(self, how: Optional[PruneTarget] = None) -> PruneTarget:
        """This shape, pruned as `how` says (layer method, norm rescaling, hidden aggregation,
        refit, criteria; its own shape fields are replaced)."""
        return dataclasses.replace(how or PruneTarget(), hidden_size=self.hidden_size,
                                   num_attention_heads=self.num_attention_heads,
                                   num_query_groups=self.num_query_groups,
                                   ffn_hidden_size=self.ffn_hidden_size,
                                   num_layers=self.num_layers, drop_layers=None)


@dataclass
class SearchResult:
    budget: dict
    limits: dict
    shapes: int                  # how many shapes fit
    candidates: List[Candidate] = field(default_factory=list)  # scored, best loss first
    winner: Optional[Candidate] = None
    # every shape that fit, best proxy first: [layers, hidden, heads, groups, ffn, params, proxy]
    ranked: List[list] = field(default_factory=list)

    def as_dict(self) -> dict:
        return asdict(self)


def rank_candidates(cfg: ModelConfig, shapes: list, scores: ImportanceScores,
                    budget: Budget) -> List[Candidate]:
    """Every shape as a Candidate, the most importance kept first."""
    return sorted((Candidate(c.num_layers, c.hidden_size, c.num_attention_heads,
                             c.num_query_groups, c.ffn_hidden_size, c.num_params(),
                             budget.cost(c), proxy(cfg, c, scores)) for c in shapes),
                  key=lambda k: (-k.proxy, -k.cost))


def search(cfg: ModelConfig, scores: ImportanceScores, budget: Budget, limits: SearchLimits,
           loss_of: Optional[Callable[[PrunePlan], float]], *, tp: int = 1, pp: int = 1,
           prune_type: str = "balance", how: Optional[PruneTarget] = None,
           progress: bool = True) -> SearchResult:
    """The shapes that fit, the `limits.keep` best by proxy, each scored by `loss_of(plan)`
    (None: by proxy alone, as --dry-run does), each pruned as `how` says (Candidate.target)."""
    shapes = enumerate_shapes(cfg, budget, limits, tp, pp)
    check_budget(cfg, budget, limits, tp, pp, shapes)
    ranked = rank_candidates(cfg, shapes, scores, budget)
    cands = ranked[:limits.keep]
    if loss_of is not None:
        for c in tqdm(cands, desc="scoring candidates", unit="shape", disable=not progress):
            c.loss = loss_of(make_plan(cfg, c.target(how), scores, prune_type=prune_type, tp=tp))
        cands.sort(key=lambda c: (c.loss, -c.proxy))
    return SearchResult(budget=asdict(budget), limits=asdict(limits), shapes=len(shapes),
                        candidates=cands, winner=cands[0],
                        ranked=[[c.num_layers, c.hidden_size, c.num_attention_heads,
                                 c.num_query_groups, c.ffn_hidden_size, c.params,
                                 round(c.proxy, 6)] for c in ranked])


def table(found: dict, cfg: ModelConfig) -> str:
    """A search (as plan.meta["search"] records it) as the console shows it: the candidates
    scored, the winner first and marked."""
    rows = [f"{len(found['candidates'])} of {found['shapes']} shapes that fit were scored "
            f"(source: {cfg.num_params() / 1e6:.2f}M parameters)",
            f"  {'layers':>6} {'hidden':>6} {'heads':>5} {'groups':>6} {'ffn':>6} "
            f"{'params':>9} {'proxy':>8} {'calib loss':>10}"]
    for c in found["candidates"]:
        mark = "*" if c == found["winner"] else " "
        loss = "-" if c["loss"] is None else f"{c['loss']:.4f}"
        rows.append(f"{mark} {c['num_layers']:>6} {c['hidden_size']:>6} "
                    f"{c['num_attention_heads']:>5} {c['num_query_groups']:>6} "
                    f"{c['ffn_hidden_size']:>6} {c['params'] / 1e6:>8.2f}M {c['proxy']:>8.3f} "
                    f"{loss:>10}")
    return "\n".join(rows)
