#!/usr/bin/env bash
# Prune a Megatron checkpoint on its TP/PP shards.
# usage: bash scripts/prune_llama.sh --load DIR --save DIR2 [--hidden_size_remain H]
#          [--num_attention_heads_remain A] [--num_query_groups_remain G]
#          [--ffn_hidden_size_remain F] [--drop_layers 7,13 | --num_layers_remain N]
#          [--importance random|magnitude|activation|taylor|auto] [--scores FILE]
#          [--prune_type balance|global] [--seed S] [--force]
# Both the seed's underscore names and megatron-prune's dashed names are accepted.
set -euo pipefail
if [ $# -eq 0 ]; then
  exec python -m megatron_prune prune --help
fi
exec python -m megatron_prune prune "$@"
