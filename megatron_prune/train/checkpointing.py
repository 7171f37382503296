"""Training checkpoints in the project's legacy Megatron layout, and exact resume from them.

    SAVE/latest_checkpointed_iteration.txt                      (written last)
    SAVE/iter_{it:07d}/mp_rank_{tp:02d}[_{pp:03d}]/model_optim_rng.pt
    SAVE/iter_{it:07d}/mp_rank_.../distrib_optim.pt             (distributed optimizer only)
    SAVE/tokenizer/                                             (copied from the start checkpoint)

Each rank file is what `pretrain_gpt.py --ckpt-format torch` writes — `args` (model fields from
`ModelConfig.to_megatron_args`, plus `iteration`, `consumed_train_samples`, ...),
`checkpoint_version`, `iteration`, `model` — and, for resuming, `optimizer`,
`opt_param_scheduler`, `rng_state` (one entry per data-parallel rank) and `train_state`
(consumed samples and tokens, early-stopping state). So `megatron-prune megatron-to-hf`,
`reshard`, `prune` and Megatron-LM itself read it. Data-parallel rank 0 of each model-parallel
rank writes its file; the tracker is written after a barrier, so a run killed while saving
leaves the previous checkpoint as the latest.
"""
from __future__ import annotations

import argparse
import logging
import os
import random
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.distributed as dist

from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.checkpoint.legacy import write_rank_file
from megatron_prune.checkpoint.megatron_dirs import (TRACKER, iter_dir_name, rank_dir_name,
                                                     read_tracker)
from megatron_prune.checkpoint.tensor_io import torch_load

log = logging.getLogger(__name__)

RANK_FILE = "model_optim_rng.pt"
DISTRIB_OPTIM_FILE = "distrib_optim.pt"


@dataclass
class TrainState:
    iteration: int = 0
    consumed_train_samples: int = 0
    consumed_tokens: int = 0
    best_val_loss: Optional[float] = None
    evals_without_improvement: int = 0
    extra: dict = field(default_factory=dict)


