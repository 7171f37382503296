"""Applying a prune plan: a source that serves the pruned model's HF-form tensors.

`PrunedSource` wraps any source (an HF directory, or a Megatron checkpoint read shard by shard)
and answers each request of the writers by index selection on the source tensor. Along the TP
split dim it fetches only the span the kept indices cover, so with a `balance` plan each output
rank reads just the matching input rank: the prune runs directly on the shards, one output rank
file at a time. The same writers as conversion then lay the result out at any TP/PP.
"""
from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Tuple

import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.checkpoint.convert import HFSource, open_source, write_hf, write_megatron
from megatron_prune.checkpoint.fsutil import atomic_output_dir, check_output
from megatron_prune.checkpoint.hf import HFCheckpoint, copy_tokenizer, keep_tokenizer
from megatron_prune.prune.choose import calibration_rows, choose, shrunk_axes
from megatron_prune.prune.importance_hf import METHODS as DATA_METHODS
from megatron_prune.prune.plan import PrunePlan, PruneTarget, make_plan, with_hidden_aggregation
from megatron_prune.prune.reconstruct import PROJECTIONS, Reconstruction, fit, fit_rows
from megatron_prune.prune.stream import LayerStream
from megatron_prune.prune.scores import ImportanceScores, magnitude_scores, random_scores
from megatron_prune.prune.search import Budget, SearchLimits, search

log = logging.getLogger(__name__)
PLAN_FILE = "prune_plan.json"
NORM_KEYS = ("input_norm", "mlp_norm", "final_norm")  # plan.norm_scale's order within a layer


class PrunedSource:
    """`recon`: refit the kept columns of o_proj / down_proj (prune/reconstruct.py)."""

    def __init__(self, source, plan: PrunePlan, recon: Optional[Reconstruction] = None):
        plan.check_source(source.config)
        self.source = source
        self.plan = plan
        self.recon = recon
        self.config: ModelConfig = plan.target_config
        self.dtype = source.dtype
        self._where = {}
        for spec, layer in layout.iter_hf_entries(self.config):
            for j, n in enumerate(spec.hf_names(layer)):
                self._where[n] = (spec, layer, j)

    def keys(self):
        return list(self._where)

    def shape(self, name) -> tuple:
        spec, _, j = self._where[name]
        return layout.hf_shape(spec, j, self.config)

    def get(self, name, dim=None, start=0, end=None) -> torch.Tensor:
        spec, layer, j = self._where[name]
        src_layer = None if layer is None else self.plan.keep_layers[layer]
        src_name = spec.hf_names(src_layer)[j]
        idx = list(self.plan.index_for(spec.key, j, layer))
        if self.recon is not None and spec.key in PROJECTIONS:
            t = self.recon.weight(spec.key, src_layer, self.source.get(src_name), *idx)
            return t if dim is None else t.narrow(dim, start, (t.shape[dim] if end is None
                                                               else end) - start)
        if dim is not None:  # the writer asks for a range of the *pruned* tensor
            end = self.shape(name)[dim] if end is None else end
            idx[dim] = torch.arange(start, end) if idx[dim] is None else idx[dim][start:end]
        fetch_dim = spec.split_dim if spec.split_dim is not None and \
            spec.split_dim < len(idx) and idx[spec.split_dim] is not None else None
        if fetch_dim is not None and len(idx[fetch_dim]):
            lo, hi = int(idx[fetch_dim].min()), int(idx[fetch_dim].max()) + 1
            t = self.source.get(src_name, fetch_dim, lo, hi)
            idx[fetch_dim] = idx[fetch_dim] - lo
        else:
            t = self.source.get(src_name)
        for d, ix in enumerate(idx):
            if ix is not None and d < t.dim():
                t = t.index_select(d, ix)
        return self._rescaled(t, spec.key, layer)

    def _rescaled(self, t: torch.Tensor, key: str, layer: Optional[int]) -> torch.Tensor:
        """A kept norm weight times its plan.norm_scale factor (computed in fp32)."""
        scale = self.plan.norm_scale
        if scale is None or key not in NORM_KEYS:
            return t
        f = scale["final"] if key == "final_norm" else \
            scale["layers"][layer][NORM_KEYS.index(key)]
        return (t.float() * f).to(t.dtype)

    def group(self, spec, layer) -> dict:
        return {n: self.get(n) for n in spec.hf_names(layer)}


