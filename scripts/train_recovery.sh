#!/usr/bin/env bash
# Recovery training (optionally distillation) of a pruned Megatron checkpoint, on every GPU of
# this node (or NNODES nodes), resuming automatically from the latest checkpoint in SAVE.
#
# usage: bash scripts/train_recovery.sh PRUNED_CKPT SAVE_DIR DATA [extra trainer flags...]
#   PRUNED_CKPT  Megatron checkpoint to start from (any TP/PP, TE or local names)
#   SAVE_DIR     checkpoints + TensorBoard logs; rerun the same command to resume
#   DATA         --data-path value: a prefix, or a blend "0.7 web_text_document 0.3 code_document"
# environment (defaults):
#   GPUS_PER_NODE (all visible GPUs, 1 without CUDA)  NNODES (1)  NODE_RANK (0)
#   MASTER_ADDR (localhost)  MASTER_PORT (6000)
#   TP (1)  PP (1)  MBS (1)  GBS (256)  SEQ (4096)  TOKENS (12e9)  LR (3e-4)  MIN_LR (3e-5)
#   WARMUP (100 iterations)  TEACHER (unset: plain LM loss; a checkpoint dir: KD from it)
#   KD_T (1.0)  KD_ALPHA (1.0)
# example:
#   TP=2 TEACHER=ckpt/llama-8b-tp2 bash scripts/train_recovery.sh ckpt/pruned-4b run/4b \
#       "0.7 data/web_text_document 0.3 data/code_text_document" --eval-interval 500
set -euo pipefail
if [ $# -lt 3 ]; then
  sed -n '2,18p' "$0" >&2
  exit 2
fi
CKPT=$1 SAVE=$2 DATA=$3
shift 3
if [ -z "${GPUS_PER_NODE:-}" ]; then
  GPUS_PER_NODE=$(python -c "import torch; print(max(1, torch.cuda.device_count()))")
fi
KD=()
if [ -n "${TEACHER:-}" ]; then
  KD=(--teacher "$TEACHER" --kd-temperature "${KD_T:-1.0}" --kd-alpha "${KD_ALPHA:-1.0}")
fi
PRECISION=()
if python -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  PRECISION=(--bf16)
fi
# shellcheck disable=SC2086  # DATA is a list of words on purpose
exec torchrun --nproc_per_node "$GPUS_PER_NODE" --nnodes "${NNODES:-1}" \
  --node_rank "${NODE_RANK:-0}" --master_addr "${MASTER_ADDR:-localhost}" \
  --master_port "${MASTER_PORT:-6000}" -m megatron_prune.train \
  --pretrained-checkpoint "$CKPT" --load "$SAVE" --save "$SAVE" \
  --tensor-model-parallel-size "${TP:-1}" --pipeline-model-parallel-size "${PP:-1}" \
  --data-path $DATA --split 989,10,1 \
  --seq-length "${SEQ:-4096}" --micro-batch-size "${MBS:-1}" --global-batch-size "${GBS:-256}" \
  --train-tokens "${TOKENS:-12e9}" \
  --lr "${LR:-3e-4}" --min-lr "${MIN_LR:-3e-5}" --lr-warmup-iters "${WARMUP:-100}" \
  --lr-decay-style cosine --weight-decay 0.1 --clip-grad 1.0 --adam-beta2 0.95 \
  "${PRECISION[@]}" "${KD[@]}" \
  --eval-interval 1000 --eval-iters 20 --save-interval 1000 --log-interval 10 \
  --tensorboard-dir "$SAVE/tensorboard" "$@"
