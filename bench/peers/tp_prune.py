"""Prune a Hugging Face Llama checkpoint with torch-pruning (LLM-Pruner's engine), for comparison.

Why the peer adapters exist: our benchmark compares megatron_prune with third-party pruners on
identical inputs (same teacher directory, same calibration tokens, same target shape). Each
adapter drives one third-party library the way its own users would and writes a plain HF
directory, so one evaluator reads every pruner's output the same way. The channel choice here
comes only from torch-pruning's importance and dependency graph, never from megatron_prune.

Run it with the peer environment's Python (torch-pruning 1.6.1, transformers 5, CPU):

    /work/peervenv/bin/python bench/peers/tp_prune.py --hf-dir /work/scratch/smol_hf \\
        --calib /work/scratch/calib_16x256.pt --save /tmp/tp_W --method taylor \\
        --target '{"hidden_size": 432, "num_attention_heads": 6, "num_query_groups": 3,
                   "ffn_hidden_size": 1152}' --stats /tmp/tp_W.json

What is pruned, and with which torch-pruning API:
  * KV groups (num_query_groups): whole groups (k/v rows and their heads' q rows / o_proj
    columns), through the low-level DependencyGraph API; MetaPruner only removes query heads
    under GQA.
  * heads within groups, FFN neurons, hidden size (residual channels): one tp.pruner.MetaPruner
    step (num_heads with prune_num_heads, prune_head_dims=False as in torch-pruning's
    examples/LLMs/prune_llm.py, per-layer pruning_ratio_dict for the FFN).
Importance: magnitude = GroupMagnitudeImportance(p=2); taylor = GroupTaylorImportance with
gradients of the LM loss accumulated over all calibration rows (micro-batches of 4).

After saving, the directory is reloaded and its logits compared with the in-memory pruned
model; the mean LM loss on calibration rows 0-3 is printed as a sanity number.
"""
from __future__ import annotations

import json
import math
import resource
import shutil
import sys
import time
from pathlib import Path

import torch
import torch_pruning as tp
from transformers import AutoModelForCausalLM

from common import peer_parser  # bench/peers/, the script's own folder

TARGET_KEYS = ("hidden_size", "num_attention_heads", "num_query_groups", "ffn_hidden_size")
# files save_pretrained does not write but a usable HF directory needs
TOKENIZER_GLOBS = ("tokenizer*", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "added_tokens.json", "chat_template*")


_T0 = time.perf_counter()


