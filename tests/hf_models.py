"""Small random Hugging Face Llama checkpoints for tests (the hub is unreachable)."""
from __future__ import annotations

from pathlib import Path

import torch


def llama_config(**overrides):
    from transformers import LlamaConfig
    cfg = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=4,
               num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=128,
               rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    cfg.update(overrides)
    return LlamaConfig(**cfg)


def make_hf_llama(path: Path, seed: int = 0, dtype=torch.float32, max_shard_size="20MB",
                  **overrides) -> Path:
    """Save a randomly initialised LlamaForCausalLM (weights scaled up so they are not tiny)."""
    from transformers import LlamaForCausalLM
    torch.manual_seed(seed)
    model = LlamaForCausalLM(llama_config(**overrides))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # norms: not all-ones, so a misplaced norm is caught
    model.to(dtype).save_pretrained(path, max_shard_size=max_shard_size)
    return Path(path)
