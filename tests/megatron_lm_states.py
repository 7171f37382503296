"""What Megatron-LM's `pretrain_gpt.py` wrote (tests/megatron_lm.py runs it), read independently of
the project's readers: torch.load of the legacy rank files, torch.distributed.checkpoint of
torch_dist, merged over TP/PP by the layout rules written out here.
"""
from __future__ import annotations

from pathlib import Path

import torch


# ---------------------------------------------------------------------------- reading
def legacy_model_states(root: Path) -> dict:
    """{(tp, pp): model state dict} of Megatron-LM's own rank files (torch.load, no project
    code)."""
    it = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    out = {}
    for f in sorted((root / f"iter_{int(it):07d}").glob("mp_rank_*/model_optim_rng.pt")):
        parts = f.parent.name.split("_")
        out[(int(parts[2]), int(parts[3]) if len(parts) > 3 else 0)] = torch.load(
            f, weights_only=False)
    return out


def merge_tp(states: list) -> dict:
    """Full tensors from the TP rank files of one stage (each rank holds whole query groups;
    each rank's linear_fc1 is [gate_r; up_r])."""
    out = {}
    for name, t0 in states[0].items():
        if not torch.is_tensor(t0):
            continue
        parts = [s[name] for s in states]
        if "linear_fc1" in name:
            halves = [p.chunk(2, dim=0) for p in parts]
            out[name] = torch.cat([h[0] for h in halves] + [h[1] for h in halves])
        elif any(k in name for k in ("linear_qkv", "word_embeddings", "output_layer")):
            out[name] = torch.cat(parts, dim=0)
        elif any(k in name for k in ("linear_proj", "linear_fc2")):
            out[name] = torch.cat(parts, dim=1)
        else:
            assert all(torch.equal(p, t0) for p in parts), name
            out[name] = t0
    return out


def merge_pp(stages: list) -> dict:
    """One state dict from the PP stages' (each numbers its layers from 0)."""
    out, offset = {}, 0
    for state in stages:
        layers = {int(k.split(".")[2]) for k in state if k.startswith("decoder.layers.")}
        for name, t in state.items():
            if name.startswith("decoder.layers."):
                parts = name.split(".")
                parts[2] = str(int(parts[2]) + offset)
                name = ".".join(parts)
            assert name not in out, name
            out[name] = t
        offset += len(layers)
    return out


def dist_model_state(root: Path) -> dict:
    """Full model tensors of a torch_dist checkpoint, read by torch.distributed.checkpoint
    (dcp_to_torch_save) — not by megatron-core or the project."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    it = (root / "latest_checkpointed_iteration.txt").read_text().strip()
    flat = root.parent / f"{root.name}_dcp_flat.pt"
    dcp_to_torch_save(root / f"iter_{int(it):07d}", flat)
    state = torch.load(flat, weights_only=False)
    flat.unlink()
    out = {}
    for name, t in state.items():
        # mcore saves each per-layer tensor of the decoder stacked over layers:
        # decoder.layers.<rest> [num_layers, ...] -> decoder.layers.<i>.<rest>
        if name.startswith("decoder.layers.") and torch.is_tensor(t):
            rest = name[len("decoder.layers."):]
            for i in range(t.shape[0]):
                out[f"decoder.layers.{i}.{rest}"] = t[i]
        else:
            out[name] = t
    return out


def hf_reference(full: dict, *, heads: int, groups: int, head_dim: int, vocab: int) -> dict:
    """The HF Llama tensors a correct export of Megatron's full tensors gives (written here from
    the layout rules, independently of megatron_prune.checkpoint.layout)."""
    out = {"model.embed_tokens.weight": full["embedding.word_embeddings.weight"][:vocab],
           "model.norm.weight": full["decoder.final_layernorm.weight"]}
    if "output_layer.weight" in full:
        out["lm_head.weight"] = full["output_layer.weight"][:vocab]
    per = heads // groups
    layers = sorted({int(k.split(".")[2]) for k in full if k.startswith("decoder.layers.")})
    for i in layers:
        m, h = f"decoder.layers.{i}.", f"model.layers.{i}."
        qkv = full[m + "self_attention.linear_qkv.weight"]
        g = qkv.view(groups, (per + 2) * head_dim, -1)
        out[h + "self_attn.q_proj.weight"] = g[:, :per * head_dim].reshape(-1, qkv.shape[1])
        out[h + "self_attn.k_proj.weight"] = g[:, per * head_dim:(per + 1) * head_dim].reshape(
            -1, qkv.shape[1])
        out[h + "self_attn.v_proj.weight"] = g[:, (per + 1) * head_dim:].reshape(-1, qkv.shape[1])
        out[h + "self_attn.o_proj.weight"] = full[m + "self_attention.linear_proj.weight"]
        gate, up = full[m + "mlp.linear_fc1.weight"].chunk(2, dim=0)
        out[h + "mlp.gate_proj.weight"], out[h + "mlp.up_proj.weight"] = gate, up
        out[h + "mlp.down_proj.weight"] = full[m + "mlp.linear_fc2.weight"]
        # local spec names; Megatron-LM's torch_dist files name them as Transformer Engine does
        # (the local layer's sharded_state_dict_keys_map), fused into the next linear
        out[h + "input_layernorm.weight"] = full.get(
            m + "input_layernorm.weight", full.get(m + "self_attention.linear_qkv.layer_norm_weight"))
        out[h + "post_attention_layernorm.weight"] = full.get(
            m + "pre_mlp_layernorm.weight", full.get(m + "mlp.linear_fc1.layer_norm_weight"))
    return out
