"""verify: a Megatron checkpoint's logits against its Hugging Face original."""
from __future__ import annotations

import argparse


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "verify", help="compare a Megatron checkpoint's logits with the HF model's (real mcore)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Build a real megatron-core GPTModel from a legacy Megatron checkpoint (one "
                    "process per TP x PP rank, gloo on CPU, NCCL on GPUs), run it and Hugging "
                    "Face's LlamaForCausalLM in fp32 on the same random token batch, and print "
                    "the max absolute and relative error of the logits over the real (unpadded) "
                    "vocab. Checkpoints saved with Transformer Engine names load into the local "
                    "spec when Transformer Engine is not installed.",
        epilog="examples:\n"
               "  megatron-prune verify --hf-dir Llama-3.2-1B --load ckpt/tp1\n"
               "  torchrun --nproc_per_node 4 -m megatron_prune verify --hf-dir Llama-3.2-1B "
               "--load ckpt/tp2pp2 --tolerance 1e-3\n"
               "(--nproc_per_node = TP x PP of the checkpoint)")
    p.add_argument("--hf-dir", required=True, help="the Hugging Face model directory")
    p.add_argument("--load", required=True, help="the Megatron checkpoint directory (legacy format)")
    p.add_argument("--tokens", type=int, default=128, help="sequence length (default 128)")
    p.add_argument("--batch", type=int, default=2, help="batch size (default 2)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random tokens (default 0)")
    p.add_argument("--attn-implementation", choices=("eager", "sdpa"), default="eager",
                   help="HF attention implementation (default eager)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="exit with status 1 if the max abs error exceeds this")
    p.set_defaults(func=_run)


def _run(a) -> int:
    from megatron_prune.eval import \
        verify  # megatron-core and transformers load only when verify runs

    result = verify.verify(a.hf_dir, a.load, tokens=a.tokens, batch=a.batch, seed=a.seed,
                           attn_implementation=a.attn_implementation)
    ok = result.passed(a.tolerance)
    if result.reporter:
        print(result.summary(), flush=True)
        if a.tolerance is not None:
            print(f"  {'PASS' if ok else 'FAIL'}: tolerance {a.tolerance:.3e}", flush=True)
    return 0 if ok else 1