def compute_scores(source, cfg: ModelConfig, importance: str, scores_file: Optional[str],
                   seed: int) -> ImportanceScores:
    if scores_file:
        scores = ImportanceScores.load(scores_file)
        if importance not in (None, scores.method):
            log.info("using %s scores from %s (--importance %s ignored)", scores.method,
                     scores_file, importance)
        return scores
    if importance == "random":
        return random_scores(cfg, seed)
    if importance == "magnitude":
        return magnitude_scores(source, cfg)
    raise ConfigError(f"--importance {importance} needs --scores FILE from "
                      "`megatron-prune importance` (it measures activations on data)")


@dataclass
class SizeSearch:
    """Prune to a size: the budget, how far each dimension may shrink, and the calibration
    batches candidates are scored on (None: ranked by the importance they keep only)."""
    budget: Budget
    limits: SearchLimits
    batches: Optional[torch.Tensor] = None
    micro_batch: int = 4
    dry_run: bool = False


def plan_for(source, target: PruneTarget, importance: str, scores_file, prune_type: str,
             tp: int, seed: int, plan_file=None, size: Optional[SizeSearch] = None,
             pp: int = 1) -> Tuple[PrunePlan, Optional[Reconstruction]]:
    """The plan, and the reconstruction its writer applies (None: kept columns copied)."""
    cfg = source.config
    if plan_file:
        plan = PrunePlan.load(plan_file)
        plan.check_source(cfg)
        return plan, _replayed_reconstruction(source, plan, plan_file, scores_file, target)
    # (before auto's trials, so its Taylor trial for the hidden channels replaces this ranking)
    scores = with_hidden_aggregation(compute_scores(source, cfg, importance, scores_file, seed),
                                     target.hidden_aggregation)
    if target.criteria and scores.method != "auto":
        raise ConfigError(f"--auto-criteria goes with auto scores; {scores_file or importance} "
                          f"holds {scores.method} scores")
    recon = reconstruction_for(source, scores, target, size)
    if size is not None:
        plan = plan_for_budget(source, size, scores, target, prune_type, tp, pp, seed, recon)
    elif scores.method == "auto":
        loss_of = _calibration_loss(source, calibration_rows(scores), 4, recon)
        plan = choose(cfg, target, scores, loss_of, prune_type=prune_type, tp=tp, seed=seed)[0]
    else:
        plan = make_plan(cfg, target, scores, prune_type=prune_type, tp=tp, seed=seed)
    if recon is not None:
        plan.meta["reconstruct"] = recon.record()
    return plan, recon


def reconstruction_for(source, scores: ImportanceScores, target: PruneTarget,
                       size: Optional[SizeSearch]) -> Optional[Reconstruction]:
    """Refit o_proj / down_proj when heads or FFN neurons may go and the scores carry
    calibration rows (every data-based `importance` run stores them)."""
    cfg = source.config
    if not target.reconstruct:
        return None
    if size is None and not {"groups", "heads", "ffn"} & set(shrunk_axes(cfg, target)):
        return None  # nothing feeds o_proj / down_proj less than before
    rows = fit_rows(scores)
    if rows is None:
        if scores.method in DATA_METHODS:
            log.warning("the %s scores file holds no calibration rows (written before "
                        "reconstruction existed): kept o_proj/down_proj columns are copied, not "
                        "refitted; re-run `importance` to refit them", scores.method)
        return None
    log.info("reconstruction: measuring o_proj/down_proj input Grams on %d calibration rows",
             len(rows))
    return fit(source, rows)


def _replayed_reconstruction(source, plan: PrunePlan, plan_file, scores_file,
                             target: PruneTarget) -> Optional[Reconstruction]:
    """A saved plan's reconstruction, redone from the same scores file's calibration rows."""
    if not plan.meta.get("reconstruct") or not target.reconstruct:
        return None
    rows = fit_rows(ImportanceScores.load(scores_file)) if scores_file else None
    if rows is None:
        raise ConfigError(f"{plan_file} refitted o_proj/down_proj on calibration rows: give the "
                          "--scores file it was planned with to redo that, or "
                          "--no-reconstruct to copy the kept columns")
    recon = fit(source, rows)
    if recon.record() != plan.meta["reconstruct"]:
        raise ConfigError(f"--scores holds other calibration rows than {plan_file} was "
                          f"refitted on ({recon.record()} vs {plan.meta['reconstruct']})")
    return recon


