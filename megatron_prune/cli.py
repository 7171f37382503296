"""`megatron-prune <command>`: thin argument parsing over library calls.

Each command lives in its own module, which exposes `add_parser(subparsers)`; the parser's
`func` receives the parsed args. Library code raises; only this file turns errors into exit codes.
"""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.checkpoint.fsutil import OutputExistsError
from megatron_prune.checkpoint.tensor_io import CheckpointReadError

# (command, module) in the order `--help` lists them.
COMMANDS = (
    ("hf-to-megatron", "megatron_prune.commands.convert"),
    ("megatron-to-hf", "megatron_prune.commands.convert"),
    ("reshard", "megatron_prune.commands.convert"),
    ("importance", "megatron_prune.commands.importance"),
    ("prune", "megatron_prune.commands.prune"),
    ("prune-hf", "megatron_prune.commands.prune"),
    ("import-llama2c", "megatron_prune.commands.imports"),
    ("import-gguf", "megatron_prune.commands.imports"),
    ("verify", "megatron_prune.commands.verify"),
    ("generate", "megatron_prune.commands.generate"),
    ("eval", "megatron_prune.commands.eval"),
    ("vocab-freq", "megatron_prune.commands.vocab"),
    ("prune-vocab", "megatron_prune.commands.vocab"),
    ("prune-embeddings", "megatron_prune.commands.vocab"),
    ("preprocess", "megatron_prune.commands.preprocess"),
    ("train", "megatron_prune.commands.train"),
)

USER_ERRORS = (ConfigError, CheckpointReadError, OutputExistsError, FileNotFoundError)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="megatron-prune",
        description="Convert, prune, reshard and export Llama-family checkpoints between Hugging "
                    "Face and Megatron-LM (tensor/pipeline parallel) formats.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    seen = set()
    for _, module in COMMANDS:
        if module not in seen:
            importlib.import_module(module).add_parsers(sub)
            seen.add(module)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(message)s")
    try:
        result = args.func(args)
    except USER_ERRORS as e:
        print(f"megatron-prune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"megatron-prune {args.command}: interrupted; nothing was left half-written",
              file=sys.stderr)
        return 130
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
