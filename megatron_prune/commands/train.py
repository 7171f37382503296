"""train: recovery training / distillation on megatron-core (alias of `python -m megatron_prune.train`)."""
from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    from megatron_prune.train import arguments
    p = sub.add_parser(
        "train", help="recovery training / distillation on megatron-core (launch with torchrun)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description=arguments.build_parser().description,
        epilog="example:\n  torchrun --nproc_per_node 8 -m megatron_prune train "
               "--pretrained-checkpoint pruned/ --load run/ --save run/ \\\n"
               "    --data-path 0.7 web 0.3 code --seq-length 4096 --micro-batch-size 2 "
               "--global-batch-size 256 --train-tokens 12e9 --lr 3e-4 --bf16\n"
               "(`torchrun ... -m megatron_prune.train` takes the same flags)")
    arguments.add_arguments(p)
    p.set_defaults(func=_run)


def _run(a) -> int:
    from megatron_prune.train import arguments
    from megatron_prune.train.trainer import train
    train(arguments.from_namespace(a))
    return 0
