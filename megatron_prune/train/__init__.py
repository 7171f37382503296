"""Recovery training and distillation on megatron-core (`python -m megatron_prune.train`).

Modules, one question each: `arguments` (flags -> dataclasses), `data` (GPTDatasets and the
sample order), `model` (the GPTModel piece), `sdpa_attention` (fast core attention without
Transformer Engine), `loss` (fused vocab-parallel cross-entropy and KD), `distill` (the teacher),
`optim` (AdamW, LR schedule), `checkpointing` (save / exact resume), `metrics` (logging),
`trainer` (the loop), `cpu` (megatron-core's CUDA-only call sites on the CPU).
"""
from megatron_prune.train.arguments import parse_args
from megatron_prune.train.config import TrainArgs

__all__ = ["TrainArgs", "parse_args", "train"]


def train(args):
    """Run a training job on this rank (see `trainer.train`)."""
    from megatron_prune.train.trainer import train as _train
    return _train(args)
