"""A megatron-core core-attention module that calls torch's scaled_dot_product_attention.

megatron-core's local `DotProductAttention` materialises the [batch, heads, seq, seq] score
matrix (in fp32 with `attention_softmax_in_fp32`), which is what makes the local spec slow and
memory-bound without Transformer Engine. `SDPACoreAttention` has the same constructor and
forward signature and dispatches to PyTorch's flash / memory-efficient kernels (on the CPU, the
math kernel): causal masking without a mask tensor, grouped-query attention with `enable_gqa`
(no repeated K/V), megatron's softmax scale.

Use it through a layer spec (`local_sdpa_layer_spec()`) or put it into an already built model
(`use_sdpa(model)`): the module holds no parameters, so the state dict does not change.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F


class SDPACoreAttention(torch.nn.Module):
    """Core attention: softmax(q k^T * scale + causal) v over this TP rank's heads.

    Inputs (megatron's layout): query [sq, b, np, hn], key/value [sk, b, ng, hn] with np a
    multiple of ng. Output [sq, b, np * hn].
    """

    def __init__(self, config, layer_number: int, attn_mask_type, attention_type: str,
                 attention_dropout: Optional[float] = None, softmax_scale: Optional[float] = None,
                 cp_comm_type: Optional[str] = None, pg_collection=None):
        super().__init__()
        from megatron.core.transformer.enums import AttnMaskType
        from megatron.core.utils import divide

        if config.context_parallel_size != 1:
            raise ValueError("SDPACoreAttention does not implement context parallelism")
        self.config = config
        self.layer_number = max(1, layer_number)
        self.attn_mask_type = attn_mask_type
        self.attention_type = attention_type
        if pg_collection is None:
            from megatron.core.process_groups_config import ProcessGroupCollection
            pg_collection = ProcessGroupCollection.use_mpu_process_groups(required_pgs=["tp"])
        tp = pg_collection.tp.size()
        self.heads = divide(config.num_attention_heads, tp)
        self.groups = divide(config.num_query_groups, tp)
        self.head_dim = config.kv_channels
        self.softmax_scale = (1.0 / math.sqrt(self.head_dim) if softmax_scale is None
                              else softmax_scale)
        if config.apply_query_key_layer_scaling:
            self.softmax_scale /= self.layer_number
        self.dropout = (config.attention_dropout if attention_dropout is None
                        else attention_dropout)
        self._causal = AttnMaskType.causal

    def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                attention_bias=None, packed_seq_params=None):
        if packed_seq_params is not None or attention_bias is not None:
            raise NotImplementedError("SDPACoreAttention: packed sequences / attention bias")
        mask_type = attn_mask_type if attn_mask_type is not None else self.attn_mask_type
        sq, b = query.shape[0], query.shape[1]
        # [s, b, n, d] -> [b, n, s, d] (strided views; the kernels take them as they are)
        q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
        mask = None
        is_causal = mask_type == self._causal
        if attention_mask is not None:
            # megatron's masks are True where attention is NOT allowed; SDPA's the opposite.
            mask = ~attention_mask.to(torch.bool)
            is_causal = False
        gqa = self.heads != self.groups
        # enable_gqa runs in the flash and math kernels; with a mask tensor (the memory-efficient
        # kernel's case) and on torch without enable_gqa, K/V are repeated instead.
        if gqa and (not _SDPA_GQA or (mask is not None and q.is_cuda)):
            k = k.repeat_interleave(self.heads // self.groups, dim=1)
            v = v.repeat_interleave(self.heads // self.groups, dim=1)
            gqa = False
        kwargs = {"enable_gqa": True} if gqa else {}
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None, scale=self.softmax_scale, **kwargs)
        # [b, n, s, d] -> [s, b, n * d]
        return out.permute(2, 0, 1, 3).reshape(sq, b, self.heads * self.head_dim)


def _sdpa_supports_gqa() -> bool:
    import inspect
    try:
        return "enable_gqa" in inspect.signature(F.scaled_dot_product_attention).parameters
    except (TypeError, ValueError):  # a builtin without a signature: try it
        try:
            x = torch.zeros(1, 2, 1, 1)
            F.scaled_dot_product_attention(x, x[:, :1], x[:, :1], enable_gqa=True)
            return True
        except TypeError:
            return False


_SDPA_GQA = _sdpa_supports_gqa()


def local_sdpa_layer_spec():
    """megatron-core's local GPT layer spec (RMSNorm) with `SDPACoreAttention`."""
    from megatron.core.models.gpt import gpt_layer_specs
    spec = gpt_layer_specs.get_gpt_layer_local_spec(normalization="RMSNorm")
    spec.submodules.self_attention.submodules.core_attention = SDPACoreAttention
    return spec


def use_sdpa(model) -> int:
    """Replace every layer's core attention of a built (local-spec) GPTModel piece by
    `SDPACoreAttention`; returns how many were replaced."""
    from megatron.core.transformer.dot_product_attention import DotProductAttention
    n = 0
    for layer in model.decoder.layers:
        old = layer.self_attention.core_attention
        if not isinstance(old, DotProductAttention):
            continue
        layer.self_attention.core_attention = SDPACoreAttention(
            config=old.config, layer_number=old.layer_number, attn_mask_type=old.attn_mask_type,
            attention_type=old.attention_type, softmax_scale=old.softmax_scale
            * (old.layer_number if old.config.apply_query_key_layer_scaling else 1),
            pg_collection=old.pg_collection)
        n += 1
    return n
