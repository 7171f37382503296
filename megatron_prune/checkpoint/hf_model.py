"""Hugging Face LlamaForCausalLM models built from any source of this project.

transformers >= 5 refuses Llama configs whose hidden_size is not a multiple of
num_attention_heads, even when head_dim is given explicitly — a shape pruning produces often
(e.g. hidden 64, 6 heads of dim 8). The modeling code itself only uses head_dim, so the models
here are built from a config that is made valid first and given the real head count after.
Exports still write the true config; `load_hf_model` loads them whatever transformers says.
"""
from __future__ import annotations

import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ModelConfig


def llama_config(cfg: ModelConfig, dtype=torch.float32):
    from transformers import LlamaConfig
    fields = {k: v for k, v in cfg.to_hf(dtype).items() if k not in ("architectures", "torch_dtype")}
    heads = fields["num_attention_heads"]
    valid = cfg.hidden_size % heads == 0
    if not valid:
        fields["num_attention_heads"] = fields["num_key_value_heads"]  # any divisor passes
        if cfg.hidden_size % fields["num_attention_heads"]:
            fields["num_attention_heads"] = 1
    hf_cfg = LlamaConfig(**fields)
    hf_cfg.num_attention_heads = heads
    return hf_cfg


def hf_ok(cfg: ModelConfig) -> bool:
    """Whether transformers >= 5 loads this shape with from_pretrained."""
    return cfg.hidden_size % cfg.num_attention_heads == 0


def hf_model_from_source(source, device="cpu", dtype=torch.float32):
    """A LlamaForCausalLM holding the source's weights (HF dir, Megatron checkpoint, pruned...)."""
    from transformers import LlamaForCausalLM
    cfg: ModelConfig = source.config
    hf_cfg = llama_config(cfg, dtype)
    with torch.device("meta"):
        model = LlamaForCausalLM(hf_cfg)
    state = {}
    for spec, layer in layout.iter_hf_entries(cfg):
        for name, t in source.group(spec, layer).items():
            state[name] = t.to(device=device, dtype=dtype)
    if cfg.tie_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    model.tie_weights()
    with torch.device(device):  # rotary buffers were created on meta
        model.model.rotary_emb = type(model.model.rotary_emb)(config=hf_cfg)
    return model.to(device).eval()


def load_hf_model(path, device="cpu", dtype=torch.float32):
    from megatron_prune.checkpoint.convert import open_source
    return hf_model_from_source(open_source(path), device=device, dtype=dtype)
