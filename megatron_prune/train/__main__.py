"""`torchrun --nproc_per_node N -m megatron_prune.train ...` (or one plain process)."""
from __future__ import annotations

import logging
import os
import sys


def main(argv=None) -> int:
    from megatron_prune.cli import USER_ERRORS
    from megatron_prune.train.arguments import parse_args
    args = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(message)s")
    for noisy in ("megatron", "megatron.core"):  # megatron-core logs every dataset index
        logging.getLogger(noisy).setLevel(logging.WARNING)
    from megatron_prune.train.trainer import train
    try:
        train(args)
    except USER_ERRORS as e:
        print(f"megatron_prune.train: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("megatron_prune.train: interrupted; the latest complete checkpoint is the one "
              "the tracker file names", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