def plan_for_budget(source, size: SizeSearch, scores: ImportanceScores, how: PruneTarget,
                    prune_type: str, tp: int, pp: int, seed: int,
                    recon: Optional[Reconstruction] = None) -> PrunePlan:
    """The search's winner as a plan; the whole search is recorded in plan.meta["search"].
    `how` says how each shape is pruned (layer method, norm rescaling, hidden aggregation, ...;
    its shape fields are not used)."""
    cfg = source.config
    limits = size.limits
    if scores.layers is None and limits.max_depth_prune > 0:
        log.warning("%s importance gives no layer scores: searching width only", scores.method)
        limits = dataclasses.replace(limits, max_depth_prune=0.0)
    if size.batches is None and scores.method == "auto":  # auto scores carry their own
        size = dataclasses.replace(size, batches=calibration_rows(scores))
    if size.batches is None:
        log.warning("no search data: candidates are ranked by the importance they keep only")
    loss_of = None if size.batches is None else \
        _calibration_loss(source, size.batches, size.micro_batch, recon)
    result = search(cfg, scores, size.budget, limits, loss_of, tp=tp, pp=pp,
                    prune_type=prune_type, how=how)
    winner = result.winner.target(how)
    if scores.method == "auto" and loss_of is not None:
        plan = choose(cfg, winner, scores, loss_of, prune_type=prune_type, tp=tp, seed=seed)[0]
    else:
        plan = make_plan(cfg, winner, scores, prune_type=prune_type, tp=tp, seed=seed)
    plan.meta["search"] = result.as_dict()
    return plan


def _calibration_loss(source, batches: torch.Tensor, micro_batch: int,
                      recon: Optional[Reconstruction] = None):
    """plan -> the mean LM loss of the source pruned by it on the batches, one pruned decoder
    layer at a time (never the whole candidate model: it would be fp32)."""
    def loss_of(plan: PrunePlan) -> float:
        stream = LayerStream(PrunedSource(source, plan, recon), batches, micro_batch)
        return stream.run(progress=False).mean_loss()
    return loss_of


def prune_megatron(load, save, target: PruneTarget, *, importance="random", scores=None,
                   prune_type="balance", seed=1234, plan_file=None, pp=None, first=None,
                   last=None, force=False, size: Optional[SizeSearch] = None) -> PrunePlan:
    """Prune a Megatron checkpoint at its own TP (and its PP, unless another is given), to the
    target shape or (`size`) to the best shape for a budget."""
    check_output(save, force)
    source = open_source(load)
    if isinstance(source, HFSource):
        raise ConfigError(f"--load {load} is a Hugging Face directory; use prune-hf")
    ckpt = source.ckpt
    pp = pp or ckpt.pp
    plan, recon = plan_for(source, target, importance, scores, prune_type, ckpt.tp, seed,
                           plan_file, size, pp if first is None and last is None else 1)
    if size is not None and size.dry_run:
        return plan
    cfg = plan.target_config
    if first is None and last is None and pp == ckpt.pp and cfg.num_layers == ckpt.config.num_layers:
        first, last = _uneven_split(ckpt.stage_counts)  # keep the input's stage split
    counts = layout.stage_layer_counts(cfg.num_layers, pp, first, last)
    layout.check_parallel(cfg, ckpt.tp, counts)
    with atomic_output_dir(save, force) as tmp:
        write_megatron(PrunedSource(source, plan, recon), cfg, tmp, tp=ckpt.tp, pp=pp,
                       impl=ckpt.impl, dtype=ckpt.dtype, divisible_by=ckpt.divisible_by,
                       ckpt_format=ckpt.format, first=first, last=last,
                       iteration=ckpt.iteration, args_base=ckpt.args)
        plan.save(tmp / PLAN_FILE)
        keep_tokenizer(load, tmp)
    return plan


def _uneven_split(counts) -> tuple:
    """(first, last) flags that reproduce a stage split, or (None, None) when it is even."""
    if len(set(counts)) <= 1:
        return None, None
    middle = counts[1:-1]
    if len(set(middle)) <= 1 and (not middle or middle[0] == counts[0]):
        return None, counts[-1]
    return counts[0], counts[-1]


def prune_hf(hf_dir, save, target: Optional[PruneTarget] = None, *, importance="random",
             scores=None, prune_type="balance", tp=1, seed=1234, plan_file=None,
             force=False, size: Optional[SizeSearch] = None) -> PrunePlan:
    """Prune an HF checkpoint (real weights, tensor by tensor); tokenizer files are copied."""
    check_output(save, force)
    source = HFSource(HFCheckpoint(hf_dir))
    plan, recon = plan_for(source, target or PruneTarget(), importance, scores, prune_type, tp,
                           seed, plan_file, size)
    if size is not None and size.dry_run:
        return plan
    with atomic_output_dir(save, force) as tmp:
        write_hf(PrunedSource(source, plan, recon), plan.target_config, tmp, source.dtype)
        copy_tokenizer(Path(hf_dir), tmp)
        plan.save(tmp / PLAN_FILE)
    return plan
