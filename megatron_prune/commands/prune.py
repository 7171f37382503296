"""prune (Megatron shards) and prune-hf (Hugging Face checkpoints)."""
from __future__ import annotations

import argparse
import json

from megatron_prune.checkpoint.config import ConfigError
from megatron_prune.checkpoint.megatron import megatron_lm_hint
from megatron_prune.prune.apply import PLAN_FILE, SizeSearch, prune_hf, prune_megatron
from megatron_prune.prune.choose import parse_criteria
from megatron_prune.prune.plan import (AUTO_LAYER_METHOD, HIDDEN_AGGREGATIONS, LAYER_METHODS,
                                       PRUNE_TYPES, PruneTarget)
from megatron_prune.prune.search import Budget, SearchLimits, parse_size, table

IMPORTANCE = ("random", "magnitude", "activation", "taylor", "auto")


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
    g.add_argument("--layer-method", choices=(AUTO_LAYER_METHOD,) + LAYER_METHODS,
                   default=AUTO_LAYER_METHOD,
                   help="with --num-layers-remain: drop the layers of lowest Block Influence "
                        "(1 - cos(in, out)), the contiguous block with least angular distance, "
                        "or the layers whose skipping raises the calibration loss least "
                        "(perplexity: needs scores from importance --layer-loss), or removed "
                        "one at a time, each the cheapest with the earlier ones gone "
                        "(iterative: needs importance --iterative-layers). auto "
                        "(default): with auto scores the one of lowest calibration loss, "
                        "else block-influence")
    g.add_argument("--no-norm-rescale", dest="rescale_norms", action="store_false",
                   help="copy the kept norm weights as they are. By default, when hidden "
                        "channels are pruned with activation scores, each norm weight is scaled "
                        "by rms(kept channels) / rms(all) of its calibration input, so the "
                        "norm's output keeps its scale (the plan records the factors)")
    g.add_argument("--hidden-aggregation", choices=HIDDEN_AGGREGATIONS, default="balanced",
                   help="with activation or auto scores, how the norms' statistics rank hidden "
                        "channels: balanced (default: each norm's L2 vector over its mean, "
                        "summed; the lower calibration loss as pruned) or sum (the raw vectors "
                        "summed, as ModelOpt's Minitron does)")
    g.add_argument("--no-reconstruct", dest="reconstruct", action="store_false",
                   help="copy the kept columns of o_proj / down_proj as they are. By default, "
                        "when heads or FFN neurons go and the --scores file holds calibration "
                        "rows (importance stores up to 64 of its sequences), those columns are "
                        "refitted by least squares to reproduce the unpruned projection on "
                        "them (one forward pass of the unpruned model, streamed one layer "
                        "at a time, and an FFN x FFN matrix per layer in a temporary file)")
    add_size_args(p)
    g = p.add_argument_group("what to keep")
    g.add_argument("--importance", choices=IMPORTANCE, default="random",
                   help="random: seeded random masks; magnitude: weight norms (no data); "
                        "activation/taylor/auto: need --scores from `megatron-prune importance`")
    g.add_argument("--scores", help="scores file from `megatron-prune importance`")
    g.add_argument("--auto-criteria", type=criteria_arg, metavar="DIM=CRIT[,...]",
                   help="with auto scores: give the criterion of these width dimensions "
                        "instead of choosing it by calibration loss, e.g. heads=activation "
                        "(dimensions hidden, groups, heads, ffn; criteria activation, taylor)")
    g.add_argument("--prune-type", "--prune_type", choices=PRUNE_TYPES, default="balance",
                   dest="prune_type",
                   help="balance: every TP rank keeps the best among its own; global: the best "
                        "overall, dealt out evenly over the ranks")
    g.add_argument("--seed", type=int, default=1234)
    g.add_argument("--plan", help=f"re-apply a saved {PLAN_FILE} instead of planning (with "
                                  "the same --scores when it was reconstructed)")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty output directory")


def criteria_arg(text: str) -> dict:
    try:
        return parse_criteria(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e))


def add_size_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "prune to a size (instead of a shape): every shape that fits and loads at the "
        "checkpoint's TP/PP, the best by importance kept scored by calibration loss")
    g.add_argument("--target-params", type=parse_size, metavar="N",
                   help="parameter budget, e.g. 70M or 4B (candidates within "
                        "--budget-tolerance below it)")
    g.add_argument("--target-memory-gb", type=float, metavar="GIB",
                   help="memory budget: bf16 weights + the KV cache of --kv-batch-size "
                        "sequences of --kv-seq-length tokens")
    g.add_argument("--kv-seq-length", type=int, default=4096)
    g.add_argument("--kv-batch-size", type=int, default=1)
    g.add_argument("--budget-tolerance", type=float, default=0.01,
                   help="candidates use at least (1 - this) of the budget (default 0.01)")
    g.add_argument("--max-width-prune", type=float, default=0.5,
                   help="each of hidden, KV groups, heads per group and FFN keeps at least "
                        "(1 - this) of itself (default 0.5)")
    g.add_argument("--max-depth-prune", type=float, default=0.5,
                   help="at most this share of the layers is removed (default 0.5)")
    g.add_argument("--search-candidates", type=int, default=8,
                   help="how many shapes (the best by importance kept) are scored on data")
    g.add_argument("--search-data", nargs="+", metavar="FILE",
                   help="calibration text (.txt / .jsonl) the candidates' loss is measured on; "
                        "without it they are ranked by importance kept only")
    g.add_argument("--search-samples", type=int, default=8)
    g.add_argument("--search-seq-length", type=int, default=512)
    g.add_argument("--tokenizer", help="tokenizer for --search-data (default: the model's)")
    g.add_argument("--allow-hf-unloadable", action="store_true",
                   help="also try hidden sizes not divisible by the head count (transformers "
                        ">= 5 refuses to load those)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the candidates and the winner; write nothing")


