"""prune (Megatron shards) and prune-hf (Hugging Face checkpoints)."""
from __future__ import annotations

import argparse
import json

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.checkpoint.megatron import megatron_lm_hint
from megatron_prune.prune.plan import LAYER_METHODS, PRUNE_TYPES, PruneTarget
from megatron_prune.prune.apply import PLAN_FILE, prune_hf, prune_megatron

IMPORTANCE = ("random", "magnitude", "activation", "taylor")


def layer_list(text: str) -> list:
    try:
        return [int(x) for x in text.replace(" ", "").split(",") if x != ""]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated layer indices, got {text!r}")


def add_target_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("target shape (a dimension not given is kept)")
    g.add_argument("--hidden-size-remain", "--hidden_size_remain", type=int, dest="hidden")
    g.add_argument("--num-attention-heads-remain", "--num_attention_heads_remain", type=int,
                   dest="heads")
    g.add_argument("--num-query-groups-remain", "--num_query_groups_remain", type=int,
                   dest="groups", help="KV groups to keep (default: all for GQA; = heads for MHA)")
    g.add_argument("--ffn-hidden-size-remain", "--ffn_hidden_size_remain", type=int, dest="ffn")
    g.add_argument("--drop-layers", "--drop_layers", type=layer_list, dest="drop_layers",
                   help="comma-separated layer indices to remove, e.g. 7,13")
    g.add_argument("--num-layers-remain", "--num_layers_remain", type=int, dest="num_layers",
                   help="keep this many layers, chosen by layer importance")
    g.add_argument("--layer-method", choices=LAYER_METHODS, default="block-influence",
                   help="with --num-layers-remain: drop the layers of lowest Block Influence "
                        "(1 - cos(in, out)), the contiguous block with least angular distance, "
                        "or the layers whose skipping raises the calibration loss least "
                        "(perplexity: needs scores from importance --layer-loss)")
    g = p.add_argument_group("what to keep")
    g.add_argument("--importance", choices=IMPORTANCE, default="random",
                   help="random: seeded random masks; magnitude: weight norms (no data); "
                        "activation/taylor: need --scores from `megatron-prune importance`")
    g.add_argument("--scores", help="scores file from `megatron-prune importance`")
    g.add_argument("--prune-type", "--prune_type", choices=PRUNE_TYPES, default="balance",
                   dest="prune_type",
                   help="balance: every TP rank keeps the best among its own; global: the best "
                        "overall, dealt out evenly over the ranks")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--plan", help=f"re-apply a saved {PLAN_FILE} instead of planning")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")


def target_from(a) -> PruneTarget:
    return PruneTarget(hidden_size=a.hidden, num_attention_heads=a.heads,
                       num_query_groups=a.groups, ffn_hidden_size=a.ffn,
                       drop_layers=a.drop_layers, num_layers=a.num_layers,
                       layer_method=a.layer_method)


def _run_prune(a) -> int:
    plan = prune_megatron(a.load, a.save, target_from(a), importance=a.importance,
                          scores=a.scores, prune_type=a.prune_type, seed=a.seed, plan_file=a.plan,
                          pp=a.pp, first=a.first, last=a.last, force=a.force)
    _report(plan, a.save)
    print(megatron_lm_hint(a.save))
    return 0


def _run_prune_hf(a) -> int:
    plan = prune_hf(a.hf_dir, a.save, target_from(a), importance=a.importance, scores=a.scores,
                    prune_type=a.prune_type, tp=a.tp, seed=a.seed, plan_file=a.plan,
                    force=a.force)
    _report(plan, a.save)
    return 0


def _report(plan, save) -> None:
    s, t = plan.source_config, plan.target_config
    print(f"pruned {s.num_params() / 1e6:.2f}M -> {t.num_params() / 1e6:.2f}M parameters "
          f"(layers {s.num_layers}->{t.num_layers}, hidden {s.hidden_size}->{t.hidden_size}, "
          f"heads {s.num_attention_heads}->{t.num_attention_heads}, groups "
          f"{s.num_query_groups}->{t.num_query_groups}, ffn {s.ffn_hidden_size}->"
          f"{t.ffn_hidden_size}); wrote {save} with {PLAN_FILE}")


def add_parsers(sub) -> None:
    p = sub.add_parser(
        "prune", help="structured pruning of a Megatron checkpoint, on its TP/PP shards",
        description="Prune width (hidden, heads, KV groups, FFN) and depth (layers) of a Megatron "
                    "checkpoint directly on its tensor-parallel shards, one output rank file at a "
                    "time. Writes the pruned checkpoint and prune_plan.json (what was kept).",
        epilog="example: megatron-prune prune --load ckpt/tp2 --save ckpt/tp2-pruned "
               "--ffn-hidden-size-remain 4096 --num-attention-heads-remain 16 "
               "--drop-layers 7,13 --importance activation --scores scores.pt")
    p.add_argument("--load", required=True, help="Megatron checkpoint to prune")
    p.add_argument("--save", required=True, help="output Megatron checkpoint")
    p.add_argument("--pipeline-model-parallel-size", type=int, dest="pp", default=None,
                   help="PP of the output (default: the input's); TP stays the input's")
    p.add_argument("--decoder-first-pipeline-num-layers", type=int, dest="first")
    p.add_argument("--decoder-last-pipeline-num-layers", type=int, dest="last")
    add_target_args(p)
    p.set_defaults(func=_run_prune)

    p = sub.add_parser(
        "prune-hf", help="structured pruning of a Hugging Face checkpoint",
        description="Apply the same pruning to a Hugging Face checkpoint (real weights, read "
                    "tensor by tensor); writes a model from_pretrained loads, with the tokenizer "
                    "files and prune_plan.json.",
        epilog="example: megatron-prune prune-hf --hf-dir Llama-3.2-1B --save pruned "
               "--ffn-hidden-size-remain 4096 --importance magnitude")
    p.add_argument("--hf-dir", required=True)
    p.add_argument("--save", required=True)
    p.add_argument("--tensor-model-parallel-size", type=int, dest="tp", default=1,
                   help="balance the plan for this TP (the TP you will train at)")
    add_target_args(p)
    p.set_defaults(func=_run_prune_hf)


# Keys of a prune config JSON (prune_hf/prune_llama.py), in the seed's and our own spelling.
CONFIG_KEYS = {
    "hidden_size_remain": "hidden", "num_attention_heads_remain": "heads",
    "num_query_groups_remain": "groups", "ffn_hidden_size_remain": "ffn",
    "drop_layers": "drop_layers", "num_layers_remain": "num_layers",
    "layer_method": "layer_method", "importance": "importance", "scores": "scores",
    "prune_type": "prune_type", "seed": "seed", "plan": "plan",
    "tensor_model_parallel_size": "tp",
}


def namespace_from_config(path) -> argparse.Namespace:
    try:
        cfg = json.loads(open(path).read())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"prune config {path}: {e}") from e
    unknown = sorted(set(cfg) - set(CONFIG_KEYS))
    if unknown:
        raise ConfigError(f"prune config {path}: unknown keys {unknown}; known: {sorted(CONFIG_KEYS)}")
    a = argparse.Namespace(hidden=None, heads=None, groups=None, ffn=None, drop_layers=None,
                           num_layers=None, layer_method="block-influence", importance="random",
                           scores=None, prune_type="balance", seed=1234, plan=None, tp=1)
    for k, v in cfg.items():
        setattr(a, CONFIG_KEYS[k], layer_list(v) if k == "drop_layers" and isinstance(v, str) else v)
    return a
