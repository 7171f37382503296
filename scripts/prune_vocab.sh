#!/usr/bin/env bash
# Prune a tokenizer by frequency and, optionally, the embeddings of a checkpoint that uses it.
# usage: bash scripts/prune_vocab.sh TOKENIZER FREQ_JSON OUT_DIR CRITERION [MODEL MODEL_OUT]
#   CRITERION  0.999 (token coverage, a number < 1 or 1.0) | keep=N | min=C
#   MODEL      an HF model directory (has config.json) or a Megatron checkpoint directory
# Writes OUT_DIR/{tokenizer files, vocab_map.json} and, with MODEL, MODEL_OUT in MODEL's format.
# Extra prune-vocab flags (e.g. --keep-tokens FILE, --force) go in PRUNE_VOCAB_FLAGS.
# example: bash scripts/prune_vocab.sh Llama-2-7b freq.json llama2-tok 0.999 Llama-2-7b Llama-2-7b-pruned
set -euo pipefail
if [ $# -ne 4 ] && [ $# -ne 6 ]; then
  echo "usage: bash scripts/prune_vocab.sh TOKENIZER FREQ_JSON OUT_DIR CRITERION [MODEL MODEL_OUT]" >&2
  exit 2
fi
TOKENIZER=$1 FREQ=$2 OUT=$3 CRIT=$4
case "$CRIT" in
  keep=*) SELECT=(--keep "${CRIT#keep=}") ;;
  min=*)  SELECT=(--min-count "${CRIT#min=}") ;;
  *)      SELECT=(--coverage "$CRIT") ;;
esac
# shellcheck disable=SC2086
python -m megatron_prune prune-vocab --tokenizer "$TOKENIZER" --freq "$FREQ" "${SELECT[@]}" \
  --save "$OUT" ${PRUNE_VOCAB_FLAGS:-}
if [ $# -eq 6 ]; then
  MODEL=$5 MODEL_OUT=$6
  if [ -f "$MODEL/config.json" ]; then SRC=(--hf-dir "$MODEL"); else SRC=(--load "$MODEL"); fi
  python -m megatron_prune prune-embeddings --map "$OUT/vocab_map.json" "${SRC[@]}" --save "$MODEL_OUT"
fi
