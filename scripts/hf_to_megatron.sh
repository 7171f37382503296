#!/usr/bin/env bash
# HF Llama checkpoint -> Megatron TP/PP checkpoint.
# usage: bash scripts/hf_to_megatron.sh HF_DIR SAVE_DIR [TP] [PP] [extra megatron-prune flags...]
set -euo pipefail
if [ $# -lt 2 ]; then
  echo "usage: bash scripts/hf_to_megatron.sh HF_DIR SAVE_DIR [TP=1] [PP=1] [flags...]" >&2
  exit 2
fi
HF_DIR=$1 SAVE=$2 TP=${3:-1} PP=${4:-1}
shift $(( $# < 4 ? $# : 4 ))
exec python -m megatron_prune hf-to-megatron --hf-dir "$HF_DIR" --save "$SAVE" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" "$@"
