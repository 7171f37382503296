"""hf-to-megatron, megatron-to-hf and reshard."""
from __future__ import annotations

import argparse

from megatron_prune.checkpoint import convert, layout
from megatron_prune.checkpoint.megatron import megatron_lm_hint


def _parallel_args(p: argparse.ArgumentParser, defaults_from_source: bool = False) -> None:
    g = p.add_argument_group("parallelism (Megatron-LM flag names)")
    keep = " (default: the input's)" if defaults_from_source else " (default 1)"
    g.add_argument("--tensor-model-parallel-size", "--tp", type=int,
                   default=None if defaults_from_source else 1, dest="tp",
                   help="TP size of the output" + keep)
    g.add_argument("--pipeline-model-parallel-size", "--pp", type=int,
                   default=None if defaults_from_source else 1, dest="pp",
                   help="PP size of the output" + keep)
    g.add_argument("--decoder-first-pipeline-num-layers", type=int, default=None, dest="first",
                   help="layers on the first pipeline stage (uneven split)")
    g.add_argument("--decoder-last-pipeline-num-layers", type=int, default=None, dest="last",
                   help="layers on the last pipeline stage (uneven split)")
    g.add_argument("--transformer-impl", choices=layout.IMPLS,
                   default=None if defaults_from_source else layout.TE, dest="impl",
                   help="parameter names of the output: Transformer Engine spec (Megatron-LM's "
                        "default) or local spec" + (" (default: as the input)" if defaults_from_source
                                                    else " (default transformer_engine)"))
    g.add_argument("--ckpt-format", choices=("torch", "torch_dist"),
                   default=None if defaults_from_source else "torch",
                   help="legacy per-rank files (torch) or megatron-core distributed checkpoint"
                        + (" (default: as the input)" if defaults_from_source else " (default torch)"))
    g.add_argument("--make-vocab-size-divisible-by", type=int,
                   default=None if defaults_from_source else 128, dest="divisible_by",
                   help="pad the vocab to a multiple of this x TP, as Megatron does (default 128)")


def _common(p):
    p.add_argument("--dtype", choices=("bf16", "fp16", "fp32"), default=None,
                   help="output dtype (default: the input's)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "hf-to-megatron", help="Hugging Face Llama checkpoint -> Megatron TP/PP checkpoint",
        description="Convert a Hugging Face Llama-family checkpoint into Megatron-LM's checkpoint "
                    "layout at the given TP/PP. Reads tensors lazily; one output rank file in "
                    "memory at a time; writes into a temporary directory renamed at the end.",
        epilog="example: megatron-prune hf-to-megatron --hf-dir Llama-3.2-1B --save ckpt/tp2pp2 "
               "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2")
    p.add_argument("--hf-dir", required=True, help="HF model directory (config.json + safetensors)")
    p.add_argument("--save", required=True, help="output Megatron checkpoint directory")
    _parallel_args(p)
    _common(p)
    p.set_defaults(func=lambda a: _report(convert.hf_to_megatron(
        a.hf_dir, a.save, tp=a.tp, pp=a.pp, impl=a.impl, dtype=a.dtype,
        divisible_by=a.divisible_by, ckpt_format=a.ckpt_format, first=a.first, last=a.last,
        force=a.force), a.save, megatron=True))

    p = sub.add_parser(
        "megatron-to-hf", help="Megatron checkpoint (any TP/PP, either format) -> Hugging Face",
        description="Export a Megatron checkpoint at any TP/PP (legacy or torch_dist) to sharded "
                    "safetensors + config.json that transformers loads.",
        epilog="example: megatron-prune megatron-to-hf --load ckpt/tp2pp2 --save hf_out "
               "--tokenizer Llama-3.2-1B")
    p.add_argument("--load", required=True, help="Megatron checkpoint directory")
    p.add_argument("--save", required=True, help="output HF model directory")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer file or directory to copy next to the model (default: the "
                        "tokenizer stored with the checkpoint, if any)")
    p.add_argument("--max-shard-size-gb", type=float, default=5.0, help="safetensors shard size")
    _common(p)
    p.set_defaults(func=lambda a: _report(convert.megatron_to_hf(
        a.load, a.save, tokenizer=a.tokenizer, dtype=a.dtype, force=a.force,
        max_shard_bytes=int(a.max_shard_size_gb * 2**30)), a.save))

    p = sub.add_parser(
        "reshard", help="Megatron checkpoint -> another TP/PP (offline, CPU)",
        description="Rewrite a Megatron checkpoint at another TP/PP size, layer spec or format, "
                    "offline on CPU. Optimizer state is not carried over.",
        epilog="example: megatron-prune reshard --load ckpt/tp4 --save ckpt/tp2pp2 "
               "--tensor-model-parallel-size 2 --pipeline-model-parallel-size 2")
    p.add_argument("--load", required=True, help="input Megatron checkpoint directory")
    p.add_argument("--save", required=True, help="output Megatron checkpoint directory")
    _parallel_args(p, defaults_from_source=True)
    _common(p)
    p.set_defaults(func=lambda a: _report(convert.reshard(
        a.load, a.save, tp=a.tp, pp=a.pp, impl=a.impl, dtype=a.dtype,
        divisible_by=a.divisible_by, ckpt_format=a.ckpt_format, first=a.first, last=a.last,
        force=a.force), a.save, megatron=True))


def _report(result, save, megatron: bool = False) -> int:
    print(f"wrote {save}")
    if megatron:  # `result`: the written checkpoint's args
        print(megatron_lm_hint(save, result))
    return 0
