"""Prune a Hugging Face Llama checkpoint with a JSON prune config (the seed's interface).

    python prune_hf/prune_llama.py --model_name_or_path Llama-2-7b-hf \
        --prune_config_path prune.json --output_path Llama-2-3.4b-pruned

prune.json (seed names; a key left out keeps that dimension):
    {"hidden_size_remain": 3072, "num_attention_heads_remain": 24,
     "ffn_hidden_size_remain": 8192, "drop_layers": [7, 13], "prune_type": "balance",
     "importance": "magnitude", "seed": 1234}
Also accepted: num_query_groups_remain, num_layers_remain, layer_method, scores, plan,
tensor_model_parallel_size, rescale_norms, reconstruct. Same as `megatron-prune prune-hf`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megatron_prune.cli import USER_ERRORS  # noqa: E402
from megatron_prune.commands.prune import _report, namespace_from_config, target_from  # noqa: E402
from megatron_prune.prune.apply import prune_hf  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model_name_or_path", required=True, help="HF model directory")
    ap.add_argument("--prune_config_path", required=True, help="JSON prune config")
    ap.add_argument("--output_path", required=True, help="output HF model directory")
    ap.add_argument("--force", action="store_true", help="overwrite a non-empty output")
    args = ap.parse_args(argv)
    try:
        a = namespace_from_config(args.prune_config_path)
        plan = prune_hf(args.model_name_or_path, args.output_path, target_from(a),
                        importance=a.importance, scores=a.scores, prune_type=a.prune_type,
                        tp=a.tp, seed=a.seed, plan_file=a.plan, force=args.force)
    except USER_ERRORS as e:
        print(f"prune_llama.py: error: {e}", file=sys.stderr)
        return 2
    _report(plan, args.output_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
