"""The layout rules at real 70B / 7B shapes, on meta tensors (no memory, no data)."""
from __future__ import annotations

import pytest
import torch

from megatron_prune.checkpoint import layout
from megatron_prune.checkpoint.config import ModelConfig
from megatron_prune.checkpoint.convert import megatron_rank_state
from megatron_prune.prune.plan import PruneTarget, make_plan
from megatron_prune.prune.apply import PrunedSource
from megatron_prune.prune.scores import random_scores

LLAMA3_70B = ModelConfig(num_layers=80, hidden_size=8192, ffn_hidden_size=28672,
                         num_attention_heads=64, num_query_groups=8, head_dim=128,
                         vocab_size=128256, tie_embeddings=False)
LLAMA2_7B = ModelConfig(num_layers=32, hidden_size=4096, ffn_hidden_size=11008,
                        num_attention_heads=32, num_query_groups=32, head_dim=128,
                        vocab_size=32000, tie_embeddings=False)


class MetaSource:
    """HF-named meta tensors of a config: exercises every rule at full size for free."""

    dtype = torch.bfloat16

    def __init__(self, cfg):
        self.config = cfg
        self.shapes = {n: layout.hf_shape(spec, j, cfg) for spec, layer in layout.iter_hf_entries(cfg)
                       for j, n in enumerate(spec.hf_names(layer))}

    def shape(self, name):
        return self.shapes[name]

    def get(self, name, dim=None, start=0, end=None):
        shape = list(self.shapes[name])
        if dim is not None:
            shape[dim] = (shape[dim] if end is None else end) - start
        return torch.empty(shape, dtype=torch.bfloat16, device="meta")

    def group(self, spec, layer):
        return {n: self.get(n) for n in spec.hf_names(layer)}


@pytest.mark.parametrize("impl", layout.IMPLS)
def test_llama3_70b_tp8_pp4_shard_shapes(impl):
    cfg, tp = LLAMA3_70B, 8
    ranges = layout.stage_ranges(layout.stage_layer_counts(cfg.num_layers, 4))
    first = megatron_rank_state(MetaSource(cfg), cfg, impl, tp, 3, 0, ranges, torch.bfloat16, 128)
    last = megatron_rank_state(MetaSource(cfg), cfg, impl, tp, 7, 3, ranges, torch.bfloat16, 128)
    # 128256 padded to a multiple of 128 * 8 = 129024, split over 8 ranks
    assert first["embedding.word_embeddings.weight"].shape == (16128, 8192)
    assert last["output_layer.weight"].shape == (16128, 8192)
    qkv = "decoder.layers.19.self_attention.linear_qkv.weight"
    assert first[qkv].shape == ((64 + 2 * 8) * 128 // 8, 8192)  # one KV group per rank
    assert first["decoder.layers.0.self_attention.linear_proj.weight"].shape == (8192, 1024)
    assert first["decoder.layers.0.mlp.linear_fc1.weight"].shape == (2 * 28672 // 8, 8192)
    assert first["decoder.layers.0.mlp.linear_fc2.weight"].shape == (8192, 3584)
    assert sum(1 for v in first.values() if v is not None) == 1 + 20 * 6
    assert "decoder.final_layernorm.weight" in last and "decoder.layers.20.mlp.linear_fc2.weight" not in last


def test_llama2_7b_prune_plan_on_tp4_shards_at_full_size():
    cfg = LLAMA2_7B
    target = PruneTarget(hidden_size=3072, num_attention_heads=24, ffn_hidden_size=8192,
                         drop_layers=[7, 13])
    plan = make_plan(cfg, target, random_scores(cfg, 0), "balance", tp=4)
    pruned = PrunedSource(MetaSource(cfg), plan)
    ranges = layout.stage_ranges([30])
    rank = megatron_rank_state(pruned, plan.target_config, layout.TE, 4, 2, 0, ranges,
                               torch.bfloat16, 128)
    assert rank["decoder.layers.0.self_attention.linear_qkv.weight"].shape == (3 * 24 * 128 // 4, 3072)
    assert rank["decoder.layers.29.mlp.linear_fc1.weight"].shape == (2 * 8192 // 4, 3072)
    assert rank["decoder.layers.5.self_attention.linear_proj.weight"].shape == (3072, 24 * 128 // 4)
    assert rank["embedding.word_embeddings.weight"].shape == (32256 // 4, 3072)
    assert plan.target_config.num_params() < 0.55 * cfg.num_params()
    # balance at TP=4: each rank keeps 6 of its own 8 heads
    heads = plan.head_order(0)
    assert [sum(1 for h in heads if r * 8 <= h < (r + 1) * 8) for r in range(4)] == [6, 6, 6, 6]


def test_layer_spec_of_names_in_both_layer_specs():
    for impl in layout.IMPLS:
        for spec in layout.LAYER_SPECS:
            assert layout.layer_spec_of(spec.name(impl, 7)) is spec, (impl, spec.key)
    for spec in (layout.EMBEDDING, layout.FINAL_NORM, layout.OUTPUT):
        assert layout.layer_spec_of(spec.name(layout.TE)) is None
    assert layout.layer_spec_of("decoder.layers.0.mlp.linear_fc1._extra_state") is None


@pytest.mark.parametrize("heads,groups,tp", [(8, 4, 1), (8, 4, 2), (8, 8, 4), (16, 2, 2)])
def test_fused_row_blocks_reproduce_fuse(heads, groups, tp):
    """Filling a tensor run by run from `fused_row_blocks` gives exactly `fuse` of the parts,
    for QKV (GQA and MHA) and gate/up, at each TP."""
    cfg = ModelConfig(num_layers=1, hidden_size=64, ffn_hidden_size=96, num_attention_heads=heads,
                      num_query_groups=groups, head_dim=8, vocab_size=128, tie_embeddings=False)
    g = torch.Generator().manual_seed(0)
    for spec in (layout.QKV, layout.FC1):
        rows = [layout.hf_shape(spec, j, cfg)[0] // tp for j in range(len(spec.hf_names(0)))]
        parts = [torch.randn(n, 5, generator=g) for n in rows]
        out = torch.full((sum(rows), 5), float("nan"))
        blocks = layout.fused_row_blocks(spec, rows, cfg, tp)
        for part, row, dst, n in blocks:
            out[dst:dst + n] = parts[part][row:row + n]
        assert torch.equal(out, layout.fuse(spec, parts, cfg, tp))
        # runs, not rows: QKV gives three per group, gate/up two
        assert len(blocks) == (3 * groups // tp if spec is layout.QKV else 2)
