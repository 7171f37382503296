"""Does a Megatron checkpoint compute what its Hugging Face original computes?

`verify` builds a real megatron-core GPTModel from the checkpoint (one piece per TP x PP rank,
launched by torchrun; one process for TP=1 PP=1), runs it and HF's LlamaForCausalLM (fp32) on the
same random token batch, and measures the logits' difference over the real, unpadded vocab.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from megatron_prune.checkpoint.config import ConfigError, ModelConfig
from megatron_prune.checkpoint.hf import HFCheckpoint
from megatron_prune.checkpoint.megatron import open_megatron
from megatron_prune.checkpoint.megatron_dirs import check_megatron_input
from megatron_prune.mcore.load import load_checkpoint_into_model
from megatron_prune.mcore.model import build_gpt_model, resolve_impl, stage_split
from megatron_prune.mcore.parallel import (destroy_distributed, gather_tp_logits, init_distributed,
                                           pipeline_forward)

# Shape fields that must agree between the HF directory and the Megatron checkpoint.
_SHAPE_FIELDS = ("num_layers", "hidden_size", "ffn_hidden_size", "num_attention_heads",
                 "num_query_groups", "head_dim", "vocab_size", "norm_epsilon", "rotary_base",
                 "rope_scaling", "tie_embeddings")


@dataclass
class VerifyResult:
    max_abs: float        # max |megatron - hf| over all logits of the real vocab
    max_rel: float        # max_abs / max |hf logit|
    top1_agreement: float  # fraction of positions whose argmax token agrees
    batch: int
    tokens: int
    tp: int
    pp: int
    impl: str             # the layer spec the model was built with
    ckpt_impl: str        # the parameter names the checkpoint was saved with
    device: str
    reporter: bool = False  # this rank computed the numbers (the one that prints them)

    def passed(self, tolerance: Optional[float]) -> bool:
        return tolerance is None or self.max_abs <= tolerance

    def summary(self) -> str:
        return (f"megatron-core GPTModel ({self.impl} spec, checkpoint names {self.ckpt_impl}, "
                f"TP={self.tp} PP={self.pp}, {self.device}) vs HF LlamaForCausalLM, fp32, "
                f"batch {self.batch} x {self.tokens} tokens:\n"
                f"  max abs error {self.max_abs:.3e}\n"
                f"  max rel error {self.max_rel:.3e}  (max abs error / max |HF logit|)\n"
                f"  top-1 agreement {self.top1_agreement:.4f}")


def check_same_model(hf: ModelConfig, meg: ModelConfig, hf_dir, load) -> None:
    diffs = [f"{f}: HF {getattr(hf, f)!r} vs Megatron {getattr(meg, f)!r}"
             for f in _SHAPE_FIELDS if getattr(hf, f) != getattr(meg, f)]
    if diffs:
        raise ConfigError(f"--hf-dir {hf_dir} and --load {load} are different models: "
                          + "; ".join(diffs))


def random_tokens(vocab_size: int, batch: int, tokens: int, seed: int) -> torch.Tensor:
    """The same [batch, tokens] batch on every rank (a seeded CPU generator)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab_size, (batch, tokens), generator=g)


def hf_logits(hf_dir, input_ids: torch.Tensor, attn_implementation: str = "eager") -> torch.Tensor:
    from transformers import LlamaForCausalLM
    model = LlamaForCausalLM.from_pretrained(hf_dir, dtype=torch.float32,
                                             attn_implementation=attn_implementation)
    model.to(input_ids.device).eval()
    with torch.no_grad():
        return model(input_ids).logits.float()


def verify(hf_dir, load, *, tokens: int = 128, batch: int = 2, seed: int = 0,
           attn_implementation: str = "eager") -> VerifyResult:
    """Run on every rank of a TP x PP launch (or one process); every rank gets the result."""
    check_megatron_input(load)
    hf_cfg = HFCheckpoint(hf_dir).config
    ckpt = open_megatron(load)
    cfg = ckpt.config
    check_same_model(hf_cfg, cfg, hf_dir, load)
    if tokens < 1 or batch < 1:
        raise ConfigError(f"--tokens and --batch must be positive, got {tokens}, {batch}")
    if tokens > cfg.max_position_embeddings:
        raise ConfigError(f"--tokens {tokens} exceeds max_position_embeddings "
                          f"{cfg.max_position_embeddings}")

    import torch.distributed as dist

    try:
        env = init_distributed(ckpt.tp, ckpt.pp)
        device = env["device"]
        first, last = stage_split(ckpt.stage_counts)
        model = build_gpt_model(cfg, impl=ckpt.impl, dtype=torch.float32,
                                            first=first, last=last,
                                            divisible_by=ckpt.divisible_by)
        load_checkpoint_into_model(model, load)
        model.eval()
        input_ids = random_tokens(cfg.vocab_size, batch, tokens, seed).to(device)
        with torch.no_grad():
            logits = pipeline_forward(model, input_ids)
            if logits is not None:
                logits = gather_tp_logits(logits, cfg.vocab_size).float()
        del model

        # One rank compares (the last stage's first TP rank of the first data-parallel replica);
        # its numbers reach every rank through a max all-reduce.
        reporter = (logits is not None and env["tp_rank"] == 0 and env["dp_rank"] == 0)
        stats = torch.zeros(3, dtype=torch.float64, device=device)
        if reporter:
            ref = hf_logits(hf_dir, input_ids, attn_implementation)
            diff = (logits - ref).abs()
            stats[0] = diff.max()
            stats[1] = diff.max() / ref.abs().max().clamp_min(1e-30)
            stats[2] = (logits.argmax(-1) == ref.argmax(-1)).double().mean()
        dist.all_reduce(stats, op=dist.ReduceOp.MAX)
        result = VerifyResult(
            max_abs=stats[0].item(), max_rel=stats[1].item(), top1_agreement=stats[2].item(),
            batch=batch, tokens=tokens, tp=ckpt.tp, pp=ckpt.pp,
            impl=resolve_impl(ckpt.impl), ckpt_impl=ckpt.impl, device=str(device),
            reporter=reporter)
        return result
    finally:
        destroy_distributed()
