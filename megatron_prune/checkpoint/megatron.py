"""Opening a Megatron-LM checkpoint of either format, and how to start Megatron-LM from one.

`open_megatron` returns a `LegacyCheckpoint` (`--ckpt-format torch`) or a `DistCheckpoint`
(`torch_dist`); both serve the same reads. torch_dist is imported only when met, since it needs
megatron-core, whose import is slow.
"""
from __future__ import annotations

import argparse
from typing import Optional

from megatron_prune.checkpoint.config import ModelConfig
from megatron_prune.checkpoint.legacy import LegacyCheckpoint
from megatron_prune.checkpoint.megatron_dirs import checkpoint_format


def open_megatron(root):
    """Open a Megatron checkpoint of either format for reading."""
    fmt = checkpoint_format(root)
    if fmt == "torch":
        return LegacyCheckpoint(root)
    from megatron_prune.checkpoint.torch_dist_read import \
        DistCheckpoint  # megatron-core import is slow; only when needed
    return DistCheckpoint(root)


def megatron_lm_hint(root, args: Optional[argparse.Namespace] = None) -> str:
    """How to start Megatron-LM from the checkpoint at `root` (whose `args` the writer may
    pass, else they are read): the flags that its --use-checkpoint-args does not restore
    (ModelConfig.megatron_lm_flags), and a warning where Megatron-LM's own model cannot
    reproduce this one."""
    if args is None:
        ck = open_megatron(root)
        config, dtype = ck.config, ck.dtype
    else:
        config, dtype = ModelConfig.from_megatron_args(args), args.params_dtype
    flags = " ".join(["--use-checkpoint-args", *config.megatron_lm_flags(dtype)])
    hint = f"Megatron-LM: --load {root} {flags} --finetune"
    warning = config.megatron_lm_rope_mismatch()
    return hint + (f"\nwarning: {warning}" if warning else "")
