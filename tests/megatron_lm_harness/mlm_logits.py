"""Megatron-LM's own model builder and checkpoint loader, on fixed tokens: the logits.

    torchrun ... mlm_logits.py --tokens T.pt --logits-out L.pt MEGATRON-LM ARGS (--use-checkpoint-args --load CKPT ...)

`initialize_megatron` (with `--use-checkpoint-args`: the model's shape from the checkpoint's args),
`get_model(model_provider(gpt_builder))`, `load_checkpoint`, then one forward of the tokens in
T.pt ([batch, seq] int64) with no attention mask (causal). Rank 0 saves the full-vocab logits
[batch, seq, padded vocab] (fp32), gathered over tensor-parallel ranks, to L.pt.
"""
from __future__ import annotations

from functools import partial


def _extra_args(parser):
    g = parser.add_argument_group("logits test")
    g.add_argument("--tokens", required=True)
    g.add_argument("--logits-out", required=True)
    return parser


def main() -> None:
    import torch
    from gpt_builders import gpt_builder
    from megatron.core import parallel_state
    from megatron.training import get_args
    from megatron.training.checkpointing import load_checkpoint
    from megatron.training.initialize import initialize_megatron
    from megatron.training.training import get_model
    from model_provider import model_provider

    initialize_megatron(extra_args_provider=_extra_args)
    args = get_args()
    model = get_model(partial(model_provider, gpt_builder), wrap_with_ddp=False)
    iteration, _ = load_checkpoint(model, None, None, strict=True)
    tokens = torch.load(args.tokens)
    positions = torch.arange(tokens.shape[1]).unsqueeze(0).expand_as(tokens)
    net = model[0]
    net.eval()
    with torch.no_grad():
        logits = net(tokens, positions, attention_mask=None)  # [b, s, vocab / TP]
        # gathered here over gloo (mcore's gather_from_tensor_model_parallel_region allocates
        # on torch.cuda.current_device(), mappings.py:91)
        group = parallel_state.get_tensor_model_parallel_group()
        parts = [torch.empty_like(logits) for _ in range(torch.distributed.get_world_size(group))]
        torch.distributed.all_gather(parts, logits.contiguous(), group=group)
        logits = torch.cat(parts, dim=-1)
    if torch.distributed.get_rank() == 0:
        torch.save({"logits": logits.float(), "iteration": iteration,
                    "padded_vocab_size": args.padded_vocab_size,
                    "tp": parallel_state.get_tensor_model_parallel_world_size()},
                   args.logits_out)


if __name__ == "__main__":
    main()
