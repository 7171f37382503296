#!/usr/bin/env bash
# Megatron checkpoint (any TP/PP, legacy or torch_dist) -> HF safetensors + config.json.
# usage: bash scripts/megatron_to_hf.sh LOAD_DIR SAVE_DIR [TOKENIZER] [extra flags...]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/megatron_to_hf.sh LOAD_DIR SAVE_DIR [TOKENIZER] [flags...]" >&2
  exit 2
fi
LOAD=$1 SAVE=$2
TOK=()
if [ $# -ge 3 ] && [ "${3#-}" = "$3" ]; then TOK=(--tokenizer "$3"); shift 3; else shift 2; fi
exec python -m megatron_prune megatron-to-hf --load "$LOAD" --save "$SAVE" "${TOK[@]}" "$@"
