"""Loading this project's checkpoints (legacy rank files or torch_dist) into a built GPTModel piece.

megatron-core is imported lazily inside the functions: importing this module stays cheap.
"""
from __future__ import annotations

import logging
from typing import Optional

import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.checkpoint.tensor_io import CheckpointReadError
from megatron_prune.mcore.model import model_impl

log = logging.getLogger(__name__)


def _stage_ranges(model, cfg: ModelConfig, pp: int) -> list:
    info = getattr(model, "mp_stage_info", {}) or {}
    counts = layout.stage_layer_counts(cfg.num_layers, pp, info.get("first"), info.get("last"))
    return layout.stage_ranges(counts)


def legacy_rank_state(ckpt, cfg: ModelConfig, impl: str, tp: int, pp: int, tp_rank: int,
                      pp_rank: int, ranges, divisible_by: int, reshard: bool = True) -> dict:
    """The state dict of rank (tp_rank, pp_rank) of a TP x PP model, named for `impl`.

    Read straight from the rank file when the checkpoint has this TP/PP, stage split and vocab
    padding (names translated TE <-> local through `layout`). Otherwise, with `reshard`, the
    shard is cut from the checkpoint's merged tensors through `convert.MegatronSource` (the
    same path as `megatron-prune reshard`, reading only the TP input ranks it needs).
    """
    from megatron_prune.checkpoint.tensor_io import torch_load
    same_layout = ((ckpt.tp, ckpt.pp) == (tp, pp) and list(ckpt.ranges) == list(ranges)
                   and ckpt.divisible_by == divisible_by)
    if not same_layout:
        if not reshard:
            raise ConfigError(
                f"{ckpt.root}: checkpoint is TP={ckpt.tp} PP={ckpt.pp} (stages "
                f"{ckpt.stage_counts}, vocab multiple {ckpt.divisible_by}), the model TP={tp} "
                f"PP={pp} (stages {[e - s for s, e in ranges]}, vocab multiple {divisible_by})")
        from megatron_prune.checkpoint.convert import MegatronSource, megatron_rank_state
        return megatron_rank_state(MegatronSource(ckpt), cfg, impl, tp, tp_rank, pp_rank,
                                   ranges, ckpt.dtype, divisible_by)
    path = ckpt.files[(tp_rank, pp_rank)]
    state = torch_load(path)["model"]
    if ckpt.impl == impl:
        return state
    src = layout.stage_entries(cfg, ckpt.impl, pp_rank, ranges)
    dst = layout.stage_entries(cfg, impl, pp_rank, ranges)
    rename = {s.name: d.name for s, d in zip(src, dst)}
    src_extra = set(layout.extra_state_names(ckpt.impl, pp_rank, ranges))
    out = {}
    for name, value in state.items():
        if name in rename:
            out[rename[name]] = value
        elif name not in src_extra:
            out[name] = value  # unknown: the strict load below names it
    return out


def load_legacy_into_model(model, ckpt_dir, *, tp_rank: Optional[int] = None,
                           pp_rank: Optional[int] = None, strict: bool = True,
                           reshard: bool = True):
    """Load this rank's piece of a legacy Megatron checkpoint into `model` (strict by default).

    Tensor names of either layer spec are accepted (TE-named files into a local-spec model and
    back, via `layout`); `_extra_state` entries the model has are taken from the file when it has
    the same spec, else kept from the model (mcore's own layers save None there). A checkpoint
    of another TP/PP/stage split is resharded on the fly (`reshard=False` refuses it instead).
    Returns the opened `LegacyCheckpoint`.
    """
    from megatron.core import parallel_state

    from megatron_prune.checkpoint.legacy import LegacyCheckpoint

    ckpt = LegacyCheckpoint(ckpt_dir)
    cfg = ckpt.config
    info = getattr(model, "mp_stage_info", None) or {}
    tp = info.get("tp") or parallel_state.get_tensor_model_parallel_world_size()
    pp = info.get("pp") or parallel_state.get_pipeline_model_parallel_world_size()
    tp_rank = parallel_state.get_tensor_model_parallel_rank() if tp_rank is None else tp_rank
    pp_rank = parallel_state.get_pipeline_model_parallel_rank() if pp_rank is None else pp_rank
    impl = model_impl(model)
    ranges = _stage_ranges(model, cfg, pp)
    state = legacy_rank_state(ckpt, cfg, impl, tp, pp, tp_rank, pp_rank, ranges,
                              info.get("divisible_by", ckpt.divisible_by), reshard=reshard)

    own = model.state_dict(keep_vars=True)
    for name, value in own.items():
        if name.endswith("._extra_state") and name not in state:
            state[name] = value
    if strict:
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        if missing or unexpected:
            raise CheckpointReadError(
                f"{ckpt.files[(tp_rank, pp_rank)]}: does not match the model "
                f"({impl} spec, TP={tp} PP={pp} stage {pp_rank}): missing {missing[:8]}, "
                f"unexpected {unexpected[:8]}")
        for name, value in state.items():
            if torch.is_tensor(value) and torch.is_tensor(own[name]) \
                    and tuple(value.shape) != tuple(own[name].shape):
                raise CheckpointReadError(
                    f"{ckpt.files[(tp_rank, pp_rank)]}: {name} has shape {tuple(value.shape)}, "
                    f"the model {tuple(own[name].shape)}")
    model.load_state_dict(state, strict=strict)
    return ckpt


def load_checkpoint_into_model(model, ckpt_dir, **kwargs):
    """Load either checkpoint format into `model`: legacy rank files through
    `load_legacy_into_model`; torch_dist through megatron-core's own loader, which reshards on
    load. Returns the opened checkpoint."""
    from megatron_prune.checkpoint.megatron_dirs import checkpoint_format
    if checkpoint_format(ckpt_dir) == "torch":
        return load_legacy_into_model(model, ckpt_dir, **kwargs)
    from megatron.core import dist_checkpointing

    from megatron_prune.checkpoint.torch_dist_read import DistCheckpoint
    ckpt = DistCheckpoint(ckpt_dir)
    loaded = dist_checkpointing.load({"model": model.sharded_state_dict()}, str(ckpt.dir))
    model.load_state_dict(loaded["model"], strict=True)
    return ckpt