def size_from(a, model_dir) -> "SizeSearch | None":
    """The size search the flags ask for (None: prune to the shape given)."""
    if a.target_params is None and a.target_memory_gb is None:
        if a.dry_run:
            raise ConfigError("--dry-run goes with --target-params or --target-memory-gb")
        return None
    if a.target_params is not None and a.target_memory_gb is not None:
        raise ConfigError("give --target-params or --target-memory-gb, not both")
    shape = [f for f in ("hidden", "heads", "groups", "ffn", "drop_layers", "num_layers")
             if getattr(a, f) is not None]
    if shape:
        raise ConfigError(f"a size target chooses the shape itself: drop {shape} (or the size)")
    if a.plan:
        raise ConfigError("--plan re-applies a saved plan: drop the size target")
    budget = Budget(params=a.target_params, tolerance=a.budget_tolerance,
                    memory_bytes=None if a.target_memory_gb is None
                    else int(a.target_memory_gb * 2**30),
                    kv_seq_length=a.kv_seq_length, kv_batch=a.kv_batch_size)
    limits = SearchLimits(max_width_prune=a.max_width_prune, max_depth_prune=a.max_depth_prune,
                          hf_loadable=not a.allow_hf_unloadable, keep=a.search_candidates)
    return SizeSearch(budget, limits, _search_batches(a, model_dir), dry_run=a.dry_run)


def _search_batches(a, model_dir):
    if not a.search_data:
        return None
    from megatron_prune.checkpoint.hf import model_tokenizer_dir
    from megatron_prune.data.calibration import calibration_batches, load_tokenizer
    tok = load_tokenizer(a.tokenizer or model_tokenizer_dir(model_dir))
    return calibration_batches(tok, a.search_data, a.search_samples, a.search_seq_length)


def target_from(a) -> PruneTarget:
    return PruneTarget(hidden_size=a.hidden, num_attention_heads=a.heads,
                       num_query_groups=a.groups, ffn_hidden_size=a.ffn,
                       drop_layers=a.drop_layers, num_layers=a.num_layers,
                       layer_method=a.layer_method, rescale_norms=a.rescale_norms,
                       hidden_aggregation=a.hidden_aggregation, reconstruct=a.reconstruct,
                       criteria=_criteria(a.auto_criteria))


def _criteria(value) -> "dict | None":
    """--auto-criteria's dict (from a config file: the same text, or a dict), checked."""
    if not value:
        return None
    if isinstance(value, dict):
        value = ",".join(f"{k}={v}" for k, v in value.items())
    try:
        return parse_criteria(value)
    except ValueError as e:
        raise ConfigError(f"auto_criteria: {e}") from e


def _run_prune(a) -> int:
    size = size_from(a, a.load)
    plan = prune_megatron(a.load, a.save, target_from(a), importance=a.importance,
                          scores=a.scores, prune_type=a.prune_type, seed=a.seed, plan_file=a.plan,
                          pp=a.pp, first=a.first, last=a.last, force=a.force, size=size)
    _report(plan, a.save, size)
    if not (size and size.dry_run):
        print(megatron_lm_hint(a.save))
    return 0


def _run_prune_hf(a) -> int:
    size = size_from(a, a.hf_dir)
    plan = prune_hf(a.hf_dir, a.save, target_from(a), importance=a.importance, scores=a.scores,
                    prune_type=a.prune_type, tp=a.tp, seed=a.seed, plan_file=a.plan,
                    force=a.force, size=size)
    _report(plan, a.save, size)
    return 0


def _report(plan, save, size=None) -> None:
    s, t = plan.source_config, plan.target_config
    if "search" in plan.meta:
        print(table(plan.meta["search"], s))
    dry = size is not None and size.dry_run
    print(f"{'would prune' if dry else 'pruned'} {s.num_params() / 1e6:.2f}M -> "
          f"{t.num_params() / 1e6:.2f}M parameters "
          f"(layers {s.num_layers}->{t.num_layers}, hidden {s.hidden_size}->{t.hidden_size}, "
          f"heads {s.num_attention_heads}->{t.num_attention_heads}, groups "
          f"{s.num_query_groups}->{t.num_query_groups}, ffn {s.ffn_hidden_size}->"
          f"{t.ffn_hidden_size})" + ("; --dry-run: nothing written" if dry else
                                     f"; wrote {save} with {PLAN_FILE}"))


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
    "tensor_model_parallel_size": "tp", "rescale_norms": "rescale_norms",
    "reconstruct": "reconstruct", "auto_criteria": "auto_criteria",
    "hidden_aggregation": "hidden_aggregation",
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
                           num_layers=None, layer_method=AUTO_LAYER_METHOD, importance="random",
                           scores=None, prune_type="balance", seed=1234, plan=None, tp=1,
                           rescale_norms=True, reconstruct=True, auto_criteria=None,
                           hidden_aggregation="balanced")
    for k, v in cfg.items():
        setattr(a, CONFIG_KEYS[k], layer_list(v) if k == "drop_layers" and isinstance(v, str) else v)
    return a