def log(msg: str) -> None:
    # phase times on stderr: the 2-core benchmark machine is shared, so wall_s alone is noisy
    print(f"[tp_prune {time.perf_counter() - _T0:7.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = peer_parser(__doc__, TARGET_KEYS)
    p.add_argument("--method", choices=("magnitude", "taylor"), required=True)
    p.add_argument("--micro-batch", type=int, default=4, help="rows per Taylor backward pass")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- shapes

def current_shape(model) -> dict:
    c = model.config
    return {"hidden_size": c.hidden_size, "num_attention_heads": c.num_attention_heads,
            "num_query_groups": c.num_key_value_heads, "ffn_hidden_size": c.intermediate_size}


def resolve_target(model, target: dict) -> dict:
    """Fill absent keys from the teacher and reject shapes this pruning cannot reach."""
    unknown = set(target) - set(TARGET_KEYS)
    if unknown:
        raise SystemExit(f"unknown target keys: {sorted(unknown)}")
    cur = current_shape(model)
    t = {k: int(target.get(k, cur[k])) for k in TARGET_KEYS}
    heads_per_group = cur["num_attention_heads"] // cur["num_query_groups"]
    if any(t[k] > cur[k] or t[k] < 1 for k in TARGET_KEYS):
        raise SystemExit(f"target {t} must shrink the teacher {cur}")
    if t["num_attention_heads"] % t["num_query_groups"]:
        raise SystemExit("num_attention_heads must be a multiple of num_query_groups")
    if t["num_attention_heads"] // t["num_query_groups"] > heads_per_group:
        raise SystemExit("heads per group can only shrink (groups are removed whole)")
    # transformers' LlamaConfig.validate_architecture rejects this even with head_dim set
    if t["hidden_size"] % t["num_attention_heads"]:
        raise SystemExit("transformers requires hidden_size % num_attention_heads == 0")
    return t


def expected_params(cfg, t: dict) -> int:
    """Parameter count of a Llama of the target shape (tied embeddings counted once)."""
    h, d = t["hidden_size"], cfg.head_dim
    q, kv, f = t["num_attention_heads"] * d, t["num_query_groups"] * d, t["ffn_hidden_size"]
    layer = 2 * h * q + 2 * h * kv + 3 * h * f + 2 * h
    return cfg.vocab_size * h + cfg.num_hidden_layers * layer + h


def soft_ratio(n_remove: int, n_total: int) -> float:
    """A ratio that torch-pruning turns back into exactly n_remove.

    MetaPruner keeps int(n_total * (1 - ratio)) channels and removes ceil(ratio * n) heads;
    half a channel of slack keeps both floor and ceil on the intended integer."""
    return 0.0 if n_remove <= 0 else (n_remove - 0.5) / n_total


# ----------------------------------------------------------------------------- model

def load_model(hf_dir: Path):
    # eager attention: tp follows GQA through repeat_kv's expand in the autograd graph; sdpa is
    # one fused op (and with enable_gqa skips repeat_kv), which tp cannot map
    model = AutoModelForCausalLM.from_pretrained(hf_dir, attn_implementation="eager",
                                                 dtype=torch.float32)
    return model.eval()


def trace_fn(model, x):
    # the HF output is a ModelOutput with a cache; torch-pruning needs one tensor to walk back from
    return model(input_ids=x, use_cache=False).logits


def norm_parameters(model) -> list:
    # LlamaRMSNorm is not a torch-pruning layer type: declare its weight as an unwrapped
    # parameter pruned along dim 0 (what tp would guess anyway, minus the warning)
    return [(p, 0) for n, p in model.named_parameters() if n.endswith("norm.weight")]


def accumulate_taylor_grads(model, calib: torch.Tensor, micro: int) -> None:
    """LM-loss gradients summed over every calibration row, for GroupTaylorImportance."""
    model.zero_grad(set_to_none=True)
    for i in range(0, calib.shape[0], micro):
        x = calib[i:i + micro]
        model(input_ids=x, labels=x, use_cache=False).loss.backward()


def make_importance(method: str):
    if method == "magnitude":
        return tp.importance.GroupMagnitudeImportance(p=2)
    return tp.importance.GroupTaylorImportance()


# ----------------------------------------------------------------------------- pruning

def prune_kv_groups(model, importance, n_groups: int, example: torch.Tensor) -> None:
    """Remove whole KV groups per layer through the low-level DependencyGraph API.

    A group's query channels as the root index set pull in its k/v rows (tp maps repeat_kv's
    expand) and o_proj columns; the group score is the mean tp importance of those channels,
    the same per-head averaging MetaPruner uses for heads."""
    dg = tp.DependencyGraph().build_dependency(model, example_inputs=example, forward_fn=trace_fn,
                                               unwrapped_parameters=norm_parameters(model))
    d = model.config.head_dim
    for layer in model.model.layers:
        q = layer.self_attn.q_proj
        n_kv = layer.self_attn.k_proj.out_features // d
        full = dg.get_pruning_group(q, tp.prune_linear_out_channels, list(range(q.out_features)))
        score = importance(full).view(n_kv, -1).mean(1)
        drop = torch.topk(score, n_kv - n_groups, largest=False).indices.tolist()
        width = q.out_features // n_kv  # query channels per KV group
        idxs = [c for g in sorted(drop) for c in range(g * width, (g + 1) * width)]
        group = dg.get_pruning_group(q, tp.prune_linear_out_channels, idxs)
        for i, (dep, dep_idxs) in enumerate(group):
            # adapter: under GQA tp lists each k/v channel once per query head it serves;
            # LinearPruner then subtracts the duplicates from out_features (weight right,
            # attribute wrong) and check_pruning_group sees "all channels removed"
            group[i] = (dep, sorted(set(dep_idxs)))
        if not dg.check_pruning_group(group):
            raise RuntimeError(f"torch-pruning refused the KV-group removal {drop}")
        group.prune()


def metapruner_plan(model, t: dict):
    """(hidden ratio, head ratio, pruning_ratio_dict) that MetaPruner turns into target `t`."""
    cur = current_shape(model)
    per_group = cur["num_attention_heads"] // cur["num_query_groups"]
    per_group_t = t["num_attention_heads"] // t["num_query_groups"]
    heads_out = cur["num_query_groups"] * (per_group - per_group_t)  # same count in every group
    head_ratio = soft_ratio(heads_out, cur["num_attention_heads"])
    ffn_ratio = soft_ratio(cur["ffn_hidden_size"] - t["ffn_hidden_size"], cur["ffn_hidden_size"])
    ratios = {}
    for layer in model.model.layers:
        if ffn_ratio:
            ratios[layer.mlp.gate_proj] = ffn_ratio  # the FFN group (gate/up rows, down columns)
        if head_ratio:
            # adapter: MetaPruner only reaches head removal once the attention group's channel
            # ratio is > 0; prune_head_dims=False keeps that ratio from removing any channel
            ratios[layer.self_attn.q_proj] = head_ratio
    hidden_ratio = soft_ratio(cur["hidden_size"] - t["hidden_size"], cur["hidden_size"])
    return hidden_ratio, head_ratio, ratios


def prune_with_metapruner(model, importance, t: dict, example: torch.Tensor) -> None:
    """Heads within groups, FFN neurons and the hidden size in one MetaPruner step."""
    hidden_ratio, head_ratio, ratios = metapruner_plan(model, t)
    if not (hidden_ratio or head_ratio or ratios):
        return
    d = model.config.head_dim
    num_heads = {}
    for layer in model.model.layers:
        a = layer.self_attn
        num_heads[a.q_proj] = a.q_proj.out_features // d
        num_heads[a.k_proj] = num_heads[a.v_proj] = a.k_proj.out_features // d
    pruner = tp.pruner.MetaPruner(
        model, example_inputs=example, forward_fn=trace_fn, importance=importance,
        global_pruning=False,  # per layer, like LLM-Pruner's block-wise mode
        pruning_ratio=hidden_ratio, pruning_ratio_dict=ratios,
        ignored_layers=[model.lm_head],  # its output channels are the vocabulary
        num_heads=num_heads, prune_num_heads=True, head_pruning_ratio=head_ratio,
        prune_head_dims=False,  # head_dim stays 64: RoPE and the config need it whole
        in_channel_groups={}, out_channel_groups={},  # fresh dicts: tp mutates its defaults
        unwrapped_parameters=norm_parameters(model))
    for group in pruner.step(interactive=True):
        group.prune()


def tie_embeddings(model) -> None:
    # adapter: torch-pruning replaces each pruned Parameter, so lm_head and embed_tokens end up
    # as two equal copies; tie them again so the count and the saved file match the HF layout
    emb, head = model.model.embed_tokens.weight, model.lm_head.weight
    if head is not emb:
        assert torch.equal(head, emb), "lm_head and embed_tokens were pruned differently"
        model.lm_head.weight = emb


def fix_attributes(model) -> None:
    """Config and attention attributes torch-pruning does not know about, from the weights."""
    c, d = model.config, model.config.head_dim
    a = model.model.layers[0].self_attn
    c.hidden_size = model.model.embed_tokens.weight.shape[1]
    c.num_attention_heads = a.q_proj.out_features // d
    c.num_key_value_heads = a.k_proj.out_features // d
    c.intermediate_size = model.model.layers[0].mlp.gate_proj.out_features
    c.head_dim = d  # explicit: hidden/heads is no longer 64
    c.validate()  # fail here, not at from_pretrained, if transformers rejects the shape
    for layer in model.model.layers:
        # the only head-count attribute transformers 5 LlamaAttention reads (repeat_kv)
        layer.self_attn.num_key_value_groups = c.num_attention_heads // c.num_key_value_heads


def check_shapes(model, t: dict) -> None:
    """Every layer must have the target shape: local pruning could otherwise differ per layer."""
    d, h = model.config.head_dim, t["hidden_size"]
    q, kv, f = t["num_attention_heads"] * d, t["num_query_groups"] * d, t["ffn_hidden_size"]
    want = {"self_attn.q_proj": (q, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
            "self_attn.o_proj": (h, q), "mlp.gate_proj": (f, h), "mlp.up_proj": (f, h),
            "mlp.down_proj": (h, f), "input_layernorm": (h,), "post_attention_layernorm": (h,)}
    for i, layer in enumerate(model.model.layers):
        for name, shape in want.items():
            got = tuple(layer.get_submodule(name).weight.shape)
            if got != shape:
                raise RuntimeError(f"layer {i} {name}: {got}, want {shape}")
    assert tuple(model.model.norm.weight.shape) == (h,)
    assert model.model.embed_tokens.weight.shape[1] == h


def prune(model, calib: torch.Tensor, method: str, t: dict, micro: int) -> None:
    importance = make_importance(method)
    if method == "taylor":
        # once, before any pruning: torch-pruning prunes .grad together with each weight
        accumulate_taylor_grads(model, calib, micro)
        log("taylor gradients done")
    example = calib[:1, :16]  # tracing only needs the graph, not real lengths
    if t["num_query_groups"] < model.config.num_key_value_heads:
        prune_kv_groups(model, importance, t["num_query_groups"], example)
        log("KV groups pruned")
    prune_with_metapruner(model, importance, t, example)
    log("MetaPruner step done")
    model.zero_grad(set_to_none=True)
    tie_embeddings(model)
    fix_attributes(model)
    check_shapes(model, t)


# ----------------------------------------------------------------------------- output

def save(model, hf_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors; config.json carries the pruned shape
    for pattern in TOKENIZER_GLOBS:
        for f in hf_dir.glob(pattern):
            shutil.copy2(f, out / f.name)


@torch.no_grad()
def logits_and_loss(model, x: torch.Tensor):
    out = model(input_ids=x, labels=x, use_cache=False)
    return out.logits, out.loss.item()


def verify(model, out: Path, x: torch.Tensor) -> dict:
    """Reload the saved directory and compare its logits with the in-memory model's."""
    mem_logits, loss = logits_and_loss(model, x)
    reloaded = load_model(out)
    disk_logits, _ = logits_and_loss(reloaded, x)
    n_disk = sum(p.numel() for p in reloaded.parameters())
    return {"reload_max_abs_diff": (mem_logits - disk_logits).abs().max().item(),
            "reload_params": n_disk, "calib_loss_rows0_3": loss}


def main(argv=None) -> None:
    args = parse_args(argv)
    calib = torch.load(args.calib)
    t0 = time.perf_counter()
    model = load_model(args.hf_dir)
    log(f"loaded {args.hf_dir}")
    t = resolve_target(model, json.loads(args.target))
    prune(model, calib, args.method, t, args.micro_batch)
    save(model, args.hf_dir, args.save)
    wall = time.perf_counter() - t0
    log(f"saved {args.save}")
    # peak up to the save, before verify() loads a second copy; ru_maxrss is KiB on Linux
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    params = sum(p.numel() for p in model.parameters())
    if params != expected_params(model.config, t):
        raise RuntimeError(f"{params} parameters, want {expected_params(model.config, t)}")
    stats = {"wall_s": round(wall, 2), "peak_rss_mb": round(peak, 1), "method": args.method,
             "target": t, "params": params}
    check = verify(model, args.save, calib[:4])
    if check["reload_params"] != params or not math.isclose(check["reload_max_abs_diff"], 0.0,
                                                             abs_tol=1e-4):
        raise RuntimeError(f"reloaded model differs from the in-memory one: {check}")
    stats.update(check)
    print(json.dumps(stats))
    if args.stats:
        args.stats.parent.mkdir(parents=True, exist_ok=True)
        args.stats.write_text(json.dumps(stats, indent=1) + "\n")


if __name__ == "__main__":
    main()