# ---------------------------------------------------------------------------- RNG
def rng_state() -> dict:
    from megatron.core import tensor_parallel
    np_state = np.random.get_state()
    state = {"random_rng_state": random.getstate(),
             "np_rng_state": (np_state[0], np_state[1].tolist(), *np_state[2:]),
             "torch_rng_state": torch.get_rng_state(),
             "rng_tracker_states": tensor_parallel.get_cuda_rng_tracker().get_states()}
    if torch.cuda.is_available():
        state["cuda_rng_state"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    from megatron.core import tensor_parallel
    random.setstate(_tuples(state["random_rng_state"]))
    kind, keys, *rest = state["np_rng_state"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
    torch.set_rng_state(state["torch_rng_state"])
    if torch.cuda.is_available() and "cuda_rng_state" in state:
        torch.cuda.set_rng_state(state["cuda_rng_state"])
    tensor_parallel.get_cuda_rng_tracker().set_states(state["rng_tracker_states"])


def _tuples(x):
    return tuple(_tuples(v) for v in x) if isinstance(x, (list, tuple)) else x


# ---------------------------------------------------------------------------- save
def megatron_args(cfg: ModelConfig, *, tp: int, pp: int, dtype, divisible_by: int, impl: str,
                  first, last, base: Optional[argparse.Namespace], state: TrainState,
                  training: dict) -> argparse.Namespace:
    args = cfg.to_megatron_args(tp=tp, pp=pp, dtype=dtype, divisible_by=divisible_by,
                                transformer_impl=impl, ckpt_format="torch",
                                first_stage_layers=first, last_stage_layers=last, base=base)
    vars(args).update(training)
    args.iteration = state.iteration
    args.consumed_train_samples = state.consumed_train_samples
    args.consumed_valid_samples = 0
    return args


def save_checkpoint(save_dir, *, model, optimizer, scheduler, state: TrainState,
                    args: argparse.Namespace, save_optim: bool = True,
                    tokenizer_dir: Optional[Path] = None,
                    plan_file: Optional[Path] = None, model_state: Optional[dict] = None,
                    extra: Optional[dict] = None) -> Path:
    """Collective: every rank calls it. Returns the iteration directory. `plan_file`: the
    prune plan of the weights' source, kept beside them (what the model was pruned from).
    `model_state`: the `model` entry, when it is not the module's own state dict (LoRA saves
    the merged weights); `extra`: more entries of the rank file (LoRA's `lora`)."""
    from megatron.core import parallel_state as ps
    root = Path(save_dir)
    it_dir = root / iter_dir_name(state.iteration)
    tp_rank, pp_rank = ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank()
    pp = ps.get_pipeline_model_parallel_world_size()
    dp_rank = ps.get_data_parallel_rank()
    rank_dir = it_dir / rank_dir_name(tp_rank, pp_rank, pp)

    # Every data-parallel rank's RNG state goes into the file (each may differ).
    states = [None] * ps.get_data_parallel_world_size()
    dist.all_gather_object(states, rng_state(), group=ps.get_data_parallel_group())
    distributed = getattr(optimizer, "distributed", False)
    if save_optim and distributed:
        rank_dir.mkdir(parents=True, exist_ok=True)
        # collective over the data-parallel group; written by its rank 0
        optimizer.save_parameter_state(str(rank_dir / DISTRIB_OPTIM_FILE))
    if dp_rank == 0:
        entries = {"rng_state": states, "opt_param_scheduler": scheduler.state_dict(),
                   "train_state": asdict(state), **(extra or {})}
        if save_optim:
            entries["optimizer"] = optimizer.state_dict()
        if model_state is None:
            model_state = (model.module if hasattr(model, "module") else model).state_dict()
        tmp = rank_dir / (RANK_FILE + ".tmp")
        write_rank_file(tmp, args, model_state, state.iteration, extra=entries)
        os.replace(tmp, rank_dir / RANK_FILE)
    dist.barrier()
    if dist.get_rank() == 0:
        if tokenizer_dir is not None and Path(tokenizer_dir).is_dir() \
                and Path(tokenizer_dir).resolve() != (root / "tokenizer").resolve():
            shutil.copytree(tokenizer_dir, root / "tokenizer", dirs_exist_ok=True)
        if plan_file is not None:
            kept = root / Path(plan_file).name
            if Path(plan_file).resolve() != kept.resolve():
                shutil.copyfile(plan_file, kept)
        tmp = root / (TRACKER + ".tmp")
        tmp.write_text(str(state.iteration))
        os.replace(tmp, root / TRACKER)
    dist.barrier()
    return it_dir


# ---------------------------------------------------------------------------- resume
def has_checkpoint(path) -> bool:
    return path is not None and (Path(path) / TRACKER).is_file()


def is_training_checkpoint(path) -> bool:
    """Was it written by this trainer (holds the training state to resume from)? The trainer
    writes the legacy format only: a torch_dist checkpoint (Megatron-LM's default) is not, and
    the weights loader then says how to convert it."""
    from megatron_prune.checkpoint.legacy import LegacyCheckpoint
    from megatron_prune.checkpoint.megatron_dirs import checkpoint_format
    if checkpoint_format(path) != "torch":
        return False
    ckpt = LegacyCheckpoint(path)
    return ckpt.iteration != "release" and "train_state" in torch_load(ckpt.files[(0, 0)])


def this_rank_file(root) -> Path:
    """This rank's file of the latest checkpoint in `root`."""
    from megatron.core import parallel_state as ps
    root = Path(root)
    return root / iter_dir_name(read_tracker(root)) / rank_dir_name(
        ps.get_tensor_model_parallel_rank(), ps.get_pipeline_model_parallel_rank(),
        ps.get_pipeline_model_parallel_world_size()) / RANK_FILE


def load_training_state(path, *, model, optimizer, scheduler, load_optim: bool = True,
                        load_rng: bool = True) -> TrainState:
    """Resume everything but the model weights (loaded by `mcore.load.load_legacy_into_model`,
    which checks the shapes) from this rank's file of the latest checkpoint in `path`."""
    from megatron.core import parallel_state as ps
    root = Path(path)
    pp = ps.get_pipeline_model_parallel_world_size()
    f = this_rank_file(root)
    rank_dir = f.parent
    if not f.is_file():
        raise ConfigError(f"{root}: no {f.relative_to(root)}: the checkpoint was saved at "
                          "another TP/PP; resume at the same TP/PP, or start a new run from it "
                          "with --finetune (weights are resharded, optimizer state is not)")
    obj = torch_load(f, mmap_=False)
    saved_tp = getattr(obj["args"], "tensor_model_parallel_size", None)
    saved_pp = getattr(obj["args"], "pipeline_model_parallel_size", None)
    if (saved_tp, saved_pp) != (ps.get_tensor_model_parallel_world_size(), pp):
        raise ConfigError(f"{root}: saved at TP={saved_tp} PP={saved_pp}; resume at the same "
                          "sizes, or pass --finetune to take only the (resharded) weights")
    state = TrainState(**obj["train_state"])
    scheduler.load_state_dict(obj["opt_param_scheduler"])
    if load_optim:
        if "optimizer" not in obj:
            raise ConfigError(f"{f}: no optimizer state (saved with --no-save-optim); pass "
                              "--no-load-optim")
        from megatron_prune.train.optim import TorchOptimizer, is_cpu_state
        saved = obj["optimizer"]
        saved_algorithm = getattr(obj["args"], "optimizer", "adam")
        if saved_algorithm != getattr(optimizer, "algorithm", "adam"):
            raise ConfigError(f"{f}: optimizer state of --optimizer {saved_algorithm}; resume "
                              f"with it, or pass --no-load-optim to start the optimizer afresh")
        if is_cpu_state(saved) and not isinstance(optimizer, TorchOptimizer):
            raise ConfigError(f"{f}: optimizer state of a CPU run (torch); resume it on the "
                              "CPU, or pass --no-load-optim")
        optimizer.load_state_dict(saved)
        if getattr(optimizer, "distributed", False):
            load_distributed_parameter_state(optimizer, rank_dir / DISTRIB_OPTIM_FILE)
    if load_rng:
        states = obj["rng_state"]
        dp_rank, dp = ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()
        if len(states) != dp:
            log.warning("checkpoint has RNG states of %d data-parallel ranks, the run has %d: "
                        "using rank 0's", len(states), dp)
        set_rng_state(states[dp_rank] if len(states) == dp else states[0])
    return state


def load_distributed_parameter_state(optimizer, path: Path) -> None:
    """megatron-core 0.16.1's `load_parameter_state` with torch's AdamW (no Apex / TE).

    Three of its problems are worked around: its loader copies every key of the inner
    optimizer's per-parameter state from the file, which holds no `step` (KeyError: 'step'), so
    `step` is set aside meanwhile; `load_state_dict` gave every parameter the *same* `step`
    tensor, which torch's foreach AdamW would then increment once per parameter each step, so
    each parameter gets its own copy back; and it copies into the fp32 main parameters with
    autograd on (an in-place error on leaf views), so it runs under no_grad.
    """
    inner = [getattr(o, "optimizer", None)
             for o in getattr(optimizer, "chained_optimizers", [optimizer])]
    held = []
    for opt in inner:
        for state in (opt.state.values() if opt is not None else ()):
            if "step" in state:
                held.append((state, state.pop("step")))
    try:
        with torch.no_grad():  # it copies into the (leaf, requires-grad) fp32 main params
            optimizer.load_parameter_state(str(path))
    finally:
        for state, step in held:
            state["step"] = step.clone() if torch.is_tensor(step) else step
