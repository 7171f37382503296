#!/usr/bin/env bash
# Reshard a Megatron checkpoint to another TP/PP (offline, CPU only).
# usage: bash scripts/transfer.sh LOAD_DIR SAVE_DIR TARGET_TP TARGET_PP [extra flags...]
#   extra flags: --decoder-first-pipeline-num-layers N, --transformer-impl local,
#                --ckpt-format torch_dist, --dtype bf16, --force
set -euo pipefail
if [ $# -lt 4 ]; then
  echo "usage: bash scripts/transfer.sh LOAD_DIR SAVE_DIR TARGET_TP TARGET_PP [flags...]" >&2
  exit 2
fi
LOAD=$1 SAVE=$2 TP=$3 PP=$4
shift 4
exec python -m megatron_prune reshard --load "$LOAD" --save "$SAVE" \
  --tensor-model-parallel-size "$TP" --pipeline-model-parallel-size "$PP" "$@"
